//! `afinar eval --suite`: a model without and then with an adapter, on the CPU: the behaviour suite,
//! and, when asked, forgetting on general text and merge fidelity.

use std::path::PathBuf;
use std::time::Instant;

use afinar_data::{Template, TemplateKind, TextTokenizer};

use super::measures::{merge_fidelity, perplexity, Forgetting, MERGE_PROMPTS};
use super::run::{run_suite, Evaluation, GenLimits, SuiteComparison};
use super::{Rules, Suite};
use crate::infer::{load_model, prompt_ids};
use crate::train::Result;

/// What `afinar eval --suite` measures.
#[derive(Clone, Debug)]
pub struct StandaloneOptions {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub nf4: bool,
    pub suite: PathBuf,
    /// Score only the first N records (0 = all).
    pub max_records: usize,
    pub template: TemplateKind,
    pub limits: GenLimits,
    pub rules: Rules,
    /// General text for the forgetting measure (needs an adapter).
    pub general_text: Option<PathBuf>,
    /// Rows longer than this are truncated when scoring the general text.
    pub max_seq_len: usize,
    /// Compare the merged model's logits with base + adapter (needs an adapter).
    pub merge_fidelity: bool,
}

/// Runs the suite on the base model, then (with `adapter`) applies the adapter to the same weights
/// and runs it again.
pub fn evaluate_standalone(o: &StandaloneOptions) -> Result<Evaluation> {
    let t = Instant::now();
    let suite = Suite::load(&o.suite)?.truncated(o.max_records);
    let tok = TextTokenizer::from_model_dir(&o.model)?;
    let template = Template::new(o.template, &tok)?;
    let mut model = load_model(&o.model, None, o.nf4)?;
    let base = run_suite(&model, &tok, &template, &suite, &o.rules, &o.limits)?;
    let base_general = match (&o.general_text, &o.adapter) {
        (Some(g), Some(_)) => Some(perplexity(&model, &tok, g, o.max_seq_len)?),
        _ => None,
    };
    let mut e = Evaluation::default();
    let mut tuned = None;
    if let Some(a) = &o.adapter {
        afinar_gemma::peft::load_adapter(&mut model, a)?;
        tuned = Some(run_suite(
            &model, &tok, &template, &suite, &o.rules, &o.limits,
        )?);
        if let (Some(g), Some(b)) = (&o.general_text, &base_general) {
            let r = perplexity(&model, &tok, g, o.max_seq_len)?;
            e.forgetting = Some(Forgetting::new(g, b, &r));
        }
        if o.merge_fidelity {
            let prompts = suite
                .items
                .iter()
                .take(MERGE_PROMPTS)
                .map(|i| prompt_ids(&i.prompt, &template, &tok))
                .collect::<Result<Vec<_>>>()?;
            e.merge_fidelity = merge_fidelity(&model, &o.model, &prompts)?;
        }
    }
    e.behaviour = Some(SuiteComparison {
        suite: o.suite.display().to_string(),
        limits: o.limits.clone(),
        refuse_pattern: o.rules.refuse_pattern.clone(),
        base,
        tuned,
    });
    e.seconds = t.elapsed().as_secs_f64();
    Ok(e)
}
