//! Training progress: an indicatif bar (step/total, smoothed loss, lr, tokens/s, ETA) on a terminal,
//! plain log lines otherwise (CI logs, pipes, `tee`). Everything goes to stderr, so stdout carries only
//! results (`--json`).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

pub enum Progress {
    Bar(ProgressBar),
    Plain { total: u64, log_every: u64 },
    Quiet,
}

impl Progress {
    /// A bar when stderr is a terminal, else plain lines every `log_every` steps.
    pub fn new(total: u64, start: u64, log_every: u64, quiet: bool) -> Self {
        if quiet {
            return Progress::Quiet;
        }
        if std::io::stderr().is_terminal() {
            let pb = ProgressBar::new(total);
            pb.set_style(
                ProgressStyle::with_template(
                    "{spinner} step {pos}/{len} [{bar:30}] {msg} eta {eta}",
                )
                .expect("static template is valid")
                .progress_chars("=> "),
            );
            pb.set_position(start);
            Progress::Bar(pb)
        } else {
            Progress::Plain {
                total,
                log_every: log_every.max(1),
            }
        }
    }

    /// Reports one finished step.
    pub fn step(
        &self,
        step: u64,
        smoothed_loss: Option<f64>,
        lr: f64,
        tokens_per_s: f64,
        eta_s: f64,
        memory: &str,
    ) {
        let loss = smoothed_loss
            .map(|l| format!("{l:.4}"))
            .unwrap_or_else(|| "-".into());
        match self {
            Progress::Bar(pb) => {
                pb.set_message(format!(
                    "loss {loss} lr {lr:.2e} {tokens_per_s:.0} tok/s {memory}"
                ));
                pb.set_position(step);
            }
            Progress::Plain { total, log_every } => {
                if step.is_multiple_of(*log_every) || step == *total {
                    eprintln!("step {step}/{total} loss {loss} lr {lr:.3e} tok/s {tokens_per_s:.0} eta {eta_s:.0}s {memory}");
                }
            }
            Progress::Quiet => {}
        }
    }

    /// A message that must not be overwritten by the bar (eval results, skipped steps).
    pub fn println(&self, msg: &str) {
        match self {
            Progress::Bar(pb) => pb.println(msg),
            Progress::Plain { .. } => eprintln!("{msg}"),
            Progress::Quiet => {}
        }
    }

    pub fn finish(&self) {
        if let Progress::Bar(pb) = self {
            pb.finish_and_clear();
        }
    }
}
