//! The measures beside the behaviour suite: forgetting (perplexity on general text with and without
//! the adapter), the cost of NF4 (eval loss of the NF4 base against the dense base) and merge fidelity
//! (the largest logit difference between the merged model and base + adapter).

use std::path::Path;

use afinar_data::{Format, TemplateKind, TextTokenizer};
use afinar_gemma::{Batch, Gemma2Model};
use afinar_kernels::Backend;
use serde::{Deserialize, Serialize};

use crate::infer::{eval_file, EvalOptions, EvalResult};
use crate::train::Result;

/// Prompts whose logits the merge-fidelity check compares (the first records of the suite).
pub const MERGE_PROMPTS: usize = 3;

/// 100·(after − before)/before.
pub fn pct_change(before: f64, after: f64) -> f64 {
    100.0 * (after - before) / before
}

/// Catastrophic forgetting: perplexity on held-out general text before and after fine-tuning.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Forgetting {
    pub general_text: String,
    /// Scored tokens of the general text.
    pub tokens: usize,
    /// Perplexity of the base (no adapter / before training).
    pub base_perplexity: f64,
    /// Perplexity of the tuned model (with the adapter / after training).
    pub tuned_perplexity: f64,
    /// 100·(tuned − base)/base: positive = the model got worse at general text.
    pub change_pct: f64,
}

impl Forgetting {
    pub fn new(general_text: &Path, base: &EvalResult, tuned: &EvalResult) -> Self {
        Forgetting {
            general_text: general_text.display().to_string(),
            tokens: base.tokens,
            base_perplexity: base.perplexity,
            tuned_perplexity: tuned.perplexity,
            change_pct: pct_change(base.perplexity, tuned.perplexity),
        }
    }
}

/// What freezing the base in NF4 costs: eval loss of the dense base and of the NF4 base (no adapter).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Nf4Cost {
    pub dense_eval_loss: f64,
    pub nf4_eval_loss: f64,
    /// 100·(nf4 − dense)/dense.
    pub loss_change_pct: f64,
    /// exp(nf4 − dense) − 1, as a percentage: the perplexity ratio.
    pub perplexity_change_pct: f64,
}

impl Nf4Cost {
    pub fn new(dense: f64, nf4: f64) -> Self {
        Nf4Cost {
            dense_eval_loss: dense,
            nf4_eval_loss: nf4,
            loss_change_pct: pct_change(dense, nf4),
            perplexity_change_pct: 100.0 * ((nf4 - dense).exp() - 1.0),
        }
    }
}

/// The largest |logit| difference between a merged model (W + s·B·A in f32, dequantized first if the
/// base is NF4) and the base + adapter it came from, over every position of a few prompts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MergeFidelity {
    pub max_abs_logit_diff: f64,
    pub prompts: usize,
    pub tokens: usize,
}

/// Perplexity of `model` on a `{"text": …}` JSONL file (every token scored, BOS + text + EOS).
pub fn perplexity<B: Backend>(
    model: &Gemma2Model<B>,
    tok: &TextTokenizer,
    path: &Path,
    max_seq_len: usize,
) -> Result<EvalResult> {
    let o = EvalOptions {
        data: path.to_path_buf(),
        format: Some(Format::Text),
        // Text records use no template; the kind only has to exist.
        template: TemplateKind::Gemma,
        max_seq_len,
        batch_size: 4,
    };
    eval_file(model, tok, &o)
}

/// Compares the merged model's logits (afinar-gemma's `merged_weight` of every linear of `tuned`:
/// W, dequantized if NF4, + s·B·A) with `tuned`'s own (base + adapter) on `prompts` (token ids, one
/// batch each). The merged model is run layer-streamed (`Gemma2Model::merged_logits`: one dense merged
/// layer at a time, the embedding and norms are `tuned`'s), so no dense merged copy of the model is
/// built. None when `tuned` carries no LoRA adapter.
pub fn merge_fidelity<B: Backend>(
    tuned: &Gemma2Model<B>,
    prompts: &[Vec<i32>],
) -> Result<Option<MergeFidelity>> {
    if tuned.lora.is_none() || prompts.is_empty() {
        return Ok(None);
    }
    let batches: Vec<Batch> = prompts
        .iter()
        .map(|ids| Batch::new(1, ids.len(), ids.clone(), vec![-100; ids.len()]))
        .collect();
    let merged = tuned.merged_logits(&batches)?;
    let (mut max, mut tokens) = (0f64, 0usize);
    for (batch, b) in batches.iter().zip(&merged) {
        let a = tuned.logits(batch)?;
        for (x, y) in a.iter().zip(b) {
            max = max.max((*x as f64 - *y as f64).abs());
        }
        tokens += batch.tokens();
    }
    Ok(Some(MergeFidelity {
        max_abs_logit_diff: max,
        prompts: prompts.len(),
        tokens,
    }))
}
