//! NF4 (4-bit NormalFloat) quantization, bit-exact with bitsandbytes (blocksize 64, double-quantized
//! absmax with the signed 8-bit dynamic map in blocks of 256). See gemma2-qlora-facts.md §3.
//!
//! Layout of a quantized [N=out, K=in] weight with numel = N·K:
//! - `packed`: ceil(numel/2) bytes; element 2j in the HIGH nibble of byte j, element 2j+1 in the LOW nibble.
//! - absmax per 64-element block of the row-major flattened weight: ceil(numel/64) blocks.
//!   Nested (double quant): `absmax_code` u8 per block, `nested_absmax` f32 per 256 blocks, `offset`,
//!   `code8` the 256-entry dynamic map: absmax[i] = code8[absmax_code[i]]·nested_absmax[i/256] + offset.
//!   Plain: `Absmax::Plain(f32 per block)`.
//!
//! # Quantization rules (what [`quantize`] reproduces, checked bit for bit against bitsandbytes 0.50.2
//! by `crates/kernels/tests/golden_nf4.rs`)
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
    /// (`dequantize_into` does; see also `cpu::dequant::check_nf4`).
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

// ---- quantization --------------------------------------------------------------------------------

use crate::error::{check_len, ensure};
use crate::KernelError;
use rayon::prelude::*;

/// The 15 decision thresholds between adjacent NF4 codes: `f32(f32(code[i] + code[i+1]) / 2)`, equal bit
/// for bit to the literals of the CUDA `dQuantizeNF4` decision tree and to the default backend's
/// `bucketize` bounds (gemma2-qlora-facts.md §3.2). Code of `xn` = number of thresholds strictly below it.
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

