//! `adapter_config.json`: the keys peft 0.21.2 writes (sorted, indent 2) and the parsing of what peft
//! and its users write.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use super::unsupported::refuse_unsupported_keys;
use super::PEFT_FORMAT_VERSION;
use crate::error::{GemmaError, Result};
use crate::lora::LoraConfig;

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

/// An error about key `key` of the adapter config at `path`.
pub(super) fn cfg_err(path: &Path, key: &str, msg: impl Into<String>) -> GemmaError {
    GemmaError::Config {
        path: path.to_path_buf(),
        key: key.to_string(),
        msg: msg.into(),
    }
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
