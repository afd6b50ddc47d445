//! Vectorizable f32 `exp`, `tanh` and the fused pieces built on them (GELU-tanh, shifted exp-sums),
//! for the CPU backend's transcendental-bound ops (soft-caps, GeGLU, attention softmax, cross-entropy).
//!
//! Every function here is branch-free straight-line f32/u32 arithmetic (comparisons become selects),
//! so a loop over a slice auto-vectorizes. The workspace builds for baseline x86-64 (SSE2), so the hot
//! loops are defined with `simd_fn!`, which compiles them also for AVX-512 and AVX2
//! (`#[target_feature]`) and picks one at run time (CPUID, cached); elsewhere (or on another
//! architecture) the baseline copy runs.
//!
//! **Every SIMD level gives bit-identical results.** The code uses only IEEE-754 add, sub, mul, div,
//! compares and integer bit operations — no `mul_add`, and Rust never contracts a·b + c into an FMA —
//! so the AVX-512, AVX2, SSE2 and scalar code round identically (tested in tests/it/ops_fastmath.rs).
//! Reductions ([`max`], [`exp_shift_sum`], [`sum_exp_shift`]) use [`LANES`] independent accumulators
//! combined in a fixed tree, so a result depends only on the slice, never on the thread count or SIMD
//! level.
//!
//! Accuracy (ulp = spacing of f32 at the exact result, subnormal ulp = 2⁻¹⁴⁹; measured against f64
//! `exp`/`tanh` over EVERY f32 input by the ignored test `exhaustive_ulp` in tests/it/ops_fastmath.rs,
//! bounds asserted on a sweep by the normal tests):
//! - [`exp`]: ≤ 1 ulp over all of f32 (max measured 0.990 ulp, at x = 70.4031; the final rounding
//!   alone is 0.5 ulp). exp(−∞) = 0, exp(+∞) = +∞, exp(NaN) = NaN, exp(x) = +∞ for x ≥ 88.7228394
//!   (exactly where the correctly rounded result overflows), 0 below −103.9721 and correctly rounded subnormals
//!   between; exp(±0) = 1 exactly.
//! - [`tanh`]: ≤ 2 ulp over all of f32 (max measured 1.330 ulp, at |x| = 0.62831, just above the
//!   switch from the polynomial to the exp form). Odd by construction
//!   (tanh(−x) = −tanh(x) bit for bit, tanh(±0) = ±0), tanh(x) = x exactly for |x| < 2⁻¹², ±1 exactly for
//!   |x| ≥ 9.0109 (where the exact value rounds to ±1), tanh(±∞) = ±1, tanh(NaN) = NaN.
//! - [`gelu_tanh`]: x·σ(2u) with u = √(2/π)·(x + 0.044715·x³), algebraically the same function as
//!   HF's 0.5·x·(1 + tanh u) but without the cancellation of 1 + tanh u for x ≪ 0; the error is that
//!   of computing u in f32 (which libm-based code shares), amplified by 1 + 2|u|, plus ≤ 3 ulp: bound
//!   3 + 8·(1 + 2|u|) ulp (asserted in the tests; the worst case measured is 0.28 of it).
//!
//! Method. exp: n = round(x·log₂e) (the 1.5·2²³ rounding trick, no float→int conversion), Cody–Waite
//! r = x − n·ln2_hi − n·ln2_lo with |r| ≤ ½ln2, exp(r) = 1 + (r + r²·P(r)) with Cephes' degree-5
//! minimax P, then ·2^⌊n/2⌋·2^(n−⌊n/2⌋) (two exact power-of-two scalings so the subnormal range rounds
//! once and overflow happens naturally); x is clamped to [−104, 89] first (beyond which the result is
//! 0 or +∞ anyway), which also keeps n in range. tanh: for |x| < 0.625 Cephes' odd polynomial
//! x + x³·Q(x²), above it 1 − 2/(exp(2|x|) + 1) (|x| clamped to 10, where it is 1 to f32 precision),
//! the sign copied back from x.

use std::sync::atomic::{AtomicU8, Ordering};

/// Accumulator lanes of the reductions (a multiple of every SIMD width used: 16 f32 = one zmm).
pub const LANES: usize = 16;

// ---- exp ----

