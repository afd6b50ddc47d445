//! CUDA-only checks against the CPU reference, for the paths the shared op tests (tests/it/ops_*.rs, which
//! run every op on both backends) do not reach with their small shapes: the NF4 GEMV (M ≤ 8) and the
//! 16-element fast paths (K % 16 == 0), several 128×128 tiles of the mma GEMM with ragged edges, the
//! fused LoRA terms with and without dropout, bf16 storage, head dim 256 attention, the chunked LM
//! head, and the fallback GEMM. Without a driver every test prints `skipped: no CUDA driver` and passes.
//! Outputs are poisoned (NaN) before each call so unwritten elements fail the comparison.

use super::{Cuda, CudaOptions, Dtype};
use crate::backend::{Accum, AttnShape, Backend, LoraGradRef, LoraRef, Weight};
use crate::cpu::Cpu;
use crate::nf4::{Absmax, Nf4Tensor};
use crate::tolerance::Tolerance;

/// A small deterministic generator (xorshift64*), so these tests need no dev-dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [−s, s).
    fn uniform(&mut self, n: usize, s: f32) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * s)
            .collect()
    }
}

fn with_cuda(opts: CudaOptions, f: impl FnOnce(&Cuda)) {
    match Cuda::try_new_with(opts) {
        Ok(Some(c)) => f(&c),
        Ok(None) => eprintln!("skipped: no CUDA driver"),
        Err(e) => panic!("the CUDA backend failed to start: {e}"),
    }
}

fn cuda_f32(f: impl FnOnce(&Cuda)) {
    with_cuda(CudaOptions::default(), f)
}

fn random_nf4(seed: u64, n: usize, k: usize, nested: bool) -> Nf4Tensor {
    let mut g = Rng::new(seed);
    let numel = n * k;
    let blocks = numel.div_ceil(64);
    let packed: Vec<u8> = (0..numel.div_ceil(2)).map(|_| g.next_u64() as u8).collect();
    let absmax = if nested {
        let mut code8 = Box::new([0.0f32; 256]);
        for (i, c) in code8.iter_mut().enumerate() {
            *c = (i as f32 - 127.5) / 128.0;
        }
        Absmax::Nested {
            codes: (0..blocks).map(|_| g.next_u64() as u8).collect(),
            nested_absmax: g
                .uniform(blocks.div_ceil(256), 0.1)
                .iter()
                .map(|v| v.abs() + 0.05)
                .collect(),
            offset: 0.3,
            code8,
        }
    } else {
        Absmax::Plain(
            g.uniform(blocks, 0.5)
                .iter()
                .map(|v| v.abs() + 0.01)
                .collect(),
        )
    };
    Nf4Tensor {
        shape: vec![n, k],
        packed,
        absmax,
    }
}

/// bf16 operands in a long reduction: absolute error scales with the output magnitude, so the bound
/// is relative to the largest reference value.
fn bf16_gemm_tol(reference: &[f32]) -> Tolerance {
    let max = reference.iter().fold(0.0f32, |a, &v| a.max(v.abs())) as f64;
    Tolerance::new(0.02 * max.max(1e-3), 0.02)
}

/// f32 sums in a different order than the CPU's: rounding grows with the length of the sum and the
/// size of its terms, so the absolute bound is relative to the largest reference value.
fn f32_sum_tol(reference: &[f32]) -> Tolerance {
    let max = reference.iter().fold(0.0f32, |a, &v| a.max(v.abs())) as f64;
    Tolerance::new(2e-5 * max.max(1e-3), 1e-4)
}

fn poisoned(c: &Cuda, n: usize) -> super::CudaBuf {
    c.from_host(&vec![f32::NAN; n]).unwrap()
}

