//! The Gemma-2 causal LM: weights, LoRA parameters, loading, and the trainer-facing API.
//!
//! Semantics are Hugging Face transformers' eager `Gemma2ForCausalLM` (facts §1): embedding × sqrt(H),
//! four sandwich RMSNorms with (1 + w), attention scale query_pre_attn_scalar^-0.5, attention soft-cap
//! before the mask, sliding window on the layers `layer_types` marks (even layers by default), GELU-tanh
//! GeGLU, final RMSNorm, tied LM head, final soft-cap before the loss.
//!
//! The per-layer math (forward, backward, recompute) lives in `layer.rs`; this file owns the parameters,
//! their names, the gradient container and the whole-model passes.

use std::path::Path;
use std::sync::Arc;

use afinar_kernels::{Accum, Backend, Nf4Tensor, Storage};

use crate::config::Gemma2Config;
use crate::error::{GemmaError, Result};
use crate::layer::{layer_bwd, layer_fwd, Ctx};
use crate::lora::{LoraConfig, Target};
use crate::safetensors_io::TensorStore;

// ---------------------------------------------------------------------------------------------------
// Weights
// ---------------------------------------------------------------------------------------------------

/// The frozen (or, in full fine-tuning, trainable) base weight of a linear layer, [out, in] row-major.
pub enum LinearBase<B: Backend> {
    Dense(B::Buf),
    Nf4(B::Nf4),
}

/// LoRA factors of one linear: A [R, in], B [out, R], y += scale·(drop(x)·Aᵀ)·Bᵀ.
pub struct LoraWeights<B: Backend> {
    pub a: B::Buf,
    pub b: B::Buf,
    pub r: usize,
    pub scale: f32,
    /// Dropout probability on the LoRA input (0 = none).
    pub dropout: f64,
}

/// One linear layer (no bias: Gemma-2 has none): y = x·Wᵀ (+ LoRA).
pub struct Linear<B: Backend> {
    pub target: Target,
    pub out_features: usize,
    pub in_features: usize,
    pub base: LinearBase<B>,
    pub lora: Option<LoraWeights<B>>,
}

impl<B: Backend> Linear<B> {
    /// The base weight in the form the ops take.
    pub fn weight(&self) -> afinar_kernels::Weight<'_, B> {
        match &self.base {
            LinearBase::Dense(w) => afinar_kernels::Weight::Dense(w),
            LinearBase::Nf4(w) => afinar_kernels::Weight::Nf4(w),
        }
    }

    pub fn is_nf4(&self) -> bool {
        matches!(self.base, LinearBase::Nf4(_))
    }
}

/// Which of the four RMSNorms of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NormKind {
    Input,
    PostAttention,
    PreFeedforward,
    PostFeedforward,
}

impl NormKind {
    pub const ALL: [NormKind; 4] = [
        NormKind::Input,
        NormKind::PostAttention,
        NormKind::PreFeedforward,
        NormKind::PostFeedforward,
    ];

    /// HF module name ("input_layernorm", ...).
    pub fn name(self) -> &'static str {
        match self {
            NormKind::Input => "input_layernorm",
            NormKind::PostAttention => "post_attention_layernorm",
            NormKind::PreFeedforward => "pre_feedforward_layernorm",
            NormKind::PostFeedforward => "post_feedforward_layernorm",
        }
    }
}

/// One decoder layer. `linears` is indexed by `Target::index()` (q, k, v, o, gate, up, down).
pub struct Layer<B: Backend> {
    /// RMSNorm offsets w [H] (the effective scale is 1 + w), indexed by `NormKind as usize`.
    pub norms: [B::Buf; 4],
    pub linears: [Linear<B>; 7],
}

impl<B: Backend> Layer<B> {
    pub fn linear(&self, t: Target) -> &Linear<B> {
        &self.linears[t.index()]
    }
    pub fn linear_mut(&mut self, t: Target) -> &mut Linear<B> {
        &mut self.linears[t.index()]
    }
    pub fn norm(&self, k: NormKind) -> &B::Buf {
        &self.norms[k as usize]
    }
}

/// Identifies one parameter tensor of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParamId {
    /// `model.embed_tokens.weight` [V, H] (also the tied LM head).
    Embed,
    /// `model.layers.{layer}.{norm}.weight` [H].
    Norm { layer: usize, kind: NormKind },
    /// `model.layers.{layer}.{parent}.{target}.weight` [out, in] (dense only).
    Weight { layer: usize, target: Target },
    /// LoRA A [R, in].
    LoraA { layer: usize, target: Target },
    /// LoRA B [out, R].
    LoraB { layer: usize, target: Target },
    /// `model.norm.weight` [H].
    FinalNorm,
}

