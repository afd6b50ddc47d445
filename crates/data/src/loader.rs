//! Train/eval split, deterministic per-epoch shuffling, batches, and a resumable cursor.
//!
//! Determinism: the order of epoch `e` is a Fisher–Yates permutation driven by ChaCha8 seeded with
//! `seed` on stream `e` (the split uses stream `u64::MAX`). ChaCha8's output is fixed by its
//! specification and the bounded sampling is our own code, so the order depends only on
//! (seed, epoch, number of rows) — not on the `rand` version.
//!
//! Packing: with `packing = true` the samples are packed once (first-fit decreasing, see `pack`)
//! into rows of `max_seq_len`; the rows are shuffled per epoch. Without packing each sample is a
//! row and a batch is padded to its longest row.

use std::borrow::Cow;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::encode::{Sample, TokenizedDataset, IGNORE_INDEX};
use crate::error::{DataError, Result};
use crate::pack::pack_ffd;

/// Uniform integer in [0, n) (n > 0) by rejection: unbiased and version-independent.
fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    let limit = u64::MAX - (u64::MAX % n);
    loop {
        let x = rng.next_u64();
        if x < limit {
            return x % n;
        }
    }
}

/// A permutation of 0..n for (seed, stream).
pub fn permutation(n: usize, seed: u64, stream: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = below(&mut rng, i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// Splits items into (train, eval): `round(n · eval_fraction)` items (at least 1, at most n − 1)
/// chosen by a seeded permutation go to eval; both keep their original order.
pub fn split_by_fraction<T>(
    items: Vec<T>,
    eval_fraction: f64,
    seed: u64,
) -> Result<(Vec<T>, Vec<T>)> {
    if !(eval_fraction > 0.0 && eval_fraction < 1.0) {
        return Err(DataError::Option {
            option: "eval_fraction".into(),
            problem: format!("{eval_fraction} is not in (0, 1)"),
        });
    }
    let n = items.len();
    if n < 2 {
        return Err(DataError::Option {
            option: "eval_fraction".into(),
            problem: format!("cannot split {n} record(s) into train and eval"),
        });
    }
    let k = ((n as f64 * eval_fraction).round() as usize).clamp(1, n - 1);
    let mut is_eval = vec![false; n];
    for &i in &permutation(n, seed, u64::MAX)[..k] {
        is_eval[i] = true;
    }
    let (mut train, mut eval) = (Vec::with_capacity(n - k), Vec::with_capacity(k));
    for (i, it) in items.into_iter().enumerate() {
        if is_eval[i] {
            eval.push(it)
        } else {
            train.push(it)
        }
    }
    Ok((train, eval))
}

/// How batches are formed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoaderConfig {
    /// Rows per batch (B).
    pub batch_size: usize,
    /// Pack samples into rows of max_seq_len (first-fit decreasing).
    #[serde(default)]
    pub packing: bool,
    /// Shuffle rows every epoch (eval loaders: false).
    #[serde(default = "yes")]
    pub shuffle: bool,
    #[serde(default)]
    pub seed: u64,
    /// Drop the last incomplete batch of an epoch.
    #[serde(default)]
    pub drop_last: bool,
}

fn yes() -> bool {
    true
}

/// Where the loader stands: the next batch is batch `position` (0-based) of epoch `epoch`.
/// `fingerprint` identifies the dataset and loader settings; restoring a cursor into a loader
/// with another fingerprint is refused (the order would not be the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoaderCursor {
    pub epoch: u64,
    pub position: u64,
    pub fingerprint: u64,
}

/// One batch, row-major [B, T] in every per-token field.
///
/// LABELS ARE UNSHIFTED (Hugging Face convention): `labels[r·T + j]` is `input_ids[r·T + j]` when
/// that token is a training target, else −100. Call [`Batch::shifted_labels`] for the per-position
/// targets the kernels' `cross_entropy`/`lm_head_ce` take (the prediction at position j is scored
/// against token j + 1 of the same sample).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Rows (B).
    pub b: usize,
    /// Row length (T): `max_seq_len` when packing, else the longest row of the batch.
    pub t: usize,
    /// [B·T] token ids; padding = the tokenizer's pad id.
    pub input_ids: Vec<i32>,
    /// [B·T] unshifted labels; −100 on untrained tokens and padding.
    pub labels: Vec<i32>,
    /// [B·T] positions, restarting at 0 for every sample; 0 on padding.
    pub position_ids: Vec<i32>,
    /// [B·T] segment ids: 0, 1, 2, … for the samples of a row, −1 on padding. Attention must
    /// not cross segments (the kernels' `seg` argument).
    pub segment_ids: Vec<i32>,
    /// Per row, the indices (into the dataset's `samples`) of its samples, in row order.
    pub sample_ids: Vec<Vec<usize>>,
    /// Number of trained targets (entries ≠ −100 of `shifted_labels()`).
    pub num_trained: usize,
}

