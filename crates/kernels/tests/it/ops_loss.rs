//! Cross-entropy (soft-cap, ignore label, huge logits) and the fused chunked LM head + CE.

use crate::common::*;
use afinar_kernels::cpu::lm_head::lm_head_ce_chunked;
use afinar_kernels::{Accum, Backend, Tolerance};

backend_tests! {
    cross_entropy_matches_reference => check_ce,
    cross_entropy_is_stable_at_1e4 => check_ce_huge,
    lm_head_ce_equals_logits_then_cross_entropy => check_lm_head,
}

/// Σ loss over scored rows in f64, z = c·tanh(x/c) first when capped.
fn ce64(logits: &[f64], labels: &[i32], v: usize, cap: Option<f64>) -> f64 {
    let mut total = 0.0;
    for (row, &y) in logits.chunks(v).zip(labels) {
        if y == -100 {
            continue;
        }
        let z: Vec<f64> = row
            .iter()
            .map(|&x| cap.map_or(x, |c| c * (x / c).tanh()))
            .collect();
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + z.iter().map(|&z| (z - max).exp()).sum::<f64>().ln();
        total += lse - z[y as usize];
    }
    total
}

fn check_ce<B: Backend>(b: &B, tol: Tolerance) {
    let (n, v) = (6, 37);
    let mut g = rng(80);
    let logits = uniform(&mut g, n * v, 40.0); // spans the soft-cap's curved region at c = 30
    let labels = vec![3, -100, 36, 0, -100, 17];
    let l64 = f64s(&logits);
    for (cap, grad_scale) in [(None, 1.0f32), (Some(30.0f32), 0.25)] {
        let cap64 = cap.map(f64::from);
        let lb = up(b, &logits);
        let yb = up_ids(b, &labels);
        let mut dl = nans(b, n * v);
        let (loss, count) = b
            .cross_entropy(&lb, &yb, n, v, cap, grad_scale, Some(&mut dl))
            .unwrap();
        assert_eq!(count, 4, "scored rows");
        let want = ce64(&l64, &labels, v, cap64);
        widen(tol, 10.0).assert_close(&format!("loss cap={cap:?}"), [loss], [want]);
        // Same loss without a gradient buffer.
        let (loss2, count2) = b
            .cross_entropy(&lb, &yb, n, v, cap, grad_scale, None)
            .unwrap();
        assert_eq!(count2, 4);
        Tolerance::new(1e-9, 1e-9).assert_close("loss without grad", [loss2], [loss]);
        let fd = fd_grad(&l64, 1e-6, |x| {
            f64::from(grad_scale) * ce64(x, &labels, v, cap64)
        });
        let d = down(b, &dl);
        widen(tol, 10.0).assert_close(&format!("dlogits cap={cap:?}"), d.iter().copied(), fd);
        assert!(
            d[v..2 * v].iter().all(|&x| x == 0.0),
            "ignored row has a gradient"
        );
    }
}

fn check_ce_huge<B: Backend>(b: &B, tol: Tolerance) {
    let (n, v) = (3, 9);
    let mut g = rng(81);
    let logits: Vec<f32> = uniform(&mut g, n * v, 1.0)
        .iter()
        .map(|x| x * 1e4)
        .collect();
    let labels = vec![2, 8, 0];
    let l64 = f64s(&logits);
    let mut dl = nans(b, n * v);
    let (loss, _) = b
        .cross_entropy(
            &up(b, &logits),
            &up_ids(b, &labels),
            n,
            v,
            None,
            1.0,
            Some(&mut dl),
        )
        .unwrap();
    assert!(loss.is_finite(), "loss {loss}");
    // Losses of ~1e4 in f32: relative accuracy.
    Tolerance::new(0.0, 1e-6).assert_close("loss", [loss], [ce64(&l64, &labels, v, None)]);
    // The exact gradient softmax − onehot, in f64.
    let mut want = Vec::new();
    for (row, &y) in l64.chunks(v).zip(&labels) {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|&z| (z - max).exp()).sum();
        want.extend(
            row.iter()
                .enumerate()
                .map(|(j, &z)| (z - max).exp() / sum - if j == y as usize { 1.0 } else { 0.0 }),
        );
    }
    let d = down(b, &dl);
    assert!(d.iter().all(|x| x.is_finite()));
    tol.assert_close("dlogits at 1e4", d, want);
    // With the final soft-cap the same logits saturate at ±c: finite loss, finite gradient.
    let mut dl = nans(b, n * v);
    let (loss, _) = b
        .cross_entropy(
            &up(b, &logits),
            &up_ids(b, &labels),
            n,
            v,
            Some(30.0),
            1.0,
            Some(&mut dl),
        )
        .unwrap();
    widen(tol, 10.0).assert_close("capped loss", [loss], [ce64(&l64, &labels, v, Some(30.0))]);
    assert!(down(b, &dl).iter().all(|x| x.is_finite()));
}

