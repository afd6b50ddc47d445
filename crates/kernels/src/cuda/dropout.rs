//! Counter-based dropout masks: kernels/dropout.cu. CPU twin (and the reference for the bits):
//! cpu/dropout.rs.

use super::{n64, Cuda, CudaBuf};
use crate::contract::check_p;
use crate::cpu::dropout::{keep_value, mask_key, threshold};
use crate::error::Result;
use crate::launch::{self};

pub(super) fn dropout_mask(
    cu: &Cuda,
    out: &mut CudaBuf,
    p: f64,
    seed: u64,
    stream: u64,
) -> Result<()> {
    check_p("dropout_mask", p)?;
    if out.len == 0 {
        return Ok(());
    }
    // key, threshold and keep value computed on the host by the CPU reference's functions; the
    // kernel only hashes indices (identical integer arithmetic), so the bits match the CPU's.
    let (key, thr, keep) = (mask_key(seed, stream), threshold(p), keep_value(p));
    let out: &CudaBuf = out;
    cu.dropout_mask_k(
        launch::elementwise(out.len),
        out,
        n64(out.len),
        key as i64,
        thr as i64,
        keep,
    )
}
