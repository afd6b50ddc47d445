//! The SFT loop.
//!
//! One optimizer step (`step` counts them, 0-based before the update):
//! 1. take `grad_accum` micro-batches from the loader and COUNT the trained targets of the whole window
//!    first (`count`);
//! 2. zero the gradients, then run `forward_backward` on each micro-batch with grad_scale = 1/count, so
//!    the accumulated gradient is that of (Σ CE over the window) / count — accumulation 4 × micro-batch 1
//!    equals micro-batch 4 exactly, unlike a per-micro-batch mean divided by 4;
//! 3. loss = Σ CE / count; grad_norm = ‖g‖₂ over all trainable tensors (f64);
//! 4. non-finite loss or norm: skip the update (the schedule still advances; AdamW's t does not), log the
//!    samples of the window; after [`MAX_NONFINITE_IN_ROW`] in a row, stop;
//!    With dynamic loss scaling (`train.loss_scaling`, crate::loss_scale) the backward runs with
//!    grad_scale = S/count, the gradients are divided by S before the norm, and a step whose gradients
//!    alone are not finite is an overflow: skipped, S halves, and it does not count toward the stop
//!    unless S is already at its floor of 1;
//! 5. clip with torch's `clip_grad_norm_` (g ·= min(1, max/(norm+1e-6)), always multiplied), then AdamW
//!    (torch semantics, f32 state) with lr = base · lambda(step) (transformers schedules: the first update
//!    uses lambda(0)).
//!
//! Exact resume: a checkpoint holds the trainable tensors, AdamW m/v and t, the step, the loader cursor
//! and the dropout RNG; everything else (LoRA init, data order) is a pure function of the config, which
//! must match. On CPU, N straight steps and k steps + resume to N give bit-identical numbers.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use afinar_data::{DataConfig, DataLoader, LoaderConfig, TextTokenizer};
use afinar_gemma::{Gemma2Model, LoadOptions, LoraConfig, Quantization as GQuant};
use afinar_kernels::{clip_coef, AdamW, Backend};

use crate::loss_scale::DynamicLossScaler;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::checkpoint::{
    self, Checkpoint, CheckpointError, Cursor, RngState, TensorState, TrainerState,
};
use crate::config::{Config, ConfigError, Device, Quantization};
use crate::metrics::{self, Ema, MetricsError, MetricsWriter, StepRecord, StopReason, Summary};
use crate::plot::{self, PlotError};
use crate::progress::Progress;
use crate::schedule::{self, Schedule};
use crate::signal;

/// Consecutive non-finite steps after which the run stops.
pub const MAX_NONFINITE_IN_ROW: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Data(#[from] afinar_data::DataError),
    #[error(transparent)]
    Model(#[from] afinar_gemma::GemmaError),
    #[error(transparent)]
    Kernel(#[from] afinar_kernels::KernelError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Plot(#[from] PlotError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "run directory {} already exists; nothing was changed. Continue it with `--resume {}` (or `--resume auto`), \
         replace it with `--overwrite`, or pick another `--run-name`",
        .0.display(), .0.display()
    )]
    RunDirExists(PathBuf),
    #[error(
        "run directory {} exists but holds no checkpoint to resume (the run stopped before its first save); \
         nothing was changed. Start over with `--overwrite`, or pick another `--run-name`",
        .0.display()
    )]
    NothingToResume(PathBuf),
    #[error("checkpoint {} was written with a different config; differing keys (checkpoint → now):\n{diff}", .path.display())]
    ConfigMismatch { path: PathBuf, diff: String },
    #[error("checkpoint {}: {message}", .path.display())]
    BadCheckpoint { path: PathBuf, message: String },
    #[error("invalid config value `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, TrainError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `--resume`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Resume the run directory's newest checkpoint if there is one, else start fresh.
    Auto,
    /// A run directory (its newest checkpoint) or one checkpoint directory.
    Dir(PathBuf),
}

/// Everything `afinar train` passes in.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub config: Config,
    pub resume: Option<Resume>,
    /// Replace an existing run directory.
    pub overwrite: bool,
    /// No progress output (tests).
    pub quiet: bool,
    /// Stop (as if interrupted) after this many optimizer steps of this process (tests of resume).
    pub stop_after: Option<u64>,
}

