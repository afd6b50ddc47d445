//! Linear GEMMs and the LoRA linear (dense and NF4 base) against f64 loops and finite differences.

use crate::common::*;
use afinar_kernels::cpu::lora::{self, LoraFactors, LoraGrads, WeightRef};
use afinar_kernels::nf4::RawDtype;
use afinar_kernels::{
    Absmax, Accum, Backend, KernelError, LoraGradRef, LoraRef, Nf4Tensor, Storage, Tolerance,
    Weight,
};

backend_tests! {
    matmuls_match_f64_loops => check_matmuls,
    lora_dense_forward_matches_reference => check_lora_dense_fwd,
    lora_dense_backward_matches_finite_differences => check_lora_dense_bwd,
    lora_nf4_equals_dense_with_dequantized_weight => check_lora_nf4,
    nf4_dequantize_matches_host => check_nf4_dequantize,
    nf4_quantize_is_the_host_quantizer_bit_for_bit => check_nf4_quantize,
    nf4_quantize_bad_input_is_the_host_error => check_nf4_quantize_errors,
    from_raw_equals_from_host_bit_for_bit => check_from_raw,
}

/// Y = X·Wᵀ in f64: x [M,K], w [N,K].
fn xwt64(x: &[f64], w: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k).map(|l| x[i * k + l] * w[j * k + l]).sum();
        }
    }
    y
}

fn check_matmuls<B: Backend>(b: &B, tol: Tolerance) {
    let (m, k, n) = (13, 37, 19);
    let mut r = rng(1);
    let x = uniform(&mut r, m * k, 1.0);
    let w = uniform(&mut r, n * k, 1.0);
    let dy = uniform(&mut r, m * n, 1.0);
    let prior_y = uniform(&mut r, m * n, 1.0);
    let prior_dx = uniform(&mut r, m * k, 1.0);
    let prior_dw = uniform(&mut r, n * k, 1.0);
    let (x64, w64, dy64) = (f64s(&x), f64s(&w), f64s(&dy));
    let (xb, wb, dyb) = (up(b, &x), up(b, &w), up(b, &dy));

    let y_ref = xwt64(&x64, &w64, m, k, n);
    let mut y = nans(b, m * n);
    b.matmul_xwt(&xb, &wb, &mut y, m, k, n, Accum::Overwrite)
        .unwrap();
    tol.assert_close("y", down(b, &y), y_ref.iter().copied());
    let mut y = up(b, &prior_y);
    b.matmul_xwt(&xb, &wb, &mut y, m, k, n, Accum::Add).unwrap();
    tol.assert_close(
        "y (add)",
        down(b, &y),
        y_ref.iter().zip(&prior_y).map(|(a, &p)| a + f64::from(p)),
    );

    // dX = dY·W
    let mut dx_ref = vec![0.0; m * k];
    for i in 0..m {
        for l in 0..k {
            dx_ref[i * k + l] = (0..n).map(|j| dy64[i * n + j] * w64[j * k + l]).sum();
        }
    }
    let mut dx = nans(b, m * k);
    b.matmul_dyw(&dyb, &wb, &mut dx, m, k, n, Accum::Overwrite)
        .unwrap();
    tol.assert_close("dx", down(b, &dx), dx_ref.iter().copied());
    let mut dx = up(b, &prior_dx);
    b.matmul_dyw(&dyb, &wb, &mut dx, m, k, n, Accum::Add)
        .unwrap();
    tol.assert_close(
        "dx (add)",
        down(b, &dx),
        dx_ref.iter().zip(&prior_dx).map(|(a, &p)| a + f64::from(p)),
    );

    // dW = dYᵀ·X
    let mut dw_ref = vec![0.0; n * k];
    for j in 0..n {
        for l in 0..k {
            dw_ref[j * k + l] = (0..m).map(|i| dy64[i * n + j] * x64[i * k + l]).sum();
        }
    }
    let mut dw = nans(b, n * k);
    b.matmul_dytx(&dyb, &xb, &mut dw, m, k, n, Accum::Overwrite)
        .unwrap();
    tol.assert_close("dw", down(b, &dw), dw_ref.iter().copied());
    let mut dw = up(b, &prior_dw);
    b.matmul_dytx(&dyb, &xb, &mut dw, m, k, n, Accum::Add)
        .unwrap();
    tol.assert_close(
        "dw (add)",
        down(b, &dw),
        dw_ref.iter().zip(&prior_dw).map(|(a, &p)| a + f64::from(p)),
    );
}

