//! The run configuration: one TOML file = one run.
//!
//! Every section is `#[serde(deny_unknown_fields)]`, but unknown keys are caught *before* serde by
//! [`check_keys`], which walks the parsed table against the field lists serde itself reports (see
//! [`field_names`]) and names the nearest valid key by edit distance ("`train.lrr` is not a key; did you
//! mean `train.lr`?"). `--set section.key=value` overrides are applied to the parsed table, typed by the
//! target field, so they get the same checks. [`Config::validate`] rejects invalid values before any
//! work starts; the checks that need the data (warmup vs. total steps, the template's own length) live
//! in the trainer, which runs them before the first step.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors from reading, overriding or validating a config. Each names the file and key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: TOML syntax error: {message}")]
    Syntax { path: String, message: String },
    #[error("{path}{line}: unknown key `{key}`{hint}", line = fmt_line(*.line), hint = fmt_hint(.suggestion))]
    UnknownKey {
        path: String,
        key: String,
        line: Option<usize>,
        suggestion: Option<String>,
    },
    #[error("{path}: `{key}` must be a table ([{key}]), found a {found}")]
    NotATable {
        path: String,
        key: String,
        found: String,
    },
    #[error("{path}: bad value for `{key}`: {message}")]
    Type {
        path: String,
        key: String,
        message: String,
    },
    #[error("--set {arg}: expected section.key=value (e.g. --set train.lr=1e-4)")]
    BadOverride { arg: String },
    #[error("invalid config value `{key}` = {value}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
}

fn fmt_line(line: Option<usize>) -> String {
    line.map(|l| format!(":{l}")).unwrap_or_default()
}

fn fmt_hint(s: &Option<String>) -> String {
    match s {
        Some(s) => format!("; did you mean `{s}`?"),
        None => String::new(),
    }
}

/// Numeric type of the frozen base weights and activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

/// How the frozen target linears are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// Dense weights in `model.dtype` (LoRA).
    None,
    /// bitsandbytes NF4, blocksize 64 (QLoRA).
    Nf4,
}

/// Where the ops run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    Cuda,
}

/// Learning-rate schedule (transformers `get_scheduler` names and formulas).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

/// What to do with a sample longer than `data.max_seq_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LengthStrategy {
    Truncate,
    Drop,
    Error,
}

/// The whole run. Sections may be omitted; each field's default is given in its doc.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelSection,
    pub lora: LoraSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub output: OutputSection,
}

/// `[model]`: the base model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json,
    /// tokenizer_config.json). Relative paths are relative to the working directory. Required.
    pub path: PathBuf,
    /// Compute/storage dtype of the frozen weights and activations: "f32" (CPU), "bf16" (GPU), "f16".
    pub dtype: Dtype,
    /// "nf4" freezes the seven projections in 4-bit NF4 (QLoRA); "none" keeps them dense (LoRA).
    pub quantization: Quantization,
    /// Double-quantize the NF4 absmax (8-bit, blocks of 256), as QLoRA does. Default true.
    pub double_quant: bool,
    /// Train every weight instead of LoRA adapters (used to pretrain the demo model). Default false.
    pub full_finetune: bool,
    /// "cpu" (reference, any machine) or "cuda" (needs the `cuda` feature and a GPU).
    pub device: Device,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            dtype: Dtype::F32,
            quantization: Quantization::None,
            double_quant: true,
            full_finetune: false,
            device: Device::Cpu,
        }
    }
}

/// The seven Gemma-2 projections LoRA can target.
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// `[lora]`: the adapters (PEFT `LoraConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    /// Rank R of A [R, in] and B [out, R]. Typical 8–64; default 16. Must be ≥ 1.
    pub r: usize,
    /// Scaling numerator: the update is (alpha / r)·B·A (alpha/√r with rslora). Typical 2·r; default 32.
    pub alpha: f32,
    /// Dropout probability on the LoRA input, in [0, 1). Typical 0.0–0.1; default 0.0.
    pub dropout: f32,
    /// rsLoRA scaling alpha/√r instead of alpha/r. Default false.
    pub rslora: bool,
    /// Target modules: any of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or
    /// "all-linear" (all seven). Default all seven.
    pub targets: Vec<String>,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            rslora: false,
            targets: LORA_TARGETS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl LoraSection {
    /// The targets with "all-linear" expanded, in the canonical order.
    pub fn resolved_targets(&self) -> Vec<String> {
        if self.targets.iter().any(|t| t == "all-linear") {
            return LORA_TARGETS.iter().map(|s| s.to_string()).collect();
        }
        LORA_TARGETS
            .iter()
            .filter(|t| self.targets.iter().any(|x| x == *t))
            .map(|s| s.to_string())
            .collect()
    }
}

