//! The CUDA backend with f16 activations (`CudaOptions::alloc_dtype = Dtype::F16`, the setting of
//! `model.dtype = "f16"` for GPUs without bf16) against the CPU reference on f16-rounded inputs.
//! Without a driver every test prints `skipped: no CUDA driver` and passes. Test names contain "cuda"
//! so the GPU bundle (filter `cuda`) runs them.
//!
//! f16 data never enters the bf16 tensor-core kernels: on every GPU, attention runs on CUDA cores and
//! NF4 training-shape linears dequantize to f16 + cuBLAS CUDA_R_16F (the paths sm_75 has).
#![cfg(feature = "cuda")]

use crate::common::{down, rng, uniform, up};
use afinar_kernels::cuda::{Cuda, CudaOptions, Dtype};
use afinar_kernels::{
    Accum, AttnShape, Backend, Cpu, LoraGradRef, LoraRef, Storage, Tolerance, Weight,
};

/// f16 storage of the result (2^-11 relative rounding) plus f32 accumulation-order differences.
const F16: Tolerance = Tolerance::new(2e-3, 4e-3);

fn cuda_f16() -> Option<Cuda> {
    match Cuda::try_new_with(CudaOptions {
        alloc_dtype: Dtype::F16,
        ..CudaOptions::default()
    }) {
        Ok(Some(c)) => Some(c),
        Ok(None) => {
            eprintln!("skipped: no CUDA driver");
            None
        }
        Err(e) => panic!("the CUDA backend failed to start with f16 activations: {e}"),
    }
}

/// `x` rounded to f16 and back, as the device stores it.
fn h(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| Dtype::F16.round(v)).collect()
}

#[test]
fn cuda_f16_storage_rounds_to_nearest_even_and_overflows_to_inf() {
    let Some(c) = cuda_f16() else { return };
    let x = [
        1.0,
        1.0 + 1.0 / 2048.0, // a tie: rounds to the even 1.0
        1.0 + 3.0 / 2048.0, // a tie: rounds up to the even 1 + 2/1024
        65504.0,
        65519.0,
        65520.0, // halfway to 2^16: ties to even = inf
        -1e5,
        5.960_464_5e-8, // 2^-24, the smallest subnormal
        2.0e-8,         // below half of it: 0
        f32::NAN,
    ];
    let b = up(&c, &x);
    assert_eq!(b.dtype(), Dtype::F16);
    let want = [
        1.0,
        1.0,
        1.0 + 2.0 / 1024.0,
        65504.0,
        65504.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        5.960_464_5e-8,
        0.0,
        f32::NAN,
    ];
    Tolerance::EXACT.assert_close("f16 round trip", down(&c, &b), want);
    // The kernels' conversion (copy through an f32 buffer and back) agrees with the upload's.
    let mut f = c.from_host_for(&x, Storage::Master).unwrap();
    assert_eq!(f.dtype(), Dtype::F32);
    let mut back = c.zeros(x.len()).unwrap();
    c.copy(&f, &mut back).unwrap();
    Tolerance::EXACT.assert_close("f32 -> f16 by kernel", down(&c, &back), want);
    c.copy(&back, &mut f).unwrap();
    Tolerance::EXACT.assert_close("f16 -> f32 by kernel", down(&c, &f), want);
}

#[test]
fn cuda_f16_cublas_gemms_in_f16() {
    let Some(c) = cuda_f16() else { return };
    let (m, k, n) = (33, 64, 40);
    let mut g = rng(16);
    let x = h(&uniform(&mut g, m * k, 1.0));
    let w = h(&uniform(&mut g, n * k, 0.5));
    let mut want = Cpu.zeros(m * n).unwrap();
    Cpu.matmul_xwt(&x, &w, &mut want, m, k, n, Accum::Overwrite)
        .unwrap();
    // f16 × f16 -> f16.
    let mut y = c.zeros(m * n).unwrap();
    c.matmul_xwt(&up(&c, &x), &up(&c, &w), &mut y, m, k, n, Accum::Overwrite)
        .unwrap();
    F16.assert_close("xwt f16", down(&c, &y), want.iter().copied());
    // f16 activation × f32 (Master) weight -> f32 output: the weight joins f16 for cuBLAS.
    let wf = c.from_host_for(&w, Storage::Master).unwrap();
    let mut yf = c.zeros_for(m * n, Storage::Master).unwrap();
    c.matmul_xwt(&up(&c, &x), &wf, &mut yf, m, k, n, Accum::Overwrite)
        .unwrap();
    Tolerance::new(1e-4, 1e-3).assert_close("xwt f16·f32 -> f32", down(&c, &yf), want);
}

