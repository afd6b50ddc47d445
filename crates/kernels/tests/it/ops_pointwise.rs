//! RMSNorm, RoPE, GeGLU, soft-cap, embedding and the elementwise ops against f64 loops and finite
//! differences.

use crate::common::*;
use afinar_kernels::{Backend, Tolerance};

backend_tests! {
    rmsnorm_matches_reference => check_rmsnorm,
    rope_matches_reference => check_rope,
    geglu_matches_reference => check_geglu,
    softcap_matches_reference_and_saturates => check_softcap,
    embedding_gathers_and_scatters => check_embedding,
    elementwise_ops_match_reference => check_elementwise,
}

fn rmsnorm64(x: &[f64], w: &[f64], n: usize, h: usize, eps: f64) -> Vec<f64> {
    let mut y = vec![0.0; n * h];
    for i in 0..n {
        let row = &x[i * h..(i + 1) * h];
        let rs = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / h as f64 + eps).sqrt();
        for j in 0..h {
            y[i * h + j] = row[j] * rs * (1.0 + w[j]);
        }
    }
    y
}

fn check_rmsnorm<B: Backend>(b: &B, tol: Tolerance) {
    // N = 70 rows spans two blocks of the dw reduction; H = 19 is ragged.
    let (n, h, eps) = (70, 19, 1e-6f32);
    let mut g = rng(10);
    let mut x = uniform(&mut g, n * h, 2.0);
    x[..h].iter_mut().for_each(|v| *v *= 1e3); // a large-magnitude row
    let w = uniform(&mut g, h, 0.5);
    let (x64, w64) = (f64s(&x), f64s(&w));
    let y_ref = rmsnorm64(&x64, &w64, n, h, f64::from(eps));
    let (xb, wb) = (up(b, &x), up(b, &w));
    let (mut y, mut rstd) = (nans(b, n * h), nans(b, n));
    b.rmsnorm_fwd(&xb, &wb, &mut y, &mut rstd, n, h, eps)
        .unwrap();
    tol.assert_close("y", down(b, &y), y_ref.iter().copied());
    let rstd_ref: Vec<f64> = (0..n)
        .map(|i| {
            1.0 / (x64[i * h..(i + 1) * h].iter().map(|v| v * v).sum::<f64>() / h as f64
                + f64::from(eps))
            .sqrt()
        })
        .collect();
    tol.assert_close("rstd", down(b, &rstd), rstd_ref);

    let r = f64s(&uniform(&mut g, n * h, 1.0));
    let dy: Vec<f32> = r.iter().map(|&v| v as f32).collect();
    let fdx = fd_grad(&x64, 1e-6, |x| {
        dot64(&r, &rmsnorm64(x, &w64, n, h, f64::from(eps)))
    });
    let fdw = fd_grad(&w64, 1e-6, |w| {
        dot64(&r, &rmsnorm64(&x64, w, n, h, f64::from(eps)))
    });
    let prior = uniform(&mut g, h, 1.0);
    let mut dx = nans(b, n * h);
    let mut dw = up(b, &prior);
    b.rmsnorm_bwd(&up(b, &dy), &xb, &wb, &rstd, &mut dx, Some(&mut dw), n, h)
        .unwrap();
    let gtol = widen(tol, 10.0);
    gtol.assert_close("dx", down(b, &dx), fdx.iter().copied());
    gtol.assert_close(
        "dw (added)",
        down(b, &dw),
        fdw.iter().zip(&prior).map(|(f, &p)| f + f64::from(p)),
    );
    // A frozen norm: no dw, same dx.
    let mut dx2 = nans(b, n * h);
    b.rmsnorm_bwd(&up(b, &dy), &xb, &wb, &rstd, &mut dx2, None, n, h)
        .unwrap();
    Tolerance::EXACT.assert_close("dx without dw", down(b, &dx2), down(b, &dx));
}

