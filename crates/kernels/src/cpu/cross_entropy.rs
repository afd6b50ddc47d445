//! Cross-entropy over soft-capped logits, with the −100 ignore label.
//!
//! Contract: logits [N,V], labels [N] (already shifted by the caller; −100 = not scored).
//! z = c·tanh(x/c) when a soft-cap c is given, else z = x. For a scored row with label y:
//!   loss = log Σ_j exp(z_j) − z_y           (computed with max-subtraction, stable for |x| ~ 1e4)
//! Returns (Σ loss over scored rows, in f64; number of scored rows).
//! When `dlogits` [N,V] is given it is OVERWRITTEN with grad_scale·∂(Σ loss)/∂x (pre-cap logits):
//!   ∂/∂z_j = softmax(z)_j − [j = y];  ∂/∂x_j = ∂/∂z_j·(1 − (z_j/c)²);  zero on ignored rows.
//! `dlogits` may hold the same values as `logits` (see `cross_entropy_inplace`, used by the chunked
//! LM head so no second [rows,V] buffer is needed).
//!
//! A label outside [0, V) other than −100 is an `Invalid` error, checked before anything is written.
//! Rows run in parallel; per-row losses are summed in row order (deterministic). exp and the soft-cap's
//! tanh are `fastmath`'s (≤ 1 and ≤ 2 ulp), vectorized over the row.

use rayon::prelude::*;

use crate::cpu::fastmath::{self, simd_fn};

use crate::contract;
use crate::error::Result;

/// The label of a token that is not scored.
pub use crate::contract::IGNORE_INDEX;

simd_fn! {
    /// Loss of one row; when `grad` is given, overwrites `row` with grad_scale·∂loss/∂x.
    /// `row` holds the pre-cap logits on entry. Soft-cap, max, Σ exp and the gradient run as
    /// vectorized loops (`fastmath`); Σ exp accumulates in `fastmath::LANES` lanes, a fixed order.
    fn row_loss(
        level: Simd,
        row: &mut [f32],
        label: i32,
        softcap: Option<f32>,
        grad_scale: f32,
        grad: bool,
    ) -> f64 {
        if label == IGNORE_INDEX {
            if grad {
                row.fill(0.0);
            }
            return 0.0;
        }
        if let Some(c) = softcap {
            for x in row.iter_mut() {
                *x = crate::cpu::softcap::softcap(*x, c);
            }
        }
        let max = fastmath::max_body(row);
        let sum = fastmath::sum_exp_shift_body(row, max);
        let y = label as usize;
        let zy = row[y];
        let loss = f64::from(sum.ln()) + f64::from(max) - f64::from(zy);
        if grad {
            let inv = 1.0 / sum;
            // ∂/∂z_j = p_j for every j here; the label's −1 is applied after the loop.
            match softcap {
                Some(c) => {
                    for z in row.iter_mut() {
                        let p = fastmath::exp(*z - max) * inv;
                        let r = *z / c;
                        *z = grad_scale * p * (1.0 - r * r);
                    }
                }
                None => {
                    for z in row.iter_mut() {
                        *z = grad_scale * (fastmath::exp(*z - max) * inv);
                    }
                }
            }
            let dz = fastmath::exp(zy - max) * inv - 1.0;
            let dcap = match softcap {
                Some(c) => {
                    let r = zy / c;
                    1.0 - r * r
                }
                None => 1.0,
            };
            row[y] = grad_scale * dz * dcap;
        }
        loss
    }
}

/// Σ loss and count over logits [N,V]; optionally writes dlogits [N,V].
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(
    logits: &[f32],
    labels: &[i32],
    n: usize,
    v: usize,
    softcap: Option<f32>,
    grad_scale: f32,
    dlogits: Option<&mut [f32]>,
) -> Result<(f64, usize)> {
    let count = contract::cross_entropy(
        logits.len(),
        labels,
        n,
        v,
        softcap,
        dlogits.as_deref().map(<[f32]>::len),
    )?;
    if n == 0 {
        return Ok((0.0, 0));
    }
    let level = fastmath::detected();
    let losses: Vec<f64> = match dlogits {
        Some(d) => {
            d.copy_from_slice(logits);
            d.par_chunks_mut(v)
                .zip(labels.par_iter())
                .map(|(r, &y)| row_loss(level, r, y, softcap, grad_scale, true))
                .collect()
        }
        None => logits
            .par_chunks(v)
            .zip(labels.par_iter())
            .map_init(
                || vec![0.0f32; v],
                |buf, (r, &y)| {
                    if y == IGNORE_INDEX {
                        return 0.0;
                    }
                    buf.copy_from_slice(r);
                    row_loss(level, buf, y, softcap, grad_scale, false)
                },
            )
            .collect(),
    };
    Ok((losses.iter().sum(), count))
}

/// `cross_entropy` whose logits [N,V] are replaced in place by the gradient (when `grad`), saving the
/// second buffer. Without `grad` the logits are left soft-capped.
pub fn cross_entropy_inplace(
    logits: &mut [f32],
    labels: &[i32],
    n: usize,
    v: usize,
    softcap: Option<f32>,
    grad_scale: f32,
    grad: bool,
) -> Result<(f64, usize)> {
    let count = contract::cross_entropy(logits.len(), labels, n, v, softcap, None)?;
    let level = fastmath::detected();
    let losses: Vec<f64> = logits
        .par_chunks_mut(v)
        .zip(labels.par_iter())
        .map(|(r, &y)| row_loss(level, r, y, softcap, grad_scale, grad))
        .collect();
    Ok((losses.iter().sum(), count))
}
