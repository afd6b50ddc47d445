//! The run directory: where a run's files go, which checkpoint `--resume` continues, the config as the
//! run records it (template date pinned), and creating the directory once every check has passed.

use std::fs;
use std::path::{Path, PathBuf};

use afinar_data::jinja::TemplateDate;
use afinar_data::TemplateKind;

use super::{io, Result, Resume, TrainError, TrainOptions};
use crate::checkpoint;
use crate::config::Config;
use crate::metrics::MetricsWriter;
use crate::signal;

/// Where a run's files go, and what to resume from.
pub(super) fn resolve(opts: &TrainOptions) -> Result<(PathBuf, Option<PathBuf>)> {
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
pub(super) fn pin_template_date(cfg: &Config, resume_from: Option<&Path>) -> Config {
    let mut out = cfg.clone();
    if cfg.data.template_date.is_some() || cfg.data.template != TemplateKind::Tokenizer {
        return out;
    }
    let saved = resume_from.and_then(|p| {
        let path = p.join("config.toml");
        let text = fs::read_to_string(&path).ok()?;
        let saved = Config::from_toml_str(&text, &path.display().to_string(), &[]).ok()?;
        saved.data.template_date
    });
    // The config form keeps whole seconds: the run renders with the reading its config.toml records,
    // so a resume renders the same text.
    out.data.template_date = Some(saved.unwrap_or_else(|| {
        TemplateDate::now_local()
            .with_microsecond(0)
            .expect("0 is a valid microsecond")
    }));
    out
}

/// The files a run writes as it goes.
pub(super) struct RunFiles {
    pub metrics_path: PathBuf,
    pub metrics: MetricsWriter,
}

/// Creates (or, with `overwrite` and nothing to resume, replaces) the run directory, writes the
/// resolved config.toml, opens metrics.jsonl keeping the records up to `resume_step` (all of them
/// are dropped on a fresh run), and installs the Ctrl-C handler.
pub(super) fn create(
    run_dir: &Path,
    cfg: &Config,
    overwrite: bool,
    resume_step: Option<u64>,
) -> Result<RunFiles> {
    if resume_step.is_none() && overwrite && run_dir.exists() {
        fs::remove_dir_all(run_dir).map_err(io(run_dir))?;
    }
    fs::create_dir_all(run_dir).map_err(io(run_dir))?;
    fs::write(run_dir.join("config.toml"), cfg.to_toml()).map_err(io(run_dir))?;
    let metrics_path = run_dir.join("metrics.jsonl");
    let metrics = MetricsWriter::open(&metrics_path, resume_step.or(Some(0)))?;
    if let Err(e) = signal::install() {
        eprintln!("warning: cannot install the Ctrl-C handler ({e}); an interrupt will stop without a checkpoint");
    }
    Ok(RunFiles {
        metrics_path,
        metrics,
    })
}
