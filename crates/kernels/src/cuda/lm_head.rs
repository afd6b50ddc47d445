//! Fused tied LM head + cross-entropy, chunked over rows: GEMMs (gemm.rs) around
//! kernels/cross_entropy.cu's `ce_row_k`. CPU twin: cpu/lm_head.rs.

use super::args::PtrArg;
use super::cross_entropy::f32_slice;
use super::gemm::op;
use super::{Cuda, CudaBuf, CudaIds, Dtype};
use crate::contract;
use crate::error::Result;
use crate::launch::{self, to_i32};

/// Bytes of f32 logits the fused LM head + cross-entropy keeps per row chunk.
const LM_HEAD_CHUNK_BYTES: usize = 256 << 20;

#[allow(clippy::too_many_arguments)]
pub(super) fn lm_head_ce(
    cu: &Cuda,
    hidden: &CudaBuf,
    emb: &CudaBuf,
    labels: &CudaIds,
    n: usize,
    h: usize,
    v: usize,
    softcap: Option<f32>,
    grad_scale: f32,
    dhidden: Option<&mut CudaBuf>,
    demb: Option<&mut CudaBuf>,
) -> Result<(f64, usize)> {
    let count = contract::lm_head_ce(
        hidden.len,
        emb.len,
        labels,
        n,
        h,
        v,
        softcap,
        dhidden.as_deref().map(CudaBuf::len),
        demb.as_deref().map(CudaBuf::len),
    )?;
    if n == 0 {
        return Ok((0.0, 0));
    }
    let cap = softcap.unwrap_or(0.0);
    let dhidden: Option<&CudaBuf> = dhidden.map(|d| &*d);
    let demb: Option<&CudaBuf> = demb.map(|d| &*d);
    let want = dhidden.is_some() || demb.is_some();
    let rows = launch::lm_head_chunk_rows(n, v, LM_HEAD_CHUNK_BYTES);
    let logits = cu.zeros_as(rows * v, Dtype::F32)?;
    let row_loss = cu.zeros_as(rows, Dtype::F32)?;
    let vi = to_i32("lm_head_ce", "v", v)?;
    // A narrow hidden against an f32 embedding (a trained, Master-stored table in full
    // fine-tuning): cuBLAS has no mixed-input GEMM, so `gemm` would convert the whole [V,H] table
    // in every chunk, twice. Convert it once for the two GEMMs that read it.
    let emb_narrow;
    let emb: &CudaBuf = if matches!(cu.gemm, super::GemmBackend::Cublas(_))
        && hidden.dtype() != Dtype::F32
        && emb.dtype() == Dtype::F32
    {
        emb_narrow = cu.slice_copy(emb, 0, v * h, hidden.dtype())?;
        &emb_narrow
    } else {
        emb
    };
    let mut total = 0.0f64;
    let mut r0 = 0usize;
    while r0 < n {
        let c = rows.min(n - r0);
        // logits[c, V] = hidden[r0..r0+c] · embᵀ.
        cu.gemm(
            op(hidden, r0 * h, false),
            op(emb, 0, true),
            &logits,
            0,
            c,
            v,
            h,
            1.0,
            0.0,
        )?;
        // Loss per row, and the gradient written over the logits in place.
        let l = launch::rows("lm_head_ce", c, v, 1024)?;
        cu.ce_row_k(
            l,
            &logits,
            PtrArg::At(&labels.data, r0),
            vi,
            cap,
            grad_scale,
            &logits,
            want as i32,
            f32_slice(&row_loss)?,
        )?;
        total += cu.reduce(&row_loss, 0, c, 1)?;
        if let Some(dh) = dhidden {
            // dhidden[r0..r0+c] += dlogits · emb.
            cu.gemm(
                op(&logits, 0, false),
                op(emb, 0, false),
                dh,
                r0 * h,
                c,
                h,
                v,
                1.0,
                1.0,
            )?;
        }
        if let Some(de) = demb {
            // demb += dlogitsᵀ · hidden[r0..r0+c].
            cu.gemm(
                op(&logits, 0, true),
                op(hidden, r0 * h, false),
                de,
                0,
                v,
                h,
                c,
                1.0,
                1.0,
            )?;
        }
        r0 += c;
    }
    Ok((total, count))
}
