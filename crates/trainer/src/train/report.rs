//! The run's outputs after its last checkpoint: the adapter (or the full model), the loss curves,
//! summary.json and report.md.

use std::fs;
use std::path::Path;

use afinar_gemma::Gemma2Model;
use afinar_kernels::Backend;

use super::{io, Result};
use crate::checkpoint::TrainerState;
use crate::config::Config;
use crate::metrics::{self, StepRecord, StopReason, Summary};
use crate::plot;
use crate::suite::{evaluation_md, BehaviourPoint, Evaluation};

/// The evaluations a run reports: the eval loss before and after training, and the `[eval]` measures
/// with the behaviour points of the plot.
pub(super) struct Evals<'a> {
    pub initial: Option<f64>,
    pub last: Option<f64>,
    pub evaluation: Option<&'a (Evaluation, Vec<BehaviourPoint>)>,
}

/// Writes the adapter (LoRA) or the full model (`model.full_finetune`), loss.svg/png, summary.json
/// and report.md (plus behaviour.svg/png and the evaluation section when `[eval]` measured something)
/// into `run_dir`. Returns the summary and every record of metrics.jsonl.
pub(super) fn write<B: Backend>(
    model: &Gemma2Model<B>,
    cfg: &Config,
    state: &TrainerState,
    stop: StopReason,
    evals: Evals<'_>,
    run_dir: &Path,
    metrics_path: &Path,
) -> Result<(Summary, Vec<StepRecord>)> {
    let (initial_eval, final_eval, evaluation) = (evals.initial, evals.last, evals.evaluation);
    let base_name = cfg.model.path.display().to_string();
    if model.lora.is_some() {
        afinar_gemma::peft::save_adapter(model, run_dir.join("adapter"), Some(&base_name))?;
    }
    if cfg.model.full_finetune {
        save_full_model(model, &cfg.model.path, &run_dir.join("model"))?;
    }
    let records = metrics::read(metrics_path)?;
    plot::plot_losses(
        &records,
        initial_eval,
        &format!("afinar: {}", cfg.output.run_name),
        &run_dir.join("loss.svg"),
        &run_dir.join("loss.png"),
    )?;
    let has_behaviour = match evaluation {
        Some((_, points)) if !points.is_empty() => {
            plot::plot_behaviour(
                points,
                &format!("afinar: {} — behaviour suite", cfg.output.run_name),
                &run_dir.join("behaviour.svg"),
                &run_dir.join("behaviour.png"),
            )?;
            true
        }
        _ => false,
    };
    let finite: Vec<f64> = records.iter().filter_map(|r| r.loss).collect();
    let mem = super::memory::summary_fields(&**model.backend(), cfg, &model.config);
    let total_tokens: u64 = records.iter().map(|r| r.tokens).sum();
    let elapsed = state.elapsed_s;
    let summary = Summary {
        stop_reason: stop,
        steps: state.step,
        total_steps: state.total_steps,
        epochs: records.last().map_or(0.0, |r| r.epoch),
        first_train_loss: finite.first().copied(),
        final_train_loss: finite.last().copied(),
        initial_eval_loss: initial_eval,
        final_eval_loss: final_eval,
        trained_tokens: total_tokens,
        elapsed_s: elapsed,
        tokens_per_s: if elapsed > 0.0 {
            total_tokens as f64 / elapsed
        } else {
            0.0
        },
        skipped_steps: records.iter().filter(|r| r.skipped).count() as u64,
        peak_rss_mib: metrics::peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
        peak_gpu_mib: mem.0,
        planned_peak_mib: Some(mem.1),
        trainable_parameters: model.num_trainable() as u64,
        evaluation: evaluation.map(|(e, _)| e.summary()),
    };
    fs::write(
        run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary).expect("summary serializes"),
    )
    .map_err(io(run_dir))?;
    let mut md = report_md(cfg, &summary, run_dir);
    if let Some((e, _)) = evaluation {
        if has_behaviour {
            md = md.replacen(
                "![loss curves](loss.png)",
                "| loss | behaviour (pass rate per category; step 0 = base) |\n|---|---|\n\
                 | ![loss curves](loss.png) | ![behaviour](behaviour.png) |",
                1,
            );
        }
        md.push('\n');
        md.push_str(&evaluation_md(e));
    }
    fs::write(run_dir.join("report.md"), md).map_err(io(run_dir))?;
    Ok((summary, records))
}

/// Writes a full (dense, f32) model in the Hugging Face layout: config.json, model.safetensors (no
/// lm_head: it is tied), and the tokenizer files copied from `base_dir` (afinar-gemma's `export_merged`;
/// LoRA factors, if any, are merged).
pub fn save_full_model<B: Backend>(
    model: &Gemma2Model<B>,
    base_dir: &Path,
    out: &Path,
) -> Result<()> {
    use afinar_gemma::export::{export_merged, ExportDtype, ExportOptions};
    let opts = ExportOptions {
        dtype: ExportDtype::F32,
        source_dir: Some(base_dir.to_path_buf()),
        ..Default::default()
    };
    export_merged(model, out, &opts)?;
    Ok(())
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "—".into())
}

/// The run's report.md (xtask appends the base-vs-tuned generations).
pub fn report_md(cfg: &Config, s: &Summary, run_dir: &Path) -> String {
    format!(
        "# afinar run `{name}`\n\n\
         | | |\n|---|---|\n\
         | model | `{model}` ({quant:?}{ft}) |\n\
         | data | `{data}` (template {tpl}, max_seq_len {msl}) |\n\
         | stop | {stop:?} after {steps}/{total} steps ({epochs:.2} epochs) |\n\
         | train loss first → last | {tl0} → {tl1} |\n\
         | eval loss before → after | {el0} → {el1} |\n\
         | trained tokens | {tok} |\n\
         | time | {time:.1} s ({tps:.0} tokens/s) |\n\
         | peak RSS | {rss} |\n\
         | peak GPU memory (plan) | {gpu} ({planned}) |\n\
         | trainable parameters | {params} |\n\
         | skipped (non-finite) steps | {skipped} |\n\n\
         ![loss curves](loss.png)\n\nFiles: `{dir}/` config.toml, metrics.jsonl, loss.svg/png, adapter/, checkpoints/, summary.json.\n",
        name = cfg.output.run_name,
        model = cfg.model.path.display(),
        quant = cfg.model.quantization,
        ft = if cfg.model.full_finetune { ", full fine-tune" } else { "" },
        data = cfg.data.train.display(),
        tpl = cfg.data.template,
        msl = cfg.data.max_seq_len,
        stop = s.stop_reason,
        steps = s.steps,
        total = s.total_steps,
        epochs = s.epochs,
        tl0 = fmt_opt(s.first_train_loss),
        tl1 = fmt_opt(s.final_train_loss),
        el0 = fmt_opt(s.initial_eval_loss),
        el1 = fmt_opt(s.final_eval_loss),
        tok = s.trained_tokens,
        time = s.elapsed_s,
        tps = s.tokens_per_s,
        rss = s.peak_rss_mib.map(|m| format!("{m:.0} MiB")).unwrap_or_else(|| "n/a".into()),
        gpu = s.peak_gpu_mib.map(|m| format!("{m:.0} MiB")).unwrap_or_else(|| "n/a".into()),
        planned = s.planned_peak_mib.map(|m| format!("plan {m:.0} MiB")).unwrap_or_else(|| "no plan".into()),
        params = s.trainable_parameters,
        skipped = s.skipped_steps,
        dir = run_dir.display(),
    )
}
