//! The step loop: a window of micro-batches, its accumulated gradient, the verdict of the loss scale,
//! clipping and AdamW, then the bookkeeping of the step (metrics record, progress, scheduled eval and
//! checkpoint). See the module docs of `train` for the numbered steps.

use std::path::Path;
use std::time::Instant;

use afinar_data::DataLoader;
use afinar_gemma::{Gemma2Model, Grads};
use afinar_kernels::profile::{self, Role};
use afinar_kernels::Backend;
use rand::RngCore;
use rand_chacha::ChaCha8Rng;

use super::optimizer::Optimizer;
use super::scaling::{GradScaling, Verdict};
use super::setup::Prepared;
use super::{eval, Faults, Result};
use crate::checkpoint::{Cursor, RngState, TrainerState};
use crate::config::Config;
use crate::dist::Collective;
use crate::loss_scale::{ScaleUpdate, GROWTH_INTERVAL};
use crate::metrics::{Ema, MetricsWriter, StepRecord, StopReason};
use crate::progress::Progress;
use crate::schedule::Schedule;
use crate::signal;

/// Consecutive non-finite steps after which the run stops.
pub const MAX_NONFINITE_IN_ROW: u32 = 5;

/// Converts a loader batch into the model's (shifted targets, per-sample positions, segments).
pub fn model_batch(b: &afinar_data::Batch, dropout_seed: u64) -> afinar_gemma::Batch {
    afinar_gemma::Batch {
        b: b.b,
        t: b.t,
        input_ids: b.input_ids.clone(),
        positions: b.position_ids.clone(),
        segment_ids: Some(b.segment_ids.clone()),
        targets: b.shifted_labels(),
        dropout_seed,
        dropout_row_offset: 0,
    }
}

/// [`accumulate_scaled`] with loss scale 1.
pub fn accumulate<B: Backend>(
    model: &Gemma2Model<B>,
    grads: &mut Grads<B>,
    window: &[afinar_data::Batch],
    rng: &mut ChaCha8Rng,
) -> Result<(f64, usize)> {
    accumulate_scaled(model, grads, window, rng, 1.0)
}

/// Zeroes `grads`, then accumulates the gradient of (Σ CE over the window) / (trained targets of the
/// whole window) over the micro-batches of `window`. Returns (Σ CE, count). One dropout seed is drawn
/// from `rng` per micro-batch (also for a batch with nothing to train, so the RNG stream does not depend
/// on the data). `loss_scale` multiplies the gradients (not the returned loss): grad_scale =
/// loss_scale / count; with a power-of-two scale, S/count is exactly S·(1/count) in f32.
pub fn accumulate_scaled<B: Backend>(
    model: &Gemma2Model<B>,
    grads: &mut Grads<B>,
    window: &[afinar_data::Batch],
    rng: &mut ChaCha8Rng,
    loss_scale: f32,
) -> Result<(f64, usize)> {
    let count: usize = window.iter().map(|b| b.num_trained).sum();
    {
        let _label = profile::role(Role::Grads);
        grads.zero()?;
    }
    let mut loss_sum = 0.0f64;
    for b in window {
        let seed = rng.next_u64();
        if b.num_trained == 0 {
            continue;
        }
        let (s, _) = model.forward_backward(
            &model_batch(b, seed),
            loss_scale / count.max(1) as f32,
            grads,
        )?;
        loss_sum += s;
    }
    Ok((loss_sum, count))
}

/// A run between setup and report: the model and everything one step changes.
pub(super) struct Run<'a, B: Backend> {
    pub cfg: &'a Config,
    pub model: Gemma2Model<B>,
    pub grads: Grads<B>,
    pub opt: Optimizer<B>,
    pub scaling: GradScaling,
    /// Counters, cursor and RNG as the next checkpoint records them.
    pub state: TrainerState,
    /// The dropout RNG (one seed per micro-batch).
    pub rng: ChaCha8Rng,
    /// The `[eval]` measures (None without an `[eval]` suite or general text).
    pub plan: Option<super::suite_eval::Plan>,
    /// The group of data-parallel ranks (`dist::Single` for one process). Ranks other than 0 write
    /// nothing: no metrics, checkpoints, evals or report.
    pub comm: &'a dyn Collective<B>,
}

