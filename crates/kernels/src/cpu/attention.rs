//! Causal soft-capped GQA attention with sliding window and packed-sample segments (Gemma-2 eager
//! semantics), forward and flash-style backward.
//!
//! Contract (see `AttnShape`): q, out [B,T,NH,D]; k, v [B,TK,NKV,D]; lse [B,NH,T]; seg [B·TK] (optional).
//! Query i of row b sits at absolute position p = TK − T + i. Query head h reads kv head h / (NH/NKV).
//! Score s_j = scale·(q·k_j), then s_j ← c·tanh(s_j/c) when soft-capped (BEFORE masking, as HF does).
//! Key j is visible iff j ≤ p, and p − W < j when a window W is set, and seg[j] = seg[p] when segments
//! are given. out = Σ_j softmax(s)_j·v_j over visible keys; lse = log Σ_j exp(s_j) (f32).
//! - `attn_fwd` writes out and lse.
//! - `attn_bwd` (TK = T only) writes dq, dk, dv. It recomputes P_j = exp(s_j − lse) from the saved lse,
//!   so nothing of size T×T is kept: with D_i = dout_i·out_i,
//!   dv_j += P_j·dout_i;  ds_j = P_j·(dout_i·v_j − D_i)·(1 − (s_j/c)²)·scale;  dq_i += ds_j·k_j;  dk_j += ds_j·q_i.
//!
//! A row where no key is visible cannot occur (a query always sees itself), but it is guarded: out = 0,
//! lse = −∞, and the backward gives zero gradients for it (it never evaluates exp(s − lse) there).
//!
//! Blocking: queries are taken QB = 64 at a time. For a block of queries at positions p0..=p1 the keys
//! that can be visible are lo(p0)..=p1 (lo = p0 − W + 1 with a window, else 0), so the block's scores
//! S [QB, nk] = scale·Q_blk·K_rangeᵀ are one GEMM (strided views straight into the [B,T,NH,D] layout),
//! the mask, soft-cap and softmax are applied row by row in that scratch, and O_blk = P·V_range is a
//! second GEMM. The backward recomputes S and P per block the same way, and does
//! dP = dO_blk·V_rangeᵀ, dS = P⊙(dP − D)⊙(1 − (s/c)²)·scale, dQ_blk = dS·K_range, dK_range += dSᵀ·Q_blk,
//! dV_range += Pᵀ·dO_blk as GEMMs. Scratch is O(QB·TK) per task; nothing T×T is kept.
//!
//! Parallelism: the forward runs one task per (b, h, query block); the backward one task per (b, h)
//! with private dq/dk/dv, the dk/dv partials summed over the heads of a GQA group in a fixed order
//! (deterministic).

use rayon::prelude::*;

use crate::backend::Accum;
use crate::backend::AttnShape;
use crate::contract;
use crate::cpu::fastmath::{self, simd_fn};
use crate::cpu::gemm::{gemm, MatMut, MatRef};
use crate::cpu::softcap::softcap;
use crate::error::Result;

/// Dot product with 8 independent accumulators (lets the compiler vectorize without reassociation).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// Visible key range [lo, p] of the query at absolute position p (before the segment test).
#[inline]
fn key_range(s: &AttnShape, p: usize) -> usize {
    match s.window {
        Some(w) => (p + 1).saturating_sub(w),
        None => 0,
    }
}

/// Queries per block.
const QB: usize = 64;

/// One query block: rows i0..i1 of head h of batch row b, keys klo..=khi.
struct Block {
    b: usize,
    h: usize,
    g: usize,
    i0: usize,
    i1: usize,
    klo: usize,
    nk: usize,
}

