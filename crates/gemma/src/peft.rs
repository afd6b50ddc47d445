//! PEFT LoRA adapters on disk: `adapter_config.json` + `adapter_model.safetensors`, exactly as peft's
//! `save_pretrained` writes them (facts §2.6, §2.7), and loading of adapters written by peft.
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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use afinar_kernels::Backend;
use serde_json::{Map, Value};

use crate::error::{GemmaError, Result};
use crate::lora::{LoraConfig, Target};
use crate::model::Gemma2Model;
use crate::params::{LoraWeights, ParamId};
use crate::safetensors_io::{TensorOut, TensorStore};

/// File name of the adapter config.
pub const ADAPTER_CONFIG_NAME: &str = "adapter_config.json";
/// File name of the adapter weights.
pub const ADAPTER_WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// The peft version whose `adapter_config.json` key set is written.
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

/// The fields of `adapter_config.json` that define what a LoRA adapter computes.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    /// Rank R.
    pub r: usize,
    /// α (written as an integer when it is one, as peft does for an int argument).
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Scale α/√R instead of α/R.
    pub use_rslora: bool,
    /// `target_modules` as written in the file (a string such as "all-linear" is kept as one entry).
    pub target_modules: Vec<String>,
    /// `base_model_name_or_path` (the Hub id or local path of the base model), if known.
    pub base_model_name_or_path: Option<String>,
}

impl AdapterConfig {
    /// The adapter config for a model's `LoraConfig`.
    pub fn from_lora(cfg: &LoraConfig, base_model_name_or_path: Option<&str>) -> Self {
        AdapterConfig {
            r: cfg.r,
            lora_alpha: cfg.alpha,
            lora_dropout: cfg.dropout,
            use_rslora: cfg.use_rslora,
            target_modules: cfg.targets.iter().map(|t| t.name().to_string()).collect(),
            base_model_name_or_path: base_model_name_or_path.map(str::to_string),
        }
    }

    /// s = α/R, or α/√R with rsLoRA (f64 as peft computes it, then f32).
    pub fn scale(&self) -> f32 {
        let r = self.r as f64;
        (if self.use_rslora {
            self.lora_alpha / r.sqrt()
        } else {
            self.lora_alpha / r
        }) as f32
    }

    /// `adapter_config.json` text: every key peft 0.21.2 writes, sorted, indent 2.
    pub fn to_json_string(&self) -> String {
        let num = |x: f64| -> Value {
            if x.fract() == 0.0 && x.abs() < 9.0e15 {
                Value::from(x as i64)
            } else {
                Value::from(x)
            }
        };
        let null = Value::Null;
        let empty = || Value::Object(Map::new());
        let mut m: BTreeMap<&str, Value> = BTreeMap::new();
        m.insert("alora_invocation_tokens", null.clone());
        m.insert("alpha_pattern", empty());
        m.insert("arrow_config", null.clone());
        m.insert("auto_mapping", null.clone());
        m.insert(
            "base_model_name_or_path",
            self.base_model_name_or_path
                .as_ref()
                .map_or(Value::Null, |s| Value::String(s.clone())),
        );
        m.insert("bias", Value::String("none".into()));
        m.insert("corda_config", null.clone());
        m.insert("ensure_weight_tying", Value::Bool(false));
        m.insert("eva_config", null.clone());
        m.insert("exclude_modules", null.clone());
        m.insert("fan_in_fan_out", Value::Bool(false));
        m.insert("inference_mode", Value::Bool(true));
        m.insert("init_lora_weights", Value::Bool(true));
        m.insert("kasa_config", null.clone());
        m.insert("layer_replication", null.clone());
        m.insert("layers_pattern", null.clone());
        m.insert("layers_to_transform", null.clone());
        m.insert("loftq_config", empty());
        m.insert("lora_alpha", num(self.lora_alpha));
        m.insert("lora_bias", Value::Bool(false));
        m.insert("lora_dropout", Value::from(self.lora_dropout));
        m.insert("lora_ga_config", null.clone());
        m.insert("megatron_config", null.clone());
        m.insert("megatron_core", Value::String("megatron.core".into()));
        m.insert("modules_to_save", null.clone());
        m.insert("monteclora_config", null.clone());
        m.insert("peft_type", Value::String("LORA".into()));
        m.insert("peft_version", Value::String(PEFT_FORMAT_VERSION.into()));
        m.insert("qalora_group_size", Value::from(16));
        m.insert("r", Value::from(self.r));
        m.insert("rank_pattern", empty());
        m.insert("revision", null.clone());
        m.insert(
            "target_modules",
            Value::Array(
                self.target_modules
                    .iter()
                    .map(|s| Value::String(s.clone()))
                    .collect(),
            ),
        );
        m.insert("target_parameters", null.clone());
        m.insert("task_type", Value::String("CAUSAL_LM".into()));
        m.insert("trainable_token_indices", null.clone());
        m.insert("use_bdlora", null.clone());
        m.insert("use_dora", Value::Bool(false));
        m.insert("use_qalora", Value::Bool(false));
        m.insert("use_rslora", Value::Bool(self.use_rslora));
        m.insert("velora_config", null);
        // serde_json keeps insertion order (feature preserve_order): BTreeMap order = sort_keys=True.
        let obj: Map<String, Value> = m.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        // serde_json's pretty printer uses 2 spaces, ": " and one element per line: the format of
        // Python's json.dumps(indent=2).
        serde_json::to_string_pretty(&Value::Object(obj)).unwrap_or_default()
    }

