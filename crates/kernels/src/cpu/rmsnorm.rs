//! Gemma RMSNorm (HF `Gemma2RMSNorm`), all in f32.
//!
//! Contract, x [N,H], w [H] (stored as the offset: the effective scale is 1 + w):
//! - `rmsnorm_fwd`: rstd[i] = 1/√(mean_j x[i,j]² + eps); y[i,j] = (x[i,j]·rstd[i])·(1 + w[j]).
//!   Writes y [N,H] and rstd [N] (saved for the backward).
//! - `rmsnorm_bwd`: with x̂ = x·rstd and g = dy·(1 + w):
//!   dx = rstd·(g − x̂·mean_j(g·x̂))  (writes dx [N,H]);
//!   dw += Σ_i dy·x̂                   (adds into dw [H] when given).
//!
//! Rows are independent (rayon over rows). dw is reduced over fixed blocks of rows in order, so the
//! result does not depend on the thread count.

use rayon::prelude::*;

use crate::contract;
use crate::error::Result;

/// Rows per partial-dw block in the backward.
const DW_ROWS: usize = 64;

/// y = x·rsqrt(mean(x²)+eps)·(1+w); writes y [N,H] and rstd [N].
pub fn rmsnorm_fwd(
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    rstd: &mut [f32],
    n: usize,
    h: usize,
    eps: f32,
) -> Result<()> {
    contract::rmsnorm_fwd(x.len(), w.len(), y.len(), rstd.len(), n, h, eps)?;
    if n == 0 {
        return Ok(());
    }
    y.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .zip(rstd.par_iter_mut())
        .for_each(|((y, x), r)| {
            let ss: f32 = x.iter().map(|&v| v * v).sum();
            let rs = 1.0 / (ss / h as f32 + eps).sqrt();
            *r = rs;
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = (x * rs) * (1.0 + w);
            }
        });
    Ok(())
}

/// Writes dx [N,H]; adds Σ_i dy·x̂ into dw [H] when given.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
    dw: Option<&mut [f32]>,
    n: usize,
    h: usize,
) -> Result<()> {
    contract::rmsnorm_bwd(
        dy.len(),
        x.len(),
        w.len(),
        rstd.len(),
        dx.len(),
        dw.as_deref().map(<[f32]>::len),
        n,
        h,
    )?;
    if n == 0 {
        return Ok(());
    }
    dx.par_chunks_mut(h)
        .zip(dy.par_chunks(h).zip(x.par_chunks(h)))
        .zip(rstd.par_iter())
        .for_each(|((dx, (dy, x)), &rs)| {
            // mean_j(g·x̂) with g = dy·(1+w), x̂ = x·rstd.
            let dot: f32 = dy
                .iter()
                .zip(x)
                .zip(w)
                .map(|((&d, &x), &w)| d * (1.0 + w) * (x * rs))
                .sum();
            let mean = dot / h as f32;
            for (((dx, &d), &x), &w) in dx.iter_mut().zip(dy).zip(x).zip(w) {
                *dx = rs * (d * (1.0 + w) - x * rs * mean);
            }
        });
    if let Some(dw) = dw {
        let parts: Vec<Vec<f32>> = dy
            .par_chunks(DW_ROWS * h)
            .zip(x.par_chunks(DW_ROWS * h).zip(rstd.par_chunks(DW_ROWS)))
            .map(|(dy, (x, rs))| {
                let mut acc = vec![0.0f32; h];
                for ((dy, x), &r) in dy.chunks(h).zip(x.chunks(h)).zip(rs) {
                    for ((a, &d), &x) in acc.iter_mut().zip(dy).zip(x) {
                        *a += d * (x * r);
                    }
                }
                acc
            })
            .collect();
        for p in parts {
            for (d, v) in dw.iter_mut().zip(p) {
                *d += v;
            }
        }
    }
    Ok(())
}
