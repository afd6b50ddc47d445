//! The Gemma-2 causal LM: the model's tensors and the trainer-facing API.
//!
//! Semantics are Hugging Face transformers' eager `Gemma2ForCausalLM`: embedding × sqrt(H), four
//! sandwich RMSNorms with (1 + w), attention scale query_pre_attn_scalar^-0.5, attention soft-cap
//! before the mask, sliding window on the layers `layer_types` marks (even layers by default),
//! GELU-tanh GeGLU, final RMSNorm, tied LM head, final soft-cap before the loss.
//!
//! - this file: [`Gemma2Model`], parameter access by id / name, the trainable-parameter order;
//! - `load.rs`: [`LoadOptions`], [`Quantization`], loading from a checkpoint or random init;
//! - `passes.rs`: logits, loss, and the training forward + backward;
//! - `streamed.rs`: layer-streamed forwards (one decoder layer at a time), and the dense base's eval
//!   loss read layer by layer from the checkpoint;
//! - `merged.rs`: the merged model's logits (LoRA folded into the weights), one dense merged layer
//!   at a time.
//!
//! The parameter types are in `crate::params`, batches in `crate::batch`, gradients in
//! `crate::grads`, and the decoder layer (forward for training, evaluation and decoding; backward) in
//! `crate::layer`; the first three are re-exported here so `afinar_gemma::model::X` paths keep working.

mod load;
mod merged;
mod passes;
mod stream;
mod streamed;

use std::sync::{Arc, Mutex};

use afinar_kernels::{Backend, Nf4Tensor, Storage};

use crate::config::Gemma2Config;
use crate::error::{GemmaError, Result};
use crate::lora::{LoraConfig, Target};

pub use crate::batch::Batch;
pub use crate::grads::{Grads, TrainableParam};
pub use crate::params::{Layer, Linear, LinearBase, LoraWeights, NormKind, ParamId, PEFT_PREFIX};
pub use load::{LoadOptions, Quantization};
pub use stream::host_peak_rss;
pub use streamed::STREAM_GROUP_BATCHES;

/// Gemma-2 causal LM on backend `B`.
pub struct Gemma2Model<B: Backend> {
    pub(crate) backend: Arc<B>,
    pub config: Gemma2Config,
    /// [V, H]; also the tied LM head.
    pub embed_tokens: B::Buf,
    pub layers: Vec<Layer<B>>,
    /// Final RMSNorm offset [H].
    pub norm: B::Buf,
    /// The LoRA config every adapted linear was built from (None = no adapters).
    pub lora: Option<LoraConfig>,
    /// Base weights are trainable.
    pub full_finetune: bool,
    /// Per-layer activation checkpointing: keep only layer inputs in the forward and recompute each layer
    /// but the last (whose activations the forward leaves in the workspace) in the backward. Gradients
    /// are identical either way; memory drops from O(L·acts) to O(L·N·H + acts).
    pub checkpointing: bool,
    /// The training pass's buffers, kept from one `forward_backward` to the next (see
    /// `passes::TrainWorkspace`); `release_workspace` frees them.
    pub(crate) train_ws: Mutex<Option<passes::TrainWorkspace<B>>>,
}

