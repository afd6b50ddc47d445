//! GeGLU with the tanh-approximated GELU (HF `gelu_pytorch_tanh`), the Gemma-2 MLP activation.
//!
//! Contract, all buffers the same length (any shape, usually [N, I]):
//! - `geglu_fwd`: out = gelu_tanh(gate)·up                                   (writes out)
//! - `geglu_bwd`: dgate = dout·up·gelu_tanh'(gate), dup = dout·gelu_tanh(gate) (writes both)
//!
//! gelu_tanh(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).

use rayon::prelude::*;

use crate::error::{check_len, Result};

const CHUNK: usize = 1 << 13;
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const COEF: f32 = 0.044_715;

/// gelu_tanh(x).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + COEF * x * x * x)).tanh())
}

/// (gelu_tanh(x), d gelu_tanh / dx).
#[inline]
pub fn gelu_tanh_grad(x: f32) -> (f32, f32) {
    let t = (SQRT_2_OVER_PI * (x + COEF * x * x * x)).tanh();
    let g = 0.5 * x * (1.0 + t);
    let dg =
        0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * COEF * x * x);
    (g, dg)
}

/// out = gelu_tanh(gate)·up.
pub fn geglu_fwd(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    let shape = || format!("[len={}]", gate.len());
    check_len("geglu_fwd", "up", up.len(), gate.len(), shape)?;
    check_len("geglu_fwd", "out", out.len(), gate.len(), shape)?;
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = gelu_tanh(g) * u;
            }
        });
    Ok(())
}

/// dgate = dout·up·gelu_tanh'(gate); dup = dout·gelu_tanh(gate).
pub fn geglu_bwd(
    dout: &[f32],
    gate: &[f32],
    up: &[f32],
    dgate: &mut [f32],
    dup: &mut [f32],
) -> Result<()> {
    let shape = || format!("[len={}]", gate.len());
    check_len("geglu_bwd", "dout", dout.len(), gate.len(), shape)?;
    check_len("geglu_bwd", "up", up.len(), gate.len(), shape)?;
    check_len("geglu_bwd", "dgate", dgate.len(), gate.len(), shape)?;
    check_len("geglu_bwd", "dup", dup.len(), gate.len(), shape)?;
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(
            dout.par_chunks(CHUNK)
                .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))),
        )
        .for_each(|((dg, du), (d, (g, u)))| {
            for i in 0..dg.len() {
                let (a, da) = gelu_tanh_grad(g[i]);
                dg[i] = d[i] * u[i] * da;
                du[i] = d[i] * a;
            }
        });
    Ok(())
}
