//! PEFT LoRA adapters on disk: `adapter_config.json` + `adapter_model.safetensors`, exactly as peft's
//! `save_pretrained` writes them, and loading of adapters written by peft.
//!
//! Files:
//! - `adapter_config.json`: `json.dumps(config, indent=2, sort_keys=True)` with the full key set of
//!   peft 0.21.2 (`peft_type` "LORA", `task_type` "CAUSAL_LM", `r`, `lora_alpha`, `use_rslora`,
//!   `lora_dropout`, `target_modules`, `base_model_name_or_path`, `inference_mode` true, ...).
//! - `adapter_model.safetensors`: F32, metadata `{"format": "pt"}`, one A [R, in] and one B [out, R] per
//!   adapted linear, named `base_model.model.model.layers.{i}.{self_attn|mlp}.{x}_proj.lora_{A|B}.weight`.
//!
//! Loading accepts what peft and its users produce: keys with the adapter name (`lora_A.default.weight`)
//! or without the `base_model.model.` prefix, F32/BF16/F16 tensors, `target_modules` as module names, dotted
//! module paths (`self_attn.q_proj`, `model.layers.0.self_attn.q_proj`) or a string ("all-linear" or a
//! regex). The tensors present are authoritative for which linears are adapted; a `target_modules` list
//! that disagrees with them is an error. Every `LoraConfig` key of peft 0.21.2 that changes which modules
//! get LoRA or what they compute, and that afinar does not implement (layer subsets `layers_to_transform`
//! / `layers_pattern`, `exclude_modules`, DoRA and the other variants, LoRA bias, rank/alpha patterns,
//! fan_in_fan_out, modules_to_save, base-rewriting initializations such as PiSSA), is refused with an
//! error naming the key, never silently ignored: see `refuse_unsupported_keys` for the whole list.
//!
//! Both directories are written atomically: into a temporary sibling directory, then renamed.
//!
//! - `adapter_config.rs`: [`AdapterConfig`], the keys of `adapter_config.json` (write and parse);
//! - `unsupported.rs`: the peft keys afinar refuses rather than ignores;
//! - `load.rs` / `save.rs`: [`PeftAdapter::load`] and [`PeftAdapter::save`] (and the atomic directory
//!   write the exporter uses too);
//! - this file: [`PeftAdapter`] in memory, and moving adapters into and out of a model.

mod adapter_config;
mod load;
mod save;
mod unsupported;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use afinar_kernels::Backend;

use crate::error::{GemmaError, Result};
use crate::lora::{LoraConfig, Target};
use crate::model::Gemma2Model;
use crate::params::{LoraWeights, ParamId};

pub use adapter_config::AdapterConfig;
pub(crate) use save::write_dir_atomically;

/// File name of the adapter config.
pub const ADAPTER_CONFIG_NAME: &str = "adapter_config.json";
/// File name of the adapter weights.
pub const ADAPTER_WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// The peft version whose `adapter_config.json` key set is written.
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

/// The factors of one adapted linear, host side, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    /// A [R, in].
    pub a: Vec<f32>,
    /// B [out, R].
    pub b: Vec<f32>,
    pub in_features: usize,
    pub out_features: usize,
}

/// A LoRA adapter in memory: its config and the factors of every adapted linear.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftAdapter {
    pub config: AdapterConfig,
    /// Keyed by (layer, target). Every layer of the model has the same targets.
    pub tensors: BTreeMap<(usize, Target), LoraPair>,
}

impl PeftAdapter {
    /// The adapted modules (sorted, from the tensors).
    pub fn targets(&self) -> Vec<Target> {
        let s: BTreeSet<Target> = self.tensors.keys().map(|&(_, t)| t).collect();
        s.into_iter().collect()
    }

    /// Number of layers the adapter covers (1 + the highest layer index; 0 when empty).
    pub fn num_layers(&self) -> usize {
        self.tensors
            .keys()
            .map(|&(l, _)| l.saturating_add(1))
            .max()
            .unwrap_or(0)
    }

    /// The `LoraConfig` this adapter corresponds to.
    pub fn lora_config(&self) -> Result<LoraConfig> {
        let names: Vec<&str> = self.targets().iter().map(|t| t.name()).collect();
        LoraConfig::new(
            self.config.r,
            self.config.lora_alpha,
            self.config.lora_dropout,
            self.config.use_rslora,
            &names,
        )
    }