impl<B: Backend> Gemma2Model<B> {
    /// Frees the activation buffers `forward_backward` keeps between calls (all layers' activations
    /// without checkpointing, the layer inputs and one layer's with it): call it when training is over
    /// and the memory is wanted for something else. The next `forward_backward` allocates them again.
    pub fn release_workspace(&self) {
        *self.train_ws.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The backend this model runs on (clone the Arc to run the optimizer while borrowing parameters).
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// Ids of the trainable parameters, in the stable order used by `Grads` and `params_and_grads`:
    /// [Embed], then per layer [4 norms], then per linear in q,k,v,o,gate,up,down order [Weight] [LoraA, LoraB],
    /// then [FinalNorm]. Bracketed groups appear only in full fine-tuning / when the linear has LoRA.
    pub fn trainable_ids(&self) -> Vec<ParamId> {
        let full = self.full_finetune;
        let mut ids = Vec::new();
        if full {
            ids.push(ParamId::Embed);
        }
        for (layer, l) in self.layers.iter().enumerate() {
            if full {
                ids.extend(
                    NormKind::ALL
                        .iter()
                        .map(|&kind| ParamId::Norm { layer, kind }),
                );
            }
            for lin in &l.linears {
                let target = lin.target;
                if full && !lin.is_nf4() {
                    ids.push(ParamId::Weight { layer, target });
                }
                if lin.lora.is_some() {
                    ids.push(ParamId::LoraA { layer, target });
                    ids.push(ParamId::LoraB { layer, target });
                }
            }
        }
        if full {
            ids.push(ParamId::FinalNorm);
        }
        ids
    }

    /// Names of the trainable parameters (`ParamId::name`), in `trainable_ids` order.
    pub fn trainable_names(&self) -> Vec<String> {
        self.trainable_ids().iter().map(ParamId::name).collect()
    }

    /// Number of trainable scalars.
    pub fn num_trainable(&self) -> usize {
        let r = self.lora.as_ref().map_or(0, |l| l.r);
        self.trainable_ids()
            .iter()
            .map(|id| id.shape(&self.config, r).iter().product::<usize>())
            .sum()
    }

    /// Every trainable parameter with its gradient, in `trainable_ids` order, for the optimizer step
    /// (the trainer keeps its AdamW moments in a Vec of the same order).
    pub fn params_and_grads<'a>(
        &'a mut self,
        grads: &'a Grads<B>,
    ) -> Result<Vec<TrainableParam<'a, B>>> {
        let ids = self.trainable_ids();
        if ids != grads.ids() {
            return Err(GemmaError::Invalid(format!(
                "gradients hold {} tensors that do not match this model's {} trainable tensors (made for another model?)",
                grads.ids().len(),
                ids.len()
            )));
        }
        let full = self.full_finetune;
        let mut params: Vec<(ParamId, &'a mut B::Buf)> = Vec::with_capacity(ids.len());
        if full {
            params.push((ParamId::Embed, &mut self.embed_tokens));
        }
        for (layer, l) in self.layers.iter_mut().enumerate() {
            if full {
                for (kind, buf) in NormKind::ALL.iter().zip(l.norms.iter_mut()) {
                    params.push((ParamId::Norm { layer, kind: *kind }, buf));
                }
            }
            for lin in l.linears.iter_mut() {
                let target = lin.target;
                if full {
                    if let LinearBase::Dense(w) = &mut lin.base {
                        params.push((ParamId::Weight { layer, target }, w));
                    }
                }
                if let Some(lo) = &mut lin.lora {
                    params.push((ParamId::LoraA { layer, target }, &mut lo.a));
                    params.push((ParamId::LoraB { layer, target }, &mut lo.b));
                }
            }
        }
        if full {
            params.push((ParamId::FinalNorm, &mut self.norm));
        }
        debug_assert_eq!(params.len(), grads.bufs().len());
        Ok(params
            .into_iter()
            .zip(grads.bufs().iter())
            .map(|((id, param), grad)| TrainableParam { id, param, grad })
            .collect())
    }

    /// A parameter buffer by id (None if the model has no such tensor, e.g. an NF4 weight or a missing LoRA).
    pub fn param(&self, id: ParamId) -> Option<&B::Buf> {
        match id {
            ParamId::Embed => Some(&self.embed_tokens),
            ParamId::FinalNorm => Some(&self.norm),
            ParamId::Norm { layer, kind } => {
                self.layers.get(layer).map(|l| &l.norms[kind as usize])
            }
            ParamId::Weight { layer, target } => match &self.layers.get(layer)?.linear(target).base
            {
                LinearBase::Dense(w) => Some(w),
                LinearBase::Nf4(_) => None,
            },
            ParamId::LoraA { layer, target } => self
                .layers
                .get(layer)?
                .linear(target)
                .lora
                .as_ref()
                .map(|l| &l.a),
            ParamId::LoraB { layer, target } => self
                .layers
                .get(layer)?
                .linear(target)
                .lora
                .as_ref()
                .map(|l| &l.b),
        }
    }

    /// Mutable access to a parameter buffer by id.
    pub fn param_mut(&mut self, id: ParamId) -> Option<&mut B::Buf> {
        match id {
            ParamId::Embed => Some(&mut self.embed_tokens),
            ParamId::FinalNorm => Some(&mut self.norm),
            ParamId::Norm { layer, kind } => self
                .layers
                .get_mut(layer)
                .map(|l| &mut l.norms[kind as usize]),
            ParamId::Weight { layer, target } => {
                match &mut self.layers.get_mut(layer)?.linear_mut(target).base {
                    LinearBase::Dense(w) => Some(w),
                    LinearBase::Nf4(_) => None,
                }
            }
            ParamId::LoraA { layer, target } => self
                .layers
                .get_mut(layer)?
                .linear_mut(target)
                .lora
                .as_mut()
                .map(|l| &mut l.a),
            ParamId::LoraB { layer, target } => self
                .layers
                .get_mut(layer)?
                .linear_mut(target)
                .lora
                .as_mut()
                .map(|l| &mut l.b),
        }
    }

