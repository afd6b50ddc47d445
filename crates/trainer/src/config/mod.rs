//! The run configuration: one TOML file = one run.
//!
//! Every section is `#[serde(deny_unknown_fields)]`, but unknown keys are caught *before* serde by
//! [`check_keys`] (module `keys`), which walks the parsed table against the field lists serde itself
//! reports (see [`field_names`]) and names the nearest valid key by edit distance ("`train.lrr` is not a
//! key; did you mean `train.lr`?"). `--set section.key=value` overrides are applied to the parsed table,
//! typed by the target field, so they get the same checks (module `load`). Values deserialize straight
//! into the data crate's types (`data.format`, `data.template`, `data.mask`, `data.length_strategy`,
//! `data.template_date`), whose own parsers name the valid values. [`Config::validate`] (module
//! `validate`) rejects invalid values before any work starts; the checks that need the data (warmup vs.
//! total steps, the template's own length) live in the trainer, which runs them before the first step.

use std::path::PathBuf;

use afinar_data::jinja::TemplateDate;
use afinar_data::names::{date_or_now, format_or_auto};
use afinar_data::{Format, MaskMode, Overflow, TemplateKind};
use afinar_gemma::Target;
use serde::{Deserialize, Serialize};

mod keys;
mod load;
mod validate;

pub use keys::{check_keys, edit_distance, field_names, schema};
pub use load::apply_override;

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

/// The whole run. Sections may be omitted; each field's default is given in its doc.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelSection,
    pub lora: LoraSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub output: OutputSection,
    pub eval: EvalSection,
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
    /// "all-linear" (all seven). Default all seven. Held in afinar-gemma's canonical order, without
    /// duplicates (`parse_targets`).
    #[serde(with = "lora_targets")]
    pub targets: Vec<Target>,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            rslora: false,
            targets: Target::ALL.to_vec(),
        }
    }
}