/// Prefix peft puts in front of HF module paths in adapter files (PeftModel → LoraModel → Gemma2ForCausalLM).
pub const PEFT_PREFIX: &str = "base_model.model.";

impl ParamId {
    /// The name used in files: HF names for base weights (`model.layers.0.mlp.up_proj.weight`), peft names
    /// for LoRA factors (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
    pub fn name(&self) -> String {
        match *self {
            ParamId::Embed => "model.embed_tokens.weight".into(),
            ParamId::FinalNorm => "model.norm.weight".into(),
            ParamId::Norm { layer, kind } => format!("model.layers.{layer}.{}.weight", kind.name()),
            ParamId::Weight { layer, target } => format!("{}.weight", target.module_path(layer)),
            ParamId::LoraA { layer, target } => {
                format!("{PEFT_PREFIX}{}.lora_A.weight", target.module_path(layer))
            }
            ParamId::LoraB { layer, target } => {
                format!("{PEFT_PREFIX}{}.lora_B.weight", target.module_path(layer))
            }
        }
    }

    /// Inverse of `name` (also accepts LoRA names without the peft prefix, and `.lora_A.default.weight`).
    pub fn parse(name: &str) -> Option<ParamId> {
        match name {
            "model.embed_tokens.weight" => return Some(ParamId::Embed),
            "model.norm.weight" => return Some(ParamId::FinalNorm),
            _ => {}
        }
        let n = name.strip_prefix(PEFT_PREFIX).unwrap_or(name);
        let rest = n.strip_prefix("model.layers.")?;
        let (layer_s, rest) = rest.split_once('.')?;
        let layer: usize = layer_s.parse().ok()?;
        for kind in NormKind::ALL {
            if rest == format!("{}.weight", kind.name()) {
                return Some(ParamId::Norm { layer, kind });
            }
        }
        let (parent, rest) = rest.split_once('.')?;
        let (module, rest) = rest.split_once('.')?;
        let target = Target::ALL
            .iter()
            .copied()
            .find(|t| t.name() == module && t.parent() == parent)?;
        match rest {
            "weight" => Some(ParamId::Weight { layer, target }),
            "lora_A.weight" | "lora_A.default.weight" => Some(ParamId::LoraA { layer, target }),
            "lora_B.weight" | "lora_B.default.weight" => Some(ParamId::LoraB { layer, target }),
            _ => None,
        }
    }

    /// Shape of this parameter for a config and LoRA rank.
    pub fn shape(&self, cfg: &Gemma2Config, r: usize) -> Vec<usize> {
        match *self {
            ParamId::Embed => vec![cfg.vocab_size, cfg.hidden_size],
            ParamId::FinalNorm | ParamId::Norm { .. } => vec![cfg.hidden_size],
            ParamId::Weight { target, .. } => {
                let (o, i) = target.dims(cfg);
                vec![o, i]
            }
            ParamId::LoraA { target, .. } => vec![r, target.dims(cfg).1],
            ParamId::LoraB { target, .. } => vec![target.dims(cfg).0, r],
        }
    }

    pub fn is_lora(&self) -> bool {
        matches!(self, ParamId::LoraA { .. } | ParamId::LoraB { .. })
    }
}

// ---------------------------------------------------------------------------------------------------
// Options and batches
// ---------------------------------------------------------------------------------------------------

/// How target linears are stored after loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Quantization {
    /// Dense f32 (or whatever `B::Buf` holds).
    #[default]
    None,
    /// NF4, bit-exact with bitsandbytes `quantize_4bit(blocksize=64)`; `double_quant` = QLoRA's nested absmax.
    Nf4 { double_quant: bool },
}

/// What to build when loading a checkpoint or creating a random model.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub quantize: Quantization,
    /// Adds LoRA factors (A from `seed`, B = 0) to the config's targets.
    pub lora: Option<LoraConfig>,
    /// Every base weight (embedding, norms, dense linears) becomes trainable. Requires `Quantization::None`.
    pub full_finetune: bool,
    /// Seed of the LoRA A init (and of random weights in `Gemma2Model::random`).
    pub seed: u64,
    /// Show an indicatif progress bar while loading (only drawn when stderr is a terminal).
    pub progress: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            quantize: Quantization::None,
            lora: None,
            full_finetune: false,
            seed: 0,
            progress: false,
        }
    }
}

