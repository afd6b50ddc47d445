//! `afinar`: the command-line interface. Thin: parsing, output formatting and exit codes; the work is
//! in the library (afinar_trainer, afinar_gemma, afinar_data).
//!
//! Exit codes: 0 success; 1 runtime failure (bad data, I/O, non-finite stop, failed inspection);
//! 2 usage or config error (clap's own code too); 130 interrupted (a checkpoint was written).
//!
//! `AFINAR_PROFILE=1` profiles any command (see afinar_trainer::profile): `train` as `train.profile`
//! does; `eval` and `generate` print the table to stderr and write `$AFINAR_PROFILE_JSON` when set.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use std::sync::Arc;

use afinar_kernels::cpu::Cpu;
use afinar_kernels::profile::Profiled;
use afinar_kernels::Backend;
use afinar_trainer::config::Config;
use afinar_trainer::infer::{self, EvalOptions, SampleOptions};
use afinar_trainer::metrics::StopReason;
use afinar_trainer::profile;
use afinar_trainer::train::{self, Resume, TrainError, TrainOptions};

#[derive(Parser)]
#[command(
    name = "afinar",
    version,
    about = "LoRA/QLoRA fine-tuning of Gemma-2: train, eval, generate, merge, quantize"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train from a TOML config (see configs/).
    Train(TrainArgs),
    /// Loss and perplexity of a model (+ adapter) on a dataset (--data), and/or its behaviour on a
    /// suite, base vs adapter (--suite).
    Eval(EvalArgs),
    /// Generate answers with a model (+ adapter).
    Generate(GenerateArgs),
    /// Merge a LoRA adapter into the base weights (Hugging Face layout).
    Merge(MergeArgs),
    /// Write a bitsandbytes NF4 (double-quant) checkpoint.
    Quantize(QuantizeArgs),
    /// Create a randomly initialised Gemma-2 model directory (to pretrain from scratch).
    Init(InitArgs),
    /// Dataset tools.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
}

#[derive(Args)]
struct TrainArgs {
    /// Run config (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Override one key: section.key=value (repeatable), e.g. --set train.lr=1e-4.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Continue a run: a run directory, a checkpoint directory, or `auto` (this config's run dir, if it
    /// has a checkpoint).
    #[arg(long, value_name = "RUN_DIR|auto")]
    resume: Option<String>,
    /// Parent directory of run directories (overrides output.dir).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Run directory name (overrides output.run_name).
    #[arg(long)]
    run_name: Option<String>,
    /// Replace an existing run directory.
    #[arg(long)]
    overwrite: bool,
    /// No progress output.
    #[arg(long)]
    quiet: bool,
    /// Print the final summary as JSON.
    #[arg(long)]
    json: bool,
    /// Data-parallel training on N local GPUs: starts N ranks (this command, one process per GPU,
    /// with the torchrun variables set; rank 0 writes the run). Needs model.device = "cuda" and a
    /// build with `--features nccl`. Multi-node: start one process per GPU with RANK, WORLD_SIZE,
    /// LOCAL_RANK, MASTER_ADDR and MASTER_PORT set (e.g. by torchrun) and no --nproc.
    #[arg(long, value_name = "N")]
    nproc: Option<usize>,
}

#[derive(Args)]
struct EvalArgs {
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
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GenerateArgs {
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
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
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
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct MergeArgs {
    /// Base model directory.
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter directory.
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory (written atomically; tokenizer files copied).
    #[arg(long)]
    out: PathBuf,
    /// bf16 | f32
    #[arg(long, default_value = "bf16")]
    dtype: String,
}

#[derive(Args)]
struct QuantizeArgs {
    /// Dense model directory.
    #[arg(long)]
    model: PathBuf,
    /// Output directory for the NF4 checkpoint.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct InitArgs {
    /// Directory holding tokenizer.json (+ tokenizer_config.json); the vocabulary size comes from it.
    #[arg(long)]
    tokenizer: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    #[arg(long, default_value_t = 512)]
    intermediate: usize,
    #[arg(long, default_value_t = 4)]
    layers: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    #[arg(long, default_value_t = 32)]
    head_dim: usize,
    #[arg(long, default_value_t = 128)]
    sliding_window: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Subcommand)]
enum DataCmd {
    /// Render samples with the trained tokens marked and print dataset statistics. Exits 1 if a sample
    /// has no trained token or an assistant turn lacks its trained end-of-turn token.
    Inspect(InspectArgs),
}

#[derive(Args)]
struct InspectArgs {
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    format: Option<String>,
    #[arg(long, default_value = "gemma")]
    template: String,
    /// tokenizer.json (its tokenizer_config.json beside it is read when present).
    #[arg(long, conflicts_with = "model", required_unless_present = "model")]
    tokenizer: Option<PathBuf>,
    /// A model directory holding tokenizer.json.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    /// assistant | all | last-turn
    #[arg(long, default_value = "assistant")]
    mask: String,
    /// truncate | drop | error
    #[arg(long, default_value = "truncate")]
    overflow: String,
    /// Samples to render.
    #[arg(long, default_value_t = 3)]
    samples: usize,
    #[arg(long)]
    json: bool,
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    err: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: 1,
            err: e.into(),
        }
    }
}

