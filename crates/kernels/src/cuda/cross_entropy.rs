//! Soft-capped cross-entropy over materialized logits: kernels/cross_entropy.cu (`ce_row_k`) and
//! reduce.cu for the sum. CPU twin: cpu/cross_entropy.rs.

use super::{Cuda, CudaBuf, CudaIds, Data, Dtype};
use crate::contract;
use crate::error::{KernelError, Result};
use crate::launch::{self, to_i32};
use cudarc::driver::CudaSlice;

#[allow(clippy::too_many_arguments)]
pub(super) fn cross_entropy(
    cu: &Cuda,
    logits: &CudaBuf,
    labels: &CudaIds,
    n: usize,
    v: usize,
    softcap: Option<f32>,
    grad_scale: f32,
    dlogits: Option<&mut CudaBuf>,
) -> Result<(f64, usize)> {
    let count = contract::cross_entropy(
        logits.len,
        labels,
        n,
        v,
        softcap,
        dlogits.as_deref().map(CudaBuf::len),
    )?;
    if n == 0 {
        return Ok((0.0, 0));
    }
    let cap = softcap.unwrap_or(0.0);
    let row_loss = cu.zeros_as(n, Dtype::F32)?;
    let l = launch::rows("cross_entropy", n, v, 1024)?;
    let (d_arg, want) = match dlogits {
        Some(d) => (Some(&*d), 1),
        None => (None, 0),
    };
    cu.ce_row_k(
        l,
        logits,
        &labels.data,
        to_i32("cross_entropy", "v", v)?,
        cap,
        grad_scale,
        d_arg,
        want,
        f32_slice(&row_loss)?,
    )?;
    Ok((cu.reduce(&row_loss, 0, n, 1)?, count))
}

pub(super) fn f32_slice(b: &CudaBuf) -> Result<&CudaSlice<f32>> {
    match &b.data {
        Data::F32(s) => Ok(s),
        Data::Bf16(_) | Data::F16(_) => Err(KernelError::Backend {
            backend: "cuda",
            msg: "internal: expected an f32 scratch buffer".into(),
        }),
    }
}