/// The LoRA forward in f64: Y = X·Wᵀ + s·((X⊙mask)·Aᵀ)·Bᵀ.
#[allow(clippy::too_many_arguments)]
fn lora64(
    x: &[f64],
    w: &[f64],
    a: &[f64],
    bm: &[f64],
    mask: Option<&[f64]>,
    s: f64,
    m: usize,
    k: usize,
    n: usize,
    r: usize,
) -> Vec<f64> {
    let mut y = xwt64(x, w, m, k, n);
    let xd: Vec<f64> = match mask {
        Some(mk) => x.iter().zip(mk).map(|(a, b)| a * b).collect(),
        None => x.to_vec(),
    };
    let xa = xwt64(&xd, a, m, k, r);
    let lo = xwt64(&xa, bm, m, r, n);
    for (y, l) in y.iter_mut().zip(lo) {
        *y += s * l;
    }
    y
}

struct LoraCase {
    m: usize,
    k: usize,
    n: usize,
    r: usize,
    s: f32,
    x: Vec<f32>,
    w: Vec<f32>,
    a: Vec<f32>,
    bm: Vec<f32>,
    mask: Option<Vec<f32>>,
}

fn lora_case(seed: u64, with_mask: bool) -> LoraCase {
    let (m, k, n, r) = (9, 21, 11, 3);
    let mut g = rng(seed);
    LoraCase {
        m,
        k,
        n,
        r,
        s: 2.0,
        x: uniform(&mut g, m * k, 1.0),
        w: uniform(&mut g, n * k, 0.5),
        a: uniform(&mut g, r * k, 0.5),
        bm: uniform(&mut g, n * r, 0.5),
        mask: with_mask.then(|| dropout_mask(&mut g, m * k, 0.25)),
    }
}

fn check_lora_dense_fwd<B: Backend>(b: &B, tol: Tolerance) {
    for with_mask in [false, true] {
        let c = lora_case(2, with_mask);
        let (m, k, n, r) = (c.m, c.k, c.n, c.r);
        let mask64 = c.mask.as_deref().map(f64s);
        let y_ref = lora64(
            &f64s(&c.x),
            &f64s(&c.w),
            &f64s(&c.a),
            &f64s(&c.bm),
            mask64.as_deref(),
            f64::from(c.s),
            m,
            k,
            n,
            r,
        );
        let (xb, wb, ab, bb) = (up(b, &c.x), up(b, &c.w), up(b, &c.a), up(b, &c.bm));
        let maskb = c.mask.as_deref().map(|mk| up(b, mk));
        let mut y = nans(b, m * n);
        let mut xa = nans(b, m * r);
        let lr = LoraRef {
            a: &ab,
            b: &bb,
            r,
            scale: c.s,
            mask: maskb.as_ref(),
        };
        b.lora_fwd(
            &xb,
            Weight::Dense(&wb),
            Some(lr),
            &mut y,
            Some(&mut xa),
            m,
            k,
            n,
        )
        .unwrap();
        tol.assert_close("y", down(b, &y), y_ref.iter().copied());
        let xd: Vec<f64> = match &mask64 {
            Some(mk) => f64s(&c.x).iter().zip(mk).map(|(a, b)| a * b).collect(),
            None => f64s(&c.x),
        };
        tol.assert_close("xa", down(b, &xa), xwt64(&xd, &f64s(&c.a), m, k, r));
        // Without LoRA it is the base linear.
        let mut y = nans(b, m * n);
        b.lora_fwd(&xb, Weight::Dense(&wb), None, &mut y, None, m, k, n)
            .unwrap();
        tol.assert_close(
            "y (no lora)",
            down(b, &y),
            xwt64(&f64s(&c.x), &f64s(&c.w), m, k, n),
        );
    }
}

