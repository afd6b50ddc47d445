//! Evaluation: the mean eval loss, and when a run takes it: before training (the base loss, kept in
//! initial_eval.json for resumed runs), every `train.eval_every` steps, and after a completed run
//! (attached to the last step's record in metrics.jsonl).

use std::fs;
use std::path::Path;

use afinar_data::DataLoader;
use afinar_gemma::Gemma2Model;
use afinar_kernels::Backend;

use super::setup::Prepared;
use super::steps::{model_batch, Run};
use super::{io, Result};
use crate::checkpoint::TrainerState;
use crate::config::TrainSection;
use crate::metrics::{self, StopReason};

/// Mean eval loss (Σ CE / scored tokens over the whole eval set) and the token count.
pub fn evaluate<B: Backend>(model: &Gemma2Model<B>, loader: &DataLoader) -> Result<(f64, usize)> {
    let (mut sum, mut count) = (0.0f64, 0usize);
    for b in loader.epoch_batches(0) {
        if b.num_trained == 0 {
            continue;
        }
        let (s, n) = model.loss(&model_batch(&b, 0))?;
        sum += s;
        count += n;
    }
    Ok((
        if count > 0 {
            sum / count as f64
        } else {
            f64::NAN
        },
        count,
    ))
}

/// [`evaluate`] of the dense model in `dir` (a default load) without loading it: the same batches,
/// scored by `Gemma2Model::streamed_base_loss`, which reads the checkpoint one decoder layer at a
/// time (the NF4 cost's dense side; the same Σ and count, summed in the same order).
pub fn evaluate_dense_streamed<B: Backend>(
    backend: std::sync::Arc<B>,
    dir: &Path,
    loader: &DataLoader,
) -> Result<(f64, usize)> {
    let batches: Vec<afinar_gemma::Batch> = loader
        .epoch_batches(0)
        .filter(|b| b.num_trained > 0)
        .map(|b| model_batch(&b, 0))
        .collect();
    let (mut sum, mut count) = (0.0f64, 0usize);
    for (s, n) in Gemma2Model::streamed_base_loss(backend, dir, &batches)? {
        sum += s;
        count += n;
    }
    Ok((
        if count > 0 {
            sum / count as f64
        } else {
            f64::NAN
        },
        count,
    ))
}

/// The eval loss before training: measured on a fresh run, read back from initial_eval.json on a
/// resumed one (which rewrites the file either way).
pub(super) fn initial<B: Backend>(
    model: &Gemma2Model<B>,
    eval: Option<&DataLoader>,
    resuming: bool,
    run_dir: &Path,
    say: &dyn Fn(&str),
) -> Result<Option<f64>> {
    let initial_eval = match (eval, resuming) {
        (Some(ev), false) => {
            let (l, n) = evaluate(model, ev)?;
            say(&format!(
                "eval before training: loss {l:.4} over {n} tokens"
            ));
            Some(l)
        }
        _ => read_initial_eval(run_dir),
    };
    if let Some(l) = initial_eval {
        let _ = fs::write(
            run_dir.join("initial_eval.json"),
            serde_json::json!({ "eval_loss": l }).to_string(),
        );
    }
    Ok(initial_eval)
}

/// The eval of `train.eval_every`, after the step `state` has just counted (not at the last step:
/// that one is [`after_training`]'s).
pub(super) fn scheduled<B: Backend>(
    model: &Gemma2Model<B>,
    eval: Option<&DataLoader>,
    state: &mut TrainerState,
    t: &TrainSection,
    say: &dyn Fn(&str),
) -> Result<Option<f64>> {
    let Some(ev) = eval else {
        return Ok(None);
    };
    if t.eval_every > 0 && state.step.is_multiple_of(t.eval_every) && state.step < state.total_steps
    {
        let (l, _) = evaluate(model, ev)?;
        say(&format!("step {}: eval loss {l:.4}", state.step));
        state.last_eval_loss = Some(l);
        return Ok(Some(l));
    }
    Ok(None)
}

/// The final eval loss: measured when the run completed (an interrupted run evaluates when it
/// finishes), else the last one taken.
pub(super) fn after_training<B: Backend>(
    run: &mut Run<'_, B>,
    data: &Prepared,
    stop: StopReason,
    metrics_path: &Path,
    say: &dyn Fn(&str),
) -> Result<Option<f64>> {
    let mut final_eval = run.state.last_eval_loss;
    if stop == StopReason::Completed {
        if let Some(ev) = &data.eval {
            let (l, n) = evaluate(&run.model, ev)?;
            say(&format!("eval after training: loss {l:.4} over {n} tokens"));
            final_eval = Some(l);
            run.state.last_eval_loss = Some(l);
            rewrite_last_eval(metrics_path, run.state.step, l)?;
        }
    }
    Ok(final_eval)
}

fn read_initial_eval(run_dir: &Path) -> Option<f64> {
    let s = fs::read_to_string(run_dir.join("initial_eval.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&s)
        .ok()?
        .get("eval_loss")?
        .as_f64()
}

/// Attaches `eval` to the record of `step` in metrics.jsonl.
fn rewrite_last_eval(path: &Path, step: u64, eval: f64) -> Result<()> {
    let mut recs = metrics::read(path)?;
    if let Some(r) = recs.iter_mut().rev().find(|r| r.step == step) {
        r.eval_loss = Some(eval);
    }
    let mut text = String::new();
    for r in &recs {
        text.push_str(&serde_json::to_string(r).expect("record serializes"));
        text.push('\n');
    }
    fs::write(path, text).map_err(io(path))
}