/// One micro-batch of B rows × T tokens, host side, row-major ([B·T] each).
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// B.
    pub b: usize,
    /// T.
    pub t: usize,
    /// Token ids [B·T], each in [0, V).
    pub input_ids: Vec<i32>,
    /// RoPE positions [B·T]; they restart at 0 at every packed sample.
    pub positions: Vec<i32>,
    /// Packed-sample ids [B·T] (None = one sample per row). Tokens attend only within their segment.
    pub segment_ids: Option<Vec<i32>>,
    /// ALREADY SHIFTED targets [B·T]: target t is the token that follows position t, or −100 (not scored).
    pub targets: Vec<i32>,
    /// Seed of the LoRA dropout masks of this micro-batch; set it from (run seed, step, micro-step) so a
    /// resumed run draws the same masks. Unused when dropout is 0.
    pub dropout_seed: u64,
}

impl Batch {
    /// B rows of T tokens with positions 0..T per row, no packing. `targets` already shifted.
    pub fn new(b: usize, t: usize, input_ids: Vec<i32>, targets: Vec<i32>) -> Self {
        let positions = (0..b).flat_map(|_| 0..t as i32).collect();
        Batch {
            b,
            t,
            input_ids,
            positions,
            segment_ids: None,
            targets,
            dropout_seed: 0,
        }
    }

    /// Shifts HF-style labels (`labels[t]` scores the logits at t−1) into targets (`targets[t] = labels[t+1]`,
    /// −100 at the end of each row): what transformers' `ForCausalLMLoss` does.
    /// `labels` must hold B·T entries; missing entries (a short slice) are treated as −100.
    pub fn shift_labels(b: usize, t: usize, labels: &[i32]) -> Vec<i32> {
        let mut out = vec![-100; b * t];
        for r in 0..b {
            for i in 0..t.saturating_sub(1) {
                out[r * t + i] = labels.get(r * t + i + 1).copied().unwrap_or(-100);
            }
        }
        out
    }

    /// Number of tokens (B·T).
    pub fn tokens(&self) -> usize {
        self.b * self.t
    }

