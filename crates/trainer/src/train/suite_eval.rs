//! The `[eval]` section during a run: the behaviour suite, forgetting, NF4 cost and merge fidelity,
//! beside the eval loss of `eval.rs`.
//!
//! When each is taken:
//! - before the training model is loaded (fresh NF4 runs with eval data and `eval.nf4_cost`): the
//!   dense base's eval loss, read from the checkpoint one layer at a time (no dense copy of the
//!   model); compared later with the eval loss before training, which is the NF4 base's (LoRA B
//!   starts at zero, so step 0 is the base);
//! - before the first step (the **base**): the suite and the general-text perplexity, kept in
//!   eval_base.json so a resumed run reports the same base;
//! - every `eval.every` steps: the suite (a point of behaviour.jsonl and of the behaviour plot);
//! - after a completed run with `eval.at_end` (the **tuned** model, with its adapter): the suite, the
//!   perplexity, and merge fidelity. An interrupted run reports the last scheduled suite, if any.
//!
//! Everything is greedy and in a fixed order, so the numbers are the same on a rerun.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use afinar_data::{Template, TextTokenizer};
use afinar_gemma::Gemma2Model;
use afinar_kernels::Backend;
use serde::{Deserialize, Serialize};

use super::{evaluate_dense_streamed, io, Result};
use crate::config::{Config, Quantization};
use crate::infer::{prompt_ids, EvalResult};
use crate::metrics::StopReason;
use crate::suite::{
    merge_fidelity, perplexity, run_suite, BehaviourPoint, Evaluation, Forgetting, GenLimits,
    Nf4Cost, Rules, Suite, SuiteComparison, SuiteScore, MERGE_PROMPTS,
};

/// What the base measured, saved for a resumed run (eval_base.json).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct BaseEval {
    behaviour: Option<SuiteScore>,
    general: Option<EvalResult>,
    dense_eval_loss: Option<f64>,
    seconds: f64,
}

/// The evaluation of one run.
pub(super) struct Plan {
    suite: Option<Suite>,
    general_text: Option<PathBuf>,
    tok: TextTokenizer,
    template: Template,
    rules: Rules,
    limits: GenLimits,
    max_seq_len: usize,
    every: u64,
    at_end: bool,
    merge: bool,
    nf4_cost: bool,
    base: BaseEval,
    /// The newest scheduled suite score (step, score).
    last: Option<(u64, SuiteScore)>,
    /// Evaluation seconds of this process (the base's are added from eval_base.json).
    seconds: f64,
    /// The base model's directory (the NF4 cost reads the dense base from it).
    base_dir: PathBuf,
    run_dir: PathBuf,
    behaviour_path: PathBuf,
}

fn nonempty(p: &Path) -> Option<PathBuf> {
    (!p.as_os_str().is_empty()).then(|| p.to_path_buf())
}

impl Plan {
    /// Reads the suite (a malformed record is an error naming its file and line) and the tokenizer
    /// and template the generations use; None without an `[eval]` suite or general text.
    pub fn prepare(cfg: &Config, run_dir: &Path) -> Result<Option<Plan>> {
        let e = &cfg.eval;
        if !e.enabled() {
            return Ok(None);
        }
        let suite = match nonempty(&e.suite) {
            Some(p) => Some(Suite::load(&p)?.limited(e.max_records, e.max_per_category)),
            None => None,
        };
        let tok = TextTokenizer::from_model_dir(&cfg.model.path)?;
        let template = Template::with_date(cfg.data.template, &tok, cfg.data.template_date)?;
        let mut rules = Rules {
            refuse_pattern: e.refuse_pattern.clone(),
            ..Rules::default()
        };
        if !e.premise_markers.is_empty() {
            rules.premise_markers = e.premise_markers.clone();
        }
        Ok(Some(Plan {
            suite,
            general_text: nonempty(&e.general_text),
            tok,
            template,
            rules,
            limits: GenLimits {
                max_new_tokens: e.max_new_tokens,
                repetition_penalty: e.repetition_penalty,
                no_repeat_ngram_size: e.no_repeat_ngram_size,
            },
            max_seq_len: cfg.data.max_seq_len,
            every: e.every,
            at_end: e.at_end,
            merge: e.merge_fidelity && !cfg.model.full_finetune,
            nf4_cost: e.nf4_cost && cfg.model.quantization == Quantization::Nf4,
            base: BaseEval::default(),
            last: None,
            seconds: 0.0,
            base_dir: cfg.model.path.clone(),
            run_dir: run_dir.to_path_buf(),
            behaviour_path: run_dir.join("behaviour.jsonl"),
        }))
    }

