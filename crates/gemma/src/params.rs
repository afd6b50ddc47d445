//! The model's parameters: linears (dense or NF4 base, optional LoRA), decoder layers, and the
//! [`ParamId`] that names every tensor in files (HF names for base weights, peft names for LoRA).

use afinar_kernels::Backend;

use crate::config::Gemma2Config;
use crate::lora::Target;

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