    /// Checks lengths and id ranges against a vocabulary size.
    pub fn validate(&self, vocab: usize) -> Result<()> {
        let n = self
            .b
            .checked_mul(self.t)
            .ok_or_else(|| GemmaError::Batch(format!("B·T = {}·{} overflows", self.b, self.t)))?;
        if n == 0 {
            return Err(GemmaError::Batch(format!(
                "empty batch (B = {}, T = {})",
                self.b, self.t
            )));
        }
        for (name, len) in [
            ("input_ids", self.input_ids.len()),
            ("positions", self.positions.len()),
            ("targets", self.targets.len()),
        ] {
            if len != n {
                return Err(GemmaError::Batch(format!(
                    "{name} has {len} entries, B·T = {}·{} = {n}",
                    self.b, self.t
                )));
            }
        }
        if let Some(s) = &self.segment_ids {
            if s.len() != n {
                return Err(GemmaError::Batch(format!(
                    "segment_ids has {} entries, B·T = {n}",
                    s.len()
                )));
            }
        }
        if let Some((i, &id)) = self
            .input_ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id < 0 || id as usize >= vocab)
        {
            return Err(GemmaError::Batch(format!(
                "input_ids[{i}] = {id} is outside the vocabulary [0, {vocab})"
            )));
        }
        if let Some((i, &id)) = self
            .targets
            .iter()
            .enumerate()
            .find(|(_, &id)| id != -100 && (id < 0 || id as usize >= vocab))
        {
            return Err(GemmaError::Batch(format!(
                "targets[{i}] = {id} is neither −100 nor in [0, {vocab})"
            )));
        }
        if let Some((i, &p)) = self.positions.iter().enumerate().find(|(_, &p)| p < 0) {
            return Err(GemmaError::Batch(format!(
                "positions[{i}] = {p} is negative"
            )));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------
// Gradients
// ---------------------------------------------------------------------------------------------------

/// Gradients of every trainable parameter, in `Gemma2Model::trainable_ids()` order. They ACCUMULATE across
/// `forward_backward` calls (gradient accumulation); call `zero` after each optimizer step.
pub struct Grads<B: Backend> {
    backend: Arc<B>,
    ids: Vec<ParamId>,
    bufs: Vec<B::Buf>,
}

impl<B: Backend> Grads<B> {
    /// Zeroed gradients for the trainable parameters of `model`, in `Storage::Master` (f32): they
    /// accumulate over micro-batches and feed the optimizer.
    pub fn zeros(model: &Gemma2Model<B>) -> Result<Self> {
        let ids = model.trainable_ids();
        let r = model.lora.as_ref().map_or(0, |l| l.r);
        let bufs = ids
            .iter()
            .map(|id| {
                model
                    .backend
                    .zeros_for(id.shape(&model.config, r).iter().product(), Storage::Master)
            })
            .collect::<afinar_kernels::Result<Vec<_>>>()?;
        Ok(Grads {
            backend: model.backend.clone(),
            ids,
            bufs,
        })
    }

    /// Sets every gradient to 0.
    pub fn zero(&mut self) -> Result<()> {
        for b in &mut self.bufs {
            self.backend.fill(b, 0.0)?;
        }
        Ok(())
    }

    /// Σ g² over all tensors, in f64 (the squared global norm for clipping).
    pub fn sum_squares(&self) -> Result<f64> {
        let mut s = 0.0;
        for b in &self.bufs {
            s += self.backend.sum_squares(b)?;
        }
        Ok(s)
    }

    /// g ← alpha·g for every tensor (clipping, loss normalisation).
    pub fn scale(&mut self, alpha: f32) -> Result<()> {
        for b in &mut self.bufs {
            self.backend.scale(b, alpha)?;
        }
        Ok(())
    }

    /// The parameter ids, in order.
    pub fn ids(&self) -> &[ParamId] {
        &self.ids
    }

    /// (id, gradient) pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &B::Buf)> {
        self.ids.iter().copied().zip(self.bufs.iter())
    }

    /// The gradient of one parameter.
    pub fn get(&self, id: ParamId) -> Option<&B::Buf> {
        self.ids
            .iter()
            .position(|&i| i == id)
            .map(|i| &self.bufs[i])
    }

    /// The gradient of a parameter by file name (`ParamId::name`).
    pub fn get_by_name(&self, name: &str) -> Option<&B::Buf> {
        ParamId::parse(name).and_then(|id| self.get(id))
    }

    pub(crate) fn get_mut(&mut self, id: ParamId) -> Option<&mut B::Buf> {
        self.ids
            .iter()
            .position(|&i| i == id)
            .map(move |i| &mut self.bufs[i])
    }

    pub(crate) fn position(&self, id: ParamId) -> Option<usize> {
        self.ids.iter().position(|&i| i == id)
    }

    pub(crate) fn bufs_mut(&mut self) -> &mut [B::Buf] {
        &mut self.bufs
    }

    /// Copies one gradient to the host.
    pub fn to_host(&self, id: ParamId) -> Result<Vec<f32>> {
        let b = self
            .get(id)
            .ok_or_else(|| GemmaError::Invalid(format!("no gradient for `{}`", id.name())))?;
        Ok(self.backend.to_host(b)?)
    }
}

/// A trainable parameter with its gradient, for the optimizer.
pub struct TrainableParam<'a, B: Backend> {
    pub id: ParamId,
    pub param: &'a mut B::Buf,
    pub grad: &'a B::Buf,
}

// ---------------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------------

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
    /// in the backward. Gradients are identical either way; memory drops from O(L·acts) to O(L·N·H + acts).
    pub checkpointing: bool,
}

