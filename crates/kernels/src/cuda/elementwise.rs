//! Elementwise ops (`copy`, `fill`, `copy_range`, `axpy`, `scale`, `mul`, `sum_squares`):
//! kernels/elementwise.cu, and reduce.cu for the sum. CPU twin: cpu/elementwise.rs.

use super::{n64, Arg, Cuda, CudaBuf};
use crate::cpu::elementwise::check_range;
use crate::error::{check_len, Result};
use crate::launch::{self};

pub(super) fn copy(cu: &Cuda, src: &CudaBuf, dst: &mut CudaBuf) -> Result<()> {
    check_len("copy", "dst", dst.len, src.len, || format!("[{}]", src.len))?;
    cu.launch(
        "elementwise.cu",
        "copy_k",
        launch::elementwise(src.len),
        &[Arg::Buf(src), Arg::Buf(dst), n64(src.len)],
    )
}

pub(super) fn fill(cu: &Cuda, buf: &mut CudaBuf, value: f32) -> Result<()> {
    cu.launch(
        "elementwise.cu",
        "fill_k",
        launch::elementwise(buf.len),
        &[Arg::Buf(buf), n64(buf.len), Arg::F32(value)],
    )
}

pub(super) fn copy_range(
    cu: &Cuda,
    src: &CudaBuf,
    src_off: usize,
    dst: &mut CudaBuf,
    dst_off: usize,
    n: usize,
) -> Result<()> {
    check_range("copy_range", "src_off", src_off, n, src.len)?;
    check_range("copy_range", "dst_off", dst_off, n, dst.len)?;
    if n == 0 {
        return Ok(());
    }
    // copy_k on views that start at the offsets (device to device, converting dtypes as `copy`
    // does); both ranges were checked to lie inside the buffers' logical lengths, which never
    // exceed their allocations.
    let dst: &CudaBuf = dst;
    cu.launch(
        "elementwise.cu",
        "copy_k",
        launch::elementwise(n),
        &[Arg::BufAt(src, src_off), Arg::BufAt(dst, dst_off), n64(n)],
    )
}

pub(super) fn axpy(cu: &Cuda, alpha: f32, x: &CudaBuf, y: &mut CudaBuf) -> Result<()> {
    check_len("axpy", "y", y.len, x.len, || format!("[{}]", x.len))?;
    cu.launch(
        "elementwise.cu",
        "axpy_k",
        launch::elementwise(x.len),
        &[Arg::F32(alpha), Arg::Buf(x), Arg::Buf(y), n64(x.len)],
    )
}

pub(super) fn scale(cu: &Cuda, x: &mut CudaBuf, alpha: f32) -> Result<()> {
    cu.launch(
        "elementwise.cu",
        "scale_k",
        launch::elementwise(x.len),
        &[Arg::Buf(x), n64(x.len), Arg::F32(alpha)],
    )
}

pub(super) fn mul(cu: &Cuda, x: &mut CudaBuf, m: &CudaBuf) -> Result<()> {
    check_len("mul", "m", m.len, x.len, || format!("[{}]", x.len))?;
    let x: &CudaBuf = x;
    cu.launch(
        "elementwise.cu",
        "mul_k",
        launch::elementwise(x.len),
        &[Arg::Buf(x), Arg::Buf(m), Arg::Buf(x), n64(x.len)],
    )
}

pub(super) fn sum_squares(cu: &Cuda, x: &CudaBuf) -> Result<f64> {
    cu.reduce(x, 0, x.len, 0)
}