/// LoRA forward and backward with an NF4 base on the GPU against the CPU, for shapes that take the
/// GEMV and GEMM kernels, fast and generic NF4 paths, with and without dropout.
#[test]
fn nf4_lora_paths_match_cpu() {
    cuda_f32(|c| {
        let cpu = Cpu;
        // (m, k, n, r, nested, dropout)
        let cases = [
            (1, 128, 80, 4, true, false),    // GEMV, fast path
            (5, 45, 7, 2, false, true),      // GEMV, generic path, dropout
            (8, 256, 33, 3, true, true),     // GEMV at the M limit
            (130, 256, 136, 5, true, false), // GEMM: 2×2 tiles, ragged, fused LoRA in fwd and bwd
            (9, 48, 129, 16, false, true),   // GEMM, dropout (LoRA dx in a separate pass)
            (200, 40, 20, 33, true, false),  // GEMM, generic NF4 path, rank > 32 (two LoRA k-steps)
        ];
        for (i, &(m, k, n, r, nested, dropout)) in cases.iter().enumerate() {
            let mut g = Rng::new(100 + i as u64);
            let w = random_nf4(7 + i as u64, n, k, nested);
            let x = g.uniform(m * k, 1.0);
            let a = g.uniform(r * k, 0.3);
            let b = g.uniform(n * r, 0.3);
            let mask: Vec<f32> = g
                .uniform(m * k, 1.0)
                .iter()
                .map(|&v| if v < -0.6 { 0.0 } else { 1.0 / 0.8 })
                .collect();
            let dy = g.uniform(m * n, 1.0);
            let s = 0.7f32;
            let tag = format!(
                "case {i} (M={m}, K={k}, N={n}, R={r}, nested={nested}, dropout={dropout})"
            );

            // CPU reference.
            let (wq_h, xa_h, y_h, dx_h, da_h, db_h) = {
                let wq = cpu.nf4_from_host(&w).unwrap();
                let (x, a, b, mk, dy) = (x.clone(), a.clone(), b.clone(), mask.clone(), dy.clone());
                let mut y = vec![0.0; m * n];
                let mut xa = vec![0.0; m * r];
                let lr = LoraRef::<Cpu> {
                    a: &a,
                    b: &b,
                    r,
                    scale: s,
                    mask: dropout.then_some(&mk),
                };
                cpu.lora_fwd(
                    &x,
                    Weight::Nf4(&wq),
                    Some(lr),
                    &mut y,
                    Some(&mut xa),
                    m,
                    k,
                    n,
                )
                .unwrap();
                let (mut dx, mut da, mut db) =
                    (vec![0.5; m * k], vec![0.25; r * k], vec![-0.25; n * r]);
                let lg = LoraGradRef::<Cpu> {
                    a: &a,
                    b: &b,
                    r,
                    scale: s,
                    mask: dropout.then_some(&mk),
                    xa: &xa,
                    da: &mut da,
                    db: &mut db,
                };
                cpu.lora_bwd(
                    &dy,
                    &x,
                    Weight::Nf4(&wq),
                    Some(lg),
                    &mut dx,
                    Accum::Add,
                    m,
                    k,
                    n,
                )
                .unwrap();
                (wq, xa, y, dx, da, db)
            };
            let _ = wq_h;

            let wq = c.nf4_from_host(&w).unwrap();
            let (xd, ad, bd, mkd, dyd) = (
                c.from_host(&x).unwrap(),
                c.from_host(&a).unwrap(),
                c.from_host(&b).unwrap(),
                c.from_host(&mask).unwrap(),
                c.from_host(&dy).unwrap(),
            );
            let mut y = poisoned(c, m * n);
            let mut xa = poisoned(c, m * r);
            let lr = LoraRef::<Cuda> {
                a: &ad,
                b: &bd,
                r,
                scale: s,
                mask: dropout.then_some(&mkd),
            };
            c.lora_fwd(
                &xd,
                Weight::Nf4(&wq),
                Some(lr),
                &mut y,
                Some(&mut xa),
                m,
                k,
                n,
            )
            .unwrap();
            let (y, xa_g) = (c.to_host(&y).unwrap(), c.to_host(&xa).unwrap());
            f32_sum_tol(&xa_h).assert_close(
                &format!("{tag}: xa"),
                xa_g.iter().copied(),
                xa_h.iter().copied(),
            );
            bf16_gemm_tol(&y_h).assert_close(
                &format!("{tag}: y"),
                y.iter().copied(),
                y_h.iter().copied(),
            );

            let mut dx = c.from_host(&vec![0.5; m * k]).unwrap();
            let mut da = c.from_host(&vec![0.25; r * k]).unwrap();
            let mut db = c.from_host(&vec![-0.25; n * r]).unwrap();
            let xa_d = c.from_host(&xa_h).unwrap();
            let lg = LoraGradRef::<Cuda> {
                a: &ad,
                b: &bd,
                r,
                scale: s,
                mask: dropout.then_some(&mkd),
                xa: &xa_d,
                da: &mut da,
                db: &mut db,
            };
            c.lora_bwd(
                &dyd,
                &xd,
                Weight::Nf4(&wq),
                Some(lg),
                &mut dx,
                Accum::Add,
                m,
                k,
                n,
            )
            .unwrap();
            bf16_gemm_tol(&dx_h).assert_close(
                &format!("{tag}: dx"),
                c.to_host(&dx).unwrap(),
                dx_h.iter().copied(),
            );
            f32_sum_tol(&da_h).assert_close(
                &format!("{tag}: da"),
                c.to_host(&da).unwrap(),
                da_h.iter().copied(),
            );
            f32_sum_tol(&db_h).assert_close(
                &format!("{tag}: db"),
                c.to_host(&db).unwrap(),
                db_h.iter().copied(),
            );
        }
    });
}

