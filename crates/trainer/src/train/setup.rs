//! What a run builds before its first step: the model's config.json (read once), the data loaders
//! with the planned step count, the model, and the fresh trainer state.

use std::sync::Arc;

use afinar_data::{DataConfig, DataLoader, LoaderConfig, TextTokenizer};
use afinar_gemma::{
    Gemma2Config, Gemma2Model, LoadOptions, LoraConfig, Quantization as GQuant, TensorStore,
};
use afinar_kernels::Backend;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use super::{Result, TrainError};
use crate::checkpoint::{Cursor, RngState, TrainerState};
use crate::config::{Config, Quantization};
use crate::schedule;

/// SHA-256 over the resume-relevant keys of the config.
pub fn config_hash(cfg: &Config) -> String {
    let mut h = Sha256::new();
    for (k, v) in cfg.flatten() {
        if Config::is_resume_relevant(&k) {
            h.update(k.as_bytes());
            h.update(b"=");
            h.update(v.as_bytes());
            h.update(b"\n");
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The data-crate view of `[data]`.
pub fn data_config(cfg: &Config) -> DataConfig {
    let d = &cfg.data;
    let mut dc = DataConfig::new(&d.train, d.template);
    dc.format = d.format;
    dc.mask = d.mask;
    dc.template_date = d.template_date;
    dc.max_seq_len = d.max_seq_len;
    dc.overflow = d.length_strategy;
    if !d.eval.as_os_str().is_empty() {
        dc.eval_path = Some(d.eval.clone());
    } else if d.eval_fraction > 0.0 {
        dc.eval_fraction = Some(d.eval_fraction);
    }
    dc.split_seed = d.seed;
    if !d.replay.as_os_str().is_empty() {
        dc.replay_path = Some(d.replay.clone());
    }
    dc
}

/// The tokens a template spends on a minimal one-character exchange: `max_seq_len` must leave room for
/// more than that.
pub fn template_overhead(template: &afinar_data::Template, tok: &TextTokenizer) -> Option<usize> {
    let body = afinar_data::Body::Instruction {
        system: None,
        instruction: "a".into(),
        input: String::new(),
        output: "a".into(),
    };
    afinar_data::encode_record(&body, template, tok, afinar_data::MaskMode::Assistant)
        .ok()
        .map(|e| e.ids.len())
}

/// The LoRA config of the model section.
pub fn lora_config(cfg: &Config) -> Result<Option<LoraConfig>> {
    if cfg.model.full_finetune {
        return Ok(None);
    }
    let l = &cfg.lora;
    let targets: Vec<&str> = l.targets.iter().map(|t| t.name()).collect();
    Ok(Some(LoraConfig::new(
        l.r,
        l.alpha as f64,
        l.dropout as f64,
        l.rslora,
        &targets,
    )?))
}

pub fn load_options(cfg: &Config) -> Result<LoadOptions> {
    Ok(LoadOptions {
        quantize: match cfg.model.quantization {
            Quantization::None => GQuant::None,
            Quantization::Nf4 => GQuant::Nf4 {
                double_quant: cfg.model.double_quant,
            },
        },
        lora: lora_config(cfg)?,
        full_finetune: cfg.model.full_finetune,
        seed: cfg.train.seed,
        progress: false,
    })
}

/// The model's config.json, parsed once per run. Settings that training would not reproduce are
/// refused here, before the (large) load.
pub(super) fn read_model_config(cfg: &Config) -> Result<Gemma2Config> {
    let path = afinar_gemma::config::config_path(&cfg.model.path);
    let model_cfg = Gemma2Config::from_file(&path)?;
    model_cfg.check_trainable(&path)?;
    Ok(model_cfg)
}

/// Loads the base model of `[model]` with the already-parsed `model_cfg` (LoRA factors added, targets
/// quantized as configured). `progress`: the loader's bar on a terminal, else plain progress lines and
/// a summary line (time, GB/s, host peak RSS) on stderr.
pub(super) fn load_model<B: Backend>(
    backend: Arc<B>,
    cfg: &Config,
    model_cfg: Gemma2Config,
    progress: bool,
) -> Result<Gemma2Model<B>> {
    let store = TensorStore::open_dir(&cfg.model.path)?;
    let opts = LoadOptions {
        progress,
        ..load_options(cfg)?
    };
    let mut model = Gemma2Model::from_store(backend, model_cfg, &store, &opts)?;
    model.checkpointing = cfg.train.gradient_checkpointing;
    Ok(model)
}

/// Everything prepared before the first step.
pub(super) struct Prepared {
    pub train: DataLoader,
    pub eval: Option<DataLoader>,
    pub total_steps: u64,
    pub warmup_steps: u64,
}

/// Tokenizes the data, builds the loaders and plans the run's length and warmup.
/// `world_size` ranks train together: the loaders' batches are the global micro-batches
/// (world_size · train.micro_batch_size rows), of which each rank trains its slice.
pub(super) fn prepare_data(
    cfg: &Config,
    model_cfg: &Gemma2Config,
    world_size: usize,
) -> Result<Prepared> {
    // A row longer than the model's positions is outside what it was trained for, and with packing a
    // huge max_seq_len would be allocated as is for every batch.
    if cfg.data.max_seq_len > model_cfg.max_position_embeddings {
        return Err(TrainError::Invalid {
            key: "data.max_seq_len".into(),
            reason: format!(
                "{} exceeds the model's max_position_embeddings = {} ({})",
                cfg.data.max_seq_len,
                model_cfg.max_position_embeddings,
                afinar_gemma::config::config_path(&cfg.model.path).display()
            ),
        });
    }
    let tokenizer = TextTokenizer::from_model_dir(&cfg.model.path)?;
    let dc = data_config(cfg);
    let template = afinar_data::Template::new(dc.template, &tokenizer)?;
    if let Some(over) = template_overhead(&template, &tokenizer) {
        if cfg.data.max_seq_len <= over {
            return Err(TrainError::Invalid {
                key: "data.max_seq_len".into(),
                reason: format!(
                    "{} is not above the {} template's own length ({over} tokens for a one-character exchange)",
                    cfg.data.max_seq_len, cfg.data.template
                ),
            });
        }
    }
    let prepared = afinar_data::prepare(&dc, &tokenizer)?;
    let t = &cfg.train;
    let loader_cfg = |shuffle| LoaderConfig {
        batch_size: t.micro_batch_size * world_size,
        packing: cfg.data.packing,
        shuffle,
        seed: cfg.data.seed,
        drop_last: false,
    };
    let pad = tokenizer.pad_id();
    let train = DataLoader::new(prepared.train, cfg.data.max_seq_len, pad, loader_cfg(true))?;
    let eval = match prepared.eval {
        Some(e) if !e.samples.is_empty() => Some(DataLoader::new(
            e,
            cfg.data.max_seq_len,
            pad,
            loader_cfg(false),
        )?),
        _ => None,
    };
    let per_epoch = train.batches_per_epoch();
    let total_steps = if t.max_steps > 0 {
        t.max_steps
    } else {
        ((t.epochs * per_epoch as f64) / t.grad_accum as f64)
            .ceil()
            .max(1.0) as u64
    };
    let warmup_steps = schedule::warmup_steps(total_steps, t.warmup_steps, t.warmup_ratio);
    if warmup_steps >= total_steps
        && warmup_steps > 0
        && t.schedule != crate::config::ScheduleKind::Constant
    {
        return Err(TrainError::Invalid {
            key: if t.warmup_steps > 0 { "train.warmup_steps" } else { "train.warmup_ratio" }.into(),
            reason: format!("warmup of {warmup_steps} steps is not shorter than the {total_steps} training steps"),
        });
    }
    Ok(Prepared {
        train,
        eval,
        total_steps,
        warmup_steps,
    })
}

/// The state of a run before its first step: nothing done, the planned length, the dropout RNG seeded
/// from `train.seed`.
pub(super) fn fresh_state(cfg: &Config, data: &Prepared) -> TrainerState {
    TrainerState {
        step: 0,
        adam_t: 0,
        total_steps: data.total_steps,
        warmup_steps: data.warmup_steps,
        cursor: Cursor::default(),
        rng: RngState::capture(&ChaCha8Rng::seed_from_u64(cfg.train.seed)),
        nonfinite_in_row: 0,
        tokens: 0,
        elapsed_s: 0.0,
        config_hash: config_hash(cfg),
        last_eval_loss: None,
        loss_scale: None,
        world_size: 1,
        cursor_origin: None,
    }
}