impl<B: Backend> Gemma2Model<B> {
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
        if ids != grads.ids {
            return Err(GemmaError::Invalid(format!(
                "gradients hold {} tensors that do not match this model's {} trainable tensors (made for another model?)",
                grads.ids.len(),
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
        debug_assert_eq!(params.len(), grads.bufs.len());
        Ok(params
            .into_iter()
            .zip(grads.bufs.iter())
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

// ---------------------------------------------------------------------------------------------------
// Building: from a checkpoint directory, from a tensor store, or random
// ---------------------------------------------------------------------------------------------------

/// Source of base weights for `Gemma2Model::build`.
enum Source<'a> {
    Store(&'a TensorStore),
    /// Random init as transformers' `_init_weights`: N(0, std) for embedding and linears, 0 for norm offsets.
    Random {
        seed: u64,
        std: f64,
    },
}

/// Standard normal sample by Box–Muller (rand 0.9 has no normal distribution without rand_distr).
fn normal_vec(rng: &mut rand_chacha::ChaCha8Rng, len: usize, std: f64) -> Vec<f32> {
    use rand::Rng;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let th = std::f64::consts::TAU * u2;
        out.push((r * th.cos()) as f32);
        if out.len() < len {
            out.push((r * th.sin()) as f32);
        }
    }
    out
}

impl<'a> Source<'a> {
    /// The f32 values of `name` with shape `shape`.
    fn fetch(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        match self {
            Source::Store(s) => s.read_f32_shaped(name, shape),
            Source::Random { seed, std } => {
                use rand::SeedableRng;
                let numel = shape.iter().product();
                if name.ends_with("layernorm.weight") || name == "model.norm.weight" {
                    return Ok(vec![0.0; numel]);
                }
                // One independent stream per tensor name, so adding layers does not reshuffle the others.
                let key = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
                });
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ key);
                Ok(normal_vec(&mut rng, numel, *std))
            }
        }
    }
}

impl<B: Backend> Gemma2Model<B> {
    /// Loads a Hugging Face model directory (config.json + model.safetensors or sharded safetensors with
    /// an index). Weights are converted to f32 and moved to the backend one tensor at a time (layer by
    /// layer), and target linears are quantized to NF4 on the fly when `opts.quantize` asks for it, so
    /// peak host memory stays near one layer's f32 weights on top of the memory-mapped files.
    /// Pre-quantized bitsandbytes 4-bit linears (`*.weight.absmax` present) are read directly as NF4.
    pub fn load(backend: Arc<B>, dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let config = Gemma2Config::from_file(crate::config::config_path(dir))?;
        let store = TensorStore::open_dir(dir)?;
        Self::from_store(backend, config, &store, opts)
    }

    /// Builds the model from an open tensor store.
    pub fn from_store(
        backend: Arc<B>,
        config: Gemma2Config,
        store: &TensorStore,
        opts: &LoadOptions,
    ) -> Result<Self> {
        Self::build(backend, config, Source::Store(store), opts)
    }

    /// A randomly initialised model (embedding and linears N(0, 0.02), norm offsets 0), for pretraining the
    /// demo model, tests and benchmarks. Deterministic in `opts.seed`.
    pub fn random(backend: Arc<B>, config: Gemma2Config, opts: &LoadOptions) -> Result<Self> {
        let std = config
            .raw
            .get("initializer_range")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.02);
        Self::build(
            backend,
            config,
            Source::Random {
                seed: opts.seed,
                std,
            },
            opts,
        )
    }

    fn build(
        backend: Arc<B>,
        config: Gemma2Config,
        src: Source<'_>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        if opts.full_finetune && opts.quantize != Quantization::None {
            return Err(GemmaError::Invalid(
                "full fine-tuning needs dense weights: use Quantization::None (NF4 bases are frozen)".into(),
            ));
        }
        let cfg = &config;
        if let Some(lc) = &opts.lora {
            // ΔW = B·A of an [out, in] linear has rank ≤ min(out, in): a larger r only adds parameters,
            // and an absurd r (a typo, 10^11) would otherwise abort in the allocation of A.
            for &t in &lc.targets {
                let (out_f, in_f) = t.dims(cfg);
                if lc.r > out_f.min(in_f) {
                    return Err(GemmaError::LoraConfig(format!(
                        "r = {} exceeds min(out, in) = {} of {t} ([{out_f}, {in_f}]); ΔW cannot have a \
                         rank above that",
                        lc.r,
                        out_f.min(in_f)
                    )));
                }
            }
        }
        let h = cfg.hidden_size;
        let nl = cfg.num_hidden_layers;
        let bar = progress_bar(opts.progress, nl as u64 + 2);
        // Trained base tensors (full fine-tuning) are optimizer parameters: f32 master storage.
        // Frozen ones are stored like activations (bf16 on a bf16 GPU run), as transformers holds them.
        let base = if opts.full_finetune {
            Storage::Master
        } else {
            Storage::Activation
        };

        let mut emb = src.fetch("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        if let (Source::Random { .. }, Some(pad)) = (&src, cfg.pad_token_id) {
            // nn.Embedding(padding_idx=pad) starts with a zero row, as transformers' init leaves it.
            if let Some(row) = usize::try_from(pad).ok().filter(|&p| p < cfg.vocab_size) {
                emb[row * h..(row + 1) * h].fill(0.0);
            }
        }
        // Handed over, not copied: on the CPU the fetched f32 table becomes the buffer itself, so the
        // [V,H] embedding (3.7 GB in f32 for Gemma-2-9B) exists once on the host, not twice.
        let embed_tokens = backend.from_vec_for(emb, base)?;
        bar.inc(1);
        // No reservation from the config's layer count: a corrupt config must fail on a missing
        // tensor, not abort on a huge allocation.
        let mut layers = Vec::new();
        for li in 0..nl {
            let norm = |kind: NormKind| -> Result<B::Buf> {
                let name = ParamId::Norm { layer: li, kind }.name();
                Ok(backend.from_vec_for(src.fetch(&name, &[h])?, base)?)
            };
            let norms = [
                norm(NormKind::Input)?,
                norm(NormKind::PostAttention)?,
                norm(NormKind::PreFeedforward)?,
                norm(NormKind::PostFeedforward)?,
            ];
            let mut lins = Vec::with_capacity(7);
            for target in Target::ALL {
                lins.push(build_linear(&*backend, cfg, &src, opts, li, target)?);
            }
            let linears: [Linear<B>; 7] = lins.try_into().map_err(|_| {
                GemmaError::Invalid("internal: a layer must have exactly seven linears".into())
            })?;
            layers.push(Layer { norms, linears });
            bar.inc(1);
        }
        let norm = backend.from_vec_for(src.fetch("model.norm.weight", &[h])?, base)?;
        bar.inc(1);
        bar.finish_and_clear();
        Ok(Gemma2Model {
            backend,
            config,
            embed_tokens,
            layers,
            norm,
            lora: opts.lora.clone(),
            full_finetune: opts.full_finetune,
            checkpointing: false,
        })
    }
}