#[test]
fn cuda_f16_nf4_lora_linear_at_training_shapes() {
    let Some(c) = cuda_f16() else { return };
    // M > 8: the training-shape path (dequantize to f16 + cuBLAS for f16 activations).
    let (m, k, n, r, s) = (40, 128, 64, 4, 0.5f32);
    let mut g = rng(61);
    let wd = uniform(&mut g, n * k, 0.2);
    let q = afinar_kernels::nf4::quantize(&wd, &[n, k], true).unwrap();
    let x = h(&uniform(&mut g, m * k, 1.0));
    let a = uniform(&mut g, r * k, 0.1);
    let b = uniform(&mut g, n * r, 0.1);
    let dy = h(&uniform(&mut g, m * n, 1.0));
    // CPU reference on the same (f16-rounded) inputs.
    let cq = Cpu.nf4_from_host(&q).unwrap();
    let (mut cy, mut cxa) = (vec![0.0; m * n], vec![0.0; m * r]);
    let lr = LoraRef::<Cpu> {
        a: &a,
        b: &b,
        r,
        scale: s,
        mask: None,
    };
    Cpu.lora_fwd(
        &x,
        Weight::Nf4(&cq),
        Some(lr),
        &mut cy,
        Some(&mut cxa),
        m,
        k,
        n,
    )
    .unwrap();
    let (mut cdx, mut cda, mut cdb) = (vec![0.0; m * k], vec![0.0; r * k], vec![0.0; n * r]);
    let lg = LoraGradRef::<Cpu> {
        a: &a,
        b: &b,
        r,
        scale: s,
        mask: None,
        xa: &cxa,
        da: &mut cda,
        db: &mut cdb,
    };
    Cpu.lora_bwd(
        &dy,
        &x,
        Weight::Nf4(&cq),
        Some(lg),
        &mut cdx,
        Accum::Overwrite,
        m,
        k,
        n,
    )
    .unwrap();

    let gq = c.nf4_from_host(&q).unwrap();
    let (ga, gb) = (
        c.from_host_for(&a, Storage::Master).unwrap(),
        c.from_host_for(&b, Storage::Master).unwrap(),
    );
    let gx = up(&c, &x);
    let mut gy = up(&c, &vec![f32::NAN; m * n]);
    let mut gxa = c.zeros_for(m * r, Storage::Master).unwrap();
    let lr = LoraRef::<Cuda> {
        a: &ga,
        b: &gb,
        r,
        scale: s,
        mask: None,
    };
    c.lora_fwd(
        &gx,
        Weight::Nf4(&gq),
        Some(lr),
        &mut gy,
        Some(&mut gxa),
        m,
        k,
        n,
    )
    .unwrap();
    // Loose bound (not yet measured on a GPU): f16 W̃ and X, f32 accumulation, f16 Y.
    Tolerance::BF16.assert_close("nf4 lora_fwd y", down(&c, &gy), cy);
    Tolerance::new(1e-4, 1e-3).assert_close("nf4 lora_fwd xa", down(&c, &gxa), cxa);

    let mut gdx = up(&c, &vec![f32::NAN; m * k]);
    let mut gda = c.zeros_for(r * k, Storage::Master).unwrap();
    let mut gdb = c.zeros_for(n * r, Storage::Master).unwrap();
    let lg = LoraGradRef::<Cuda> {
        a: &ga,
        b: &gb,
        r,
        scale: s,
        mask: None,
        xa: &gxa,
        da: &mut gda,
        db: &mut gdb,
    };
    c.lora_bwd(
        &up(&c, &dy),
        &gx,
        Weight::Nf4(&gq),
        Some(lg),
        &mut gdx,
        Accum::Overwrite,
        m,
        k,
        n,
    )
    .unwrap();
    Tolerance::BF16.assert_close("nf4 lora_bwd dx", down(&c, &gdx), cdx);
    Tolerance::new(1e-3, 1e-2).assert_close("nf4 lora_bwd da", down(&c, &gda), cda);
    Tolerance::new(1e-3, 1e-2).assert_close("nf4 lora_bwd db", down(&c, &gdb), cdb);
}

