//! afinar-kernels: every numerical op of Afinar, as one `Backend` trait with a CPU reference
//! implementation (f32, rayon, `gemm`) and a CUDA implementation (feature `cuda`).
//!
//! This crate knows nothing of models: ops take flat buffers and the dimensions that give them shape.

#[cfg(any(test, feature = "cuda"))]
mod abi;
pub mod backend;
pub mod contract;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod launch;
pub mod nf4;
pub mod tolerance;

pub use backend::{
    clip_coef, Accum, AdamMoments, AdamW, AttnShape, Backend, LoraGradRef, LoraRef, Storage, Weight,
};
pub use cpu::Cpu;
pub use error::{KernelError, Result};
pub use nf4::{Absmax, Nf4Tensor};
pub use tolerance::{Mismatch, Tolerance};