    /// Parses `adapter_config.json` text. `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| GemmaError::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        let obj = v
            .as_object()
            .ok_or_else(|| cfg_err(path, "<root>", "the adapter config is not a JSON object"))?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        match get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            Some(other) => {
                return Err(cfg_err(
                    path,
                    "peft_type",
                    format!("{other:?} adapters are not supported; only \"LORA\""),
                ))
            }
            None => {
                return Err(cfg_err(
                    path,
                    "peft_type",
                    "missing (every peft adapter config has it)",
                ))
            }
        }
        if let Some(t) = get("task_type").and_then(Value::as_str) {
            if t != "CAUSAL_LM" {
                return Err(cfg_err(
                    path,
                    "task_type",
                    format!("{t:?}; a Gemma-2 causal LM adapter has \"CAUSAL_LM\""),
                ));
            }
        }
        let r = get("r")
            .and_then(Value::as_u64)
            .and_then(|x| usize::try_from(x).ok())
            .filter(|&x| x > 0)
            .ok_or_else(|| cfg_err(path, "r", "missing or not a positive integer"))?;
        // peft's LoraConfig defaults for keys an older or hand-written file may omit.
        let lora_alpha = match get("lora_alpha") {
            None => 8.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| cfg_err(path, "lora_alpha", format!("not a number: {v}")))?,
        };
        let lora_dropout = match get("lora_dropout") {
            None => 0.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| cfg_err(path, "lora_dropout", format!("not a number: {v}")))?,
        };
        if !(0.0..1.0).contains(&lora_dropout) {
            return Err(cfg_err(
                path,
                "lora_dropout",
                format!("{lora_dropout} is outside [0, 1)"),
            ));
        }
        let use_rslora = match get("use_rslora") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| cfg_err(path, "use_rslora", format!("not a boolean: {v}")))?,
        };
        let target_modules = match get("target_modules") {
            None => return Err(cfg_err(path, "target_modules", "missing")),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str().map(str::to_string).ok_or_else(|| {
                        cfg_err(path, "target_modules", format!("entry {x} is not a string"))
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            Some(v) => {
                return Err(cfg_err(
                    path,
                    "target_modules",
                    format!("expected a list of module names or a string, found {v}"),
                ))
            }
        };
        refuse_unsupported_keys(obj, path)?;
        let base_model_name_or_path = get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(AdapterConfig {
            r,
            lora_alpha,
            lora_dropout,
            use_rslora,
            target_modules,
            base_model_name_or_path,
        })
    }
}

