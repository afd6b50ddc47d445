//! The GPU paths of eval, generate, merge and quantize against the CPU, the device memory figures, and
//! `afinar train`'s refusal of a run that does not fit. Built with the `cuda` feature only; without a
//! driver every test prints `skipped: no CUDA driver` and passes (the GPU bundle runs them: every
//! name contains `cuda`).
#![cfg(feature = "cuda")]

use crate::common;

use std::path::Path;
use std::sync::Arc;

use afinar_kernels::cpu::Cpu;
use afinar_kernels::cuda::Cuda;
use afinar_kernels::{Backend, Tolerance};
use afinar_trainer::config::Dtype;
use afinar_trainer::infer::{self, EvalOptions};

/// The CUDA backend with `dtype` activations, or None (and a note) without a driver.
fn cuda(dtype: Dtype) -> Option<Arc<Cuda>> {
    match infer::cuda_backend(dtype) {
        Ok(Some(c)) => Some(Arc::new(c)),
        Ok(None) => {
            eprintln!("skipped: no CUDA driver");
            None
        }
        Err(e) => panic!("the CUDA backend failed to start: {e}"),
    }
}

fn eval_opts(data: &Path) -> EvalOptions {
    EvalOptions {
        data: data.to_path_buf(),
        format: None,
        template: afinar_data::TemplateKind::Gemma,
        max_seq_len: 128,
        batch_size: 2,
    }
}

/// `afinar eval --device cuda`: the loss of the fixture model (+ a trained adapter), dense and NF4,
/// f32 and bf16, against the CPU's.
#[test]
fn eval_on_cuda_matches_the_cpu() {
    if cuda(Dtype::F32).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = common::config(dir.path());
    let out = afinar_trainer::train(&common::opts(c.clone())).unwrap();
    let adapter = out.run_dir.join("adapter");
    let tok = afinar_data::TextTokenizer::from_model_dir(&c.model.path).unwrap();
    let o = eval_opts(&c.data.eval);
    for (dtype, nf4, tol) in [
        (Dtype::F32, false, Tolerance::new(1e-4, 1e-3)),
        (Dtype::F32, true, Tolerance::new(1e-4, 1e-3)),
        (Dtype::Bf16, false, Tolerance::new(1e-2, 2e-2)),
        (Dtype::Bf16, true, Tolerance::new(1e-2, 2e-2)),
    ] {
        let Some(gpu) = cuda(dtype) else { return };
        let cpu = infer::load_model(&c.model.path, Some(&adapter), nf4).unwrap();
        let want = infer::eval_file(&cpu, &tok, &o).unwrap();
        let m = infer::load_model_on(gpu, &c.model.path, Some(&adapter), nf4).unwrap();
        let got = infer::eval_file(&m, &tok, &o).unwrap();
        assert_eq!((got.tokens, got.samples), (want.tokens, want.samples));
        tol.assert_close(
            &format!("eval loss {dtype:?} nf4={nf4}"),
            [got.loss],
            [want.loss],
        );
    }
}

/// `afinar generate --device cuda`: the device KV cache (prefill, then one token at a time) gives
/// the CPU's logits at every step of the CPU's greedy continuation, and the same answer.
#[test]
fn generate_on_cuda_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let c = common::config(dir.path());
    let tok = afinar_data::TextTokenizer::from_model_dir(&c.model.path).unwrap();
    let template = afinar_data::Template::new(afinar_data::TemplateKind::Gemma, &tok).unwrap();
    let prompt = infer::Prompt::text("¿Cuál es la capital de Perú?");
    let ids = infer::prompt_ids(&prompt, &template, &tok).unwrap();
    let Some(gpu) = cuda(Dtype::F32) else { return };
    let cpu = infer::load_model(&c.model.path, None, true).unwrap();
    let dev = infer::load_model_on(gpu, &c.model.path, None, true).unwrap();
    let mut a = afinar_gemma::generate::Decoder::new(&cpu);
    let mut b = afinar_gemma::generate::Decoder::new(&dev);
    let tol = Tolerance::new(2e-3, 2e-3);
    let (mut la, mut lb) = (a.feed(&ids).unwrap(), b.feed(&ids).unwrap());
    for step in 0..8 {
        tol.assert_close(
            &format!("logits at step {step}"),
            lb.iter().copied(),
            la.iter().copied(),
        );
        let next = la
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.total_cmp(y.1))
            .unwrap()
            .0 as i32;
        la = a.feed(&[next]).unwrap();
        lb = b.feed(&[next]).unwrap();
    }
    let s = infer::SampleOptions {
        max_new_tokens: 8,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
        repetition_penalty: 1.0,
        no_repeat_ngram_size: 0,
    };
    let want = infer::generate_answer(&cpu, &tok, &template, &prompt, &s).unwrap();
    let got = infer::generate_answer(&dev, &tok, &template, &prompt, &s).unwrap();
    assert_eq!(got.completion, want.completion);
    assert!(got.prefill_tokens_per_s.is_some() && got.decode_tokens_per_s.is_some());
}

