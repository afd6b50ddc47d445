//! Running a model over a suite: one greedy generation per record (fixed limits), scored by
//! `score.rs`, and the rates per category and overall. Generic over the backend, like training.

use std::collections::BTreeMap;

use afinar_data::{Template, TextTokenizer};
use afinar_gemma::Gemma2Model;
use afinar_kernels::Backend;
use serde::{Deserialize, Serialize};

use super::measures::{Forgetting, MergeFidelity, Nf4Cost};
use super::score::{contains_phrase, score, Rules, Verdict};
use super::Suite;
use crate::infer::{generate_answer, SampleOptions};
use crate::train::Result;

/// The fixed generation limits of a suite run (decoding is always greedy).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenLimits {
    pub max_new_tokens: usize,
    /// transformers' `repetition_penalty` (1 = off).
    pub repetition_penalty: f32,
    /// transformers' `no_repeat_ngram_size` (0 = off).
    pub no_repeat_ngram_size: usize,
}

impl GenLimits {
    fn sample_options(&self) -> SampleOptions {
        SampleOptions {
            max_new_tokens: self.max_new_tokens,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
        }
    }
}

/// One record's generation and verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    pub line: usize,
    pub category: String,
    pub expect: String,
    /// What was expected, in words.
    pub expected: String,
    pub prompt: String,
    pub completion: String,
    /// Generated tokens (the stop token included).
    pub tokens: usize,
    /// The answer contains the refusal pattern (whatever the expectation): with an `answer`,
    /// `premise` or `json` expectation, an over-refusal.
    #[serde(default)]
    pub declines: bool,
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// Passed / total for one category (or overall).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CategoryScore {
    pub passed: usize,
    pub total: usize,
    pub rate: f64,
    /// Answers whose verdict is borderline (passed or not).
    pub borderline: usize,
    /// Answers that contain the refusal pattern.
    #[serde(default)]
    pub declined: usize,
}

impl CategoryScore {
    fn of<'a>(items: impl Iterator<Item = &'a ItemResult>) -> Self {
        let (mut passed, mut total, mut borderline, mut declined) = (0, 0, 0, 0);
        for i in items {
            total += 1;
            passed += usize::from(i.verdict.pass);
            borderline += usize::from(i.verdict.borderline.is_some());
            declined += usize::from(i.declines);
        }
        CategoryScore {
            passed,
            total,
            rate: if total > 0 {
                passed as f64 / total as f64
            } else {
                0.0
            },
            borderline,
            declined,
        }
    }
}

/// A model's score on a suite.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SuiteScore {
    /// Passed / total over every record.
    pub overall: CategoryScore,
    /// Per category, in name order.
    pub categories: BTreeMap<String, CategoryScore>,
    pub items: Vec<ItemResult>,
}

impl SuiteScore {
    /// Over-refusal: the share of records that do not expect a refusal whose answer declines anyway
    /// (None when every record expects one).
    pub fn over_refusal(&self) -> Option<f64> {
        let others: Vec<&ItemResult> = self.items.iter().filter(|i| i.expect != "refuse").collect();
        (!others.is_empty())
            .then(|| others.iter().filter(|i| i.declines).count() as f64 / others.len() as f64)
    }

    /// The rates alone, for behaviour.jsonl and the plot.
    pub fn point(&self, step: u64) -> BehaviourPoint {
        BehaviourPoint {
            step,
            overall: self.overall.rate,
            categories: self
                .categories
                .iter()
                .map(|(k, v)| (k.clone(), v.rate))
                .collect(),
        }
    }
}

/// The behaviour rates after `step` optimizer steps (step 0 = the base model): a line of behaviour.jsonl.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BehaviourPoint {
    pub step: u64,
    pub overall: f64,
    pub categories: BTreeMap<String, f64>,
}

/// Base and tuned on the same suite.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SuiteComparison {
    pub suite: String,
    pub limits: GenLimits,
    pub refuse_pattern: String,
    pub base: SuiteScore,
    /// None when no adapter (or no training) was evaluated.
    pub tuned: Option<SuiteScore>,
}

/// Every measure of an evaluation; what is not measured is None.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Evaluation {
    pub behaviour: Option<SuiteComparison>,
    pub forgetting: Option<Forgetting>,
    pub nf4_cost: Option<Nf4Cost>,
    pub merge_fidelity: Option<MergeFidelity>,
    /// Wall time of every evaluation step of the run (suite runs, perplexities, loads), seconds.
    pub seconds: f64,
}