/// Refuses every key of peft 0.21.2's `LoraConfig` that changes which modules get LoRA or what they
/// compute, when it is set to something afinar does not implement (the error names the key and says why).
///
/// The full field list (`inspect.signature(peft.LoraConfig)`) and what happens to each:
/// - handled: `peft_type`, `task_type`, `r`, `lora_alpha`, `lora_dropout`, `use_rslora`, `target_modules`
///   (checked against the tensors by `check_targets`);
/// - metadata, no effect on the math: `peft_version`, `base_model_name_or_path`, `revision`,
///   `auto_mapping`, `inference_mode`, `runtime_config` (never saved);
/// - initialization that the stored A and B replace: `init_lora_weights` true / false / "gaussian" /
///   "eva" / "orthogonal", and the configs only those refused below read (`eva_config`, `loftq_config`,
///   `corda_config`, `lora_ga_config`);
/// - inert for the seven Gemma-2 linears: `megatron_config` / `megatron_core` (Megatron parallel layers
///   only), `ensure_weight_tying` (tied modules in `modules_to_save` / embedding targets, both refused),
///   `qalora_group_size` (only with `use_qalora`);
/// - refused when set: the module selection keys `layers_to_transform`, `layers_pattern` (peft adapts
///   only the listed layer indices; afinar adapts every layer) and `exclude_modules`; `rank_pattern`,
///   `alpha_pattern`; `modules_to_save`, `layer_replication`, `trainable_token_indices`,
///   `target_parameters`; `bias` ≠ "none", `lora_bias`, `fan_in_fan_out`; the LoRA variants `use_dora`,
///   `use_qalora`, `use_bdlora`, `arrow_config`, `alora_invocation_tokens`, `velora_config`,
///   `monteclora_config`, `kasa_config`; and the `init_lora_weights` values that peft re-runs when it
///   loads the adapter and that rewrite the base weights ("pissa…", "corda", "olora", "loftq",
///   "lora_ga") or select a variant ("mica", which trains A only).
///
/// "Set" follows peft: null, false, an empty list, an empty string and an empty object are unset (peft
/// tests these keys for truthiness, and treats `layers_to_transform = []` as "every layer").
fn refuse_unsupported_keys(obj: &Map<String, Value>, path: &Path) -> Result<()> {
    let is_set = |v: &Value| match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::Number(_) => true,
    };
    let why_layers =
        "peft adapts only the listed layers; afinar adapts the same modules in every layer";
    let why_variant = "a LoRA variant that computes something else than W·x + s·B·A·x";
    let table: [(&str, &str); 21] = [
        ("layers_to_transform", why_layers),
        ("layers_pattern", why_layers),
        (
            "exclude_modules",
            "it removes modules from the targets; afinar has no exclusion list",
        ),
        ("rank_pattern", "per-module ranks"),
        ("alpha_pattern", "per-module alphas"),
        ("modules_to_save", "fully trained extra modules"),
        ("layer_replication", "replicated layers"),
        ("trainable_token_indices", "trainable embedding rows"),
        ("target_parameters", "LoRA on parameters instead of modules"),
        ("lora_bias", "a trained bias on lora_B"),
        ("fan_in_fan_out", "transposed (Conv1D) weights"),
        ("use_dora", why_variant),
        ("use_qalora", why_variant),
        ("use_bdlora", why_variant),
        ("arrow_config", why_variant),
        ("alora_invocation_tokens", why_variant),
        ("velora_config", why_variant),
        ("monteclora_config", why_variant),
        ("kasa_config", why_variant),
        ("bias", "trained biases"),
        ("init_lora_weights", ""),
    ];
    for (key, why) in table {
        let Some(v) = obj.get(key) else { continue };
        match key {
            "bias" => match v {
                Value::Null => {}
                Value::String(b) if b == "none" => {}
                _ => return Err(unsupported(path, key, &v.to_string(), why)),
            },
            "init_lora_weights" => match v {
                Value::Null | Value::Bool(_) => {}
                Value::String(s) => {
                    let l = s.to_lowercase();
                    if l.starts_with("pissa")
                        || l.starts_with("corda")
                        || ["olora", "loftq", "lora_ga"].contains(&l.as_str())
                    {
                        return Err(unsupported(
                            path,
                            key,
                            &v.to_string(),
                            "peft re-runs this initialization when it loads the adapter, which \
                             rewrites the base weights (W − s·B₀·A₀ or a quantized residual); afinar \
                             loads the base checkpoint as is (convert the adapter to plain LoRA with \
                             peft's path_initial_model_for_weight_conversion)",
                        ));
                    }
                    if l == "mica" {
                        return Err(unsupported(path, key, &v.to_string(), why_variant));
                    }
                    if !["gaussian", "eva", "orthogonal"].contains(&l.as_str()) {
                        return Err(cfg_err(path, key, format!("unknown initialization {s:?}")));
                    }
                }
                _ => {
                    return Err(cfg_err(
                        path,
                        key,
                        format!("expected a boolean or a string, found {v}"),
                    ))
                }
            },
            _ => {
                if is_set(v) {
                    return Err(unsupported(path, key, &v.to_string(), why));
                }
            }
        }
    }
    Ok(())
}

