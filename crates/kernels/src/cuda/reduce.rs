//! Deterministic f64 sums on the device (kernels/reduce.cu): a helper shared by `sum_squares`
//! (elementwise.rs: Σx²) and the losses (cross_entropy.rs, lm_head.rs: Σ of per-row losses). Not an
//! op of the `Backend` trait.

use super::args::BufArg;
use super::{be, n64, Cuda, CudaBuf};
use crate::error::Result;
use crate::launch::{self};

impl Cuda {
    /// Σ of a device reduction (mode 0: Σx², mode 1: Σx) in f64.
    pub(super) fn reduce(&self, x: &CudaBuf, off: usize, n: usize, mode: i32) -> Result<f64> {
        if n == 0 {
            return Ok(0.0);
        }
        let l = launch::reduce(n);
        let parts = self
            .stream
            .alloc_zeros::<f64>(l.grid.0 as usize)
            .map_err(be("alloc"))?;
        let out = self.stream.alloc_zeros::<f64>(1).map_err(be("alloc"))?;
        self.reduce_partial_k(l, BufArg::at(x, off), n64(n), mode, &parts)?;
        let l2 = launch::Launch {
            grid: (1, 1, 1),
            block: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.reduce_final_k(l2, &parts, l.grid.0 as i32, &out)?;
        Ok(self
            .stream
            .clone_dtoh(&out)
            .map_err(be("device to host copy"))?[0])
    }
}