    /// The suite's score of `model` (None without a suite), said as "behaviour suite {when}: …".
    fn score_suite<B: Backend>(
        &self,
        model: &Gemma2Model<B>,
        when: &str,
        say: &dyn Fn(&str),
    ) -> Result<Option<SuiteScore>> {
        let Some(s) = &self.suite else {
            return Ok(None);
        };
        let score = run_suite(
            model,
            &self.tok,
            &self.template,
            s,
            &self.rules,
            &self.limits,
        )?;
        say(&format!(
            "behaviour suite {when}: {}/{} passed ({:.2})",
            score.overall.passed, score.overall.total, score.overall.rate
        ));
        Ok(Some(score))
    }

    /// The dense base's eval loss (fresh NF4 runs with eval data), before the training model exists:
    /// the eval set scored by the dense base read layer by layer from the checkpoint
    /// (`evaluate_dense_streamed`; the same loss as a dense copy's, which is never built).
    pub fn dense_base<B: Backend>(
        &mut self,
        backend: Arc<B>,
        eval: Option<&afinar_data::DataLoader>,
        resuming: bool,
        say: &dyn Fn(&str),
    ) -> Result<()> {
        let Some(ev) = eval.filter(|_| self.nf4_cost && !resuming) else {
            return Ok(());
        };
        let t = Instant::now();
        let (l, _) = evaluate_dense_streamed(backend, &self.base_dir, ev)?;
        say(&format!("eval of the dense base (NF4 cost): loss {l:.4}"));
        self.base.dense_eval_loss = Some(l);
        self.seconds += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// The base: suite and general-text perplexity of the model before its first step (fresh run), or
    /// read back from eval_base.json (resumed run at `resumed_step`; behaviour.jsonl keeps the points
    /// up to it).
    pub fn base<B: Backend>(
        &mut self,
        model: &Gemma2Model<B>,
        resumed_step: Option<u64>,
        say: &dyn Fn(&str),
    ) -> Result<()> {
        let path = self.run_dir.join("eval_base.json");
        if let Some(step) = resumed_step {
            if let Some(b) = fs::read_to_string(&path)
                .ok()
                .and_then(|s| serde_json::from_str::<BaseEval>(&s).ok())
            {
                self.base = b;
            }
            let kept: Vec<BehaviourPoint> = read_points(&self.behaviour_path)
                .into_iter()
                .filter(|p| p.step <= step)
                .collect();
            write_points(&self.behaviour_path, &kept)?;
            return Ok(());
        }
        let t = Instant::now();
        if let Some(score) = self.score_suite(model, "before training", say)? {
            write_points(&self.behaviour_path, &[score.point(0)])?;
            self.base.behaviour = Some(score);
        }
        if let Some(g) = &self.general_text {
            let r = perplexity(model, &self.tok, g, self.max_seq_len)?;
            say(&format!(
                "general text before training: perplexity {:.3} over {} tokens",
                r.perplexity, r.tokens
            ));
            self.base.general = Some(r);
        }
        let dt = t.elapsed().as_secs_f64();
        self.base.seconds = self.seconds + dt;
        self.seconds = 0.0;
        let text = serde_json::to_string_pretty(&self.base).expect("base eval serializes");
        fs::write(&path, text).map_err(io(&path))?;
        Ok(())
    }

    /// The suite of `eval.every`, after `step` optimizer steps (not at the last step: that one is
    /// [`Plan::finish`]'s).
    pub fn scheduled<B: Backend>(
        &mut self,
        model: &Gemma2Model<B>,
        step: u64,
        total: u64,
        say: &dyn Fn(&str),
    ) -> Result<()> {
        if self.every == 0 || !step.is_multiple_of(self.every) || step >= total {
            return Ok(());
        }
        let t = Instant::now();
        if let Some(score) = self.score_suite(model, &format!("at step {step}"), say)? {
            append_point(&self.behaviour_path, &score.point(step))?;
            self.last = Some((step, score));
        }
        self.seconds += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// The tuned model's measures (a completed run with `eval.at_end`), and the whole evaluation,
    /// also written to evaluation.json. Returns it with every behaviour point for the plot.
    pub fn finish<B: Backend>(
        mut self,
        model: &Gemma2Model<B>,
        stop: StopReason,
        step: u64,
        initial_eval: Option<f64>,
        say: &dyn Fn(&str),
    ) -> Result<(Evaluation, Vec<BehaviourPoint>)> {
        let t = Instant::now();
        let done = stop == StopReason::Completed && self.at_end;
        let mut tuned_general = None;
        let mut merge = None;
        if done {
            if let Some(score) = self.score_suite(model, "after training", say)? {
                append_point(&self.behaviour_path, &score.point(step))?;
                self.last = Some((step, score));
            }
            if let Some(g) = &self.general_text {
                let r = perplexity(model, &self.tok, g, self.max_seq_len)?;
                say(&format!(
                    "general text after training: perplexity {:.3}",
                    r.perplexity
                ));
                tuned_general = Some(r);
            }
            if self.merge {
                let prompts: Vec<Vec<i32>> = match &self.suite {
                    Some(s) => s
                        .items
                        .iter()
                        .take(MERGE_PROMPTS)
                        .map(|i| prompt_ids(&i.prompt, &self.template, &self.tok))
                        .collect::<Result<_>>()?,
                    None => Vec::new(),
                };
                merge = merge_fidelity(model, &prompts)?;
                if let Some(m) = &merge {
                    say(&format!(
                        "merge fidelity: largest logit difference {:.3e}",
                        m.max_abs_logit_diff
                    ));
                }
            }
        }
        self.seconds += t.elapsed().as_secs_f64();
        let behaviour = match (&self.suite, self.base.behaviour.take()) {
            (Some(s), Some(base)) => Some(SuiteComparison {
                suite: s.path.display().to_string(),
                limits: self.limits.clone(),
                refuse_pattern: self.rules.refuse_pattern.clone(),
                base,
                tuned: self.last.take().map(|(_, s)| s),
            }),
            _ => None,
        };
        let forgetting = match (&self.base.general, &tuned_general, &self.general_text) {
            (Some(b), Some(t), Some(p)) => Some(Forgetting::new(p, b, t)),
            _ => None,
        };
        let nf4_cost = match (self.base.dense_eval_loss, initial_eval) {
            (Some(d), Some(n)) => Some(Nf4Cost::new(d, n)),
            _ => None,
        };
        let evaluation = Evaluation {
            behaviour,
            forgetting,
            nf4_cost,
            merge_fidelity: merge,
            seconds: self.base.seconds + self.seconds,
        };
        let path = self.run_dir.join("evaluation.json");
        let text = serde_json::to_string_pretty(&evaluation).expect("evaluation serializes");
        fs::write(&path, text).map_err(io(&path))?;
        Ok((evaluation, read_points(&self.behaviour_path)))
    }
}

fn read_points(path: &Path) -> Vec<BehaviourPoint> {
    fs::read_to_string(path)
        .map(|s| {
            s.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

fn write_points(path: &Path, points: &[BehaviourPoint]) -> Result<()> {
    let mut text = String::new();
    for p in points {
        text.push_str(&serde_json::to_string(p).expect("point serializes"));
        text.push('\n');
    }
    fs::write(path, text).map_err(io(path))
}

fn append_point(path: &Path, p: &BehaviourPoint) -> Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io(path))?;
    let line = serde_json::to_string(p).expect("point serializes") + "\n";
    f.write_all(line.as_bytes()).map_err(io(path))
}