/// Dequantization: fast 16-element chunks and a ragged tail, f32 and bf16 output, bit-exact in f32.
#[test]
fn nf4_dequant_matches_host() {
    cuda_f32(|c| {
        for (i, &(n, k, nested)) in [(64, 64, true), (3, 37, false), (300, 700, true)]
            .iter()
            .enumerate()
        {
            let w = random_nf4(50 + i as u64, n, k, nested);
            let host = w.dequantize().unwrap();
            let wq = c.nf4_from_host(&w).unwrap();
            let mut out = poisoned(c, n * k);
            c.nf4_dequantize(&wq, &mut out).unwrap();
            Tolerance::EXACT.assert_close(
                "nf4 dequant f32",
                c.to_host(&out).unwrap(),
                host.iter().copied(),
            );
            let mut out16 = c.zeros_as(n * k, Dtype::Bf16).unwrap();
            c.nf4_dequantize(&wq, &mut out16).unwrap();
            let want16: Vec<f32> = host
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect();
            Tolerance::EXACT.assert_close("nf4 dequant bf16", c.to_host(&out16).unwrap(), want16);
        }
    });
}

/// Attention at Gemma-2's head dim 256 with GQA, soft-cap, a window and two packed segments, in f32
/// and bf16 storage, with the tensor-core and the CUDA-core forward; forward and backward against the
/// CPU.
#[test]
fn attention_d256_matches_cpu() {
    for (dtype, simt) in [
        (Dtype::F32, true),
        (Dtype::F32, false),
        (Dtype::Bf16, false),
        (Dtype::Bf16, true),
    ] {
        with_cuda(
            CudaOptions {
                alloc_dtype: dtype,
                simt_attention: simt,
                ..CudaOptions::default()
            },
            |c| {
                let cpu = Cpu;
                let s = AttnShape {
                    b: 2,
                    t: 19,
                    tk: 19,
                    nh: 4,
                    nkv: 2,
                    d: 256,
                    scale: 256f32.powf(-0.5),
                    softcap: Some(50.0),
                    window: Some(7),
                };
                let mut g = Rng::new(9);
                let qn = s.b * s.t * s.nh * s.d;
                let kn = s.b * s.tk * s.nkv * s.d;
                let (q, k, v, dout) = (
                    g.uniform(qn, 1.0),
                    g.uniform(kn, 1.0),
                    g.uniform(kn, 1.0),
                    g.uniform(qn, 1.0),
                );
                let seg: Vec<i32> = (0..s.b * s.tk)
                    .map(|i| if i % s.tk < 11 { 0 } else { 1 })
                    .collect();
                // Round inputs to the storage dtype so both backends see the same values.
                let round = |x: &[f32]| -> Vec<f32> {
                    if dtype == Dtype::Bf16 {
                        x.iter()
                            .map(|&v| half::bf16::from_f32(v).to_f32())
                            .collect()
                    } else {
                        x.to_vec()
                    }
                };
                let (q, k, v, dout) = (round(&q), round(&k), round(&v), round(&dout));
                let segc = cpu.ids_from_host(&seg).unwrap();
                let (mut o_c, mut l_c) = (vec![0.0; qn], vec![0.0; s.b * s.nh * s.t]);
                cpu.attn_fwd(&q, &k, &v, Some(&segc), &mut o_c, &mut l_c, &s)
                    .unwrap();
                let (mut dq_c, mut dk_c, mut dv_c) = (vec![0.0; qn], vec![0.0; kn], vec![0.0; kn]);
                cpu.attn_bwd(
                    &q,
                    &k,
                    &v,
                    Some(&segc),
                    &o_c,
                    &l_c,
                    &dout,
                    &mut dq_c,
                    &mut dk_c,
                    &mut dv_c,
                    &s,
                )
                .unwrap();

                let up = |x: &[f32]| c.from_host(x).unwrap();
                let (qd, kd, vd, dod) = (up(&q), up(&k), up(&v), up(&dout));
                let segd = c.ids_from_host(&seg).unwrap();
                let (mut o, mut l) = (
                    poisoned(c, qn),
                    c.zeros_as(s.b * s.nh * s.t, Dtype::F32).unwrap(),
                );
                c.fill(&mut l, f32::NAN).unwrap();
                c.attn_fwd(&qd, &kd, &vd, Some(&segd), &mut o, &mut l, &s)
                    .unwrap();
                // The tensor-core forward (bf16 storage only) rounds P to bf16; f32 storage always
                // takes the CUDA-core kernels, so it must match the CPU to f32 rounding.
                let (tol, ltol) = if dtype == Dtype::Bf16 {
                    (Tolerance::BF16, Tolerance::new(5e-3, 5e-3))
                } else {
                    (Tolerance::new(1e-4, 1e-3), Tolerance::new(1e-4, 1e-4))
                };
                tol.assert_close("attn out", c.to_host(&o).unwrap(), o_c.iter().copied());
                ltol.assert_close("attn lse", c.to_host(&l).unwrap(), l_c.iter().copied());
                let o_in = up(&o_c);
                let l_in = c.from_host_as(&l_c, Dtype::F32).unwrap();
                let (mut dq, mut dk, mut dv) = (poisoned(c, qn), poisoned(c, kn), poisoned(c, kn));
                c.attn_bwd(
                    &qd,
                    &kd,
                    &vd,
                    Some(&segd),
                    &o_in,
                    &l_in,
                    &dod,
                    &mut dq,
                    &mut dk,
                    &mut dv,
                    &s,
                )
                .unwrap();
                // The tensor-core backward (bf16 storage only) rounds P and dS to bf16.
                let gtol = if dtype == Dtype::Bf16 {
                    Tolerance::new(3e-2, 3e-2)
                } else {
                    Tolerance::new(1e-4, 1e-3)
                };
                gtol.assert_close("attn dq", c.to_host(&dq).unwrap(), dq_c.iter().copied());
                gtol.assert_close("attn dk", c.to_host(&dk).unwrap(), dk_c.iter().copied());
                gtol.assert_close("attn dv", c.to_host(&dv).unwrap(), dv_c.iter().copied());
            },
        );
    }
}