/// Generates a greedy answer to every record of `suite` with `model` and scores it.
pub fn run_suite<B: Backend>(
    model: &Gemma2Model<B>,
    tok: &TextTokenizer,
    template: &Template,
    suite: &Suite,
    rules: &Rules,
    limits: &GenLimits,
) -> Result<SuiteScore> {
    let opts = limits.sample_options();
    let mut items = Vec::with_capacity(suite.items.len());
    for it in &suite.items {
        let g = generate_answer(model, tok, template, &it.prompt, &opts)?;
        let verdict = score(&it.expect, &g.completion, &g.prompt, rules);
        let declines = contains_phrase(&g.completion, &rules.refuse_pattern);
        items.push(ItemResult {
            line: it.line,
            category: it.category.clone(),
            expect: it.expect.name().into(),
            expected: it.expect.describe(rules),
            prompt: g.prompt,
            completion: g.completion,
            tokens: g.tokens,
            declines,
            verdict,
        });
    }
    let mut names: Vec<&String> = items.iter().map(|i| &i.category).collect();
    names.sort();
    names.dedup();
    let categories = names
        .into_iter()
        .map(|c| {
            (
                c.clone(),
                CategoryScore::of(items.iter().filter(|i| &i.category == c)),
            )
        })
        .collect();
    Ok(SuiteScore {
        overall: CategoryScore::of(items.iter()),
        categories,
        items,
    })
}

/// One category's rate, base and tuned (summary.json).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RatePair {
    pub base: f64,
    pub tuned: Option<f64>,
}

/// The behaviour part of summary.json: rates without the generations (those are in evaluation.json).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BehaviourSummary {
    pub suite: String,
    pub records: usize,
    pub overall: RatePair,
    pub categories: BTreeMap<String, RatePair>,
    /// Share of the records that do not expect a refusal whose answer declines anyway.
    pub over_refusal: Option<RatePair>,
    pub borderline_base: usize,
    pub borderline_tuned: Option<usize>,
}

/// Every measure as numbers: the `evaluation` of summary.json.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalSummary {
    pub behaviour: Option<BehaviourSummary>,
    pub forgetting: Option<Forgetting>,
    pub nf4_cost: Option<Nf4Cost>,
    pub merge_fidelity: Option<MergeFidelity>,
    pub seconds: f64,
}

impl EvalSummary {
    /// The measures in one line: "evaluation: behaviour 0.00 → 0.20 (over-refusal …), forgetting …".
    pub fn one_line(&self) -> String {
        let pair = |p: &RatePair| {
            format!(
                "{:.2} → {}",
                p.base,
                p.tuned.map_or("—".into(), |t| format!("{t:.2}"))
            )
        };
        let mut parts = Vec::new();
        if let Some(b) = &self.behaviour {
            let mut s = format!("behaviour {}", pair(&b.overall));
            if let Some(o) = &b.over_refusal {
                s.push_str(&format!(" (over-refusal {})", pair(o)));
            }
            parts.push(s);
        }
        if let Some(f) = &self.forgetting {
            parts.push(format!("forgetting {:+.2} % perplexity", f.change_pct));
        }
        if let Some(n) = &self.nf4_cost {
            parts.push(format!("NF4 cost {:+.2} % eval loss", n.loss_change_pct));
        }
        if let Some(m) = &self.merge_fidelity {
            parts.push(format!("merge fidelity {:.1e}", m.max_abs_logit_diff));
        }
        format!("evaluation: {}, {:.1} s", parts.join(", "), self.seconds)
    }
}

impl Evaluation {
    /// The numbers of this evaluation, without the generations.
    pub fn summary(&self) -> EvalSummary {
        EvalSummary {
            behaviour: self.behaviour.as_ref().map(|c| {
                let t = c.tuned.as_ref();
                BehaviourSummary {
                    suite: c.suite.clone(),
                    records: c.base.overall.total,
                    overall: RatePair {
                        base: c.base.overall.rate,
                        tuned: t.map(|t| t.overall.rate),
                    },
                    categories: c
                        .base
                        .categories
                        .iter()
                        .map(|(k, b)| {
                            (
                                k.clone(),
                                RatePair {
                                    base: b.rate,
                                    tuned: t.and_then(|t| t.categories.get(k)).map(|x| x.rate),
                                },
                            )
                        })
                        .collect(),
                    over_refusal: c.base.over_refusal().map(|base| RatePair {
                        base,
                        tuned: t.and_then(|t| t.over_refusal()),
                    }),
                    borderline_base: c.base.overall.borderline,
                    borderline_tuned: t.map(|t| t.overall.borderline),
                }
            }),
            forgetting: self.forgetting.clone(),
            nf4_cost: self.nf4_cost.clone(),
            merge_fidelity: self.merge_fidelity.clone(),
            seconds: self.seconds,
        }
    }
}
