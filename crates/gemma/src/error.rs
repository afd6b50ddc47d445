//! Typed errors of afinar-gemma. Every variant names the file, key, tensor or shape at fault, so a
//! message read on its own says where to look.

use std::path::PathBuf;

use afinar_kernels::KernelError;

/// What can go wrong reading a config, loading weights, or running the model.
#[derive(Debug, thiserror::Error)]
pub enum GemmaError {
    /// An operating-system error on a file (open, read, mmap).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file that does not parse.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A config key with a wrong type or a value outside what Gemma-2 allows.
    #[error("{path}: config key `{key}`: {msg}")]
    Config {
        path: PathBuf,
        key: String,
        msg: String,
    },
    /// config.json describes another architecture.
    #[error("{path}: model_type is {found:?}, but afinar-gemma only runs \"gemma2\" (Gemma2ForCausalLM)")]
    UnsupportedModelType { path: PathBuf, found: String },
    /// A safetensors file whose header or layout is broken (truncated, overlapping offsets, bad JSON...).
    #[error("{path}: corrupt safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    /// A tensor the model needs is in none of the checkpoint files.
    #[error("tensor `{name}` not found; searched {}", display_paths(files))]
    MissingTensor { name: String, files: Vec<PathBuf> },
    /// A tensor with the wrong shape (in memory: values handed in by a caller; a tensor read from a file
    /// is a `StoredShapeMismatch`, which also names the file).
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A stored tensor whose shape disagrees with what the config (or its companion tensors) require:
    /// names the tensor and the (shard) file that holds it.
    #[error("tensor `{name}` in {path}: expected shape {expected:?}, found {found:?}")]
    StoredShapeMismatch {
        name: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A part of a bitsandbytes 4-bit weight (`….weight`, `.absmax`, `.quant_map`, `.nested_*`, the
    /// quant-state blob) that is inconsistent with the others: names the checkpoint tensor and its file.
    #[error("{path}: bitsandbytes 4-bit tensor `{tensor}`: {msg}")]
    Bnb {
        tensor: String,
        path: PathBuf,
        msg: String,
    },
    /// A tensor stored in a dtype this reader does not convert (e.g. I64 where floats are needed).
    #[error("tensor `{name}` in {path}: dtype {dtype} is not supported here ({hint})")]
    Dtype {
        name: String,
        path: PathBuf,
        dtype: String,
        hint: String,
    },
    /// An unknown LoRA target module.
    #[error("unknown LoRA target module {name:?}; valid targets are {valid} or \"all-linear\"")]
    UnknownTarget { name: String, valid: String },
    /// A LoRA hyper-parameter that makes no sense (r = 0, dropout outside [0, 1)...).
    #[error("LoRA config: {0}")]
    LoraConfig(String),
    /// A checkpoint feature that this build cannot load yet.
    #[error("{what} is not supported yet: {hint}")]
    NotSupported { what: String, hint: String },
    /// A batch whose vectors disagree with B·T or hold out-of-range ids.
    #[error("batch: {0}")]
    Batch(String),
    /// A model-level invariant was violated by the caller (e.g. gradients of another model).
    #[error("{0}")]
    Invalid(String),
    /// An op failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

fn display_paths(files: &[PathBuf]) -> String {
    if files.is_empty() {
        return "no files".to_string();
    }
    files
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

pub type Result<T> = std::result::Result<T, GemmaError>;

impl GemmaError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        GemmaError::Io {
            path: path.into(),
            source,
        }
    }
}
