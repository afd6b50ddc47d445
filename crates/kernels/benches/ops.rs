//! Criterion benchmarks of the CPU backend. Throughput is reported as elements/s where one "element"
//! is one FLOP (so "Gelem/s" reads GFLOP/s), or as bytes/s for the memory-bound NF4 dequantization.
//!
//! Run: `cargo bench -p afinar-kernels --bench ops -- --warm-up-time 1 --measurement-time 3`
//! Results and machine: docs/benchmarks.md, section "Kernels (CPU)".

use std::hint::black_box;

use afinar_kernels::cpu::{attention, gemm, lora, nf4};
use afinar_kernels::cpu::{LoraFactors, LoraGrads, WeightRef};
use afinar_kernels::nf4::{Absmax, Nf4Tensor, NESTED_BLOCK};
use afinar_kernels::{Accum, AttnShape};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn uniform(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// A random double-quantized NF4 weight [n,k] (codes and absmax random: dequantization cost does
/// not depend on the values).
fn random_nf4(rng: &mut ChaCha8Rng, n: usize, k: usize) -> Nf4Tensor {
    let numel = n * k;
    let blocks = numel.div_ceil(64);
    let mut code8 = Box::new([0.0f32; 256]);
    for (i, c) in code8.iter_mut().enumerate() {
        *c = (i as f32 - 127.5) / 128.0;
    }
    Nf4Tensor {
        shape: vec![n, k],
        packed: (0..numel.div_ceil(2)).map(|_| rng.random()).collect(),
        absmax: Absmax::Nested {
            codes: (0..blocks).map(|_| rng.random()).collect(),
            nested_absmax: (0..blocks.div_ceil(NESTED_BLOCK))
                .map(|_| rng.random_range(0.01..0.02))
                .collect(),
            offset: 0.02,
            code8,
        },
    }
}

fn bench_gemm(c: &mut Criterion) {
    let (m, k, n) = (512, 1024, 1024);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x = uniform(&mut rng, m * k, 1.0);
    let w = uniform(&mut rng, n * k, 1.0);
    let dy = uniform(&mut rng, m * n, 1.0);
    let mut y = vec![0.0; m * n];
    let mut dx = vec![0.0; m * k];
    let mut dw = vec![0.0; n * k];
    let mut g = c.benchmark_group("linear_gemm_M512_K1024_N1024");
    g.sample_size(20);
    g.throughput(Throughput::Elements((2 * m * k * n) as u64));
    g.bench_function("xwt (Y=X·Wᵀ)", |b| {
        b.iter(|| gemm::matmul_xwt(&x, &w, &mut y, m, k, n, Accum::Overwrite).unwrap())
    });
    g.bench_function("dyw (dX=dY·W)", |b| {
        b.iter(|| gemm::matmul_dyw(&dy, &w, &mut dx, m, k, n, Accum::Overwrite).unwrap())
    });
    g.bench_function("dytx (dW=dYᵀ·X)", |b| {
        b.iter(|| gemm::matmul_dytx(&dy, &x, &mut dw, m, k, n, Accum::Overwrite).unwrap())
    });
    g.finish();
}

fn bench_attention(c: &mut Criterion) {
    let s = AttnShape {
        b: 1,
        t: 512,
        tk: 512,
        nh: 8,
        nkv: 4,
        d: 64,
        scale: 0.125,
        softcap: Some(50.0),
        window: None,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let q = uniform(&mut rng, s.b * s.t * s.nh * s.d, 1.0);
    let k = uniform(&mut rng, s.b * s.t * s.nkv * s.d, 1.0);
    let v = uniform(&mut rng, s.b * s.t * s.nkv * s.d, 1.0);
    let dout = uniform(&mut rng, q.len(), 1.0);
    let mut out = vec![0.0; q.len()];
    let mut lse = vec![0.0; s.b * s.nh * s.t];
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    // Causal FLOPs of the forward: two matmuls (QKᵀ, PV) over the T(T+1)/2 visible pairs; the
    // backward counts 2.5× the forward (FlashAttention's convention).
    let fwd_flops = (4 * s.b * s.nh * s.d * s.t * (s.t + 1) / 2) as u64;
    let mut g = c.benchmark_group("attention_B1_T512_NH8_NKV4_D64");
    g.sample_size(10);
    g.throughput(Throughput::Elements(fwd_flops));
    g.bench_function("fwd", |b| {
        b.iter(|| attention::attn_fwd(&q, &k, &v, None, &mut out, &mut lse, &s).unwrap())
    });
    g.throughput(Throughput::Elements(fwd_flops * 7 / 2));
    g.bench_function("fwd+bwd", |b| {
        b.iter(|| {
            attention::attn_fwd(&q, &k, &v, None, &mut out, &mut lse, &s).unwrap();
            attention::attn_bwd(
                &q, &k, &v, None, &out, &lse, &dout, &mut dq, &mut dk, &mut dv, &s,
            )
            .unwrap();
        })
    });
    g.finish();
}

fn bench_nf4_dequant(c: &mut Criterion) {
    let (n, k) = (1024, 1024);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let w = random_nf4(&mut rng, n, k);
    let mut out = vec![0.0; n * k];
    let mut g = c.benchmark_group("nf4_dequant_1024x1024");
    g.sample_size(30);
    // Bytes moved: 0.5 B packed + 4 B f32 out per element, 1 B code per 64-block.
    g.throughput(Throughput::Bytes(
        (n * k / 2 + n * k * 4 + n * k / 64) as u64,
    ));
    g.bench_function("cpu (byte-wise, parallel)", |b| {
        b.iter(|| nf4::nf4_dequantize(&w, &mut out).unwrap())
    });
    g.bench_function("Nf4Tensor::dequantize_into (host reference)", |b| {
        b.iter(|| w.dequantize_into(0, &mut out).unwrap())
    });
    g.finish();
}

fn bench_lora(c: &mut Criterion) {
    let (m, k, n, r) = (512, 1024, 1024, 16);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let wq = random_nf4(&mut rng, n, k);
    let wd = wq.dequantize().unwrap();
    let x = uniform(&mut rng, m * k, 1.0);
    let a = uniform(&mut rng, r * k, 0.03);
    let bm = uniform(&mut rng, n * r, 0.03);
    let dy = uniform(&mut rng, m * n, 1.0);
    let mut y = vec![0.0; m * n];
    let mut xa = vec![0.0; m * r];
    let mut dx = vec![0.0; m * k];
    let mut da = vec![0.0; r * k];
    let mut db = vec![0.0; n * r];
    // Base: Y = X·Wᵀ and dX = dY·W (no dW: frozen). LoRA: X·Aᵀ, xa·Bᵀ, dY·B, dyb·A, dA, dB.
    let flops = (4 * m * k * n + 2 * m * r * (3 * k + 3 * n)) as u64;
    let mut g = c.benchmark_group("lora_linear_fwd_bwd_M512_in1024_out1024_R16");
    g.sample_size(10);
    g.throughput(Throughput::Elements(flops));
    for (name, w) in [
        ("dense f32", WeightRef::Dense(&wd)),
        ("nf4 (tiled dequant)", WeightRef::Nf4(&wq)),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let lf = LoraFactors {
                    a: &a,
                    b: &bm,
                    r,
                    scale: 2.0,
                    mask: None,
                };
                lora::lora_fwd(&x, w, Some(lf), &mut y, Some(&mut xa), m, k, n).unwrap();
                let lg = LoraGrads {
                    xa: &xa,
                    da: &mut da,
                    db: &mut db,
                };
                lora::lora_bwd(
                    &dy,
                    &x,
                    w,
                    Some((lf, lg)),
                    &mut dx,
                    Accum::Overwrite,
                    m,
                    k,
                    n,
                )
                .unwrap();
                black_box(&dx);
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_gemm,
    bench_attention,
    bench_nf4_dequant,
    bench_lora
);
criterion_main!(benches);
