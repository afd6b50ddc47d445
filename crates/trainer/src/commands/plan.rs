//! `afinar plan`: the predicted peak memory of a training run and what fits (afinar_trainer::plan).

use std::path::PathBuf;

use afinar_trainer::config::{Config, Device};
use afinar_trainer::plan;
use clap::Args;

use crate::{usage, Failure};

#[derive(Args)]
pub struct PlanArgs {
    /// Run config (TOML): the model and every setting come from it.
    #[arg(long, conflicts_with = "model", required_unless_present = "model")]
    config: Option<PathBuf>,
    /// A model directory, or a bare config.json of any Gemma-2 size, planned with the defaults of a
    /// config that names only the model, on cuda in bf16 (change any setting with --set).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Override one key: section.key=value (repeatable), e.g. --set train.micro_batch_size=4.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
    /// Memory to fit in, e.g. 24GiB, 80GB, 9109MiB. Default: the free memory of the GPU when the plan
    /// is for cuda and one is present; otherwise no fit is computed.
    #[arg(long)]
    memory: Option<String>,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

/// The config of `afinar plan --model PATH`: only model.path set, on cuda in bf16, then the overrides.
fn model_only_config(model: &std::path::Path, set: &[String]) -> Result<Config, Failure> {
    let path = toml::Value::String(model.display().to_string());
    let text = format!("[model]\npath = {path}\ndevice = \"cuda\"\ndtype = \"bf16\"\n");
    Config::from_toml_str(&text, "--model", set).map_err(usage)
}

pub fn cmd_plan(a: PlanArgs) -> Result<u8, Failure> {
    let cfg = match (&a.config, &a.model) {
        (Some(c), _) => Config::load(c, &a.set).map_err(usage)?,
        (None, Some(m)) => model_only_config(m, &a.set)?,
        (None, None) => return Err(usage(anyhow::anyhow!("give --config FILE or --model DIR"))),
    };
    let model_cfg = plan::read_model_config(&cfg.model.path).map_err(usage)?;
    let settings = plan::PlanSettings::from_config(&cfg);
    if settings.micro_batch == 0 || settings.seq_len == 0 {
        return Err(usage(anyhow::anyhow!(
            "train.micro_batch_size and data.max_seq_len must be ≥ 1"
        )));
    }
    let p = plan::plan(&model_cfg, &settings);
    let (memory, source) = match &a.memory {
        Some(m) => (
            Some(plan::parse_bytes(m).map_err(|e| usage(anyhow::anyhow!("--memory {e}")))?),
            "--memory",
        ),
        None if cfg.model.device == Device::Cuda => match afinar_trainer::device::gpu_memory() {
            // The probe's own context was alive when `free` was read, and the plan counts a
            // context too: add it back so that it is not counted twice.
            Some((free, _)) => (
                Some(free + plan::CUDA_CONTEXT_BYTES),
                "free on GPU 0 (+ the context the plan counts)",
            ),
            None => (None, ""),
        },
        None => (None, ""),
    };
    let fit = memory.map(|m| plan::fit(&model_cfg, &settings, m));
    if a.json {
        let v = serde_json::json!({ "plan": p, "fit": fit, "memory_source": source });
        println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
    } else {
        print!("{}", plan::plan_table(&p, fit.as_ref()));
        if !source.is_empty() && source != "--memory" {
            println!("(memory: {source})");
        }
    }
    Ok(0)
}