#[test]
fn cuda_f16_attention_forward_backward_in_f16() {
    let Some(c) = cuda_f16() else { return };
    let s = AttnShape {
        b: 1,
        t: 37,
        tk: 37,
        nh: 4,
        nkv: 2,
        d: 64,
        scale: 0.125,
        softcap: Some(50.0),
        window: Some(16),
    };
    let (qn, kn, ln) = (
        s.b * s.t * s.nh * s.d,
        s.b * s.tk * s.nkv * s.d,
        s.b * s.nh * s.t,
    );
    let mut g = rng(37);
    let q = h(&uniform(&mut g, qn, 1.0));
    let k = h(&uniform(&mut g, kn, 1.0));
    let v = h(&uniform(&mut g, kn, 1.0));
    let dout = h(&uniform(&mut g, qn, 1.0));
    let (mut out, mut lse) = (vec![0.0; qn], vec![0.0; ln]);
    Cpu.attn_fwd(&q, &k, &v, None, &mut out, &mut lse, &s)
        .unwrap();
    let (mut dq, mut dk, mut dv) = (vec![0.0; qn], vec![0.0; kn], vec![0.0; kn]);
    Cpu.attn_bwd(
        &q, &k, &v, None, &out, &lse, &dout, &mut dq, &mut dk, &mut dv, &s,
    )
    .unwrap();

    let (gq, gk, gv) = (up(&c, &q), up(&c, &k), up(&c, &v));
    let mut gout = up(&c, &vec![f32::NAN; qn]);
    let mut glse = c.zeros_for(ln, Storage::Master).unwrap();
    c.attn_fwd(&gq, &gk, &gv, None, &mut gout, &mut glse, &s)
        .unwrap();
    Tolerance::BF16.assert_close("attn out", down(&c, &gout), out.iter().copied());
    Tolerance::new(1e-3, 1e-3).assert_close("attn lse", down(&c, &glse), lse.iter().copied());
    let (mut gdq, mut gdk, mut gdv) = (
        up(&c, &vec![f32::NAN; qn]),
        up(&c, &vec![f32::NAN; kn]),
        up(&c, &vec![f32::NAN; kn]),
    );
    c.attn_bwd(
        &gq,
        &gk,
        &gv,
        None,
        &gout,
        &glse,
        &up(&c, &dout),
        &mut gdq,
        &mut gdk,
        &mut gdv,
        &s,
    )
    .unwrap();
    let tol = Tolerance::new(2e-2, 3e-2);
    tol.assert_close("attn dq", down(&c, &gdq), dq);
    tol.assert_close("attn dk", down(&c, &gdk), dk);
    tol.assert_close("attn dv", down(&c, &gdv), dv);
}

#[test]
fn cuda_f16_bf16_activations_are_refused_below_sm_80_and_f16_is_accepted() {
    let Some(c) = cuda_f16() else { return };
    let arch: u32 = c
        .arch()
        .trim_start_matches("sm_")
        .trim_end_matches(|ch: char| ch.is_ascii_alphabetic())
        .parse()
        .unwrap();
    let bf = Cuda::try_new_with(CudaOptions {
        alloc_dtype: Dtype::Bf16,
        ..CudaOptions::default()
    });
    if arch < 80 {
        let e = bf
            .err()
            .expect("bf16 must be refused below sm_80")
            .to_string();
        assert!(e.contains("bf16") && e.contains("f16"), "{e}");
    } else {
        assert!(bf.unwrap().is_some());
    }
}
