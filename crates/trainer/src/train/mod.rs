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
//!
//! The stages of a run, in the order [`train_with_faults`] calls them: `run_dir` (where the files go,
//! what to resume, the pinned template date), `resume` (the checkpoint's config check and restore),
//! `setup` (config.json, data and model), `optimizer` (AdamW with its moments, checkpoint writing),
//! `scaling` (loss scale and clipping), `steps` (the step loop), `eval`, and `report` (adapter, curves,
//! summary.json and report.md).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use afinar_kernels::Backend;

use crate::checkpoint::CheckpointError;
use crate::config::{Config, ConfigError, Device};
use crate::metrics::{MetricsError, StepRecord, Summary};
use crate::plot::PlotError;
use crate::progress::Progress;

mod dist_hooks;
mod eval;
pub mod memory;
mod optimizer;
mod report;
mod resume;
mod run_dir;
mod scaling;
mod setup;
mod steps;
mod suite_eval;
mod world;

pub use eval::{evaluate, evaluate_dense_streamed};
pub use report::{report_md, save_full_model};
pub use setup::{config_hash, data_config, load_options, lora_config, template_overhead};
pub use steps::{accumulate, accumulate_scaled, model_batch, MAX_NONFINITE_IN_ROW};
pub use world::train_rank;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The memory plan exceeds the device's free memory (`memory::check_before_loading`).
    #[error("{0}")]
    WouldNotFit(String),
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
    #[error(transparent)]
    Suite(#[from] crate::suite::SuiteError),
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
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
    /// A line of a prompts file that is not a prompt; the message starts with `file:line`.
    #[error("{0}")]
    BadPrompt(String),
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
    /// Start even when the memory plan exceeds the device's free memory (`afinar train --force`).
    pub force: bool,
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

/// Trains per `opts` on the backend `model.device` names. See [`train_with`].
pub fn train(opts: &TrainOptions) -> Result<TrainOutcome> {
    match opts.config.model.device {
        Device::Cpu => train_on(afinar_kernels::cpu::Cpu::new(), opts),
        Device::Cuda => train_cuda(opts),
    }
}

/// [`train_with`] on `backend`, wrapped in the profiler (`afinar_kernels::profile::Profiled`) when
/// `train.profile` or `AFINAR_PROFILE=1` asks for it.
fn train_on<B: Backend>(backend: B, opts: &TrainOptions) -> Result<TrainOutcome> {
    if opts.config.train.profile || crate::profile::env_enabled() {
        train_with(
            Arc::new(afinar_kernels::profile::Profiled::new(backend)?),
            opts,
        )
    } else {
        train_with(Arc::new(backend), opts)
    }
}

/// `model.device = "cuda"`: the CUDA backend with `model.dtype` as its activation dtype: frozen weights
/// and activations in bf16 for "bf16" (f16 for "f16", f32 for "f32"), while LoRA weights, gradients,
/// AdamW state and the per-row statistics stay f32 (afinar-gemma allocates them as `Storage::Master`).
/// `AFINAR_NO_CUBLAS=1` forces the fallback GEMM, as for `Cuda::try_new`.
#[cfg(feature = "cuda")]
fn train_cuda(opts: &TrainOptions) -> Result<TrainOutcome> {
    use afinar_kernels::cuda::Cuda;
    let cuda = Cuda::try_new_with(cuda_options(&opts.config, 0))?;
    match cuda {
        Some(c) => train_on(c, opts),
        None => Err(TrainError::Unsupported(
            "model.device = \"cuda\": no CUDA driver or device found on this machine; use --set model.device=cpu".into(),
        )),
    }
}

/// The CUDA backend's options for `cfg` on device `ordinal`: `model.dtype` as the activation dtype,
/// `AFINAR_NO_CUBLAS=1` for the fallback GEMM.
#[cfg(feature = "cuda")]
fn cuda_options(cfg: &Config, ordinal: usize) -> afinar_kernels::cuda::CudaOptions {
    use afinar_kernels::cuda::{CudaOptions, Dtype as CudaDtype};
    let alloc_dtype = match cfg.model.dtype {
        crate::config::Dtype::F32 => CudaDtype::F32,
        crate::config::Dtype::Bf16 => CudaDtype::Bf16,
        // fp16 for GPUs without bf16 (sm_75); train.loss_scaling = "auto" scales the loss.
        crate::config::Dtype::F16 => CudaDtype::F16,
    };
    CudaOptions {
        alloc_dtype,
        force_fallback_gemm: std::env::var("AFINAR_NO_CUBLAS").is_ok_and(|v| v == "1"),
        ordinal,
        ..CudaOptions::default()
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

/// The loop, on any backend. On a profiled one (`afinar_kernels::profile::Profiled`, see [`train`])
/// each optimizer step is one profiler step, and the report is printed (unless quiet) and written to
/// `profile.json` in the run directory at the end.
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
    let out = train_with_dist(backend, opts, faults, &crate::dist::Single)?;
    Ok(out.expect("a world of one rank is rank 0, which returns the outcome"))
}

/// One rank of a data-parallel run (`crate::dist`): every rank calls this with the same options and
/// its own handle on the group. Rank 0 returns the outcome and is the only one to write anything
/// (run directory, metrics, checkpoints, evals, adapter, report); the other ranks return `None`.
/// When this rank fails, it tells the group ([`crate::dist::Collective::abort`]) before returning
/// its error, so no other rank waits for it.
pub fn train_with_dist<B: Backend>(
    backend: Arc<B>,
    opts: &TrainOptions,
    faults: &Faults,
    comm: &dyn crate::dist::Collective<B>,
) -> Result<Option<TrainOutcome>> {
    let out = run_rank(backend, opts, faults, comm);
    if let Err(e) = &out {
        if comm.exchanges() {
            comm.abort(&e.to_string());
        }
    }
    out
}

fn run_rank<B: Backend>(
    backend: Arc<B>,
    opts: &TrainOptions,
    faults: &Faults,
    comm: &dyn crate::dist::Collective<B>,
) -> Result<Option<TrainOutcome>> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let lead = rank == 0;
    opts.config.validate()?;
    let (run_dir, resume_from) = run_dir::resolve(opts)?;
    let resolved = run_dir::pin_template_date(&opts.config, resume_from.as_deref());
    let cfg = &resolved;

    // Everything that can fail on user input happens before the run directory is touched.
    let resume = match &resume_from {
        Some(p) => Some(resume::ResumePoint::load(p, cfg)?),
        None => None,
    };
    // config.json is read here once; the data limits and the model are built from this parse.
    let model_cfg = setup::read_model_config(cfg)?;
    let mut data = setup::prepare_data(cfg, &model_cfg, world)?;
    if !lead {
        // Evaluations are rank 0's.
        data.eval = None;
    }
    // The `[eval]` suite is read (and refused if malformed) before the run directory is touched.
    let mut plan = if lead {
        suite_eval::Plan::prepare(cfg, &run_dir)?
    } else {
        None
    };
    let quiet = opts.quiet || !lead;
    let quiet_say = |m: &str| {
        if !quiet {
            eprintln!("{m}");
        }
    };
    memory::check_before_loading(&*backend, cfg, &model_cfg, opts.force, &quiet_say)?;
    if let Some(p) = plan.as_mut() {
        // Before the training model exists, so only one copy of the base is held at a time.
        p.dense_base(
            backend.clone(),
            data.eval.as_ref(),
            resume.is_some(),
            &quiet_say,
        )?;
    }
    let model = setup::load_model(backend, cfg, model_cfg, !opts.quiet)?;
    let grads = afinar_gemma::Grads::zeros(&model)?;
    let opt = optimizer::Optimizer::new(&model, cfg.train.paged_optimizer)?;
    let mut run = steps::Run {
        state: setup::fresh_state(cfg, &data),
        scaling: scaling::GradScaling::new(cfg),
        model,
        grads,
        opt,
        // The fresh state's stream; replaced below by the state's own (the checkpoint's on resume).
        rng: rand::SeedableRng::seed_from_u64(cfg.train.seed),
        cfg,
        plan,
        comm,
    };
    let notes = match &resume {
        Some(r) => r.restore(&mut run, &mut data)?,
        None => Vec::new(),
    };
    // Checkpoints record the number of ranks their cursor counts in (restore already set it).
    run.state.world_size = world as u64;
    // Even a checkpoint taken before the first step carries the scaler (fresh or restored).
    run.state.loss_scale = run.scaling.state();
    run.rng = run
        .state
        .rng
        .restore()
        .map_err(|m| TrainError::BadCheckpoint {
            path: resume_from.clone().unwrap_or_default(),
            message: m,
        })?;

    if comm.exchanges() {
        let digest = dist_hooks::state_digest(&run.model, &run.state, &run.opt.names)?;
        dist_hooks::check_same_state(digest, comm)?;
        // Every rank has resolved the run directory (and the checkpoint to resume) before rank 0
        // creates it.
        comm.barrier()?;
    }
    let mut files = if lead {
        Some(run_dir::create(
            &run_dir,
            cfg,
            opts.overwrite,
            resume.as_ref().map(|r| r.step()),
        )?)
    } else {
        // The other ranks get Ctrl-C too (one process group): they must finish the step with rank 0,
        // which checkpoints, rather than die mid-collective.
        if let Err(e) = crate::signal::install() {
            eprintln!("warning: rank {rank}: cannot install the Ctrl-C handler ({e})");
        }
        None
    };
    let progress = Progress::new(
        run.state.total_steps,
        run.state.step,
        cfg.train.log_every,
        quiet,
    );
    let say = |m: &str| progress.println(m);
    for n in &notes {
        say(n);
    }
    announce(&run, &data, &run_dir, resume_from.as_deref(), &say);

    let initial_eval = if lead {
        eval::initial(
            &run.model,
            data.eval.as_ref(),
            resume.is_some(),
            &run_dir,
            &say,
        )?
    } else {
        None
    };
    if let Some(p) = run.plan.as_mut() {
        p.base(&run.model, resume.as_ref().map(|r| r.step()), &say)?;
    }
    let stop = run.steps(
        &mut data,
        &run_dir,
        files.as_mut().map(|f| &mut f.metrics),
        &progress,
        opts.stop_after,
        faults,
    )?;
    progress.finish();
    let Some(files) = files else {
        // Not rank 0: the loop was this rank's whole share of the run.
        return Ok(None);
    };
    let final_eval = eval::after_training(&mut run, &data, stop, &files.metrics_path, &say)?;
    let evaluation = match run.plan.take() {
        Some(p) => Some(p.finish(&run.model, stop, run.state.step, initial_eval, &say)?),
        None => None,
    };
    drop(files.metrics);
    let ck = run
        .opt
        .save_checkpoint(&run.model, &run.state, cfg, &run_dir)?;

    let (summary, records) = report::write(
        &run.model,
        cfg,
        &run.state,
        stop,
        report::Evals {
            initial: initial_eval,
            last: final_eval,
            evaluation: evaluation.as_ref(),
        },
        &run_dir,
        &files.metrics_path,
    )?;
    if let Some(p) = run.model.backend().profiler() {
        let r = p.report()?;
        let path = run_dir.join("profile.json");
        crate::profile::write_json(&r, &path).map_err(io(&path))?;
        if !opts.quiet {
            eprint!("{}", r.table());
            eprintln!("profile written to {}", path.display());
        }
    }
    Ok(Some(TrainOutcome {
        run_dir,
        summary,
        records,
        checkpoint: ck,
    }))
}

/// The run's opening lines: its size and plan, notes on settings that change nothing on this
/// backend, and the checkpoint it resumes.
fn announce<B: Backend>(
    run: &steps::Run<'_, B>,
    data: &setup::Prepared,
    run_dir: &Path,
    resume_from: Option<&Path>,
    say: &dyn Fn(&str),
) {
    let cfg = run.cfg;
    let backend = run.model.backend();
    let replay = match &data.train.dataset().replay {
        Some(r) => format!(
            " ({} of the {} samples replayed from {})",
            r.stats.samples,
            data.train.dataset().samples.len(),
            r.path.display()
        ),
        None => String::new(),
    };
    say(&format!(
        "afinar: {} trainable parameters ({} tensors), {} steps ({} warmup), {} train rows/epoch{replay}, run dir {}",
        run.model.num_trainable(),
        run.opt.names.len(),
        run.state.total_steps,
        run.state.warmup_steps,
        data.train.rows().len(),
        run_dir.display()
    ));
    if cfg.model.dtype != crate::config::Dtype::F32 && backend.name() == "cpu" {
        say(&format!(
            "note: model.dtype = {:?}: the CPU backend computes and stores in f32",
            cfg.model.dtype
        ));
    }
    if cfg.train.paged_optimizer && backend.name() == "cpu" {
        say("note: train.paged_optimizer = true: on the CPU the AdamW state already lives in host memory; nothing to page");
    }
    if run.comm.world_size() > 1 {
        say(&format!(
            "data parallel: {} ranks × micro-batch {} = {} rows per global micro-batch; rank 0 writes the run",
            run.comm.world_size(),
            cfg.train.micro_batch_size,
            cfg.train.micro_batch_size * run.comm.world_size()
        ));
    }
    if let Some(p) = resume_from {
        say(&format!(
            "resuming from {} at step {}",
            p.display(),
            run.state.step
        ));
    }
}