/// `[data]`: the dataset and how it becomes token rows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Training file (JSON/JSONL). Required.
    pub train: PathBuf,
    /// Separate eval file; empty = split `eval_fraction` off the training file.
    pub eval: PathBuf,
    /// "auto" (detect), "alpaca", "messages", "sharegpt" or "text".
    pub format: String,
    /// Prompt template: "gemma", "alpaca", "chatml", "llama3" or "tokenizer" (the model's own Jinja
    /// chat_template). Default "gemma".
    pub template: String,
    /// Which tokens are trained: "assistant" (assistant turns + their end-of-turn token), "all", or
    /// "last-turn". Default "assistant".
    pub mask: String,
    /// Maximum tokens per row (sample, or packed row). Typical 512–2048; default 512.
    pub max_seq_len: usize,
    /// Samples longer than max_seq_len: "truncate", "drop" or "error". Default "truncate".
    pub length_strategy: LengthStrategy,
    /// Pack several samples per row (first-fit decreasing; no attention across samples). Default false.
    pub packing: bool,
    /// Fraction of the training file held out for eval when `eval` is empty, in [0, 1). Default 0.05.
    pub eval_fraction: f64,
    /// Seed of the train/eval split and of the per-epoch shuffle. Default 42.
    pub seed: u64,
    /// The date and time `strftime_now` renders in a `tokenizer` chat template (Llama-3.x templates
    /// print "Today Date: …"): "YYYY-MM-DD" or "YYYY-MM-DDTHH:MM:SS". Empty = the local time when the
    /// run starts; the trainer writes the value it used into the run's config.toml, and a resumed run
    /// reuses it, so samples tokenize the same on any day. Ignored by the built-in templates.
    pub template_date: String,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train: PathBuf::new(),
            eval: PathBuf::new(),
            format: "auto".into(),
            template: "gemma".into(),
            mask: "assistant".into(),
            max_seq_len: 512,
            length_strategy: LengthStrategy::Truncate,
            packing: false,
            eval_fraction: 0.05,
            seed: 42,
            template_date: String::new(),
        }
    }
}

/// Largest accepted `train.grad_accum`. The loop builds a step's whole window of micro-batches before
/// the first backward (to count its trained tokens), so an absurd value would abort in that allocation.
pub const MAX_GRAD_ACCUM: usize = 4096;