/// The chunked LM head + cross-entropy with soft-cap, against the CPU (loss, count, both gradients).
#[test]
fn lm_head_ce_matches_cpu() {
    cuda_f32(|c| {
        let cpu = Cpu;
        let (n, h, v) = (37, 24, 301);
        let mut g = Rng::new(3);
        let hidden = g.uniform(n * h, 1.0);
        let emb = g.uniform(v * h, 1.0);
        let labels: Vec<i32> = (0..n)
            .map(|i| {
                if i % 5 == 0 {
                    -100
                } else {
                    ((i * 37) % v) as i32
                }
            })
            .collect();
        let lc = cpu.ids_from_host(&labels).unwrap();
        let (mut dh_c, mut de_c) = (vec![0.1; n * h], vec![0.0; v * h]);
        let (loss_c, cnt_c) = cpu
            .lm_head_ce(
                &hidden,
                &emb,
                &lc,
                n,
                h,
                v,
                Some(30.0),
                0.5,
                Some(&mut dh_c),
                Some(&mut de_c),
            )
            .unwrap();
        let (hd, ed) = (c.from_host(&hidden).unwrap(), c.from_host(&emb).unwrap());
        let ld = c.ids_from_host(&labels).unwrap();
        let mut dh = c.from_host(&vec![0.1; n * h]).unwrap();
        let mut de = c.zeros(v * h).unwrap();
        let (loss, cnt) = c
            .lm_head_ce(
                &hd,
                &ed,
                &ld,
                n,
                h,
                v,
                Some(30.0),
                0.5,
                Some(&mut dh),
                Some(&mut de),
            )
            .unwrap();
        assert_eq!(cnt, cnt_c);
        Tolerance::new(1e-3, 1e-4).assert_close("loss", [loss], [loss_c]);
        Tolerance::new(1e-4, 1e-3).assert_close(
            "dhidden",
            c.to_host(&dh).unwrap(),
            dh_c.iter().copied(),
        );
        Tolerance::new(1e-4, 1e-3).assert_close(
            "demb",
            c.to_host(&de).unwrap(),
            de_c.iter().copied(),
        );
    });
}

