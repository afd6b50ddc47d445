//! Records → token ids + labels, in parallel (rayon), with length handling.
//!
//! LABEL CONVENTION (what the trainer gets): `labels` are UNSHIFTED, Hugging Face style:
//! `labels[i] == input_ids[i]` where token i is trained, −100 where it is not. Token i is
//! "trained" when the model is taught to produce it, i.e. the target of the prediction made at
//! position i − 1. The position-0 label is therefore never used (nothing predicts the first token)
//! and `Sample::num_trained` counts labels at positions ≥ 1 only. `Batch::shifted_labels` produces
//! the per-position targets the kernels' cross-entropy expects.

use std::path::PathBuf;

use rayon::prelude::*;

use crate::error::{DataError, ErrorList, Loc, RecordError, Result};
use crate::record::{Body, Format, RawDataset, Record};
use crate::template::{SegKind, Template};
use crate::tokenizer::TextTokenizer;

pub const IGNORE_INDEX: i32 = -100;

/// Which tokens are trained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaskMode {
    /// Every assistant turn: content + end-of-turn markup (default).
    #[default]
    Assistant,
    /// Every token (prompt and markup included).
    All,
    /// Only the last assistant turn (content + end-of-turn).
    LastTurn,
}

impl MaskMode {
    pub fn name(self) -> &'static str {
        match self {
            MaskMode::Assistant => "assistant",
            MaskMode::All => "all",
            MaskMode::LastTurn => "last-turn",
        }
    }
}

impl std::fmt::Display for MaskMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for MaskMode {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "assistant" | "assistant-only" => Ok(MaskMode::Assistant),
            "all" | "all-tokens" => Ok(MaskMode::All),
            "last-turn" | "last" => Ok(MaskMode::LastTurn),
            _ => Err(DataError::Option {
                option: "mask".into(),
                problem: format!("unknown mask mode `{s}` (expected assistant, all or last-turn)"),
            }),
        }
    }
}

/// What to do with a sample longer than `max_seq_len`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// Keep the first `max_seq_len` tokens (a sample left with no trained token is dropped).
    #[default]
    Truncate,
    /// Drop the sample (counted).
    Drop,
    /// Report the sample as an invalid record (path:line) and refuse the dataset.
    Error,
}

