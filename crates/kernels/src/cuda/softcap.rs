//! Soft-capping c·tanh(x/c): kernels/softcap.cu. CPU twin: cpu/softcap.rs.

use super::{n64, Cuda, CudaBuf};
use crate::contract;
use crate::error::Result;
use crate::launch::{self};

pub(super) fn softcap_fwd(cu: &Cuda, x: &mut CudaBuf, cap: f32) -> Result<()> {
    contract::softcap_fwd(cap)?;
    let n = x.len;
    cu.softcap_fwd_k(launch::elementwise(n), x, n64(n), cap)
}

pub(super) fn softcap_bwd(cu: &Cuda, y: &CudaBuf, dy: &mut CudaBuf, cap: f32) -> Result<()> {
    contract::softcap_bwd(y.len, dy.len, cap)?;
    cu.softcap_bwd_k(launch::elementwise(y.len), y, dy, n64(y.len), cap)
}
