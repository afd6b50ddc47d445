//! Run metrics: one JSON line per optimizer step in `metrics.jsonl`, the `summary.json` at the end,
//! and peak memory from the kernel's own accounting.

use std::fs;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: bad metrics record: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// One optimizer step. Non-finite values are written as `null` (JSON has no NaN) and flagged `skipped`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Optimizer steps done, including this one (1-based).
    pub step: u64,
    /// Fractional epoch reached after this step (rows consumed / rows per epoch).
    pub epoch: f64,
    /// Mean CE per trained token over the accumulation window (null when non-finite).
    pub loss: Option<f64>,
    /// Eval loss measured after this step, when an eval ran.
    pub eval_loss: Option<f64>,
    /// Learning rate used for this update.
    pub lr: f64,
    /// Global L2 norm of the gradient before clipping (null when non-finite).
    pub grad_norm: Option<f64>,
    /// Trained tokens in this step's window.
    pub tokens: u64,
    /// Trained tokens per second over this step (forward + backward + update).
    pub tokens_per_s: f64,
    /// Seconds since the run started (continues across resumes).
    pub elapsed_s: f64,
    /// Whether the update was skipped because the loss or gradient norm was non-finite.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// For a skipped step: `file:line` of every sample of the window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bad_samples: Vec<String>,
}

/// Appends records to `metrics.jsonl`, flushing each line (a crash loses at most the step in flight).
pub struct MetricsWriter {
    path: PathBuf,
    file: fs::File,
}

impl MetricsWriter {
    /// Opens for append. When `keep_up_to` is given (a resume), records after that step are dropped
    /// first: they belong to steps the resumed run will redo.
    pub fn open(path: &Path, keep_up_to: Option<u64>) -> Result<Self, MetricsError> {
        let io = |source| MetricsError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(step) = keep_up_to {
            let kept: Vec<StepRecord> =
                read(path)?.into_iter().filter(|r| r.step <= step).collect();
            let mut text = String::new();
            for r in &kept {
                text.push_str(&serde_json::to_string(r).expect("record serializes"));
                text.push('\n');
            }
            fs::write(path, text).map_err(io)?;
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, r: &StepRecord) -> Result<(), MetricsError> {
        let mut line = serde_json::to_string(r).expect("record serializes");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|source| MetricsError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.file.flush().map_err(|source| MetricsError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// Reads `metrics.jsonl` (missing file = no records).
pub fn read(path: &Path) -> Result<Vec<StepRecord>, MetricsError> {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(MetricsError::Io {
                path: path.into(),
                source,
            })
        }
    };
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|source| MetricsError::Io {
            path: path.into(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line).map_err(|e| MetricsError::Parse {
                path: path.into(),
                line: i + 1,
                message: e.to_string(),
            })?,
        );
    }
    Ok(out)
}

/// Why the run stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Completed,
    Interrupted,
    NonFinite,
}

/// `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub stop_reason: StopReason,
    pub steps: u64,
    pub total_steps: u64,
    pub epochs: f64,
    /// Loss of the first and last logged (finite) steps.
    pub first_train_loss: Option<f64>,
    pub final_train_loss: Option<f64>,
    /// Eval loss of the model before training (step 0) and at the end.
    pub initial_eval_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub trained_tokens: u64,
    pub elapsed_s: f64,
    pub tokens_per_s: f64,
    pub skipped_steps: u64,
    /// Peak resident memory of the process (VmHWM), MiB; null where /proc is unavailable.
    pub peak_rss_mib: Option<f64>,
    /// Peak device memory of a GPU run (the backend's high-water mark of the device's used memory,
    /// context and other processes included, as nvidia-smi counts), MiB; null on the CPU.
    #[serde(default)]
    pub peak_gpu_mib: Option<f64>,
    /// The peak `afinar plan` predicts for this config (device memory on a GPU, RSS on the CPU), MiB.
    #[serde(default)]
    pub planned_peak_mib: Option<f64>,
    pub trainable_parameters: u64,
    /// The `[eval]` measures (behaviour rates base/tuned, forgetting, NF4 cost, merge fidelity);
    /// absent when the config has no `[eval]` suite or general text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<crate::suite::EvalSummary>,
}

/// Peak resident set size of this process in bytes, from `/proc/self/status` (VmHWM, in kB).
pub fn peak_rss_bytes() -> Option<u64> {
    let s = fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Exponential moving average with bias correction (what the progress bar shows as "smoothed loss").
#[derive(Clone, Copy, Debug, Default)]
pub struct Ema {
    value: f64,
    weight: f64,
}

impl Ema {
    pub const BETA: f64 = 0.9;
    pub fn push(&mut self, x: f64) {
        if x.is_finite() {
            self.value = Self::BETA * self.value + (1.0 - Self::BETA) * x;
            self.weight = Self::BETA * self.weight + (1.0 - Self::BETA);
        }
    }
    pub fn get(&self) -> Option<f64> {
        (self.weight > 0.0).then(|| self.value / self.weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, loss: Option<f64>) -> StepRecord {
        StepRecord {
            step,
            epoch: step as f64 / 10.0,
            loss,
            eval_loss: None,
            lr: 1e-3,
            grad_norm: Some(0.5),
            tokens: 10,
            tokens_per_s: 100.0,
            elapsed_s: step as f64,
            skipped: loss.is_none(),
            bad_samples: vec![],
        }
    }

    #[test]
    fn write_read_and_truncate_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        let mut w = MetricsWriter::open(&p, None).unwrap();
        for s in 1..=5 {
            w.write(&rec(s, if s == 3 { None } else { Some(2.0 / s as f64) }))
                .unwrap();
        }
        drop(w);
        let all = read(&p).unwrap();
        assert_eq!(all.len(), 5);
        assert_eq!(all[2].loss, None);
        assert!(all[2].skipped && !all[1].skipped);
        let text = fs::read_to_string(&p).unwrap();
        assert!(text.lines().nth(2).unwrap().contains("\"loss\":null"));
        let mut w = MetricsWriter::open(&p, Some(3)).unwrap();
        w.write(&rec(4, Some(0.1))).unwrap();
        let all = read(&p).unwrap();
        assert_eq!(
            all.iter().map(|r| r.step).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(all[3].loss, Some(0.1));
    }

    #[test]
    fn peak_rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            let b = peak_rss_bytes().expect("VmHWM on Linux");
            assert!(b > 1024 * 1024, "{b}");
        }
    }

    #[test]
    fn ema_is_bias_corrected() {
        let mut e = Ema::default();
        assert_eq!(e.get(), None);
        e.push(4.0);
        assert!((e.get().unwrap() - 4.0).abs() < 1e-12);
        e.push(f64::NAN);
        assert!((e.get().unwrap() - 4.0).abs() < 1e-12);
        e.push(2.0);
        assert!(e.get().unwrap() < 4.0 && e.get().unwrap() > 2.0);
    }
}
