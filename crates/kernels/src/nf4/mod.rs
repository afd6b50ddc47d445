//! NF4 (4-bit NormalFloat) quantization, bit-exact with bitsandbytes (blocksize 64, double-quantized
//! absmax with the signed 8-bit dynamic map in blocks of 256).
//!
//! Layout of a quantized [N=out, K=in] weight with numel = N·K:
//! - `packed`: ceil(numel/2) bytes; element 2j in the HIGH nibble of byte j, element 2j+1 in the LOW nibble.
//! - absmax per 64-element block of the row-major flattened weight: ceil(numel/64) blocks.
//!   Nested (double quant): `absmax_code` u8 per block, `nested_absmax` f32 per 256 blocks, `offset`,
//!   `code8` the 256-entry dynamic map: absmax[i] = code8[absmax_code[i]]·nested_absmax[i/256] + offset.
//!   Plain: `Absmax::Plain(f32 per block)`.
//!
//! # Quantization rules (what [`quantize`] reproduces, checked bit for bit against bitsandbytes 0.50.2
//! by `crates/kernels/tests/it/golden_nf4.rs`)
//! - Full 64-block: `absmax = max|x|` (stored as is, 0 for an all-zero block); `inv = 1/max(absmax, 1e-38)`
//!   in f32; `xn = x·inv`; code = number of the 15 f32 midpoints [`NF4_THRESHOLDS`] strictly below `xn`
//!   (exact ties go to the LOWER code). An all-zero block therefore gets code 7 (0.0) everywhere and
//!   absmax 0 — this is what bitsandbytes on CPU (torch default backend) produces; the CUDA kernel instead
//!   computes 0·(1/0) = NaN and stores code 0 (−1.0). Both dequantize to ±0, so the weights agree.
//! - Last partial block (numel % 64 ≠ 0): `absmax = max(max|x|, 1e-38)` is STORED clamped (an all-zero
//!   tail stores f32(1e-38) = 9.99999935e-39), and `xn = x / absmax` is a true division (bitsandbytes'
//!   default backend; the CUDA kernel multiplies by the reciprocal, which can differ by 1 ulp in xn).
//! - Odd numel: the missing last element is padded with 0.0, i.e. low nibble 7 in the last byte.
//! - Double quant: `offset` = torch's f32 `mean` of the absmax ([`torch_mean_f32`], which reproduces
//!   torch's CPU cascade sum with 8-lane vector accumulators, then divides by n in f32; from 32768 blocks
//!   on, i.e. 2M weights, torch's bits also depend on its thread count — we use its one-thread result, and
//!   a GPU-made checkpoint's offset comes from a CUDA reduction anyway, so read it from the file). Then the
//!   centered absmax `a − offset` is quantized in blocks of 256 with the signed dynamic map
//!   ([`dynamic_map`]): `nested = max|c|`, `cn = c·(1/nested)` and the CUDA `dQuantize<0>` rule
//!   ([`quantize_dynamic8`]). bitsandbytes' CPU kernel uses a lookup-table approximation instead, which is
//!   not always the nearest code; real QLoRA checkpoints are made on GPU, so the CUDA rule is the reference.
//! - Inputs with NaN or ±inf are rejected (bitsandbytes would silently produce NaN absmax).

/// The 16 NF4 code values (bitsandbytes `get_4bit_type("nf4")`), index = 4-bit code.
// The literals are bitsandbytes' decimal printouts; the f32 each rounds to is what matters (checked bit
// for bit against the fixture in golden_nf4.rs).
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// Elements per NF4 block.
pub const BLOCK: usize = 64;
/// Absmax values per nested (second-level) block.
pub const NESTED_BLOCK: usize = 256;

/// Per-block scales of an NF4 tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// f32 absmax per 64-block (bitsandbytes `compress_statistics=False`).
    Plain(Vec<f32>),
    /// Double quantization (`compress_statistics=True`, QLoRA's `bnb_4bit_use_double_quant`).
    Nested {
        codes: Vec<u8>,
        nested_absmax: Vec<f32>,
        offset: f32,
        code8: Box<[f32; 256]>,
    },
}

