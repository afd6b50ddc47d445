//! NF4 tile dequantization for the CPU backend (the format itself lives in `crate::nf4`).
//!
//! Contract: w holds a [N,K] weight (numel = N·K) in the bitsandbytes layout (see nf4.rs).
//! - `check_nf4` validates shape, packed length and absmax lengths once per op, naming the op.
//! - `dequantize_range` writes elements [start, start + out.len()) of the flattened weight into out,
//!   bit-identical to `Nf4Tensor::dequantize_into` (w = NF4_CODE[q]·absmax[block], one f32 multiply),
//!   but a byte at a time (two codes per byte, absmax decoded once per 64-block) and in parallel over
//!   4096-element pieces. Rows n0..n0+tn of the weight are elements [n0·K, (n0+tn)·K): that is the
//!   tile the LoRA linear GEMMs, so the whole dense weight never exists.
//! - `nf4_dequantize` dequantizes the whole tensor (merge/export/tests).

use rayon::prelude::*;

use crate::contract::{self, Nf4Dims};
use crate::error::{ensure, Result};
use crate::nf4::{Nf4Tensor, BLOCK, NF4_CODE};

/// Elements per parallel piece (64 blocks).
const PIECE: usize = 4096;

/// Checks that `w` is a consistent NF4 tensor of `n·k` elements (shape [n, k] when 2-D).
pub fn check_nf4(op: &'static str, w: &Nf4Tensor, n: usize, k: usize) -> Result<()> {
    contract::nf4_weight(op, &Nf4Dims::of(w), n, k)
}

/// One piece, serially. Preconditions (checked by the callers): `w` passed `check_nf4`, and
/// start + out.len() ≤ numel.
fn dequant_piece(w: &Nf4Tensor, start: usize, out: &mut [f32]) {
    let end = start + out.len();
    let mut e = start;
    let mut o = 0;
    while e < end {
        let blk = e / BLOCK;
        let amax = w.block_absmax(blk);
        let blk_end = ((blk + 1) * BLOCK).min(end);
        // Block boundaries are even, so only the first element of a range can be an odd (low-nibble) one.
        if !e.is_multiple_of(2) {
            out[o] = NF4_CODE[(w.packed[e / 2] & 0x0f) as usize] * amax;
            e += 1;
            o += 1;
        }
        let pairs = (blk_end - e) / 2;
        let bytes = &w.packed[e / 2..e / 2 + pairs];
        for (pair, &byte) in out[o..o + 2 * pairs].chunks_exact_mut(2).zip(bytes) {
            pair[0] = NF4_CODE[(byte >> 4) as usize] * amax;
            pair[1] = NF4_CODE[(byte & 0x0f) as usize] * amax;
        }
        e += 2 * pairs;
        o += 2 * pairs;
        if e < blk_end {
            out[o] = NF4_CODE[(w.packed[e / 2] >> 4) as usize] * amax;
            e += 1;
            o += 1;
        }
    }
}

/// Writes elements [start, start + out.len()) of the flattened weight (layout and range checked).
pub fn dequantize_range(w: &Nf4Tensor, start: usize, out: &mut [f32]) -> Result<()> {
    let Some(numel) = w.shape.iter().try_fold(1usize, |a, &x| a.checked_mul(x)) else {
        return Err(crate::KernelError::Invalid {
            op: "nf4_dequantize",
            arg: "w",
            msg: format!("shape {:?} overflows", w.shape),
        });
    };
    // O(1) length checks: keeps this public function panic-free on an inconsistent tensor.
    contract::nf4_layout("nf4_dequantize", &Nf4Dims::of(w), numel)?;
    ensure(
        "nf4_dequantize",
        "range",
        start.checked_add(out.len()).is_some_and(|e| e <= numel),
        || {
            format!(
                "elements {start}..{} are outside a weight of {numel} elements",
                start.saturating_add(out.len())
            )
        },
    )?;
    out.par_chunks_mut(PIECE)
        .enumerate()
        .for_each(|(i, piece)| dequant_piece(w, start + i * PIECE, piece));
    Ok(())
}

/// Dequantizes the whole weight into out [numel].
pub fn nf4_dequantize(w: &Nf4Tensor, out: &mut [f32]) -> Result<()> {
    contract::nf4_dequantize(&Nf4Dims::of(w), out.len())?;
    dequantize_range(w, 0, out)
}
