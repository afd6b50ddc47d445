//! afinar-kernels: every numerical op of Afinar, as one `Backend` trait with a CPU reference
//! implementation (f32, rayon, `gemm`) and a CUDA implementation (feature `cuda`).
//!
//! This crate knows nothing of models: ops take flat buffers and the dimensions that give them shape.
//!
//! Reading order: `backend.rs` (the op set and its conventions), `contract/` (each op's argument
//! checks, shared by both backends), then per op family `cpu/<family>.rs` (the reference),
//! `cuda/<family>.rs` and `kernels/<family>.cu` at the repository root (kernels/README.md). `abi/`
//! declares every CUDA kernel's parameters once; `launch.rs` plans launch geometry; `nf4/` is the
//! NF4 format; `profile/` times any backend's ops (the `Profiled` wrapper).

#[cfg(any(test, feature = "cuda"))]
mod abi;
pub mod backend;
pub mod contract;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod launch;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod nf4;
pub mod profile;
pub mod tolerance;

pub use backend::{
    clip_coef, Accum, AdamMoments, AdamW, AttnShape, Backend, DeviceMemory, LoraGradRef, LoraRef,
    Storage, Weight,
};
pub use cpu::Cpu;
pub use error::{KernelError, Result};
pub use nf4::{Absmax, Nf4Tensor};
pub use tolerance::{Mismatch, Tolerance};
