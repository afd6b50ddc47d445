//! Rotary position embedding: kernels/rope.cu. CPU twin: cpu/rope.rs.

use super::{be, n64, Cuda, CudaBuf, CudaIds};
use crate::error::{check_len, ensure, KernelError, Result};
use crate::launch::{self, to_i32};

#[allow(clippy::too_many_arguments)]
pub(super) fn rope(
    cu: &Cuda,
    x: &mut CudaBuf,
    pos: &CudaIds,
    n: usize,
    heads: usize,
    d: usize,
    theta: f32,
    inverse: bool,
) -> Result<()> {
    // Same checks, in the same order, as the CPU backend.
    ensure("rope", "d", d > 0 && d.is_multiple_of(2), || {
        format!("head dim D must be even and > 0, got {d}")
    })?;
    ensure("rope", "heads", heads > 0, || {
        "heads must be > 0".to_string()
    })?;
    ensure("rope", "theta", theta.is_finite() && theta > 0.0, || {
        format!("theta must be finite and > 0, got {theta}")
    })?;
    let total = n.checked_mul(heads).and_then(|v| v.checked_mul(d));
    ensure("rope", "n", total.is_some(), || {
        format!("N·heads·D = {n}·{heads}·{d} overflows")
    })?;
    check_len("rope", "x", x.len, n * heads * d, || {
        format!("[N={n}, heads={heads}, D={d}]")
    })?;
    check_len("rope", "pos", pos.len, n, || {
        format!("[N={n}, heads={heads}, D={d}]")
    })?;
    if n == 0 {
        return Ok(());
    }
    // Negative positions are an error (one i32 read back: the flag of the check kernel).
    if let Some(i) = cu.first_bad_id(pos, 0, n, i32::MAX as usize, false)? {
        let p = cu
            .stream
            .clone_dtoh(&pos.data.slice(i..i + 1))
            .map_err(be("device to host copy"))?[0];
        return Err(KernelError::Invalid {
            op: "rope",
            arg: "pos",
            msg: format!("position {p} at token {i} is negative"),
        });
    }
    let l = launch::elementwise(n * heads * d / 2);
    cu.rope_k(
        l,
        x,
        &pos.data,
        n64(n),
        to_i32("rope", "heads", heads)?,
        to_i32("rope", "d", d)?,
        theta,
        inverse as i32,
    )
}
