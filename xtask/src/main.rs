//! `cargo xtask <task>`: project automation in Rust (no shell scripts to keep portable).
//! Each task lives in its own module; this file only dispatches.

use clap::{Parser, Subcommand};

mod demo_world;
mod gpu_bundle;
mod kernels_check;
mod train;

#[derive(Parser)]
#[command(name = "xtask", about = "Afinar project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Train the embedded demo (configs/default.toml) on the CPU; extra args go to `afinar train`.
    Train {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Pretrain the tiny demo Gemma-2 shipped in models/ (full fine-tune from random init).
    PretrainDemo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Write the generated demo dataset (datasets/mundo-ficticio) from the fictional world's generator.
    DemoData,
    /// Compile every kernels/*.cu with NVRTC for sm_80 and sm_90 and print register/smem/spill usage.
    KernelsCheck {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the CUDA test and bench binaries, the CLI, the side-by-side scripts + run.sh into
    /// gpu-bundle/ for a GPU machine (docs/gpu-validation.md).
    GpuBundle {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the benchmarks and print where to record them.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Errors are printed as their message chain and exit 1, never with a stack trace (even under
/// `RUST_BACKTRACE=1`): they are for the person at the terminal.
fn main() {
    if let Err(e) = run(Cli::parse().task) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Train { args } => train::train(&args),
        Task::PretrainDemo { args } => train::pretrain_demo(&args),
        Task::DemoData => train::demo_data(),
        Task::KernelsCheck { args } => kernels_check::run(&args),
        Task::GpuBundle { args } => gpu_bundle::run(&args),
        Task::Bench { args } => train::bench(&args),
    }
}

/// Source-size rule of the crates: no file in `crates/*/src` above `MAX_SOURCE_LINES` lines, so one op
/// family, one stage or one concern stays one readable file (split along its seams, don't raise the bound).
#[cfg(test)]
mod tidy {
    use std::path::{Path, PathBuf};

    const MAX_SOURCE_LINES: usize = 800;

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn no_crate_source_file_is_over_the_size_limit() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        for krate in std::fs::read_dir(root.join("crates"))
            .expect("crates/ exists")
            .flatten()
        {
            rust_files(&krate.path().join("src"), &mut files);
        }
        assert!(files.len() > 50, "found only {} source files", files.len());
        let over: Vec<String> = files
            .iter()
            .filter_map(|f| {
                let n = std::fs::read_to_string(f).ok()?.lines().count();
                (n > MAX_SOURCE_LINES).then(|| format!("{} ({n} lines)", f.display()))
            })
            .collect();
        assert!(
            over.is_empty(),
            "source files over {MAX_SOURCE_LINES} lines: {over:?}"
        );
    }
}
