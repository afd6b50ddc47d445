//! Quantization to NF4 with bitsandbytes' rules (see the rules in the parent module's doc): the code
//! thresholds, the signed 8-bit dynamic map of the double quantization, and `quantize` itself.

use super::{torch_mean_f32, Absmax, Nf4Tensor, BLOCK, NESTED_BLOCK, NF4_CODE};
use crate::error::check_len;
use crate::KernelError;
use rayon::prelude::*;

/// The 15 decision thresholds between adjacent NF4 codes: `f32(f32(code[i] + code[i+1]) / 2)`, equal bit
/// for bit to the literals of the CUDA `dQuantizeNF4` decision tree and to the default backend's
/// `bucketize` bounds. Code of `xn` = number of thresholds strictly below it.
pub const NF4_THRESHOLDS: [f32; 15] = {
    let mut t = [0.0f32; 15];
    let mut i = 0;
    while i < 15 {
        t[i] = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
        i += 1;
    }
    t
};

/// torch clamps the absmax with `clamp(min=1e-38)` before taking its reciprocal; the Python scalar 1e-38
/// becomes the f32 subnormal 9.99999935e-39.
const ABSMAX_FLOOR: f32 = 1e-38;

/// NF4 code of a normalized value: the number of [`NF4_THRESHOLDS`] strictly below `xn` (ties go low).
/// NaN compares false everywhere and gets code 0, as in the CUDA decision tree.
#[inline]
pub fn nf4_code_of(xn: f32) -> u8 {
    let mut q = 0u8;
    for &t in &NF4_THRESHOLDS {
        q += (t < xn) as u8;
    }
    q
}

/// bitsandbytes `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`, regenerated bit for
/// bit (verified against the table bitsandbytes 0.50.2 produces, in `golden_nf4.rs`).
///
/// For i in 0..7: `b = torch.linspace(0.1, 1, 2^i + 1)` (f32), `means = (b[:-1] + b[1:]) / 2`, and the
/// values `±f32(10^(i−6))·means`; plus 0 and 1.0; sorted. torch's CPU linspace computes
/// `step = (end − start)/(steps − 1)` in f32 and element k as `start + step·k` for k < steps/2, else
/// `end − step·(steps − 1 − k)`, each contracted to ONE fused multiply-add by the compiler — hence
/// `mul_add` below (a separately rounded product gives different bits from 9 steps on).
pub fn dynamic_map() -> Box<[f32; 256]> {
    // Python's `10 ** (-6 + i)` is the correctly rounded double (an int 1 for i = 6); torch casts it to f32
    // before the f32 multiply.
    const SCALE: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for (i, &scale) in SCALE.iter().enumerate() {
        let steps = (1usize << i) + 1;
        let (start, end) = (0.1f32, 1.0f32);
        let step = (end - start) / (steps - 1) as f32;
        let half = steps / 2;
        let b: Vec<f32> = (0..steps)
            .map(|k| {
                if k < half {
                    step.mul_add(k as f32, start)
                } else {
                    (-step).mul_add((steps - 1 - k) as f32, end)
                }
            })
            .collect();
        let s = scale as f32;
        let means: Vec<f32> = b.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        data.extend(means.iter().map(|&m| s * m));
        data.extend(means.iter().map(|&m| -s * m));
    }
    data.push(0.0);
    data.push(1.0);
    debug_assert_eq!(data.len(), 256);
    // All values are finite and distinct, so total_cmp gives Python's sort order.
    data.sort_by(f32::total_cmp);
    let mut out = Box::new([0.0f32; 256]);
    out.copy_from_slice(&data);
    out
}

/// The CUDA `dQuantize<0>` rule of bitsandbytes (General8bit, not stochastic) for a normalized value `x`
/// and a sorted 256-entry map: a 7-step binary search from pivot 127 (go up when `x > code[pivot]`), then
/// the nearest of the pivot and the neighbour on x's side by the f32 midpoint `(neighbour + val)·0.5`;
/// an exact tie stays on the pivot. NaN (0·(1/0) for an all-zero nested block) gives code 0.
#[inline]
pub fn quantize_dynamic8(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot = 127usize;
    let mut upper_pivot = 255usize;
    let mut lower_pivot = 0usize;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut i = 64usize;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
        i >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    // pivot ∈ [0, 254] and upper/lower_pivot ∈ [0, 255]: every return fits a u8.
    if x > val {
        let mid = (upper + val) * 0.5;
        if x > mid {
            upper_pivot as u8
        } else {
            pivot as u8
        }
    } else {
        let mid = (lower + val) * 0.5;
        if x < mid {
            lower_pivot as u8
        } else {
            pivot as u8
        }
    }
}

