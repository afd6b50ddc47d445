//! Attention: causal, GQA 1 and 2, soft-cap before the mask, sliding window shorter than T, packed
//! segments, TK > T (KV-cache decoding) — forward against an f64 loop, backward against central finite
//! differences of that loop.

use crate::common::*;
use afinar_kernels::{AttnShape, Backend, Tolerance};

backend_tests! {
    attention_forward_matches_reference => check_attn_fwd,
    attention_backward_matches_finite_differences => check_attn_bwd,
    attention_decoding_with_more_keys_than_queries => check_attn_decode,
}

/// Eager Gemma-2 attention in f64: (out [B,T,NH,D], lse [B,NH,T]).
fn attn64(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    seg: Option<&[i32]>,
    s: &AttnShape,
) -> (Vec<f64>, Vec<f64>) {
    let (t, tk, nh, nkv, d) = (s.t, s.tk, s.nh, s.nkv, s.d);
    let mut out = vec![0.0; s.b * t * nh * d];
    let mut lse = vec![0.0; s.b * nh * t];
    for b in 0..s.b {
        for h in 0..nh {
            let g = h / (nh / nkv);
            for i in 0..t {
                let p = tk - t + i;
                let qi = &q[((b * t + i) * nh + h) * d..][..d];
                let mut sc: Vec<(usize, f64)> = Vec::new();
                for j in 0..tk {
                    let visible = j <= p
                        && s.window.is_none_or(|w| p < j + w)
                        && seg.is_none_or(|sg| sg[b * tk + j] == sg[b * tk + p]);
                    if !visible {
                        continue;
                    }
                    let kj = &k[((b * tk + j) * nkv + g) * d..][..d];
                    let mut x =
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * f64::from(s.scale);
                    if let Some(c) = s.softcap {
                        let c = f64::from(c);
                        x = c * (x / c).tanh();
                    }
                    sc.push((j, x));
                }
                let max = sc.iter().map(|e| e.1).fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = sc.iter().map(|e| (e.1 - max).exp()).sum();
                lse[(b * nh + h) * t + i] = max + sum.ln();
                let o = &mut out[((b * t + i) * nh + h) * d..][..d];
                for &(j, x) in &sc {
                    let pj = (x - max).exp() / sum;
                    for (o, vv) in o.iter_mut().zip(&v[((b * tk + j) * nkv + g) * d..][..d]) {
                        *o += pj * vv;
                    }
                }
            }
        }
    }
    (out, lse)
}

struct Case {
    name: &'static str,
    s: AttnShape,
    seg: Option<Vec<i32>>,
}

fn cases() -> Vec<Case> {
    let base = AttnShape {
        b: 2,
        t: 7,
        tk: 7,
        nh: 2,
        nkv: 2,
        d: 6,
        scale: 0.4,
        softcap: None,
        window: None,
    };
    vec![
        Case {
            name: "causal, GQA 1",
            s: base,
            seg: None,
        },
        Case {
            name: "GQA 2, soft-cap 50",
            s: AttnShape {
                nh: 4,
                softcap: Some(50.0),
                ..base
            },
            seg: None,
        },
        // A small cap with large scores saturates the tanh.
        Case {
            name: "GQA 2, soft-cap 1 saturated",
            s: AttnShape {
                nh: 4,
                scale: 3.0,
                softcap: Some(1.0),
                ..base
            },
            seg: None,
        },
        Case {
            name: "sliding window 3 < T",
            s: AttnShape {
                nh: 4,
                window: Some(3),
                ..base
            },
            seg: None,
        },
        Case {
            name: "segments in one row",
            s: AttnShape {
                nh: 4,
                softcap: Some(5.0),
                ..base
            },
            seg: Some(vec![
                0, 0, 0, 1, 1, 2, 2, /* row 2 */ 5, 5, 5, 5, 5, 5, 5,
            ]),
        },
        Case {
            name: "everything at once",
            s: AttnShape {
                nh: 4,
                window: Some(2),
                softcap: Some(2.0),
                scale: 1.5,
                ..base
            },
            seg: Some(vec![0, 0, 0, 0, 1, 1, 1, 3, 3, 4, 4, 4, 4, 4]),
        },
        // T = 70 > 64 queries per block: two query blocks, the second one's key range starts at a
        // window edge, and a segment boundary falls inside the first block.
        Case {
            name: "two query blocks, window 40, segments",
            s: AttnShape {
                b: 1,
                t: 70,
                tk: 70,
                nh: 2,
                nkv: 1,
                d: 3,
                scale: 0.7,
                softcap: Some(4.0),
                window: Some(40),
            },
            seg: Some((0..70).map(|i| if i < 30 { 0 } else { 1 }).collect()),
        },
    ]
}

fn inputs(s: &AttnShape, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut g = rng(seed);
    (
        uniform(&mut g, s.b * s.t * s.nh * s.d, 1.0),
        uniform(&mut g, s.b * s.tk * s.nkv * s.d, 1.0),
        uniform(&mut g, s.b * s.tk * s.nkv * s.d, 1.0),
    )
}

