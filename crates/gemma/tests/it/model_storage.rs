//! Mixed storage on the CUDA backend (feature `cuda`): a tiny Gemma-2 with bf16 activations and frozen
//! weights, f32 LoRA factors, gradients and optimizer state, against the f32 CPU reference. Without a
//! driver each test prints `skipped: no CUDA driver` and passes.

#![cfg(feature = "cuda")]

use std::sync::Arc;

use afinar_gemma::{
    Batch, Gemma2Config, Gemma2Model, Grads, LinearBase, LoadOptions, LoraConfig, ParamId,
    Quantization,
};
use afinar_kernels::cuda::{Cuda, CudaOptions, Dtype};
use afinar_kernels::{AdamW, Backend, Cpu, Tolerance};

const V: usize = 96;

fn config() -> Gemma2Config {
    // 2 layers (sliding, full), GQA 2, D = 32 (the tensor-core attention path), window 4 < T.
    Gemma2Config::tiny(V, 64, 128, 2, 2, 1, 32, 4).unwrap()
}

/// The same model on any backend: random base (seed 3), LoRA r = 4 on every linear (dropout on, so
/// the f32 mask path runs), B made non-zero so every LoRA gradient is exercised.
fn model<B: Backend>(be: Arc<B>, quantize: Quantization, full: bool) -> Gemma2Model<B> {
    let opts = LoadOptions {
        quantize,
        lora: (!full).then(|| LoraConfig::new(4, 8.0, 0.1, false, &["all-linear"]).unwrap()),
        full_finetune: full,
        seed: 3,
        ..Default::default()
    };
    let mut m = Gemma2Model::random(be, config(), &opts).unwrap();
    for id in m.lora_ids() {
        if let ParamId::LoraB { .. } = id {
            let name = id.name();
            let n = m.get_tensor(&name).unwrap().len();
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.01)
                .collect();
            m.set_tensor(&name, &v).unwrap();
        }
    }
    m
}

fn batch() -> Batch {
    let (b, t) = (2, 8);
    let ids: Vec<i32> = (0..(b * t) as i32)
        .map(|i| (i * 29 + 3) % V as i32)
        .collect();
    let mut targets: Vec<i32> = (0..(b * t) as i32)
        .map(|i| (i * 13 + 5) % V as i32)
        .collect();
    targets[t - 1] = -100;
    targets[b * t - 1] = -100;
    let mut batch = Batch::new(b, t, ids, targets);
    batch.dropout_seed = 17;
    batch
}

fn bf16_cuda() -> Option<Cuda> {
    match Cuda::try_new_with(CudaOptions {
        alloc_dtype: Dtype::Bf16,
        ..CudaOptions::default()
    }) {
        Ok(c) => c,
        Err(e) => panic!("the CUDA backend failed to start: {e}"),
    }
}

/// Elementwise tolerance for a gradient computed through bf16 activations: the absolute part scales
/// with the tensor's own magnitude (bf16 keeps 8 significant bits per activation; errors add up over
/// the layers), the relative part covers the large entries.
fn grad_tol(reference: &[f32]) -> Tolerance {
    let max = reference.iter().fold(0.0f64, |a, &x| a.max(x.abs() as f64));
    Tolerance::new(0.05 * max + 1e-7, 0.1)
}

/// Forward + backward on CUDA (bf16 activations) against the CPU; asserts where every buffer lives.
fn check(quantize: Quantization, full: bool) {
    let Some(cuda) = bf16_cuda() else {
        eprintln!("skipped: no CUDA driver");
        return;
    };
    let cpu = model(Arc::new(Cpu::new()), quantize, full);
    let gpu = model(Arc::new(cuda), quantize, full);

    // Storage: trained tensors f32, frozen ones bf16.
    let trained = if full { Dtype::F32 } else { Dtype::Bf16 };
    assert_eq!(gpu.embed_tokens.dtype(), trained, "embedding");
    assert_eq!(gpu.norm.dtype(), trained, "final norm");
    for layer in &gpu.layers {
        for n in &layer.norms {
            assert_eq!(n.dtype(), trained, "layer norm");
        }
        for lin in &layer.linears {
            if let LinearBase::Dense(w) = &lin.base {
                assert_eq!(w.dtype(), trained, "{} base weight", lin.target);
            }
            if let Some(lo) = &lin.lora {
                assert_eq!(lo.a.dtype(), Dtype::F32, "{} lora_A", lin.target);
                assert_eq!(lo.b.dtype(), Dtype::F32, "{} lora_B", lin.target);
            }
        }
    }

    let b = batch();
    let (mut gc, mut gg) = (Grads::zeros(&cpu).unwrap(), Grads::zeros(&gpu).unwrap());
    let (sc, nc) = cpu.forward_backward(&b, 0.1, &mut gc).unwrap();
    let (sg, ng) = gpu.forward_backward(&b, 0.1, &mut gg).unwrap();
    assert_eq!(nc, ng);
    Tolerance::new(1e-3, 2e-2).assert_close("loss", [sg / ng as f64], [sc / nc as f64]);
    for (id, g) in gg.iter() {
        assert_eq!(g.dtype(), Dtype::F32, "gradient of {}", id.name());
    }
    let mut nonzero = 0;
    for id in gc.ids().to_vec() {
        let (want, got) = (gc.to_host(id).unwrap(), gg.to_host(id).unwrap());
        nonzero += want.iter().filter(|x| **x != 0.0).count();
        grad_tol(&want).assert_close(&id.name(), got, want.iter().copied());
    }
    assert!(nonzero > 0, "no gradient was exercised");

    // One optimizer step through the trait: f32 moments, resident and paged alike.
    let be = gpu.backend().clone();
    let mut gpu = gpu;
    let h = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
    };
    for (i, p) in gpu.params_and_grads(&gg).unwrap().into_iter().enumerate() {
        let n = be.len(p.param);
        let mut st = be.adam_state(n, i % 2 == 1).unwrap();
        assert_eq!(st.is_paged(), i % 2 == 1);
        if let Some(dts) = st.device_dtypes() {
            assert_eq!(dts, (Dtype::F32, Dtype::F32));
        }
        be.adamw_step(p.param, p.grad, &mut st, &h).unwrap();
    }
}

#[test]
fn cuda_bf16_dense_lora_matches_cpu() {
    check(Quantization::None, false);
}

#[test]
fn cuda_bf16_nf4_qlora_matches_cpu() {
    check(Quantization::Nf4 { double_quant: true }, false);
}

#[test]
fn cuda_bf16_full_finetune_matches_cpu() {
    check(Quantization::None, true);
}
