//! Embedding lookup and its scatter-add backward: kernels/embedding.cu. CPU twin: cpu/embedding.rs.

use super::args::PtrArg;
use super::{be, n64, Cuda, CudaBuf, CudaIds};
use crate::error::{check_len, ensure, KernelError, Result};
use crate::launch::{self, to_i32};
use cudarc::driver::CudaSlice;

impl Cuda {
    /// Index of the first id outside [0, v) (labels: −100 allowed), or None.
    pub(super) fn first_bad_id(
        &self,
        ids: &CudaIds,
        off: usize,
        n: usize,
        v: usize,
        labels: bool,
    ) -> Result<Option<usize>> {
        if n == 0 {
            return Ok(None);
        }
        let bad: CudaSlice<i32> = self.stream.clone_htod(&[i32::MAX]).map_err(be("alloc"))?;
        let vi = to_i32("ids", "v", v)?;
        let (l, ids) = (launch::elementwise(n), PtrArg::At(&ids.data, off));
        if labels {
            self.labels_check_k(l, ids, n64(n), vi, &bad)?;
        } else {
            self.ids_check_k(l, ids, n64(n), vi, &bad)?;
        }
        let host = self
            .stream
            .clone_dtoh(&bad)
            .map_err(be("device to host copy"))?;
        Ok((host[0] != i32::MAX).then_some(host[0] as usize))
    }
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
    check_len("embedding_fwd", "table", table.len, v * h, || {
        format!("[V={v}, H={h}]")
    })?;
    ensure(
        "embedding_fwd",
        "out",
        h > 0 && out.len.is_multiple_of(h),
        || format!("out has {} elements, not a multiple of H = {h}", out.len),
    )?;
    let n = out.len / h;
    if n == 0 {
        return Ok(());
    }
    check_len("embedding_fwd", "ids", ids.len, n, || format!("[N={n}]"))?;
    if let Some(i) = cu.first_bad_id(ids, 0, n, v, false)? {
        let id = cu
            .stream
            .clone_dtoh(&ids.data.slice(i..i + 1))
            .map_err(be("device to host copy"))?[0];
        return Err(KernelError::Invalid {
            op: "embedding_fwd",
            arg: "ids",
            msg: format!("ids[{i}] = {id} is outside [0, V={v})"),
        });
    }
    if n == 0 {
        return Ok(());
    }
    let l = launch::rows("embedding_fwd", n, h, 256)?;
    cu.embedding_fwd_k(
        l,
        &ids.data,
        table,
        out,
        to_i32("embedding_fwd", "h", h)?,
        scale,
    )
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
    check_len("embedding_bwd", "dtable", dtable.len, v * h, || {
        format!("[V={v}, H={h}]")
    })?;
    ensure(
        "embedding_bwd",
        "dout",
        h > 0 && dout.len.is_multiple_of(h),
        || format!("dout has {} elements, not a multiple of H = {h}", dout.len),
    )?;
    let n = dout.len / h;
    if n == 0 {
        return Ok(());
    }
    check_len("embedding_bwd", "ids", ids.len, n, || format!("[N={n}]"))?;
    if let Some(i) = cu.first_bad_id(ids, 0, n, v, false)? {
        let id = cu
            .stream
            .clone_dtoh(&ids.data.slice(i..i + 1))
            .map_err(be("device to host copy"))?[0];
        return Err(KernelError::Invalid {
            op: "embedding_bwd",
            arg: "ids",
            msg: format!("ids[{i}] = {id} is outside [0, V={v})"),
        });
    }
    if n == 0 {
        return Ok(());
    }
    let l = launch::rows("embedding_bwd", n, h, 256)?;
    cu.embedding_bwd_k(
        l,
        &ids.data,
        dout,
        dtable,
        to_i32("embedding_bwd", "h", h)?,
        scale,
    )
}
