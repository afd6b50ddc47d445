//! Every CUDA attention path against the CPU reference at long, ragged lengths (T up to 4093, not a
//! multiple of any tile): attention_flash.cu (the default for bf16 at D ∈ {128, 256}), attention.cu's
//! first tensor-core kernels (`CudaOptions::mma_attention`, `AFINAR_ATTN_PATH=mma`), the flash backward
//! with the ≤ 99 KiB tiling of sm_86/89 (`small_flash_bwd`, `AFINAR_ATTN_PATH=flash-small`) and its CUDA-core
//! kernels (`simt_attention`), forward and backward, with GQA, the soft-cap, a sliding window, packed
//! segments and TK > T. bf16 storage; the CPU runs on the same bf16-rounded inputs in f32.
//!
//! GPU-only: without a driver every test prints `skipped: no CUDA driver` and passes before any CPU
//! work (the CPU reference at these sizes takes seconds, too slow for CI's debug builds); names contain
//! "cuda" so the GPU bundle runs them (release build).
#![cfg(feature = "cuda")]

use crate::common::{rng, uniform};
use afinar_kernels::cuda::{Cuda, CudaOptions, Dtype};
use afinar_kernels::{AttnShape, Backend, Cpu, Tolerance};

fn cuda(opts: CudaOptions) -> Option<Cuda> {
    match Cuda::try_new_with(opts) {
        Ok(Some(c)) => Some(c),
        Ok(None) => {
            eprintln!("skipped: no CUDA driver");
            None
        }
        Err(e) => panic!("the CUDA backend failed to start: {e}"),
    }
}

/// The paths, by name: (name, mma_attention, simt_attention, small_flash_bwd). "flash-small" is the
/// flash backward with the ≤ 99 KiB tiling sm_86/89 get, forced on this GPU.
const PATHS: [(&str, bool, bool, bool); 4] = [
    ("flash", false, false, false),
    ("flash-small", false, false, true),
    ("mma", true, false, false),
    ("simt", false, true, false),
];

fn max_abs(x: &[f32]) -> f64 {
    x.iter().fold(0.0f32, |a, &v| a.max(v.abs())) as f64
}

/// bf16 products and a bf16 result in long sums.
fn bf16_tol(reference: &[f32]) -> Tolerance {
    Tolerance::new(0.02 * max_abs(reference).max(1e-3), 0.02)
}

