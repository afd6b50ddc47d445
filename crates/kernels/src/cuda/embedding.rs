//! Embedding lookup and its scatter-add backward: kernels/embedding.cu. CPU twin: cpu/embedding.rs.

use super::{Cuda, CudaBuf, CudaIds};
use crate::contract;
use crate::error::Result;
use crate::launch::{self, to_i32, Launch};

/// One block per id row, and V, H as the kernels' ints; None when there is nothing to do.
fn plan(op: &'static str, ids: &CudaIds, v: usize, h: usize) -> Result<Option<(Launch, i32, i32)>> {
    if ids.len == 0 || h == 0 {
        return Ok(None);
    }
    let l = launch::rows(op, ids.len, h, 256)?;
    Ok(Some((l, to_i32(op, "v", v)?, to_i32(op, "h", h)?)))
}

pub(super) fn embedding_fwd(
    cu: &Cuda,
    ids: &CudaIds,
    table: &CudaBuf,
    out: &mut CudaBuf,
    v: usize,
    h: usize,
    scale: f32,
) -> Result<()> {
    contract::embedding_fwd(ids, table.len, out.len, v, h)?;
    match plan("embedding_fwd", ids, v, h)? {
        Some((l, vi, hi)) => cu.embedding_fwd_k(l, &ids.data, table, out, vi, hi, scale),
        None => Ok(()),
    }
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
    contract::embedding_bwd(ids, dout.len, dtable.len, v, h)?;
    match plan("embedding_bwd", ids, v, h)? {
        Some((l, vi, hi)) => cu.embedding_bwd_k(l, &ids.data, dout, dtable, vi, hi, scale),
        None => Ok(()),
    }
}