fn check_attn_fwd<B: Backend>(b: &B, tol: Tolerance) {
    for (ci, c) in cases().iter().enumerate() {
        let s = &c.s;
        let (q, k, v) = inputs(s, 20 + ci as u64);
        let (o_ref, l_ref) = attn64(&f64s(&q), &f64s(&k), &f64s(&v), c.seg.as_deref(), s);
        let segb = c.seg.as_deref().map(|sg| up_ids(b, sg));
        let mut out = nans(b, q.len());
        let mut lse = nans(b, s.b * s.nh * s.t);
        b.attn_fwd(
            &up(b, &q),
            &up(b, &k),
            &up(b, &v),
            segb.as_ref(),
            &mut out,
            &mut lse,
            s,
        )
        .unwrap();
        tol.assert_close(&format!("out ({})", c.name), down(b, &out), o_ref);
        tol.assert_close(&format!("lse ({})", c.name), down(b, &lse), l_ref);
    }
}

fn check_attn_bwd<B: Backend>(b: &B, tol: Tolerance) {
    let gtol = widen(tol, 10.0);
    for (ci, c) in cases().iter().enumerate() {
        let s = &c.s;
        let seg = c.seg.as_deref();
        let (q, k, v) = inputs(s, 40 + ci as u64);
        let (q64, k64, v64) = (f64s(&q), f64s(&k), f64s(&v));
        let r = f64s(&uniform(&mut rng(50 + ci as u64), q.len(), 1.0));
        let fdq = fd_grad(&q64, 1e-6, |q| dot64(&r, &attn64(q, &k64, &v64, seg, s).0));
        let fdk = fd_grad(&k64, 1e-6, |k| dot64(&r, &attn64(&q64, k, &v64, seg, s).0));
        let fdv = fd_grad(&v64, 1e-6, |v| dot64(&r, &attn64(&q64, &k64, v, seg, s).0));

        let segb = seg.map(|sg| up_ids(b, sg));
        let (qb, kb, vb) = (up(b, &q), up(b, &k), up(b, &v));
        let mut out = b.zeros(q.len()).unwrap();
        let mut lse = b.zeros(s.b * s.nh * s.t).unwrap();
        b.attn_fwd(&qb, &kb, &vb, segb.as_ref(), &mut out, &mut lse, s)
            .unwrap();
        let dout = up(b, &r.iter().map(|&x| x as f32).collect::<Vec<_>>());
        let (mut dq, mut dk, mut dv) = (nans(b, q.len()), nans(b, k.len()), nans(b, v.len()));
        b.attn_bwd(
            &qb,
            &kb,
            &vb,
            segb.as_ref(),
            &out,
            &lse,
            &dout,
            &mut dq,
            &mut dk,
            &mut dv,
            s,
        )
        .unwrap();
        gtol.assert_close(&format!("dq ({})", c.name), down(b, &dq), fdq);
        gtol.assert_close(&format!("dk ({})", c.name), down(b, &dk), fdk);
        gtol.assert_close(&format!("dv ({})", c.name), down(b, &dv), fdv);
    }
}

/// TK > T: the T queries are the last T positions; equals the last T rows of the full TK×TK attention.
fn check_attn_decode<B: Backend>(b: &B, tol: Tolerance) {
    // TK = 70 keys: the T = 66 case spans two query blocks.
    let full = AttnShape {
        b: 1,
        t: 70,
        tk: 70,
        nh: 4,
        nkv: 2,
        d: 5,
        scale: 0.5,
        softcap: Some(3.0),
        window: Some(50),
    };
    let (q, k, v) = inputs(&full, 60);
    let seg: Vec<i32> = (0..70).map(|i| if i < 12 { 1 } else { 2 }).collect();
    let segb = up_ids(b, &seg);
    let (kb, vb) = (up(b, &k), up(b, &v));
    let mut out_full = b.zeros(q.len()).unwrap();
    let mut lse_full = b.zeros(full.nh * full.t).unwrap();
    b.attn_fwd(
        &up(b, &q),
        &kb,
        &vb,
        Some(&segb),
        &mut out_full,
        &mut lse_full,
        &full,
    )
    .unwrap();
    let (of, lf) = (down(b, &out_full), down(b, &lse_full));
    for t in [1, 3, 66] {
        let s = AttnShape { t, ..full };
        let row = s.nh * s.d;
        let qt = &q[(full.t - t) * row..];
        let mut out = nans(b, t * row);
        let mut lse = nans(b, s.nh * t);
        b.attn_fwd(&up(b, qt), &kb, &vb, Some(&segb), &mut out, &mut lse, &s)
            .unwrap();
        tol.assert_close(
            &format!("decode out T={t}"),
            down(b, &out),
            of[(full.t - t) * row..].iter().copied(),
        );
        let lse_ref: Vec<f32> = (0..s.nh)
            .flat_map(|h| lf[h * full.t + full.t - t..(h + 1) * full.t].to_vec())
            .collect();
        tol.assert_close(&format!("decode lse T={t}"), down(b, &lse), lse_ref);
    }
}
