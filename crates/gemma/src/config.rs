//! Gemma-2 `config.json` (Hugging Face `Gemma2Config`), in every spelling seen on the Hub:
//! transformers v4 (`rope_theta`, `sliding_window_size`, `hidden_act`) and v5 (`rope_parameters`,
//! `layer_types`, `dtype`). Missing keys take the `Gemma2Config` class defaults (= gemma-2-2b), exactly as
//! transformers does, so a config that loads there loads here.
//!
//! The parser walks a `serde_json::Value` by hand instead of deriving, so that every error names the
//! offending key and the file.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{GemmaError, Result};

/// Attention kind of one decoder layer (`layer_types` in v5 configs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerType {
    /// Local attention: a query sees at most `sliding_window` keys, itself included.
    Sliding,
    /// Global causal attention.
    Full,
}

/// `quantization_config` of a pre-quantized bitsandbytes checkpoint (only the fields that change the
/// weight layout or the math).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizationConfig {
    /// "bitsandbytes" for the checkpoints this crate understands.
    pub quant_method: String,
    pub load_in_4bit: bool,
    pub load_in_8bit: bool,
    /// "nf4" or "fp4".
    pub bnb_4bit_quant_type: String,
    pub bnb_4bit_use_double_quant: bool,
    /// "bfloat16", "float16", "float32".
    pub bnb_4bit_compute_dtype: String,
    /// The whole object as read, for writing it back unchanged.
    pub raw: Value,
}

/// Everything about the architecture that the forward pass needs. Field names mirror `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Gemma2Config {
    pub vocab_size: usize,
    /// H.
    pub hidden_size: usize,
    /// I.
    pub intermediate_size: usize,
    /// L.
    pub num_hidden_layers: usize,
    /// NH.
    pub num_attention_heads: usize,
    /// NKV (divides NH).
    pub num_key_value_heads: usize,
    /// D. NH·D need not equal H (it does not for any released Gemma-2).
    pub head_dim: usize,
    /// Always "gelu_pytorch_tanh" (the only activation Gemma-2 uses; others are refused).
    pub hidden_activation: String,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// The attention scale is query_pre_attn_scalar^-0.5 (not head_dim^-0.5).
    pub query_pre_attn_scalar: f64,
    pub sliding_window: usize,
    /// Applied to the logits before the loss (None = off).
    pub final_logit_softcapping: Option<f64>,
    /// Applied to the scaled attention scores before the mask (None = off).
    pub attn_logit_softcapping: Option<f64>,
    /// One entry per layer; default: even layers sliding, odd layers full.
    pub layer_types: Vec<LayerType>,
    pub pad_token_id: Option<i64>,
    pub bos_token_id: Option<i64>,
    /// Gemma-2 instruct configs list several EOS ids ([1, 107]).
    pub eos_token_ids: Vec<i64>,
    pub tie_word_embeddings: bool,
    /// Dropout on the attention probabilities in training (transformers' eager attention:
    /// `dropout(softmax(scores), p, training)`). Every released Gemma-2 config has 0.0; afinar does not
    /// implement a non-zero value and refuses it for training (see [`Gemma2Config::check_trainable`]). In
    /// evaluation and generation it has no effect, so inference loads such a config. Parsed as a
    /// probability in [0, 1].
    pub attention_dropout: f64,
    /// `torch_dtype` (v4) or `dtype` (v5) of the stored weights, e.g. "bfloat16"; None when absent.
    pub torch_dtype: Option<String>,
    pub quantization_config: Option<QuantizationConfig>,
    /// The whole config.json as read, so exports can copy it back with only the keys they change.
    pub raw: Value,
}

fn cfg_err(path: &Path, key: &str, msg: impl Into<String>) -> GemmaError {
    GemmaError::Config {
        path: path.to_path_buf(),
        key: key.to_string(),
        msg: msg.into(),
    }
}

