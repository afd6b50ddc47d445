//! Gemma RMSNorm: kernels/rmsnorm.cu. CPU twin: cpu/rmsnorm.rs.

use super::{n64, Cuda, CudaBuf};
use crate::contract;
use crate::error::Result;
use crate::launch::{self, to_i32};

#[allow(clippy::too_many_arguments)]
pub(super) fn rmsnorm_fwd(
    cu: &Cuda,
    x: &CudaBuf,
    w: &CudaBuf,
    y: &mut CudaBuf,
    rstd: &mut CudaBuf,
    n: usize,
    h: usize,
    eps: f32,
) -> Result<()> {
    contract::rmsnorm_fwd(x.len, w.len, y.len, rstd.len, n, h, eps)?;
    if n == 0 {
        return Ok(());
    }
    let l = launch::rows("rmsnorm_fwd", n, h, 1024)?;
    cu.rmsnorm_fwd_k(l, x, w, y, rstd, to_i32("rmsnorm_fwd", "h", h)?, eps)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn rmsnorm_bwd(
    cu: &Cuda,
    dy: &CudaBuf,
    x: &CudaBuf,
    w: &CudaBuf,
    rstd: &CudaBuf,
    dx: &mut CudaBuf,
    dw: Option<&mut CudaBuf>,
    n: usize,
    h: usize,
) -> Result<()> {
    contract::rmsnorm_bwd(
        dy.len,
        x.len,
        w.len,
        rstd.len,
        dx.len,
        dw.as_deref().map(CudaBuf::len),
        n,
        h,
    )?;
    if n == 0 || h == 0 {
        return Ok(());
    }
    let hi = to_i32("rmsnorm_bwd", "h", h)?;
    let l = launch::rows("rmsnorm_bwd", n, h, 1024)?;
    cu.rmsnorm_bwd_k(l, dy, x, w, rstd, dx, hi)?;
    if let Some(dw) = dw {
        cu.rmsnorm_dw_k(launch::elementwise(h), dy, x, rstd, dw, n64(n), hi)?;
    }
    Ok(())
}
