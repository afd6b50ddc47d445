//! `copy_range` (device-side sub-range copy) and `dropout_mask` (counter-based dropout masks): exact
//! reference values, statistics of the masks, and typed errors for bad offsets and probabilities.

use crate::common::*;
use afinar_kernels::cpu::dropout::{element_bits, keep_value, mask_key, threshold};
use afinar_kernels::{Backend, KernelError, Storage, Tolerance};

backend_tests! {
    copy_range_copies_exactly_the_range => check_copy_range,
    copy_range_bad_ranges_are_typed_errors => check_copy_range_errors,
    dropout_mask_is_the_counter_hash => check_dropout_bits,
    dropout_mask_rate_and_streams => check_dropout_statistics,
    dropout_mask_bad_p_is_a_typed_error => check_dropout_errors,
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn check_copy_range<B: Backend>(b: &B, _tol: Tolerance) {
    let mut g = rng(31);
    let src = uniform(&mut g, 300, 2.0);
    let sb = up(b, &src);
    // (src_off, dst_off, n) over a 257-element destination: interior, both ends, whole, empty at the
    // very end (offset = len is a valid empty range), one element.
    for (so, dof, n) in [
        (3, 5, 11),
        (0, 0, 257),
        (43, 0, 257),
        (299, 256, 1),
        (300, 257, 0),
        (120, 200, 57),
    ] {
        let before: Vec<f32> = (0..257).map(|i| -1000.0 - i as f32).collect();
        let mut db = up(b, &before);
        b.copy_range(&sb, so, &mut db, dof, n).unwrap();
        let mut want = before.clone();
        want[dof..dof + n].copy_from_slice(&src[so..so + n]);
        assert_eq!(
            bits(&down(b, &db)),
            bits(&want),
            "src_off {so}, dst_off {dof}, n {n}"
        );
    }
    // Appending rows as the KV cache does: [old rows] ++ [new rows] built by two copies, then a
    // window's tail copied out again.
    let (old, new) = (uniform(&mut g, 12, 1.0), uniform(&mut g, 8, 1.0));
    let mut cat = b.zeros(20).unwrap();
    b.copy_range(&up(b, &old), 0, &mut cat, 0, 12).unwrap();
    b.copy_range(&up(b, &new), 0, &mut cat, 12, 8).unwrap();
    let mut tail = b.zeros(6).unwrap();
    b.copy_range(&cat, 14, &mut tail, 0, 6).unwrap();
    let want: Vec<f32> = old.iter().chain(&new).copied().collect();
    assert_eq!(bits(&down(b, &cat)), bits(&want));
    assert_eq!(bits(&down(b, &tail)), bits(&want[14..]));
    // Master (f32) destination from an activation source: the values survive (f32 activations here).
    let mut m = b.zeros_for(5, Storage::Master).unwrap();
    b.copy_range(&sb, 7, &mut m, 0, 5).unwrap();
    Tolerance::F32.assert_close("master copy", down(b, &m), src[7..12].iter().copied());
}

#[track_caller]
fn expect_invalid(r: Result<(), KernelError>, op: &str, arg: &str) {
    match r {
        Err(e @ KernelError::Invalid { .. }) => {
            let KernelError::Invalid { op: o, arg: a, .. } = &e else {
                unreachable!()
            };
            assert_eq!((*o, *a), (op, arg), "{e}");
            let msg = e.to_string();
            assert!(msg.contains(op) && msg.contains(arg), "{msg}");
        }
        other => panic!("expected an Invalid error for {op}/{arg}, got {other:?}"),
    }
}

fn check_copy_range_errors<B: Backend>(b: &B, _tol: Tolerance) {
    let src = up(b, &[1.0, 2.0, 3.0, 4.0]);
    let mut dst = up(b, &[9.0; 3]);
    expect_invalid(
        b.copy_range(&src, 2, &mut dst, 0, 3),
        "copy_range",
        "src_off",
    );
    expect_invalid(
        b.copy_range(&src, 5, &mut dst, 0, 0),
        "copy_range",
        "src_off",
    );
    expect_invalid(
        b.copy_range(&src, 0, &mut dst, 1, 3),
        "copy_range",
        "dst_off",
    );
    expect_invalid(
        b.copy_range(&src, 0, &mut dst, 4, 0),
        "copy_range",
        "dst_off",
    );
    // Offsets whose sum with n overflows usize are errors, not wrap-arounds or panics.
    expect_invalid(
        b.copy_range(&src, usize::MAX, &mut dst, 0, 2),
        "copy_range",
        "src_off",
    );
    expect_invalid(
        b.copy_range(&src, 0, &mut dst, usize::MAX - 1, 3),
        "copy_range",
        "dst_off",
    );
    // A refused copy writes nothing.
    assert_eq!(down(b, &dst), vec![9.0; 3]);
}

/// The mask is exactly the documented integer formula, element by element, for several lengths
/// (ragged against any block size), and a shorter mask is a prefix of a longer one.
fn check_dropout_bits<B: Backend>(b: &B, _tol: Tolerance) {
    for (n, p, seed, stream) in [
        (1000usize, 0.1f64, 42u64, 7u64),
        (4099, 0.5, 0, 0),
        (257, 0.93, u64::MAX, 12345),
        (300, 0.0, 5, 6),
    ] {
        let mut m = b.zeros_for(n, Storage::Master).unwrap();
        b.fill(&mut m, f32::NAN).unwrap();
        b.dropout_mask(&mut m, p, seed, stream).unwrap();
        let (key, thr, keep) = (mask_key(seed, stream), threshold(p), keep_value(p));
        let want: Vec<f32> = (0..n as u64)
            .map(|i| {
                if element_bits(key, i) < thr {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        let got = down(b, &m);
        assert_eq!(bits(&got), bits(&want), "n {n}, p {p}");
        // The CPU reference function gives the same bits (what the CUDA kernel must match).
        let mut host = vec![0.0f32; n];
        afinar_kernels::cpu::dropout::dropout_mask(&mut host, p, seed, stream).unwrap();
        assert_eq!(bits(&got), bits(&host), "n {n}, p {p}: backend vs CPU");
        let mut short = b.zeros_for(n / 3, Storage::Master).unwrap();
        b.dropout_mask(&mut short, p, seed, stream).unwrap();
        assert_eq!(bits(&down(b, &short)), bits(&want[..n / 3]), "prefix");
    }
    // The known answer shared with kernels/emu/check_dropout.cpp: 87 zeros among 1000 at p = 0.1.
    let mut m = b.zeros_for(1000, Storage::Master).unwrap();
    b.dropout_mask(&mut m, 0.1, 42, 7).unwrap();
    assert_eq!(down(b, &m).iter().filter(|&&x| x == 0.0).count(), 87);
    // An empty mask is fine.
    let mut e = b.zeros_for(0, Storage::Master).unwrap();
    b.dropout_mask(&mut e, 0.3, 1, 2).unwrap();
}

/// |x − E| ≤ 5σ for a binomial count (a 6·10⁻⁷ two-sided chance for a correct generator; the masks
/// are deterministic, so this either always passes or always fails).
#[track_caller]
fn assert_binomial(what: &str, count: usize, n: usize, q: f64) {
    let (mean, sd) = (n as f64 * q, (n as f64 * q * (1.0 - q)).sqrt());
    assert!(
        (count as f64 - mean).abs() <= 5.0 * sd.max(1.0),
        "{what}: {count} of {n}, expected {mean:.1} ± {:.1} (5σ)",
        5.0 * sd
    );
}

fn check_dropout_statistics<B: Backend>(b: &B, _tol: Tolerance) {
    let n = 200_000;
    let mask = |p: f64, seed: u64, stream: u64| -> Vec<f32> {
        let mut m = b.zeros_for(n, Storage::Master).unwrap();
        b.dropout_mask(&mut m, p, seed, stream).unwrap();
        down(b, &m)
    };
    for p in [0.05, 0.1, 0.3, 0.5, 0.9] {
        let m = mask(p, 17, 3);
        let keep = keep_value(p);
        assert!(m.iter().all(|&x| x == 0.0 || x == keep), "p {p}: values");
        let drop: Vec<bool> = m.iter().map(|&x| x == 0.0).collect();
        let zeros = drop.iter().filter(|&&d| d).count();
        assert_binomial(&format!("p {p}: dropped"), zeros, n, p);
        // Neighbours are independent: both dropped with probability p².
        let pairs = drop.windows(2).filter(|w| w[0] && w[1]).count();
        assert_binomial(&format!("p {p}: adjacent pairs"), pairs, n - 1, p * p);
        // The mean of an inverted-dropout mask is 1.
        let mean = m.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64;
        assert!(
            (mean - 1.0).abs() < 5.0 * (p / (1.0 - p) / n as f64).sqrt(),
            "p {p}: mean {mean}"
        );
    }
    // p = 0 keeps everything at exactly 1.
    assert!(mask(0.0, 1, 1).iter().all(|&x| x == 1.0));
    // Different streams (and seeds) are different, unrelated masks: they agree where two independent
    // masks would (p² + (1−p)²), and the same (seed, stream) repeats exactly.
    let p = 0.3;
    let base = mask(p, 11, 100);
    assert_eq!(bits(&base), bits(&mask(p, 11, 100)), "same seed and stream");
    for (seed, stream) in [(11, 101), (12, 100), (11, 100 ^ (1 << 40)), (100, 11)] {
        let other = mask(p, seed, stream);
        assert_ne!(bits(&base), bits(&other), "({seed}, {stream})");
        let agree = base
            .iter()
            .zip(&other)
            .filter(|(a, b)| (**a == 0.0) == (**b == 0.0))
            .count();
        assert_binomial(
            &format!("agreement with ({seed}, {stream})"),
            agree,
            n,
            p * p + (1.0 - p) * (1.0 - p),
        );
    }
}

fn check_dropout_errors<B: Backend>(b: &B, _tol: Tolerance) {
    let mut m = b.zeros_for(4, Storage::Master).unwrap();
    for p in [-0.1, 1.0, 1.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        expect_invalid(b.dropout_mask(&mut m, p, 0, 0), "dropout_mask", "p");
    }
    assert_eq!(down(b, &m), vec![0.0; 4], "a refused mask writes nothing");
}