impl Overflow {
    pub fn name(self) -> &'static str {
        match self {
            Overflow::Truncate => "truncate",
            Overflow::Drop => "drop",
            Overflow::Error => "error",
        }
    }
}

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Overflow {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "truncate" => Ok(Overflow::Truncate),
            "drop" => Ok(Overflow::Drop),
            "error" | "raise" => Ok(Overflow::Error),
            _ => Err(DataError::Option {
                option: "overflow".into(),
                problem: format!("unknown strategy `{s}` (expected truncate, drop or error)"),
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeOptions {
    pub mask: MaskMode,
    pub max_seq_len: usize,
    pub overflow: Overflow,
}

/// A record fully tokenized, before length handling (also what `inspect` displays).
#[derive(Clone, Debug)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// `trained[i]`: token i is a training target.
    pub trained: Vec<bool>,
    /// Token range [start, end) of each assistant turn (content + end-of-turn markup).
    pub turn_spans: Vec<(usize, usize)>,
    /// Token range and kind of each segment.
    pub segments: Vec<(usize, usize, SegKind)>,
}

/// Checks content fields for special-token text (which would be encoded as control tokens).
fn check_specials(body: &Body, tok: &TextTokenizer) -> std::result::Result<(), (String, String)> {
    let bad = |field: String, text: &str| -> std::result::Result<(), (String, String)> {
        match tok.find_special(text) {
            Some(s) => Err((
                field,
                format!("contains the special token text `{s}`, which would be encoded as a control token; remove or escape it"),
            )),
            None => Ok(()),
        }
    };
    match body {
        Body::Instruction {
            system,
            instruction,
            input,
            output,
        } => {
            if let Some(s) = system {
                bad("system".into(), s)?;
            }
            bad("instruction".into(), instruction)?;
            bad("input".into(), input)?;
            bad("output".into(), output)
        }
        Body::Chat(m) => {
            for (i, m) in m.iter().enumerate() {
                bad(format!("messages[{i}].content"), &m.content)?;
            }
            Ok(())
        }
        Body::Text(t) => bad("text".into(), t),
    }
}

/// Renders and tokenizes one record (segment by segment) and computes the trained flags.
pub fn encode_record(
    body: &Body,
    template: &Template,
    tok: &TextTokenizer,
    mask: MaskMode,
) -> std::result::Result<Encoded, (String, String)> {
    check_specials(body, tok)?;
    let rendered = template.render(body)?;
    let last_turn = rendered.assistant_turns.checked_sub(1);
    let mut ids: Vec<u32> =
        Vec::with_capacity(rendered.segments.iter().map(|s| s.text.len() / 3 + 2).sum());
    let mut trained = Vec::with_capacity(ids.capacity());
    let mut segments = Vec::with_capacity(rendered.segments.len());
    let mut turn_spans: Vec<(usize, usize)> = Vec::new();
    for seg in &rendered.segments {
        let start = ids.len();
        match template.cached(&seg.text) {
            Some(c)
                if seg.kind == SegKind::Structure
                    || matches!(seg.kind, SegKind::EndOfTurn { .. }) =>
            {
                ids.extend_from_slice(c)
            }
            _ => ids.extend(
                tok.encode(&seg.text)
                    .map_err(|e| ("-".to_string(), e.to_string()))?,
            ),
        }
        let on = rendered.train_all
            || match (mask, seg.kind.assistant_turn()) {
                (MaskMode::All, _) => true,
                (MaskMode::Assistant, Some(_)) => true,
                (MaskMode::LastTurn, Some(t)) => Some(t) == last_turn,
                _ => false,
            };
        trained.resize(ids.len(), on);
        if let Some(t) = seg.kind.assistant_turn() {
            if turn_spans.len() <= t {
                turn_spans.resize(t + 1, (start, start));
                turn_spans[t].0 = start;
            }
            turn_spans[t].1 = ids.len();
        }
        segments.push((start, ids.len(), seg.kind));
    }
    // Exactly one BOS, at position 0, when the tokenizer uses one (add_bos_token, default true).
    if let (true, Some(bos)) = (tok.adds_bos(), tok.bos()) {
        let n = ids.iter().filter(|&&i| i == bos.id).count();
        if n != 1 || ids.first() != Some(&bos.id) {
            return Err((
                "-".into(),
                format!(
                    "the rendered sequence holds {n} `{}` token(s){}; expected exactly one, first (does the chat template emit BOS more than once?)",
                    bos.text,
                    if ids.first() == Some(&bos.id) { "" } else { " and does not start with it" }
                ),
            ));
        }
    }
    Ok(Encoded {
        ids,
        trained,
        turn_spans,
        segments,
    })
}

/// One training sample: unshifted labels (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Index of the record in the `RawDataset` it was encoded from (after a fraction split: within
    /// its split); `line` locates it in the file.
    pub record: usize,
    /// 1-based line of the record in its file.
    pub line: usize,
    pub input_ids: Vec<i32>,
    pub labels: Vec<i32>,
    pub truncated: bool,
}

impl Sample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    /// Trained targets: labels at positions ≥ 1 that are not −100.
    pub fn num_trained(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// Counts reported for one tokenized dataset.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EncodeStats {
    /// Records read (valid).
    pub records: usize,
    /// Samples kept.
    pub samples: usize,
    /// Tokens in the kept samples.
    pub tokens: usize,
    /// Trained targets in the kept samples.
    pub trained_tokens: usize,
    /// Kept samples that were truncated to max_seq_len.
    pub truncated: usize,
    /// Samples dropped for exceeding max_seq_len (overflow = drop).
    pub dropped_too_long: usize,
    /// Samples dropped because truncation left no trained token.
    pub dropped_untrained: usize,
    pub min_len: usize,
    pub max_len: usize,
}

impl EncodeStats {
    /// Trained targets / tokens.
    pub fn trained_share(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.trained_tokens as f64 / self.tokens as f64
        }
    }
}

/// A dataset tokenized and ready for the loader.
#[derive(Clone, Debug)]
pub struct TokenizedDataset {
    pub path: PathBuf,
    pub samples: Vec<Sample>,
    /// Counts over every sample, the replay's included.
    pub stats: EncodeStats,
    /// Samples appended from a second file (`DataConfig::replay_path`): `samples[first..]` come from
    /// it and their `line`s locate them there, not in `path`. None for a single-file dataset.
    pub replay: Option<ReplayPart>,
}

/// The part of a [`TokenizedDataset`] that came from a replay file.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayPart {
    pub path: PathBuf,
    /// Index of its first sample in `TokenizedDataset::samples`.
    pub first: usize,
    /// Its own counts (also included in the dataset's `stats`).
    pub stats: EncodeStats,
}

impl TokenizedDataset {
    /// The file sample `i` was read from (its `line` is a line of that file).
    pub fn sample_path(&self, i: usize) -> &std::path::Path {
        match &self.replay {
            Some(r) if i >= r.first => &r.path,
            _ => &self.path,
        }
    }