/// What one step computed.
struct StepResult {
    loss: f64,
    grad_norm: f64,
    lr: f64,
    /// Trained targets of the window.
    count: usize,
    /// The update was applied.
    applied: bool,
    /// `path:line` of every sample of a non-finite window.
    bad_samples: Vec<String>,
}

impl<B: Backend> Run<'_, B> {
    /// Runs steps until the planned total, an interrupt (Ctrl-C, or `stop_after` steps of this
    /// process) or [`MAX_NONFINITE_IN_ROW`] non-finite steps in a row. Every step appends a record to
    /// metrics.jsonl; evals and checkpoints follow `train.eval_every` / `train.save_every` (the final
    /// ones are the caller's). `metrics` is None on ranks other than 0.
    pub fn steps(
        &mut self,
        data: &mut Prepared,
        run_dir: &Path,
        mut metrics: Option<&mut MetricsWriter>,
        progress: &Progress,
        stop_after: Option<u64>,
        faults: &Faults,
    ) -> Result<StopReason> {
        let cfg = self.cfg;
        let t = &cfg.train;
        let say = |m: &str| progress.println(m);
        let sched = Schedule {
            kind: t.schedule,
            base_lr: t.lr,
            warmup: self.state.warmup_steps,
            total: self.state.total_steps,
        };
        let rows_per_epoch = data.train.rows().len().max(1) as f64;
        let start = Instant::now();
        let elapsed_before = self.state.elapsed_s;
        let mut ema = Ema::default();
        let mut steps_this_process = 0u64;
        // Each optimizer step is one profiler step (when the backend is a profiled one).
        let backend = self.model.backend().clone();

        while self.state.step < self.state.total_steps {
            let mut stop =
                signal::requested() || stop_after.is_some_and(|n| steps_this_process >= n);
            if self.comm.exchanges() {
                // Every rank stops at the same step: an interrupt seen by any rank stops them all.
                let mut any = [stop as u64 as f64];
                self.comm.all_reduce_f64(&mut any)?;
                stop = any[0] > 0.0;
            }
            if stop {
                return Ok(StopReason::Interrupted);
            }
            let step_start = Instant::now();
            if let Some(p) = backend.profiler() {
                p.begin_step()?;
            }
            let r = self.step(&mut data.train, &sched, faults, &say)?;
            if let Some(p) = backend.profiler() {
                p.end_step()?;
            }
            if r.applied {
                ema.push(r.loss);
            }
            let state = &mut self.state;
            state.loss_scale = self.scaling.state();
            state.step += 1;
            state.tokens += r.count as u64;
            steps_this_process += 1;
            let c = data.train.cursor();
            state.cursor = Cursor {
                epoch: c.epoch,
                position: c.position,
                fingerprint: c.fingerprint,
            };
            state.rng = RngState::capture(&self.rng);
            let dt = step_start.elapsed().as_secs_f64();
            let elapsed = elapsed_before + start.elapsed().as_secs_f64();
            state.elapsed_s = elapsed;

            // Eval on schedule (the final eval runs after the loop).
            let eval_loss = eval::scheduled(&self.model, data.eval.as_ref(), state, t, &say)?;
            if let Some(p) = self.plan.as_mut() {
                p.scheduled(&self.model, state.step, state.total_steps, &say)?;
            }
            let epoch = (c.epoch as f64
                + (c.position as f64 * (t.micro_batch_size * self.comm.world_size()) as f64)
                    .min(rows_per_epoch)
                    / rows_per_epoch)
                .max(0.0);
            let rec = StepRecord {
                step: state.step,
                epoch,
                loss: r.loss.is_finite().then_some(r.loss),
                eval_loss,
                lr: r.lr,
                grad_norm: r.grad_norm.is_finite().then_some(r.grad_norm),
                tokens: r.count as u64,
                tokens_per_s: r.count as f64 / dt.max(1e-9),
                elapsed_s: elapsed,
                skipped: !(r.loss.is_finite() && r.grad_norm.is_finite()),
                bad_samples: r.bad_samples,
            };
            if let Some(m) = metrics.as_deref_mut() {
                m.write(&rec)?;
            }
            let eta = (state.total_steps - state.step) as f64 * (elapsed - elapsed_before)
                / steps_this_process as f64;
            let mem = super::memory::progress_note(self.model.backend().device_memory());
            progress.step(state.step, ema.get(), r.lr, rec.tokens_per_s, eta, &mem);

            if state.nonfinite_in_row >= MAX_NONFINITE_IN_ROW {
                return Ok(StopReason::NonFinite);
            }
            if t.save_every > 0
                && self.comm.rank() == 0
                && state.step.is_multiple_of(t.save_every)
                && state.step < state.total_steps
            {
                self.opt
                    .save_checkpoint(&self.model, &self.state, cfg, run_dir)?;
            }
        }
        Ok(StopReason::Completed)
    }

    /// One optimizer step on the next window of the training loader (the counters are the caller's).
    fn step(
        &mut self,
        train: &mut DataLoader,
        sched: &Schedule,
        faults: &Faults,
        say: &dyn Fn(&str),
    ) -> Result<StepResult> {
        let t = &self.cfg.train;
        let step = self.state.step;
        // 1. The window, counted before any backward.
        let window: Vec<afinar_data::Batch> =
            (0..t.grad_accum).map(|_| train.next_batch()).collect();
        // 2. Accumulate grad of (Σ CE)/count, at the loss scale; unscaled before the norm.
        let ls = self.scaling.scale();
        let (loss_sum, count) = if self.comm.exchanges() {
            super::dist_hooks::accumulate_sharded(
                &self.model,
                &mut self.grads,
                &window,
                &mut self.rng,
                ls,
                t.micro_batch_size,
                self.comm,
            )?
        } else {
            accumulate_scaled(&self.model, &mut self.grads, &window, &mut self.rng, ls)?
        };
        let grads_label = profile::role(Role::Grads);
        if faults.grad_overflow_at_steps.contains(&(step + 1)) {
            self.grads.scale(f32::INFINITY)?;
        }
        self.scaling.unscale(&mut self.grads, ls)?;
        let loss = if count > 0 {
            loss_sum / count as f64
        } else {
            f64::NAN
        };
        let grad_norm = self.grads.sum_squares()?.sqrt();
        drop(grads_label);
        let lr = sched.lr(step);
        let mut bad_samples = Vec::new();
        let verdict = self.scaling.judge(loss, grad_norm);
        match verdict {
            Verdict::Overflow { to } => {
                say(&format!(
                    "step {}: gradient overflow at loss scale {ls}; update skipped, loss scale now {to}",
                    step + 1
                ));
            }
            Verdict::Update { scale } => {
                if let Some(ScaleUpdate::Grew { from, to }) = scale {
                    say(&format!(
                        "step {}: {GROWTH_INTERVAL} finite steps in a row; loss scale {from} → {to}",
                        step + 1,
                    ));
                }
                self.state.nonfinite_in_row = 0;
                // 3. Clip and update.
                {
                    let _label = profile::role(Role::Grads);
                    self.scaling.clip(&mut self.grads, grad_norm)?;
                }
                self.state.adam_t += 1;
                let _label = profile::role(Role::Optimizer);
                self.opt
                    .step(&mut self.model, &self.grads, t, lr, self.state.adam_t)?;
            }
            Verdict::NonFinite => {
                self.state.nonfinite_in_row += 1;
                let ds = train.dataset();
                for b in &window {
                    for row in &b.sample_ids {
                        for &si in row {
                            bad_samples.push(format!(
                                "{}:{}",
                                ds.sample_path(si).display(),
                                ds.samples[si].line
                            ));
                        }
                    }
                }
                say(&format!(
                    "step {}: non-finite loss {loss} or grad norm {grad_norm}; update skipped ({} in a row). Samples: {}",
                    step + 1,
                    self.state.nonfinite_in_row,
                    bad_samples.join(", ")
                ));
            }
        }
        Ok(StepResult {
            loss,
            grad_norm,
            lr,
            count,
            applied: matches!(verdict, Verdict::Update { .. }),
            bad_samples,
        })
    }
}