/// HF RoPE in f64 with the angle computed exactly as HF does in f32 (so only the rotation differs).
fn rope64(
    x: &[f64],
    pos: &[i32],
    n: usize,
    heads: usize,
    d: usize,
    theta: f32,
    inverse: bool,
) -> Vec<f64> {
    let half = d / 2;
    let mut y = x.to_vec();
    for (t, &p) in pos.iter().enumerate().take(n) {
        for hh in 0..heads {
            let base = (t * heads + hh) * d;
            for i in 0..half {
                let inv = 1.0f32 / theta.powf((2 * i) as f32 / d as f32);
                let ang = f64::from(inv * p as f32);
                let (s, c) = if inverse {
                    (-ang.sin(), ang.cos())
                } else {
                    (ang.sin(), ang.cos())
                };
                let (a, bb) = (x[base + i], x[base + half + i]);
                y[base + i] = a * c - bb * s;
                y[base + half + i] = bb * c + a * s;
            }
        }
    }
    y
}

fn check_rope<B: Backend>(b: &B, tol: Tolerance) {
    let (n, heads, d, theta) = (9, 3, 10, 10000.0f32);
    let mut g = rng(11);
    let x = uniform(&mut g, n * heads * d, 1.0);
    // Packed positions restart per sample; one large position exercises big angles.
    let pos: Vec<i32> = vec![0, 1, 2, 3, 0, 1, 2, 0, 4000];
    let x64 = f64s(&x);
    let posb = up_ids(b, &pos);
    let mut y = up(b, &x);
    b.rope(&mut y, &posb, n, heads, d, theta, false).unwrap();
    // |angle| up to 4000 rad: f32 cos/sin of the same f32 angle agree to ~1e-7 absolute.
    tol.assert_close(
        "rope",
        down(b, &y),
        rope64(&x64, &pos, n, heads, d, theta, false),
    );
    // Backward = inverse rotation = gradient of Σ r⊙rope(x) w.r.t. x.
    let r = f64s(&uniform(&mut g, n * heads * d, 1.0));
    let fd = fd_grad(&x64, 1e-6, |x| {
        dot64(&r, &rope64(x, &pos, n, heads, d, theta, false))
    });
    let mut dr = up(b, &r.iter().map(|&v| v as f32).collect::<Vec<_>>());
    b.rope(&mut dr, &posb, n, heads, d, theta, true).unwrap();
    widen(tol, 10.0).assert_close("rope backward", down(b, &dr), fd);
    // inverse(forward(x)) = x
    b.rope(&mut y, &posb, n, heads, d, theta, true).unwrap();
    tol.assert_close("rope round trip", down(b, &y), x.iter().copied());
}

fn gelu64(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
}

fn check_geglu<B: Backend>(b: &B, tol: Tolerance) {
    let n = 77;
    let mut g = rng(12);
    let mut gate = uniform(&mut g, n, 4.0);
    gate[0] = 30.0; // saturated: gelu(x) = x
    gate[1] = -30.0; // saturated: gelu(x) = 0
    let up_ = uniform(&mut g, n, 2.0);
    let (g64, u64_) = (f64s(&gate), f64s(&up_));
    let fwd = |g: &[f64], u: &[f64]| -> Vec<f64> {
        g.iter().zip(u).map(|(&g, &u)| gelu64(g) * u).collect()
    };
    let (gb, ub) = (up(b, &gate), up(b, &up_));
    let mut out = nans(b, n);
    b.geglu_fwd(&gb, &ub, &mut out).unwrap();
    tol.assert_close("geglu", down(b, &out), fwd(&g64, &u64_));
    let r = f64s(&uniform(&mut g, n, 1.0));
    let fdg = fd_grad(&g64, 1e-6, |g| dot64(&r, &fwd(g, &u64_)));
    let fdu = fd_grad(&u64_, 1e-6, |u| dot64(&r, &fwd(&g64, u)));
    let (mut dg, mut du) = (nans(b, n), nans(b, n));
    b.geglu_bwd(
        &up(b, &r.iter().map(|&v| v as f32).collect::<Vec<_>>()),
        &gb,
        &ub,
        &mut dg,
        &mut du,
    )
    .unwrap();
    widen(tol, 10.0).assert_close("dgate", down(b, &dg), fdg);
    widen(tol, 10.0).assert_close("dup", down(b, &du), fdu);
}