fn check_lora_dense_bwd<B: Backend>(b: &B, tol: Tolerance) {
    let gtol = widen(tol, 10.0);
    for with_mask in [false, true] {
        let c = lora_case(3, with_mask);
        let (m, k, n, r) = (c.m, c.k, c.n, c.r);
        let s = f64::from(c.s);
        let mut g = rng(30);
        let rr = f64s(&uniform(&mut g, m * n, 1.0));
        let dy: Vec<f32> = rr.iter().map(|&v| v as f32).collect();
        let mask64 = c.mask.as_deref().map(f64s);
        let (x64, w64, a64, b64) = (f64s(&c.x), f64s(&c.w), f64s(&c.a), f64s(&c.bm));
        let fdx = fd_grad(&x64, 1e-6, |x| {
            dot64(
                &rr,
                &lora64(x, &w64, &a64, &b64, mask64.as_deref(), s, m, k, n, r),
            )
        });
        let fda = fd_grad(&a64, 1e-6, |a| {
            dot64(
                &rr,
                &lora64(&x64, &w64, a, &b64, mask64.as_deref(), s, m, k, n, r),
            )
        });
        let fdb = fd_grad(&b64, 1e-6, |bm| {
            dot64(
                &rr,
                &lora64(&x64, &w64, &a64, bm, mask64.as_deref(), s, m, k, n, r),
            )
        });

        let (xb, wb, ab, bb, dyb) = (
            up(b, &c.x),
            up(b, &c.w),
            up(b, &c.a),
            up(b, &c.bm),
            up(b, &dy),
        );
        let maskb = c.mask.as_deref().map(|mk| up(b, mk));
        let mut y = b.zeros(m * n).unwrap();
        let mut xa = b.zeros(m * r).unwrap();
        let lr = LoraRef {
            a: &ab,
            b: &bb,
            r,
            scale: c.s,
            mask: maskb.as_ref(),
        };
        b.lora_fwd(
            &xb,
            Weight::Dense(&wb),
            Some(lr),
            &mut y,
            Some(&mut xa),
            m,
            k,
            n,
        )
        .unwrap();
        // da/db accumulate: start from a known prior and subtract it.
        let prior_a = uniform(&mut g, r * k, 1.0);
        let prior_b = uniform(&mut g, n * r, 1.0);
        let (mut da, mut db) = (up(b, &prior_a), up(b, &prior_b));
        let mut dx = nans(b, m * k);
        let gr = LoraGradRef {
            a: &ab,
            b: &bb,
            r,
            scale: c.s,
            mask: maskb.as_ref(),
            xa: &xa,
            da: &mut da,
            db: &mut db,
        };
        b.lora_bwd(
            &dyb,
            &xb,
            Weight::Dense(&wb),
            Some(gr),
            &mut dx,
            Accum::Overwrite,
            m,
            k,
            n,
        )
        .unwrap();
        gtol.assert_close("dx", down(b, &dx), fdx.iter().copied());
        gtol.assert_close(
            "da",
            down(b, &da)
                .iter()
                .zip(&prior_a)
                .map(|(g, p)| f64::from(*g) - f64::from(*p)),
            fda.iter().copied(),
        );
        gtol.assert_close(
            "db",
            down(b, &db)
                .iter()
                .zip(&prior_b)
                .map(|(g, p)| f64::from(*g) - f64::from(*p)),
            fdb.iter().copied(),
        );

        // dx_acc = Add accumulates onto dx.
        let prior_dx = uniform(&mut g, m * k, 1.0);
        let mut dx = up(b, &prior_dx);
        let (mut da, mut db) = (b.zeros(r * k).unwrap(), b.zeros(n * r).unwrap());
        let gr = LoraGradRef {
            a: &ab,
            b: &bb,
            r,
            scale: c.s,
            mask: maskb.as_ref(),
            xa: &xa,
            da: &mut da,
            db: &mut db,
        };
        b.lora_bwd(
            &dyb,
            &xb,
            Weight::Dense(&wb),
            Some(gr),
            &mut dx,
            Accum::Add,
            m,
            k,
            n,
        )
        .unwrap();
        gtol.assert_close(
            "dx (add)",
            down(b, &dx),
            fdx.iter().zip(&prior_dx).map(|(f, &p)| f + f64::from(p)),
        );
    }
}

