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
//! Parallelism: the forward runs one task per (b, t, h) query row; the backward one task per (b, h) with
//! private dk/dv partials that are summed over the heads of a GQA group in a fixed order (deterministic).

use rayon::prelude::*;

use crate::backend::AttnShape;
use crate::cpu::softcap::softcap;
use crate::error::{check_len, ensure, KernelError, Result};

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

fn validate(
    op: &'static str,
    s: &AttnShape,
    q: usize,
    k: usize,
    v: usize,
    seg: Option<&[i32]>,
) -> Result<()> {
    ensure(
        op,
        "nkv",
        s.nkv > 0 && s.nh > 0 && s.nh.is_multiple_of(s.nkv),
        || format!("NH={} must be a positive multiple of NKV={}", s.nh, s.nkv),
    )?;
    ensure(op, "d", s.d > 0, || "head dim D must be > 0".to_string())?;
    ensure(op, "tk", s.tk >= s.t, || {
        format!(
            "TK={} must be ≥ T={} (queries are the last T keys)",
            s.tk, s.t
        )
    })?;
    ensure(op, "window", s.window != Some(0), || {
        "a sliding window of 0 keys hides every key".to_string()
    })?;
    ensure(op, "scale", s.scale.is_finite(), || {
        format!("scale must be finite, got {}", s.scale)
    })?;
    if let Some(c) = s.softcap {
        ensure(op, "softcap", c.is_finite() && c > 0.0, || {
            format!("soft-cap must be finite and > 0, got {c}")
        })?;
    }
    let qn = [s.b, s.t, s.nh, s.d]
        .iter()
        .try_fold(1usize, |a, &x| a.checked_mul(x));
    let kn = [s.b, s.tk, s.nkv, s.d]
        .iter()
        .try_fold(1usize, |a, &x| a.checked_mul(x));
    let (Some(qn), Some(kn)) = (qn, kn) else {
        return Err(KernelError::Invalid {
            op,
            arg: "shape",
            msg: format!("{s:?} overflows usize"),
        });
    };
    let qs = || format!("[B={}, T={}, NH={}, D={}]", s.b, s.t, s.nh, s.d);
    let ks = || format!("[B={}, TK={}, NKV={}, D={}]", s.b, s.tk, s.nkv, s.d);
    check_len(op, "q", q, qn, qs)?;
    check_len(op, "k", k, kn, ks)?;
    check_len(op, "v", v, kn, ks)?;
    if let Some(seg) = seg {
        check_len(op, "seg", seg.len(), s.b * s.tk, || {
            format!("[B={}, TK={}]", s.b, s.tk)
        })?;
    }
    Ok(())
}

