//! GeGLU with the tanh-approximated GELU (HF `gelu_pytorch_tanh`), the Gemma-2 MLP activation.
//!
//! Contract, all buffers the same length (any shape, usually [N, I]):
//! - `geglu_fwd`: out = gelu_tanh(gate)·up                                   (writes out)
//! - `geglu_bwd`: dgate = dout·up·gelu_tanh'(gate), dup = dout·gelu_tanh(gate) (writes both)
//!
//! gelu_tanh(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
//!
//! Evaluated as x·σ(2u) = x/(1 + e^(−2u)), u = √(2/π)·(x + 0.044715·x³) — the same function, one
//! vectorized `fastmath::exp` instead of a tanh, and no cancellation of 1 + tanh u for x ≪ 0 (see
//! `fastmath::gelu_tanh` for the error bound).

use rayon::prelude::*;

use crate::contract;
use crate::cpu::fastmath::{self, simd_fn};
use crate::error::Result;

const CHUNK: usize = 1 << 13;

/// gelu_tanh(x).
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    fastmath::gelu_tanh(x)
}

/// (gelu_tanh(x), d gelu_tanh / dx).
#[inline(always)]
pub fn gelu_tanh_grad(x: f32) -> (f32, f32) {
    fastmath::gelu_tanh_grad(x)
}

simd_fn! {
    /// out = gelu_tanh(gate)·up over one chunk (equal lengths), at SIMD level `level`.
    pub fn geglu_fwd_slice(level: Simd, gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = gelu_tanh(g) * u;
        }
    }
}

simd_fn! {
    /// dgate = dout·up·gelu_tanh'(gate), dup = dout·gelu_tanh(gate) over one chunk (equal lengths),
    /// at SIMD level `level`.
    pub fn geglu_bwd_slice(
        level: Simd,
        dout: &[f32],
        gate: &[f32],
        up: &[f32],
        dgate: &mut [f32],
        dup: &mut [f32],
    ) {
        let n = dgate.len().min(dup.len()).min(dout.len()).min(gate.len()).min(up.len());
        let (dg, du) = (&mut dgate[..n], &mut dup[..n]);
        let (d, g, u) = (&dout[..n], &gate[..n], &up[..n]);
        for i in 0..n {
            let (a, da) = gelu_tanh_grad(g[i]);
            dg[i] = d[i] * u[i] * da;
            du[i] = d[i] * a;
        }
    }
}

/// out = gelu_tanh(gate)·up.
pub fn geglu_fwd(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    contract::geglu_fwd(gate.len(), up.len(), out.len())?;
    let level = fastmath::detected();
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| geglu_fwd_slice(level, g, u, o));
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
    contract::geglu_bwd(dout.len(), gate.len(), up.len(), dgate.len(), dup.len())?;
    let level = fastmath::detected();
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(
            dout.par_chunks(CHUNK)
                .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))),
        )
        .for_each(|((dg, du), (d, (g, u)))| geglu_bwd_slice(level, d, g, u, dg, du));
    Ok(())
}
