//! One AdamW step with torch semantics (`torch.optim.AdamW`, single-tensor form).
//!
//! Contract: p, g, m, v all the same length; updated in place:
//!   p ← p·(1 − lr·wd)                       (decoupled weight decay, BEFORE the update)
//!   m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²
//!   p ← p − lr/(1 − β1^t) · m / (√v/√(1 − β2^t) + eps)
//! `step` t is 1-based.

use rayon::prelude::*;

use crate::error::{check_len, ensure, Result};

const CHUNK: usize = 1 << 14;

pub fn adamw_step(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    h: &crate::AdamW,
) -> Result<()> {
    const OP: &str = "adamw";
    let shape = || format!("[len={}]", p.len());
    check_len(OP, "g", g.len(), p.len(), shape)?;
    check_len(OP, "m", m.len(), p.len(), shape)?;
    check_len(OP, "v", v.len(), p.len(), shape)?;
    ensure(OP, "step", h.step >= 1, || {
        "step is 1-based; got 0".to_string()
    })?;
    let t = h.step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - h.beta1.powi(t);
    let bc2_sqrt = (1.0 - h.beta2.powi(t)).sqrt();
    let step_size = h.lr / bc1;
    let decay = 1.0 - h.lr * h.weight_decay;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for i in 0..p.len() {
                p[i] *= decay;
                m[i] += (g[i] - m[i]) * (1.0 - h.beta1);
                v[i] = v[i] * h.beta2 + (1.0 - h.beta2) * g[i] * g[i];
                let denom = v[i].sqrt() / bc2_sqrt + h.eps;
                p[i] -= step_size * m[i] / denom;
            }
        });
    Ok(())
}