fn usage(e: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 2,
        err: e.into(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Train(a) => cmd_train(a),
        Cmd::Eval(a) => cmd_eval(a),
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Merge(a) => cmd_merge(a),
        Cmd::Quantize(a) => cmd_quantize(a),
        Cmd::Init(a) => cmd_init(a),
        Cmd::Data {
            cmd: DataCmd::Inspect(a),
        } => cmd_inspect(a),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("error: {}", render_error(&f.err));
            ExitCode::from(f.code)
        }
    }
}

/// The error and its causes, "a: b: c", skipping a cause whose text the message already holds (most
/// library errors print their source themselves, and `{:#}` would repeat it).
fn render_error(err: &anyhow::Error) -> String {
    let mut msg = err.to_string();
    for cause in err.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn cmd_train(a: TrainArgs) -> Result<u8, Failure> {
    let mut overrides = a.set.clone();
    if let Some(o) = &a.output {
        overrides.push(format!("output.dir={}", o.display()));
    }
    if let Some(n) = &a.run_name {
        overrides.push(format!("output.run_name={n}"));
    }
    let config = Config::load(&a.config, &overrides).map_err(usage)?;
    let resume = match a.resume.as_deref() {
        None => None,
        Some("auto") => Some(Resume::Auto),
        Some(p) => Some(Resume::Dir(PathBuf::from(p))),
    };
    let world = afinar_trainer::dist::WorldEnv::from_env().map_err(usage)?;
    if let (Some(n), None) = (a.nproc, &world) {
        if n != 1 {
            let cuda = config.model.device == afinar_trainer::config::Device::Cuda;
            let r = afinar_trainer::dist::launch::launch_train(n, cuda);
            return r.map_err(|e| Failure {
                code: e.exit_code(),
                err: e.into(),
            });
        }
    }
    let opts = TrainOptions {
        config,
        resume,
        overwrite: a.overwrite,
        quiet: a.quiet,
        stop_after: None,
    };
    let result = match &world {
        Some(w) => train::train_rank(&opts, w),
        None => train::train(&opts).map(Some),
    };
    let out = match result {
        // A rank other than 0: rank 0 reports the run.
        Ok(None) => return Ok(0),
        Ok(Some(o)) => o,
        Err(e) => {
            let code = match e {
                TrainError::Config(_)
                | TrainError::Invalid { .. }
                | TrainError::RunDirExists(_)
                | TrainError::NothingToResume(_)
                | TrainError::ConfigMismatch { .. }
                | TrainError::Unsupported(_) => 2,
                _ => 1,
            };
            return Err(Failure {
                code,
                err: e.into(),
            });
        }
    };
    let s = &out.summary;
    if a.json {
        let mut v = serde_json::to_value(s).expect("summary serializes");
        v["run_dir"] = out.run_dir.display().to_string().into();
        v["checkpoint"] = out.checkpoint.display().to_string().into();
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("summary serializes")
        );
    } else {
        let f = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
        println!(
            "{}: {}/{} steps, train loss {} → {}, eval loss {} → {}, {:.0} tokens/s, {:.1} s; run dir {}",
            if s.stop_reason == StopReason::Completed { "done" } else { "stopped" },
            s.steps,
            s.total_steps,
            f(s.first_train_loss),
            f(s.final_train_loss),
            f(s.initial_eval_loss),
            f(s.final_eval_loss),
            s.tokens_per_s,
            s.elapsed_s,
            out.run_dir.display()
        );
        if let Some(e) = &s.evaluation {
            println!("{} (report.md)", e.one_line());
        }
    }
    match s.stop_reason {
        StopReason::Completed => Ok(0),
        StopReason::Interrupted => {
            let mut cmd = format!(
                "afinar train --config {}",
                shell_quote(&a.config.display().to_string())
            );
            for o in &a.set {
                cmd.push_str(&format!(" --set {}", shell_quote(o)));
            }
            cmd.push_str(&format!(
                " --resume {}",
                shell_quote(&out.run_dir.display().to_string())
            ));
            eprintln!(
                "interrupted at step {}; checkpoint written to {}",
                s.steps,
                out.checkpoint.display()
            );
            eprintln!("resume with: {cmd}");
            Ok(130)
        }
        StopReason::NonFinite => {
            eprintln!(
                "stopped: {} consecutive steps had a non-finite loss or gradient norm (see the skipped steps and their \
                 samples in {}/metrics.jsonl). Lower train.lr, set train.max_grad_norm, or check those samples.",
                train::MAX_NONFINITE_IN_ROW,
                out.run_dir.display()
            );
            Ok(1)
        }
    }
}