    /// Appends `other`'s samples as the replay part (records trained beside this file's, e.g.
    /// pretraining text mixed into SFT data against forgetting). `other`'s record indices are
    /// shifted past this dataset's so that they stay distinct. A dataset has at most one replay part.
    pub fn append_replay(&mut self, other: TokenizedDataset) {
        assert!(self.replay.is_none(), "one replay part per dataset");
        let first = self.samples.len();
        let shift = self.stats.records;
        let st = &mut self.stats;
        let o = &other.stats;
        st.records += o.records;
        st.samples += o.samples;
        st.tokens += o.tokens;
        st.trained_tokens += o.trained_tokens;
        st.truncated += o.truncated;
        st.dropped_too_long += o.dropped_too_long;
        st.dropped_untrained += o.dropped_untrained;
        if o.samples > 0 {
            st.min_len = if st.samples == o.samples {
                o.min_len
            } else {
                st.min_len.min(o.min_len)
            };
            st.max_len = st.max_len.max(o.max_len);
        }
        self.samples.extend(other.samples.into_iter().map(|mut s| {
            s.record += shift;
            s
        }));
        self.replay = Some(ReplayPart {
            path: other.path,
            first,
            stats: other.stats,
        });
    }
}

enum Outcome {
    Keep(Sample),
    TooLong,
    Untrained,
    Invalid(RecordError),
}

/// Field names as the file spells them: templates speak of `messages[i].role/content`; a
/// sharegpt file has `conversations[i].from/value`.
pub(crate) fn file_field(format: Format, field: String) -> String {
    if format != Format::ShareGpt || !field.starts_with("messages") {
        return field;
    }
    field
        .replacen("messages", "conversations", 1)
        .replace(".role", ".from")
        .replace(".content", ".value")
}

fn encode_one(
    i: usize,
    r: &Record,
    format: Format,
    template: &Template,
    tok: &TextTokenizer,
    opts: &EncodeOptions,
) -> Outcome {
    let e = match encode_record(&r.body, template, tok, opts.mask) {
        Ok(e) => e,
        Err((field, problem)) => {
            return Outcome::Invalid(RecordError {
                loc: r.loc.clone(),
                field: file_field(format, field),
                problem,
            })
        }
    };
    let mut truncated = false;
    let n = e.ids.len();
    let (mut ids, mut trained) = (e.ids, e.trained);
    if n > opts.max_seq_len {
        match opts.overflow {
            Overflow::Drop => return Outcome::TooLong,
            Overflow::Error => {
                return Outcome::Invalid(RecordError {
                    loc: r.loc.clone(),
                    field: "-".into(),
                    problem: format!(
                        "{n} tokens exceed max_seq_len {} (overflow = error)",
                        opts.max_seq_len
                    ),
                })
            }
            Overflow::Truncate => {
                ids.truncate(opts.max_seq_len);
                trained.truncate(opts.max_seq_len);
                truncated = true;
            }
        }
    }
    let labels: Vec<i32> = ids
        .iter()
        .zip(&trained)
        .map(|(&id, &t)| if t { id as i32 } else { IGNORE_INDEX })
        .collect();
    let s = Sample {
        record: i,
        line: r.loc.line,
        input_ids: ids.iter().map(|&x| x as i32).collect(),
        labels,
        truncated,
    };
    if s.num_trained() == 0 {
        return Outcome::Untrained;
    }
    Outcome::Keep(s)
}

/// Tokenizes every record in parallel. Invalid records (template violations, special-token text,
/// overflow = error) are all collected and returned as one `InvalidRecords` error.
pub fn encode_dataset(
    raw: &RawDataset,
    template: &Template,
    tok: &TextTokenizer,
    opts: &EncodeOptions,
) -> Result<TokenizedDataset> {
    if opts.max_seq_len < 2 {
        return Err(DataError::Option {
            option: "max_seq_len".into(),
            problem: format!("{} is too small (≥ 2)", opts.max_seq_len),
        });
    }
    let outcomes: Vec<Outcome> = raw
        .records
        .par_iter()
        .enumerate()
        .map(|(i, r)| encode_one(i, r, raw.format, template, tok, opts))
        .collect();
    let mut errs = ErrorList::default();
    let mut stats = EncodeStats {
        records: raw.records.len(),
        min_len: usize::MAX,
        ..Default::default()
    };
    let mut samples = Vec::with_capacity(outcomes.len());
    for o in outcomes {
        match o {
            Outcome::Keep(s) => {
                stats.samples += 1;
                stats.tokens += s.len();
                stats.trained_tokens += s.num_trained();
                stats.truncated += s.truncated as usize;
                stats.min_len = stats.min_len.min(s.len());
                stats.max_len = stats.max_len.max(s.len());
                samples.push(s);
            }
            Outcome::TooLong => stats.dropped_too_long += 1,
            Outcome::Untrained => stats.dropped_untrained += 1,
            Outcome::Invalid(e) => errs.push(e),
        }
    }
    errs.into_result(&raw.path.display().to_string())?;
    if samples.is_empty() {
        stats.min_len = 0;
    }
    Ok(TokenizedDataset {
        path: raw.path.clone(),
        samples,
        stats,
        replay: None,
    })
}

/// Location helper for callers that keep only `Sample::line`.
pub fn sample_loc(ds: &TokenizedDataset, i: usize) -> Loc {
    Loc {
        path: ds.sample_path(i).to_path_buf(),
        line: ds.samples[i].line,
        column: None,
    }
}
