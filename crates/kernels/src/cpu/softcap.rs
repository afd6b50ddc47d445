//! Soft-capping, Gemma-2's bound on attention scores (c = 50) and final logits (c = 30).
//!
//! Contract, any shape:
//! - `softcap_fwd`: x ← c·tanh(x/c)                (in place)
//! - `softcap_bwd`: dy ← dy·(1 − (y/c)²)            (in place; y is the CAPPED output)
//!
//! c must be finite and > 0. The backward only needs y because d/dx c·tanh(x/c) = 1 − tanh² = 1 − (y/c)².
//!
//! tanh is `fastmath::tanh` (≤ 2 ulp, exactly odd, ±1 exactly once saturated), vectorized.

use rayon::prelude::*;

use crate::contract;
use crate::cpu::fastmath::{self, simd_fn};
use crate::error::Result;

const CHUNK: usize = 1 << 14;

/// c·tanh(x/c) for one value (the same expression every op uses, so rounding agrees everywhere).
#[inline(always)]
pub fn softcap(x: f32, cap: f32) -> f32 {
    fastmath::tanh(x / cap) * cap
}

simd_fn! {
    /// x ← c·tanh(x/c) over one slice, at SIMD level `level` (results do not depend on the level).
    pub fn softcap_slice(level: Simd, x: &mut [f32], cap: f32) {
        for v in x.iter_mut() {
            *v = softcap(*v, cap);
        }
    }
}

simd_fn! {
    /// dy ← dy·(1 − (y/c)²) over one slice pair of equal length, at SIMD level `level`.
    fn softcap_bwd_slice(level: Simd, y: &[f32], dy: &mut [f32], cap: f32) {
        for (d, &y) in dy.iter_mut().zip(y) {
            let t = y / cap;
            *d *= 1.0 - t * t;
        }
    }
}

/// x ← c·tanh(x/c).
pub fn softcap_fwd(x: &mut [f32], cap: f32) -> Result<()> {
    contract::softcap_fwd(cap)?;
    let level = fastmath::detected();
    x.par_chunks_mut(CHUNK)
        .for_each(|x| softcap_slice(level, x, cap));
    Ok(())
}

/// dy ← dy·(1 − (y/c)²), given the capped output y.
pub fn softcap_bwd(y: &[f32], dy: &mut [f32], cap: f32) -> Result<()> {
    contract::softcap_bwd(y.len(), dy.len(), cap)?;
    let level = fastmath::detected();
    dy.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .for_each(|(dy, y)| softcap_bwd_slice(level, y, dy, cap));
    Ok(())
}
