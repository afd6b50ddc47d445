//! Resuming a checkpoint: its config must match the run's in every resume-relevant key; its counters
//! must be ones the loop could have written; then the trainable tensors, AdamW moments, data cursor,
//! counters and loss scale are restored. A run whose length changed (train.max_steps / train.epochs)
//! gets its schedule recomputed for the new total.

use std::path::{Path, PathBuf};

use afinar_kernels::Backend;

use super::setup::Prepared;
use super::steps::Run;
use super::{Result, TrainError};
use crate::checkpoint::{self, Checkpoint};
use crate::config::Config;
use crate::schedule::Schedule;

/// A loaded checkpoint whose config has been checked against the run's.
pub(super) struct ResumePoint {
    path: PathBuf,
    ck: Checkpoint,
    /// The resumed run asks for a different train.max_steps / train.epochs than the checkpoint's
    /// (extending or shortening it), so its planned total may differ from the saved one.
    length_changed: bool,
}

impl ResumePoint {
    /// Loads the checkpoint in `path` and refuses it when its config differs from `cfg` in a key that
    /// changes the numbers.
    pub fn load(path: &Path, cfg: &Config) -> Result<Self> {
        let ck = checkpoint::load(path)?;
        let saved = Config::from_toml_str(
            &ck.config_toml,
            &path.join("config.toml").display().to_string(),
            &[],
        )?;
        let length_changed = saved.train.max_steps != cfg.train.max_steps
            || saved.train.epochs.to_bits() != cfg.train.epochs.to_bits();
        let diff = saved.resume_diff(cfg);
        if !diff.is_empty() {
            let lines: Vec<String> = diff
                .iter()
                .map(|(k, a, b)| format!("  {k}: {a} → {b}"))
                .collect();
            return Err(TrainError::ConfigMismatch {
                path: path.to_path_buf(),
                diff: lines.join("\n"),
            });
        }
        Ok(ResumePoint {
            path: path.to_path_buf(),
            ck,
            length_changed,
        })
    }

    /// The optimizer step the checkpoint was taken at.
    pub fn step(&self) -> u64 {
        self.ck.state.step
    }

    fn bad(&self, message: String) -> TrainError {
        TrainError::BadCheckpoint {
            path: self.path.clone(),
            message,
        }
    }

    /// Puts the checkpoint into a freshly built run (`run.state` is the fresh plan for the current
    /// data) and the training loader. Returns the notes to print: a recomputed schedule, a loss scale
    /// that restarts.
    pub fn restore<B: Backend>(
        &self,
        run: &mut Run<'_, B>,
        data: &mut Prepared,
    ) -> Result<Vec<String>> {
        let cfg = run.cfg;
        let ck = &self.ck;
        let world = run.comm.world_size() as u64;
        let saved_world = ck.state.world_size.max(1);
        let world_changed = saved_world != world;
        if world_changed && !self.length_changed {
            // The planned total was counted in the checkpoint's global batches: it stays the plan.
            data.total_steps = ck.state.total_steps;
            data.warmup_steps = ck.state.warmup_steps;
        }
        let plan_changed =
            ck.state.total_steps != data.total_steps || ck.state.warmup_steps != data.warmup_steps;
        if plan_changed && self.length_changed {
            // Extending (or shortening) a run: the schedule is rebuilt for the new total, as
            // transformers' Trainer does when resumed with a larger max_steps; the steps already taken
            // keep the learning rates they had.
            let key = if cfg.train.max_steps > 0 {
                "train.max_steps"
            } else {
                "train.epochs"
            };
            if data.total_steps < ck.state.step {
                return Err(TrainError::Invalid {
                    key: key.into(),
                    reason: format!(
                        "the new plan has {} steps but the checkpoint is already at step {}",
                        data.total_steps, ck.state.step
                    ),
                });
            }
        } else if plan_changed {
            return Err(self.bad(format!(
                "it plans {} steps with {} warmup, the data now gives {} with {}: the dataset changed",
                ck.state.total_steps, ck.state.warmup_steps, data.total_steps, data.warmup_steps
            )));
        }
        // The cursor counts the checkpoint's global batches (world_size · micro_batch_size rows).
        let mut saved_loader = if world_changed {
            Some(
                data.train
                    .with_batch_size(saved_world as usize * cfg.train.micro_batch_size)?,
            )
        } else {
            None
        };
        let per_epoch = saved_loader
            .as_ref()
            .unwrap_or(&data.train)
            .batches_per_epoch();
        self.check_counters(cfg, per_epoch)?;
        let names = run.opt.names.clone();
        if ck.tensors.len() != names.len() {
            return Err(self.bad(format!(
                "{} trainable tensors saved, the model has {}",
                ck.tensors.len(),
                names.len()
            )));
        }
        for (i, name) in names.iter().enumerate() {
            let t = ck
                .tensors
                .get(name)
                .ok_or_else(|| self.bad(format!("tensor `{name}` missing")))?;
            if t.shape != run.opt.shapes[i] {
                return Err(self.bad(format!(
                    "tensor `{name}`: shape {:?}, the model has {:?}",
                    t.shape, run.opt.shapes[i]
                )));
            }
            run.model.set_tensor(name, &t.param)?;
            run.opt.restore_moments(&run.model, i, t)?;
        }
        let saved_cursor = afinar_data::LoaderCursor {
            epoch: ck.state.cursor.epoch,
            position: ck.state.cursor.position,
            fingerprint: ck.state.cursor.fingerprint,
        };
        let mut world_note = None;
        let cursor = match saved_loader.as_mut() {
            None => {
                data.train.restore(&saved_cursor)?;
                None
            }
            Some(old) => {
                // Checks the saved cursor against the data under the old batch size.
                old.restore(&saved_cursor)?;
                let (c, note) = rebase_cursor(&saved_cursor, saved_world, world, cfg, &data.train);
                data.train.restore(&c)?;
                world_note = Some(note);
                Some(c)
            }
        };
        let hash = run.state.config_hash.clone();
        run.state = ck.state.clone();
        run.state.config_hash = hash;
        run.state.world_size = world;
        if let Some(c) = cursor {
            run.state.cursor = checkpoint::Cursor {
                epoch: c.epoch,
                position: c.position,
                fingerprint: c.fingerprint,
            };
            run.state.cursor_origin = Some(checkpoint::CursorOrigin {
                step: ck.state.step,
                epoch: c.epoch,
                position: c.position,
            });
        }
        let scaler_note = run
            .scaling
            .restore(ck.state.loss_scale)
            .map_err(|e| self.bad(e.to_string()))?;
        let mut plan_note = None;
        if plan_changed {
            let at = |total: u64, warmup: u64| {
                Schedule {
                    kind: cfg.train.schedule,
                    base_lr: cfg.train.lr,
                    warmup,
                    total,
                }
                .lr(run.state.step)
            };
            plan_note = Some(format!(
                "resume: the run now plans {} steps ({} warmup) instead of {} ({} warmup); the schedule is \
                 recomputed: lr at step {} is {:.3e} (it was {:.3e} under the old plan)",
                data.total_steps,
                data.warmup_steps,
                ck.state.total_steps,
                ck.state.warmup_steps,
                run.state.step + 1,
                at(data.total_steps, data.warmup_steps),
                at(ck.state.total_steps, ck.state.warmup_steps),
            ));
            run.state.total_steps = data.total_steps;
            run.state.warmup_steps = data.warmup_steps;
        }
        Ok([world_note, plan_note, scaler_note]
            .into_iter()
            .flatten()
            .collect())
    }

