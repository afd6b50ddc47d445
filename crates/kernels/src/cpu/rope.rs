//! Rotary position embedding, split-halves (NeoX / HF `rotate_half`) convention.
//!
//! Contract: x [N, heads, D] rotated in place, positions pos [N] (one per token; packing restarts them).
//! For pair i in 0..D/2: angle = pos·inv_freq[i], inv_freq[i] = 1/theta^(2i/D), computed like HF in f32
//! (inv_freq in f32, freq = inv_freq·pos in f32, cos/sin of that f32), then
//!   x1' = x1·cos − x2·sin,  x2' = x2·cos + x1·sin     (x1 = x[..i], x2 = x[D/2 + i])
//! `inverse` rotates by −angle; since the rotation is orthogonal this is exactly the backward
//! (dx = Rᵀ·dy), applied in place to the gradient.
//!
//! Errors: D odd or zero, heads zero → Invalid; a negative position → Invalid; theta ≤ 0 → Invalid.

use rayon::prelude::*;

use crate::contract;
use crate::error::Result;

/// HF `inv_freq`: 1 / theta^(2i/D) in f32, i in 0..D/2.
pub fn inv_freq(d: usize, theta: f32) -> Vec<f32> {
    (0..d / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32))
        .collect()
}

/// Rotates x [N, heads, D] in place by pos·inv_freq (or its negative when `inverse`).
pub fn rope(
    x: &mut [f32],
    pos: &[i32],
    n: usize,
    heads: usize,
    d: usize,
    theta: f32,
    inverse: bool,
) -> Result<()> {
    contract::rope(x.len(), pos, n, heads, d, theta)?;
    if n == 0 {
        return Ok(());
    }
    let (half, row) = (d / 2, heads * d);
    let inv = inv_freq(d, theta);
    x.par_chunks_mut(row).zip(pos.par_iter()).for_each_init(
        || (vec![0.0f32; half], vec![0.0f32; half]),
        |(cos, sin), (x, &p)| {
            let pf = p as f32;
            for i in 0..half {
                let f = inv[i] * pf;
                cos[i] = f.cos();
                sin[i] = if inverse { -f.sin() } else { f.sin() };
            }
            for hx in x.chunks_mut(d) {
                let (x1, x2) = hx.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * cos[i] - b * sin[i];
                    x2[i] = b * cos[i] + a * sin[i];
                }
            }
        },
    );
    Ok(())
}
