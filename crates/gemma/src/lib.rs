//! afinar-gemma: Gemma-2 for Afinar.
//!
//! - [`config::Gemma2Config`]: `config.json` in every Hub spelling.
//! - [`safetensors_io::TensorStore`]: memory-mapped (sharded) safetensors, bf16/f16/f32 → f32.
//! - [`lora::LoraConfig`]: rank, α, dropout, rsLoRA, targets; PEFT init.
//! - [`model::Gemma2Model`]: weights (dense or NF4 base linears, optional LoRA), forward → logits / loss,
//!   hand-written backward → LoRA (and, in full fine-tuning, all) gradients, activation checkpointing.
//!
//! Semantics are Hugging Face transformers' eager Gemma-2; names mirror HF and peft exactly.

pub mod bnb;
pub mod config;
pub mod error;
pub mod export;
pub mod generate;
pub mod layer;
pub mod lora;
pub mod model;
pub mod peft;
pub mod safetensors_io;

pub use config::{Gemma2Config, LayerType, QuantizationConfig};
pub use error::{GemmaError, Result};
pub use lora::{LoraConfig, Target};
pub use model::{Batch, Gemma2Model, Grads, Layer, Linear, LinearBase, LoadOptions, LoraWeights, NormKind, ParamId, Quantization, TrainableParam};
pub use safetensors_io::{Dtype, TensorInfo, TensorStore};
