//! Embedding lookup and its scatter-add backward: kernels/embedding.cu. CPU twin: cpu/embedding.rs.

use super::{Cuda, CudaBuf, CudaIds};
use crate::contract;
use crate::error::Result;
use crate::launch::{self, to_i32};

pub(super) fn embedding_fwd(
    cu: &Cuda,
    ids: &CudaIds,
    table: &CudaBuf,
    out: &mut CudaBuf,
    v: usize,
    h: usize,
    scale: f32,
) -> Result<()> {
    const OP: &str = "embedding_fwd";
    contract::embedding_fwd(ids, table.len, out.len, v, h)?;
    let n = ids.len;
    if n == 0 || h == 0 {
        return Ok(());
    }
    let l = launch::rows(OP, n, h, 256)?;
    let (vi, hi) = (to_i32(OP, "v", v)?, to_i32(OP, "h", h)?);
    cu.embedding_fwd_k(l, &ids.data, table, out, vi, hi, scale)
}

pub(super) fn embedding_bwd(
    cu: &Cuda,
    ids: &CudaIds,
    dout: &CudaBuf,
    dtable: &mut CudaBuf,
    v: usize,
    h: usize,
    scale: f32,
) -> Result<()> {
    const OP: &str = "embedding_bwd";
    contract::embedding_bwd(ids, dout.len, dtable.len, v, h)?;
    let n = ids.len;
    if n == 0 || h == 0 {
        return Ok(());
    }
    let l = launch::rows(OP, n, h, 256)?;
    let (vi, hi) = (to_i32(OP, "v", v)?, to_i32(OP, "h", h)?);
    cu.embedding_bwd_k(l, &ids.data, dout, dtable, vi, hi, scale)
}