/// Visible key range [lo, p] of the query at absolute position p (before the segment test).
#[inline]
fn key_range(s: &AttnShape, p: usize) -> usize {
    match s.window {
        Some(w) => (p + 1).saturating_sub(w),
        None => 0,
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
    validate(OP, s, q.len(), k.len(), v.len(), seg)?;
    check_len(OP, "out", out.len(), q.len(), || {
        format!("[B={}, T={}, NH={}, D={}]", s.b, s.t, s.nh, s.d)
    })?;
    check_len(OP, "lse", lse.len(), s.b * s.nh * s.t, || {
        format!("[B={}, NH={}, T={}]", s.b, s.nh, s.t)
    })?;
    if out.is_empty() {
        return Ok(());
    }
    let (t, tk, nh, nkv, d) = (s.t, s.tk, s.nh, s.nkv, s.d);
    let group = nh / nkv;
    // lse in the [B,T,NH] order of the out rows, transposed to [B,NH,T] at the end.
    let mut lse_rows = vec![0.0f32; s.b * t * nh];
    out.par_chunks_mut(d)
        .zip(lse_rows.par_iter_mut())
        .enumerate()
        .for_each_init(
            || vec![0.0f32; tk],
            |sc, (row, (o, l))| {
                let h = row % nh;
                let i = (row / nh) % t;
                let b = row / (nh * t);
                let g = h / group;
                let p = tk - t + i;
                let qi = &q[row * d..(row + 1) * d];
                let lo = key_range(s, p);
                let seg_p = seg.map(|sg| sg[b * tk + p]);
                let mut max = f32::NEG_INFINITY;
                for j in lo..=p {
                    if seg_p.is_some_and(|sp| seg.is_some_and(|sg| sg[b * tk + j] != sp)) {
                        sc[j] = f32::NEG_INFINITY;
                        continue;
                    }
                    let kj = &k[((b * tk + j) * nkv + g) * d..][..d];
                    let mut x = dot(qi, kj) * s.scale;
                    if let Some(c) = s.softcap {
                        x = softcap(x, c);
                    }
                    sc[j] = x;
                    max = max.max(x);
                }
                o.fill(0.0);
                if max == f32::NEG_INFINITY {
                    *l = f32::NEG_INFINITY;
                    return;
                }
                let mut sum = 0.0f32;
                for j in lo..=p {
                    if sc[j] == f32::NEG_INFINITY {
                        continue;
                    }
                    let e = (sc[j] - max).exp();
                    sum += e;
                    axpy(e, &v[((b * tk + j) * nkv + g) * d..][..d], o);
                }
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|x| *x *= inv);
                *l = max + sum.ln();
            },
        );
    for b in 0..s.b {
        for i in 0..t {
            for h in 0..nh {
                lse[(b * nh + h) * t + i] = lse_rows[(b * t + i) * nh + h];
            }
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
    validate(OP, s, q.len(), k.len(), v.len(), seg)?;
    ensure(OP, "tk", s.tk == s.t, || {
        format!("the backward needs TK = T, got TK={} T={}", s.tk, s.t)
    })?;
    let qs = || format!("[B={}, T={}, NH={}, D={}]", s.b, s.t, s.nh, s.d);
    let ks = || format!("[B={}, TK={}, NKV={}, D={}]", s.b, s.tk, s.nkv, s.d);
    check_len(OP, "out", out.len(), q.len(), qs)?;
    check_len(OP, "dout", dout.len(), q.len(), qs)?;
    check_len(OP, "lse", lse.len(), s.b * s.nh * s.t, || {
        format!("[B={}, NH={}, T={}]", s.b, s.nh, s.t)
    })?;
    check_len(OP, "dq", dq.len(), q.len(), qs)?;
    check_len(OP, "dk", dk.len(), k.len(), ks)?;
    check_len(OP, "dv", dv.len(), v.len(), ks)?;
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
        .map(|bh| {
            let (b, h) = (bh / nh, bh % nh);
            let g = h / group;
            let mut dqh = vec![0.0f32; t * d];
            let mut dkh = vec![0.0f32; t * d];
            let mut dvh = vec![0.0f32; t * d];
            for i in 0..t {
                let l = lse[(b * nh + h) * t + i];
                if l == f32::NEG_INFINITY {
                    continue; // no visible key: zero gradient
                }
                let base = (b * t + i) * qrow + h * d;
                let qi = &q[base..base + d];
                let doi = &dout[base..base + d];
                let di = dot(doi, &out[base..base + d]);
                let lo = key_range(s, i);
                let seg_p = seg.map(|sg| sg[b * t + i]);
                for j in lo..=i {
                    if seg_p.is_some_and(|sp| seg.is_some_and(|sg| sg[b * t + j] != sp)) {
                        continue;
                    }
                    let kb = (b * t + j) * krow + g * d;
                    let kj = &k[kb..kb + d];
                    let vj = &v[kb..kb + d];
                    let mut x = dot(qi, kj) * s.scale;
                    let mut dcap = 1.0;
                    if let Some(c) = s.softcap {
                        x = softcap(x, c);
                        let r = x / c;
                        dcap = 1.0 - r * r;
                    }
                    let pj = (x - l).exp();
                    axpy(pj, doi, &mut dvh[j * d..(j + 1) * d]);
                    let ds = pj * (dot(doi, vj) - di) * dcap * s.scale;
                    axpy(ds, kj, &mut dqh[i * d..(i + 1) * d]);
                    axpy(ds, qi, &mut dkh[j * d..(j + 1) * d]);
                }
            }
            (dqh, dkh, dvh)
        })
        .collect();
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
