//! Gemma RMSNorm: kernels/rmsnorm.cu. CPU twin: cpu/rmsnorm.rs.

use super::{n64, Cuda, CudaBuf};
use crate::error::{check_len, ensure, Result};
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
    check_len("rmsnorm_fwd", "x", x.len, n * h, || {
        format!("[N={n}, H={h}]")
    })?;
    check_len("rmsnorm_fwd", "w", w.len, h, || format!("[H={h}]"))?;
    check_len("rmsnorm_fwd", "y", y.len, n * h, || {
        format!("[N={n}, H={h}]")
    })?;
    check_len("rmsnorm_fwd", "rstd", rstd.len, n, || format!("[N={n}]"))?;
    if n == 0 {
        return Ok(());
    }
    ensure("rmsnorm_fwd", "h", h > 0, || "H must be ≥ 1".into())?;
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
    check_len("rmsnorm_bwd", "dy", dy.len, n * h, || {
        format!("[N={n}, H={h}]")
    })?;
    check_len("rmsnorm_bwd", "x", x.len, n * h, || {
        format!("[N={n}, H={h}]")
    })?;
    check_len("rmsnorm_bwd", "w", w.len, h, || format!("[H={h}]"))?;
    check_len("rmsnorm_bwd", "rstd", rstd.len, n, || format!("[N={n}]"))?;
    check_len("rmsnorm_bwd", "dx", dx.len, n * h, || {
        format!("[N={n}, H={h}]")
    })?;
    if n == 0 || h == 0 {
        return Ok(());
    }
    let hi = to_i32("rmsnorm_bwd", "h", h)?;
    let l = launch::rows("rmsnorm_bwd", n, h, 1024)?;
    cu.rmsnorm_bwd_k(l, dy, x, w, rstd, dx, hi)?;
    if let Some(dw) = dw {
        check_len("rmsnorm_bwd", "dw", dw.len, h, || format!("[H={h}]"))?;
        cu.rmsnorm_dw_k(launch::elementwise(h), dy, x, rstd, dw, n64(n), hi)?;
    }
    Ok(())
}