    /// The saved counters must be ones this loop could have written: step ≤ total, AdamW's t ≤ step
    /// (skipped steps do not count), and the data cursor exactly step·grad_accum batches in (the
    /// cursor rolls over lazily, so a finished epoch reads as position = batches per epoch).
    /// `per_epoch`: global batches per epoch under the checkpoint's number of ranks. A run that
    /// changed its number of ranks counts from its `cursor_origin`.
    fn check_counters(&self, cfg: &Config, per_epoch: u64) -> Result<()> {
        let st = &self.ck.state;
        if st.step > st.total_steps {
            return Err(self.bad(format!(
                "step {} is beyond its {} planned steps",
                st.step, st.total_steps
            )));
        }
        if st.adam_t > st.step {
            return Err(self.bad(format!("adam_t {} exceeds step {}", st.adam_t, st.step)));
        }
        let o = st.cursor_origin.unwrap_or(checkpoint::CursorOrigin {
            step: 0,
            epoch: 0,
            position: 0,
        });
        let at = |epoch: u64, position: u64| {
            epoch
                .checked_mul(per_epoch)
                .and_then(|x| x.checked_add(position))
        };
        let consumed = st
            .step
            .checked_sub(o.step)
            .and_then(|s| s.checked_mul(cfg.train.grad_accum as u64));
        let moved = at(st.cursor.epoch, st.cursor.position)
            .zip(at(o.epoch, o.position))
            .and_then(|(a, b)| a.checked_sub(b));
        if consumed.is_none() || consumed != moved || (st.step > o.step && st.cursor.position == 0)
        {
            return Err(self.bad(format!(
                "data cursor (epoch {}, position {}) does not match step {} × grad_accum {} with {per_epoch} batches per epoch",
                st.cursor.epoch, st.cursor.position, st.step, cfg.train.grad_accum
            )));
        }
        Ok(())
    }
}

/// The cursor of `saved` (under `from` ranks) in the loader of `to` ranks: the same epoch, at the
/// first global batch that starts at or before the rows already trained (rows are in the same
/// per-epoch order for any batch size), so up to one new global batch minus one row is trained
/// again. Returns it with the warning to print.
fn rebase_cursor(
    saved: &afinar_data::LoaderCursor,
    from: u64,
    to: u64,
    cfg: &Config,
    train: &afinar_data::DataLoader,
) -> (afinar_data::LoaderCursor, String) {
    let b = cfg.train.micro_batch_size as u64;
    let (old_bs, new_bs) = (from * b, to * b);
    let n_rows = train.rows().len() as u64;
    let rows = saved.position.saturating_mul(old_bs).min(n_rows);
    let position = if rows >= n_rows {
        train.batches_per_epoch()
    } else {
        rows / new_bs
    };
    let again = rows.saturating_sub(position * new_bs);
    let note = format!(
        "warning: the checkpoint was written by {from} data-parallel rank(s), this run has {to}: the global \
         micro-batch changes from {old_bs} to {new_bs} rows. Training continues at the same step with the \
         checkpoint's plan, in epoch {} at row {} ({again} row(s) of this epoch are trained again); the \
         result is no longer the one an uninterrupted run on either number of ranks gives",
        saved.epoch,
        position * new_bs
    );
    (
        afinar_data::LoaderCursor {
            epoch: saved.epoch,
            position,
            fingerprint: train.cursor().fingerprint,
        },
        note,
    )
}