/// exp(89) > f32::MAX: every x above overflows to +∞, and clamping to it keeps n ≤ 129.
const EXP_HI: f32 = 89.0;
/// exp(−104) < 2⁻¹⁵⁰ (half the smallest subnormal): every x below gives 0; keeps n ≥ −151.
const EXP_LO: f32 = -104.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 = LN2_HI + LN2_LO; LN2_HI has 9 significant bits so n·LN2_HI is exact for |n| < 2¹⁵.
const LN2_HI: f32 = 0.693_359_4; // = 0.693359375 exactly
const LN2_LO: f32 = -0.000_212_194_44;
/// 1.5·2²³: adding it rounds a float with |v| < 2²² to an integer (round-to-nearest-even), whose value
/// is then the low bits of the sum.
const ROUND: f32 = 12_582_912.0;
// Cephes expf: exp(r) ≈ 1 + r + r²·(P0 + P1·r + … + P5·r⁵) on |r| ≤ ½ln2.
const P0: f32 = 0.5;
const P1: f32 = 0.166_666_66;
const P2: f32 = 0.041_665_796;
const P3: f32 = 0.008_333_452;
const P4: f32 = 0.001_398_199_9;
const P5: f32 = 0.000_198_756_91;

/// exp(x) for x in [EXP_LO, EXP_HI] (or NaN, which propagates).
#[inline(always)]
fn exp_in_range(x: f32) -> f32 {
    let k = x * LOG2E + ROUND;
    let n = k - ROUND; // exact: round(x·log₂e) as f32
                       // The integer n from the low mantissa bits of k (wrapping: NaN gives garbage bits, and the NaN of
                       // r below still wins).
    let ni = (k.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = ((((P5 * r + P4) * r + P3) * r + P2) * r + P1) * r + P0;
    let y = (p * r2 + r) + 1.0;
    // 2ⁿ = 2^n1 · 2^n2, both normal for n in [−151, 129]; y·2^n1 is exact, ·2^n2 rounds once.
    let n1 = ni >> 1;
    let n2 = ni.wrapping_sub(n1);
    let s1 = f32::from_bits((n1.wrapping_add(127) as u32).wrapping_shl(23));
    let s2 = f32::from_bits((n2.wrapping_add(127) as u32).wrapping_shl(23));
    y * s1 * s2
}

/// eˣ in f32, ≤ 1 ulp everywhere (see the module docs for the special values).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Written as compares (not f32::max/min) so NaN passes through and the clamp is one min/max op.
    let x = if x > EXP_HI { EXP_HI } else { x };
    let x = if x < EXP_LO { EXP_LO } else { x };
    exp_in_range(x)
}

// ---- tanh ----

/// Below it the odd polynomial, above it the exp form.
const TANH_SMALL: f32 = 0.625;
/// tanh(10) = 1 − 4.1e−9 rounds to 1; clamping keeps exp(2|x|) finite.
const TANH_CLAMP: f32 = 10.0;
// Cephes tanhf: tanh(x) ≈ x + x³·(Q0 + Q1·x² + … + Q4·x⁸) on |x| < 0.625.
const Q0: f32 = -0.333_332_8;
const Q1: f32 = 0.133_314_42;
const Q2: f32 = -0.053_739_715;
const Q3: f32 = 0.020_639_088;
const Q4: f32 = -0.005_704_988_7;

const SIGN: u32 = 0x8000_0000;

/// tanh(x) in f32, ≤ 2 ulp everywhere, exactly odd (see the module docs for the special values).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = f32::from_bits(x.to_bits() & !SIGN);
    let z = a * a;
    let small = (((Q4 * z + Q3) * z + Q2) * z + Q1) * z + Q0;
    let small = small * z * a + a;
    let ac = if a > TANH_CLAMP { TANH_CLAMP } else { a }; // NaN stays NaN
    let e = exp_in_range(2.0 * ac); // 2·ac in [0, 20]
    let large = 1.0 - 2.0 / (e + 1.0);
    // NaN fails the compare and takes the exp form, which is NaN.
    let t = if a < TANH_SMALL { small } else { large };
    f32::from_bits(t.to_bits() | (x.to_bits() & SIGN))
}

// ---- GELU (tanh approximation) ----

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_COEF: f32 = 0.044_715;

