//! afinar-data: dataset readers, prompt templates, tokenization, label masks, packing, loader.
//!
//! The pipeline, and the one call the trainer needs:
//! ```text
//! file ──read_dataset──▶ RawDataset (records, format-level validation)
//!      ──Template::render──▶ segments ──tokenize each, concatenate──▶ ids + trained flags
//!      ──encode_dataset──▶ TokenizedDataset (unshifted labels, length handling, stats)
//!      ──DataLoader──▶ Batch (input_ids, labels, position_ids, segment_ids, sample_ids)
//! prepare(&DataConfig, &TextTokenizer) does the first three for the train (and eval) files and
//! reports every invalid record of both files at once, before anything trains.
//! ```
//! The crate knows nothing of tensors: batches are flat `Vec<i32>` in [B, T] row-major order.

pub mod encode;
pub mod error;
mod fastpath;
pub mod inspect;
pub mod jinja;
pub mod loader;
pub mod names;
pub mod pack;
pub mod record;
pub mod template;
pub mod tokenizer;
pub mod train_tokenizer;

use std::path::PathBuf;

pub use encode::{
    encode_dataset, encode_record, EncodeOptions, EncodeStats, Encoded, MaskMode, Overflow,
    ReplayPart, Sample, TokenizedDataset, IGNORE_INDEX,
};
pub use error::{DataError, ErrorList, Loc, RecordError, Result, MAX_REPORTED_ERRORS};
pub use inspect::{
    inspect, render_report, HistBin, InspectOptions, InspectReport, Piece, Problem, SampleView,
};
pub use loader::{permutation, split_by_fraction, Batch, DataLoader, LoaderConfig, LoaderCursor};
pub use pack::pack_ffd;
pub use record::{parse_dataset, read_dataset, Body, Format, Message, RawDataset, Record, Role};
pub use template::{alpaca_prompt, SegKind, Segment, Template, TemplateKind};
pub use tokenizer::{SpecialToken, TextTokenizer};
pub use train_tokenizer::{
    add_bos_post_processor, project_tokenizer_config, train_tokenizer, GEMMA_CHAT_TEMPLATE,
    PROJECT_SPECIAL_TOKENS,
};

/// The `[data]` section of a run config.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training file (JSON array or JSONL).
    pub path: PathBuf,
    /// None = detect from the first record.
    #[serde(default)]
    pub format: Option<Format>,
    #[serde(default = "default_template")]
    pub template: TemplateKind,
    #[serde(default)]
    pub mask: MaskMode,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    #[serde(default)]
    pub overflow: Overflow,
    /// A separate eval file (same format rules). Exclusive with `eval_fraction`.
    #[serde(default)]
    pub eval_path: Option<PathBuf>,
    /// Hold out this fraction of the training file for eval. Exclusive with `eval_path`.
    #[serde(default)]
    pub eval_fraction: Option<f64>,
    /// Seed of the fraction split.
    #[serde(default)]
    pub split_seed: u64,
    /// A second training file (its format detected on its own, e.g. `text` records beside an
    /// instruction file) whose samples are trained beside the training file's every epoch: replay
    /// of pretraining text against forgetting. Never split into the eval set.
    #[serde(default)]
    pub replay_path: Option<PathBuf>,
    /// The date `strftime_now` renders in a `tokenizer` chat template; None = now.
    #[serde(skip)]
    pub template_date: Option<jinja::TemplateDate>,
}

fn default_template() -> TemplateKind {
    TemplateKind::Gemma
}
fn default_max_seq_len() -> usize {
    1024
}

impl DataConfig {
    pub fn new(path: impl Into<PathBuf>, template: TemplateKind) -> Self {
        DataConfig {
            path: path.into(),
            format: None,
            template,
            mask: MaskMode::Assistant,
            max_seq_len: default_max_seq_len(),
            overflow: Overflow::Truncate,
            eval_path: None,
            eval_fraction: None,
            split_seed: 0,
            replay_path: None,
            template_date: None,
        }
    }
    pub fn encode_options(&self) -> EncodeOptions {
        EncodeOptions {
            mask: self.mask,
            max_seq_len: self.max_seq_len,
            overflow: self.overflow,
        }
    }
}

/// The train set and optional eval set, tokenized.
#[derive(Clone, Debug)]
pub struct PreparedData {
    pub train: TokenizedDataset,
    pub eval: Option<TokenizedDataset>,
    pub format: Format,
}

/// Turns `InvalidRecords` into a list to merge with others; passes any other error through.
fn collect<T>(r: Result<T>, errs: &mut ErrorList) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(DataError::InvalidRecords { errors, total, .. }) => {
            errs.extend(ErrorList { total, errors });
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Reads, validates and tokenizes the training (and eval) data. Every invalid record of both
/// files is reported together (first 20 listed, all counted) and nothing is returned then.
pub fn prepare(cfg: &DataConfig, tok: &TextTokenizer) -> Result<PreparedData> {
    if cfg.eval_path.is_some() && cfg.eval_fraction.is_some() {
        return Err(DataError::Option {
            option: "eval_fraction".into(),
            problem: "set either eval_path or eval_fraction, not both".into(),
        });
    }
    let template = Template::with_date(cfg.template, tok, cfg.template_date)?;
    let opts = cfg.encode_options();
    let mut errs = ErrorList::default();
    let train_raw = collect(read_dataset(&cfg.path, cfg.format), &mut errs)?;
    let eval_raw = match &cfg.eval_path {
        Some(p) => collect(read_dataset(p, cfg.format), &mut errs)?,
        None => None,
    };
    // `format` names the training file's format; the replay file's is detected from its records.
    let replay_raw = match &cfg.replay_path {
        Some(p) => collect(read_dataset(p, None), &mut errs)?,
        None => None,
    };
    // Template-level validation and tokenization of whatever parsed, so that format errors and
    // template errors are reported in one go.
    let (train_raw, eval_raw) = match (train_raw, cfg.eval_fraction) {
        (Some(raw), Some(f)) => {
            let (train, eval) = split_by_fraction(raw.records, f, cfg.split_seed)?;
            let mk = |records| RawDataset {
                path: raw.path.clone(),
                format: raw.format,
                records,
            };
            (Some(mk(train)), Some(mk(eval)))
        }
        (t, _) => (t, eval_raw),
    };
    let train = match &train_raw {
        Some(r) => collect(encode_dataset(r, &template, tok, &opts), &mut errs)?,
        None => None,
    };
    let eval = match &eval_raw {
        Some(r) => collect(encode_dataset(r, &template, tok, &opts), &mut errs)?,
        None => None,
    };
    let replay = match &replay_raw {
        Some(r) => collect(encode_dataset(r, &template, tok, &opts), &mut errs)?,
        None => None,
    };
    errs.into_result(&cfg.path.display().to_string())?;
    let (Some(mut train), Some(format)) = (train, train_raw.as_ref().map(|r| r.format)) else {
        return Err(DataError::EmptyDataset {
            path: cfg.path.clone(),
        });
    };
    if let Some(r) = replay {
        train.append_replay(r);
    }
    if train.samples.is_empty() {
        // parse_dataset refuses a file without records, so here every record was dropped for length.
        return Err(DataError::AllDropped {
            path: cfg.path.clone(),
            records: train.stats.records,
            too_long: train.stats.dropped_too_long,
            untrained: train.stats.dropped_untrained,
            max_seq_len: opts.max_seq_len,
        });
    }
    Ok(PreparedData {
        train,
        eval,
        format,
    })
}
