//! Counter-based inverted-dropout masks: the value of element i depends only on (seed, stream, i), so
//! the mask can be generated where it is used (the GPU, kernels/elementwise.cu `dropout_mask_k`) instead
//! of being drawn on the host and uploaded, and any backend gives the same bits.
//!
//! Contract (`dropout_mask`): out[i] = 0 if bits(key, i) < thr, else keep, where
//! - key  = splitmix64(seed ^ splitmix64(stream))             (`mask_key`; host side, once per mask)
//! - bits(key, i) = splitmix64(key + i·γ) (wrapping u64)      (`element_bits`; γ = 0x9E3779B97F4A7C15)
//! - thr  = ⌊p·2⁶⁴⌋ as u64                                    (`threshold`; p ∈ [0, 1))
//! - keep = f32(1/(1 − p)) computed in f64 and rounded once   (`keep_value`)
//!
//! Why this hash: bits(key, 0), bits(key, 1), … is exactly the output sequence of a SplitMix64 generator
//! whose state starts at `key` (its state advances by γ and each output is the finaliser of the state),
//! which passes BigCrush; being a function of the index, it needs no sequential state, so every thread
//! computes its own elements. The drop decision is one u64 comparison against a threshold computed on
//! the host: no float arithmetic is involved in the decision, and the stored value is one host-rounded
//! f32, so CPU and GPU masks are bit-identical (the emulator check requires it). P(drop) = thr/2⁶⁴,
//! which differs from p by less than 2⁻⁶⁴.
//!
//! Streams: two (seed, stream) pairs give different keys unless seed₁ ^ seed₂ = splitmix64(stream₁) ^
//! splitmix64(stream₂). Two keys' sequences overlap only if their difference is j·γ (mod 2⁶⁴) for some
//! |j| < mask length, a 2·len/2⁶⁴ chance for unrelated keys.

use rayon::prelude::*;

use crate::contract;
use crate::error::Result;

/// SplitMix64's state increment (⌊2⁶⁴/φ⌋, odd).
pub const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// The SplitMix64 output for state `z` (adds γ, then the variant-13 finaliser): a bijection on u64.
#[inline]
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The per-mask key of (seed, stream).
pub fn mask_key(seed: u64, stream: u64) -> u64 {
    splitmix64(seed ^ splitmix64(stream))
}

/// The 64 random bits of element `i` of the mask with key `key`.
#[inline]
pub fn element_bits(key: u64, i: u64) -> u64 {
    splitmix64(key.wrapping_add(i.wrapping_mul(GAMMA)))
}

/// ⌊p·2⁶⁴⌋: element i is dropped iff `element_bits(key, i) < threshold(p)`. p·2⁶⁴ is an exact f64
/// (scaling by a power of two) below 2⁶⁴ for p < 1, so the conversion only truncates the fraction.
pub fn threshold(p: f64) -> u64 {
    (p * 18_446_744_073_709_551_616.0) as u64
}

/// The value of a kept element, 1/(1 − p) rounded to f32 once (torch's inverted dropout scale).
pub fn keep_value(p: f64) -> f32 {
    (1.0 / (1.0 - p)) as f32
}

/// Writes the mask of (seed, stream) with drop probability p into `out` (see the module contract).
pub fn dropout_mask(out: &mut [f32], p: f64, seed: u64, stream: u64) -> Result<()> {
    contract::check_p("dropout_mask", p)?;
    let (key, thr, keep) = (mask_key(seed, stream), threshold(p), keep_value(p));
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let base = (c * CHUNK) as u64;
            for (j, x) in chunk.iter_mut().enumerate() {
                *x = if element_bits(key, base + j as u64) < thr {
                    0.0
                } else {
                    keep
                };
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known answers, also hard-coded in kernels/emu/check_dropout.cpp (`test_dropout`), which ties the
    /// emulated CUDA kernel to these exact bits.
    #[test]
    fn known_answers() {
        // SplitMix64 seeded with 1234567 (the reference generator's published first outputs).
        assert_eq!(splitmix64(1234567), 6457827717110365317);
        assert_eq!(element_bits(1234567, 1), 3203168211198807973);
        assert_eq!(threshold(0.0), 0);
        assert_eq!(threshold(0.5), 1 << 63);
        assert_eq!(threshold(0.25), 1 << 62);
        // 1/0.9 = 1.11111111111111116 in f64, rounded once to the f32 1.11111116 (0x3f8e38e4).
        assert_eq!(keep_value(0.1).to_bits(), 0x3f8e_38e4);
        let key = mask_key(42, 7);
        assert_eq!(key, KEY_42_7);
        let mut m = vec![f32::NAN; 1000];
        dropout_mask(&mut m, 0.1, 42, 7).unwrap();
        let zeros = m.iter().filter(|&&x| x == 0.0).count();
        assert_eq!((zeros, fnv1a(&m)), (ZEROS_42_7, FNV_42_7));
    }

    const KEY_42_7: u64 = 7974615062405353404;
    const ZEROS_42_7: usize = 87;
    const FNV_42_7: u64 = 8281619623806533686;

    /// FNV-1a over the f32 bit patterns (little-endian bytes).
    fn fnv1a(x: &[f32]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for v in x {
            for b in v.to_bits().to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }

    #[test]
    fn bad_probabilities_are_refused() {
        let mut m = vec![0.0; 4];
        for p in [-0.1, 1.0, 1.5, f64::NAN, f64::INFINITY] {
            let e = dropout_mask(&mut m, p, 0, 0).unwrap_err().to_string();
            assert!(e.contains("dropout_mask") && e.contains("`p`"), "{e}");
        }
    }
}