fn check_lora_nf4<B: Backend>(b: &B, tol: Tolerance) {
    // numel = 71·45 = 3195: odd and not a multiple of 64 (a half-used last byte, a short last block).
    let (m, k, n, r) = (10, 45, 71, 4);
    // Hand-built tensors (plain and nested absmax) and one made by `nf4::quantize` from a dense weight.
    let quantized =
        afinar_kernels::nf4::quantize(&uniform(&mut rng(41), n * k, 0.2), &[n, k], true).unwrap();
    let weights = [
        random_nf4(4, n, k, false),
        random_nf4(5, n, k, true),
        quantized,
    ];
    for w in weights {
        let wd = w.dequantize().unwrap();
        let mut g = rng(40);
        let x = uniform(&mut g, m * k, 1.0);
        let a = uniform(&mut g, r * k, 0.5);
        let bm = uniform(&mut g, n * r, 0.5);
        let mask = dropout_mask(&mut g, m * k, 0.2);
        let dy = uniform(&mut g, m * n, 1.0);
        let (xb, ab, bb, maskb, dyb, wdb) = (
            up(b, &x),
            up(b, &a),
            up(b, &bm),
            up(b, &mask),
            up(b, &dy),
            up(b, &wd),
        );
        let wq = b.nf4_from_host(&w).unwrap();
        let run = |weight: Weight<'_, B>| {
            let mut y = nans(b, m * n);
            let mut xa = nans(b, m * r);
            let lr = LoraRef {
                a: &ab,
                b: &bb,
                r,
                scale: 0.5,
                mask: Some(&maskb),
            };
            b.lora_fwd(&xb, weight, Some(lr), &mut y, Some(&mut xa), m, k, n)
                .unwrap();
            (down(b, &y), xa)
        };
        let (y_nf4, xa) = run(Weight::Nf4(&wq));
        let (y_dense, _) = run(Weight::Dense(&wdb));
        tol.assert_close(
            "y nf4 vs dense",
            y_nf4.iter().copied(),
            y_dense.iter().copied(),
        );
        let y_ref = lora64(
            &f64s(&x),
            &f64s(&wd),
            &f64s(&a),
            &f64s(&bm),
            Some(&f64s(&mask)),
            0.5,
            m,
            k,
            n,
            r,
        );
        tol.assert_close("y nf4 vs f64", y_nf4.iter().copied(), y_ref);

        let bwd = |weight: Weight<'_, B>| {
            let mut dx = nans(b, m * k);
            let (mut da, mut db) = (b.zeros(r * k).unwrap(), b.zeros(n * r).unwrap());
            let gr = LoraGradRef {
                a: &ab,
                b: &bb,
                r,
                scale: 0.5,
                mask: Some(&maskb),
                xa: &xa,
                da: &mut da,
                db: &mut db,
            };
            b.lora_bwd(
                &dyb,
                &xb,
                weight,
                Some(gr),
                &mut dx,
                Accum::Overwrite,
                m,
                k,
                n,
            )
            .unwrap();
            (down(b, &dx), down(b, &da), down(b, &db))
        };
        let (dx_q, da_q, db_q) = bwd(Weight::Nf4(&wq));
        let (dx_d, da_d, db_d) = bwd(Weight::Dense(&wdb));
        tol.assert_close("dx nf4 vs dense", dx_q, dx_d);
        tol.assert_close("da nf4 vs dense", da_q, da_d);
        tol.assert_close("db nf4 vs dense", db_q, db_d);
    }
}

fn check_nf4_dequantize<B: Backend>(b: &B, tol: Tolerance) {
    // 17·1000 = 17000 elements = 266 blocks (the last one short): two nested blocks of 256.
    let w = random_nf4(6, 17, 1000, true);
    let wq = b.nf4_from_host(&w).unwrap();
    let mut out = nans(b, w.numel());
    b.nf4_dequantize(&wq, &mut out).unwrap();
    let t = if b.name() == "cpu" {
        Tolerance::EXACT
    } else {
        tol
    };
    t.assert_close("dequantized", down(b, &out), w.dequantize().unwrap());
    assert_eq!(
        b.nf4_to_host(&wq).unwrap(),
        w,
        "nf4 round trip through the backend"
    );
}