fn parse_quant(q: &str) -> Result<bool, Failure> {
    match q {
        "nf4" => Ok(true),
        "none" => Ok(false),
        _ => Err(usage(anyhow::anyhow!(
            "--quantization {q:?}: expected nf4 or none"
        ))),
    }
}

fn check_model_dir(p: &Path) -> Result<(), Failure> {
    if !p.join("config.json").is_file() {
        return Err(usage(anyhow::anyhow!(
            "--model {}: not a model directory (no config.json)",
            p.display()
        )));
    }
    Ok(())
}

fn cmd_eval(a: EvalArgs) -> Result<u8, Failure> {
    check_model_dir(&a.model)?;
    let nf4 = parse_quant(&a.quantization)?;
    if let Some(suite) = &a.suite {
        return cmd_eval_suite(&a, suite, nf4);
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
        max_seq_len: a.max_seq_len,
        batch_size: a.batch_size,
    };
    // `AFINAR_PROFILE=1`: the whole evaluation is one profiler step.
    let r = if profile::env_enabled() {
        eval_on_backend(Arc::new(Profiled::new(Cpu::new())?), &a, nf4, &tok, &o)?
    } else {
        eval_on_backend(Arc::new(Cpu::new()), &a, nf4, &tok, &o)?
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r).expect("serializes"));
    } else {
        println!(
            "loss {:.4}  perplexity {:.3}  tokens {}  samples {}",
            r.loss, r.perplexity, r.tokens, r.samples
        );
    }
    Ok(0)
}

/// `afinar eval --suite`: behaviour base vs adapter (markdown, or JSON with --json).
fn cmd_eval_suite(a: &EvalArgs, suite: &Path, nf4: bool) -> Result<u8, Failure> {
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
            a.max_seq_len,
        )
        .map_err(|m| usage(anyhow::anyhow!(m)))?;
    let e = suite::evaluate_standalone(&o)?;
    if a.json {
        let v = serde_json::json!({ "summary": e.summary(), "evaluation": e });
        println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
    } else {
        print!("{}", suite::evaluation_md(&e));
    }
    Ok(0)
}

fn eval_on_backend<B: Backend>(
    be: Arc<B>,
    a: &EvalArgs,
    nf4: bool,
    tok: &afinar_data::TextTokenizer,
    o: &EvalOptions,
) -> Result<infer::EvalResult, Failure> {
    let model = infer::load_model_on(be.clone(), &a.model, a.adapter.as_deref(), nf4)?;
    let r = profile::step(&*be, || infer::eval_file(&model, tok, o))?;
    profile::finish(&*be)?;
    Ok(r)
}

fn cmd_generate(a: GenerateArgs) -> Result<u8, Failure> {
    // Checked before loading the model (afinar-gemma checks it again when generating).
    if !(a.repetition_penalty > 0.0 && a.repetition_penalty.is_finite()) {
        return Err(usage(anyhow::anyhow!(
            "--repetition-penalty must be finite and > 0 (1 = off), found {}",
            a.repetition_penalty
        )));
    }
    check_model_dir(&a.model)?;
    let nf4 = parse_quant(&a.quantization)?;
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
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        repetition_penalty: a.repetition_penalty,
        no_repeat_ngram_size: a.no_repeat_ngram_size,
    };
    // `AFINAR_PROFILE=1`: each prompt is one profiler step.
    let job = (&a, nf4, &tok, &template, &prompts[..], &s);
    let outs = if profile::env_enabled() {
        generate_on_backend(Arc::new(Profiled::new(Cpu::new())?), job)?
    } else {
        generate_on_backend(Arc::new(Cpu::new()), job)?
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outs).expect("serializes")
        );
    }
    Ok(0)
}

type GenerateJob<'a> = (
    &'a GenerateArgs,
    bool,
    &'a afinar_data::TextTokenizer,
    &'a afinar_data::Template,
    &'a [infer::Prompt],
    &'a SampleOptions,
);

