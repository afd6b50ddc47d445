//! Golden parity with transformers 5.24 + peft 0.21 (eager attention, float32): logits, loss, LoRA
//! gradients and full fine-tuning gradients of three tiny random Gemma-2 models made by
//! tests/golden/make_gemma.py (see its docstring for what each model covers).
//!
//! Each check is one generic body run on the CPU backend and, with feature `cuda`, on the CUDA backend
//! (f32 storage; tolerances ×10 for its different reduction order and intrinsics), which prints
//! `skipped: no CUDA driver` and passes where there is no GPU.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use afinar_gemma::safetensors_io::{Dtype, TensorStore};
use afinar_gemma::{Batch, Gemma2Config, Gemma2Model, Grads, LoadOptions, LoraConfig, ParamId};
use afinar_kernels::{Backend, Tolerance};

fn fixture(tag: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden/fixtures")
        .join(format!("gemma_tiny_{tag}"))
}

struct Cases {
    store: TensorStore,
}

impl Cases {
    fn open(tag: &str) -> Self {
        Cases {
            store: TensorStore::open_files(&[fixture(tag).join("cases.safetensors")]).unwrap(),
        }
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        self.store.read_f32(name).unwrap()
    }
    fn shape(&self, name: &str) -> Vec<usize> {
        self.store.info(name).unwrap().shape.clone()
    }
    fn i32(&self, name: &str) -> Vec<i32> {
        let (bytes, info) = self.store.raw(name).unwrap();
        assert_eq!(info.dtype, Dtype::I64, "{name}");
        bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as i32)
            .collect()
    }
    /// The batch of the fixture: B rows × T tokens, HF labels shifted into targets.
    fn batch(&self) -> Batch {
        let s = self.shape("input_ids");
        let (b, t) = (s[0], s[1]);
        let targets = Batch::shift_labels(b, t, &self.i32("labels"));
        Batch::new(b, t, self.i32("input_ids"), targets)
    }
}