/// The NF4 path with tiny tiles: many ragged tiles, tile starts at odd element offsets.
#[test]
fn cpu_nf4_tiles_of_any_height_agree_with_dense() {
    let (m, k, n, r) = (6, 13, 29, 2);
    let w = random_nf4(7, n, k, false);
    let wd = w.dequantize().unwrap();
    let mut g = rng(70);
    let x = uniform(&mut g, m * k, 1.0);
    let a = uniform(&mut g, r * k, 0.5);
    let bm = uniform(&mut g, n * r, 0.5);
    let dy = uniform(&mut g, m * n, 1.0);
    let lf = LoraFactors {
        a: &a,
        b: &bm,
        r,
        scale: 1.5,
        mask: None,
    };
    let mut y_d = vec![0.0; m * n];
    let mut xa = vec![0.0; m * r];
    lora::lora_fwd(
        &x,
        WeightRef::Dense(&wd),
        Some(lf),
        &mut y_d,
        Some(&mut xa),
        m,
        k,
        n,
    )
    .unwrap();
    let mut dx_d = vec![0.0; m * k];
    let (mut da_d, mut db_d) = (vec![0.0; r * k], vec![0.0; n * r]);
    let lg = LoraGrads {
        xa: &xa,
        da: &mut da_d,
        db: &mut db_d,
    };
    lora::lora_bwd(
        &dy,
        &x,
        WeightRef::Dense(&wd),
        Some((lf, lg)),
        &mut dx_d,
        Accum::Overwrite,
        m,
        k,
        n,
    )
    .unwrap();
    for tile in [1, 2, 5, 7, 28, 29, 1000] {
        let mut y = vec![f32::NAN; m * n];
        let mut xa_q = vec![f32::NAN; m * r];
        lora::lora_fwd_tiled(
            &x,
            WeightRef::Nf4(&w),
            Some(lf),
            &mut y,
            Some(&mut xa_q),
            m,
            k,
            n,
            tile,
        )
        .unwrap();
        Tolerance::F32.assert_close(&format!("y tile={tile}"), y, y_d.iter().copied());
        let mut dx = vec![f32::NAN; m * k];
        let (mut da, mut db) = (vec![0.0; r * k], vec![0.0; n * r]);
        let lg = LoraGrads {
            xa: &xa_q,
            da: &mut da,
            db: &mut db,
        };
        lora::lora_bwd_tiled(
            &dy,
            &x,
            WeightRef::Nf4(&w),
            Some((lf, lg)),
            &mut dx,
            Accum::Overwrite,
            m,
            k,
            n,
            tile,
        )
        .unwrap();
        Tolerance::F32.assert_close(&format!("dx tile={tile}"), dx, dx_d.iter().copied());
        Tolerance::F32.assert_close(&format!("da tile={tile}"), da, da_d.iter().copied());
        Tolerance::F32.assert_close(&format!("db tile={tile}"), db, db_d.iter().copied());
    }
    // Element ranges starting at odd offsets decode exactly like the host reference.
    let mut out = vec![0.0; 37];
    afinar_kernels::cpu::nf4::dequantize_range(&w, 63, &mut out).unwrap();
    Tolerance::EXACT.assert_close("range 63..100", out, wd[63..100].iter().copied());
}

// ---- Quantization and upload from stored bytes --------------------------------------------------

/// `vals` stored as `dt` (little-endian bytes) and the values those bytes hold.
fn stored(vals: &[f32], dt: RawDtype) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::with_capacity(vals.len() * dt.size());
    for &v in vals {
        match dt {
            RawDtype::F32 => bytes.extend_from_slice(&v.to_le_bytes()),
            RawDtype::Bf16 => {
                bytes.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes())
            }
            RawDtype::F16 => {
                bytes.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes())
            }
        }
    }
    let decoded = (0..vals.len()).map(|i| dt.get(&bytes, i)).collect();
    (bytes, decoded)
}

/// Every field of two NF4 tensors, floats compared by bits.
fn assert_nf4_bits(got: &Nf4Tensor, want: &Nf4Tensor, what: &str) {
    let fb = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(got.shape, want.shape, "{what}: shape");
    assert_eq!(got.packed, want.packed, "{what}: packed codes");
    match (&got.absmax, &want.absmax) {
        (Absmax::Plain(a), Absmax::Plain(b)) => assert_eq!(fb(a), fb(b), "{what}: absmax"),
        (
            Absmax::Nested {
                codes: c1,
                nested_absmax: n1,
                offset: o1,
                code8: m1,
            },
            Absmax::Nested {
                codes: c2,
                nested_absmax: n2,
                offset: o2,
                code8: m2,
            },
        ) => {
            assert_eq!(c1, c2, "{what}: absmax codes");
            assert_eq!(fb(n1), fb(n2), "{what}: nested absmax");
            assert_eq!(o1.to_bits(), o2.to_bits(), "{what}: offset");
            assert_eq!(fb(&m1[..]), fb(&m2[..]), "{what}: code8");
        }
        _ => panic!("{what}: plain vs nested absmax"),
    }
}

