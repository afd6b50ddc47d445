//! `--device` and `--dtype` of eval, generate, merge and quantize: where the model is built, and the
//! generic job each command runs on whichever backend that is (the CPU, the CUDA backend, either one
//! wrapped in the profiler for `AFINAR_PROFILE=1`).

use std::path::Path;
use std::sync::Arc;

use afinar_kernels::cpu::Cpu;
use afinar_kernels::profile::Profiled;
use afinar_kernels::Backend;
use afinar_trainer::config::{Device, Dtype};
use afinar_trainer::profile;
use clap::Args;

use crate::{usage, Failure};

/// `--device` and `--dtype`, as `model.device` and `model.dtype` of a train config.
#[derive(Args, Clone, Debug)]
pub struct DeviceArgs {
    /// cuda | cpu. Default: cuda when this afinar has the CUDA backend and a GPU is present, else cpu.
    #[arg(long)]
    device: Option<String>,
    /// f32 | bf16 | f16: the dtype the frozen weights and activations are held and computed in on the
    /// GPU (model.dtype). Default: the checkpoint's own (lossless, as transformers' dtype="auto");
    /// the CPU computes in f32 whatever is asked.
    #[arg(long)]
    dtype: Option<String>,
}

/// Where a command runs.
#[derive(Clone, Debug)]
pub struct Placement {
    pub device: Device,
    pub dtype: Dtype,
    /// Why this device and dtype (for the first line of output).
    pub why: String,
}

impl Placement {
    pub fn describe(&self) -> String {
        format!(
            "device {} ({})",
            match self.device {
                Device::Cpu => "cpu",
                Device::Cuda => "cuda",
            },
            self.why
        )
    }

    pub fn device_name(&self) -> &'static str {
        match self.device {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        }
    }

    pub fn dtype_name(&self) -> &'static str {
        match self.dtype {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

fn parse_dtype(d: &str) -> Result<Dtype, Failure> {
    match d {
        "f32" => Ok(Dtype::F32),
        "bf16" => Ok(Dtype::Bf16),
        "f16" => Ok(Dtype::F16),
        _ => Err(usage(anyhow::anyhow!(
            "--dtype {d:?}: expected f32, bf16 or f16"
        ))),
    }
}

/// The checkpoint's dtype as a compute dtype (`infer::checkpoint_dtype`).
fn checkpoint_dtype(model: &Path) -> Result<Dtype, Failure> {
    use afinar_gemma::export::ExportDtype;
    Ok(match afinar_trainer::infer::checkpoint_dtype(model)? {
        ExportDtype::F32 => Dtype::F32,
        ExportDtype::BF16 => Dtype::Bf16,
        ExportDtype::F16 => Dtype::F16,
    })
}

/// Resolves `--device` / `--dtype` for the model in `model` (`dtype` None = the checkpoint's own).
pub fn placement(
    device: Option<&str>,
    dtype: Option<&str>,
    model: &Path,
) -> Result<Placement, Failure> {
    let (dev, why) =
        afinar_trainer::device::resolve(device).map_err(|m| usage(anyhow::anyhow!(m)))?;
    let (dtype, dwhy) = match (dev, dtype) {
        (Device::Cpu, Some(d)) => {
            let d = parse_dtype(d)?;
            (
                Dtype::F32,
                if d == Dtype::F32 {
                    "f32"
                } else {
                    "f32: the CPU computes in f32 whatever --dtype says"
                },
            )
        }
        (Device::Cpu, None) => (Dtype::F32, "f32"),
        (Device::Cuda, Some(d)) => (parse_dtype(d)?, "--dtype"),
        (Device::Cuda, None) => (checkpoint_dtype(model)?, "the checkpoint's dtype"),
    };
    let why = match (dev, dwhy) {
        (Device::Cpu, w) => format!("{why}; {w}"),
        (Device::Cuda, w) => format!("{why}; {} from {w}", dtype_name(dtype)),
    };
    Ok(Placement {
        device: dev,
        dtype,
        why,
    })
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "f32",
        Dtype::Bf16 => "bf16",
        Dtype::F16 => "f16",
    }
}

impl DeviceArgs {
    pub fn placement(&self, model: &Path) -> Result<Placement, Failure> {
        placement(self.device.as_deref(), self.dtype.as_deref(), model)
    }
}

/// A command's work, generic over the backend it runs on.
pub trait Job {
    type Out;
    fn run<B: Backend>(self, backend: Arc<B>) -> Result<Self::Out, Failure>;
}

/// Runs `job` on the backend `p` names, in the profiler when `AFINAR_PROFILE=1` (the job marks
/// steps and finishes the report itself).
pub fn run_job<J: Job>(p: &Placement, job: J) -> Result<J::Out, Failure> {
    let prof = profile::env_enabled();
    match p.device {
        Device::Cpu if prof => job.run(Arc::new(Profiled::new(Cpu::new())?)),
        Device::Cpu => job.run(Arc::new(Cpu::new())),
        Device::Cuda => run_cuda(p, prof, job),
    }
}

#[cfg(feature = "cuda")]
fn run_cuda<J: Job>(p: &Placement, prof: bool, job: J) -> Result<J::Out, Failure> {
    match afinar_trainer::infer::cuda_backend(p.dtype)? {
        Some(c) if prof => job.run(Arc::new(Profiled::new(c)?)),
        Some(c) => job.run(Arc::new(c)),
        None => Err(usage(anyhow::anyhow!(
            "--device cuda: no CUDA driver or device found on this machine; use --device cpu"
        ))),
    }
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<J: Job>(_p: &Placement, _prof: bool, _job: J) -> Result<J::Out, Failure> {
    Err(usage(anyhow::anyhow!(
        "--device cuda: this afinar was built without the CUDA backend; rebuild with \
         `cargo build --release -p afinar-trainer --features cuda`, or use --device cpu"
    )))
}
