//! `afinar eval`, `generate`, `merge` and `quantize`: argument parsing and output; the work is in
//! afinar_trainer::infer.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use afinar_kernels::Backend;
use afinar_trainer::infer::{self, EvalOptions, SampleOptions};
use afinar_trainer::profile;
use clap::Args;

use super::device::{run_job, DeviceArgs, Job, Placement};
use crate::{usage, Failure};

#[derive(Args)]
pub struct EvalArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// nf4 | none
    #[arg(long, default_value = "none")]
    quantization: String,
    /// Dataset file (JSON/JSONL); every record is scored with the training masks.
    #[arg(long, required_unless_present = "suite", conflicts_with = "suite")]
    data: Option<PathBuf>,
    /// Behaviour suite (JSONL: prompt, `category`, `expect`): greedy answers of the base model and,
    /// with --adapter, of the tuned one, scored per category, side by side.
    #[arg(long)]
    suite: Option<PathBuf>,
    #[command(flatten)]
    suite_opts: afinar_trainer::suite::SuiteArgs,
    /// alpaca | messages | sharegpt | text (default: detect).
    #[arg(long)]
    format: Option<String>,
    #[arg(long, default_value = "gemma")]
    template: String,
    /// Tokens per row; default 1024, or the model's max_position_embeddings when that is smaller.
    #[arg(long)]
    max_seq_len: Option<usize>,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[command(flatten)]
    device: DeviceArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Hugging Face model directory.
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter directory.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// nf4 | none
    #[arg(long, default_value = "none")]
    quantization: String,
    /// One user message.
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    prompt: Option<String>,
    /// A file with one prompt per line, or a JSONL dataset (alpaca instruction/input are used).
    #[arg(long)]
    prompts: Option<PathBuf>,
    #[arg(long, default_value = "gemma")]
    template: String,
    /// Default 128, or what is left of the model's max_position_embeddings after the prompt when that
    /// is less. A value given explicitly is never lowered (too large is an error).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// transformers' repetition_penalty: logits of ids already in the prompt or output are divided by it
    /// (multiplied if negative). 1 = off; must be > 0.
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// transformers' no_repeat_ngram_size: a token that would complete an n-gram already present in the
    /// prompt or output is never produced (applied after --repetition-penalty). 0 = off.
    #[arg(long, default_value_t = 0)]
    no_repeat_ngram_size: usize,
    #[command(flatten)]
    device: DeviceArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct MergeArgs {
    /// Base model directory.
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter directory.
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory (written atomically; tokenizer files copied).
    #[arg(long)]
    out: PathBuf,
    /// bf16 | f32: the dtype of the written weights (the merge itself is computed in f32).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// cuda | cpu: where the base is loaded and W + s·B·A computed (the base is held in the
    /// checkpoint's own dtype there). Default: cuda when this afinar has the CUDA backend and a GPU is
    /// present, else cpu.
    #[arg(long)]
    device: Option<String>,
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// Dense model directory.
    #[arg(long)]
    model: PathBuf,
    /// Output directory for the NF4 checkpoint.
    #[arg(long)]
    out: PathBuf,
    /// bf16 | f32 | f16: the dtype the linears are quantized from and the embedding and norms are
    /// written in. Default: the checkpoint's own (config.json's dtype, else the stored one), as
    /// transformers + bitsandbytes would load it.
    #[arg(long)]
    dtype: Option<String>,
    /// cuda | cpu: where the dense model is loaded (and, with an adapter merged, combined); the NF4
    /// codes are computed on the host either way. Default as for merge.
    #[arg(long)]
    device: Option<String>,
}

pub fn parse_quant(q: &str) -> Result<bool, Failure> {
    match q {
        "nf4" => Ok(true),
        "none" => Ok(false),
        _ => Err(usage(anyhow::anyhow!(
            "--quantization {q:?}: expected nf4 or none"
        ))),
    }
}

pub fn check_model_dir(p: &Path) -> Result<(), Failure> {
    if !p.join("config.json").is_file() {
        return Err(usage(anyhow::anyhow!(
            "--model {}: not a model directory (no config.json)",
            p.display()
        )));
    }
    Ok(())
}

