//! Rotary position embedding: kernels/rope.cu. CPU twin: cpu/rope.rs.

use super::{n64, Cuda, CudaBuf, CudaIds};
use crate::contract;
use crate::error::Result;
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
    contract::rope(x.len, pos, n, heads, d, theta)?;
    if n == 0 {
        return Ok(());
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