/// `[train]`: optimizer, schedule and loop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Passes over the training data (may be fractional, e.g. 1.5). Used when max_steps = 0. Default 1.
    pub epochs: f64,
    /// Optimizer steps to run; 0 = derive from `epochs`. Default 0.
    pub max_steps: u64,
    /// Rows per forward/backward. Typical 1–8; default 1.
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step; the loss is normalized by the trained-token count of the
    /// whole window. Typical 1–16; default 1; at most `MAX_GRAD_ACCUM` (the window's batches are held in
    /// memory together).
    pub grad_accum: usize,
    /// Peak learning rate (> 0). QLoRA typical 2e-4; default 2e-4.
    pub lr: f64,
    /// "constant", "constant_with_warmup", "linear" or "cosine" (transformers formulas). Default "cosine".
    pub schedule: ScheduleKind,
    /// Warmup in optimizer steps; if 0, `warmup_ratio` is used. Default 0.
    pub warmup_steps: u64,
    /// Warmup as a fraction of the total steps (ceil(total·ratio)), in [0, 1). Typical 0.03; default 0.0.
    pub warmup_ratio: f64,
    /// Decoupled AdamW weight decay (torch: applied before the update). Typical 0.0; default 0.0.
    pub weight_decay: f64,
    /// AdamW (β1, β2), each in [0, 1). Default [0.9, 0.999].
    pub betas: [f64; 2],
    /// AdamW ε (> 0). Default 1e-8.
    pub eps: f64,
    /// Global gradient-norm clip (torch clip_grad_norm_); 0 = off. Typical 0.3–1.0; default 1.0.
    pub max_grad_norm: f64,
    /// Seed of the LoRA init and dropout masks. Default 42.
    pub seed: u64,
    /// Recompute each layer in the backward instead of keeping its activations. Default false.
    pub gradient_checkpointing: bool,
    /// Paged optimizer (QLoRA): keep the AdamW moments m and v (8 bytes per trainable parameter) in
    /// pinned host memory and stream them through the GPU in 16 MiB chunks at each step, so optimizer
    /// state never competes with activations for device memory; costs two PCIe transfers of the state
    /// per step (milliseconds at LoRA sizes). Results are identical either way. On the CPU the state
    /// already lives in host memory and the switch changes nothing. Typical: true for QLoRA on a GPU
    /// that is short of memory. Default false.
    pub paged_optimizer: bool,
    /// Loss scaling for fp16: "auto" (dynamic iff model.dtype = "f16"), "dynamic" or "none". Dynamic
    /// follows torch's GradScaler: the loss is multiplied by S (starts at 2^16) before the backward,
    /// the gradients are divided by S before the norm, clipping and update; a step whose gradients
    /// overflow is skipped and S halves (never below 1); S doubles after 2000 finite steps in a row.
    /// Default "auto".
    pub loss_scaling: crate::loss_scale::LossScaling,
    /// Evaluate every N optimizer steps (and always at the end); 0 = only at the end. Default 0.
    pub eval_every: u64,
    /// Checkpoint every N optimizer steps (and always at the end); 0 = only at the end. Default 0.
    pub save_every: u64,
    /// Checkpoints kept on disk (oldest deleted first), ≥ 1. Default 3.
    pub keep_checkpoints: usize,
    /// Print/log a metrics line every N optimizer steps (metrics.jsonl gets every step). Default 1.
    pub log_every: u64,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            epochs: 1.0,
            max_steps: 0,
            micro_batch_size: 1,
            grad_accum: 1,
            lr: 2e-4,
            schedule: ScheduleKind::Cosine,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            betas: [0.9, 0.999],
            eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            gradient_checkpointing: false,
            paged_optimizer: false,
            loss_scaling: crate::loss_scale::LossScaling::Auto,
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 3,
            log_every: 1,
        }
    }
}

/// `[output]`: where the run directory goes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputSection {
    /// Parent of run directories. Default "runs".
    pub dir: PathBuf,
    /// Run directory name under `dir`; empty = the config file's stem. Default "".
    pub run_name: String,
}

impl Default for OutputSection {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("runs"),
            run_name: String::new(),
        }
    }
}

// ---- field introspection ---------------------------------------------------------------------------

