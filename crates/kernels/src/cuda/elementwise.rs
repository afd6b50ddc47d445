//! Elementwise ops (`copy`, `fill`, `copy_range`, `axpy`, `scale`, `mul`, `sum_squares`):
//! kernels/elementwise.cu, and reduce.cu for the sum. CPU twin: cpu/elementwise.rs.

use super::args::BufArg;
use super::{n64, Cuda, CudaBuf};
use crate::contract;
use crate::error::Result;
use crate::launch::{self};

pub(super) fn copy(cu: &Cuda, src: &CudaBuf, dst: &mut CudaBuf) -> Result<()> {
    contract::copy(src.len, dst.len)?;
    cu.copy_k(launch::elementwise(src.len), src, dst, n64(src.len))
}

pub(super) fn fill(cu: &Cuda, buf: &mut CudaBuf, value: f32) -> Result<()> {
    let n = buf.len;
    cu.fill_k(launch::elementwise(n), buf, n64(n), value)
}

pub(super) fn copy_range(
    cu: &Cuda,
    src: &CudaBuf,
    src_off: usize,
    dst: &mut CudaBuf,
    dst_off: usize,
    n: usize,
) -> Result<()> {
    contract::copy_range(src.len, src_off, dst.len, dst_off, n)?;
    if n == 0 {
        return Ok(());
    }
    // copy_k on views that start at the offsets (device to device, converting dtypes as `copy`
    // does); both ranges were checked to lie inside the buffers' logical lengths, which never
    // exceed their allocations.
    let dst: &CudaBuf = dst;
    cu.copy_k(
        launch::elementwise(n),
        BufArg::at(src, src_off),
        BufArg::at(dst, dst_off),
        n64(n),
    )
}

pub(super) fn axpy(cu: &Cuda, alpha: f32, x: &CudaBuf, y: &mut CudaBuf) -> Result<()> {
    contract::axpy(x.len, y.len)?;
    cu.axpy_k(launch::elementwise(x.len), alpha, x, y, n64(x.len))
}

pub(super) fn scale(cu: &Cuda, x: &mut CudaBuf, alpha: f32) -> Result<()> {
    let n = x.len;
    cu.scale_k(launch::elementwise(n), x, n64(n), alpha)
}

pub(super) fn mul(cu: &Cuda, x: &mut CudaBuf, m: &CudaBuf) -> Result<()> {
    contract::mul(x.len, m.len)?;
    let x: &CudaBuf = x;
    cu.mul_k(launch::elementwise(x.len), x, m, x, n64(x.len))
}

pub(super) fn sum_squares(cu: &Cuda, x: &CudaBuf) -> Result<f64> {
    cu.reduce(x, 0, x.len, 0)
}