/// The tanh argument u = √(2/π)·(x + 0.044715·x³) of gelu_tanh (the same f32 expression as HF).
#[inline(always)]
fn gelu_u(x: f32) -> f32 {
    SQRT_2_OVER_PI * (x + GELU_COEF * x * x * x)
}

/// gelu_tanh(x) = 0.5·x·(1 + tanh u) = x·σ(2u) = x / (1 + e^(−2u)).
///
/// One exp and one division; exact limits: x for x ≫ 0 (e^(−2u) = 0), −0 for x ≪ 0 (e^(−2u) = +∞).
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    x / (1.0 + exp(-2.0 * gelu_u(x)))
}

/// (gelu_tanh(x), d gelu_tanh/dx) with the same forward value as [`gelu_tanh`].
///
/// With s = σ(2u) = 1/(1 + e), e = e^(−2u): 0.5·(1 + tanh u) = s and 1 − tanh²u = 4·s·(1 − s), so
/// d/dx = s + 2·x·s·(1 − s)·√(2/π)·(1 + 3·0.044715·x²). 1 − s is taken as e·s while e < 1 (s > ½, where
/// 1 − s would cancel) and as 1 − s otherwise (exact enough, and finite when e = +∞).
#[inline(always)]
pub fn gelu_tanh_grad(x: f32) -> (f32, f32) {
    let e = exp(-2.0 * gelu_u(x));
    let d = 1.0 + e;
    let g = x / d;
    let s = 1.0 / d;
    let oms = if e < 1.0 { e * s } else { 1.0 - s };
    let k = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_COEF * x * x);
    let dg = s + 2.0 * x * s * oms * k;
    (g, dg)
}

// ---- SIMD dispatch ----

/// The instruction-set level the vectorized loops are compiled for. Results do not depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    /// The build's baseline target (SSE2 on x86-64).
    Portable,
    /// AVX2 + FMA (FMA is enabled for the target but never used: no contraction in Rust).
    Avx2,
    /// AVX-512 F/BW/DQ/VL.
    Avx512,
}

/// 0 = not yet detected, else 1 + the `Simd` level.
static DETECTED: AtomicU8 = AtomicU8::new(0);

/// The best level this CPU supports (CPUID once, then one relaxed load).
#[inline]
pub fn detected() -> Simd {
    match DETECTED.load(Ordering::Relaxed) {
        1 => Simd::Portable,
        2 => Simd::Avx2,
        3 => Simd::Avx512,
        _ => {
            let level = detect();
            DETECTED.store(level as u8 + 1, Ordering::Relaxed);
            level
        }
    }
}

fn detect() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            return Simd::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Simd::Avx2;
        }
    }
    Simd::Portable
}

/// `min(level, detected())`: a requested level is only ever lowered, so dispatching on the result is
/// sound whatever the caller asked for.
#[inline]
pub fn supported(level: Simd) -> Simd {
    level.min(detected())
}

/// Defines `fn name(level: Simd, args…) -> R { body }` compiled three times — for AVX-512, for AVX2
/// and for the baseline target — and dispatching at run time on `supported(level)`. The body is an
/// `#[inline(always)]` nested function, so it is inlined into each `#[target_feature]` copy and LLVM
/// vectorizes its loops with that instruction set. Write the loops as plain `for` loops over slices
/// and call only `#[inline(always)]` helpers (this module's functions): a closure or an ordinary
/// function called from the body may stay out of line and run at the baseline level.
macro_rules! simd_fn {
    (
        $(#[$m:meta])*
        $vis:vis fn $name:ident($level:ident: Simd $(, $arg:ident: $ty:ty)* $(,)?) $(-> $ret:ty)?
        $body:block
    ) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($level: $crate::cpu::fastmath::Simd $(, $arg: $ty)*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            match $crate::cpu::fastmath::supported($level) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `supported` never returns a level above `detected()`, which checked (CPUID)
                // that this CPU has avx512f/bw/dq/vl (hence avx2 and fma), the features of `avx512`.
                $crate::cpu::fastmath::Simd::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above; the CPU has avx2 and fma, the features of `avx2`.
                $crate::cpu::fastmath::Simd::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}
pub(crate) use simd_fn;

// ---- slice kernels ----

/// Sums LANES accumulators in a fixed tree order.
#[inline(always)]
pub(crate) fn lane_sum(a: [f32; LANES]) -> f32 {
    let mut w = a;
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for l in 0..n {
            w[l] += w[l + n];
        }
    }
    w[0]
}

/// max over x, NaNs ignored (as `fold(−∞, f32::max)`); −∞ for an empty slice.
#[inline(always)]
pub fn max_body(x: &[f32]) -> f32 {
    #[inline(always)]
    fn step(acc: &mut [f32; LANES], c: &[f32; LANES]) {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        step(&mut acc, c.try_into().expect("chunks_exact gives LANES"));
    }
    // The tail, padded with −∞ (which never wins), as one more full chunk.
    let mut pad = [f32::NEG_INFINITY; LANES];
    pad[..rem.len()].copy_from_slice(rem);
    step(&mut acc, &pad);
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for l in 0..n {
            acc[l] = if acc[l + n] > acc[l] {
                acc[l + n]
            } else {
                acc[l]
            };
        }
    }
    acc[0]
}