fn cfg_err(path: &Path, key: &str, msg: impl Into<String>) -> GemmaError {
    GemmaError::Config {
        path: path.to_path_buf(),
        key: key.to_string(),
        msg: msg.into(),
    }
}

fn unsupported(path: &Path, key: &str, value: &str, why: &str) -> GemmaError {
    GemmaError::NotSupported {
        what: format!("{}: `{key}` = {value} ({why})", path.display()),
        hint:
            "afinar implements plain LoRA (and rsLoRA) on the same Gemma-2 linears of every layer; \
             refused rather than ignored"
                .into(),
    }
}

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

    /// Writes `adapter_config.json` + `adapter_model.safetensors` into `dir` atomically (a temporary
    /// sibling directory renamed over `dir`; an existing `dir` is replaced).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let r = self.config.r;
        let mut outs = Vec::with_capacity(self.tensors.len() * 2);
        for (&(layer, target), p) in &self.tensors {
            if p.a.len() != r * p.in_features {
                return Err(GemmaError::ShapeMismatch {
                    name: ParamId::LoraA { layer, target }.name(),
                    expected: vec![r, p.in_features],
                    found: vec![p.a.len()],
                });
            }
            if p.b.len() != p.out_features * r {
                return Err(GemmaError::ShapeMismatch {
                    name: ParamId::LoraB { layer, target }.name(),
                    expected: vec![p.out_features, r],
                    found: vec![p.b.len()],
                });
            }
            outs.push(TensorOut::f32(
                ParamId::LoraA { layer, target }.name(),
                vec![r, p.in_features],
                &p.a,
            ));
            outs.push(TensorOut::f32(
                ParamId::LoraB { layer, target }.name(),
                vec![p.out_features, r],
                &p.b,
            ));
        }
        outs.sort_by(|x, y| x.name.cmp(&y.name));
        let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let json = self.config.to_json_string();
        write_dir_atomically(dir, |tmp| {
            crate::safetensors_io::write_safetensors(
                &tmp.join(ADAPTER_WEIGHTS_NAME),
                &outs,
                Some(&meta),
            )?;
            let p = tmp.join(ADAPTER_CONFIG_NAME);
            std::fs::write(&p, json.as_bytes()).map_err(|e| GemmaError::io(&p, e))
        })
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