/// `lora.targets` as a config writes it: module names or "all-linear", read through afinar-gemma's
/// `parse_targets` (whose error names the valid modules), written back as module names.
mod lora_targets {
    use afinar_gemma::lora::parse_targets;
    use afinar_gemma::Target;
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(targets: &[Target], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(targets.iter().map(|t| t.name()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Target>, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        if names.is_empty() {
            // Refused by `Config::validate` unless the run trains every weight instead.
            return Ok(Vec::new());
        }
        parse_targets(&names).map_err(D::Error::custom)
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
    /// "auto" (detect: `None`), "alpaca", "messages", "sharegpt" or "text".
    #[serde(with = "format_or_auto")]
    pub format: Option<Format>,
    /// Replay file trained beside `train` every epoch (its own format, detected from its records;
    /// typically `{"text": …}` pretraining text, every token trained): mixing some of the base's
    /// pretraining data into SFT holds down forgetting. Never part of the eval split. Empty = none.
    pub replay: PathBuf,
    /// Prompt template: "gemma", "alpaca", "chatml", "llama3" or "tokenizer" (the model's own Jinja
    /// chat_template). Default "gemma".
    pub template: TemplateKind,
    /// Which tokens are trained: "assistant" (assistant turns + their end-of-turn token), "all", or
    /// "last-turn". Default "assistant".
    pub mask: MaskMode,
    /// Maximum tokens per row (sample, or packed row). Typical 512–2048; default 512.
    pub max_seq_len: usize,
    /// Samples longer than max_seq_len: "truncate", "drop" or "error". Default "truncate".
    pub length_strategy: Overflow,
    /// Pack several samples per row (first-fit decreasing; no attention across samples). Default false.
    pub packing: bool,
    /// Fraction of the training file held out for eval when `eval` is empty, in [0, 1). Default 0.05.
    pub eval_fraction: f64,
    /// Seed of the train/eval split and of the per-epoch shuffle. Default 42.
    pub seed: u64,
    /// The date and time `strftime_now` renders in a `tokenizer` chat template (Llama-3.x templates
    /// print "Today Date: …"): "YYYY-MM-DD" or "YYYY-MM-DDTHH:MM:SS". Empty (`None`) = the local time
    /// when the run starts; the trainer writes the value it used into the run's config.toml, and a
    /// resumed run reuses it, so samples tokenize the same on any day. Ignored by the built-in templates.
    #[serde(with = "date_or_now")]
    pub template_date: Option<TemplateDate>,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train: PathBuf::new(),
            eval: PathBuf::new(),
            format: None,
            replay: PathBuf::new(),
            template: TemplateKind::Gemma,
            mask: MaskMode::Assistant,
            max_seq_len: 512,
            length_strategy: Overflow::Truncate,
            packing: false,
            eval_fraction: 0.05,
            seed: 42,
            template_date: None,
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
    /// Profile the run: time every op (CUDA events on a GPU, wall time on the CPU) by op, layer role
    /// and pass, with host gaps and device syncs, each as a share of the step; printed at the end
    /// and written to profile.json in the run directory. The first step is left out (warm-up), and
    /// the profiler adds one sync per step on a GPU. Results are bit-identical either way; off, it
    /// costs nothing. `AFINAR_PROFILE=1` turns it on for any command. Default false.
    pub profile: bool,
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
            profile: false,
        }
    }
}

/// `[eval]`: the evaluation `afinar train` runs beside the loss: the behaviour suite (base before
/// training, tuned every `every` steps and/or at the end), forgetting on general text, the NF4 cost and
/// merge fidelity. Results go to summary.json (`evaluation`), evaluation.json, behaviour.jsonl,
/// behaviour.svg/png and report.md. The suite format and scoring rules are in `crate::suite`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Behaviour suite (JSONL: prompt, `category`, `expect`); empty = no suite. Default "".
    pub suite: PathBuf,
    /// Held-out general text (JSONL `{"text": …}`) whose perplexity before and after training measures
    /// forgetting; empty = not measured. Default "".
    pub general_text: PathBuf,
    /// Run the suite every N optimizer steps (0 = not during training). Default 0.
    pub every: u64,
    /// Run the suite (and forgetting, merge fidelity) after a completed run. Default true.
    pub at_end: bool,
    /// Score only the first N suite records (0 = all), after `max_per_category`. Default 0.
    pub max_records: usize,
    /// Score only the first N records of each category (0 = all): keeps a CPU demo's evaluation
    /// short with every category represented. Default 0.
    pub max_per_category: usize,
    /// Greedy generation limit per answer. Typical 32–256; default 64.
    pub max_new_tokens: usize,
    /// transformers' repetition_penalty of the (still greedy) generations, > 0; 1 = off. Default 1.0.
    pub repetition_penalty: f32,
    /// transformers' no_repeat_ngram_size of the generations; 0 = off. Default 0.
    pub no_repeat_ngram_size: usize,
    /// The phrase a `refuse` answer must contain (normalized: case, accents, punctuation).
    /// Default "No lo sé".
    pub refuse_pattern: String,
    /// Phrases of which a `premise` answer must contain one; empty = the built-in Spanish/English list
    /// (`suite::DEFAULT_PREMISE_MARKERS`). Default [].
    pub premise_markers: Vec<String>,
    /// With `model.quantization = "nf4"`: also score the dense base once before training and report
    /// the eval loss of NF4 vs dense (needs eval data). The dense base is read from the checkpoint one
    /// layer at a time (no dense copy of the model is held). Default true.
    pub nf4_cost: bool,
    /// After a LoRA run: run the merged model (W + s·B·A) and report its largest logit difference
    /// from base + adapter on the first suite prompts. The merged model is run one dense layer at a
    /// time (no dense copy of the model). Default true.
    pub merge_fidelity: bool,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            suite: PathBuf::new(),
            general_text: PathBuf::new(),
            every: 0,
            at_end: true,
            max_records: 0,
            max_per_category: 0,
            max_new_tokens: 64,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            refuse_pattern: crate::suite::DEFAULT_REFUSE.into(),
            premise_markers: Vec::new(),
            nf4_cost: true,
            merge_fidelity: true,
        }
    }
}

impl EvalSection {
    /// Whether any evaluation beyond the eval loss is configured.
    pub fn enabled(&self) -> bool {
        !self.suite.as_os_str().is_empty() || !self.general_text.as_os_str().is_empty()
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