/// The field names serde expects for a struct, read from its own `Deserialize` impl (the list it
/// passes to `deserialize_struct`), so the key check can never drift from the structs.
pub fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};
    struct Probe<'a>(&'a mut &'static [&'static str]);
    #[derive(Debug)]
    struct Stop;
    impl fmt::Display for Stop {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("field probe")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    impl<'de> de::Deserializer<'de> for Probe<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = fields;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// The sections and their keys, from the structs.
pub fn schema() -> Vec<(&'static str, &'static [&'static str])> {
    vec![
        ("model", field_names::<ModelSection>()),
        ("lora", field_names::<LoraSection>()),
        ("data", field_names::<DataSection>()),
        ("train", field_names::<TrainSection>()),
        ("output", field_names::<OutputSection>()),
    ]
}

/// Levenshtein distance (bytes are fine: keys are ASCII).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Edit distance with a one-edit bonus for a shared first character (`rank` is nearer `r` than `mask`).
fn key_distance(a: &str, b: &str) -> usize {
    let d = edit_distance(a, b);
    if !a.is_empty() && a.as_bytes().first() == b.as_bytes().first() {
        d.saturating_sub(1)
    } else {
        d
    }
}

/// The nearest valid dotted key for an unknown one. Same-section keys win ties; a key that exists
/// verbatim in another section is suggested there (`lora.lr` → `train.lr`).
fn suggest(section: Option<&str>, key: &str) -> Option<String> {
    let schema = schema();
    // (cost, raw distance, candidate); cost = 3·distance, +2 for another section.
    let mut best: Option<(usize, usize, String)> = None;
    let mut consider = |cost: usize, d: usize, cand: String| {
        if best.as_ref().is_none_or(|(bc, _, _)| cost < *bc) {
            best = Some((cost, d, cand));
        }
    };
    match section {
        None => {
            for (s, _) in &schema {
                let d = key_distance(key, s);
                consider(d * 3, d, s.to_string());
            }
        }
        Some(sec) => {
            if let Some((_, fields)) = schema.iter().find(|(s, _)| *s == sec) {
                for f in fields.iter() {
                    let d = key_distance(key, f);
                    consider(d * 3, d, format!("{sec}.{f}"));
                }
            }
            for (s, fields) in &schema {
                if *s != sec {
                    for f in fields.iter() {
                        let d = key_distance(key, f);
                        consider(d * 3 + 2, d, format!("{s}.{f}"));
                    }
                }
            }
        }
    }
    // Only suggest something plausibly related: at most about half the key edited.
    best.filter(|(_, d, _)| *d <= key.len() / 2 + 1)
        .map(|(_, _, k)| k)
}

/// The 1-based line of `key` in `[section]` of the TOML text, if it can be found (for messages only).
fn find_line(text: &str, section: Option<&str>, key: &str) -> Option<usize> {
    let mut current: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix('[') {
            let name = rest.trim_end_matches(']').trim().to_string();
            if section.is_none() && name == key {
                return Some(i + 1);
            }
            current = Some(name);
            continue;
        }
        let lhs = t.split('=').next().unwrap_or("").trim();
        let matches_here = match (section, &current) {
            (None, None) => lhs == key,
            (Some(s), Some(c)) => c == s && lhs == key,
            (Some(s), None) => lhs == format!("{s}.{key}"),
            (None, Some(_)) => false,
        };
        if matches_here {
            return Some(i + 1);
        }
    }
    None
}

/// Checks every key of a parsed config table against the schema.
pub fn check_keys(table: &toml::Table, path: &str, text: &str) -> Result<(), ConfigError> {
    let schema = schema();
    for (sec, value) in table {
        let Some((_, fields)) = schema.iter().find(|(s, _)| s == sec) else {
            return Err(ConfigError::UnknownKey {
                path: path.into(),
                key: sec.clone(),
                line: find_line(text, None, sec),
                suggestion: suggest(None, sec).or_else(|| suggest(Some(""), sec)),
            });
        };
        let toml::Value::Table(inner) = value else {
            return Err(ConfigError::NotATable {
                path: path.into(),
                key: sec.clone(),
                found: value.type_str().into(),
            });
        };
        for key in inner.keys() {
            if !fields.contains(&key.as_str()) {
                return Err(ConfigError::UnknownKey {
                    path: path.into(),
                    key: format!("{sec}.{key}"),
                    line: find_line(text, Some(sec), key),
                    suggestion: suggest(Some(sec), key),
                });
            }
        }
    }
    Ok(())
}

/// Applies one `section.key=value` override to the table. The value is typed by the target field:
/// string fields take the text verbatim; string lists also take `a,b,c`; others parse it as a TOML
/// value (`1e-4`, `true`, `["q_proj","v_proj"]`), falling back to a string so serde reports the type
/// error by key.
pub fn apply_override(table: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
    let bad = || ConfigError::BadOverride {
        arg: arg.to_string(),
    };
    let (lhs, raw) = arg.split_once('=').ok_or_else(bad)?;
    let (sec, key) = lhs.trim().split_once('.').ok_or_else(bad)?;
    let (sec, key, raw) = (sec.trim(), key.trim(), raw.trim());
    if sec.is_empty() || key.is_empty() {
        return Err(bad());
    }
    let defaults = toml::Table::try_from(Config::default()).expect("the default config serializes");
    let default = defaults
        .get(sec)
        .and_then(|s| s.as_table())
        .and_then(|s| s.get(key));
    let is_string_field = default.is_some_and(|v| v.is_str());
    // A list of strings (lora.targets) also takes the plain form `q_proj,v_proj`.
    let is_string_list = default
        .and_then(|v| v.as_array())
        .is_some_and(|a| a.iter().all(|x| x.is_str()));
    let value = if is_string_field {
        toml::Value::String(raw.trim_matches('"').to_string())
    } else if is_string_list && !raw.starts_with('[') {
        toml::Value::Array(
            raw.split(',')
                .map(|x| toml::Value::String(x.trim().trim_matches('"').to_string()))
                .filter(|x| x.as_str() != Some(""))
                .collect(),
        )
    } else {
        match format!("v = {raw}").parse::<toml::Table>() {
            Ok(mut t) => t
                .remove("v")
                .unwrap_or_else(|| toml::Value::String(raw.into())),
            Err(_) => toml::Value::String(raw.to_string()),
        }
    };
    let section = table
        .entry(sec.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match section {
        toml::Value::Table(t) => {
            t.insert(key.to_string(), value);
            Ok(())
        }
        other => Err(ConfigError::NotATable {
            path: "--set".into(),
            key: sec.into(),
            found: other.type_str().into(),
        }),
    }
}

impl Config {
    /// Parses TOML text (named `path` in messages), applies the overrides, checks keys, deserializes.
    pub fn from_toml_str(
        text: &str,
        path: &str,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: path.into(),
                    message: e.to_string(),
                })?;
        check_keys(&table, path, text)?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        check_keys(&table, &format!("{path} (with --set)"), text)?;
        Config::from_table(table, path)
    }

    /// Reads a config file and applies overrides. Relative model/data paths stay relative to the
    /// working directory (documented in the config files).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.into(),
            source,
        })?;
        let mut cfg = Self::from_toml_str(&text, &path.display().to_string(), overrides)?;
        if cfg.output.run_name.is_empty() {
            cfg.output.run_name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into());
        }
        Ok(cfg)
    }

    fn from_table(table: toml::Table, path: &str) -> Result<Config, ConfigError> {
        // Deserialize section by section so a type error names `section.key`.
        let mut cfg = Config::default();
        for (sec, value) in table {
            let err = |e: toml::de::Error| {
                let msg = e.message().to_string();
                // serde's message names the field for missing/unknown fields; for type errors we find
                // the key by trying each one alone.
                ConfigError::Type {
                    path: path.into(),
                    key: format!("{sec}{}", locate_bad_key(&sec, &value)),
                    message: msg,
                }
            };
            match sec.as_str() {
                "model" => cfg.model = value.clone().try_into().map_err(err)?,
                "lora" => cfg.lora = value.clone().try_into().map_err(err)?,
                "data" => cfg.data = value.clone().try_into().map_err(err)?,
                "train" => cfg.train = value.clone().try_into().map_err(err)?,
                "output" => cfg.output = value.clone().try_into().map_err(err)?,
                _ => unreachable!("check_keys rejected unknown sections"),
            }
        }
        Ok(cfg)
    }

    /// The resolved config as TOML (written to the run directory and into checkpoints).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serializes")
    }

    /// Flattened `section.key` → value rendering, for diffs.
    pub fn flatten(&self) -> BTreeMap<String, String> {
        let table = toml::Table::try_from(self).expect("the config serializes");
        let mut out = BTreeMap::new();
        for (sec, v) in table {
            if let toml::Value::Table(t) = v {
                for (k, v) in t {
                    out.insert(format!("{sec}.{k}"), v.to_string());
                }
            }
        }
        out
    }

    /// Keys whose values change the numbers a run computes. A checkpoint may be resumed under a
    /// config that differs only in the other keys (output location, logging/saving cadence).
    pub fn is_resume_relevant(key: &str) -> bool {
        // The run's length may change on resume (to extend a finished run): the trainer checks the new
        // total against the saved step and recomputes the schedule, see `train_with`.
        !(key.starts_with("output.")
            || matches!(
                key,
                "train.log_every"
                    | "train.save_every"
                    | "train.keep_checkpoints"
                    | "train.eval_every"
                    | "train.max_steps"
                    | "train.epochs"
                    // Where the AdamW moments live changes no number (the same kernel runs on either).
                    | "train.paged_optimizer"
            ))
    }

    /// The keys whose resume-relevant values differ between two configs, with both values.
    pub fn resume_diff(&self, other: &Config) -> Vec<(String, String, String)> {
        let (a, b) = (self.flatten(), other.flatten());
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|k| Self::is_resume_relevant(k))
            .filter_map(|k| {
                let (x, y) = (
                    a.get(k).cloned().unwrap_or_default(),
                    b.get(k).cloned().unwrap_or_default(),
                );
                (x != y).then(|| (k.clone(), x, y))
            })
            .collect()
    }

    /// Value checks that need nothing but the config. Paths are checked for existence too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let inv = |key: &str, value: String, reason: &str| ConfigError::Invalid {
            key: key.into(),
            value,
            reason: reason.into(),
        };
        let l = &self.lora;
        let t = &self.train;
        let d = &self.data;
        if self.model.path.as_os_str().is_empty() {
            return Err(inv("model.path", "\"\"".into(), "required: a Hugging Face model directory (config.json, *.safetensors, tokenizer.json)"));
        }
        if !self.model.path.is_dir() {
            return Err(inv(
                "model.path",
                format!("{:?}", self.model.path),
                "no such directory",
            ));
        }
        if !self.model.path.join("config.json").is_file() {
            return Err(inv(
                "model.path",
                format!("{:?}", self.model.path),
                "the directory has no config.json",
            ));
        }
        if d.train.as_os_str().is_empty() {
            return Err(inv(
                "data.train",
                "\"\"".into(),
                "required: a JSON/JSONL training file",
            ));
        }
        if !d.train.is_file() {
            return Err(inv("data.train", format!("{:?}", d.train), "no such file"));
        }
        if !d.eval.as_os_str().is_empty() && !d.eval.is_file() {
            return Err(inv("data.eval", format!("{:?}", d.eval), "no such file"));
        }
        if !self.model.full_finetune {
            if l.r == 0 {
                return Err(inv(
                    "lora.r",
                    "0".into(),
                    "the LoRA rank must be ≥ 1 (typical 8–64)",
                ));
            }
            if !(l.alpha.is_finite() && l.alpha > 0.0) {
                return Err(inv(
                    "lora.alpha",
                    l.alpha.to_string(),
                    "must be a finite number > 0 (typical 2·r)",
                ));
            }
            if !(0.0..1.0).contains(&l.dropout) {
                return Err(inv(
                    "lora.dropout",
                    l.dropout.to_string(),
                    "must be in [0, 1)",
                ));
            }
            if l.targets.is_empty() {
                return Err(inv(
                    "lora.targets",
                    "[]".into(),
                    "name at least one target module",
                ));
            }
            for tg in &l.targets {
                if tg != "all-linear" && !LORA_TARGETS.contains(&tg.as_str()) {
                    return Err(inv(
                        "lora.targets",
                        format!("{tg:?}"),
                        &format!(
                            "unknown module; valid: {} or \"all-linear\"",
                            LORA_TARGETS.join(", ")
                        ),
                    ));
                }
            }
        }
        if d.format != "auto" {
            d.format.parse::<afinar_data::Format>().map_err(|e| {
                inv(
                    "data.format",
                    format!("{:?}", d.format),
                    &format!("{e}; or \"auto\""),
                )
            })?;
        }
        d.template
            .parse::<afinar_data::TemplateKind>()
            .map_err(|e| inv("data.template", format!("{:?}", d.template), &e.to_string()))?;
        d.mask
            .parse::<afinar_data::MaskMode>()
            .map_err(|e| inv("data.mask", format!("{:?}", d.mask), &e.to_string()))?;
        if d.max_seq_len < 2 {
            return Err(inv(
                "data.max_seq_len",
                d.max_seq_len.to_string(),
                "must be ≥ 2 tokens",
            ));
        }
        if !(0.0..1.0).contains(&d.eval_fraction) {
            return Err(inv(
                "data.eval_fraction",
                d.eval_fraction.to_string(),
                "must be in [0, 1): a split of 1 leaves no training data",
            ));
        }
        if !d.template_date.is_empty() {
            if let Err(e) = d.template_date.parse::<afinar_data::jinja::TemplateDate>() {
                return Err(inv("data.template_date", d.template_date.clone(), &e));
            }
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return Err(inv(
                "train.lr",
                t.lr.to_string(),
                "the learning rate must be > 0 (QLoRA typical 2e-4)",
            ));
        }
        if t.micro_batch_size == 0 {
            return Err(inv("train.micro_batch_size", "0".into(), "must be ≥ 1"));
        }
        if t.grad_accum == 0 {
            return Err(inv("train.grad_accum", "0".into(), "must be ≥ 1"));
        }
        if t.grad_accum > MAX_GRAD_ACCUM {
            return Err(inv(
                "train.grad_accum",
                t.grad_accum.to_string(),
                &format!(
                    "must be ≤ {MAX_GRAD_ACCUM}: the window's micro-batches are held in memory together \
                     (raise train.micro_batch_size instead)"
                ),
            ));
        }
        if t.max_steps == 0 && !(t.epochs.is_finite() && t.epochs > 0.0) {
            return Err(inv(
                "train.epochs",
                t.epochs.to_string(),
                "must be > 0 when train.max_steps = 0",
            ));
        }
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            return Err(inv(
                "train.warmup_ratio",
                t.warmup_ratio.to_string(),
                "must be in [0, 1)",
            ));
        }
        if t.warmup_steps > 0 && t.warmup_ratio > 0.0 {
            return Err(inv(
                "train.warmup_steps",
                t.warmup_steps.to_string(),
                "set warmup_steps or warmup_ratio, not both",
            ));
        }
        if t.max_steps > 0 && t.warmup_steps >= t.max_steps && t.schedule != ScheduleKind::Constant
        {
            return Err(inv(
                "train.warmup_steps",
                t.warmup_steps.to_string(),
                &format!(
                    "warmup is longer than training (train.max_steps = {})",
                    t.max_steps
                ),
            ));
        }
        for (i, b) in t.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return Err(inv(
                    &format!("train.betas[{i}]"),
                    b.to_string(),
                    "must be in [0, 1)",
                ));
            }
        }
        if !(t.eps.is_finite() && t.eps > 0.0) {
            return Err(inv(
                "train.eps",
                t.eps.to_string(),
                "must be > 0 (typical 1e-8)",
            ));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(inv(
                "train.weight_decay",
                t.weight_decay.to_string(),
                "must be ≥ 0",
            ));
        }
        if !(t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0) {
            return Err(inv(
                "train.max_grad_norm",
                t.max_grad_norm.to_string(),
                "must be ≥ 0 (0 = no clipping)",
            ));
        }
        if t.keep_checkpoints == 0 {
            return Err(inv(
                "train.keep_checkpoints",
                "0".into(),
                "must be ≥ 1 (resume needs one)",
            ));
        }
        if t.log_every == 0 {
            return Err(inv("train.log_every", "0".into(), "must be ≥ 1"));
        }
        if self.output.run_name.contains('/')
            || self.output.run_name.contains('\\')
            || self.output.run_name == ".."
        {
            return Err(inv(
                "output.run_name",
                format!("{:?}", self.output.run_name),
                "must be a plain directory name",
            ));
        }
        Ok(())
    }
}