pub fn cmd_eval(a: EvalArgs) -> Result<u8, Failure> {
    check_model_dir(&a.model)?;
    let nf4 = parse_quant(&a.quantization)?;
    let max_seq_len = infer::eval_max_seq_len(&a.model, a.max_seq_len)?;
    let place = a.device.placement(&a.model)?;
    eprintln!("afinar eval: {}", place.describe());
    if let Some(w) = a
        .adapter
        .as_deref()
        .and_then(|ad| infer::quantization_mismatch(ad, nf4))
    {
        eprintln!("{w}");
    }
    if let Some(suite) = &a.suite {
        return cmd_eval_suite(&a, suite, nf4, max_seq_len, &place);
    }
    let Some(data) = a.data.clone() else {
        return Err(usage(anyhow::anyhow!(
            "give --data FILE and/or --suite FILE"
        )));
    };
    if !data.is_file() {
        return Err(usage(anyhow::anyhow!(
            "--data {}: no such file",
            data.display()
        )));
    }
    let format = a
        .format
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(usage)?;
    let template = a.template.parse().map_err(usage)?;
    let tok = afinar_data::TextTokenizer::from_model_dir(&a.model)?;
    let o = EvalOptions {
        data,
        format,
        template,
        max_seq_len,
        batch_size: a.batch_size,
    };
    // `AFINAR_PROFILE=1`: the whole evaluation is one profiler step.
    let r = run_job(
        &place,
        EvalJob {
            a: &a,
            nf4,
            tok: &tok,
            o: &o,
        },
    )?;
    if a.json {
        let mut v = serde_json::to_value(&r).expect("serializes");
        v["device"] = place.device_name().into();
        v["dtype"] = place.dtype_name().into();
        println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
    } else {
        println!(
            "loss {:.4}  perplexity {:.3}  tokens {}  samples {}",
            r.loss, r.perplexity, r.tokens, r.samples
        );
    }
    Ok(0)
}

/// `afinar eval --suite`: behaviour base vs adapter (markdown, or JSON with --json).
pub fn cmd_eval_suite(
    a: &EvalArgs,
    suite: &Path,
    nf4: bool,
    max_seq_len: usize,
    place: &Placement,
) -> Result<u8, Failure> {
    use afinar_trainer::suite;
    let template = a.template.parse().map_err(usage)?;
    let o = a
        .suite_opts
        .options(
            &a.model,
            a.adapter.as_deref(),
            nf4,
            suite,
            template,
            max_seq_len,
        )
        .map_err(|m| usage(anyhow::anyhow!(m)))?;
    let e = run_job(place, SuiteJob(&o))?;
    if a.json {
        let v = serde_json::json!({ "summary": e.summary(), "evaluation": e });
        println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
    } else {
        print!("{}", suite::evaluation_md(&e));
    }
    Ok(0)
}

struct SuiteJob<'a>(&'a afinar_trainer::suite::StandaloneOptions);

impl Job for SuiteJob<'_> {
    type Out = afinar_trainer::suite::Evaluation;
    fn run<B: Backend>(self, be: Arc<B>) -> Result<Self::Out, Failure> {
        Ok(afinar_trainer::suite::evaluate_standalone_on(be, self.0)?)
    }
}

struct EvalJob<'a> {
    a: &'a EvalArgs,
    nf4: bool,
    tok: &'a afinar_data::TextTokenizer,
    o: &'a EvalOptions,
}

impl Job for EvalJob<'_> {
    type Out = infer::EvalResult;
    fn run<B: Backend>(self, be: Arc<B>) -> Result<Self::Out, Failure> {
        let a = self.a;
        let model = infer::load_model_on(be.clone(), &a.model, a.adapter.as_deref(), self.nf4)?;
        let r = profile::step(&*be, || infer::eval_file(&model, self.tok, self.o))?;
        profile::finish(&*be)?;
        Ok(r)
    }
}

pub fn cmd_generate(a: GenerateArgs) -> Result<u8, Failure> {
    // Checked before loading the model (afinar-gemma checks it again when generating).
    if !(a.repetition_penalty > 0.0 && a.repetition_penalty.is_finite()) {
        return Err(usage(anyhow::anyhow!(
            "--repetition-penalty must be finite and > 0 (1 = off), found {}",
            a.repetition_penalty
        )));
    }
    check_model_dir(&a.model)?;
    let nf4 = parse_quant(&a.quantization)?;
    let place = a.device.placement(&a.model)?;
    eprintln!("afinar generate: {}", place.describe());
    let template_kind: afinar_data::TemplateKind = a.template.parse().map_err(usage)?;
    let prompts = match (&a.prompt, &a.prompts) {
        (Some(p), _) => vec![infer::Prompt::text(p)],
        (None, Some(f)) => infer::read_prompts(f).map_err(usage)?,
        (None, None) => {
            return Err(usage(anyhow::anyhow!(
                "give --prompt TEXT or --prompts FILE"
            )))
        }
    };
    let tok = afinar_data::TextTokenizer::from_model_dir(&a.model)?;
    let template = afinar_data::Template::new(template_kind, &tok)?;
    let s = SampleOptions {
        max_new_tokens: a.max_new_tokens.unwrap_or(infer::DEFAULT_MAX_NEW_TOKENS),
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        repetition_penalty: a.repetition_penalty,
        no_repeat_ngram_size: a.no_repeat_ngram_size,
    };
    // `AFINAR_PROFILE=1`: each prompt is one profiler step.
    let outs = run_job(
        &place,
        GenerateJob(&a, nf4, &tok, &template, &prompts[..], &s),
    )?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outs).expect("serializes")
        );
    }
    Ok(0)
}

struct GenerateJob<'a>(
    &'a GenerateArgs,
    bool,
    &'a afinar_data::TextTokenizer,
    &'a afinar_data::Template,
    &'a [infer::Prompt],
    &'a SampleOptions,
);