/// Typed access to the keys of one JSON object, with the file path for errors.
struct Keys<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl<'a> Keys<'a> {
    /// The value of the first present, non-null key among `names`.
    fn get(&self, names: &[&str]) -> Option<(&'a str, &'a Value)> {
        names.iter().find_map(|n| match self.map.get_key_value(*n) {
            Some((k, v)) if !v.is_null() => Some((k.as_str(), v)),
            _ => None,
        })
    }

    fn usize(&self, names: &[&str], default: usize) -> Result<usize> {
        match self.get(names) {
            None => Ok(default),
            Some((k, v)) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| {
                    cfg_err(
                        self.path,
                        k,
                        format!("expected a non-negative integer, found {v}"),
                    )
                }),
        }
    }

    fn positive(&self, names: &[&str], default: usize) -> Result<usize> {
        let x = self.usize(names, default)?;
        if x == 0 {
            return Err(cfg_err(self.path, names[0], "must be positive, found 0"));
        }
        Ok(x)
    }

    fn f64(&self, names: &[&str], default: f64) -> Result<f64> {
        match self.get(names) {
            None => Ok(default),
            Some((k, v)) => v
                .as_f64()
                .ok_or_else(|| cfg_err(self.path, k, format!("expected a number, found {v}"))),
        }
    }

    /// A number that may be explicitly `null` (= off). Absent → default.
    fn opt_f64(&self, name: &str, default: Option<f64>) -> Result<Option<f64>> {
        match self.map.get(name) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                cfg_err(
                    self.path,
                    name,
                    format!("expected a number or null, found {v}"),
                )
            }),
        }
    }

    fn opt_i64(&self, name: &str, default: Option<i64>) -> Result<Option<i64>> {
        match self.map.get(name) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| {
                cfg_err(
                    self.path,
                    name,
                    format!("expected an integer or null, found {v}"),
                )
            }),
        }
    }

    fn bool(&self, name: &str, default: bool) -> Result<bool> {
        match self.get(&[name]) {
            None => Ok(default),
            Some((k, v)) => v
                .as_bool()
                .ok_or_else(|| cfg_err(self.path, k, format!("expected true or false, found {v}"))),
        }
    }

    fn string(&self, names: &[&str], default: &str) -> Result<String> {
        match self.get(names) {
            None => Ok(default.to_string()),
            Some((k, v)) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| cfg_err(self.path, k, format!("expected a string, found {v}"))),
        }
    }
}