    /// Copies the LoRA factors of `model` (which must have adapters) into an adapter.
    pub fn from_model<B: Backend>(
        model: &Gemma2Model<B>,
        base_model_name_or_path: Option<&str>,
    ) -> Result<Self> {
        let cfg = model.lora.as_ref().ok_or_else(|| {
            GemmaError::Invalid(
                "the model has no LoRA adapters to save (load it with a LoRA config)".into(),
            )
        })?;
        let backend = model.backend();
        let mut tensors = BTreeMap::new();
        for (layer, l) in model.layers.iter().enumerate() {
            for lin in &l.linears {
                if let Some(lo) = &lin.lora {
                    tensors.insert(
                        (layer, lin.target),
                        LoraPair {
                            a: backend.to_host(&lo.a)?,
                            b: backend.to_host(&lo.b)?,
                            in_features: lin.in_features,
                            out_features: lin.out_features,
                        },
                    );
                }
            }
        }
        Ok(PeftAdapter {
            config: AdapterConfig::from_lora(cfg, base_model_name_or_path),
            tensors,
        })
    }

    /// Puts this adapter into `model`.
    ///
    /// - A model without LoRA gets LoRA factors on the adapter's targets (its `lora` config becomes the
    ///   adapter's).
    /// - A model with LoRA must have the same rank and the same targets (else an error says which differ);
    ///   its A and B are overwritten, and α / rsLoRA / dropout are taken from the adapter, because they
    ///   define what the adapter computes.
    ///
    /// Every tensor shape is checked against the model's linears before anything is changed, so on error
    /// the model is untouched.
    pub fn apply_to<B: Backend>(&self, model: &mut Gemma2Model<B>) -> Result<()> {
        let want = self.lora_config()?;
        if let Some(have) = &model.lora {
            if have.r != want.r {
                return Err(GemmaError::Invalid(format!(
                    "adapter rank r = {} does not match the model's LoRA rank r = {}",
                    want.r, have.r
                )));
            }
            if have.targets != want.targets {
                let fmt = |t: &[Target]| t.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ");
                return Err(GemmaError::Invalid(format!(
                    "adapter targets [{}] do not match the model's LoRA targets [{}]",
                    fmt(&want.targets),
                    fmt(&have.targets)
                )));
            }
        }
        let nl = model.layers.len();
        if self.num_layers() != nl {
            return Err(GemmaError::Invalid(format!(
                "the adapter covers {} layers but the model has {nl}",
                self.num_layers()
            )));
        }
        // Validate every shape first.
        for (&(layer, target), p) in &self.tensors {
            let lin = model.layers[layer].linear(target);
            if p.in_features != lin.in_features {
                return Err(GemmaError::ShapeMismatch {
                    name: ParamId::LoraA { layer, target }.name(),
                    expected: vec![want.r, lin.in_features],
                    found: vec![want.r, p.in_features],
                });
            }
            if p.out_features != lin.out_features {
                return Err(GemmaError::ShapeMismatch {
                    name: ParamId::LoraB { layer, target }.name(),
                    expected: vec![lin.out_features, want.r],
                    found: vec![p.out_features, want.r],
                });
            }
        }
        let backend = model.backend().clone();
        let scale = want.scale();
        for (&(layer, target), p) in &self.tensors {
            let lin = model.layers[layer].linear_mut(target);
            let a = backend.from_host(&p.a)?;
            let b = backend.from_host(&p.b)?;
            lin.lora = Some(LoraWeights {
                a,
                b,
                r: want.r,
                scale,
                dropout: want.dropout,
            });
        }
        model.lora = Some(want);
        Ok(())
    }
}

/// Saves the LoRA factors of `model` as a peft adapter directory (see `PeftAdapter::save`).
pub fn save_adapter<B: Backend>(
    model: &Gemma2Model<B>,
    dir: impl AsRef<Path>,
    base_model_name_or_path: Option<&str>,
) -> Result<()> {
    PeftAdapter::from_model(model, base_model_name_or_path)?.save(dir)
}

/// Loads a peft adapter directory into `model` (see `PeftAdapter::apply_to`). Returns the adapter's config.
pub fn load_adapter<B: Backend>(
    model: &mut Gemma2Model<B>,
    dir: impl AsRef<Path>,
) -> Result<AdapterConfig> {
    let adapter = PeftAdapter::load(dir)?;
    adapter.apply_to(model)?;
    Ok(adapter.config)
}