fn generate_on_backend<B: Backend>(
    be: Arc<B>,
    (a, nf4, tok, template, prompts, s): GenerateJob<'_>,
) -> Result<Vec<infer::GenOutput>, Failure> {
    let model = infer::load_model_on(be.clone(), &a.model, a.adapter.as_deref(), nf4)?;
    let mut outs = Vec::new();
    for p in prompts {
        let g = profile::step(&*be, || infer::generate_answer(&model, tok, template, p, s))?;
        if !a.json {
            println!("### {}\n{}\n", g.prompt, g.completion);
        }
        outs.push(g);
    }
    profile::finish(&*be)?;
    Ok(outs)
}

/// `--out` of merge/quantize must not hold anything yet: the export replaces its target directory
/// wholesale, so `--out .` or `--out runs` would otherwise delete what was there.
fn check_out_dir(out: &Path) -> Result<(), Failure> {
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

fn cmd_merge(a: MergeArgs) -> Result<u8, Failure> {
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
    infer::merge(&a.model, &a.adapter, &a.out, &dtype)?;
    println!("merged model written to {}", a.out.display());
    Ok(0)
}

fn cmd_quantize(a: QuantizeArgs) -> Result<u8, Failure> {
    check_model_dir(&a.model)?;
    check_out_dir(&a.out)?;
    infer::quantize(&a.model, &a.out)?;
    println!(
        "NF4 (double-quant) checkpoint written to {}",
        a.out.display()
    );
    Ok(0)
}

fn cmd_init(a: InitArgs) -> Result<u8, Failure> {
    if !a.tokenizer.join("tokenizer.json").is_file() {
        return Err(usage(anyhow::anyhow!(
            "--tokenizer {}: no tokenizer.json there",
            a.tokenizer.display()
        )));
    }
    if a.out.exists() {
        return Err(usage(anyhow::anyhow!(
            "--out {} already exists; nothing was changed",
            a.out.display()
        )));
    }
    let s = infer::InitShape {
        hidden: a.hidden,
        intermediate: a.intermediate,
        layers: a.layers,
        heads: a.heads,
        kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        sliding_window: a.sliding_window,
        seed: a.seed,
    };
    infer::init_model(&a.tokenizer, &a.out, &s)?;
    println!("random Gemma-2 written to {}", a.out.display());
    Ok(0)
}

fn cmd_inspect(a: InspectArgs) -> Result<u8, Failure> {
    if !a.data.is_file() {
        return Err(usage(anyhow::anyhow!(
            "--data {}: no such file",
            a.data.display()
        )));
    }
    let tok = match (&a.tokenizer, &a.model) {
        (Some(t), _) => {
            let cfg = t.with_file_name("tokenizer_config.json");
            afinar_data::TextTokenizer::from_files(t, cfg.is_file().then_some(cfg.as_path()))?
        }
        (None, Some(m)) => afinar_data::TextTokenizer::from_model_dir(m)?,
        (None, None) => {
            return Err(usage(anyhow::anyhow!(
                "give --tokenizer FILE or --model DIR"
            )))
        }
    };
    let opts = afinar_data::InspectOptions {
        data: a.data.clone(),
        format: a
            .format
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(usage)?,
        template: a.template.parse().map_err(usage)?,
        mask: a.mask.parse().map_err(usage)?,
        max_seq_len: a.max_seq_len,
        overflow: a.overflow.parse().map_err(usage)?,
        samples: a.samples,
    };
    let r = afinar_data::inspect(&opts, &tok)?;
    if a.json {
        let samples: Vec<serde_json::Value> = r
            .samples
            .iter()
            .map(|s| {
                serde_json::json!({
                    "loc": s.loc.to_string(),
                    "tokens": s.tokens,
                    "trained": s.trained,
                    "truncated": s.truncated,
                    "pieces": s.pieces.iter().map(|p| serde_json::json!({"text": p.text, "trained": p.trained})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let v = serde_json::json!({
            "path": r.path,
            "format": r.format.name(),
            "template": r.template.name(),
            "max_seq_len": r.max_seq_len,
            "stats": r.stats,
            "trained_share": r.stats.trained_share(),
            "mean_len": r.mean_len,
            "histogram": r.histogram.iter().map(|b| serde_json::json!({"lo": b.lo, "hi": b.hi, "count": b.count})).collect::<Vec<_>>(),
            "samples": samples,
            "problems": r.problems.iter().map(|p| serde_json::json!({"loc": p.loc.to_string(), "message": p.message})).collect::<Vec<_>>(),
            "problem_count": r.problem_count,
            "passed": r.passed(),
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
    } else {
        let mut out = std::io::stdout().lock();
        afinar_data::render_report(&r, &mut out, std::io::stdout().is_terminal())?;
    }
    Ok(if r.passed() { 0 } else { 1 })
}