/// For a type error in a section, finds which key is at fault by deserializing the section with each
/// key alone (cheap: a handful of keys). Returns ".key" or "" when it cannot tell.
fn locate_bad_key(sec: &str, value: &toml::Value) -> String {
    let Some(t) = value.as_table() else {
        return String::new();
    };
    for (k, v) in t {
        let mut one = toml::Table::new();
        one.insert(k.clone(), v.clone());
        let v = toml::Value::Table(one);
        let bad = match sec {
            "model" => v.try_into::<ModelSection>().is_err(),
            "lora" => v.try_into::<LoraSection>().is_err(),
            "data" => v.try_into::<DataSection>().is_err(),
            "train" => v.try_into::<TrainSection>().is_err(),
            "output" => v.try_into::<OutputSection>().is_err(),
            _ => false,
        };
        if bad {
            return format!(".{k}");
        }
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_come_from_serde() {
        let f = field_names::<TrainSection>();
        assert!(f.contains(&"lr") && f.contains(&"grad_accum") && f.contains(&"keep_checkpoints"));
        assert_eq!(
            field_names::<Config>(),
            &["model", "lora", "data", "train", "output"]
        );
    }

    #[test]
    fn unknown_key_names_nearest() {
        let e = Config::from_toml_str("[train]\nlrr = 1e-4\n", "x.toml", &[]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("`train.lrr`")
                && msg.contains("did you mean `train.lr`")
                && msg.contains("x.toml:2"),
            "{msg}"
        );
        let e = Config::from_toml_str("[lora]\nrank = 8\n", "x.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lora.rank") && e.contains("did you mean `lora.r"),
            "{e}"
        );
        let e = Config::from_toml_str("[trian]\nlr = 1e-4\n", "x.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`trian`") && e.contains("did you mean `train`"),
            "{e}"
        );
        // A key of another section is pointed there.
        let e = Config::from_toml_str("[lora]\nlr = 1e-4\n", "x.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `train.lr`"), "{e}");
        let e = Config::from_toml_str("[train]\ngradient_accumulation = 4\n", "x.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.gradient_accumulation"), "{e}");
    }

    #[test]
    fn overrides_are_typed_and_checked() {
        let c = Config::from_toml_str(
            "[train]\nlr = 1e-4\n",
            "x.toml",
            &[
                "train.lr=3e-4".into(),
                "model.path=/m/gemma".into(),
                "lora.targets=[\"q_proj\"]".into(),
                "output.run_name=123".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.lr, 3e-4);
        assert_eq!(c.model.path, PathBuf::from("/m/gemma"));
        assert_eq!(c.lora.targets, vec!["q_proj"]);
        assert_eq!(c.output.run_name, "123");
        let c =
            Config::from_toml_str("", "x.toml", &["lora.targets=q_proj, v_proj".into()]).unwrap();
        assert_eq!(c.lora.targets, vec!["q_proj", "v_proj"]);
        let c = Config::from_toml_str("", "x.toml", &["lora.targets=all-linear".into()]).unwrap();
        assert_eq!(c.lora.resolved_targets().len(), 7);
        let e = Config::from_toml_str("", "x.toml", &["train.lrate=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `train.lr`"), "{e}");
        let e = Config::from_toml_str("", "x.toml", &["train.lr=fast".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.lr"), "{e}");
        assert!(matches!(
            Config::from_toml_str("", "x", &["nodot=1".into()]),
            Err(ConfigError::BadOverride { .. })
        ));
    }

    #[test]
    fn type_error_names_key() {
        let e = Config::from_toml_str("[train]\nlr = 1e-4\ngrad_accum = \"four\"\n", "x.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.grad_accum"), "{e}");
    }

    #[test]
    fn round_trip_and_diff() {
        let mut a = Config::default();
        a.train.lr = 1e-3;
        let b = Config::from_toml_str(&a.to_toml(), "r.toml", &[]).unwrap();
        assert_eq!(a, b);
        let mut c = b.clone();
        c.lora.r = 4;
        c.output.run_name = "other".into();
        c.train.save_every = 7;
        let d = a.resume_diff(&c);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].0, "lora.r");
    }

    fn valid(dir: &Path) -> Config {
        std::fs::create_dir_all(dir.join("m")).unwrap();
        std::fs::write(dir.join("m/config.json"), "{}").unwrap();
        std::fs::write(dir.join("t.jsonl"), "").unwrap();
        let mut c = Config::default();
        c.model.path = dir.join("m");
        c.data.train = dir.join("t.jsonl");
        c
    }

    #[test]
    fn validation_rejects_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        let base = valid(dir.path());
        base.validate().unwrap();
        type Case = (&'static str, Box<dyn Fn(&mut Config)>);
        let cases: Vec<Case> = vec![
            ("lora.r", Box::new(|c| c.lora.r = 0)),
            ("train.lr", Box::new(|c| c.train.lr = 0.0)),
            ("train.lr", Box::new(|c| c.train.lr = -1e-4)),
            (
                "data.eval_fraction",
                Box::new(|c| c.data.eval_fraction = 1.0),
            ),
            (
                "train.warmup_steps",
                Box::new(|c| {
                    c.train.max_steps = 10;
                    c.train.warmup_steps = 10;
                }),
            ),
            (
                "model.path",
                Box::new(|c| c.model.path = "/nonexistent/model".into()),
            ),
            (
                "data.train",
                Box::new(|c| c.data.train = "/nonexistent/train.jsonl".into()),
            ),
            (
                "lora.targets",
                Box::new(|c| c.lora.targets = vec!["qkv".into()]),
            ),
            ("train.betas[1]", Box::new(|c| c.train.betas = [0.9, 1.0])),
            (
                "train.grad_accum",
                Box::new(|c| c.train.grad_accum = 100_000_000_000),
            ),
            (
                "train.keep_checkpoints",
                Box::new(|c| c.train.keep_checkpoints = 0),
            ),
        ];
        for (key, f) in cases {
            let mut c = base.clone();
            f(&mut c);
            match c.validate() {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: expected Invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn edit_distance_basics() {
        assert_eq!(edit_distance("lrr", "lr"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