impl Batch {
    /// [B·T] next-token targets: `target[j] = labels[j + 1]` when j + 1 is in the same row and
    /// the same segment as j, else −100 (the last token of every sample and row, and padding).
    pub fn shifted_labels(&self) -> Vec<i32> {
        shift_labels(&self.labels, &self.segment_ids, self.b, self.t)
    }
}

fn shift_labels(labels: &[i32], seg: &[i32], b: usize, t: usize) -> Vec<i32> {
    let mut out = vec![IGNORE_INDEX; b * t];
    for r in 0..b {
        let base = r * t;
        for j in 0..t.saturating_sub(1) {
            let (i, n) = (base + j, base + j + 1);
            if seg[i] >= 0 && seg[i] == seg[n] {
                out[i] = labels[n];
            }
        }
    }
    out
}

/// FNV-1a, 64-bit (stable across platforms and versions).
struct Fnv(u64);
impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf29ce484222325)
    }
    fn u64(&mut self, x: u64) {
        for b in x.to_le_bytes() {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
}

pub struct DataLoader {
    data: TokenizedDataset,
    rows: Vec<Vec<usize>>,
    cfg: LoaderConfig,
    max_seq_len: usize,
    pad_id: i32,
    epoch: u64,
    position: u64,
    order: Vec<usize>,
    order_epoch: Option<u64>,
    fingerprint: u64,
}

impl DataLoader {
    /// `pad_id`: the tokenizer's pad id (`TextTokenizer::pad_id`).
    pub fn new(
        data: TokenizedDataset,
        max_seq_len: usize,
        pad_id: u32,
        cfg: LoaderConfig,
    ) -> Result<Self> {
        if cfg.batch_size == 0 {
            return Err(DataError::Option {
                option: "batch_size".into(),
                problem: "must be ≥ 1".into(),
            });
        }
        if data.samples.is_empty() {
            return Err(DataError::EmptyDataset {
                path: data.path.clone(),
            });
        }
        if let Some(i) = data.samples.iter().position(|s| s.len() > max_seq_len) {
            return Err(DataError::Option {
                option: "max_seq_len".into(),
                problem: format!(
                    "sample at {}:{} has {} tokens > {max_seq_len}",
                    data.sample_path(i).display(),
                    data.samples[i].line,
                    data.samples[i].len()
                ),
            });
        }
        let rows = if cfg.packing {
            pack_ffd(
                &data.samples.iter().map(Sample::len).collect::<Vec<_>>(),
                max_seq_len,
            )?
        } else {
            (0..data.samples.len()).map(|i| vec![i]).collect()
        };
        if cfg.drop_last && rows.len() < cfg.batch_size {
            return Err(DataError::Option {
                option: "batch_size".into(),
                problem: format!(
                    "{} > the {} rows of {} with drop_last: no batch at all",
                    cfg.batch_size,
                    rows.len(),
                    data.path.display()
                ),
            });
        }
        let mut h = Fnv::new();
        for v in [
            max_seq_len as u64,
            cfg.batch_size as u64,
            cfg.packing as u64,
            cfg.shuffle as u64,
            cfg.seed,
            cfg.drop_last as u64,
        ] {
            h.u64(v);
        }
        h.u64(data.samples.len() as u64);
        for s in &data.samples {
            h.u64(s.len() as u64);
            for (&i, &l) in s.input_ids.iter().zip(&s.labels) {
                h.u64(((i as u32 as u64) << 32) | l as u32 as u64);
            }
        }
        Ok(DataLoader {
            data,
            rows,
            cfg,
            max_seq_len,
            pad_id: pad_id as i32,
            epoch: 0,
            position: 0,
            order: Vec::new(),
            order_epoch: None,
            fingerprint: h.0,
        })
    }

    /// The same dataset and settings with another batch size (a new loader at the start: its own
    /// fingerprint, cursor at epoch 0). The trainer uses it to read a cursor saved under another
    /// number of data-parallel ranks, whose global batch had another size.
    pub fn with_batch_size(&self, batch_size: usize) -> Result<DataLoader> {
        let cfg = LoaderConfig {
            batch_size,
            ..self.cfg.clone()
        };
        DataLoader::new(self.data.clone(), self.max_seq_len, self.pad_id as u32, cfg)
    }

    pub fn dataset(&self) -> &TokenizedDataset {
        &self.data
    }
    /// Rows (packed rows, or samples when not packing).
    pub fn rows(&self) -> &[Vec<usize>] {
        &self.rows
    }
    pub fn batches_per_epoch(&self) -> u64 {
        let (n, b) = (self.rows.len() as u64, self.cfg.batch_size as u64);
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }
    /// Trained targets in one epoch (for loss normalization planning).
    pub fn trained_tokens(&self) -> usize {
        self.data.stats.trained_tokens
    }
    pub fn cursor(&self) -> LoaderCursor {
        LoaderCursor {
            epoch: self.epoch,
            position: self.position,
            fingerprint: self.fingerprint,
        }
    }
    /// Continues exactly where `c` was taken.
    pub fn restore(&mut self, c: &LoaderCursor) -> Result<()> {
        if c.fingerprint != self.fingerprint {
            return Err(DataError::CursorMismatch {
                problem: format!(
                    "fingerprint {:016x} (saved) vs {:016x} (now): the dataset, tokenizer, template or loader settings changed",
                    c.fingerprint, self.fingerprint
                ),
            });
        }
        if c.position > self.batches_per_epoch() {
            return Err(DataError::CursorMismatch {
                problem: format!(
                    "position {} > {} batches per epoch",
                    c.position,
                    self.batches_per_epoch()
                ),
            });
        }
        if c.epoch == u64::MAX {
            // next_batch would overflow when this epoch ends.
            return Err(DataError::CursorMismatch {
                problem: format!("epoch {} is out of range", c.epoch),
            });
        }
        self.epoch = c.epoch;
        self.position = c.position;
        Ok(())
    }

    fn order_for(&self, epoch: u64) -> Cow<'_, [usize]> {
        if self.order_epoch == Some(epoch) {
            Cow::Borrowed(&self.order)
        } else if self.cfg.shuffle {
            Cow::Owned(permutation(self.rows.len(), self.cfg.seed, epoch))
        } else {
            Cow::Owned((0..self.rows.len()).collect())
        }
    }

    /// The next batch; rolls over into the next epoch after the last batch of one.
    pub fn next_batch(&mut self) -> Batch {
        if self.position >= self.batches_per_epoch() {
            self.epoch += 1;
            self.position = 0;
        }
        if self.order_epoch != Some(self.epoch) {
            self.order = self.order_for(self.epoch).into_owned();
            self.order_epoch = Some(self.epoch);
        }
        let b = self.build(&self.order, self.position);
        self.position += 1;
        b
    }

    /// Every batch of `epoch`, without moving the cursor (evaluation).
    pub fn epoch_batches(&self, epoch: u64) -> impl Iterator<Item = Batch> + '_ {
        let order = self.order_for(epoch).into_owned();
        (0..self.batches_per_epoch()).map(move |k| self.build(&order, k))
    }

    /// Batch `k` of an epoch whose row order is `order`.
    fn build(&self, order: &[usize], k: u64) -> Batch {
        let bs = self.cfg.batch_size;
        let start = (k as usize) * bs;
        let rows: Vec<&Vec<usize>> = order[start..(start + bs).min(order.len())]
            .iter()
            .map(|&r| &self.rows[r])
            .collect();
        let row_len = |r: &Vec<usize>| r.iter().map(|&s| self.data.samples[s].len()).sum::<usize>();
        let t = if self.cfg.packing {
            self.max_seq_len
        } else {
            rows.iter().map(|r| row_len(r)).max().unwrap_or(0)
        };
        let b = rows.len();
        let mut batch = Batch {
            b,
            t,
            input_ids: vec![self.pad_id; b * t],
            labels: vec![IGNORE_INDEX; b * t],
            position_ids: vec![0; b * t],
            segment_ids: vec![-1; b * t],
            sample_ids: Vec::with_capacity(b),
            num_trained: 0,
        };
        for (r, row) in rows.iter().enumerate() {
            let mut j = r * t;
            for (seg, &si) in row.iter().enumerate() {
                let s = &self.data.samples[si];
                let n = s.len();
                batch.input_ids[j..j + n].copy_from_slice(&s.input_ids);
                batch.labels[j..j + n].copy_from_slice(&s.labels);
                for (p, x) in batch.position_ids[j..j + n].iter_mut().enumerate() {
                    *x = p as i32;
                }
                batch.segment_ids[j..j + n].fill(seg as i32);
                batch.num_trained += s.num_trained();
                j += n;
            }
            batch.sample_ids.push(row.to_vec());
        }
        batch
    }
}
