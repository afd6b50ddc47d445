//! `cargo xtask <task>`: project automation in Rust (no shell scripts to keep portable).
//! Each task lives in its own module; this file only dispatches.

use clap::{Parser, Subcommand};

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

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Train { args } => train::train(&args),
        Task::PretrainDemo { args } => train::pretrain_demo(&args),
        Task::KernelsCheck { args } => kernels_check::run(&args),
        Task::GpuBundle { args } => gpu_bundle::run(&args),
        Task::Bench { args } => train::bench(&args),
    }
}
