//! Bad input: wrong lengths give `KernelError::Shape` naming the op and the argument; inconsistent
//! dimensions give `KernelError::Invalid`. Nothing panics. Every op checks its arguments through one
//! function of `afinar_kernels::contract` on every backend: the same bodies run on the CPU and (with a
//! GPU) on CUDA, and `both_backends_report_identical_errors` compares the full messages.

use crate::common::*;
use afinar_kernels::nf4::Absmax;
use afinar_kernels::{Accum, AttnShape, Backend, KernelError, Nf4Tensor, Tolerance, Weight};

backend_tests! {
    shape_mismatches_name_op_and_argument => check_shape_errors,
    inconsistent_dims_are_invalid => check_invalid,
}

#[track_caller]
fn expect_shape<T: std::fmt::Debug>(r: Result<T, KernelError>, op: &str, arg: &str) {
    match r {
        Err(e @ KernelError::Shape { .. }) => {
            let KernelError::Shape { op: o, arg: a, .. } = &e else {
                unreachable!()
            };
            assert_eq!((*o, *a), (op, arg), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains(op) && msg.contains(arg),
                "message does not name op/arg: {msg}"
            );
        }
        other => panic!("expected a Shape error for {op}/{arg}, got {other:?}"),
    }
}

#[track_caller]
fn expect_invalid<T: std::fmt::Debug>(r: Result<T, KernelError>, op: &str, arg: &str) {
    match r {
        Err(KernelError::Invalid { op: o, arg: a, msg }) => assert_eq!((o, a), (op, arg), "{msg}"),
        other => panic!("expected an Invalid error for {op}/{arg}, got {other:?}"),
    }
}

