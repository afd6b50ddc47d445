//! Which device a command runs on, and what that device has free: `--device` of eval / generate /
//! merge / quantize, `afinar plan`'s default memory, and `afinar train`'s check before loading.

use crate::config::Device;

/// (free, total) bytes of GPU 0, or None when this afinar has no CUDA backend or the machine has no
/// GPU (or its driver cannot be asked).
pub fn gpu_memory() -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    {
        afinar_kernels::cuda::probe_device_memory(0).ok().flatten()
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}

/// Whether this binary was built with the CUDA backend.
pub const HAS_CUDA_BACKEND: bool = cfg!(feature = "cuda");

/// `--device`: "cuda" or "cpu" as given, or (None) cuda when this afinar has the CUDA backend and a
/// GPU is present, else cpu. The second value says why, for the command's first line.
pub fn resolve(given: Option<&str>) -> Result<(Device, &'static str), String> {
    match given {
        Some("cpu") => Ok((Device::Cpu, "--device cpu")),
        Some("cuda") => Ok((Device::Cuda, "--device cuda")),
        Some(d) => Err(format!("--device {d:?}: expected cuda or cpu")),
        None if HAS_CUDA_BACKEND && gpu_memory().is_some() => {
            Ok((Device::Cuda, "a GPU is present"))
        }
        None if HAS_CUDA_BACKEND => Ok((Device::Cpu, "no GPU found")),
        None => Ok((Device::Cpu, "built without the CUDA backend")),
    }
}