impl Block {
    fn new(s: &AttnShape, b: usize, h: usize, i0: usize) -> Self {
        let i1 = (i0 + QB).min(s.t);
        let (p0, p1) = (s.tk - s.t + i0, s.tk - s.t + i1 - 1);
        let klo = key_range(s, p0);
        Block {
            b,
            h,
            g: h / (s.nh / s.nkv),
            i0,
            i1,
            klo,
            nk: p1 + 1 - klo,
        }
    }
    fn rows(&self) -> usize {
        self.i1 - self.i0
    }
    /// The keys row r (query i0 + r) may see before the segment test, as the columns [a, b) of the
    /// block's scores: lo(p)..=p. lo(p) ≥ lo(p0) = klo and p ≤ p1, so 0 ≤ a < b ≤ nk.
    fn visible(&self, s: &AttnShape, r: usize) -> (usize, usize) {
        let p = s.tk - s.t + self.i0 + r;
        (key_range(s, p) - self.klo, p + 1 - self.klo)
    }
    /// Q (or out, dout) rows of this block: [rows, D] with row stride NH·D.
    fn q_view<'a>(&self, s: &AttnShape, q: &'a [f32]) -> MatRef<'a> {
        let start = ((self.b * s.t + self.i0) * s.nh + self.h) * s.d;
        MatRef::with_row_stride(&q[start..], self.rows(), s.d, s.nh * s.d)
    }
    /// K (or V) rows klo..=khi of kv head g: [nk, D] with row stride NKV·D.
    fn k_view<'a>(&self, s: &AttnShape, k: &'a [f32]) -> MatRef<'a> {
        let start = ((self.b * s.tk + self.klo) * s.nkv + self.g) * s.d;
        MatRef::with_row_stride(&k[start..], self.nk, s.d, s.nkv * s.d)
    }
    /// Computes S = scale·Q·Kᵀ into sc [rows, nk], then soft-caps visible entries and writes −∞ into
    /// masked ones. Returns nothing; row r of sc is query i0 + r.
    fn scores(
        &self,
        op: &'static str,
        s: &AttnShape,
        q: &[f32],
        k: &[f32],
        seg: Option<&[i32]>,
        sc: &mut [f32],
    ) -> Result<()> {
        let (rows, nk) = (self.rows(), self.nk);
        let sc = &mut sc[..rows * nk];
        gemm(
            op,
            MatMut::new(sc, rows, nk),
            self.q_view(s, q),
            self.k_view(s, k).t(),
            s.scale,
            Accum::Overwrite,
        )?;
        let level = fastmath::detected();
        for (r, row) in sc.chunks_mut(nk).enumerate() {
            let (a, b) = self.visible(s, r);
            mask_cap_row(level, row, a, b, s.softcap);
            if let Some(sg) = seg {
                let base = self.b * s.tk;
                let sp = sg[base + s.tk - s.t + self.i0 + r];
                let sj = &sg[base + self.klo + a..base + self.klo + b];
                for (x, &sj) in row[a..b].iter_mut().zip(sj) {
                    if sj != sp {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Ok(())
    }
}

simd_fn! {
    /// One score row: −∞ outside the visible columns [a, b), soft-capped inside (vectorized tanh).
    fn mask_cap_row(level: Simd, row: &mut [f32], a: usize, b: usize, cap: Option<f32>) {
        row[..a].fill(f32::NEG_INFINITY);
        row[b..].fill(f32::NEG_INFINITY);
        if let Some(c) = cap {
            for x in row[a..b].iter_mut() {
                *x = softcap(*x, c);
            }
        }
    }
}

simd_fn! {
    /// Softmax of one masked score row in place (visible columns [a, b); −∞ inside it are
    /// segment-masked keys and become 0); returns lse = max + ln Σ exp. A row with no visible key
    /// becomes all 0 with lse = −∞.
    fn softmax_row(level: Simd, row: &mut [f32], a: usize, b: usize) -> f32 {
        let max = fastmath::max_body(&row[a..b]);
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            return f32::NEG_INFINITY;
        }
        row[..a].fill(0.0);
        row[b..].fill(0.0);
        let v = &mut row[a..b];
        let sum = fastmath::exp_shift_sum_body(v, max);
        let inv = 1.0 / sum;
        for x in v.iter_mut() {
            *x *= inv;
        }
        max + sum.ln()
    }
}

simd_fn! {
    /// The backward's pointwise step on one row: given the masked, capped scores s (prow) and
    /// dP = dout_i·v_j (dprow), writes P_j = exp(s_j − lse) into prow and
    /// dS_j = P_j·(dP_j − D_i)·(1 − (s_j/c)²)·scale into dprow; 0 for masked keys (s_j = −∞).
    #[allow(clippy::too_many_arguments)]
    fn bwd_row(
        level: Simd,
        prow: &mut [f32],
        dprow: &mut [f32],
        a: usize,
        b: usize,
        lse: f32,
        di: f32,
        cap: Option<f32>,
        scale: f32,
    ) {
        prow[..a].fill(0.0);
        prow[b..].fill(0.0);
        dprow[..a].fill(0.0);
        dprow[b..].fill(0.0);
        let (pv, gv) = (&mut prow[a..b], &mut dprow[a..b]);
        match cap {
            Some(c) => {
                for (x, g) in pv.iter_mut().zip(gv.iter_mut()) {
                    let sj = *x;
                    let pj = fastmath::exp(sj - lse); // exp(−∞) = 0
                    let r = sj / c;
                    let ds = pj * (*g - di) * (1.0 - r * r) * scale;
                    *g = if sj == f32::NEG_INFINITY { 0.0 } else { ds }; // 0·∞ would be NaN
                    *x = pj;
                }
            }
            None => {
                for (x, g) in pv.iter_mut().zip(gv.iter_mut()) {
                    let sj = *x;
                    let pj = fastmath::exp(sj - lse);
                    let ds = pj * (*g - di) * scale;
                    *g = if sj == f32::NEG_INFINITY { 0.0 } else { ds };
                    *x = pj;
                }
            }
        }
    }
}

/// Writes out [B,T,NH,D] and lse [B,NH,T].
pub fn attn_fwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seg: Option<&[i32]>,
    out: &mut [f32],
    lse: &mut [f32],
    s: &AttnShape,
) -> Result<()> {
    const OP: &str = "attn_fwd";
    contract::attn_fwd(
        q.len(),
        k.len(),
        v.len(),
        seg.map(<[i32]>::len),
        out.len(),
        lse.len(),
        s,
    )?;
    if out.is_empty() {
        return Ok(());
    }
    let (t, tk, nh, d) = (s.t, s.tk, s.nh, s.d);
    let nqb = t.div_ceil(QB);
    // One task per (b, h, block): (out block [rows, D], lse block [rows]).
    let blocks: Vec<(Vec<f32>, Vec<f32>)> = (0..s.b * nh * nqb)
        .into_par_iter()
        .map_init(
            || vec![0.0f32; QB * tk],
            |sc, idx| -> Result<(Vec<f32>, Vec<f32>)> {
                let (bh, qb) = (idx / nqb, idx % nqb);
                let blk = Block::new(s, bh / nh, bh % nh, qb * QB);
                let (rows, nk) = (blk.rows(), blk.nk);
                blk.scores(OP, s, q, k, seg, sc)?;
                let mut l = vec![0.0f32; rows];
                let level = fastmath::detected();
                for (r, (row, l)) in sc[..rows * nk].chunks_mut(nk).zip(l.iter_mut()).enumerate() {
                    let (a, b) = blk.visible(s, r);
                    *l = softmax_row(level, row, a, b);
                }
                let mut o = vec![0.0f32; rows * d];
                // O_blk [rows, D] = P [rows, nk] · V_range [nk, D]
                gemm(
                    OP,
                    MatMut::new(&mut o, rows, d),
                    MatRef::new(&sc[..rows * nk], rows, nk),
                    blk.k_view(s, v),
                    1.0,
                    Accum::Overwrite,
                )?;
                Ok((o, l))
            },
        )
        .collect::<Result<_>>()?;
    for (idx, (o, l)) in blocks.iter().enumerate() {
        let (bh, qb) = (idx / nqb, idx % nqb);
        let (b, h, i0) = (bh / nh, bh % nh, qb * QB);
        for (r, (orow, &lv)) in o.chunks(d).zip(l).enumerate() {
            let i = i0 + r;
            out[((b * t + i) * nh + h) * d..][..d].copy_from_slice(orow);
            lse[(b * nh + h) * t + i] = lv;
        }
    }
    Ok(())
}

/// Writes dq [B,T,NH,D], dk, dv [B,TK,NKV,D]. Requires TK = T.
#[allow(clippy::too_many_arguments)]
pub fn attn_bwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    seg: Option<&[i32]>,
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    s: &AttnShape,
) -> Result<()> {
    const OP: &str = "attn_bwd";
    contract::attn_bwd(
        q.len(),
        k.len(),
        v.len(),
        seg.map(<[i32]>::len),
        out.len(),
        lse.len(),
        dout.len(),
        dq.len(),
        dk.len(),
        dv.len(),
        s,
    )?;
    let (t, nh, nkv, d) = (s.t, s.nh, s.nkv, s.d);
    if s.b == 0 || t == 0 {
        return Ok(());
    }
    let group = nh / nkv;
    let qrow = nh * d;
    let krow = nkv * d;
    // One task per (b, h): private dq [T,D], dk [T,D], dv [T,D].
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..s.b * nh)
        .into_par_iter()
        .map(|bh| -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
            let (b, h) = (bh / nh, bh % nh);
            let mut dqh = vec![0.0f32; t * d];
            let mut dkh = vec![0.0f32; t * d];
            let mut dvh = vec![0.0f32; t * d];
            let mut p = vec![0.0f32; QB * t];
            let mut dp = vec![0.0f32; QB * t];
            for i0 in (0..t).step_by(QB) {
                let blk = Block::new(s, b, h, i0);
                let (rows, nk) = (blk.rows(), blk.nk);
                blk.scores(OP, s, q, k, seg, &mut p)?;
                let doq = blk.q_view(s, dout);
                // dP [rows, nk] = dO_blk [rows, D] · V_rangeᵀ [D, nk]
                gemm(
                    OP,
                    MatMut::new(&mut dp[..rows * nk], rows, nk),
                    doq,
                    blk.k_view(s, v).t(),
                    1.0,
                    Accum::Overwrite,
                )?;
                let level = fastmath::detected();
                for r in 0..rows {
                    let i = i0 + r;
                    let l = lse[(b * nh + h) * t + i];
                    let prow = &mut p[r * nk..(r + 1) * nk];
                    let dprow = &mut dp[r * nk..(r + 1) * nk];
                    if l == f32::NEG_INFINITY {
                        prow.fill(0.0); // no visible key: zero gradient
                        dprow.fill(0.0);
                        continue;
                    }
                    let base = (b * t + i) * qrow + h * d;
                    let di = dot(&dout[base..base + d], &out[base..base + d]);
                    let (ka, kb) = blk.visible(s, r);
                    bwd_row(level, prow, dprow, ka, kb, l, di, s.softcap, s.scale);
                }
                let (pm, dsm) = (
                    MatRef::new(&p[..rows * nk], rows, nk),
                    MatRef::new(&dp[..rows * nk], rows, nk),
                );
                // dQ_blk [rows, D] = dS [rows, nk] · K_range [nk, D]
                gemm(
                    OP,
                    MatMut::new(&mut dqh[i0 * d..(i0 + rows) * d], rows, d),
                    dsm,
                    blk.k_view(s, k),
                    1.0,
                    Accum::Overwrite,
                )?;
                let kr = blk.klo * d..(blk.klo + nk) * d;
                // dK_range [nk, D] += dSᵀ [nk, rows] · Q_blk [rows, D]
                gemm(
                    OP,
                    MatMut::new(&mut dkh[kr.clone()], nk, d),
                    dsm.t(),
                    blk.q_view(s, q),
                    1.0,
                    Accum::Add,
                )?;
                // dV_range [nk, D] += Pᵀ [nk, rows] · dO_blk [rows, D]
                gemm(
                    OP,
                    MatMut::new(&mut dvh[kr], nk, d),
                    pm.t(),
                    doq,
                    1.0,
                    Accum::Add,
                )?;
            }
            Ok((dqh, dkh, dvh))
        })
        .collect::<Result<_>>()?;
    dq.par_chunks_mut(qrow).enumerate().for_each(|(row, dqr)| {
        let (b, i) = (row / t, row % t);
        for h in 0..nh {
            dqr[h * d..(h + 1) * d].copy_from_slice(&parts[b * nh + h].0[i * d..(i + 1) * d]);
        }
    });
    dk.par_chunks_mut(krow)
        .zip(dv.par_chunks_mut(krow))
        .enumerate()
        .for_each(|(row, (dkr, dvr))| {
            let (b, j) = (row / t, row % t);
            dkr.fill(0.0);
            dvr.fill(0.0);
            for g in 0..nkv {
                for h in g * group..(g + 1) * group {
                    let p = &parts[b * nh + h];
                    axpy(1.0, &p.1[j * d..(j + 1) * d], &mut dkr[g * d..(g + 1) * d]);
                    axpy(1.0, &p.2[j * d..(j + 1) * d], &mut dvr[g * d..(g + 1) * d]);
                }
            }
        });
    Ok(())
}
