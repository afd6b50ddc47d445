//! Quantizing straight from a checkpoint's stored bytes: the dtypes a weight may come in, their
//! decoding, and [`quantize_raw`], which is [`quantize`](super::quantize) of the decoded values without
//! ever holding the decoded tensor (each 64-block is decoded into a stack array and quantized at once).
//!
//! Why this exists: a Gemma-2-9B projection is 51 M elements; decoding it to an f32 `Vec` first costs
//! 205 MB of host memory per tensor and a second pass over it. bf16 → f32 and f16 → f32 are exact, so
//! quantizing the decoded block gives the bits `quantize` gives for the decoded tensor.

use super::quantize::{assemble, checked_numel, quantize_block};
use super::{Nf4Tensor, BLOCK};
use crate::error::check_len;
use crate::KernelError;
use rayon::prelude::*;

/// Element type of raw little-endian weight bytes (a safetensors `F32`, `BF16` or `F16` tensor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RawDtype {
    F32,
    Bf16,
    F16,
}

impl RawDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            RawDtype::F32 => 4,
            RawDtype::Bf16 | RawDtype::F16 => 2,
        }
    }

    /// The safetensors spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RawDtype::F32 => "F32",
            RawDtype::Bf16 => "BF16",
            RawDtype::F16 => "F16",
        }
    }

    /// Element `i` of `bytes` as f32 (exact for all three dtypes). The caller keeps `i` in range.
    #[inline]
    pub fn get(self, bytes: &[u8], i: usize) -> f32 {
        match self {
            RawDtype::F32 => {
                let b = &bytes[4 * i..4 * i + 4];
                f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            }
            RawDtype::Bf16 => {
                half::bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
            }
            RawDtype::F16 => {
                half::f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32()
            }
        }
    }

    /// Decodes `bytes` (a whole number of elements) into `out` (`bytes.len() / size` elements). One
    /// loop per dtype, so the dtype is not matched per element.
    pub fn decode_into(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            RawDtype::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            RawDtype::Bf16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    // half's widening (as the old f32 path's `decode_f32`): exact, NaN kept quiet.
                    *o = half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
            RawDtype::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
        }
    }

    /// The whole of `bytes` as f32, decoded in parallel (the dense-tensor path of a loader).
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        let n = bytes.len() / self.size();
        let mut out = vec![0.0f32; n];
        // 64 Ki elements per task: big enough to amortise rayon, small enough to spread a norm weight.
        const CHUNK: usize = 1 << 16;
        out.par_chunks_mut(CHUNK)
            .zip(bytes.par_chunks(CHUNK * self.size()))
            .for_each(|(o, b)| self.decode_into(b, o));
        out
    }
}

/// Checks that `raw` holds exactly the elements of `shape` in `dtype`; returns numel.
pub fn check_raw(
    op: &'static str,
    raw: &[u8],
    dtype: RawDtype,
    shape: &[usize],
) -> crate::Result<usize> {
    let numel = checked_numel(op, shape)?;
    let want = numel
        .checked_mul(dtype.size())
        .ok_or_else(|| KernelError::Invalid {
            op,
            arg: "shape",
            msg: format!("{shape:?} of {} overflows usize bytes", dtype.as_str()),
        })?;
    check_len(op, "raw", raw.len(), want, || {
        format!(
            "{shape:?} of {} ({} bytes each)",
            dtype.as_str(),
            dtype.size()
        )
    })?;
    Ok(numel)
}

/// The first non-finite element of `raw` (flat index and value), scanning 64-blocks in parallel.
pub fn first_non_finite(raw: &[u8], dtype: RawDtype) -> Option<(usize, f32)> {
    let es = dtype.size();
    let blk = raw.par_chunks(BLOCK * es).position_first(|b| {
        let mut x = [0.0f32; BLOCK];
        let n = b.len() / es;
        dtype.decode_into(b, &mut x[..n]);
        x[..n].iter().any(|v| !v.is_finite())
    })?;
    let b = &raw[blk * BLOCK * es..((blk + 1) * BLOCK * es).min(raw.len())];
    (0..b.len() / es)
        .map(|i| (blk * BLOCK + i, dtype.get(b, i)))
        .find(|(_, v)| !v.is_finite())
}

/// The error `quantize` gives for a non-finite element `i` of a `shape` tensor.
pub fn non_finite_error(shape: &[usize], i: usize, v: f32) -> KernelError {
    KernelError::Invalid {
        op: "nf4_quantize",
        arg: "data",
        msg: format!("element {i} of the {shape:?} tensor is {v} (NF4 needs finite values)"),
    }
}

/// [`quantize`](super::quantize) of the values `raw` holds (little-endian `dtype`, row-major `shape`),
/// bit for bit, without materializing them: each 64-block is decoded into a stack array and quantized.
/// Errors as `quantize` (same messages), plus a byte length that does not match shape × dtype size.
pub fn quantize_raw(
    raw: &[u8],
    dtype: RawDtype,
    shape: &[usize],
    double_quant: bool,
) -> crate::Result<Nf4Tensor> {
    let numel = check_raw("nf4_quantize", raw, dtype, shape)?;
    if let Some((i, v)) = first_non_finite(raw, dtype) {
        return Err(non_finite_error(shape, i, v));
    }
    let es = dtype.size();
    let mut packed = vec![0u8; numel.div_ceil(2)];
    let mut absmax = vec![0.0f32; numel.div_ceil(BLOCK)];
    raw.par_chunks(BLOCK * es)
        .zip(packed.par_chunks_mut(BLOCK / 2))
        .zip(absmax.par_iter_mut())
        .for_each(|((b, out), a)| {
            let mut x = [0.0f32; BLOCK];
            let n = b.len() / es;
            dtype.decode_into(b, &mut x[..n]);
            *a = quantize_block(&x[..n], out);
        });
    Ok(assemble(shape, packed, absmax, double_quant))
}