/// A quantized weight held on the host, in the exact bitsandbytes layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    /// Logical shape of the dense weight, e.g. [out, in].
    pub shape: Vec<usize>,
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

impl Nf4Tensor {
    /// Number of weight elements (product of `shape`).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of 64-element absmax blocks.
    pub fn blocks(&self) -> usize {
        self.numel().div_ceil(BLOCK)
    }

    /// The f32 absmax of 64-block `i`, decoded as bitsandbytes does: code8[c]·nested[i/256] + offset,
    /// all in f32.
    ///
    /// # Panics
    /// If `i` is not a block of this tensor or the absmax vectors are shorter than the shape needs: this
    /// is the per-block accessor of the dequantization hot loops, which check the tensor first
    /// (`dequantize_into` does; see also `cpu::nf4::check_nf4`).
    #[inline]
    pub fn block_absmax(&self, i: usize) -> f32 {
        match &self.absmax {
            Absmax::Plain(a) => a[i],
            Absmax::Nested {
                codes,
                nested_absmax,
                offset,
                code8,
            } => code8[codes[i] as usize] * nested_absmax[i / NESTED_BLOCK] + offset,
        }
    }

    /// Dequantizes elements [start, start + out.len()) of the flattened weight into `out`
    /// (w = NF4_CODE[q]·absmax[block], in f32). This is the tile primitive of the LoRA linear: callers
    /// dequantize a few rows at a time and never hold the whole dense weight.
    pub fn dequantize_into(&self, start: usize, out: &mut [f32]) -> crate::Result<()> {
        let end = start.saturating_add(out.len());
        crate::error::ensure("nf4_dequantize", "range", end <= self.numel(), || {
            format!(
                "elements {start}..{end} are outside a weight of {} elements",
                self.numel()
            )
        })?;
        crate::error::check_len(
            "nf4_dequantize",
            "packed",
            self.packed.len(),
            self.numel().div_ceil(2),
            || format!("{:?}", self.shape),
        )?;
        let nb = self.blocks();
        let nabs = match &self.absmax {
            Absmax::Plain(a) => a.len(),
            Absmax::Nested {
                codes,
                nested_absmax,
                ..
            } => {
                crate::error::check_len(
                    "nf4_dequantize",
                    "nested_absmax",
                    nested_absmax.len(),
                    nb.div_ceil(NESTED_BLOCK),
                    || format!("[blocks={nb}]"),
                )?;
                codes.len()
            }
        };
        crate::error::check_len("nf4_dequantize", "absmax", nabs, nb, || {
            format!("[blocks={nb}]")
        })?;
        let mut e = start;
        let mut o = 0;
        while e < end {
            let blk = e / BLOCK;
            let amax = self.block_absmax(blk);
            let blk_end = ((blk + 1) * BLOCK).min(end);
            while e < blk_end {
                let byte = self.packed[e / 2];
                let q = if e.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 0x0f
                };
                out[o] = NF4_CODE[q as usize] * amax;
                e += 1;
                o += 1;
            }
        }
        Ok(())
    }

    /// Dequantizes the whole tensor (for merge, export and tests only).
    pub fn dequantize(&self) -> crate::Result<Vec<f32>> {
        let mut out = vec![0.0; self.numel()];
        self.dequantize_into(0, &mut out)?;
        Ok(out)
    }
}

mod bnb;
mod quantize;
mod raw;
#[cfg(test)]
mod tests;
mod torch_sum;

pub use bnb::{python_float_repr, BnbAbsmax};
pub use quantize::{dynamic_map, nf4_code_of, quantize, quantize_dynamic8, NF4_THRESHOLDS};
pub use raw::{check_raw, first_non_finite, non_finite_error, quantize_raw, RawDtype};
pub use torch_sum::{torch_mean_f32, torch_mean_f32_threads, torch_sum_f32, torch_sum_f32_threads};