/// The three dense matmuls through the fallback GEMM (kernels/gemm.cu) and through cuBLAS, mixed
/// dtypes included, against the CPU.
#[test]
fn dense_matmuls_both_gemm_backends() {
    for fallback in [false, true] {
        with_cuda(
            CudaOptions {
                force_fallback_gemm: fallback,
                ..CudaOptions::default()
            },
            |c| {
                let cpu = Cpu;
                let (m, k, n) = (33, 70, 17);
                let mut g = Rng::new(11);
                let (x, w, dy) = (
                    g.uniform(m * k, 1.0),
                    g.uniform(n * k, 1.0),
                    g.uniform(m * n, 1.0),
                );
                let mut y_c = vec![1.0; m * n];
                cpu.matmul_xwt(&x, &w, &mut y_c, m, k, n, Accum::Add)
                    .unwrap();
                let mut dx_c = vec![0.0; m * k];
                cpu.matmul_dyw(&dy, &w, &mut dx_c, m, k, n, Accum::Overwrite)
                    .unwrap();
                let mut dw_c = vec![2.0; n * k];
                cpu.matmul_dytx(&dy, &x, &mut dw_c, m, k, n, Accum::Add)
                    .unwrap();
                // x in bf16 and w in f32: the mixed case.
                let xb: Vec<f32> = x
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_f32())
                    .collect();
                let mut y_cb = vec![1.0; m * n];
                cpu.matmul_xwt(&xb, &w, &mut y_cb, m, k, n, Accum::Add)
                    .unwrap();

                let (xd, wd, dyd) = (
                    c.from_host(&x).unwrap(),
                    c.from_host(&w).unwrap(),
                    c.from_host(&dy).unwrap(),
                );
                let f32tol = Tolerance::new(1e-4, 1e-4);
                let mut y = c.from_host(&vec![1.0; m * n]).unwrap();
                c.matmul_xwt(&xd, &wd, &mut y, m, k, n, Accum::Add).unwrap();
                f32tol.assert_close("xwt", c.to_host(&y).unwrap(), y_c.iter().copied());
                let mut dx = poisoned(c, m * k);
                c.matmul_dyw(&dyd, &wd, &mut dx, m, k, n, Accum::Overwrite)
                    .unwrap();
                f32tol.assert_close("dyw", c.to_host(&dx).unwrap(), dx_c.iter().copied());
                let mut dw = c.from_host(&vec![2.0; n * k]).unwrap();
                c.matmul_dytx(&dyd, &xd, &mut dw, m, k, n, Accum::Add)
                    .unwrap();
                f32tol.assert_close("dytx", c.to_host(&dw).unwrap(), dw_c.iter().copied());

                let xbd = c.from_host_as(&x, Dtype::Bf16).unwrap();
                let mut yb = c.from_host(&vec![1.0; m * n]).unwrap();
                c.matmul_xwt(&xbd, &wd, &mut yb, m, k, n, Accum::Add)
                    .unwrap();
                bf16_gemm_tol(&y_cb).assert_close(
                    "xwt bf16×f32",
                    c.to_host(&yb).unwrap(),
                    y_cb.iter().copied(),
                );
            },
        );
    }
}