fn check_shape_errors<B: Backend>(b: &B, _tol: Tolerance) {
    let z = |n: usize| b.zeros(n).unwrap();
    let (m, k, n) = (3, 4, 5);
    let mut y = z(m * n);
    expect_shape(
        b.matmul_xwt(&z(m * k - 1), &z(n * k), &mut y, m, k, n, Accum::Overwrite),
        "matmul_xwt",
        "x",
    );
    expect_shape(
        b.matmul_xwt(&z(m * k), &z(n * k + 1), &mut y, m, k, n, Accum::Overwrite),
        "matmul_xwt",
        "w",
    );
    let mut dx = z(m * k + 2);
    expect_shape(
        b.matmul_dyw(&z(m * n), &z(n * k), &mut dx, m, k, n, Accum::Add),
        "matmul_dyw",
        "dx",
    );
    let mut dw = z(n * k);
    expect_shape(
        b.matmul_dytx(&z(m * n), &z(m * k + 1), &mut dw, m, k, n, Accum::Add),
        "matmul_dytx",
        "x",
    );

    let mut y = z(m * n);
    expect_shape(
        b.lora_fwd(
            &z(m * k),
            Weight::Dense(&z(n * k - 1)),
            None,
            &mut y,
            None,
            m,
            k,
            n,
        ),
        "lora_fwd",
        "w",
    );
    let (a, bb) = (z(2 * k), z(n * 2 + 1));
    let lr = afinar_kernels::LoraRef {
        a: &a,
        b: &bb,
        r: 2,
        scale: 1.0,
        mask: None,
    };
    expect_shape(
        b.lora_fwd(
            &z(m * k),
            Weight::Dense(&z(n * k)),
            Some(lr),
            &mut y,
            None,
            m,
            k,
            n,
        ),
        "lora_fwd",
        "b",
    );
    // An NF4 weight whose packed bytes do not match its shape.
    let bad = Nf4Tensor {
        shape: vec![n, k],
        packed: vec![0; 3],
        absmax: Absmax::Plain(vec![1.0]),
    };
    let bad = b.nf4_from_host(&bad).unwrap();
    expect_shape(
        b.lora_fwd(&z(m * k), Weight::Nf4(&bad), None, &mut y, None, m, k, n),
        "lora_fwd",
        "w.packed",
    );
    let mut deq = z(n * k);
    expect_shape(
        b.nf4_dequantize(&bad, &mut deq),
        "nf4_dequantize",
        "w.packed",
    );

    let (mut yy, mut rstd) = (z(6), z(2));
    expect_shape(
        b.rmsnorm_fwd(&z(6), &z(2), &mut yy, &mut rstd, 2, 3, 1e-6),
        "rmsnorm_fwd",
        "w",
    );
    let mut x = z(2 * 2 * 4);
    expect_shape(
        b.rope(&mut x, &up_ids(b, &[0, 1, 2]), 2, 2, 4, 1e4, false),
        "rope",
        "pos",
    );
    let mut out = z(4);
    expect_shape(b.geglu_fwd(&z(4), &z(3), &mut out), "geglu_fwd", "up");
    let mut dy = z(3);
    expect_shape(b.softcap_bwd(&z(4), &mut dy, 30.0), "softcap_bwd", "dy");

    let s = AttnShape {
        b: 1,
        t: 3,
        tk: 3,
        nh: 2,
        nkv: 1,
        d: 4,
        scale: 1.0,
        softcap: None,
        window: None,
    };
    let (mut o, mut l) = (z(24), z(6));
    expect_shape(
        b.attn_fwd(&z(24), &z(11), &z(12), None, &mut o, &mut l, &s),
        "attn_fwd",
        "k",
    );
    expect_shape(
        b.attn_fwd(
            &z(24),
            &z(12),
            &z(12),
            Some(&up_ids(b, &[0, 0])),
            &mut o,
            &mut l,
            &s,
        ),
        "attn_fwd",
        "seg",
    );
    let mut l5 = z(5);
    expect_shape(
        b.attn_fwd(&z(24), &z(12), &z(12), None, &mut o, &mut l5, &s),
        "attn_fwd",
        "lse",
    );
    let (mut dq, mut dk, mut dv) = (z(24), z(12), z(13));
    expect_shape(
        b.attn_bwd(
            &z(24),
            &z(12),
            &z(12),
            None,
            &z(24),
            &z(6),
            &z(24),
            &mut dq,
            &mut dk,
            &mut dv,
            &s,
        ),
        "attn_bwd",
        "dv",
    );

    let mut e = z(4 * 3);
    expect_shape(
        b.embedding_fwd(&up_ids(b, &[0, 1]), &z(5 * 3), &mut e, 5, 3, 1.0),
        "embedding_fwd",
        "out",
    );
    let mut dl = z(7);
    expect_shape(
        b.cross_entropy(&z(8), &up_ids(b, &[0, 1]), 2, 4, None, 1.0, Some(&mut dl)),
        "cross_entropy",
        "dlogits",
    );
    expect_shape(
        b.cross_entropy(&z(8), &up_ids(b, &[0]), 2, 4, None, 1.0, None),
        "cross_entropy",
        "labels",
    );
    let mut dh = z(5);
    expect_shape(
        b.lm_head_ce(
            &z(6),
            &z(12),
            &up_ids(b, &[0, 1]),
            2,
            3,
            4,
            None,
            1.0,
            Some(&mut dh),
            None,
        ),
        "lm_head_ce",
        "dhidden",
    );
    let mut yy = z(3);
    expect_shape(b.axpy(1.0, &z(4), &mut yy), "axpy", "y");
}

