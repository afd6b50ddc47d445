//! Typed errors of the data pipeline. Every variant names the file, line, field, key or token at fault.

use std::fmt;
use std::path::PathBuf;

/// Maximum number of record errors kept (and printed) for one dataset; the total count is kept too.
pub const MAX_REPORTED_ERRORS: usize = 20;

/// Where a record lives: the file and the 1-based line where the record starts (and, for JSON
/// syntax errors, the 1-based column).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loc {
    pub path: PathBuf,
    pub line: usize,
    pub column: Option<usize>,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.column {
            Some(c) => write!(f, "{}:{}:{}", self.path.display(), self.line, c),
            None => write!(f, "{}:{}", self.path.display(), self.line),
        }
    }
}

/// One invalid record: where, which field (a JSON path such as `messages[2].role`, or `-` for the
/// record as a whole) and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordError {
    pub loc: Loc,
    pub field: String,
    pub problem: String,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() || self.field == "-" {
            write!(f, "{}: {}", self.loc, self.problem)
        } else {
            write!(f, "{}: field `{}`: {}", self.loc, self.field, self.problem)
        }
    }
}

/// Collects record errors: keeps the first [`MAX_REPORTED_ERRORS`] and counts all of them.
#[derive(Clone, Debug, Default)]
pub struct ErrorList {
    pub errors: Vec<RecordError>,
    pub total: usize,
}

impl ErrorList {
    pub fn push(&mut self, e: RecordError) {
        self.total += 1;
        if self.errors.len() < MAX_REPORTED_ERRORS {
            self.errors.push(e);
        }
    }
    pub fn extend(&mut self, other: ErrorList) {
        let extra = other.total - other.errors.len();
        for e in other.errors {
            self.push(e);
        }
        self.total += extra;
    }
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
    /// `Ok(())` when empty, otherwise the `DataError::InvalidRecords` that lists the errors.
    pub fn into_result(self, what: &str) -> Result<(), DataError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(DataError::InvalidRecords {
                what: what.to_string(),
                errors: self.errors,
                total: self.total,
            })
        }
    }
}

fn list(errors: &[RecordError], total: usize) -> String {
    let mut s = String::new();
    for e in errors {
        s.push_str("\n  ");
        s.push_str(&e.to_string());
    }
    if total > errors.len() {
        s.push_str(&format!("\n  ... and {} more", total - errors.len()));
    }
    s
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// The dataset failed validation; nothing may be trained on or scored with it. The message names
    /// no command: `afinar train`, `eval` and `data inspect` all refuse the file with it.
    #[error("{what}: {total} invalid record(s); the dataset was not used (fix or remove them):{}", list(errors, *total))]
    InvalidRecords {
        what: String,
        errors: Vec<RecordError>,
        total: usize,
    },

    #[error("{path}: cannot detect the dataset format: {reason} (pass the format explicitly: alpaca | messages | sharegpt | text)")]
    UnknownFormat { path: PathBuf, reason: String },

    #[error("{path}: the dataset has no records")]
    EmptyDataset { path: PathBuf },

    /// Every record was valid but dropped by the length handling, so nothing is left.
    #[error(
        "{path}: all {records} record(s) were dropped at max_seq_len = {max_seq_len}: {too_long} longer \
         than that (overflow = drop), {untrained} left with no trained token after truncation; raise \
         max_seq_len or shorten the records"
    )]
    AllDropped {
        path: PathBuf,
        records: usize,
        too_long: usize,
        untrained: usize,
        max_seq_len: usize,
    },

    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("{path}: key `{key}`: {problem}")]
    TokenizerConfig {
        path: PathBuf,
        key: String,
        problem: String,
    },

    #[error(
        "template `{template}` needs `{token}` to be a single token of the tokenizer ({hint})"
    )]
    MissingSpecialToken {
        template: String,
        token: String,
        hint: String,
    },

    #[error("chat template from {source_name}: {message}")]
    ChatTemplate {
        source_name: String,
        message: String,
    },

    #[error("invalid option `{option}`: {problem}")]
    Option { option: String, problem: String },

    #[error("data cursor does not match this dataset: {problem}")]
    CursorMismatch { problem: String },

    #[error("tokenizer training failed: {message}")]
    TokenizerTraining { message: String },
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
    /// The record errors, when this is a validation failure.
    pub fn record_errors(&self) -> Option<&[RecordError]> {
        match self {
            DataError::InvalidRecords { errors, .. } => Some(errors),
            _ => None,
        }
    }
}