fn check_softcap<B: Backend>(b: &B, tol: Tolerance) {
    let cap = 30.0f32;
    let mut g = rng(13);
    let mut x = uniform(&mut g, 50, 90.0);
    x.extend_from_slice(&[1e4, -1e4, 3e38, -3e38, 0.0]); // |x| ≫ c saturates to ±c with zero slope
    let x64 = f64s(&x);
    let c = f64::from(cap);
    let fwd = |x: &[f64]| -> Vec<f64> { x.iter().map(|&v| c * (v / c).tanh()).collect() };
    let mut y = up(b, &x);
    b.softcap_fwd(&mut y, cap).unwrap();
    let yh = down(b, &y);
    tol.assert_close("softcap", yh.iter().copied(), fwd(&x64));
    let r = f64s(&uniform(&mut g, x.len(), 1.0));
    let fd: Vec<f64> = x64
        .iter()
        .zip(&r)
        .map(|(&v, &r)| r * (1.0 - (v / c).tanh().powi(2)))
        .collect();
    // The finite difference of the first 50 (moderate) values must agree with the analytic slope.
    let fd_check = fd_grad(&x64[..50], 1e-6, |x| dot64(&r[..50], &fwd(x)));
    Tolerance::new(1e-7, 1e-6).assert_close("fd sanity", fd_check, fd[..50].iter().copied());
    let mut dy = up(b, &r.iter().map(|&v| v as f32).collect::<Vec<_>>());
    b.softcap_bwd(&y, &mut dy, cap).unwrap();
    let dyh = down(b, &dy);
    widen(tol, 10.0).assert_close("softcap backward", dyh.iter().copied(), fd);
    assert!(
        yh.iter().chain(&dyh).all(|v| v.is_finite()),
        "soft-cap produced a non-finite value"
    );
}

fn check_embedding<B: Backend>(b: &B, tol: Tolerance) {
    let (v, h, scale) = (11, 7, 2.5f32);
    let ids: Vec<i32> = vec![3, 0, 10, 3, 3, 7];
    let n = ids.len();
    let mut g = rng(14);
    let table = uniform(&mut g, v * h, 1.0);
    let idsb = up_ids(b, &ids);
    let mut out = nans(b, n * h);
    b.embedding_fwd(&idsb, &up(b, &table), &mut out, v, h, scale)
        .unwrap();
    let out_ref: Vec<f64> = ids
        .iter()
        .flat_map(|&t| {
            table[t as usize * h..(t as usize + 1) * h]
                .iter()
                .map(|&x| f64::from(x) * f64::from(scale))
        })
        .collect();
    tol.assert_close("embedding", down(b, &out), out_ref);
    let dout = uniform(&mut g, n * h, 1.0);
    let prior = uniform(&mut g, v * h, 1.0);
    let mut dt = up(b, &prior);
    b.embedding_bwd(&idsb, &up(b, &dout), &mut dt, v, h, scale)
        .unwrap();
    let mut dt_ref = f64s(&prior);
    for (i, &t) in ids.iter().enumerate() {
        for j in 0..h {
            dt_ref[t as usize * h + j] += f64::from(scale) * f64::from(dout[i * h + j]);
        }
    }
    tol.assert_close("dtable", down(b, &dt), dt_ref);
}