/// f32 values of every tensor of a one-file safetensors checkpoint.
fn weights(p: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let store = afinar_gemma::TensorStore::open_dir(p).unwrap();
    store
        .names()
        .into_iter()
        .map(|n| (n.to_string(), store.read_f32(n).unwrap()))
        .collect()
}

/// `afinar merge --device cuda` and `afinar quantize --device cuda` against the CPU: the merged
/// weights agree to f32 rounding (the GPU sums B·A in another order), the NF4 checkpoint is identical
/// byte for byte (the dense weights reach the host unchanged; the codes are computed there).
#[test]
fn merge_and_quantize_on_cuda_match_the_cpu() {
    let Some(gpu) = cuda(Dtype::F32) else { return };
    let dir = tempfile::tempdir().unwrap();
    let c = common::config(dir.path());
    let out = afinar_trainer::train(&common::opts(c.clone())).unwrap();
    let adapter = out.run_dir.join("adapter");
    let (mc, mg) = (dir.path().join("merged-cpu"), dir.path().join("merged-gpu"));
    infer::merge(&c.model.path, &adapter, &mc, "f32").unwrap();
    infer::merge_on(gpu.clone(), &c.model.path, &adapter, &mg, "f32").unwrap();
    let (wc, wg) = (weights(&mc), weights(&mg));
    assert_eq!(wc.keys().collect::<Vec<_>>(), wg.keys().collect::<Vec<_>>());
    for (name, want) in &wc {
        Tolerance::new(1e-6, 1e-5).assert_close(
            name,
            wg[name].iter().copied(),
            want.iter().copied(),
        );
    }
    let (qc, qg) = (dir.path().join("q-cpu"), dir.path().join("q-gpu"));
    infer::quantize(&c.model.path, &qc, None).unwrap();
    infer::quantize_on(gpu, &c.model.path, &qg, None).unwrap();
    assert!(
        std::fs::read(qc.join("model.safetensors")).unwrap()
            == std::fs::read(qg.join("model.safetensors")).unwrap(),
        "the NF4 checkpoints differ"
    );
}

/// The CUDA backend's device memory: the high-water mark covers a 256 MiB buffer while it lives, and
/// stays after it is freed.
#[test]
fn device_memory_on_cuda_tracks_allocations() {
    let Some(gpu) = cuda(Dtype::F32) else { return };
    let before = gpu
        .device_memory()
        .expect("a CUDA backend reports device memory");
    assert!(before.used <= before.total && before.peak >= before.used);
    let n = 64 << 20; // 64 Mi f32 = 256 MiB
    let buf = gpu.zeros(n).unwrap();
    let during = gpu.device_memory().unwrap();
    assert!(
        during.peak >= before.used + (256 << 20),
        "{before:?} {during:?}"
    );
    drop(buf);
    gpu.synchronize().unwrap();
    let after = gpu.device_memory().unwrap();
    assert!(after.peak >= during.peak, "{during:?} {after:?}");
    assert!(Cpu::new().device_memory().is_none());
}

/// `afinar train` refuses (before loading anything) a run whose plan exceeds the GPU's free memory,
/// and `--force` lets it through.
#[test]
fn train_on_cuda_refuses_a_run_that_does_not_fit() {
    let Some(gpu) = cuda(Dtype::Bf16) else { return };
    // The 27B shape, dense bf16, 8 × 8192 tokens without checkpointing: terabytes.
    let model =
        afinar_gemma::Gemma2Config::tiny(256000, 4608, 36864, 46, 32, 16, 128, 4096).unwrap();
    let mut cfg = afinar_trainer::Config::default();
    cfg.model.device = afinar_trainer::config::Device::Cuda;
    cfg.model.dtype = Dtype::Bf16;
    cfg.train.micro_batch_size = 8;
    cfg.data.max_seq_len = 8192;
    let said = std::cell::RefCell::new(Vec::new());
    let say = |m: &str| said.borrow_mut().push(m.to_string());
    let e = afinar_trainer::train::memory::check_before_loading(&*gpu, &cfg, &model, false, &say)
        .unwrap_err()
        .to_string();
    assert!(e.contains("GiB free") && e.contains("--force"), "{e}");
    afinar_trainer::train::memory::check_before_loading(&*gpu, &cfg, &model, true, &say).unwrap();
    assert!(said.borrow().iter().any(|m| m.contains("--force")));
    // The first GPU run's 9B QLoRA shape fits an H200-class device (skipped on a small one).
    let total = gpu.device_memory().unwrap().total;
    if total > 40 << 30 {
        let m9 =
            afinar_gemma::Gemma2Config::tiny(256000, 3584, 14336, 42, 16, 8, 256, 4096).unwrap();
        cfg.model.quantization = afinar_trainer::config::Quantization::Nf4;
        cfg.train.micro_batch_size = 2;
        cfg.data.max_seq_len = 2048;
        cfg.train.gradient_checkpointing = true;
        afinar_trainer::train::memory::check_before_loading(&*gpu, &cfg, &m9, false, &say).unwrap();
    }
}