/// Loads one linear: pre-quantized NF4 as is, else f32 → (optionally) NF4; adds LoRA factors when targeted.
fn build_linear<B: Backend>(
    backend: &B,
    cfg: &Gemma2Config,
    src: &Source<'_>,
    opts: &LoadOptions,
    layer: usize,
    target: Target,
) -> Result<Linear<B>> {
    let (out_f, in_f) = target.dims(cfg);
    let name = ParamId::Weight { layer, target }.name();
    let prequant = match src {
        Source::Store(s) => crate::bnb::is_bnb_4bit(s, &name),
        Source::Random { .. } => false,
    };
    let base = if prequant {
        let Source::Store(s) = src else {
            return Err(GemmaError::Invalid(
                "internal: pre-quantized weight without a store".into(),
            ));
        };
        if opts.full_finetune {
            return Err(GemmaError::Invalid(format!(
                "`{name}` is a pre-quantized bitsandbytes 4-bit weight; full fine-tuning needs a dense checkpoint"
            )));
        }
        let w = crate::bnb::read_bnb_nf4(s, &name, &[out_f, in_f])?;
        LinearBase::Nf4(backend.nf4_from_host(&w.tensor)?)
    } else {
        let data = src.fetch(&name, &[out_f, in_f])?;
        match opts.quantize {
            Quantization::None => {
                let storage = if opts.full_finetune {
                    Storage::Master
                } else {
                    Storage::Activation
                };
                LinearBase::Dense(backend.from_vec_for(data, storage)?)
            }
            Quantization::Nf4 { double_quant } => {
                let q = afinar_kernels::nf4::quantize(&data, &[out_f, in_f], double_quant)?;
                LinearBase::Nf4(backend.nf4_from_host(&q)?)
            }
        }
    };
    let lora = match &opts.lora {
        // LoRA factors are what the optimizer updates: f32 master storage (peft keeps adapters in f32
        // over a bf16 base, too).
        Some(lc) if lc.targets_contains(target) => Some(LoraWeights {
            a: backend.from_vec_for(
                crate::lora::init_a(opts.seed, layer, target, lc.r, in_f),
                Storage::Master,
            )?,
            b: backend.zeros_for(out_f * lc.r, Storage::Master)?,
            r: lc.r,
            scale: lc.scale(),
            dropout: lc.dropout,
        }),
        _ => None,
    };
    Ok(Linear {
        target,
        out_features: out_f,
        in_features: in_f,
        base,
        lora,
    })
}

/// A progress bar on stderr when asked for and stderr is a terminal; hidden otherwise.
fn progress_bar(enabled: bool, len: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if enabled && std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(len);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("loading {bar:40} {pos}/{len} layers {elapsed}")
        {
            bar.set_style(style);
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    }
}

