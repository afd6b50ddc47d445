//! Accuracy and special values of the CPU backend's vectorized exp / tanh / GELU (`cpu::fastmath`),
//! against f64 `exp` / `tanh`, in ulps of the f32 result; and bit-identity across SIMD levels.
//!
//! The sweeps cover ±2^k·(1 + j/1024) for every binade k of f32 (subnormals included) and j < 1024,
//! plus 100 000 random bit patterns, plus the special values. The exhaustive check over all 2³² inputs
//! (the bounds quoted in fastmath.rs) takes about a minute, so it is an example, not a test:
//!
//!     cargo run --release -p afinar-kernels --example fastmath_exhaustive

use afinar_kernels::cpu::fastmath::{self, Simd};
use afinar_kernels::Tolerance;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::ulp::{ulp_err, EXP_ULP, TANH_ULP};

/// ±2^k·(1 + j/1024) over every binade (k = −149 gives the subnormals' scale) and the random bit
/// patterns (NaNs included).
fn sweep() -> Vec<f32> {
    let mut v = Vec::with_capacity(2 * 277 * 1024 + 100_000);
    for k in -149..=127 {
        for j in 0..1024 {
            let x = 2f64.powi(k) * (1.0 + f64::from(j) / 1024.0);
            let x = x as f32;
            v.push(x);
            v.push(-x);
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    v.extend((0..100_000).map(|_| f32::from_bits(rng.random())));
    v
}

const SPECIAL: [f32; 12] = [
    0.0,
    -0.0,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::NAN,
    f32::MAX,
    f32::MIN,
    f32::MIN_POSITIVE,
    1e-45,
    -1e-45,
    1.0,
    -1.0,
];

/// Runs `f` on every input both per element (scalar call) and through `slice` (the dispatched SIMD
/// loop), checks the two agree bit for bit, and returns (worst ulp error, its input).
fn worst(
    xs: &[f32],
    f: fn(f32) -> f32,
    slice: fn(&mut [f32]),
    exact: fn(f64) -> f64,
) -> (f64, f32) {
    let mut ys = xs.to_vec();
    slice(&mut ys);
    let mut w = (0.0f64, 0.0f32);
    for (&x, &y) in xs.iter().zip(&ys) {
        let s = f(x);
        assert!(
            s.to_bits() == y.to_bits() || (s.is_nan() && y.is_nan()),
            "x = {x:e}: scalar {s:e} and slice {y:e} differ"
        );
        let e = ulp_err(y, exact(f64::from(x)));
        if e > w.0 || e.is_nan() {
            w = (e, x);
        }
    }
    w
}

#[test]
fn exp_ulp_bound() {
    let mut xs = sweep();
    xs.extend_from_slice(&SPECIAL);
    // The overflow / underflow edges, densely.
    for base in [88.722_84f32, -87.336_55, -103.972_08, -103.278_93] {
        let b = base.to_bits();
        xs.extend((0..2000u32).map(|i| f32::from_bits(b - 1000 + i)));
    }
    let (e, x) = worst(&xs, fastmath::exp, fastmath::exp_slice, f64::exp);
    assert!(e <= EXP_ULP, "exp: {e} ulp at x = {x:e} (bound {EXP_ULP})");
}

#[test]
fn exp_special_values() {
    let e = fastmath::exp;
    assert_eq!(e(0.0), 1.0);
    assert_eq!(e(-0.0), 1.0);
    assert_eq!(e(f32::NEG_INFINITY).to_bits(), 0.0f32.to_bits());
    assert_eq!(e(f32::INFINITY), f32::INFINITY);
    assert!(e(f32::NAN).is_nan());
    assert_eq!(e(1000.0), f32::INFINITY);
    assert_eq!(e(f32::MAX), f32::INFINITY);
    assert_eq!(e(-1000.0), 0.0);
    assert_eq!(e(f32::MIN), 0.0);
    // The largest finite result and the first overflow, where the exact value rounds to them.
    assert_eq!(e(88.722_83), f64::from(88.722_83f32).exp() as f32);
    assert!(e(88.722_83).is_finite());
    assert_eq!(e(88.722_84), f32::INFINITY);
    // Subnormal results are correctly rounded here (exact value well inside a subnormal step).
    for x in [-90.0f32, -95.5, -100.0, -103.0] {
        assert!(ulp_err(e(x), f64::from(x).exp()) <= 0.5 + 1e-9, "exp({x})");
    }
    // exp(x − max) of a softmax row: the maximum itself gives exactly 1.
    assert_eq!(e(3.5 - 3.5), 1.0);
}

#[test]
fn tanh_ulp_bound() {
    let mut xs = sweep();
    xs.extend_from_slice(&SPECIAL);
    // Around the branch point 0.625 and the saturation point 9.0109, densely.
    for base in [0.625f32, -0.625, 9.010_913, -9.010_913] {
        let b = base.to_bits();
        xs.extend((0..4000u32).map(|i| f32::from_bits(b - 2000 + i)));
    }
    let (e, x) = worst(&xs, fastmath::tanh, fastmath::tanh_slice, f64::tanh);
    assert!(
        e <= TANH_ULP,
        "tanh: {e} ulp at x = {x:e} (bound {TANH_ULP})"
    );
}

#[test]
fn tanh_special_values_and_symmetry() {
    let t = fastmath::tanh;
    assert_eq!(t(0.0).to_bits(), 0.0f32.to_bits());
    assert_eq!(t(-0.0).to_bits(), (-0.0f32).to_bits());
    assert_eq!(t(f32::INFINITY), 1.0);
    assert_eq!(t(f32::NEG_INFINITY), -1.0);
    assert!(t(f32::NAN).is_nan());
    // Saturation: exactly ±1 from where the exact value rounds to 1 (1 − 2⁻²⁵ is the midpoint).
    let sat = (1.0f64 - 2f64.powi(-25)).atanh() as f32;
    let first_one = f32::from_bits(sat.to_bits() + 1);
    for x in [first_one, 9.1, 10.0, 10.5, 20.0, 1e4, f32::MAX] {
        assert_eq!(t(x), 1.0, "tanh({x})");
        assert_eq!(t(-x), -1.0, "tanh({})", -x);
    }
    assert!(t(8.5) < 1.0);
    // Tiny x: tanh(x) = x exactly below 2⁻¹² (x³/3 is under half an ulp of x).
    for x in [1e-45f32, 1e-38, 1e-20, 1e-8, 2.4e-4] {
        assert_eq!(t(x), x);
        assert_eq!(t(-x), -x);
    }
    // Exactly odd, bit for bit, over the whole sweep.
    for x in sweep() {
        let (p, n) = (t(x), t(-x));
        assert!(
            (p.is_nan() && n.is_nan()) || p.to_bits() == (-n).to_bits(),
            "tanh(−x) ≠ −tanh(x) at x = {x:e}"
        );
        assert!(p.is_nan() || p.abs() <= 1.0);
    }
}

/// gelu_tanh in f64 as x·σ(2u): 0.5·x·(1 + tanh u) cancels even in f64 for x ≪ 0 (1 + tanh(−14) has
/// a relative error of ~1e−4 there), so the reference uses the sigmoid form of the same function.
fn gelu64(x: f64) -> f64 {
    let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
    x / (1.0 + (-2.0 * u).exp())
}

/// d gelu/dx = s + 2·x·s·(1 − s)·√(2/π)·(1 + 3·0.044715·x²), s = σ(2u), 1 − s = e^(−2u)·s.
fn gelu_grad64(x: f64) -> f64 {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let e = (-2.0 * k * (x + 0.044715 * x * x * x)).exp();
    let s = 1.0 / (1.0 + e);
    let oms = if e.is_finite() { e * s } else { 1.0 };
    s + 2.0 * x * s * oms * k * (1.0 + 3.0 * 0.044715 * x * x)
}

/// GELU(x) and its slope against f64. The f32 computation of u = √(2/π)(x + 0.044715x³) (rounded
/// constants, x³, two products, a sum: the same expression HF evaluates) carries a relative error of
/// up to ≈ 4·2⁻²³, which the result inherits scaled by |d ln gelu/d ln u| ≤ 1 + 2|u|, and one such
/// relative step is up to 2 ulp of the result; on top of that exp and the division add ≤ 3 ulp. So the
/// bound is 3 + 8·(1 + 2|u|) ulp: a few ulp near 0, larger in the far negative tail where gelu ≈ x·e^(2u)
/// is ill-conditioned in u (there 0.5·x·(1 + tanh u) in f32 would cancel to 0 outright).
#[test]
fn gelu_tanh_bound() {
    let mut xs: Vec<f32> = sweep()
        .into_iter()
        .filter(|x| x.is_finite() && x.abs() < 1e6)
        .collect();
    xs.extend((-20_000..=20_000).map(|i| i as f32 * 1e-3));
    let mut worst = (0.0f64, 0.0f32);
    for &x in &xs {
        let x64 = f64::from(x);
        let u = (2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64 * x64 * x64);
        let bound = 3.0 + 8.0 * (1.0 + 2.0 * u.abs());
        let (g, dg) = fastmath::gelu_tanh_grad(x);
        assert_eq!(g.to_bits(), fastmath::gelu_tanh(x).to_bits(), "x = {x:e}");
        let want = gelu64(x64);
        let e = ulp_err(g, want);
        // Far in the negative tail gelu underflows; there only the absolute error matters.
        if want.abs() > 1e-30 && e > bound {
            panic!("gelu_tanh({x:e}) = {g:e}, f64 {want:e}: {e} ulp > {bound}");
        }
        if want.abs() <= 1e-30 {
            assert!(f64::from(g).abs() <= 2e-30, "gelu_tanh({x:e}) = {g:e}");
        }
        if want.abs() > 1e-30 && e / bound > worst.0 {
            worst = (e / bound, x);
        }
        // The slope: |d gelu'/d u| is bounded, so an absolute + relative check is the right shape.
        let dw = gelu_grad64(x64);
        Tolerance::new(4e-7, 4e-6 * (1.0 + 2.0 * u.abs())).assert_close(
            &format!("gelu_tanh'({x:e})"),
            [f64::from(dg)],
            [dw],
        );
    }
    // Exact limits.
    assert_eq!(fastmath::gelu_tanh(1e4), 1e4);
    assert_eq!(fastmath::gelu_tanh(-1e4), 0.0);
    assert_eq!(fastmath::gelu_tanh_grad(1e4).1, 1.0);
    assert_eq!(fastmath::gelu_tanh_grad(-1e4).1, 0.0);
    assert_eq!(fastmath::gelu_tanh(0.0), 0.0);
    assert_eq!(fastmath::gelu_tanh_grad(0.0).1, 0.5);
    assert!(fastmath::gelu_tanh(f32::NAN).is_nan());
    assert!(worst.0 <= 1.0, "{worst:?}");
    eprintln!(
        "gelu_tanh: worst error / bound = {:.3} at x = {:e}",
        worst.0, worst.1
    );
}

/// Every SIMD level the CPU has gives the same bits as the portable build, for the elementwise
/// functions and the reductions, at lengths around the lane width (and the scalar calls agree too).
#[test]
fn simd_levels_bit_identical() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut xs: Vec<f32> = (0..4099)
        .map(|_| rng.random_range(-120.0f32..120.0))
        .collect();
    xs.extend_from_slice(&SPECIAL);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let run = |level: Simd| {
        let mut e = xs.clone();
        fastmath::exp_slice_at(level, &mut e);
        let mut t = xs.clone();
        fastmath::tanh_slice_at(level, &mut t);
        let (mut g, mut dg) = (vec![0.0; xs.len()], vec![0.0; xs.len()]);
        fastmath::gelu_tanh_grad_slice_at(level, &xs, &mut g, &mut dg);
        let mut red = Vec::new();
        for n in [0usize, 1, 7, 15, 16, 17, 31, 33, 100, 4099] {
            let row = &xs[..n];
            let m = fastmath::max_at(level, row);
            let mut w = row.to_vec();
            red.push(m);
            red.push(fastmath::sum_exp_shift_at(level, row, m));
            red.push(fastmath::exp_shift_sum_at(level, &mut w, m));
            red.extend(w);
        }
        [bits(&e), bits(&t), bits(&g), bits(&dg), bits(&red)]
    };
    let base = run(Simd::Portable);
    let scalar = |f: fn(f32) -> f32| bits(&xs.iter().map(|&x| f(x)).collect::<Vec<_>>());
    assert_eq!(base[0], scalar(fastmath::exp), "exp slice vs scalar");
    assert_eq!(base[1], scalar(fastmath::tanh), "tanh slice vs scalar");
    assert_eq!(base[2], scalar(fastmath::gelu_tanh), "gelu slice vs scalar");
    for level in [Simd::Avx2, Simd::Avx512] {
        let r = run(level);
        for (k, name) in ["exp", "tanh", "gelu", "gelu'", "reductions"]
            .iter()
            .enumerate()
        {
            assert_eq!(r[k], base[k], "{name} at {level:?} vs portable");
        }
    }
    eprintln!("detected SIMD level: {:?}", fastmath::detected());
}

/// The reductions against f64: max equals the NaN-ignoring fold; the shifted exp-sum is within a
/// sum's rounding of the f64 value.
#[test]
fn reductions() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for n in [0usize, 1, 5, 16, 17, 64, 333, 2048] {
        let mut row: Vec<f32> = (0..n).map(|_| rng.random_range(-30.0f32..30.0)).collect();
        if n > 3 {
            row[2] = f32::NEG_INFINITY; // a masked score
        }
        let m = fastmath::max(&row);
        assert_eq!(
            m,
            row.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            "n = {n}"
        );
        let want: f64 = row
            .iter()
            .map(|&x| (f64::from(x) - f64::from(m)).exp())
            .sum();
        let s = fastmath::sum_exp_shift(&row, m);
        Tolerance::new(0.0, 1e-6).assert_close("Σ exp(x − max)", [f64::from(s)], [want]);
        let mut w = row.clone();
        let s2 = fastmath::exp_shift_sum(&mut w, m);
        assert_eq!(
            s.to_bits(),
            s2.to_bits(),
            "the two exp-sums accumulate in the same order"
        );
        for (&x, &e) in row.iter().zip(&w) {
            assert_eq!(e.to_bits(), fastmath::exp(x - m).to_bits());
        }
        if n > 3 {
            assert_eq!(w[2], 0.0, "exp(−∞ − max) = 0");
        }
    }
    // NaNs are ignored by max, as by f32::max.
    assert_eq!(fastmath::max(&[f32::NAN, 1.0, f32::NAN, -2.0]), 1.0);
    assert_eq!(fastmath::max(&[]), f32::NEG_INFINITY);
}