/// What a finished (or stopped) run leaves.
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    pub run_dir: PathBuf,
    pub summary: Summary,
    /// Per-step records of the whole run (also in metrics.jsonl).
    pub records: Vec<StepRecord>,
    /// The final checkpoint directory.
    pub checkpoint: PathBuf,
}

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
pub fn data_config(cfg: &Config) -> Result<DataConfig> {
    let d = &cfg.data;
    let inv = |key: &str, e: afinar_data::DataError| TrainError::Invalid {
        key: key.into(),
        reason: e.to_string(),
    };
    let mut dc = DataConfig::new(
        &d.train,
        d.template.parse().map_err(|e| inv("data.template", e))?,
    );
    dc.format = if d.format == "auto" {
        None
    } else {
        Some(d.format.parse().map_err(|e| inv("data.format", e))?)
    };
    dc.mask = d.mask.parse().map_err(|e| inv("data.mask", e))?;
    if !d.template_date.is_empty() {
        dc.template_date =
            Some(
                d.template_date
                    .parse()
                    .map_err(|e: String| TrainError::Invalid {
                        key: "data.template_date".into(),
                        reason: e,
                    })?,
            );
    }
    dc.max_seq_len = d.max_seq_len;
    dc.overflow = match d.length_strategy {
        crate::config::LengthStrategy::Truncate => afinar_data::Overflow::Truncate,
        crate::config::LengthStrategy::Drop => afinar_data::Overflow::Drop,
        crate::config::LengthStrategy::Error => afinar_data::Overflow::Error,
    };
    if !d.eval.as_os_str().is_empty() {
        dc.eval_path = Some(d.eval.clone());
    } else if d.eval_fraction > 0.0 {
        dc.eval_fraction = Some(d.eval_fraction);
    }
    dc.split_seed = d.seed;
    Ok(dc)
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
    Ok(Some(LoraConfig::new(
        l.r,
        l.alpha as f64,
        l.dropout as f64,
        l.rslora,
        &l.resolved_targets(),
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

/// Converts a loader batch into the model's (shifted targets, per-sample positions, segments).
pub fn model_batch(b: &afinar_data::Batch, dropout_seed: u64) -> afinar_gemma::Batch {
    afinar_gemma::Batch {
        b: b.b,
        t: b.t,
        input_ids: b.input_ids.clone(),
        positions: b.position_ids.clone(),
        segment_ids: Some(b.segment_ids.clone()),
        targets: b.shifted_labels(),
        dropout_seed,
    }
}

/// [`accumulate_scaled`] with loss scale 1.
pub fn accumulate<B: Backend>(
    model: &Gemma2Model<B>,
    grads: &mut afinar_gemma::Grads<B>,
    window: &[afinar_data::Batch],
    rng: &mut ChaCha8Rng,
) -> Result<(f64, usize)> {
    accumulate_scaled(model, grads, window, rng, 1.0)
}

/// Zeroes `grads`, then accumulates the gradient of (Σ CE over the window) / (trained targets of the
/// whole window) over the micro-batches of `window`. Returns (Σ CE, count). One dropout seed is drawn
/// from `rng` per micro-batch (also for a batch with nothing to train, so the RNG stream does not depend
/// on the data). `loss_scale` multiplies the gradients (not the returned loss): grad_scale =
/// loss_scale / count; with a power-of-two scale, S/count is exactly S·(1/count) in f32.
pub fn accumulate_scaled<B: Backend>(
    model: &Gemma2Model<B>,
    grads: &mut afinar_gemma::Grads<B>,
    window: &[afinar_data::Batch],
    rng: &mut ChaCha8Rng,
    loss_scale: f32,
) -> Result<(f64, usize)> {
    let count: usize = window.iter().map(|b| b.num_trained).sum();
    grads.zero()?;
    let mut loss_sum = 0.0f64;
    for b in window {
        let seed = rng.next_u64();
        if b.num_trained == 0 {
            continue;
        }
        let (s, _) = model.forward_backward(
            &model_batch(b, seed),
            loss_scale / count.max(1) as f32,
            grads,
        )?;
        loss_sum += s;
    }
    Ok((loss_sum, count))
}

/// Mean eval loss (Σ CE / scored tokens over the whole eval set) and the token count.
pub fn evaluate<B: Backend>(model: &Gemma2Model<B>, loader: &DataLoader) -> Result<(f64, usize)> {
    let (mut sum, mut count) = (0.0f64, 0usize);
    for b in loader.epoch_batches(0) {
        if b.num_trained == 0 {
            continue;
        }
        let (s, n) = model.loss(&model_batch(&b, 0))?;
        sum += s;
        count += n;
    }
    Ok((
        if count > 0 {
            sum / count as f64
        } else {
            f64::NAN
        },
        count,
    ))
}

/// Everything prepared before the first step.
struct Prepared {
    train: DataLoader,
    eval: Option<DataLoader>,
    total_steps: u64,
    warmup_steps: u64,
}

fn prepare_data(cfg: &Config) -> Result<Prepared> {
    // A row longer than the model's positions is outside what it was trained for, and with packing a
    // huge max_seq_len would be allocated as is for every batch.
    let model_cfg =
        afinar_gemma::Gemma2Config::from_file(afinar_gemma::config::config_path(&cfg.model.path))?;
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
    let dc = data_config(cfg)?;
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
        batch_size: t.micro_batch_size,
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

/// Where a run's files go, and what to resume from.
fn resolve_run_dir(opts: &TrainOptions) -> Result<(PathBuf, Option<PathBuf>)> {
    let cfg = &opts.config;
    let default_dir = cfg.output.dir.join(&cfg.output.run_name);
    match &opts.resume {
        Some(Resume::Dir(p)) => {
            // A checkpoint directory or a run directory.
            if p.join("trainer_state.json").is_file() {
                let run = p
                    .parent()
                    .and_then(Path::parent)
                    .map(Path::to_path_buf)
                    .ok_or_else(|| TrainError::BadCheckpoint {
                        path: p.clone(),
                        message: "a checkpoint must live in RUN/checkpoints/".into(),
                    })?;
                Ok((run, Some(p.clone())))
            } else {
                let ck = checkpoint::latest(&p.join("checkpoints"))?;
                Ok((p.clone(), Some(ck)))
            }
        }
        Some(Resume::Auto) => {
            let ck = checkpoint::list(&default_dir.join("checkpoints"))?
                .pop()
                .map(|(_, p)| p);
            if ck.is_none()
                && default_dir.exists()
                && !opts.overwrite
                && dir_has_entries(&default_dir)
            {
                return Err(TrainError::NothingToResume(default_dir));
            }
            Ok((default_dir, ck))
        }
        None => {
            if default_dir.exists() && dir_has_entries(&default_dir) && !opts.overwrite {
                return Err(TrainError::RunDirExists(default_dir));
            }
            Ok((default_dir, None))
        }
    }
}

fn dir_has_entries(p: &Path) -> bool {
    fs::read_dir(p)
        .map(|mut d| d.next().is_some())
        .unwrap_or(true)
}

/// The config with `data.template_date` pinned for a `tokenizer` template: the value given, else the
/// one of the run being resumed (its checkpoint's config.toml), else the local time now. Pinned, the
/// date is written into the run's config.toml, so every later resume renders the same text.
fn pin_template_date(cfg: &Config, resume_from: Option<&Path>) -> Config {
    let mut out = cfg.clone();
    if !cfg.data.template_date.is_empty() || cfg.data.template != "tokenizer" {
        return out;
    }
    let saved = resume_from.and_then(|p| {
        let path = p.join("config.toml");
        let text = fs::read_to_string(&path).ok()?;
        let saved = Config::from_toml_str(&text, &path.display().to_string(), &[]).ok()?;
        (!saved.data.template_date.is_empty()).then_some(saved.data.template_date)
    });
    out.data.template_date =
        saved.unwrap_or_else(|| afinar_data::jinja::TemplateDate::now_local().to_string());
    out
}

/// Trains per `opts` on the CPU backend. See [`train_with`].
pub fn train(opts: &TrainOptions) -> Result<TrainOutcome> {
    match opts.config.model.device {
        Device::Cpu => train_with(Arc::new(afinar_kernels::cpu::Cpu::new()), opts),
        Device::Cuda => train_cuda(opts),
    }
}

/// `model.device = "cuda"`: the CUDA backend with `model.dtype` as its activation dtype: frozen weights
/// and activations in bf16 for "bf16" (f16 for "f16", f32 for "f32"), while LoRA weights, gradients,
/// AdamW state and the per-row statistics stay f32 (afinar-gemma allocates them as `Storage::Master`).
/// `AFINAR_NO_CUBLAS=1` forces the fallback GEMM, as for `Cuda::try_new`.
#[cfg(feature = "cuda")]
fn train_cuda(opts: &TrainOptions) -> Result<TrainOutcome> {
    use afinar_kernels::cuda::{Cuda, CudaOptions, Dtype as CudaDtype};
    let alloc_dtype = match opts.config.model.dtype {
        crate::config::Dtype::F32 => CudaDtype::F32,
        crate::config::Dtype::Bf16 => CudaDtype::Bf16,
        // fp16 for GPUs without bf16 (sm_75); train.loss_scaling = "auto" scales the loss.
        crate::config::Dtype::F16 => CudaDtype::F16,
    };
    let force_fallback_gemm = std::env::var("AFINAR_NO_CUBLAS").is_ok_and(|v| v == "1");
    let cuda = Cuda::try_new_with(CudaOptions {
        alloc_dtype,
        force_fallback_gemm,
        ..CudaOptions::default()
    })?;
    match cuda {
        Some(c) => train_with(Arc::new(c), opts),
        None => Err(TrainError::Unsupported(
            "model.device = \"cuda\": no CUDA driver or device found on this machine; use --set model.device=cpu".into(),
        )),
    }
}

#[cfg(not(feature = "cuda"))]
fn train_cuda(_opts: &TrainOptions) -> Result<TrainOutcome> {
    Err(TrainError::Unsupported(
        "model.device = \"cuda\": this afinar was built without the CUDA backend; rebuild with \
         `cargo build --release -p afinar-trainer --features cuda`, or use --set model.device=cpu"
            .into(),
    ))
}

/// The loop, on any backend.
pub fn train_with<B: Backend>(backend: Arc<B>, opts: &TrainOptions) -> Result<TrainOutcome> {
    train_with_faults(backend, opts, &Faults::default())
}

/// Faults injected into [`train_with_faults`] by tests, to exercise paths that healthy f32 runs on the
/// CPU never take.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Optimizer steps (1-based, as logged) whose (scaled) gradients are multiplied by +inf right
    /// after the backward, as an fp16 overflow in the backward would leave them.
    pub grad_overflow_at_steps: Vec<u64>,
}

/// [`train_with`] with injected [`Faults`].
pub fn train_with_faults<B: Backend>(
    backend: Arc<B>,
    opts: &TrainOptions,
    faults: &Faults,
) -> Result<TrainOutcome> {
    opts.config.validate()?;
    let (run_dir, resume_from) = resolve_run_dir(opts)?;
    let resolved = pin_template_date(&opts.config, resume_from.as_deref());
    let cfg = &resolved;

    // Everything that can fail on user input happens before the run directory is touched.
    // `length_changed`: the resumed run asks for a different train.max_steps / train.epochs than the
    // checkpoint's (extending or shortening it), so its planned total may differ from the saved one.
    let mut length_changed = false;
    let mut plan_note = None;
    let resume_ckpt = match &resume_from {
        Some(p) => {
            let ck = checkpoint::load(p)?;
            let saved = Config::from_toml_str(
                &ck.config_toml,
                &p.join("config.toml").display().to_string(),
                &[],
            )?;
            length_changed = saved.train.max_steps != cfg.train.max_steps
                || saved.train.epochs.to_bits() != cfg.train.epochs.to_bits();
            let diff = saved.resume_diff(cfg);
            if !diff.is_empty() {
                let lines: Vec<String> = diff
                    .iter()
                    .map(|(k, a, b)| format!("  {k}: {a} → {b}"))
                    .collect();
                return Err(TrainError::ConfigMismatch {
                    path: p.clone(),
                    diff: lines.join("\n"),
                });
            }
            Some(ck)
        }
        None => None,
    };
    // Settings of config.json that training would not reproduce are refused before the (large) load.
    let config_json = afinar_gemma::config::config_path(&cfg.model.path);
    afinar_gemma::Gemma2Config::from_file(&config_json)?.check_trainable(&config_json)?;
    let mut prep = prepare_data(cfg)?;
    let mut model = Gemma2Model::load(backend.clone(), &cfg.model.path, &load_options(cfg)?)?;
    model.checkpointing = cfg.train.gradient_checkpointing;
    let mut grads = afinar_gemma::Grads::zeros(&model)?;
    let names = model.trainable_names();
    let r = model.lora.as_ref().map_or(0, |l| l.r);
    let shapes: Vec<Vec<usize>> = model
        .trainable_ids()
        .iter()
        .map(|id| id.shape(&model.config, r))
        .collect();
    // AdamW m, v per trainable tensor (f32; in pinned host memory with train.paged_optimizer on CUDA).
    let paged = cfg.train.paged_optimizer;
    let mut moments: Vec<B::AdamState> = Vec::with_capacity(names.len());
    for s in &shapes {
        moments.push(backend.adam_state(s.iter().product(), paged)?);
    }

    let hash = config_hash(cfg);
    let mut state = TrainerState {
        step: 0,
        adam_t: 0,
        total_steps: prep.total_steps,
        warmup_steps: prep.warmup_steps,
        cursor: Cursor::default(),
        rng: RngState::capture(&ChaCha8Rng::seed_from_u64(cfg.train.seed)),
        nonfinite_in_row: 0,
        tokens: 0,
        elapsed_s: 0.0,
        config_hash: hash.clone(),
        last_eval_loss: None,
        loss_scale: None,
    };
    let mut scaler = cfg
        .train
        .loss_scaling
        .is_dynamic(cfg.model.dtype)
        .then(DynamicLossScaler::new);
    let mut scaler_note = None;
    if let Some(ck) = &resume_ckpt {
        let bad = |m: String| TrainError::BadCheckpoint {
            path: resume_from.clone().unwrap_or_default(),
            message: m,
        };
        let plan_changed =
            ck.state.total_steps != prep.total_steps || ck.state.warmup_steps != prep.warmup_steps;
        if plan_changed && length_changed {
            // Extending (or shortening) a run: the schedule is rebuilt for the new total, as
            // transformers' Trainer does when resumed with a larger max_steps; the steps already taken
            // keep the learning rates they had.
            let key = if cfg.train.max_steps > 0 {
                "train.max_steps"
            } else {
                "train.epochs"
            };
            if prep.total_steps < ck.state.step {
                return Err(TrainError::Invalid {
                    key: key.into(),
                    reason: format!(
                        "the new plan has {} steps but the checkpoint is already at step {}",
                        prep.total_steps, ck.state.step
                    ),
                });
            }
        } else if plan_changed {
            return Err(bad(format!(
                "it plans {} steps with {} warmup, the data now gives {} with {}: the dataset changed",
                ck.state.total_steps, ck.state.warmup_steps, prep.total_steps, prep.warmup_steps
            )));
        }
        // The saved counters must be ones this loop could have written: step ≤ total, AdamW's t ≤ step
        // (skipped steps do not count), and the data cursor exactly step·grad_accum batches in (the
        // cursor rolls over lazily, so a finished epoch reads as position = batches per epoch).
        let st = &ck.state;
        if st.step > st.total_steps {
            return Err(bad(format!(
                "step {} is beyond its {} planned steps",
                st.step, st.total_steps
            )));
        }
        if st.adam_t > st.step {
            return Err(bad(format!(
                "adam_t {} exceeds step {}",
                st.adam_t, st.step
            )));
        }
        let per_epoch = prep.train.batches_per_epoch();
        let consumed = st.step.checked_mul(cfg.train.grad_accum as u64);
        let at = st
            .cursor
            .epoch
            .checked_mul(per_epoch)
            .and_then(|x| x.checked_add(st.cursor.position));
        if consumed.is_none() || consumed != at || (st.step > 0 && st.cursor.position == 0) {
            return Err(bad(format!(
                "data cursor (epoch {}, position {}) does not match step {} × grad_accum {} with {per_epoch} batches per epoch",
                st.cursor.epoch, st.cursor.position, st.step, cfg.train.grad_accum
            )));
        }
        if ck.tensors.len() != names.len() {
            return Err(bad(format!(
                "{} trainable tensors saved, the model has {}",
                ck.tensors.len(),
                names.len()
            )));
        }
        for (i, name) in names.iter().enumerate() {
            let t = ck
                .tensors
                .get(name)
                .ok_or_else(|| bad(format!("tensor `{name}` missing")))?;
            if t.shape != shapes[i] {
                return Err(bad(format!(
                    "tensor `{name}`: shape {:?}, the model has {:?}",
                    t.shape, shapes[i]
                )));
            }
            model.set_tensor(name, &t.param)?;
            moments[i] = backend.adam_state_from_host(&t.m, &t.v, paged)?;
        }
        prep.train.restore(&afinar_data::LoaderCursor {
            epoch: ck.state.cursor.epoch,
            position: ck.state.cursor.position,
            fingerprint: ck.state.cursor.fingerprint,
        })?;
        state = ck.state.clone();
        state.config_hash = hash.clone();
        match (scaler.as_mut(), ck.state.loss_scale) {
            (Some(s), Some(st)) => s.restore(st).map_err(|e| bad(e.to_string()))?,
            (Some(s), None) => {
                let at = s.scale();
                scaler_note = Some(format!(
                    "resume: the checkpoint holds no loss-scaler state; the loss scale restarts at {at}"
                ));
            }
            // The saved state of a scaler this config no longer uses is dropped (the keys that decide
            // it are resume-relevant, so this only happens when "auto" resolves the same way).
            (None, _) => {}
        }
        if plan_changed {
            let at = |total: u64, warmup: u64| {
                Schedule {
                    kind: cfg.train.schedule,
                    base_lr: cfg.train.lr,
                    warmup,
                    total,
                }
                .lr(state.step)
            };
            plan_note = Some(format!(
                "resume: the run now plans {} steps ({} warmup) instead of {} ({} warmup); the schedule is \
                 recomputed: lr at step {} is {:.3e} (it was {:.3e} under the old plan)",
                prep.total_steps,
                prep.warmup_steps,
                ck.state.total_steps,
                ck.state.warmup_steps,
                state.step + 1,
                at(prep.total_steps, prep.warmup_steps),
                at(ck.state.total_steps, ck.state.warmup_steps),
            ));
            state.total_steps = prep.total_steps;
            state.warmup_steps = prep.warmup_steps;
        }
    }
    // Even a checkpoint taken before the first step carries the scaler (fresh or restored).
    state.loss_scale = scaler.as_ref().map(|s| s.state());
    let mut rng = state.rng.restore().map_err(|m| TrainError::BadCheckpoint {
        path: resume_from.clone().unwrap_or_default(),
        message: m,
    })?;

    // The run directory.
    if resume_ckpt.is_none() && opts.overwrite && run_dir.exists() {
        fs::remove_dir_all(&run_dir).map_err(io(&run_dir))?;
    }
    fs::create_dir_all(&run_dir).map_err(io(&run_dir))?;
    fs::write(run_dir.join("config.toml"), cfg.to_toml()).map_err(io(&run_dir))?;
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut mw = MetricsWriter::open(
        &metrics_path,
        resume_ckpt.as_ref().map(|c| c.state.step).or(Some(0)),
    )?;
    if let Err(e) = signal::install() {
        eprintln!("warning: cannot install the Ctrl-C handler ({e}); an interrupt will stop without a checkpoint");
    }

    let sched = Schedule {
        kind: cfg.train.schedule,
        base_lr: cfg.train.lr,
        warmup: state.warmup_steps,
        total: state.total_steps,
    };
    let progress = Progress::new(
        state.total_steps,
        state.step,
        cfg.train.log_every,
        opts.quiet,
    );
    let say = |m: &str| progress.println(m);
    if let Some(n) = &plan_note {
        say(n);
    }
    if let Some(n) = &scaler_note {
        say(n);
    }
    say(&format!(
        "afinar: {} trainable parameters ({} tensors), {} steps ({} warmup), {} train rows/epoch, run dir {}",
        model.num_trainable(),
        names.len(),
        state.total_steps,
        state.warmup_steps,
        prep.train.rows().len(),
        run_dir.display()
    ));
    if cfg.model.dtype != crate::config::Dtype::F32 && backend.name() == "cpu" {
        say(&format!(
            "note: model.dtype = {:?}: the CPU backend computes and stores in f32",
            cfg.model.dtype
        ));
    }
    if paged && backend.name() == "cpu" {
        say("note: train.paged_optimizer = true: on the CPU the AdamW state already lives in host memory; nothing to page");
    }
    if let Some(ck) = &resume_ckpt {
        say(&format!(
            "resuming from {} at step {}",
            resume_from
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            ck.state.step
        ));
    }

    // Eval before training: the "base" loss.
    let initial_eval = match (&prep.eval, &resume_ckpt) {
        (Some(ev), None) => {
            let (l, n) = evaluate(&model, ev)?;
            say(&format!(
                "eval before training: loss {l:.4} over {n} tokens"
            ));
            Some(l)
        }
        _ => read_initial_eval(&run_dir),
    };
    if let Some(l) = initial_eval {
        let _ = fs::write(
            run_dir.join("initial_eval.json"),
            serde_json::json!({ "eval_loss": l }).to_string(),
        );
    }

    let t = &cfg.train;
    let rows_per_epoch = prep.train.rows().len().max(1) as f64;
    let start = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut ema = Ema::default();
    let mut stop = StopReason::Completed;
    let mut steps_this_process = 0u64;
    let train_ds_path = prep.train.dataset().path.clone();

    while state.step < state.total_steps {
        if signal::requested() || opts.stop_after.is_some_and(|n| steps_this_process >= n) {
            stop = StopReason::Interrupted;
            break;
        }
        let step_start = Instant::now();
        // 1. The window, counted before any backward.
        let window: Vec<afinar_data::Batch> =
            (0..t.grad_accum).map(|_| prep.train.next_batch()).collect();
        // 2. Accumulate grad of (Σ CE)/count.
        // With loss scaling the gradients come out multiplied by S and are divided by S (exact for a
        // power of two) before the norm, so everything after this point sees unscaled gradients.
        let ls = scaler.as_ref().map_or(1.0, |s| s.scale());
        let (loss_sum, count) = accumulate_scaled(&model, &mut grads, &window, &mut rng, ls)?;
        if faults.grad_overflow_at_steps.contains(&(state.step + 1)) {
            grads.scale(f32::INFINITY)?;
        }
        if ls != 1.0 {
            grads.scale(1.0 / ls)?;
        }
        let loss = if count > 0 {
            loss_sum / count as f64
        } else {
            f64::NAN
        };
        let grad_norm = grads.sum_squares()?.sqrt();
        let lr = sched.lr(state.step);
        let finite = loss.is_finite() && grad_norm.is_finite();
        // An overflow of the scaled gradients (the loss itself finite) is the scaler's feedback, not a
        // data or model problem, unless the scale is already at its floor.
        let overflow =
            !finite && loss.is_finite() && scaler.as_ref().is_some_and(|s| !s.at_floor());
        let scale_update = scaler.as_mut().map(|s| s.update(!finite));
        let mut bad_samples = Vec::new();
        if overflow {
            let to = scaler.as_ref().map_or(ls, |s| s.scale());
            say(&format!(
                "step {}: gradient overflow at loss scale {ls}; update skipped, loss scale now {to}",
                state.step + 1
            ));
        } else if finite {
            if let Some(crate::loss_scale::ScaleUpdate::Grew { from, to }) = scale_update {
                say(&format!(
                    "step {}: {} finite steps in a row; loss scale {from} → {to}",
                    state.step + 1,
                    crate::loss_scale::GROWTH_INTERVAL
                ));
            }
            state.nonfinite_in_row = 0;
            // 3. Clip (torch multiplies even when the coefficient is clamped to 1) and update.
            if t.max_grad_norm > 0.0 {
                grads.scale(clip_coef(grad_norm, t.max_grad_norm) as f32)?;
            }
            state.adam_t += 1;
            let hp = AdamW {
                lr: lr as f32,
                beta1: t.betas[0] as f32,
                beta2: t.betas[1] as f32,
                eps: t.eps as f32,
                weight_decay: t.weight_decay as f32,
                step: state.adam_t,
            };
            let be = model.backend().clone();
            for (p, st) in model
                .params_and_grads(&grads)?
                .into_iter()
                .zip(moments.iter_mut())
            {
                be.adamw_step(p.param, p.grad, st, &hp)?;
            }
            ema.push(loss);
        } else {
            state.nonfinite_in_row += 1;
            for b in &window {
                for row in &b.sample_ids {
                    for &si in row {
                        bad_samples.push(format!(
                            "{}:{}",
                            train_ds_path.display(),
                            prep.train.dataset().samples[si].line
                        ));
                    }
                }
            }
            say(&format!(
                "step {}: non-finite loss {loss} or grad norm {grad_norm}; update skipped ({} in a row). Samples: {}",
                state.step + 1,
                state.nonfinite_in_row,
                bad_samples.join(", ")
            ));
        }
        state.loss_scale = scaler.as_ref().map(|s| s.state());
        state.step += 1;
        state.tokens += count as u64;
        steps_this_process += 1;
        let c = prep.train.cursor();
        state.cursor = Cursor {
            epoch: c.epoch,
            position: c.position,
            fingerprint: c.fingerprint,
        };
        state.rng = RngState::capture(&rng);
        let dt = step_start.elapsed().as_secs_f64();
        let elapsed = elapsed_before + start.elapsed().as_secs_f64();
        state.elapsed_s = elapsed;

        // Eval on schedule (the final eval runs after the loop).
        let mut eval_loss = None;
        if let Some(ev) = &prep.eval {
            if t.eval_every > 0
                && state.step.is_multiple_of(t.eval_every)
                && state.step < state.total_steps
            {
                let (l, _) = evaluate(&model, ev)?;
                say(&format!("step {}: eval loss {l:.4}", state.step));
                eval_loss = Some(l);
                state.last_eval_loss = Some(l);
            }
        }
        let epoch = (c.epoch as f64
            + (c.position as f64 * t.micro_batch_size as f64).min(rows_per_epoch) / rows_per_epoch)
            .max(0.0);
        let rec = StepRecord {
            step: state.step,
            epoch,
            loss: loss.is_finite().then_some(loss),
            eval_loss,
            lr,
            grad_norm: grad_norm.is_finite().then_some(grad_norm),
            tokens: count as u64,
            tokens_per_s: count as f64 / dt.max(1e-9),
            elapsed_s: elapsed,
            skipped: !finite,
            bad_samples,
        };
        mw.write(&rec)?;
        let eta = (state.total_steps - state.step) as f64 * (elapsed - elapsed_before)
            / steps_this_process as f64;
        progress.step(state.step, ema.get(), lr, rec.tokens_per_s, eta);

        if state.nonfinite_in_row >= MAX_NONFINITE_IN_ROW {
            stop = StopReason::NonFinite;
            break;
        }
        if t.save_every > 0
            && state.step.is_multiple_of(t.save_every)
            && state.step < state.total_steps
        {
            save_checkpoint(&model, &moments, &names, &shapes, &state, cfg, &run_dir)?;
        }
    }
    progress.finish();

    // Final eval (only when the run completed: an interrupted run evaluates when it finishes).
    let mut final_eval = state.last_eval_loss;
    if stop == StopReason::Completed {
        if let Some(ev) = &prep.eval {
            let (l, n) = evaluate(&model, ev)?;
            say(&format!("eval after training: loss {l:.4} over {n} tokens"));
            final_eval = Some(l);
            state.last_eval_loss = Some(l);
            // Attach it to the last step's record.
            rewrite_last_eval(&metrics_path, state.step, l)?;
        }
    }
    drop(mw);
    let ck = save_checkpoint(&model, &moments, &names, &shapes, &state, cfg, &run_dir)?;

    // Outputs: adapter (or full model), curves, summary, report.
    let base_name = cfg.model.path.display().to_string();
    if model.lora.is_some() {
        afinar_gemma::peft::save_adapter(&model, run_dir.join("adapter"), Some(&base_name))?;
    }
    if cfg.model.full_finetune {
        save_full_model(&model, &cfg.model.path, &run_dir.join("model"))?;
    }
    let records = metrics::read(&metrics_path)?;
    plot::plot_losses(
        &records,
        initial_eval,
        &format!("afinar: {}", cfg.output.run_name),
        &run_dir.join("loss.svg"),
        &run_dir.join("loss.png"),
    )?;
    let finite: Vec<f64> = records.iter().filter_map(|r| r.loss).collect();
    let total_tokens: u64 = records.iter().map(|r| r.tokens).sum();
    let elapsed = state.elapsed_s;
    let summary = Summary {
        stop_reason: stop,
        steps: state.step,
        total_steps: state.total_steps,
        epochs: records.last().map_or(0.0, |r| r.epoch),
        first_train_loss: finite.first().copied(),
        final_train_loss: finite.last().copied(),
        initial_eval_loss: initial_eval,
        final_eval_loss: final_eval,
        trained_tokens: total_tokens,
        elapsed_s: elapsed,
        tokens_per_s: if elapsed > 0.0 {
            total_tokens as f64 / elapsed
        } else {
            0.0
        },
        skipped_steps: records.iter().filter(|r| r.skipped).count() as u64,
        peak_rss_mib: metrics::peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
        trainable_parameters: model.num_trainable() as u64,
    };
    fs::write(
        run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary).expect("summary serializes"),
    )
    .map_err(io(&run_dir))?;
    fs::write(
        run_dir.join("report.md"),
        report_md(cfg, &summary, &run_dir),
    )
    .map_err(io(&run_dir))?;
    Ok(TrainOutcome {
        run_dir,
        summary,
        records,
        checkpoint: ck,
    })
}

fn read_initial_eval(run_dir: &Path) -> Option<f64> {
    let s = fs::read_to_string(run_dir.join("initial_eval.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&s)
        .ok()?
        .get("eval_loss")?
        .as_f64()
}

fn rewrite_last_eval(path: &Path, step: u64, eval: f64) -> Result<()> {
    let mut recs = metrics::read(path)?;
    if let Some(r) = recs.iter_mut().rev().find(|r| r.step == step) {
        r.eval_loss = Some(eval);
    }
    let mut text = String::new();
    for r in &recs {
        text.push_str(&serde_json::to_string(r).expect("record serializes"));
        text.push('\n');
    }
    fs::write(path, text).map_err(io(path))
}

#[allow(clippy::too_many_arguments)]
fn save_checkpoint<B: Backend>(
    model: &Gemma2Model<B>,
    moments: &[B::AdamState],
    names: &[String],
    shapes: &[Vec<usize>],
    state: &TrainerState,
    cfg: &Config,
    run_dir: &Path,
) -> Result<PathBuf> {
    let be = model.backend();
    let mut tensors = BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        // Paged or resident, the moments come back as the same f32 values.
        let (m, v) = be.adam_state_to_host(&moments[i])?;
        tensors.insert(
            name.clone(),
            TensorState {
                shape: shapes[i].clone(),
                param: model.get_tensor(name)?,
                m,
                v,
            },
        );
    }
    let ck = Checkpoint {
        state: state.clone(),
        tensors,
        config_toml: cfg.to_toml(),
    };
    Ok(checkpoint::save(
        &run_dir.join("checkpoints"),
        &ck,
        cfg.train.keep_checkpoints,
    )?)
}

/// Writes a full (dense, f32) model in the Hugging Face layout: config.json, model.safetensors (no
/// lm_head: it is tied), and the tokenizer files copied from `base_dir` (afinar-gemma's `export_merged`;
/// LoRA factors, if any, are merged).
pub fn save_full_model<B: Backend>(
    model: &Gemma2Model<B>,
    base_dir: &Path,
    out: &Path,
) -> Result<()> {
    use afinar_gemma::export::{export_merged, ExportDtype, ExportOptions};
    let opts = ExportOptions {
        dtype: ExportDtype::F32,
        source_dir: Some(base_dir.to_path_buf()),
        ..Default::default()
    };
    export_merged(model, out, &opts)?;
    Ok(())
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.4}")).unwrap_or_else(|| "—".into())
}

/// The run's report.md (xtask appends the base-vs-tuned generations).
pub fn report_md(cfg: &Config, s: &Summary, run_dir: &Path) -> String {
    format!(
        "# afinar run `{name}`\n\n\
         | | |\n|---|---|\n\
         | model | `{model}` ({quant:?}{ft}) |\n\
         | data | `{data}` (template {tpl}, max_seq_len {msl}) |\n\
         | stop | {stop:?} after {steps}/{total} steps ({epochs:.2} epochs) |\n\
         | train loss first → last | {tl0} → {tl1} |\n\
         | eval loss before → after | {el0} → {el1} |\n\
         | trained tokens | {tok} |\n\
         | time | {time:.1} s ({tps:.0} tokens/s) |\n\
         | peak RSS | {rss} |\n\
         | trainable parameters | {params} |\n\
         | skipped (non-finite) steps | {skipped} |\n\n\
         ![loss curves](loss.png)\n\nFiles: `{dir}/` config.toml, metrics.jsonl, loss.svg/png, adapter/, checkpoints/, summary.json.\n",
        name = cfg.output.run_name,
        model = cfg.model.path.display(),
        quant = cfg.model.quantization,
        ft = if cfg.model.full_finetune { ", full fine-tune" } else { "" },
        data = cfg.data.train.display(),
        tpl = cfg.data.template,
        msl = cfg.data.max_seq_len,
        stop = s.stop_reason,
        steps = s.steps,
        total = s.total_steps,
        epochs = s.epochs,
        tl0 = fmt_opt(s.first_train_loss),
        tl1 = fmt_opt(s.final_train_loss),
        el0 = fmt_opt(s.initial_eval_loss),
        el1 = fmt_opt(s.final_eval_loss),
        tok = s.trained_tokens,
        time = s.elapsed_s,
        tps = s.tokens_per_s,
        rss = s.peak_rss_mib.map(|m| format!("{m:.0} MiB")).unwrap_or_else(|| "n/a".into()),
        params = s.trainable_parameters,
        skipped = s.skipped_steps,
        dir = run_dir.display(),
    )
}