impl Job for GenerateJob<'_> {
    type Out = Vec<infer::GenOutput>;
    fn run<B: Backend>(self, be: Arc<B>) -> Result<Self::Out, Failure> {
        generate_on_backend(be, self)
    }
}

/// Generates every prompt with the KV cache of `be` (on a GPU, the device's), reporting prefill and
/// decode speeds per prompt on stderr.
fn generate_on_backend<B: Backend>(
    be: Arc<B>,
    GenerateJob(a, nf4, tok, template, prompts, s): GenerateJob<'_>,
) -> Result<Vec<infer::GenOutput>, Failure> {
    let model = infer::load_model_on(be.clone(), &a.model, a.adapter.as_deref(), nf4)?;
    let mut outs = Vec::new();
    for p in prompts {
        let mut s = s.clone();
        if a.max_new_tokens.is_none() {
            s.max_new_tokens = infer::fit_new_tokens(&model, tok, template, p, s.max_new_tokens)?;
        }
        let g = profile::step(&*be, || {
            infer::generate_answer(&model, tok, template, p, &s)
        })?;
        if !a.json {
            println!("### {}\n{}\n", g.prompt, g.completion);
        }
        let speed = |x: Option<f64>| x.map_or_else(|| "-".into(), |v| format!("{v:.1}"));
        eprintln!(
            "prefill {} tokens at {} tok/s; decode {} tokens at {} tok/s",
            g.prompt_tokens,
            speed(g.prefill_tokens_per_s),
            g.tokens,
            speed(g.decode_tokens_per_s)
        );
        outs.push(g);
    }
    profile::finish(&*be)?;
    Ok(outs)
}

/// `--out` of merge/quantize must not hold anything yet: the export replaces its target directory
/// wholesale, so `--out .` or `--out runs` would otherwise delete what was there.
pub fn check_out_dir(out: &Path) -> Result<(), Failure> {
    let in_use = match std::fs::read_dir(out) {
        Ok(mut entries) => entries.next().is_some(),
        Err(_) => out.exists(),
    };
    if in_use {
        return Err(usage(anyhow::anyhow!(
            "--out {} already exists and is not an empty directory; nothing was changed \
             (remove it or pick another directory)",
            out.display()
        )));
    }
    Ok(())
}

pub fn cmd_merge(a: MergeArgs) -> Result<u8, Failure> {
    check_model_dir(&a.model)?;
    if !a.adapter.join("adapter_config.json").is_file() {
        return Err(usage(anyhow::anyhow!(
            "--adapter {}: no adapter_config.json",
            a.adapter.display()
        )));
    }
    let dtype = match a.dtype.as_str() {
        "bf16" | "f32" => a.dtype.clone(),
        d => {
            return Err(usage(anyhow::anyhow!(
                "--dtype {d:?}: expected bf16 or f32"
            )))
        }
    };
    check_out_dir(&a.out)?;
    let place = super::device::placement(a.device.as_deref(), None, &a.model)?;
    eprintln!("afinar merge: {}", place.describe());
    run_job(&place, MergeJob(&a, &dtype))?;
    println!(
        "merged model ({dtype}) written to {} (merged on {})",
        a.out.display(),
        place.device_name()
    );
    Ok(0)
}

pub fn cmd_quantize(a: QuantizeArgs) -> Result<u8, Failure> {
    check_model_dir(&a.model)?;
    let dtype = match a.dtype.as_deref() {
        None => None,
        Some(d @ ("bf16" | "f32" | "f16")) => afinar_gemma::export::ExportDtype::from_name(d),
        Some(d) => {
            return Err(usage(anyhow::anyhow!(
                "--dtype {d:?}: expected bf16, f32 or f16"
            )))
        }
    };
    check_out_dir(&a.out)?;
    let place = super::device::placement(a.device.as_deref(), a.dtype.as_deref(), &a.model)?;
    eprintln!("afinar quantize: {}", place.describe());
    let (_, used) = run_job(&place, QuantizeJob(&a, dtype))?;
    println!(
        "NF4 (double-quant) checkpoint written to {}: linears quantized from {} weights ({}), embedding and norms in {}",
        a.out.display(),
        used.torch_name(),
        if dtype.is_some() { "--dtype" } else { "the checkpoint's dtype" },
        used.torch_name()
    );
    Ok(0)
}

struct MergeJob<'a>(&'a MergeArgs, &'a str);

impl Job for MergeJob<'_> {
    type Out = afinar_gemma::export::ExportSummary;
    fn run<B: Backend>(self, be: Arc<B>) -> Result<Self::Out, Failure> {
        let a = self.0;
        Ok(infer::merge_on(be, &a.model, &a.adapter, &a.out, self.1)?)
    }
}

struct QuantizeJob<'a>(&'a QuantizeArgs, Option<afinar_gemma::export::ExportDtype>);

impl Job for QuantizeJob<'_> {
    type Out = (
        afinar_gemma::export::ExportSummary,
        afinar_gemma::export::ExportDtype,
    );
    fn run<B: Backend>(self, be: Arc<B>) -> Result<Self::Out, Failure> {
        Ok(infer::quantize_on(be, &self.0.model, &self.0.out, self.1)?)
    }
}