fn check_invalid<B: Backend>(b: &B, _tol: Tolerance) {
    let z = |n: usize| b.zeros(n).unwrap();
    let s = AttnShape {
        b: 1,
        t: 3,
        tk: 3,
        nh: 3,
        nkv: 2,
        d: 4,
        scale: 1.0,
        softcap: None,
        window: None,
    };
    let (mut o, mut l) = (z(36), z(9));
    expect_invalid(
        b.attn_fwd(&z(36), &z(24), &z(24), None, &mut o, &mut l, &s),
        "attn_fwd",
        "nkv",
    );
    let s = AttnShape {
        nh: 2,
        window: Some(0),
        ..s
    };
    let (mut o, mut l) = (z(24), z(6));
    expect_invalid(
        b.attn_fwd(&z(24), &z(24), &z(24), None, &mut o, &mut l, &s),
        "attn_fwd",
        "window",
    );
    let s = AttnShape {
        nh: 2,
        t: 2,
        tk: 3,
        window: None,
        ..s
    };
    let (mut o, mut l) = (z(16), z(4));
    let (mut dq, mut dk, mut dv) = (z(16), z(24), z(24));
    expect_invalid(
        b.attn_bwd(
            &z(16),
            &z(24),
            &z(24),
            None,
            &z(16),
            &z(4),
            &z(16),
            &mut dq,
            &mut dk,
            &mut dv,
            &s,
        ),
        "attn_bwd",
        "tk",
    );
    let s = AttnShape { t: 4, tk: 3, ..s };
    expect_invalid(
        b.attn_fwd(&z(32), &z(24), &z(24), None, &mut o, &mut l, &s),
        "attn_fwd",
        "tk",
    );

    let mut x = z(2 * 3);
    expect_invalid(
        b.rope(&mut x, &up_ids(b, &[0, 1]), 2, 1, 3, 1e4, false),
        "rope",
        "d",
    );
    let mut x = z(2 * 4);
    expect_invalid(
        b.rope(&mut x, &up_ids(b, &[0, -1]), 2, 1, 4, 1e4, false),
        "rope",
        "pos",
    );

    let mut e = z(2 * 3);
    expect_invalid(
        b.embedding_fwd(&up_ids(b, &[0, 5]), &z(5 * 3), &mut e, 5, 3, 1.0),
        "embedding_fwd",
        "ids",
    );
    let mut dt = z(5 * 3);
    expect_invalid(
        b.embedding_bwd(&up_ids(b, &[-1, 0]), &z(6), &mut dt, 5, 3, 1.0),
        "embedding_bwd",
        "ids",
    );
    expect_invalid(
        b.cross_entropy(&z(8), &up_ids(b, &[4, -100]), 2, 4, None, 1.0, None),
        "cross_entropy",
        "labels",
    );
    expect_invalid(
        b.cross_entropy(&z(8), &up_ids(b, &[-5, 0]), 2, 4, None, 1.0, None),
        "cross_entropy",
        "labels",
    );
    expect_invalid(
        b.lm_head_ce(
            &z(6),
            &z(12),
            &up_ids(b, &[0, 9]),
            2,
            3,
            4,
            None,
            1.0,
            None,
            None,
        ),
        "lm_head_ce",
        "labels",
    );
    let mut x = z(4);
    expect_invalid(b.softcap_fwd(&mut x, 0.0), "softcap_fwd", "cap");
    let (mut y, mut r) = (z(2 * 3), z(2));
    expect_invalid(
        b.rmsnorm_fwd(&z(6), &z(3), &mut y, &mut r, 2, 3, f32::NAN),
        "rmsnorm_fwd",
        "eps",
    );
    expect_invalid(
        b.rmsnorm_fwd(&z(6), &z(3), &mut y, &mut r, usize::MAX, 2, 1e-6),
        "rmsnorm_fwd",
        "n",
    );
    expect_invalid(
        b.cross_entropy(&z(8), &up_ids(b, &[0, 1]), 2, 4, Some(-1.0), 1.0, None),
        "cross_entropy",
        "cap",
    );
    let (a, bb) = (z(0), z(0));
    let lr = afinar_kernels::LoraRef {
        a: &a,
        b: &bb,
        r: 0,
        scale: 1.0,
        mask: None,
    };
    let mut y = z(6);
    expect_invalid(
        b.lora_fwd(&z(6), Weight::Dense(&z(9)), Some(lr), &mut y, None, 2, 3, 3),
        "lora_fwd",
        "r",
    );
    // An NF4 weight of the wrong logical shape.
    let w = Nf4Tensor {
        shape: vec![3, 4],
        packed: vec![0; 6],
        absmax: Absmax::Plain(vec![1.0]),
    };
    let w = b.nf4_from_host(&w).unwrap();
    let mut y = z(2 * 4);
    expect_invalid(
        b.lora_fwd(&z(2 * 3), Weight::Nf4(&w), None, &mut y, None, 2, 3, 4),
        "lora_fwd",
        "w",
    );
}