/// One shape through every path, forward (and backward when TK = T), against the CPU.
fn check(s: &AttnShape, seg: Option<Vec<i32>>, seed: u64) {
    let Some(first) = cuda(CudaOptions {
        alloc_dtype: Dtype::Bf16,
        ..CudaOptions::default()
    }) else {
        return;
    };
    let (qn, kn) = (s.b * s.t * s.nh * s.d, s.b * s.tk * s.nkv * s.d);
    let mut g = rng(seed);
    // Round through the device's bf16 so the CPU sees exactly the GPU's inputs.
    let round = |x: Vec<f32>| {
        first
            .to_host(&first.from_host_as(&x, Dtype::Bf16).unwrap())
            .unwrap()
    };
    let q = round(uniform(&mut g, qn, 1.0));
    let k = round(uniform(&mut g, kn, 1.0));
    let v = round(uniform(&mut g, kn, 1.0));
    let dout = round(uniform(&mut g, qn, 1.0));
    drop(first);
    let cpu = Cpu;
    let cseg = seg.as_ref().map(|sg| cpu.ids_from_host(sg).unwrap());
    let (cq, ck, cv) = (
        cpu.from_host(&q).unwrap(),
        cpu.from_host(&k).unwrap(),
        cpu.from_host(&v).unwrap(),
    );
    let mut co = cpu.zeros(qn).unwrap();
    let mut cl = cpu.zeros(s.b * s.nh * s.t).unwrap();
    cpu.attn_fwd(&cq, &ck, &cv, cseg.as_ref(), &mut co, &mut cl, s)
        .unwrap();
    let bwd = s.t == s.tk;
    let mut want = vec![cpu.to_host(&co).unwrap(), cpu.to_host(&cl).unwrap()];
    if bwd {
        let cd = cpu.from_host(&dout).unwrap();
        let (mut dq, mut dk, mut dv) = (
            cpu.zeros(qn).unwrap(),
            cpu.zeros(kn).unwrap(),
            cpu.zeros(kn).unwrap(),
        );
        cpu.attn_bwd(
            &cq,
            &ck,
            &cv,
            cseg.as_ref(),
            &co,
            &cl,
            &cd,
            &mut dq,
            &mut dk,
            &mut dv,
            s,
        )
        .unwrap();
        want.extend([dq, dk, dv].iter().map(|x| cpu.to_host(x).unwrap()));
    }
    for (path, mma, simt, small) in PATHS {
        let c = cuda(CudaOptions {
            alloc_dtype: Dtype::Bf16,
            mma_attention: mma,
            simt_attention: simt,
            small_flash_bwd: small,
            ..CudaOptions::default()
        })
        .expect("the driver was there a moment ago");
        let gseg = seg.as_ref().map(|sg| c.ids_from_host(sg).unwrap());
        let up = |x: &[f32]| c.from_host_as(x, Dtype::Bf16).unwrap();
        let (gq, gk, gv) = (up(&q), up(&k), up(&v));
        let mut go = c.zeros_as(qn, Dtype::Bf16).unwrap();
        let mut gl = c.zeros_as(s.b * s.nh * s.t, Dtype::F32).unwrap();
        c.attn_fwd(&gq, &gk, &gv, gseg.as_ref(), &mut go, &mut gl, s)
            .unwrap();
        let mut got = vec![c.to_host(&go).unwrap(), c.to_host(&gl).unwrap()];
        if bwd {
            let gd = up(&dout);
            let (mut dq, mut dk, mut dv) = (
                c.zeros_as(qn, Dtype::Bf16).unwrap(),
                c.zeros_as(kn, Dtype::Bf16).unwrap(),
                c.zeros_as(kn, Dtype::Bf16).unwrap(),
            );
            c.attn_bwd(
                &gq,
                &gk,
                &gv,
                gseg.as_ref(),
                &go,
                &gl,
                &gd,
                &mut dq,
                &mut dk,
                &mut dv,
                s,
            )
            .unwrap();
            got.extend([dq, dk, dv].iter().map(|x| c.to_host(x).unwrap()));
        }
        let tag = format!("{path} T={} TK={} D={} W={:?}", s.t, s.tk, s.d, s.window);
        for ((name, g), w) in ["out", "lse", "dq", "dk", "dv"].iter().zip(&got).zip(&want) {
            let tol = if *name == "lse" {
                Tolerance::new(2e-3, 1e-3)
            } else {
                bf16_tol(w)
            };
            tol.assert_close(
                &format!("{name} ({tag})"),
                g.iter().copied(),
                w.iter().copied(),
            );
        }
    }
}

/// (B, T, TK), (NH, NKV, D), soft-cap, window; scale D^-1/2.
fn shape(
    (b, t, tk): (usize, usize, usize),
    (nh, nkv, d): (usize, usize, usize),
    cap: Option<f32>,
    window: Option<usize>,
) -> AttnShape {
    AttnShape {
        b,
        t,
        tk,
        nh,
        nkv,
        d,
        scale: (d as f32).powf(-0.5),
        softcap: cap,
        window,
    }
}

#[test]
fn cuda_attention_paths_long_causal_d256() {
    // Gemma-2's head dim and soft-cap at 4093 tokens: 64 query blocks, the last one ragged.
    check(
        &shape((1, 4093, 4093), (2, 1, 256), Some(50.0), None),
        None,
        1,
    );
}

#[test]
fn cuda_attention_paths_window_segments_d256() {
    // A 1000-token window (whole key tiles skipped) and two packed samples.
    let seg = (0..2500).map(|i| if i < 1500 { 0 } else { 1 }).collect();
    check(
        &shape((1, 2500, 2500), (4, 2, 256), Some(50.0), Some(1000)),
        Some(seg),
        2,
    );
}

#[test]
fn cuda_attention_paths_d128_batch() {
    let seg = (0..2 * 1031)
        .map(|i| if i % 1031 < 700 { 3 } else { 4 })
        .collect();
    check(
        &shape((2, 1031, 1031), (4, 2, 128), Some(30.0), Some(300)),
        Some(seg),
        3,
    );
}

#[test]
fn cuda_attention_paths_kv_cache_offset() {
    // TK > T (decoding with a cache): forward only.
    check(
        &shape((1, 300, 1100), (4, 2, 256), Some(50.0), Some(512)),
        None,
        4,
    );
}