impl Gemma2Config {
    /// Reads and validates `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| GemmaError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses config.json text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let raw: Value = serde_json::from_str(text).map_err(|e| GemmaError::Json {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_value(raw, path)
    }

    /// Parses an already-decoded config.json.
    pub fn from_value(raw: Value, path: &Path) -> Result<Self> {
        let map = raw
            .as_object()
            .ok_or_else(|| cfg_err(path, "<root>", "config.json must hold a JSON object"))?;
        let k = Keys { path, map };

        let model_type = k.string(&["model_type"], "")?;
        if model_type != "gemma2" {
            let found = if model_type.is_empty() {
                "<missing>".to_string()
            } else {
                model_type
            };
            return Err(GemmaError::UnsupportedModelType {
                path: path.to_path_buf(),
                found,
            });
        }

        let vocab_size = k.positive(&["vocab_size"], 256_000)?;
        let hidden_size = k.positive(&["hidden_size"], 2304)?;
        let intermediate_size = k.positive(&["intermediate_size"], 9216)?;
        let num_hidden_layers = k.positive(&["num_hidden_layers"], 26)?;
        let num_attention_heads = k.positive(&["num_attention_heads"], 8)?;
        let num_key_value_heads = k.positive(&["num_key_value_heads"], 4)?;
        let head_dim = k.positive(&["head_dim"], 256)?;
        // Sanity bounds, so that a corrupt config fails here instead of in a huge allocation.
        for (key, v, max) in [
            ("vocab_size", vocab_size, 1usize << 24),
            ("hidden_size", hidden_size, 1 << 20),
            ("intermediate_size", intermediate_size, 1 << 22),
            ("num_hidden_layers", num_hidden_layers, 1 << 12),
            ("num_attention_heads", num_attention_heads, 1 << 12),
            ("head_dim", head_dim, 1 << 14),
        ] {
            if v > max {
                return Err(cfg_err(
                    path,
                    key,
                    format!("{v} is implausibly large (limit {max})"),
                ));
            }
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(cfg_err(
                path,
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(cfg_err(
                path,
                "head_dim",
                format!("RoPE needs an even head_dim, found {head_dim}"),
            ));
        }

        // transformers uses `hidden_activation`; old configs also carry `hidden_act` (same value).
        let hidden_activation =
            k.string(&["hidden_activation", "hidden_act"], "gelu_pytorch_tanh")?;
        if hidden_activation != "gelu_pytorch_tanh" && hidden_activation != "gelu_tanh" {
            return Err(cfg_err(
                path,
                "hidden_activation",
                format!(
                    "{hidden_activation:?} is not supported; Gemma-2 uses \"gelu_pytorch_tanh\""
                ),
            ));
        }

        // v5: rope_parameters {rope_type, rope_theta}; v4: rope_theta at top level.
        let rope_theta = match map.get("rope_parameters") {
            Some(Value::Object(rp)) => {
                let rk = Keys { path, map: rp };
                let rope_type = rk.string(&["rope_type", "type"], "default")?;
                if rope_type != "default" {
                    return Err(cfg_err(
                        path,
                        "rope_parameters.rope_type",
                        format!("{rope_type:?} is not supported; Gemma-2 uses \"default\" RoPE"),
                    ));
                }
                match rk.get(&["rope_theta"]) {
                    Some(_) => rk.f64(&["rope_theta"], 10_000.0)?,
                    None => k.f64(&["rope_theta"], 10_000.0)?,
                }
            }
            Some(Value::Null) | None => k.f64(&["rope_theta"], 10_000.0)?,
            Some(v) => {
                return Err(cfg_err(
                    path,
                    "rope_parameters",
                    format!("expected an object, found {v}"),
                ))
            }
        };
        if let Some(Value::Object(rs)) = map.get("rope_scaling") {
            let t = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if t != "default" {
                return Err(cfg_err(
                    path,
                    "rope_scaling",
                    format!("rope scaling {t:?} is not supported"),
                ));
            }
        }

        let sliding_window = k.positive(&["sliding_window", "sliding_window_size"], 4096)?;
        let layer_types = match map.get("layer_types") {
            None | Some(Value::Null) => default_layer_types(num_hidden_layers),
            Some(Value::Array(items)) => {
                if items.len() != num_hidden_layers {
                    return Err(cfg_err(
                        path,
                        "layer_types",
                        format!(
                            "has {} entries but num_hidden_layers = {num_hidden_layers}",
                            items.len()
                        ),
                    ));
                }
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v.as_str() {
                        Some("sliding_attention") => Ok(LayerType::Sliding),
                        Some("full_attention") => Ok(LayerType::Full),
                        _ => Err(cfg_err(
                            path,
                            &format!("layer_types[{i}]"),
                            format!(
                                "expected \"sliding_attention\" or \"full_attention\", found {v}"
                            ),
                        )),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            Some(v) => {
                return Err(cfg_err(
                    path,
                    "layer_types",
                    format!("expected a list, found {v}"),
                ))
            }
        };

        let eos_token_ids = match map.get("eos_token_id") {
            None => vec![1],
            Some(Value::Null) => vec![],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_i64().ok_or_else(|| {
                        cfg_err(
                            path,
                            "eos_token_id",
                            format!("expected integers, found {v}"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            Some(v) => vec![v.as_i64().ok_or_else(|| {
                cfg_err(
                    path,
                    "eos_token_id",
                    format!("expected an integer or a list, found {v}"),
                )
            })?],
        };

        let tie_word_embeddings = k.bool("tie_word_embeddings", true)?;
        if !tie_word_embeddings {
            return Err(cfg_err(
                path,
                "tie_word_embeddings",
                "Gemma-2 ties the LM head to the embedding; false is not supported",
            ));
        }
        if k.bool("use_bidirectional_attention", false)? {
            return Err(cfg_err(
                path,
                "use_bidirectional_attention",
                "Gemma-2 causal LM attention is causal; true is not supported",
            ));
        }
        if k.bool("attention_bias", false)? {
            return Err(cfg_err(
                path,
                "attention_bias",
                "Gemma-2 has no attention bias; true is not supported",
            ));
        }

        let torch_dtype = match k.get(&["dtype", "torch_dtype"]) {
            None => None,
            Some((key, v)) => Some(
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| cfg_err(path, key, format!("expected a string, found {v}")))?,
            ),
        };

        let quantization_config = match map.get("quantization_config") {
            None | Some(Value::Null) => None,
            Some(Value::Object(q)) => {
                let qk = Keys { path, map: q };
                Some(QuantizationConfig {
                    quant_method: qk.string(&["quant_method"], "bitsandbytes")?,
                    load_in_4bit: qk.bool("load_in_4bit", qk.bool("_load_in_4bit", false)?)?,
                    load_in_8bit: qk.bool("load_in_8bit", qk.bool("_load_in_8bit", false)?)?,
                    bnb_4bit_quant_type: qk.string(&["bnb_4bit_quant_type"], "fp4")?,
                    bnb_4bit_use_double_quant: qk.bool("bnb_4bit_use_double_quant", false)?,
                    bnb_4bit_compute_dtype: qk.string(&["bnb_4bit_compute_dtype"], "float32")?,
                    raw: Value::Object(q.clone()),
                })
            }
            Some(v) => {
                return Err(cfg_err(
                    path,
                    "quantization_config",
                    format!("expected an object, found {v}"),
                ))
            }
        };

        let cfg = Gemma2Config {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            hidden_activation,
            max_position_embeddings: k.positive(&["max_position_embeddings"], 8192)?,
            rms_norm_eps: k.f64(&["rms_norm_eps"], 1e-6)?,
            rope_theta,
            query_pre_attn_scalar: k.f64(&["query_pre_attn_scalar"], 256.0)?,
            sliding_window,
            final_logit_softcapping: k.opt_f64("final_logit_softcapping", Some(30.0))?,
            attn_logit_softcapping: k.opt_f64("attn_logit_softcapping", Some(50.0))?,
            layer_types,
            pad_token_id: k.opt_i64("pad_token_id", Some(0))?,
            bos_token_id: k.opt_i64("bos_token_id", Some(2))?,
            eos_token_ids,
            tie_word_embeddings,
            attention_dropout: k.f64(&["attention_dropout"], 0.0)?,
            torch_dtype,
            quantization_config,
            raw,
        };
        // Checked here too (the kernels refuse them later), so that the error names file and key.
        if !(cfg.rms_norm_eps.is_finite() && cfg.rms_norm_eps >= 0.0) {
            return Err(cfg_err(
                path,
                "rms_norm_eps",
                format!("must be finite and ≥ 0, found {}", cfg.rms_norm_eps),
            ));
        }
        if !(cfg.rope_theta.is_finite() && cfg.rope_theta > 0.0) {
            return Err(cfg_err(
                path,
                "rope_theta",
                format!("must be finite and > 0, found {}", cfg.rope_theta),
            ));
        }
        if !(0.0..=1.0).contains(&cfg.attention_dropout) {
            return Err(cfg_err(
                path,
                "attention_dropout",
                format!(
                    "must be a probability in [0, 1], found {}",
                    cfg.attention_dropout
                ),
            ));
        }
        if cfg.query_pre_attn_scalar <= 0.0 {
            return Err(cfg_err(path, "query_pre_attn_scalar", "must be positive"));
        }
        for (key, cap) in [
            ("final_logit_softcapping", cfg.final_logit_softcapping),
            ("attn_logit_softcapping", cfg.attn_logit_softcapping),
        ] {
            if cap.is_some_and(|c| c <= 0.0) {
                return Err(cfg_err(path, key, "must be positive or null"));
            }
        }
        Ok(cfg)
    }

    /// A config built in code (tests, the demo model, benchmarks): every other field takes the
    /// `Gemma2Config` default. `raw` is filled so that `to_json` round-trips.
    #[allow(clippy::too_many_arguments)]
    pub fn tiny(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        head_dim: usize,
        sliding_window: usize,
    ) -> Result<Self> {
        let v = serde_json::json!({
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads,
            "head_dim": head_dim,
            "query_pre_attn_scalar": head_dim,
            "sliding_window": sliding_window,
            "hidden_activation": "gelu_pytorch_tanh",
            "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "max_position_embeddings": 8192,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 2,
            "tie_word_embeddings": true,
            "torch_dtype": "float32",
        });
        Self::from_value(v, Path::new("<built-in config>"))
    }

    /// Refuses a config that training would not reproduce faithfully, naming the key and the config file
    /// `path` (the caller's config.json). Today that is `attention_dropout` ≠ 0: transformers applies it
    /// to the attention probabilities while training (eager attention), afinar's attention kernels have
    /// no dropout, and training without it would silently optimize a different objective. Evaluation and
    /// generation are unaffected by attention dropout (transformers skips it outside training), so only
    /// the training entry points call this.
    pub fn check_trainable(&self, path: &Path) -> Result<()> {
        if self.attention_dropout != 0.0 {
            return Err(cfg_err(
                path,
                "attention_dropout",
                format!(
                    "{} is not supported for training (afinar's attention has no dropout; released \
                     Gemma-2 configs have 0.0). Set it to 0.0 to train; evaluation and generation \
                     ignore it",
                    self.attention_dropout
                ),
            ));
        }
        Ok(())
    }

    /// The config as JSON (the `raw` object read from disk, or the one built by `tiny`).
    pub fn to_json(&self) -> Value {
        self.raw.clone()
    }

    /// NH·D: width of the q projection and the input of o_proj.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// NKV·D: width of the k and v projections.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// query_pre_attn_scalar^-0.5, computed in f64 as Python does, then rounded to f32.
    pub fn attn_scale(&self) -> f32 {
        self.query_pre_attn_scalar.powf(-0.5) as f32
    }

    /// sqrt(H) rounded to the activation dtype (f32 here): the embedding normalizer.
    pub fn embed_scale(&self) -> f32 {
        (self.hidden_size as f64).sqrt() as f32
    }

    /// The sliding window of layer `i` (None for a full-attention layer or an index out of range).
    pub fn window(&self, layer: usize) -> Option<usize> {
        match self.layer_types.get(layer) {
            Some(LayerType::Sliding) => Some(self.sliding_window),
            _ => None,
        }
    }

    /// Parameter count of the base model (tied head counted once).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let per_layer =
            4 * h + h * self.q_dim() * 2 + 2 * h * self.kv_dim() + 3 * h * self.intermediate_size;
        self.vocab_size * h + h + self.num_hidden_layers * per_layer
    }
}

/// transformers' default: `"sliding_attention" if (i + 1) % 2 else "full_attention"` (even layers slide).
pub fn default_layer_types(n: usize) -> Vec<LayerType> {
    (0..n)
        .map(|i| {
            if (i + 1) % 2 == 1 {
                LayerType::Sliding
            } else {
                LayerType::Full
            }
        })
        .collect()
}

/// The path of config.json inside a model directory.
pub fn config_path(dir: &Path) -> PathBuf {
    dir.join("config.json")
}