/// bf16 storage for the memory-bound ops: results equal the CPU on bf16-rounded inputs within bf16
/// output rounding.
#[test]
fn bf16_storage_pointwise_and_norm() {
    with_cuda(
        CudaOptions {
            alloc_dtype: Dtype::Bf16,
            ..CudaOptions::default()
        },
        |c| {
            let cpu = Cpu;
            let (n, h) = (5, 1000);
            let mut g = Rng::new(21);
            let r16 = |x: Vec<f32>| -> Vec<f32> {
                x.iter()
                    .map(|&v| half::bf16::from_f32(v).to_f32())
                    .collect()
            };
            let (x, w, gate, up) = (
                r16(g.uniform(n * h, 2.0)),
                r16(g.uniform(h, 0.5)),
                r16(g.uniform(n * h, 3.0)),
                r16(g.uniform(n * h, 1.0)),
            );
            let (mut y_c, mut r_c) = (vec![0.0; n * h], vec![0.0; n]);
            cpu.rmsnorm_fwd(&x, &w, &mut y_c, &mut r_c, n, h, 1e-6)
                .unwrap();
            let mut o_c = vec![0.0; n * h];
            cpu.geglu_fwd(&gate, &up, &mut o_c).unwrap();

            let (xd, wd, gd, ud) = (
                c.from_host(&x).unwrap(),
                c.from_host(&w).unwrap(),
                c.from_host(&gate).unwrap(),
                c.from_host(&up).unwrap(),
            );
            let (mut y, mut r) = (poisoned(c, n * h), c.zeros_as(n, Dtype::F32).unwrap());
            c.rmsnorm_fwd(&xd, &wd, &mut y, &mut r, n, h, 1e-6).unwrap();
            Tolerance::BF16.assert_close(
                "rmsnorm y (bf16)",
                c.to_host(&y).unwrap(),
                y_c.iter().copied(),
            );
            Tolerance::new(1e-5, 1e-5).assert_close(
                "rmsnorm rstd",
                c.to_host(&r).unwrap(),
                r_c.iter().copied(),
            );
            let mut o = poisoned(c, n * h);
            c.geglu_fwd(&gd, &ud, &mut o).unwrap();
            Tolerance::BF16.assert_close(
                "geglu (bf16)",
                c.to_host(&o).unwrap(),
                o_c.iter().copied(),
            );
            assert_eq!(y.dtype(), Dtype::Bf16);
            // Σx² reads bf16 and sums in f64.
            let want: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
            Tolerance::new(1e-9, 1e-9).assert_close(
                "sum_squares",
                [c.sum_squares(&xd).unwrap()],
                [want],
            );
        },
    );
}

/// The paged optimizer (state in pinned host memory, streamed in chunks) equals the device-resident
/// AdamW over two steps, across a chunk boundary.
#[test]
fn paged_adamw_equals_device_adamw() {
    cuda_f32(|c| {
        let n = (1 << 22) + 1000;
        let mut g = Rng::new(31);
        let p0 = g.uniform(n, 1.0);
        let grads = [g.uniform(n, 1.0), g.uniform(n, 1.0)];
        let (mut pa, mut pb) = (c.from_host(&p0).unwrap(), c.from_host(&p0).unwrap());
        let (mut m, mut v) = (c.zeros(n).unwrap(), c.zeros(n).unwrap());
        let mut state = c.paged_adam_state(n).unwrap();
        for (i, gr) in grads.iter().enumerate() {
            let h = crate::backend::AdamW {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
                step: i as u64 + 1,
            };
            let gd = c.from_host(gr).unwrap();
            c.adamw(&mut pa, &gd, &mut m, &mut v, &h).unwrap();
            c.adamw_paged(&mut pb, &gd, &mut state, &h).unwrap();
        }
        let (sm, sv) = state.to_vecs().unwrap();
        Tolerance::EXACT.assert_close("paged p", c.to_host(&pb).unwrap(), c.to_host(&pa).unwrap());
        Tolerance::EXACT.assert_close("paged m", sm, c.to_host(&m).unwrap());
        Tolerance::EXACT.assert_close("paged v", sv, c.to_host(&v).unwrap());
    });
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|f| f.to_bits()).collect()
}

/// `adamw_k` runs the CPU reference's f32 operation order on the CPU's scalars (`AdamScalars`): with
/// f32 storage the GPU step equals the CPU step bit for bit (both round sqrt and division correctly),
/// for both lerp branches, with and without weight decay, over three steps, on ragged magnitudes.
#[test]
fn adamw_is_bit_exact_with_cpu() {
    cuda_f32(|c| {
        let cpu = Cpu::new();
        let n = 5000;
        for (beta1, wd) in [(0.9f32, 0.01f32), (0.3, 0.0)] {
            let mut g = Rng::new(77);
            let p0 = g.uniform(n, 1.0);
            let (mut pc, mut mc, mut vc) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
            let mut pd = c.from_host_as(&p0, Dtype::F32).unwrap();
            let mut md = c.zeros_as(n, Dtype::F32).unwrap();
            let mut vd = c.zeros_as(n, Dtype::F32).unwrap();
            for step in 1..=3u64 {
                let mut gr = g.uniform(n, 1.0);
                for (i, x) in gr.iter_mut().enumerate() {
                    match i % 5 {
                        0 => *x *= 1e-20,
                        1 => *x *= 1e4,
                        2 => *x = 0.0,
                        _ => {}
                    }
                }
                let h = crate::backend::AdamW {
                    lr: 1e-3,
                    beta1,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: wd,
                    step,
                };
                cpu.adamw(&mut pc, &gr, &mut mc, &mut vc, &h).unwrap();
                let gd = c.from_host_as(&gr, Dtype::F32).unwrap();
                c.adamw(&mut pd, &gd, &mut md, &mut vd, &h).unwrap();
            }
            assert_eq!(
                bits(&c.to_host(&pd).unwrap()),
                bits(&pc),
                "p, beta1 {beta1}"
            );
            assert_eq!(
                bits(&c.to_host(&md).unwrap()),
                bits(&mc),
                "m, beta1 {beta1}"
            );
            assert_eq!(
                bits(&c.to_host(&vd).unwrap()),
                bits(&vc),
                "v, beta1 {beta1}"
            );
        }
    });
}