/// The LoRA config written by peft next to the adapter.
fn adapter_lora(tag: &str) -> LoraConfig {
    let text = std::fs::read_to_string(fixture(tag).join("adapter/adapter_config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let targets: Vec<String> = match &v["target_modules"] {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
        other => panic!("target_modules {other}"),
    };
    LoraConfig::new(
        v["r"].as_u64().unwrap() as usize,
        v["lora_alpha"].as_f64().unwrap(),
        0.0,
        v["use_rslora"].as_bool().unwrap(),
        &targets,
    )
    .unwrap()
}

fn load<B: Backend>(be: &Arc<B>, tag: &str, opts: &LoadOptions) -> Gemma2Model<B> {
    Gemma2Model::load(be.clone(), fixture(tag), opts).unwrap()
}

/// The base model with the fixture's adapter loaded into its LoRA slots.
fn load_with_adapter<B: Backend>(be: &Arc<B>, tag: &str) -> Gemma2Model<B> {
    let mut m = load(
        be,
        tag,
        &LoadOptions {
            lora: Some(adapter_lora(tag)),
            ..Default::default()
        },
    );
    let ad =
        TensorStore::open_files(&[fixture(tag).join("adapter/adapter_model.safetensors")]).unwrap();
    let names = m.lora_names();
    assert_eq!(
        names.len(),
        ad.names().len(),
        "adapter tensors vs model LoRA slots"
    );
    for name in names {
        m.set_tensor(&name, &ad.read_f32(&name).unwrap()).unwrap();
    }
    m
}

/// Logits: 1e-4 relative, plus an absolute floor of 1e-5 × the largest |logit| — f32 noise after a few
/// layers is a few 1e-6 of the tensor's scale (measured on the CPU: ≤ 6.4e-6), which a near-zero logit
/// cannot absorb in a purely relative test. `k` loosens both (1 on the CPU).
fn check_logits(what: &str, got: Vec<f32>, expected: Vec<f32>, k: f64) {
    let max = expected.iter().fold(0f32, |a, &x| a.max(x.abs())) as f64;
    Tolerance::new(k * 1e-5 * max, k * 1e-4).assert_close(what, got, expected);
}

fn check_loss(what: &str, (sum, count): (f64, usize), expected: f32, k: f64) {
    let mean = sum / count as f64;
    Tolerance::new(0.0, k * 1e-4).assert_close(what, [mean], [expected as f64]);
}

/// Gradient tensors: 1e-3 relative, with an absolute floor tied to the tensor's scale (elements far
/// below the tensor's largest entry carry only cancellation noise).
fn check_grad(what: &str, got: Vec<f32>, expected: Vec<f32>, k: f64) {
    let max = expected.iter().fold(0f32, |a, &x| a.max(x.abs())) as f64;
    Tolerance::new(k * 1e-4 * max, k * 1e-3).assert_close(what, got, expected);
}

fn parity_logits_and_loss<B: Backend>(be: &Arc<B>, tag: &str, k: f64) {
    let cases = Cases::open(tag);
    let batch = cases.batch();

    let base = load(be, tag, &LoadOptions::default());
    let logits = base.logits(&batch).unwrap();
    check_logits(
        &format!("{tag}/logits_base"),
        logits,
        cases.f32("logits_base"),
        k,
    );
    let loss = base.loss(&batch).unwrap();
    check_loss(
        &format!("{tag}/loss_base"),
        loss,
        cases.f32("loss_base")[0],
        k,
    );

    let m = load_with_adapter(be, tag);
    check_logits(
        &format!("{tag}/logits"),
        m.logits(&batch).unwrap(),
        cases.f32("logits"),
        k,
    );
    check_loss(
        &format!("{tag}/loss"),
        m.loss(&batch).unwrap(),
        cases.f32("loss")[0],
        k,
    );

    // Restarting positions (as in a packed row).
    let mut pb = batch.clone();
    pb.positions = cases.i32("position_ids");
    let logits = m.logits(&pb).unwrap();
    check_logits(
        &format!("{tag}/logits_pos"),
        logits,
        cases.f32("logits_pos"),
        k,
    );
}

fn parity_lora_grads<B: Backend>(be: &Arc<B>, tag: &str, k: f64) {
    let cases = Cases::open(tag);
    let batch = cases.batch();
    let m = load_with_adapter(be, tag);
    let mut grads = Grads::zeros(&m).unwrap();
    let (_, count) = m.loss(&batch).unwrap();
    // HF's loss is the mean over scored tokens: scale the Σ-loss gradients by 1/count.
    let (sum, count2) = m
        .forward_backward(&batch, 1.0 / count as f32, &mut grads)
        .unwrap();
    assert_eq!(count, count2);
    check_loss(
        &format!("{tag}/loss (train)"),
        (sum, count2),
        cases.f32("loss")[0],
        k,
    );
    let ids = m.trainable_ids();
    assert_eq!(ids.len(), m.lora_ids().len());
    for id in ids {
        let name = id.name();
        let reference = cases.f32(&format!("grad.{name}"));
        check_grad(&name, grads.to_host(id).unwrap(), reference, k);
    }
}

/// Full fine-tuning: gradients of every base parameter (embedding incl. the tied head, all norms, all
/// linears) match torch autograd.
fn parity_full_finetune_grads<B: Backend>(be: &Arc<B>, tag: &str, k: f64) {
    let cases = Cases::open(tag);
    let batch = cases.batch();
    let opts = LoadOptions {
        full_finetune: true,
        ..Default::default()
    };
    let m = load(be, tag, &opts);
    let mut grads = Grads::zeros(&m).unwrap();
    let (_, count) = m.loss(&batch).unwrap();
    m.forward_backward(&batch, 1.0 / count as f32, &mut grads)
        .unwrap();
    let cfg: &Gemma2Config = &m.config;
    // 1 embedding + 4 norms and 7 linears per layer + final norm.
    assert_eq!(m.trainable_ids().len(), 1 + cfg.num_hidden_layers * 11 + 1);
    for id in m.trainable_ids() {
        let name = id.name();
        let reference = cases.f32(&format!("full_grad.{name}"));
        check_grad(&name, grads.to_host(id).unwrap(), reference, k);
    }
    // The HF names are what the fixture used.
    assert!(m
        .trainable_names()
        .contains(&"model.embed_tokens.weight".to_string()));
    assert!(matches!(
        ParamId::parse("model.layers.3.mlp.down_proj.weight"),
        Some(ParamId::Weight { layer: 3, .. })
    ));
}

/// For each `name => body(tag)`: a CPU test, and with feature `cuda` a CUDA test that skips cleanly
/// without a driver.
macro_rules! golden_tests {
    ($($name:ident => $body:ident($tag:literal)),* $(,)?) => {$(
        mod $name {
            use super::*;

            #[test]
            fn cpu() {
                $body(&Arc::new(afinar_kernels::Cpu::new()), $tag, 1.0);
            }

            #[cfg(feature = "cuda")]
            #[test]
            fn cuda() {
                match afinar_kernels::cuda::Cuda::try_new() {
                    Ok(Some(backend)) => $body(&Arc::new(backend), $tag, 10.0),
                    Ok(None) => eprintln!("skipped: no CUDA driver"),
                    Err(e) => panic!("the CUDA backend failed to start: {e}"),
                }
            }
        }
    )*};
}

golden_tests! {
    tiny_a_logits_loss => parity_logits_and_loss("a"),
    tiny_b_logits_loss => parity_logits_and_loss("b"),
    tiny_c_logits_loss => parity_logits_and_loss("c"),
    tiny_a_lora_grads => parity_lora_grads("a"),
    tiny_b_lora_grads => parity_lora_grads("b"),
    tiny_c_lora_grads => parity_lora_grads("c"),
    tiny_a_full_finetune_grads => parity_full_finetune_grads("a"),
}