/// torch's CPU f32 `sum` of a contiguous 1-D tensor (ATen `SumKernel.cpp`, `cascade_sum`), bit for bit.
///
/// With 8-lane vectors (what torch 2.15 on x86-64 uses for this reduction — checked on 1500+ random
/// lengths up to 131072): the input is read as `nv = n/8` vectors; 4 interleaved vector accumulators
/// (vector j goes to accumulator j % 4) each with a 4-level cascade that flushes level 0 into level 1
/// every 16 rows (2^4; more levels only past 2^19 rows); leftover vectors go into accumulator 0; the
/// 4 accumulators are added in order; then a scalar starts at 0, adds the scalar tail (elements 8·nv..n)
/// in order and then the 8 lanes in order. Below 8 elements, the same with 4 scalar accumulators.
pub fn torch_sum_f32(x: &[f32]) -> f32 {
    const LANES: usize = 8;
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    fn ceil_log2(v: usize) -> usize {
        if v <= 2 {
            1
        } else {
            (usize::BITS - (v - 1).leading_zeros()) as usize
        }
    }
    // Index loops on purpose: they mirror ATen's `multi_row_sum` line for line.
    #[allow(clippy::needless_range_loop)]
    /// `multi_row_sum` over `rows` rows of ILP "columns", a column being a `W`-wide chunk at
    /// `load(row·ILP + col)`.
    fn multi_row_sum<const W: usize>(
        rows: usize,
        load: impl Fn(usize) -> [f32; W],
    ) -> [[f32; W]; ILP] {
        let level_power = 4.max(ceil_log2(rows) / LEVELS);
        let level_step = 1usize << level_power;
        let level_mask = level_step - 1;
        let mut acc = [[[0.0f32; W]; ILP]; LEVELS];
        let add = |a: &mut [f32; W], b: &[f32; W]| a.iter_mut().zip(b).for_each(|(x, y)| *x += *y);
        let mut i = 0usize;
        while i + level_step <= rows {
            for _ in 0..level_step {
                for (k, a) in acc[0].iter_mut().enumerate() {
                    add(a, &load(i * ILP + k));
                }
                i += 1;
            }
            for j in 1..LEVELS {
                for k in 0..ILP {
                    let lo = acc[j - 1][k];
                    add(&mut acc[j][k], &lo);
                    acc[j - 1][k] = [0.0; W];
                }
                if i & (level_mask << (j * level_power)) != 0 {
                    break;
                }
            }
        }
        while i < rows {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add(a, &load(i * ILP + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ILP {
                let hi = acc[j][k];
                add(&mut acc[0][k], &hi);
            }
        }
        acc[0]
    }
    fn row_sum<const W: usize>(count: usize, load: impl Fn(usize) -> [f32; W]) -> [f32; W] {
        let rows = count / ILP;
        let mut p = multi_row_sum::<W>(rows, &load);
        for i in rows * ILP..count {
            let v = load(i);
            p[0].iter_mut().zip(&v).for_each(|(a, b)| *a += *b);
        }
        for k in 1..ILP {
            let pk = p[k];
            p[0].iter_mut().zip(&pk).for_each(|(a, b)| *a += *b);
        }
        p[0]
    }
    let n = x.len();
    if n < LANES {
        // Scalar path (`scalar_inner_sum`): output starts at 0 and gets the row sum added.
        return 0.0 + row_sum::<1>(n, |i| [x[i]])[0];
    }
    let nv = n / LANES;
    let lanes = row_sum::<LANES>(nv, |i| {
        let mut v = [0.0f32; LANES];
        v.copy_from_slice(&x[i * LANES..(i + 1) * LANES]);
        v
    });
    let mut acc = 0.0f32;
    for &t in &x[nv * LANES..] {
        acc += t;
    }
    for l in lanes {
        acc += l;
    }
    0.0 + acc
}

/// torch's CPU f32 `mean` of a 1-D tensor with torch running ONE thread (or any thread count below 32768
/// elements): [`torch_sum_f32`] divided by `n` (as f32). This is what bitsandbytes uses as the double-quant
/// `offset`, and what [`quantize`] uses: deterministic, independent of the machine.
pub fn torch_mean_f32(x: &[f32]) -> f32 {
    torch_sum_f32(x) / x.len() as f32
}

/// torch's CPU f32 `sum` of a contiguous 1-D tensor when torch runs `threads` threads
/// (`torch.get_num_threads()`). From 32768 elements (ATen's GRAIN_SIZE) on, ATen's `two_pass_reduction`
/// splits the input into `min(threads, ceil(n/32768))` chunks of `ceil(n/chunks)` elements, sums each
/// chunk with [`torch_sum_f32`] into a zero-initialised buffer of `threads` partials, and sums that buffer
/// the same way. The bits therefore depend on the thread count of the machine that ran torch.
pub fn torch_sum_f32_threads(x: &[f32], threads: usize) -> f32 {
    const GRAIN_SIZE: usize = 32768;
    let n = x.len();
    if n < GRAIN_SIZE || threads <= 1 {
        return torch_sum_f32(x);
    }
    let chunks = threads.min(n.div_ceil(GRAIN_SIZE));
    let mut partials = vec![0.0f32; threads];
    for (p, c) in partials.iter_mut().zip(x.chunks(n.div_ceil(chunks))) {
        *p += torch_sum_f32(c);
    }
    torch_sum_f32(&partials)
}

/// [`torch_mean_f32`] for torch running `threads` threads (see [`torch_sum_f32_threads`]).
pub fn torch_mean_f32_threads(x: &[f32], threads: usize) -> f32 {
    torch_sum_f32_threads(x, threads) / x.len() as f32
}

/// Product of a shape with overflow and emptiness checks.
fn checked_numel(op: &'static str, shape: &[usize]) -> crate::Result<usize> {
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
fn quantize_block(x: &[f32], out: &mut [u8]) -> f32 {
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
    let absmax = if double_quant {
        double_quantize(&absmax)
    } else {
        Absmax::Plain(absmax)
    };
    Ok(Nf4Tensor {
        shape: shape.to_vec(),
        packed,
        absmax,
    })
}

/// bitsandbytes double quantization of a (non-empty, finite) absmax vector: offset = torch f32 mean, then
/// 8-bit blockwise quantization of `absmax − offset` in blocks of 256 with the CUDA rule.
fn double_quantize(absmax: &[f32]) -> Absmax {
    let code8 = dynamic_map();
    let offset = torch_mean_f32(absmax);
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let mut codes = vec![0u8; absmax.len()];
    let mut nested_absmax = Vec::with_capacity(absmax.len().div_ceil(NESTED_BLOCK));
    for (c, q) in centered
        .chunks(NESTED_BLOCK)
        .zip(codes.chunks_mut(NESTED_BLOCK))
    {
        let amax = c.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        // No clamp here (CUDA kQuantizeBlockwise): an all-zero nested block gives inv = inf,
        // 0·inf = NaN and code 0, which decodes to code8[0]·0 + offset = offset, as intended.
        let inv = 1.0f32 / amax;
        for (qi, &v) in q.iter_mut().zip(c) {
            *qi = quantize_dynamic8(&code8, v * inv);
        }
        nested_absmax.push(amax);
    }
    Absmax::Nested {
        codes,
        nested_absmax,
        offset,
        code8,
    }
}

/// Python's `repr(float)` (shortest round-trip digits; scientific when the decimal exponent is < −4 or
/// ≥ 16, with a signed two-digit exponent; otherwise fixed with at least one fractional digit), as
/// `json.dumps` prints a float (non-finite values as `NaN`, `Infinity`, `-Infinity`).
pub fn python_float_repr(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if v == 0.0 {
        return if v.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits too: "d.ddde-5".
    let e = format!("{:e}", v.abs());
    let (mant, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if v < 0.0 { "-" } else { "" };
    let nd = digits.len() as i32;
    if !(-4..16).contains(&exp) {
        let frac = if nd > 1 {
            format!(".{}", &digits[1..])
        } else {
            String::new()
        };
        let es = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{}{frac}e{es}{:02}", &digits[..1], exp.abs());
    }
    let point = exp + 1; // digits before the decimal point
    if point <= 0 {
        format!("{sign}0.{}{digits}", "0".repeat((-point) as usize))
    } else if point >= nd {
        format!("{sign}{digits}{}.0", "0".repeat((point - nd) as usize))
    } else {
        format!(
            "{sign}{}.{}",
            &digits[..point as usize],
            &digits[point as usize..]
        )
    }
}

/// The parts of a bitsandbytes 4-bit weight as read from a checkpoint (`P.weight.absmax` is U8 when the
/// absmax is double-quantized, F32 otherwise).
#[derive(Clone, Copy, Debug)]
pub enum BnbAbsmax<'a> {
    U8(&'a [u8]),
    F32(&'a [f32]),
}

impl Nf4Tensor {
    /// The exact `P.weight.quant_state.bitsandbytes__nf4` JSON blob bitsandbytes writes
    /// (`QuantState.as_dict(packed=True)`, dict order, `json.dumps` default separators), e.g.
    /// `{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [128, 896], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.031807661056518555}`.
    /// `dtype` is the torch dtype name without `torch.` (`bfloat16`, `float16`, `float32`); the nested
    /// keys appear only for a double-quantized tensor, `nested_offset` printed as Python's repr of the
    /// f32 offset widened to a double.
    pub fn quant_state_json(&self, dtype: &str) -> String {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        // dtype names are plain identifiers; escape defensively so the blob is always valid JSON.
        let dtype_json: String = dtype
            .chars()
            .flat_map(|c| match c {
                '"' => vec!['\\', '"'],
                '\\' => vec!['\\', '\\'],
                c => vec![c],
            })
            .collect();
        let mut s = format!(
            "{{\"quant_type\": \"nf4\", \"blocksize\": {BLOCK}, \"dtype\": \"{dtype_json}\", \"shape\": [{}]",
            shape.join(", ")
        );
        if let Absmax::Nested { offset, .. } = &self.absmax {
            s.push_str(&format!(
                ", \"nested_blocksize\": {NESTED_BLOCK}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                python_float_repr(*offset as f64)
            ));
        }
        s.push('}');
        s
    }

    /// Builds a tensor from the parts of a bitsandbytes checkpoint, validating them:
    /// `packed` (`P.weight`, ceil(numel/2) bytes), `absmax` (`P.weight.absmax`: U8 codes when nested,
    /// F32 per block otherwise; ceil(numel/64) entries), `quant_map` (`P.weight.quant_map`, must equal
    /// [`NF4_CODE`] bit for bit — an FP4 weight is refused), and for a nested absmax
    /// `nested_absmax` (ceil(blocks/256) f32), `nested_quant_map` (256 f32) and `offset` (the JSON
    /// `nested_offset` rounded to f32, as bitsandbytes does when loading). Errors name the part at fault.
    pub fn from_bnb_parts(
        shape: &[usize],
        packed: &[u8],
        absmax: BnbAbsmax<'_>,
        quant_map: &[f32],
        nested_absmax: Option<&[f32]>,
        nested_quant_map: Option<&[f32]>,
        offset: Option<f32>,
    ) -> crate::Result<Nf4Tensor> {
        const OP: &str = "nf4_from_bnb";
        let numel = checked_numel(OP, shape)?;
        let blocks = numel.div_ceil(BLOCK);
        let sh = || format!("{shape:?}");
        check_len(OP, "weight (packed)", packed.len(), numel.div_ceil(2), sh)?;
        check_len(
            OP,
            "weight.quant_map",
            quant_map.len(),
            NF4_CODE.len(),
            || "[16]".into(),
        )?;
        if let Some(i) = (0..16).find(|&i| quant_map[i].to_bits() != NF4_CODE[i].to_bits()) {
            return Err(KernelError::Invalid {
                op: OP,
                arg: "weight.quant_map",
                msg: format!(
                    "entry {i} is {} but NF4 has {} (is this an fp4 weight? only nf4 is supported)",
                    quant_map[i], NF4_CODE[i]
                ),
            });
        }
        let absmax = match absmax {
            BnbAbsmax::F32(a) => {
                ensure(
                    OP,
                    "weight.nested_absmax",
                    nested_absmax.is_none() && nested_quant_map.is_none() && offset.is_none(),
                    || "nested parts given but weight.absmax is F32 (not double-quantized)".into(),
                )?;
                check_len(OP, "weight.absmax", a.len(), blocks, || {
                    format!("[blocks={blocks}] of {shape:?}")
                })?;
                if let Some(i) = a.iter().position(|v| !v.is_finite()) {
                    return Err(KernelError::Invalid {
                        op: OP,
                        arg: "weight.absmax",
                        msg: format!("entry {i} is {}", a[i]),
                    });
                }
                Absmax::Plain(a.to_vec())
            }
            BnbAbsmax::U8(codes) => {
                check_len(OP, "weight.absmax", codes.len(), blocks, || {
                    format!("[blocks={blocks}] of {shape:?}")
                })?;
                let missing = |arg: &'static str| {
                    KernelError::Invalid {
                    op: OP,
                    arg,
                    msg: "missing: weight.absmax is U8 (double-quantized), which needs nested_absmax, nested_quant_map and nested_offset".into(),
                }
                };
                let nested = nested_absmax.ok_or_else(|| missing("weight.nested_absmax"))?;
                let map = nested_quant_map.ok_or_else(|| missing("weight.nested_quant_map"))?;
                let offset = offset.ok_or_else(|| missing("nested_offset"))?;
                let nb = blocks.div_ceil(NESTED_BLOCK);
                check_len(OP, "weight.nested_absmax", nested.len(), nb, || {
                    format!("[ceil({blocks}/256)={nb}]")
                })?;
                check_len(OP, "weight.nested_quant_map", map.len(), 256, || {
                    "[256]".into()
                })?;
                if let Some(i) = nested.iter().position(|v| !v.is_finite()) {
                    return Err(KernelError::Invalid {
                        op: OP,
                        arg: "weight.nested_absmax",
                        msg: format!("entry {i} is {}", nested[i]),
                    });
                }
                if let Some(i) = map.iter().position(|v| !v.is_finite()) {
                    return Err(KernelError::Invalid {
                        op: OP,
                        arg: "weight.nested_quant_map",
                        msg: format!("entry {i} is {}", map[i]),
                    });
                }
                ensure(OP, "nested_offset", offset.is_finite(), || {
                    format!("{offset} is not finite")
                })?;
                let mut code8 = Box::new([0.0f32; 256]);
                code8.copy_from_slice(map);
                Absmax::Nested {
                    codes: codes.to_vec(),
                    nested_absmax: nested.to_vec(),
                    offset,
                    code8,
                }
            }
        };
        Ok(Nf4Tensor {
            shape: shape.to_vec(),
            packed: packed.to_vec(),
            absmax,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::excessive_precision)] // decimal printouts of the f32 literals, as in the facts
    fn thresholds_equal_the_cuda_literals() {
        // The literals of bitsandbytes' CUDA dQuantizeNF4 tree, as f32 (facts §3.2).
        let cuda: [f32; 15] = [
            -0.848_096_370_697_021_5,
            -0.610_632_896_423_339_8,
            -0.459_995_269_775_390_6,
            -0.339_679_419_994_354_25,
            -0.234_607_398_509_979_25,
            -0.137_911_736_965_179_44,
            -0.045_525_018_125_772_476,
            0.039_790_149_778_127_67,
            0.120_255_246_758_461,
            0.203_521_251_678_466_8,
            0.292_013_764_381_408_7,
            0.389_312_535_524_368_3,
            0.501_663_446_426_391_6,
            0.642_786_920_070_648_2,
            0.861_478_447_914_123_5,
        ];
        for i in 0..15 {
            assert_eq!(
                NF4_THRESHOLDS[i].to_bits(),
                cuda[i].to_bits(),
                "threshold {i}"
            );
        }
    }

    #[test]
    fn ties_go_to_the_lower_code_and_packing_is_high_nibble_first() {
        for (i, &t) in NF4_THRESHOLDS.iter().enumerate() {
            assert_eq!(nf4_code_of(t) as usize, i, "exact tie at threshold {i}");
            assert_eq!(
                nf4_code_of(f32::from_bits(t.to_bits() + 1).max(t.next_up())) as usize,
                i + 1
            );
        }
        // Block [1.0, -1.0, 0, ...]: absmax 1; codes 15, 0, then 7s.
        let mut x = vec![0.0f32; 64];
        x[0] = 1.0;
        x[1] = -1.0;
        let q = quantize(&x, &[64], false).unwrap();
        assert_eq!(q.packed[0], 0xF0);
        assert!(q.packed[1..].iter().all(|&b| b == 0x77));
        assert_eq!(q.absmax, Absmax::Plain(vec![1.0]));
    }

    #[test]
    fn dynamic8_picks_the_nearest_code_away_from_ties() {
        let map = dynamic_map();
        // Every code value maps to itself, and a value a hair above/below stays there.
        for (c, &v) in map.iter().enumerate() {
            assert_eq!(quantize_dynamic8(&map, v) as usize, c, "code {c} = {v}");
        }
        assert_eq!(quantize_dynamic8(&map, 1.5), 255);
        assert_eq!(quantize_dynamic8(&map, -1.5), 0);
        assert_eq!(quantize_dynamic8(&map, f32::NAN), 0);
    }

    #[test]
    fn dynamic8_is_nearest_up_to_midpoint_rounding() {
        // Sweep [-1.2, 1.2]: the chosen code must be a nearest one, except when x lies within one f32 ulp
        // of the midpoint between two codes (where the f32-rounded midpoint decides, as on the GPU).
        let map = dynamic_map();
        let n = 200_000;
        for i in 0..=n {
            let x = -1.2f32 + 2.4 * (i as f32 / n as f32);
            let q = quantize_dynamic8(&map, x) as usize;
            let d = |c: usize| (x as f64 - map[c] as f64).abs();
            let best = (0..256).map(d).fold(f64::INFINITY, f64::min);
            if d(q) > best {
                let nearest = (0..256).find(|&c| d(c) == best).unwrap();
                let mid = (map[q] as f64 + map[nearest] as f64) / 2.0;
                let ulp = (x.next_up() - x) as f64;
                assert!(
                    (x as f64 - mid).abs() <= ulp,
                    "x = {x}: code {q} ({}) but {nearest} ({}) is nearer",
                    map[q],
                    map[nearest]
                );
            }
        }
    }

    #[test]
    fn torch_sum_handles_every_small_length() {
        // Exactly representable values: the cascade order cannot change the result, so compare with f64.
        for n in 0..300usize {
            let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.25).collect();
            let exact: f64 = x.iter().map(|&v| v as f64).sum();
            assert_eq!(torch_sum_f32(&x) as f64, exact, "n = {n}");
        }
    }

    #[test]
    fn python_repr_matches_python() {
        let cases: [(f64, &str); 12] = [
            (0.031807661056518555, "0.031807661056518555"),
            (1e-05, "1e-05"),
            (0.0001, "0.0001"),
            (1.5e-7, "1.5e-07"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (2.0, "2.0"),
            (627.4757690429688, "627.4757690429688"),
            (-3.25, "-3.25"),
            (0.0, "0.0"),
            (1.2345e20, "1.2345e+20"),
            (f64::INFINITY, "Infinity"),
        ];
        for (v, want) in cases {
            assert_eq!(python_float_repr(v), want);
        }
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let e = quantize(&[1.0; 10], &[3, 4], false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nf4_quantize") && e.contains("data") && e.contains("12"),
            "{e}"
        );
        let e = quantize(&[], &[0, 4], false).unwrap_err().to_string();
        assert!(e.contains("no elements"), "{e}");
        let e = quantize(&[1.0, f32::NAN], &[2], true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("element 1"), "{e}");
        let e = quantize(&[1.0], &[usize::MAX, 2], true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("overflows"), "{e}");

        let q = quantize(&[0.5f32; 130], &[130], true).unwrap();
        let e = q
            .dequantize_into(usize::MAX, &mut [0.0; 2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nf4_dequantize") && e.contains("range"), "{e}");
        let Absmax::Nested {
            codes,
            nested_absmax,
            offset,
            code8,
        } = &q.absmax
        else {
            panic!("nested expected")
        };
        let ok = Nf4Tensor::from_bnb_parts(
            &[130],
            &q.packed,
            BnbAbsmax::U8(codes),
            &NF4_CODE,
            Some(nested_absmax),
            Some(&code8[..]),
            Some(*offset),
        )
        .unwrap();
        assert_eq!(ok, q);
        let bad = |r: crate::Result<Nf4Tensor>, what: &str| {
            let e = r.unwrap_err().to_string();
            assert!(e.contains(what), "expected `{what}` in: {e}");
        };
        bad(
            Nf4Tensor::from_bnb_parts(
                &[130],
                &q.packed[1..],
                BnbAbsmax::U8(codes),
                &NF4_CODE,
                Some(nested_absmax),
                Some(&code8[..]),
                Some(*offset),
            ),
            "weight (packed)",
        );
        bad(
            Nf4Tensor::from_bnb_parts(
                &[130],
                &q.packed,
                BnbAbsmax::U8(&codes[1..]),
                &NF4_CODE,
                Some(nested_absmax),
                Some(&code8[..]),
                Some(*offset),
            ),
            "weight.absmax",
        );
        let mut fp4 = NF4_CODE;
        fp4[3] = 0.25;
        bad(
            Nf4Tensor::from_bnb_parts(
                &[130],
                &q.packed,
                BnbAbsmax::U8(codes),
                &fp4,
                Some(nested_absmax),
                Some(&code8[..]),
                Some(*offset),
            ),
            "weight.quant_map",
        );
        bad(
            Nf4Tensor::from_bnb_parts(
                &[130],
                &q.packed,
                BnbAbsmax::U8(codes),
                &NF4_CODE[..15],
                Some(nested_absmax),
                Some(&code8[..]),
                Some(*offset),
            ),
            "weight.quant_map",
        );
        bad(
            Nf4Tensor::from_bnb_parts(
                &[130],
                &q.packed,
                BnbAbsmax::U8(codes),
                &NF4_CODE,
                None,
                Some(&code8[..]),
                Some(*offset),
            ),
            "weight.nested_absmax",
        );
        bad(
            Nf4Tensor::from_bnb_parts(
                &[130],
                &q.packed,
                BnbAbsmax::U8(codes),
                &NF4_CODE,
                Some(&[1.0, 2.0]),
                Some(&code8[..]),
                Some(*offset),
            ),
            "weight.nested_absmax",
        );
        bad(
            Nf4Tensor::from_bnb_parts(
                &[130],
                &q.packed,
                BnbAbsmax::U8(codes),
                &NF4_CODE,
                Some(nested_absmax),
                Some(&code8[..255]),
                Some(*offset),
            ),
            "weight.nested_quant_map",
        );
        bad(
            Nf4Tensor::from_bnb_parts(
                &[130],
                &q.packed,
                BnbAbsmax::U8(codes),
                &NF4_CODE,
                Some(nested_absmax),
                Some(&code8[..]),
                None,
            ),
            "nested_offset",
        );
        bad(
            Nf4Tensor::from_bnb_parts(
                &[130],
                &q.packed,
                BnbAbsmax::U8(codes),
                &NF4_CODE,
                Some(nested_absmax),
                Some(&code8[..]),
                Some(f32::NAN),
            ),
            "nested_offset",
        );
        bad(
            Nf4Tensor::from_bnb_parts(
                &[130],
                &q.packed,
                BnbAbsmax::F32(&[1.0; 3]),
                &NF4_CODE,
                Some(nested_absmax),
                None,
                None,
            ),
            "nested parts given",
        );
        bad(
            Nf4Tensor::from_bnb_parts(
                &[130],
                &q.packed,
                BnbAbsmax::F32(&[1.0; 2]),
                &NF4_CODE,
                None,
                None,
                None,
            ),
            "weight.absmax",
        );
        bad(
            Nf4Tensor::from_bnb_parts(&[0], &[], BnbAbsmax::F32(&[]), &NF4_CODE, None, None, None),
            "no elements",
        );
    }
}
