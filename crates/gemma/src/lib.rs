//! afinar-gemma: Gemma-2 for Afinar.
//!
//! - [`config::Gemma2Config`]: `config.json` in every Hub spelling.
//! - [`safetensors_io::TensorStore`]: memory-mapped (sharded) safetensors, bf16/f16/f32 → f32.
//! - [`lora::LoraConfig`]: rank, α, dropout, rsLoRA, targets; PEFT init.
//! - [`model::Gemma2Model`]: weights (dense or NF4 base linears, optional LoRA), forward → logits / loss,
//!   hand-written backward → LoRA (and, in full fine-tuning, all) gradients, activation checkpointing.
//!   Its parts: [`params`] (the tensors and their names), [`batch`], [`grads`], and the private `layer`
//!   module, the one decoder-layer forward (training, evaluation, KV-cache decoding) and its backward.
//! - [`generate`]: KV-cache decoding and sampling; [`peft`]: adapters on disk; [`export`]: merged or
//!   NF4 checkpoints; [`bnb`]: bitsandbytes 4-bit layouts.
//!
//! Semantics are Hugging Face transformers' eager Gemma-2; names mirror HF and peft exactly.
//!
//! A training step, as the trainer drives it (QLoRA: NF4 base, LoRA on every linear):
//!
//! ```
//! use std::sync::Arc;
//! use afinar_gemma::{Batch, Gemma2Config, Gemma2Model, Grads, LoadOptions, LoraConfig, Quantization};
//! use afinar_kernels::{AdamW, Backend, Cpu};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // `Gemma2Model::load(backend, "/models/gemma-2-9b", &opts)` for a real checkpoint.
//! let cfg = Gemma2Config::tiny(50, 64, 96, 2, 2, 1, 32, 4)?;
//! let opts = LoadOptions {
//!     quantize: Quantization::Nf4 { double_quant: true },
//!     lora: Some(LoraConfig::new(4, 8.0, 0.05, false, &["all-linear"])?),
//!     seed: 0,
//!     ..Default::default()
//! };
//! let mut model = Gemma2Model::random(Arc::new(Cpu::new()), cfg, &opts)?;
//! model.checkpointing = true;
//!
//! // Targets are already shifted: targets[t] is the token after position t, or −100.
//! let ids = vec![2, 7, 9, 11, 3, 2, 5, 6];
//! let targets = vec![7, 9, 11, 3, -100, 5, 6, -100];
//! let mut batch = Batch::new(2, 4, ids, targets);
//! batch.dropout_seed = 1; // e.g. hash(run seed, step, micro-step)
//!
//! let backend = model.backend().clone();
//! let mut grads = Grads::zeros(&model)?;
//! // AdamW moments per trainable tensor (`true` would page them to host memory on a GPU).
//! let mut state = Vec::new();
//! for id in grads.ids() {
//!     state.push(backend.adam_state(id.shape(&model.config, 4).iter().product(), false)?);
//! }
//! // Gradients accumulate over micro-batches; scale by 1 / (scored tokens in the whole window).
//! let (sum, count) = model.forward_backward(&batch, 1.0 / 6.0, &mut grads)?;
//! assert_eq!(count, 6);
//! let h = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1 };
//! for (i, p) in model.params_and_grads(&grads)?.into_iter().enumerate() {
//!     backend.adamw_step(p.param, p.grad, &mut state[i], &h)?;
//! }
//! grads.zero()?;
//! assert!((sum / count as f64).is_finite());
//! # Ok(())
//! # }
//! ```

pub mod batch;
pub mod bnb;
pub mod config;
pub mod error;
pub mod export;
pub mod generate;
pub mod grads;
mod kv_cache;
mod layer;
pub mod lora;
pub mod model;
pub mod params;
pub mod peft;
pub mod safetensors_io;

pub use config::{Gemma2Config, LayerType, QuantizationConfig};
pub use error::{GemmaError, Result};
pub use lora::{LoraConfig, Target};
pub use model::{
    Batch, Gemma2Model, Grads, Layer, Linear, LinearBase, LoadOptions, LoraWeights, NormKind,
    ParamId, Quantization, TrainableParam,
};
pub use safetensors_io::{Dtype, TensorInfo, TensorStore};
