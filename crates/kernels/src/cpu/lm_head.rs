//! Fused tied LM head + soft-capped cross-entropy, chunked over rows.
//!
//! Contract: hidden [N,H], emb [V,H] (the tied, UNSCALED embedding), labels [N] (−100 = ignored).
//! logits = hidden·embᵀ, soft-capped, scored as in `cross_entropy`. Returns (Σ loss f64, count).
//! Adds grad_scale·∂(Σ loss)/∂hidden into dhidden [N,H] and grad_scale·∂/∂emb into demb [V,H] when given.
//!
//! Memory: only the SCORED rows are gathered, `chunk` of them at a time, into a [chunk,H] buffer; their
//! logits [chunk,V] are computed by one GEMM, turned into dlogits in place, and folded back with
//!   dhidden[rows] += dlogits·emb  and  demb += dlogitsᵀ·hidden[rows]
//! before the next chunk. The [N,V] logits never exist; ignored rows (prompt tokens) cost nothing.

use crate::backend::Accum;
use crate::contract;
use crate::cpu::cross_entropy::{cross_entropy_inplace, IGNORE_INDEX};
use crate::cpu::gemm::{gemm, MatMut, MatRef};
use crate::error::{ensure, Result};

/// Upper bound on the elements of one chunk's logits buffer (32 MiB of f32).
const CHUNK_ELEMS: usize = 1 << 23;
/// Rows per chunk are clamped to this range.
const MAX_ROWS: usize = 256;

/// The default chunk: as many rows as fit CHUNK_ELEMS logits, between 1 and 256
/// (Gemma-2's V = 256000 gives 32 rows, 31 MiB of logits).
pub fn default_chunk_rows(v: usize) -> usize {
    (CHUNK_ELEMS / v.max(1)).clamp(1, MAX_ROWS)
}

/// `lm_head_ce_chunked` with `default_chunk_rows(v)`.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_ce(
    hidden: &[f32],
    emb: &[f32],
    labels: &[i32],
    n: usize,
    h: usize,
    v: usize,
    softcap: Option<f32>,
    grad_scale: f32,
    dhidden: Option<&mut [f32]>,
    demb: Option<&mut [f32]>,
) -> Result<(f64, usize)> {
    lm_head_ce_chunked(
        hidden,
        emb,
        labels,
        n,
        h,
        v,
        softcap,
        grad_scale,
        dhidden,
        demb,
        default_chunk_rows(v),
    )
}

/// The fused LM head + CE processing `chunk` scored rows at a time.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_ce_chunked(
    hidden: &[f32],
    emb: &[f32],
    labels: &[i32],
    n: usize,
    h: usize,
    v: usize,
    softcap: Option<f32>,
    grad_scale: f32,
    mut dhidden: Option<&mut [f32]>,
    mut demb: Option<&mut [f32]>,
    chunk: usize,
) -> Result<(f64, usize)> {
    const OP: &str = "lm_head_ce";
    ensure(OP, "chunk", chunk > 0, || "chunk must be > 0".to_string())?;
    contract::lm_head_ce(
        hidden.len(),
        emb.len(),
        labels,
        n,
        h,
        v,
        softcap,
        dhidden.as_deref().map(<[f32]>::len),
        demb.as_deref().map(<[f32]>::len),
    )?;
    let rows: Vec<usize> = (0..n).filter(|&i| labels[i] != IGNORE_INDEX).collect();
    let grad = dhidden.is_some() || demb.is_some();
    let chunk = chunk.min(rows.len().max(1));
    let mut hbuf = vec![0.0f32; chunk * h];
    let mut logits = vec![0.0f32; chunk * v];
    let mut dh = if dhidden.is_some() {
        vec![0.0f32; chunk * h]
    } else {
        Vec::new()
    };
    let mut lab = Vec::with_capacity(chunk);
    let (mut total, mut count) = (0.0f64, 0usize);
    for idx in rows.chunks(chunk) {
        let c = idx.len();
        lab.clear();
        for (r, &i) in idx.iter().enumerate() {
            hbuf[r * h..(r + 1) * h].copy_from_slice(&hidden[i * h..(i + 1) * h]);
            lab.push(labels[i]);
        }
        let hc = &hbuf[..c * h];
        let lg = &mut logits[..c * v];
        // logits [c,V] = hidden_c [c,H] · embᵀ
        gemm(
            OP,
            MatMut::new(lg, c, v),
            MatRef::new(hc, c, h),
            MatRef::new(emb, v, h).t(),
            1.0,
            Accum::Overwrite,
        )?;
        let (l, k) = cross_entropy_inplace(lg, &lab, c, v, softcap, grad_scale, grad)?;
        total += l;
        count += k;
        if let Some(dhid) = dhidden.as_deref_mut() {
            let dhc = &mut dh[..c * h];
            // dh_c [c,H] = dlogits [c,V] · emb [V,H], then scattered back to the chunk's rows.
            gemm(
                OP,
                MatMut::new(dhc, c, h),
                MatRef::new(lg, c, v),
                MatRef::new(emb, v, h),
                1.0,
                Accum::Overwrite,
            )?;
            for (r, &i) in idx.iter().enumerate() {
                for (d, &g) in dhid[i * h..(i + 1) * h]
                    .iter_mut()
                    .zip(&dhc[r * h..(r + 1) * h])
                {
                    *d += g;
                }
            }
        }
        if let Some(de) = demb.as_deref_mut() {
            // demb [V,H] += dlogitsᵀ [V,c] · hidden_c [c,H]
            gemm(
                OP,
                MatMut::new(de, v, h),
                MatRef::new(lg, c, v).t(),
                MatRef::new(hc, c, h),
                1.0,
                Accum::Add,
            )?;
        }
    }
    Ok((total, count))
}
