//! Soft-capping c·tanh(x/c): kernels/softcap.cu. CPU twin: cpu/softcap.rs.

use super::{n64, Cuda, CudaBuf};
use crate::error::{check_len, ensure, Result};
use crate::launch::{self};

pub(super) fn softcap_fwd(cu: &Cuda, x: &mut CudaBuf, cap: f32) -> Result<()> {
    ensure("softcap_fwd", "cap", cap > 0.0 && cap.is_finite(), || {
        format!("cap = {cap} must be finite and > 0")
    })?;
    let n = x.len;
    cu.softcap_fwd_k(launch::elementwise(n), x, n64(n), cap)
}

pub(super) fn softcap_bwd(cu: &Cuda, y: &CudaBuf, dy: &mut CudaBuf, cap: f32) -> Result<()> {
    ensure("softcap_bwd", "cap", cap > 0.0 && cap.is_finite(), || {
        format!("cap = {cap} must be finite and > 0")
    })?;
    check_len("softcap_bwd", "dy", dy.len, y.len, || {
        format!("[{}]", y.len)
    })?;
    cu.softcap_bwd_k(launch::elementwise(y.len), y, dy, n64(y.len), cap)
}
