//! `afinar`: the command-line interface. Thin: parsing, output formatting and exit codes; the work is
//! in the library (afinar_trainer, afinar_gemma, afinar_data).
//!
//! Exit codes: 0 success; 1 runtime failure (bad data, I/O, non-finite stop, failed inspection);
//! 2 usage or config error (clap's own code too); 130 interrupted (a checkpoint was written).
//!
//! `AFINAR_PROFILE=1` profiles any command (see afinar_trainer::profile): `train` as `train.profile`
//! does; `eval` and `generate` print the table to stderr and write `$AFINAR_PROFILE_JSON` when set.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod commands;

use afinar_trainer::config::Config;
use afinar_trainer::infer;
use afinar_trainer::metrics::StopReason;
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
    Eval(commands::infer::EvalArgs),
    /// Generate answers with a model (+ adapter).
    Generate(commands::infer::GenerateArgs),
    /// Merge a LoRA adapter into the base weights (Hugging Face layout).
    Merge(commands::infer::MergeArgs),
    /// Write a bitsandbytes NF4 (double-quant) checkpoint.
    Quantize(commands::infer::QuantizeArgs),
    /// Create a randomly initialised Gemma-2 model directory (to pretrain from scratch).
    Init(InitArgs),
    /// Predicted peak memory of a training run, broken down, and the longest sequence and largest
    /// micro-batch that fit (--memory, or the GPU's free memory).
    Plan(commands::plan::PlanArgs),
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
    /// Start even when the memory plan (`afinar plan`) exceeds the GPU's free memory.
    #[arg(long)]
    force: bool,
    /// Data-parallel training on N local GPUs: starts N ranks (this command, one process per GPU,
    /// with the torchrun variables set; rank 0 writes the run). Needs model.device = "cuda" and a
    /// build with `--features nccl`. Multi-node: start one process per GPU with RANK, WORLD_SIZE,
    /// LOCAL_RANK, MASTER_ADDR and MASTER_PORT set (e.g. by torchrun) and no --nproc.
    #[arg(long, value_name = "N")]
    nproc: Option<usize>,
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
    Inspect(commands::inspect::InspectArgs),
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
        Cmd::Eval(a) => commands::infer::cmd_eval(a),
        Cmd::Generate(a) => commands::infer::cmd_generate(a),
        Cmd::Merge(a) => commands::infer::cmd_merge(a),
        Cmd::Quantize(a) => commands::infer::cmd_quantize(a),
        Cmd::Init(a) => cmd_init(a),
        Cmd::Plan(a) => commands::plan::cmd_plan(a),
        Cmd::Data {
            cmd: DataCmd::Inspect(a),
        } => commands::inspect::cmd_inspect(a),
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
        force: a.force,
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
                | TrainError::Unsupported(_)
                | TrainError::WouldNotFit(_) => 2,
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
