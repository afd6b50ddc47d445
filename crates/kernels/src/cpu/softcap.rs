//! Soft-capping, Gemma-2's bound on attention scores (c = 50) and final logits (c = 30).
//!
//! Contract, any shape:
//! - `softcap_fwd`: x ← c·tanh(x/c)                (in place)
//! - `softcap_bwd`: dy ← dy·(1 − (y/c)²)            (in place; y is the CAPPED output)
//!
//! c must be finite and > 0. The backward only needs y because d/dx c·tanh(x/c) = 1 − tanh² = 1 − (y/c)².

use rayon::prelude::*;

use crate::error::{check_len, ensure, Result};

const CHUNK: usize = 1 << 14;

pub(crate) fn check_cap(op: &'static str, cap: f32) -> Result<()> {
    ensure(op, "cap", cap.is_finite() && cap > 0.0, || {
        format!("soft-cap must be finite and > 0, got {cap}")
    })
}

/// c·tanh(x/c) for one value (the same expression every op uses, so rounding agrees everywhere).
#[inline]
pub fn softcap(x: f32, cap: f32) -> f32 {
    (x / cap).tanh() * cap
}

/// x ← c·tanh(x/c).
pub fn softcap_fwd(x: &mut [f32], cap: f32) -> Result<()> {
    check_cap("softcap_fwd", cap)?;
    x.par_chunks_mut(CHUNK)
        .for_each(|x| x.iter_mut().for_each(|v| *v = softcap(*v, cap)));
    Ok(())
}

/// dy ← dy·(1 − (y/c)²), given the capped output y.
pub fn softcap_bwd(y: &[f32], dy: &mut [f32], cap: f32) -> Result<()> {
    check_cap("softcap_bwd", cap)?;
    check_len("softcap_bwd", "dy", dy.len(), y.len(), || {
        format!("[len={}]", y.len())
    })?;
    dy.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .for_each(|(dy, y)| {
            for (d, &y) in dy.iter_mut().zip(y) {
                let t = y / cap;
                *d *= 1.0 - t * t;
            }
        });
    Ok(())
}
