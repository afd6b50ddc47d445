//! Reading an adapter directory written by peft (or by `PeftAdapter::save`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::adapter_config::cfg_err;
use super::{AdapterConfig, LoraPair, PeftAdapter, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME};
use crate::error::{GemmaError, Result};
use crate::lora::Target;
use crate::params::ParamId;
use crate::safetensors_io::TensorStore;

impl PeftAdapter {
    /// Reads an adapter directory written by peft (or by `save`).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg_path = dir.join(ADAPTER_CONFIG_NAME);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| GemmaError::io(&cfg_path, e))?;
        let config = AdapterConfig::from_json_str(&text, &cfg_path)?;
        let w_path = dir.join(ADAPTER_WEIGHTS_NAME);
        if !w_path.is_file() && dir.join("adapter_model.bin").is_file() {
            return Err(GemmaError::NotSupported {
                what: format!(
                    "{}: pickled adapter weights",
                    dir.join("adapter_model.bin").display()
                ),
                hint: "re-save the adapter with safetensors (peft's default since 0.7)".into(),
            });
        }
        let store = TensorStore::open_files(std::slice::from_ref(&w_path))?;
        let mut a_map: BTreeMap<(usize, Target), (Vec<f32>, Vec<usize>)> = BTreeMap::new();
        let mut b_map: BTreeMap<(usize, Target), (Vec<f32>, Vec<usize>)> = BTreeMap::new();
        for name in store.names() {
            let id = ParamId::parse(name)
                .filter(ParamId::is_lora)
                .ok_or_else(|| GemmaError::NotSupported {
                    what: format!("{}: tensor `{name}`", w_path.display()),
                    hint: "an adapter may hold only lora_A / lora_B weights of the Gemma-2 linears"
                        .into(),
                })?;
            let info = store.info(name)?;
            if info.shape.len() != 2 {
                return Err(GemmaError::StoredShapeMismatch {
                    name: name.to_string(),
                    path: w_path.clone(),
                    expected: vec![0, 0],
                    found: info.shape.clone(),
                });
            }
            let values = store.read_f32(name)?;
            let (key, map) = match id {
                ParamId::LoraA { layer, target } => ((layer, target), &mut a_map),
                ParamId::LoraB { layer, target } => ((layer, target), &mut b_map),
                _ => unreachable!("filtered by is_lora"),
            };
            if map.insert(key, (values, info.shape.clone())).is_some() {
                return Err(GemmaError::Invalid(format!(
                    "{}: two tensors for {} {} (with and without the adapter name?)",
                    w_path.display(),
                    key.1.module_path(key.0),
                    if matches!(id, ParamId::LoraA { .. }) {
                        "lora_A"
                    } else {
                        "lora_B"
                    }
                )));
            }
        }
        let r = config.r;
        let mut tensors = BTreeMap::new();
        for (key, (a, a_shape)) in a_map {
            let (layer, target) = key;
            let (b, b_shape) = b_map
                .remove(&key)
                .ok_or_else(|| GemmaError::MissingTensor {
                    name: ParamId::LoraB { layer, target }.name(),
                    files: vec![w_path.clone()],
                })?;
            if a_shape[0] != r {
                return Err(GemmaError::StoredShapeMismatch {
                    name: ParamId::LoraA { layer, target }.name(),
                    path: w_path.clone(),
                    expected: vec![r, a_shape[1]],
                    found: a_shape,
                });
            }
            if b_shape[1] != r {
                return Err(GemmaError::StoredShapeMismatch {
                    name: ParamId::LoraB { layer, target }.name(),
                    path: w_path.clone(),
                    expected: vec![b_shape[0], r],
                    found: b_shape,
                });
            }
            tensors.insert(
                key,
                LoraPair {
                    a,
                    b,
                    in_features: a_shape[1],
                    out_features: b_shape[0],
                },
            );
        }
        if let Some((&(layer, target), _)) = b_map.iter().next() {
            return Err(GemmaError::MissingTensor {
                name: ParamId::LoraA { layer, target }.name(),
                files: vec![w_path],
            });
        }
        if tensors.is_empty() {
            return Err(GemmaError::Invalid(format!(
                "{}: the adapter holds no LoRA tensors",
                w_path.display()
            )));
        }
        let adapter = PeftAdapter { config, tensors };
        adapter.check_targets(&cfg_path)?;
        Ok(adapter)
    }

    /// The tensors must cover the same targets in every layer, and agree with a `target_modules` list.
    fn check_targets(&self, cfg_path: &Path) -> Result<()> {
        let targets = self.targets();
        let layers = self.num_layers();
        for &t in &targets {
            // Built from the tensors (never by walking 0..layers: a hostile file could name layer 2^63).
            let have: Vec<usize> = self
                .tensors
                .keys()
                .filter(|k| k.1 == t)
                .map(|k| k.0)
                .collect();
            if have.len() != layers {
                return Err(GemmaError::NotSupported {
                    what: format!(
                        "an adapter that adapts {t} only in layers {have:?} of 0..{layers}"
                    ),
                    hint: "afinar applies LoRA to the same modules in every layer".into(),
                });
            }
        }
        // A list of names / module paths: every entry must name a linear, and their set must be the
        // tensors' set. A string is a peft regex (or "all-linear"): the tensors decide.
        let tm = &self.config.target_modules;
        let is_regex_string = tm.len() == 1
            && (tm[0] == "all-linear" || tm[0].contains(['*', '(', '|', '^', '$', '\\', '[']));
        if !is_regex_string {
            let mut listed = BTreeSet::new();
            for m in tm {
                let t = Target::parse(m)
                    .map_err(|e| cfg_err(cfg_path, "target_modules", e.to_string()))?;
                listed.insert(t);
            }
            let found: BTreeSet<Target> = targets.iter().copied().collect();
            if listed != found {
                let fmt = |s: &BTreeSet<Target>| {
                    s.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
                };
                return Err(cfg_err(
                    cfg_path,
                    "target_modules",
                    format!(
                        "lists [{}] but the weights file adapts [{}]",
                        fmt(&listed),
                        fmt(&found)
                    ),
                ));
            }
        }
        Ok(())
    }
}