/// Creates `dir` atomically: `fill` writes into a fresh temporary sibling directory, which is then renamed
/// to `dir` (an existing `dir` is moved aside first and removed after the rename). On error the temporary
/// directory is removed and `dir` is left as it was.
pub(crate) fn write_dir_atomically(
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| GemmaError::io(&parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let tmp = parent.join(format!(".{name}.tmp-{unique}"));
    std::fs::create_dir(&tmp).map_err(|e| GemmaError::io(&tmp, e))?;
    let result = fill(&tmp).and_then(|()| {
        // Flush file contents before the rename makes them visible under the final name.
        for entry in std::fs::read_dir(&tmp).map_err(|e| GemmaError::io(&tmp, e))? {
            let p = entry.map_err(|e| GemmaError::io(&tmp, e))?.path();
            if p.is_file() {
                std::fs::File::open(&p)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| GemmaError::io(&p, e))?;
            }
        }
        if dir.exists() {
            let old = parent.join(format!(".{name}.old-{unique}"));
            std::fs::rename(dir, &old).map_err(|e| GemmaError::io(dir, e))?;
            if let Err(e) = std::fs::rename(&tmp, dir) {
                // Put the previous directory back.
                let _ = std::fs::rename(&old, dir);
                return Err(GemmaError::io(dir, e));
            }
            let removed = if old.is_dir() {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            };
            removed.map_err(|e| GemmaError::io(&old, e))
        } else {
            std::fs::rename(&tmp, dir).map_err(|e| GemmaError::io(dir, e))
        }
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AdapterConfig {
        AdapterConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.05,
            use_rslora: false,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            base_model_name_or_path: Some("google/gemma-2-9b".into()),
        }
    }

    #[test]
    fn config_json_is_sorted_and_round_trips() {
        let s = cfg().to_json_string();
        let v: Value = serde_json::from_str(&s).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert!(s.contains("\n  \"lora_alpha\": 8,\n"), "{s}");
        assert!(s.contains("\n  \"lora_dropout\": 0.05,\n"), "{s}");
        assert!(
            s.contains("\"target_modules\": [\n    \"q_proj\",\n    \"v_proj\"\n  ],"),
            "{s}"
        );
        let back = AdapterConfig::from_json_str(&s, Path::new("a.json")).unwrap();
        assert_eq!(back, cfg());
    }

    #[test]
    fn refuses_what_it_cannot_compute() {
        let base: Value = serde_json::from_str(&cfg().to_json_string()).unwrap();
        for (k, v) in [
            ("use_dora", Value::Bool(true)),
            ("bias", Value::String("all".into())),
            ("fan_in_fan_out", Value::Bool(true)),
            ("rank_pattern", serde_json::json!({"q_proj": 8})),
            ("modules_to_save", serde_json::json!(["lm_head"])),
            // Module selection that peft honours and afinar does not implement.
            ("layers_to_transform", serde_json::json!([0, 1])),
            ("layers_to_transform", serde_json::json!(3)),
            ("layers_pattern", serde_json::json!("layers")),
            (
                "exclude_modules",
                serde_json::json!(["model.layers.0.self_attn.q_proj"]),
            ),
            ("exclude_modules", serde_json::json!(".*q_proj")),
            // LoRA variants.
            (
                "use_bdlora",
                serde_json::json!({"lora_a_is_blockdiagonal": true}),
            ),
            ("arrow_config", serde_json::json!({"top_k": 3})),
            ("alora_invocation_tokens", serde_json::json!([107])),
            ("velora_config", serde_json::json!({"num_groups": 2})),
            ("monteclora_config", serde_json::json!({"n_experts": 4})),
            ("kasa_config", serde_json::json!({"beta": 0.0001})),
            ("use_qalora", Value::Bool(true)),
            ("lora_bias", Value::Bool(true)),
            // Initializations that peft re-runs on load and that rewrite the base weights, or a variant.
            ("init_lora_weights", Value::String("pissa".into())),
            ("init_lora_weights", Value::String("pissa_niter_4".into())),
            ("init_lora_weights", Value::String("olora".into())),
            ("init_lora_weights", Value::String("loftq".into())),
            ("init_lora_weights", Value::String("corda".into())),
            ("init_lora_weights", Value::String("lora_ga".into())),
            ("init_lora_weights", Value::String("mica".into())),
            ("init_lora_weights", Value::String("bogus".into())),
        ] {
            let mut o = base.clone();
            o[k] = v.clone();
            let err =
                AdapterConfig::from_json_str(&o.to_string(), Path::new("x/adapter_config.json"))
                    .unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains(k) && msg.contains("x/adapter_config.json"),
                "{k} = {v}: {msg}"
            );
        }
        // Values that are unset for peft, or that only steer an initialization the stored A and B
        // replace, or that are inert for the seven linears, load.
        for (k, v) in [
            ("layers_to_transform", serde_json::json!([])),
            ("layers_pattern", serde_json::json!([])),
            ("layers_pattern", Value::String(String::new())),
            ("exclude_modules", serde_json::json!([])),
            ("init_lora_weights", Value::Bool(false)),
            ("init_lora_weights", Value::String("gaussian".into())),
            ("init_lora_weights", Value::String("eva".into())),
            ("init_lora_weights", Value::String("orthogonal".into())),
            ("eva_config", serde_json::json!({"rho": 2.0})),
            ("loftq_config", serde_json::json!({"loftq_bits": 4})),
            ("megatron_config", serde_json::json!({"x": 1})),
            ("ensure_weight_tying", Value::Bool(true)),
            ("trainable_token_indices", serde_json::json!({})),
            ("use_bdlora", Value::Null),
        ] {
            let mut o = base.clone();
            o[k] = v.clone();
            assert!(
                AdapterConfig::from_json_str(&o.to_string(), Path::new("c.json")).is_ok(),
                "{k} = {v}"
            );
        }
        let mut o = base.clone();
        o["peft_type"] = Value::String("IA3".into());
        let err = AdapterConfig::from_json_str(&o.to_string(), Path::new("c.json")).unwrap_err();
        assert!(err.to_string().contains("peft_type"), "{err}");
        let mut o = base;
        o["r"] = Value::from(0);
        assert!(
            AdapterConfig::from_json_str(&o.to_string(), Path::new("c.json"))
                .unwrap_err()
                .to_string()
                .contains("`r`")
        );
    }
}