/// Product of a shape with overflow and emptiness checks.
pub(super) fn checked_numel(op: &'static str, shape: &[usize]) -> crate::Result<usize> {
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    match numel {
        None => Err(KernelError::Invalid {
            op,
            arg: "shape",
            msg: format!("{shape:?} overflows usize"),
        }),
        Some(0) => Err(KernelError::Invalid {
            op,
            arg: "shape",
            msg: format!("{shape:?} has no elements"),
        }),
        Some(n) => Ok(n),
    }
}

/// Quantizes one ≤64-element block into ceil(len/2) packed bytes; returns the stored absmax.
/// `full` selects the full-block rule (reciprocal multiply, unclamped absmax stored) or the partial
/// last-block rule (clamped absmax stored, true division) — see the module doc.
pub(super) fn quantize_block(x: &[f32], out: &mut [u8]) -> f32 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let clamped = amax.max(ABSMAX_FLOOR);
    let full = x.len() == BLOCK;
    let inv = 1.0f32 / clamped;
    let code = |v: f32| nf4_code_of(if full { v * inv } else { v / clamped });
    for (byte, pair) in out.iter_mut().zip(x.chunks(2)) {
        let hi = code(pair[0]);
        // Odd numel: the missing element is padded with 0.0, whose code is 7.
        let lo = if pair.len() == 2 {
            code(pair[1])
        } else {
            nf4_code_of(0.0)
        };
        *byte = (hi << 4) | lo;
    }
    if full {
        amax
    } else {
        clamped
    }
}

/// Quantizes a dense f32 tensor to NF4 exactly as bitsandbytes
/// `quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=double_quant)` (see the module
/// doc for the rules, partial blocks, zero blocks and the double-quant offset).
///
/// `data` is the row-major flattened tensor of `shape` (`numel = Π shape`, > 0). Errors: length/shape
/// mismatch, an empty or overflowing shape, a NaN/±inf element (named by its flat index).
pub fn quantize(data: &[f32], shape: &[usize], double_quant: bool) -> crate::Result<Nf4Tensor> {
    const OP: &str = "nf4_quantize";
    let numel = checked_numel(OP, shape)?;
    check_len(OP, "data", data.len(), numel, || format!("{shape:?}"))?;
    if let Some(i) = data.par_iter().position_first(|v| !v.is_finite()) {
        return Err(KernelError::Invalid {
            op: OP,
            arg: "data",
            msg: format!(
                "element {i} of the {shape:?} tensor is {} (NF4 needs finite values)",
                data[i]
            ),
        });
    }
    let blocks = numel.div_ceil(BLOCK);
    let mut packed = vec![0u8; numel.div_ceil(2)];
    let mut absmax = vec![0.0f32; blocks];
    // A 64-block is 32 bytes; only the last chunk can be shorter, so the three chunkings stay aligned.
    data.par_chunks(BLOCK)
        .zip(packed.par_chunks_mut(BLOCK / 2))
        .zip(absmax.par_iter_mut())
        .for_each(|((x, out), a)| *a = quantize_block(x, out));
    Ok(assemble(shape, packed, absmax, double_quant))
}

/// The tensor from its packed codes and per-block absmax, double-quantizing the absmax when asked:
/// the last step of both quantizers (from f32 here, from stored bytes in `raw.rs`).
pub(super) fn assemble(
    shape: &[usize],
    packed: Vec<u8>,
    absmax: Vec<f32>,
    double_quant: bool,
) -> Nf4Tensor {
    let absmax = if double_quant {
        double_quantize(&absmax)
    } else {
        Absmax::Plain(absmax)
    };
    Nf4Tensor {
        shape: shape.to_vec(),
        packed,
        absmax,
    }
}

/// bitsandbytes double quantization of a (non-empty, finite) absmax vector: offset = torch f32 mean, then
/// 8-bit blockwise quantization of `absmax − offset` in blocks of 256 with the CUDA rule.
pub(super) fn double_quantize(absmax: &[f32]) -> Absmax {
    let offset = torch_mean_f32(absmax);
    let code8 = dynamic_map();
    let mut codes = vec![0u8; absmax.len()];
    // One task per 256-block (independent: each has its own nested absmax), in parallel.
    let nested_absmax: Vec<f32> = absmax
        .par_chunks(NESTED_BLOCK)
        .zip(codes.par_chunks_mut(NESTED_BLOCK))
        .map(|(a, q)| {
            let mut c = [0.0f32; NESTED_BLOCK];
            for (ci, &ai) in c.iter_mut().zip(a) {
                *ci = ai - offset;
            }
            let c = &c[..a.len()];
            let amax = c.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            // No clamp here (CUDA kQuantizeBlockwise): an all-zero nested block gives inv = inf,
            // 0·inf = NaN and code 0, which decodes to code8[0]·0 + offset = offset, as intended.
            let inv = 1.0f32 / amax;
            for (qi, &v) in q.iter_mut().zip(c) {
                *qi = quantize_dynamic8(&code8, v * inv);
            }
            amax
        })
        .collect();
    Absmax::Nested {
        codes,
        nested_absmax,
        offset,
        code8,
    }
}