/// Values with the cases that decide codes: random magnitudes per block, an all-zero block, a block of
/// exact NF4 threshold ties (absmax 1), tiny (subnormal in f32) values, -0.0.
fn quant_values(seed: u64, n: usize) -> Vec<f32> {
    let mut g = rng(seed);
    let mut v = uniform(&mut g, n, 1.0);
    for (bi, blk) in v.chunks_mut(64).enumerate() {
        let scale = [1.0, 3e-3, 40.0, 0.25][bi % 4];
        blk.iter_mut().for_each(|x| *x *= scale);
    }
    if n > 128 {
        v[64..128].fill(0.0);
    }
    if n > 192 {
        v[128] = 1.0;
        for j in 1..64 {
            v[128 + j] = afinar_kernels::nf4::NF4_THRESHOLDS[j % 15];
        }
    }
    if n > 256 {
        for j in 0..64 {
            v[192 + j] = (j as f32 + 1.0) * 1e-40;
        }
    }
    if n > 5 {
        v[5] = -0.0;
    }
    v
}

fn check_nf4_quantize<B: Backend>(b: &B, _tol: Tolerance) {
    // Sizes not a multiple of 64 (partial last block, odd numel) nor of 64·256 (ragged nested group).
    let shapes: [&[usize]; 7] = [
        &[1],
        &[3, 21],
        &[1, 64],
        &[5, 13],
        &[64, 256],
        &[7, 2357],
        &[33, 530],
    ];
    for dt in [RawDtype::F32, RawDtype::Bf16, RawDtype::F16] {
        for (si, shape) in shapes.iter().enumerate() {
            let n: usize = shape.iter().product();
            let (raw, decoded) = stored(&quant_values(si as u64 + 7, n), dt);
            for dq in [false, true] {
                let what = format!("{} {shape:?} double_quant={dq}", dt.as_str());
                let q = b.nf4_quantize(&raw, dt, shape, dq).unwrap();
                let got = b.nf4_to_host(&q).unwrap();
                let want = afinar_kernels::nf4::quantize(&decoded, shape, dq).unwrap();
                assert_nf4_bits(&got, &want, &what);
                // The resident tensor works as any other: its dequantization is the host's.
                let mut out = b.zeros_for(n, Storage::Master).unwrap();
                b.nf4_dequantize(&q, &mut out).unwrap();
                let deq = want.dequantize().unwrap();
                assert_eq!(
                    down(b, &out)
                        .iter()
                        .map(|x| x.to_bits())
                        .collect::<Vec<_>>(),
                    deq.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "{what}: dequantized"
                );
            }
        }
    }
}

fn check_nf4_quantize_errors<B: Backend>(b: &B, _tol: Tolerance) {
    // Byte length that is not shape × dtype size.
    match b.nf4_quantize(&[0u8; 10], RawDtype::Bf16, &[2, 3], true) {
        Err(KernelError::Shape { op, arg, .. }) => assert_eq!((op, arg), ("nf4_quantize", "raw")),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("10 bytes quantized as a [2, 3] bf16 tensor"),
    }
    // Empty shape.
    assert!(matches!(
        b.nf4_quantize(&[], RawDtype::F32, &[0, 4], false),
        Err(KernelError::Invalid { arg: "shape", .. })
    ));
    // A NaN or an infinity: the host quantizer's error, naming the same element.
    for (bad, dt) in [
        (f32::NAN, RawDtype::Bf16),
        (f32::INFINITY, RawDtype::F32),
        (f32::NEG_INFINITY, RawDtype::F16),
    ] {
        let mut v = quant_values(3, 300);
        v[131] = bad;
        v[250] = bad;
        let (raw, decoded) = stored(&v, dt);
        let want = afinar_kernels::nf4::quantize(&decoded, &[300], true)
            .unwrap_err()
            .to_string();
        assert!(want.contains("element 131"), "{want}");
        let got = match b.nf4_quantize(&raw, dt, &[300], true) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{bad} quantized"),
        };
        assert_eq!(got, want);
    }
}

fn check_from_raw<B: Backend>(b: &B, _tol: Tolerance) {
    let mut g = rng(77);
    let mut v = uniform(&mut g, 1001, 3.0);
    v[7] = 1e-41;
    v[8] = -0.0;
    for dt in [RawDtype::F32, RawDtype::Bf16, RawDtype::F16] {
        let (raw, decoded) = stored(&v, dt);
        for storage in [Storage::Activation, Storage::Master] {
            let got = down(b, &b.from_raw_for(&raw, dt, storage).unwrap());
            let want = down(b, &b.from_host_for(&decoded, storage).unwrap());
            assert_eq!(
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{} {storage:?}",
                dt.as_str()
            );
        }
        // A trailing partial element is refused.
        if dt.size() > 1 {
            assert!(matches!(
                b.from_raw_for(&raw[..raw.len() - 1], dt, Storage::Master),
                Err(KernelError::Shape { arg: "raw", .. })
            ));
        }
    }
}
