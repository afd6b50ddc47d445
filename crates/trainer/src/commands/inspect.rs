//! `afinar data inspect`: samples with the trained tokens marked, and dataset statistics.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;

use crate::{usage, Failure};

#[derive(Args)]
pub struct InspectArgs {
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

pub fn cmd_inspect(a: InspectArgs) -> Result<u8, Failure> {
    if !a.data.is_file() {
        return Err(usage(anyhow::anyhow!(
            "--data {}: no such file",
            a.data.display()
        )));
    }
    let tok = match (&a.tokenizer, &a.model) {
        (Some(t), _) if t.is_dir() => {
            let hint = if t.join("tokenizer.json").is_file() {
                format!(
                    "pass its tokenizer.json (--tokenizer {}) or the model directory with --model {}",
                    t.join("tokenizer.json").display(),
                    t.display()
                )
            } else {
                "it holds no tokenizer.json either; pass a tokenizer.json file, or a model directory with --model".into()
            };
            return Err(usage(anyhow::anyhow!(
                "--tokenizer {} is a directory: {hint}",
                t.display()
            )));
        }
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