    /// Names of every LoRA tensor (peft names), layer-major, q..down, A then B.
    pub fn lora_names(&self) -> Vec<String> {
        self.lora_ids().iter().map(ParamId::name).collect()
    }

    /// Ids of every LoRA tensor.
    pub fn lora_ids(&self) -> Vec<ParamId> {
        let mut ids = Vec::new();
        for (layer, l) in self.layers.iter().enumerate() {
            for lin in &l.linears {
                if lin.lora.is_some() {
                    ids.push(ParamId::LoraA {
                        layer,
                        target: lin.target,
                    });
                    ids.push(ParamId::LoraB {
                        layer,
                        target: lin.target,
                    });
                }
            }
        }
        ids
    }

    /// Copies a parameter to the host, by name (HF name for base weights, peft name for LoRA).
    pub fn get_tensor(&self, name: &str) -> Result<Vec<f32>> {
        let id = ParamId::parse(name).ok_or_else(|| {
            GemmaError::Invalid(format!("`{name}` is not a Gemma-2 parameter name"))
        })?;
        let buf = self.param(id).ok_or_else(|| {
            GemmaError::Invalid(format!("this model holds no dense tensor `{name}`"))
        })?;
        Ok(self.backend.to_host(buf)?)
    }

    /// Overwrites a parameter from host values, by name; the length must match its shape.
    pub fn set_tensor(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let id = ParamId::parse(name).ok_or_else(|| {
            GemmaError::Invalid(format!("`{name}` is not a Gemma-2 parameter name"))
        })?;
        let r = self.lora.as_ref().map_or(0, |l| l.r);
        let shape = id.shape(&self.config, r);
        let backend = self.backend.clone();
        let buf = self.param_mut(id).ok_or_else(|| {
            GemmaError::Invalid(format!("this model holds no dense tensor `{name}`"))
        })?;
        if values.len() != shape.iter().product::<usize>() {
            return Err(GemmaError::ShapeMismatch {
                name: name.to_string(),
                expected: shape,
                found: vec![values.len()],
            });
        }
        // Master: the values reach `buf` unrounded (a checkpoint restore must be exact); `copy`
        // converts to the parameter's own storage.
        let src = backend.from_host_for(values, Storage::Master)?;
        backend.copy(&src, buf)?;
        Ok(())
    }

    /// The NF4 base weight of a linear, to the host (for exporting a bitsandbytes checkpoint).
    pub fn nf4_weight(&self, layer: usize, target: Target) -> Result<Option<Nf4Tensor>> {
        let l = self
            .layers
            .get(layer)
            .ok_or_else(|| GemmaError::Invalid(format!("no layer {layer}")))?;
        match &l.linear(target).base {
            LinearBase::Nf4(w) => Ok(Some(self.backend.nf4_to_host(w)?)),
            LinearBase::Dense(_) => Ok(None),
        }
    }

    /// The base weight of a linear as dense f32 host values [out, in] (dequantized if NF4): for merging.
    pub fn dense_weight(&self, layer: usize, target: Target) -> Result<Vec<f32>> {
        let l = self
            .layers
            .get(layer)
            .ok_or_else(|| GemmaError::Invalid(format!("no layer {layer}")))?;
        let lin = l.linear(target);
        match &lin.base {
            LinearBase::Dense(w) => Ok(self.backend.to_host(w)?),
            LinearBase::Nf4(w) => {
                // Master: the dequantized values reach the host unrounded.
                let mut out = self
                    .backend
                    .zeros_for(lin.out_features * lin.in_features, Storage::Master)?;
                self.backend.nf4_dequantize(w, &mut out)?;
                Ok(self.backend.to_host(&out)?)
            }
        }
    }
}

// Here rather than in grads.rs, beside `trainable_ids`, so that the gradient container (which the layer
// code uses) does not depend on the model.
impl<B: Backend> Grads<B> {
    /// Zeroed gradients for the trainable parameters of `model`, in `Storage::Master` (f32): they
    /// accumulate over micro-batches and feed the optimizer.
    pub fn zeros(model: &Gemma2Model<B>) -> Result<Self> {
        let ids = model.trainable_ids();
        let r = model.lora.as_ref().map_or(0, |l| l.r);
        Grads::zeros_for_ids(model.backend.clone(), ids, |id| {
            id.shape(&model.config, r).iter().product()
        })
    }
}