/// One bad call per contract rule that both backends can take, as the error messages.
fn error_messages<B: Backend>(b: &B) -> Vec<String> {
    let z = |n: usize| b.zeros(n).unwrap();
    let msg = |r: Result<(), KernelError>| r.expect_err("a bad call succeeded").to_string();
    let msg2 =
        |r: Result<(f64, usize), KernelError>| r.expect_err("a bad call succeeded").to_string();
    let (mut y, mut r, mut e) = (z(6), z(2), z(6));
    let s = AttnShape {
        b: 1,
        t: 2,
        tk: 2,
        nh: 2,
        nkv: 1,
        d: 4,
        scale: 0.5,
        softcap: None,
        window: None,
    };
    let (mut o, mut l) = (z(16), z(4));
    vec![
        msg(b.matmul_xwt(&z(5), &z(6), &mut y, 2, 3, 2, Accum::Overwrite)),
        msg(b.axpy(1.0, &z(3), &mut y)),
        msg(b.copy_range(&z(4), 3, &mut y, 0, 2)),
        msg(b.rmsnorm_fwd(&z(6), &z(3), &mut y, &mut r, 2, 3, -1.0)),
        msg(b.rmsnorm_fwd(&z(6), &z(3), &mut y, &mut r, usize::MAX, 2, 1e-6)),
        msg(b.rmsnorm_fwd(&z(6), &z(2), &mut y, &mut r, 2, 3, 1e-6)),
        msg(b.rope(&mut y, &up_ids(b, &[0, -3]), 2, 1, 3, 1e4, false)),
        msg(b.rope(&mut y, &up_ids(b, &[0, -3, 1]), 3, 1, 2, 1e4, false)),
        msg(b.embedding_fwd(&up_ids(b, &[0, 1]), &z(15), &mut z(12), 5, 3, 1.0)),
        msg(b.embedding_fwd(&up_ids(b, &[0, 7]), &z(15), &mut e, 5, 3, 1.0)),
        msg(b.embedding_bwd(&up_ids(b, &[-1, 0]), &z(6), &mut z(15), 5, 3, 1.0)),
        msg2(b.cross_entropy(&z(8), &up_ids(b, &[-100, 4]), 2, 4, None, 1.0, None)),
        msg2(b.cross_entropy(&z(8), &up_ids(b, &[0, 1]), 2, 4, Some(0.0), 1.0, None)),
        msg2(b.lm_head_ce(
            &z(6),
            &z(12),
            &up_ids(b, &[9, 0]),
            2,
            3,
            4,
            None,
            1.0,
            None,
            None,
        )),
        msg(b.softcap_bwd(&z(3), &mut y, 2.0)),
        msg(b.attn_fwd(&z(16), &z(8), &z(8), None, &mut o, &mut z(3), &s)),
        msg(b.attn_fwd(
            &z(16),
            &z(8),
            &z(8),
            None,
            &mut o,
            &mut l,
            &AttnShape { nkv: 3, ..s },
        )),
        msg(b.dropout_mask(&mut y, 1.0, 1, 2)),
    ]
}

#[test]
fn both_backends_report_identical_errors() {
    let cpu = error_messages(&afinar_kernels::Cpu::new());
    #[cfg(feature = "cuda")]
    match afinar_kernels::cuda::Cuda::try_new() {
        Ok(Some(cu)) => assert_eq!(error_messages(&cu), cpu),
        Ok(None) => println!("skipped: no CUDA driver"),
        Err(e) => panic!("a CUDA driver is present but the backend failed to start: {e}"),
    }
    assert!(cpu.iter().all(|m| !m.is_empty()), "{cpu:?}");
}

/// The public tile primitive rejects an inconsistent tensor instead of indexing out of bounds.
#[test]
fn cpu_dequantize_range_checks_layout() {
    let bad = Nf4Tensor {
        shape: vec![4, 32],
        packed: vec![0; 64],
        absmax: Absmax::Plain(vec![1.0]),
    };
    let mut out = vec![0.0; 10];
    expect_shape(
        afinar_kernels::cpu::nf4::dequantize_range(&bad, 100, &mut out),
        "nf4_dequantize",
        "w.absmax",
    );
    let ok = Nf4Tensor {
        shape: vec![4, 32],
        packed: vec![0; 64],
        absmax: Absmax::Plain(vec![1.0; 2]),
    };
    expect_invalid(
        afinar_kernels::cpu::nf4::dequantize_range(&ok, 120, &mut out),
        "nf4_dequantize",
        "range",
    );
}