fn check_elementwise<B: Backend>(b: &B, tol: Tolerance) {
    // Longer than one 16 Ki parallel chunk, ragged.
    let n = 40_003;
    let mut g = rng(15);
    let x = uniform(&mut g, n, 1.0);
    let y = uniform(&mut g, n, 1.0);
    let mask = dropout_mask(&mut g, n, 0.1);
    let (xb, mb) = (up(b, &x), up(b, &mask));
    let mut yb = up(b, &y);
    b.axpy(-0.75, &xb, &mut yb).unwrap();
    tol.assert_close(
        "axpy",
        down(b, &yb),
        x.iter()
            .zip(&y)
            .map(|(&x, &y)| f64::from(y) - 0.75 * f64::from(x)),
    );
    let mut s = up(b, &x);
    b.scale(&mut s, 3.0).unwrap();
    tol.assert_close("scale", down(b, &s), x.iter().map(|&x| 3.0 * f64::from(x)));
    let mut mm = up(b, &x);
    b.mul(&mut mm, &mb).unwrap();
    tol.assert_close(
        "mul",
        down(b, &mm),
        x.iter()
            .zip(&mask)
            .map(|(&x, &m)| f64::from(x) * f64::from(m)),
    );
    let ss = b.sum_squares(&xb).unwrap();
    let ss_ref: f64 = x.iter().map(|&v| f64::from(v).powi(2)).sum();
    tol.assert_close("sum_squares", [ss], [ss_ref]);
    let mut c = nans(b, n);
    b.copy(&xb, &mut c).unwrap();
    Tolerance::EXACT.assert_close("copy", down(b, &c), x.iter().copied());
    b.fill(&mut c, 0.5).unwrap();
    Tolerance::EXACT.assert_close("fill", down(b, &c), std::iter::repeat_n(0.5f32, n));
    assert_eq!(b.len(&c), n);
}

/// Cross-thread reductions (RMSNorm dw, Σx², per-row CE losses, attention dK/dV over a GQA group) are
/// summed in a fixed order: 1 and 3 threads give bit-identical results.
#[test]
fn cpu_reductions_do_not_depend_on_thread_count() {
    use afinar_kernels::cpu::{attention, cross_entropy, elementwise, rmsnorm};
    use afinar_kernels::AttnShape;
    let (n, h) = (300, 33);
    let mut g = rng(16);
    let x = uniform(&mut g, n * h, 1.0);
    let w = uniform(&mut g, h, 0.5);
    let dy = uniform(&mut g, n * h, 1.0);
    let v = 50;
    let logits = uniform(&mut g, 40 * v, 10.0);
    let labels: Vec<i32> = (0..40)
        .map(|i| if i % 7 == 0 { -100 } else { (i * 3) % v as i32 })
        .collect();
    let s = AttnShape {
        b: 1,
        t: 80,
        tk: 80,
        nh: 4,
        nkv: 1,
        d: 8,
        scale: 0.3,
        softcap: Some(5.0),
        window: None,
    };
    let q = uniform(&mut g, 80 * 4 * 8, 1.0);
    let kv = uniform(&mut g, 80 * 8, 1.0);
    let dout = uniform(&mut g, q.len(), 1.0);
    let run = || {
        let (mut y, mut rstd, mut dx, mut dw) = (
            vec![0.0; n * h],
            vec![0.0; n],
            vec![0.0; n * h],
            vec![0.0; h],
        );
        rmsnorm::rmsnorm_fwd(&x, &w, &mut y, &mut rstd, n, h, 1e-6).unwrap();
        rmsnorm::rmsnorm_bwd(&dy, &x, &w, &rstd, &mut dx, Some(&mut dw), n, h).unwrap();
        let ss = elementwise::sum_squares(&dy).unwrap();
        let (loss, _) =
            cross_entropy::cross_entropy(&logits, &labels, 40, v, Some(30.0), 1.0, None).unwrap();
        let (mut o, mut l) = (vec![0.0; q.len()], vec![0.0; 4 * 80]);
        attention::attn_fwd(&q, &kv, &kv, None, &mut o, &mut l, &s).unwrap();
        let (mut dq, mut dk, mut dv) =
            (vec![0.0; q.len()], vec![0.0; kv.len()], vec![0.0; kv.len()]);
        attention::attn_bwd(
            &q, &kv, &kv, None, &o, &l, &dout, &mut dq, &mut dk, &mut dv, &s,
        )
        .unwrap();
        (dw, ss, loss, dk, dv)
    };
    let pool = |t| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap()
    };
    let a = pool(1).install(run);
    let b = pool(3).install(run);
    Tolerance::EXACT.assert_close("dw", b.0, a.0);
    Tolerance::EXACT.assert_close("sum_squares", [b.1], [a.1]);
    Tolerance::EXACT.assert_close("ce loss", [b.2], [a.2]);
    Tolerance::EXACT.assert_close("dk", b.3, a.3);
    Tolerance::EXACT.assert_close("dv", b.4, a.4);
}