/// x ← e^(x − shift) elementwise; returns Σ of the new x (LANES-way accumulation, fixed order).
#[inline(always)]
pub fn exp_shift_sum_body(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let e = exp(c[l] - shift);
            c[l] = e;
            acc[l] += e;
        }
    }
    for (l, v) in chunks.into_remainder().iter_mut().enumerate() {
        let e = exp(*v - shift);
        *v = e;
        acc[l] += e;
    }
    lane_sum(acc)
}

/// Σ e^(x − shift) without writing (same accumulation order as [`exp_shift_sum_body`]).
#[inline(always)]
pub fn sum_exp_shift_body(x: &[f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += exp(c[l] - shift);
        }
    }
    for (l, &v) in rem.iter().enumerate() {
        acc[l] += exp(v - shift);
    }
    lane_sum(acc)
}

simd_fn! {
    /// x ← eˣ elementwise, at SIMD level `level` (lowered to what the CPU has).
    pub fn exp_slice_at(level: Simd, x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = exp(*v);
        }
    }
}

simd_fn! {
    /// x ← tanh(x) elementwise, at SIMD level `level`.
    pub fn tanh_slice_at(level: Simd, x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = tanh(*v);
        }
    }
}

simd_fn! {
    /// g ← gelu_tanh(x), dg ← gelu_tanh'(x) (slices of one length), at SIMD level `level`.
    pub fn gelu_tanh_grad_slice_at(level: Simd, x: &[f32], g: &mut [f32], dg: &mut [f32]) {
        for ((&x, g), dg) in x.iter().zip(g.iter_mut()).zip(dg.iter_mut()) {
            let (a, da) = gelu_tanh_grad(x);
            *g = a;
            *dg = da;
        }
    }
}

simd_fn! {
    /// max over x, NaNs ignored; −∞ for an empty slice. At SIMD level `level`.
    pub fn max_at(level: Simd, x: &[f32]) -> f32 {
        max_body(x)
    }
}

simd_fn! {
    /// x ← e^(x − shift); returns Σ of the new x. At SIMD level `level`.
    pub fn exp_shift_sum_at(level: Simd, x: &mut [f32], shift: f32) -> f32 {
        exp_shift_sum_body(x, shift)
    }
}

simd_fn! {
    /// Σ e^(x − shift) (same accumulation order as `exp_shift_sum_at`). At SIMD level `level`.
    pub fn sum_exp_shift_at(level: Simd, x: &[f32], shift: f32) -> f32 {
        sum_exp_shift_body(x, shift)
    }
}

/// x ← eˣ elementwise (best SIMD level).
pub fn exp_slice(x: &mut [f32]) {
    exp_slice_at(Simd::Avx512, x)
}

/// x ← tanh(x) elementwise (best SIMD level).
pub fn tanh_slice(x: &mut [f32]) {
    tanh_slice_at(Simd::Avx512, x)
}

/// max over x, NaNs ignored (as `fold(−∞, f32::max)`); −∞ for an empty slice.
pub fn max(x: &[f32]) -> f32 {
    max_at(Simd::Avx512, x)
}

/// x ← e^(x − shift); returns Σ of the new x.
pub fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 {
    exp_shift_sum_at(Simd::Avx512, x, shift)
}

/// Σ e^(x − shift).
pub fn sum_exp_shift(x: &[f32], shift: f32) -> f32 {
    sum_exp_shift_at(Simd::Avx512, x, shift)
}