/// Storage intents on a bf16 backend: Master is f32, Activation (and plain zeros/from_host) bf16;
/// AdamW state is f32 on the device, or paged in host memory.
#[test]
fn storage_intents_pick_dtypes() {
    with_cuda(
        CudaOptions {
            alloc_dtype: Dtype::Bf16,
            ..CudaOptions::default()
        },
        |c| {
            use crate::backend::Storage;
            assert_eq!(c.zeros_for(5, Storage::Master).unwrap().dtype(), Dtype::F32);
            assert_eq!(
                c.zeros_for(5, Storage::Activation).unwrap().dtype(),
                Dtype::Bf16
            );
            assert_eq!(c.zeros(5).unwrap().dtype(), Dtype::Bf16);
            let x = [1.0f32 + 1.0 / 1024.0, -3.0];
            let m = c.from_host_for(&x, Storage::Master).unwrap();
            assert_eq!(m.dtype(), Dtype::F32);
            assert_eq!(c.to_host(&m).unwrap(), x, "Master keeps f32 values exactly");
            let a = c.from_vec_for(x.to_vec(), Storage::Activation).unwrap();
            assert_eq!(a.dtype(), Dtype::Bf16);
            assert_eq!(
                c.to_host(&a).unwrap(),
                [1.0, -3.0],
                "Activation rounds to bf16"
            );
            let s = c.adam_state(7, false).unwrap();
            assert_eq!(s.device_dtypes(), Some((Dtype::F32, Dtype::F32)));
            assert!(c.adam_state(7, true).unwrap().is_paged());
        },
    );
}

/// Through the trait: a paged state and a resident one give bit-identical parameters and moments over
/// two steps (across a paging chunk boundary), and both survive a host round trip between the steps
/// (a checkpoint), including a switch from resident to paged.
#[test]
fn trait_adam_state_paged_equals_resident_with_checkpoint() {
    cuda_f32(|c| {
        let n = (1 << 22) + 333;
        let mut g = Rng::new(5);
        let p0 = g.uniform(n, 1.0);
        let grads = [g.uniform(n, 1.0), g.uniform(n, 1.0)];
        let mut pa = c.from_host_as(&p0, Dtype::F32).unwrap();
        let mut pb = c.from_host_as(&p0, Dtype::F32).unwrap();
        let mut sa = c.adam_state(n, false).unwrap();
        let mut sb = c.adam_state(n, false).unwrap();
        for (i, gr) in grads.iter().enumerate() {
            let h = crate::backend::AdamW {
                lr: 2e-4,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                step: i as u64 + 1,
            };
            let gd = c.from_host_as(gr, Dtype::F32).unwrap();
            c.adamw_step(&mut pa, &gd, &mut sa, &h).unwrap();
            c.adamw_step(&mut pb, &gd, &mut sb, &h).unwrap();
            // "Checkpoint" b and restore it paged.
            let (m, v) = c.adam_state_to_host(&sb).unwrap();
            sb = c.adam_state_from_host(&m, &v, true).unwrap();
            assert!(sb.is_paged());
        }
        let (ma, va) = c.adam_state_to_host(&sa).unwrap();
        let (mb, vb) = c.adam_state_to_host(&sb).unwrap();
        assert_eq!(
            bits(&c.to_host(&pb).unwrap()),
            bits(&c.to_host(&pa).unwrap()),
            "p"
        );
        assert_eq!(bits(&mb), bits(&ma), "m");
        assert_eq!(bits(&vb), bits(&va), "v");
    });
}