fn check_lm_head<B: Backend>(b: &B, tol: Tolerance) {
    let (n, h, v) = (11, 13, 29);
    let mut g = rng(82);
    let hidden = uniform(&mut g, n * h, 1.0);
    let emb = uniform(&mut g, v * h, 3.0);
    let labels = vec![1, -100, 28, 4, 4, -100, 0, 7, 9, 13, 27];
    let (cap, gs) = (Some(5.0f32), 0.5f32);
    let (hb, eb, yb) = (up(b, &hidden), up(b, &emb), up_ids(b, &labels));

    // Unfused: logits = hidden·embᵀ; CE; dhidden = dlogits·emb; demb = dlogitsᵀ·hidden.
    let mut logits = b.zeros(n * v).unwrap();
    b.matmul_xwt(&hb, &eb, &mut logits, n, h, v, Accum::Overwrite)
        .unwrap();
    let mut dl = b.zeros(n * v).unwrap();
    let (loss_ref, count_ref) = b
        .cross_entropy(&logits, &yb, n, v, cap, gs, Some(&mut dl))
        .unwrap();
    let mut dh_ref = b.zeros(n * h).unwrap();
    b.matmul_dyw(&dl, &eb, &mut dh_ref, n, h, v, Accum::Overwrite)
        .unwrap();
    let mut de_ref = b.zeros(v * h).unwrap();
    b.matmul_dytx(&dl, &hb, &mut de_ref, n, h, v, Accum::Overwrite)
        .unwrap();

    // Fused, accumulating onto priors.
    let prior_h = uniform(&mut g, n * h, 1.0);
    let prior_e = uniform(&mut g, v * h, 1.0);
    let (mut dh, mut de) = (up(b, &prior_h), up(b, &prior_e));
    let (loss, count) = b
        .lm_head_ce(
            &hb,
            &eb,
            &yb,
            n,
            h,
            v,
            cap,
            gs,
            Some(&mut dh),
            Some(&mut de),
        )
        .unwrap();
    assert_eq!(count, count_ref);
    tol.assert_close("loss", [loss], [loss_ref]);
    let minus = |got: Vec<f32>, prior: &[f32]| -> Vec<f64> {
        got.iter()
            .zip(prior)
            .map(|(g, p)| f64::from(*g) - f64::from(*p))
            .collect()
    };
    widen(tol, 2.0).assert_close(
        "dhidden",
        minus(down(b, &dh), &prior_h),
        f64s(&down(b, &dh_ref)),
    );
    widen(tol, 2.0).assert_close(
        "demb",
        minus(down(b, &de), &prior_e),
        f64s(&down(b, &de_ref)),
    );
    // Loss only.
    let (loss2, _) = b
        .lm_head_ce(&hb, &eb, &yb, n, h, v, cap, gs, None, None)
        .unwrap();
    tol.assert_close("loss (no grads)", [loss2], [loss_ref]);
    // Against f64 directly.
    let (h64, e64) = (f64s(&hidden), f64s(&emb));
    let mut l64 = vec![0.0; n * v];
    for i in 0..n {
        for j in 0..v {
            l64[i * v + j] = (0..h).map(|t| h64[i * h + t] * e64[j * h + t]).sum();
        }
    }
    widen(tol, 10.0).assert_close(
        "loss vs f64",
        [loss],
        [ce64(&l64, &labels, v, cap.map(f64::from))],
    );
}

/// The CPU fused head gives the same answer for every chunk size (1 row, ragged, all rows).
#[test]
fn cpu_lm_head_chunk_size_does_not_matter() {
    let (n, h, v) = (10, 6, 17);
    let mut g = rng(83);
    let hidden = uniform(&mut g, n * h, 1.0);
    let emb = uniform(&mut g, v * h, 2.0);
    let labels = vec![-100, 3, 16, -100, -100, 0, 5, 5, 9, 1];
    let run = |chunk: usize| {
        let (mut dh, mut de) = (vec![0.0f32; n * h], vec![0.0f32; v * h]);
        let (l, c) = lm_head_ce_chunked(
            &hidden,
            &emb,
            &labels,
            n,
            h,
            v,
            Some(30.0),
            1.0,
            Some(&mut dh),
            Some(&mut de),
            chunk,
        )
        .unwrap();
        (l, c, dh, de)
    };
    let (l0, c0, dh0, de0) = run(1000);
    assert_eq!(c0, 7);
    for chunk in [1, 2, 3, 7] {
        let (l, c, dh, de) = run(chunk);
        assert_eq!(c, c0);
        Tolerance::F32.assert_close(&format!("loss chunk={chunk}"), [l], [l0]);
        Tolerance::F32.assert_close(&format!("dhidden chunk={chunk}"), dh, dh0.iter().copied());
        Tolerance::F32.assert_close(&format!("demb chunk={chunk}"), de, de0.iter().copied());
    }
    // Ignored rows get no gradient.
    assert!(dh0[..h].iter().chain(&dh0[3 * h..5 * h]).all(|&x| x == 0.0));
}
