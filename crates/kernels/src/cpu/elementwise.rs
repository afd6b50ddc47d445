//! Elementwise ops on flat buffers (any shape; only lengths matter).
//!
//! Contract:
//! - `axpy`:  y += alpha·x            (x, y same length; adds into y)
//! - `scale`: x *= alpha              (in place)
//! - `mul`:   x ← x ⊙ m               (in place; m is a dropout mask of 0 or 1/(1−p))
//! - `sum_squares`: Σ x² in f64       (a piece of the global gradient norm)
//! - `fill`, `copy`                    (overwrite)
//! - `copy_range`: dst[dst_off..dst_off+n] ← src[src_off..src_off+n] (overwrite; both ranges must lie
//!   inside their buffers, checked without overflow; the rest of dst is untouched)
//!
//! `sum_squares` is deterministic: fixed-size chunks are reduced in order, whatever the thread count.

use rayon::prelude::*;

use crate::contract;
use crate::error::Result;

/// Elements per parallel task: large enough that rayon's overhead vanishes.
const CHUNK: usize = 1 << 14;

/// y += alpha · x.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) -> Result<()> {
    contract::axpy(x.len(), y.len())?;
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y += alpha * x;
            }
        });
    Ok(())
}

/// x *= alpha.
pub fn scale(x: &mut [f32], alpha: f32) -> Result<()> {
    x.par_chunks_mut(CHUNK)
        .for_each(|x| x.iter_mut().for_each(|v| *v *= alpha));
    Ok(())
}

/// x ← x ⊙ m.
pub fn mul(x: &mut [f32], m: &[f32]) -> Result<()> {
    contract::mul(x.len(), m.len())?;
    x.par_chunks_mut(CHUNK)
        .zip(m.par_chunks(CHUNK))
        .for_each(|(x, m)| {
            for (x, &m) in x.iter_mut().zip(m) {
                *x *= m;
            }
        });
    Ok(())
}

/// Σ x² accumulated in f64, chunk sums added in a fixed order (bit-reproducible).
pub fn sum_squares(x: &[f32]) -> Result<f64> {
    let parts: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>())
        .collect();
    Ok(parts.iter().sum())
}

/// Sets every element to `value`.
pub fn fill(x: &mut [f32], value: f32) -> Result<()> {
    x.par_chunks_mut(CHUNK).for_each(|x| x.fill(value));
    Ok(())
}

/// dst ← src (same length).
pub fn copy(src: &[f32], dst: &mut [f32]) -> Result<()> {
    contract::copy(src.len(), dst.len())?;
    dst.copy_from_slice(src);
    Ok(())
}

/// dst[dst_off..dst_off + n] ← src[src_off..src_off + n]; the rest of dst is untouched.
pub fn copy_range(
    src: &[f32],
    src_off: usize,
    dst: &mut [f32],
    dst_off: usize,
    n: usize,
) -> Result<()> {
    contract::copy_range(src.len(), src_off, dst.len(), dst_off, n)?;
    dst[dst_off..dst_off + n].copy_from_slice(&src[src_off..src_off + n]);
    Ok(())
}