// ---------------------------------------------------------------------------------------------------
// Passes
// ---------------------------------------------------------------------------------------------------

/// A batch uploaded to the backend.
struct DeviceBatch<B: Backend> {
    ids: B::Ids,
    pos: B::Ids,
    seg: Option<B::Ids>,
    targets: B::Ids,
}

impl<B: Backend> Gemma2Model<B> {
    fn upload(&self, batch: &Batch) -> Result<DeviceBatch<B>> {
        batch.validate(self.config.vocab_size)?;
        let be = &*self.backend;
        Ok(DeviceBatch {
            ids: be.ids_from_host(&batch.input_ids)?,
            pos: be.ids_from_host(&batch.positions)?,
            seg: batch
                .segment_ids
                .as_ref()
                .map(|s| be.ids_from_host(s))
                .transpose()?,
            targets: be.ids_from_host(&batch.targets)?,
        })
    }

    fn ctx<'a>(&'a self, batch: &Batch, dev: &'a DeviceBatch<B>, train: bool) -> Ctx<'a, B> {
        Ctx {
            backend: &*self.backend,
            cfg: &self.config,
            b: batch.b,
            t: batch.t,
            pos: &dev.pos,
            seg: dev.seg.as_ref(),
            train,
            dropout_seed: batch.dropout_seed,
        }
    }

    /// Embedding and all layers in inference mode (no dropout, nothing kept): the final hidden state
    /// after the final norm [N,H].
    fn final_hidden(&self, batch: &Batch, dev: &DeviceBatch<B>) -> Result<B::Buf> {
        let be = &*self.backend;
        let ctx = self.ctx(batch, dev, false);
        let (n, h) = (batch.tokens(), self.config.hidden_size);
        let mut x = be.zeros(n * h)?;
        be.embedding_fwd(
            &dev.ids,
            &self.embed_tokens,
            &mut x,
            self.config.vocab_size,
            h,
            be.round_activation(self.config.embed_scale()),
        )?;
        let mut next = be.zeros(n * h)?;
        for (li, layer) in self.layers.iter().enumerate() {
            layer_fwd(&ctx, layer, li, &x, &mut next)?;
            std::mem::swap(&mut x, &mut next);
        }
        let mut rstd = be.zeros_for(n, Storage::Master)?;
        be.rmsnorm_fwd(
            &x,
            &self.norm,
            &mut next,
            &mut rstd,
            n,
            h,
            self.config.rms_norm_eps as f32,
        )?;
        Ok(next)
    }

    /// Logits [B·T, V] (row-major, after the final soft-cap, as transformers returns them). For tests and
    /// evaluation on small batches only: training never builds [N,V].
    pub fn logits(&self, batch: &Batch) -> Result<Vec<f32>> {
        let dev = self.upload(batch)?;
        let xf = self.final_hidden(batch, &dev)?;
        let be = &*self.backend;
        let (n, h, v) = (
            batch.tokens(),
            self.config.hidden_size,
            self.config.vocab_size,
        );
        // Evaluation logits in f32 (small batches only; see above).
        let mut logits = be.zeros_for(n * v, Storage::Master)?;
        be.matmul_xwt(
            &xf,
            &self.embed_tokens,
            &mut logits,
            n,
            h,
            v,
            Accum::Overwrite,
        )?;
        if let Some(c) = self.config.final_logit_softcapping {
            be.softcap_fwd(&mut logits, c as f32)?;
        }
        Ok(be.to_host(&logits)?)
    }

    /// (Σ cross-entropy over scored targets, number of scored targets), inference mode, no gradients.
    /// Mean loss = Σ / count (what transformers returns for one batch).
    pub fn loss(&self, batch: &Batch) -> Result<(f64, usize)> {
        let dev = self.upload(batch)?;
        let xf = self.final_hidden(batch, &dev)?;
        let (n, h, v) = (
            batch.tokens(),
            self.config.hidden_size,
            self.config.vocab_size,
        );
        let cap = self.config.final_logit_softcapping.map(|c| c as f32);
        Ok(self.backend.lm_head_ce(
            &xf,
            &self.embed_tokens,
            &dev.targets,
            n,
            h,
            v,
            cap,
            1.0,
            None,
            None,
        )?)
    }

