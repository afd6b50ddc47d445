//! `afinar eval --suite`: a model without and then with an adapter, on the CPU: the behaviour suite,
//! and, when asked, forgetting on general text and merge fidelity.

use std::path::{Path, PathBuf};
use std::time::Instant;

use afinar_data::{Template, TemplateKind, TextTokenizer};

use super::measures::{merge_fidelity, perplexity, Forgetting, MERGE_PROMPTS};
use super::run::{run_suite, Evaluation, GenLimits, SuiteComparison};
use super::{Rules, Suite};
use crate::infer::prompt_ids;
use crate::train::Result;

/// The options of `afinar eval` that go with `--suite` (flattened into its arguments).
#[derive(Clone, Debug, clap::Args)]
pub struct SuiteArgs {
    /// With --suite and --adapter: general text (JSONL {"text"}) whose perplexity change measures forgetting.
    #[arg(long, requires = "suite")]
    pub general: Option<PathBuf>,
    /// With --suite and --adapter: the largest logit difference of the merged model from base + adapter.
    #[arg(long, requires = "suite")]
    pub merge_fidelity: bool,
    /// With --suite: score only the first N records (0 = all), after --max-per-category.
    #[arg(long, default_value_t = 0)]
    pub max_records: usize,
    /// With --suite: score only the first N records of each category (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_per_category: usize,
    /// With --suite: greedy generation limit per answer.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// With --suite: transformers' repetition_penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// With --suite: transformers' no_repeat_ngram_size (0 = off).
    #[arg(long, default_value_t = 0)]
    pub no_repeat_ngram_size: usize,
    /// With --suite: the phrase a `refuse` answer must contain.
    #[arg(long, default_value = super::DEFAULT_REFUSE)]
    pub refuse_pattern: String,
}

impl SuiteArgs {
    /// Checks the arguments and builds the options; the error is a usage message.
    pub fn options(
        &self,
        model: &Path,
        adapter: Option<&Path>,
        nf4: bool,
        suite: &Path,
        template: TemplateKind,
        max_seq_len: usize,
    ) -> std::result::Result<StandaloneOptions, String> {
        for (flag, p) in [
            ("--suite", Some(suite)),
            ("--general", self.general.as_deref()),
        ] {
            if let Some(p) = p.filter(|p| !p.is_file()) {
                return Err(format!("{flag} {}: no such file", p.display()));
            }
        }
        if self.max_new_tokens == 0 {
            return Err("--max-new-tokens must be ≥ 1".into());
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err("--repetition-penalty must be finite and > 0 (1 = off)".into());
        }
        if (self.general.is_some() || self.merge_fidelity) && adapter.is_none() {
            return Err(
                "--general and --merge-fidelity compare base and adapter: give --adapter DIR"
                    .into(),
            );
        }
        Ok(StandaloneOptions {
            model: model.to_path_buf(),
            adapter: adapter.map(Path::to_path_buf),
            nf4,
            suite: suite.to_path_buf(),
            max_records: self.max_records,
            max_per_category: self.max_per_category,
            template,
            limits: GenLimits {
                max_new_tokens: self.max_new_tokens,
                repetition_penalty: self.repetition_penalty,
                no_repeat_ngram_size: self.no_repeat_ngram_size,
            },
            rules: Rules {
                refuse_pattern: self.refuse_pattern.clone(),
                ..Rules::default()
            },
            general_text: self.general.clone(),
            max_seq_len,
            merge_fidelity: self.merge_fidelity,
        })
    }
}

/// What `afinar eval --suite` measures.
#[derive(Clone, Debug)]
pub struct StandaloneOptions {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub nf4: bool,
    pub suite: PathBuf,
    /// Score only the first N records (0 = all).
    pub max_records: usize,
    /// Score only the first N records of each category (0 = all).
    pub max_per_category: usize,
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
    evaluate_standalone_on(std::sync::Arc::new(afinar_kernels::cpu::Cpu::new()), o)
}

/// [`evaluate_standalone`] on any backend (`afinar eval --suite --device cuda`).
pub fn evaluate_standalone_on<B: afinar_kernels::Backend>(
    backend: std::sync::Arc<B>,
    o: &StandaloneOptions,
) -> Result<Evaluation> {
    let t = Instant::now();
    let suite = Suite::load(&o.suite)?.limited(o.max_records, o.max_per_category);
    let tok = TextTokenizer::from_model_dir(&o.model)?;
    let template = Template::new(o.template, &tok)?;
    let mut model = crate::infer::load_model_on(backend, &o.model, None, o.nf4)?;
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
            e.merge_fidelity = merge_fidelity(&model, &prompts)?;
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