    /// Forward and backward of one micro-batch in training mode (LoRA dropout on, masks from
    /// `batch.dropout_seed`). Adds grad_scale·∂(Σ loss)/∂θ into `grads` for every trainable θ (gradients
    /// ACCUMULATE; zero them after each optimizer step) and returns (Σ loss, scored count) of this batch.
    ///
    /// For "loss normalised by the trained tokens of the whole accumulation window", pass
    /// grad_scale = 1 / (tokens in the window).
    pub fn forward_backward(
        &self,
        batch: &Batch,
        grad_scale: f32,
        grads: &mut Grads<B>,
    ) -> Result<(f64, usize)> {
        if grads.ids != self.trainable_ids() {
            return Err(GemmaError::Invalid("gradients do not match this model's trainable parameters (made for another model?)".into()));
        }
        let dev = self.upload(batch)?;
        let ctx = self.ctx(batch, &dev, true);
        let be = &*self.backend;
        let cfg = &self.config;
        let (n, h, v) = (batch.tokens(), cfg.hidden_size, cfg.vocab_size);
        let full = self.full_finetune;
        let eps = cfg.rms_norm_eps as f32;

        // Forward: xs[l] is the input of layer l (xs[L] the last output). Without checkpointing the saved
        // activations of every layer are kept; with it they are dropped and recomputed in the backward.
        let mut xs: Vec<B::Buf> = Vec::with_capacity(self.layers.len() + 1);
        let mut x0 = be.zeros(n * h)?;
        be.embedding_fwd(
            &dev.ids,
            &self.embed_tokens,
            &mut x0,
            v,
            h,
            be.round_activation(cfg.embed_scale()),
        )?;
        xs.push(x0);
        let mut acts = Vec::with_capacity(if self.checkpointing {
            0
        } else {
            self.layers.len()
        });
        for (li, layer) in self.layers.iter().enumerate() {
            let mut out = be.zeros(n * h)?;
            let a = layer_fwd(&ctx, layer, li, &xs[li], &mut out)?;
            if !self.checkpointing {
                acts.push(a);
            }
            xs.push(out);
        }
        let last = &xs[self.layers.len()];
        let mut xf = be.zeros(n * h)?;
        let mut rstdf = be.zeros_for(n, Storage::Master)?;
        be.rmsnorm_fwd(last, &self.norm, &mut xf, &mut rstdf, n, h, eps)?;

        // Fused LM head + soft-capped cross-entropy: ∂/∂xf, and ∂/∂emb (tied head) in full fine-tuning.
        let cap = cfg.final_logit_softcapping.map(|c| c as f32);
        let mut dxf = be.zeros(n * h)?;
        let (sum, count) = {
            let demb = if full {
                grads.get_mut(ParamId::Embed)
            } else {
                None
            };
            be.lm_head_ce(
                &xf,
                &self.embed_tokens,
                &dev.targets,
                n,
                h,
                v,
                cap,
                grad_scale,
                Some(&mut dxf),
                demb,
            )?
        };
        drop(xf);
        let mut dh = be.zeros(n * h)?;
        {
            let dw = if full {
                grads.get_mut(ParamId::FinalNorm)
            } else {
                None
            };
            be.rmsnorm_bwd(&dxf, last, &self.norm, &rstdf, &mut dh, dw, n, h)?;
        }
        drop(dxf);

        // Backward through the layers, last to first.
        let mut dnext = be.zeros(n * h)?;
        for li in (0..self.layers.len()).rev() {
            let layer = &self.layers[li];
            let x = &xs[li];
            if self.checkpointing {
                let mut scratch = be.zeros(n * h)?;
                let a = layer_fwd(&ctx, layer, li, x, &mut scratch)?;
                layer_bwd(&ctx, layer, li, x, &a, &dh, &mut dnext, grads, full)?;
            } else {
                let a = acts.pop().ok_or_else(|| {
                    GemmaError::Invalid("internal: missing saved activations".into())
                })?;
                layer_bwd(&ctx, layer, li, x, &a, &dh, &mut dnext, grads, full)?;
            }
            std::mem::swap(&mut dh, &mut dnext);
        }
        if full {
            let demb = grads.get_mut(ParamId::Embed).ok_or_else(|| {
                GemmaError::Invalid("gradients have no slot for the embedding".into())
            })?;
            be.embedding_bwd(
                &dev.ids,
                &dh,
                demb,
                v,
                h,
                be.round_activation(cfg.embed_scale()),
            )?;
        }
        Ok((sum, count))
    }
}
