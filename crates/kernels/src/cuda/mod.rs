//! The CUDA backend (feature `cuda`): the whole `Backend` op set on an NVIDIA GPU through `cudarc`.
//!
//! Layout, mirroring cpu/: one file per op family with the CPU's file names (adamw, attention,
//! cross_entropy, dropout, elementwise, embedding, geglu, gemm, lm_head, lora, nf4, rmsnorm, rope,
//! softcap), each holding its ops as functions that check the op's contract (`crate::contract`) and
//! then marshal arguments and launch; `impl Backend for Cuda` (backend.rs) only delegates to them.
//! Shared pieces: this file (buffer types, device setup, kernel module loading), memory.rs (host ⇄
//! device), reduce.rs (deterministic f64 sums for `sum_squares` and the losses), adamw_paged.rs (the
//! paged optimizer), args.rs (kernel argument types; the typed launch methods themselves are generated
//! from the declarations in `crate::abi`), compile.rs (NVRTC and the CUBIN cache), profile.rs (the
//! CUDA-event clock of `crate::profile`).
//!
//! - Kernels: `kernels/*.cu`, embedded, compiled at first use by NVRTC for the device's compute
//!   capability (sm_75 and newer) and cached on disk (see `compile.rs`). The bf16 tensor-core kernels
//!   need sm_80 and take only bf16-stored operands; which kernels serve an op is decided by the pure
//!   path functions of `crate::launch` (`attention_path`, `nf4_path`, `lora_path`).
//! - Dense GEMMs: cuBLAS (`cublasGemmEx`, bf16 or f32 in, f32 compute) when libcublas can be loaded,
//!   otherwise the SIMT kernel in `kernels/gemm.cu` (also forced with `AFINAR_NO_CUBLAS=1`).
//! - Launch geometry: the pure planners in `crate::launch`.
//!
//! Storage and precision. A [`CudaBuf`] carries its dtype: f32 or bf16. Every kernel reads and writes
//! either (the dtype tag travels with each pointer; see kernels/README.md) and computes in f32 (f64
//! for global sums), so buffers of different dtypes mix freely in one op; dense GEMMs with one bf16 and
//! one f32 operand convert the f32 one to bf16 first (cuBLAS has no mixed-input combination), as
//! autocast does. Which dtype a buffer gets is the caller's [`Storage`] intent: `Storage::Master`
//! buffers are always f32 (LoRA weights, gradients, optimizer state, per-row statistics), and
//! `Storage::Activation` buffers take the backend's *activation dtype* ([`CudaOptions::alloc_dtype`]:
//! f32 by default, so every op matches the CPU reference to f32 rounding; bf16 for QLoRA). Plain
//! `zeros` / `from_host` are `Storage::Activation`. [`Cuda::zeros_as`] / [`Cuda::from_host_as`] take an
//! explicit [`Dtype`] (tests, benchmarks).
//!
//! AdamW state: [`CudaAdamState`], either two f32 device buffers or, for the paged optimizer, a
//! [`PagedAdamState`] in pinned host memory (adamw_paged.rs).
//!
//! Streams: everything runs in order on the context's default stream; `to_host` and the ops that
//! return host values synchronize.

mod adamw;
mod adamw_paged;
pub(crate) mod args;
mod attention;
mod backend;
mod compile;
mod cross_entropy;
mod dropout;
mod elementwise;
mod embedding;
mod geglu;
mod gemm;
#[cfg(test)]
mod gpu_tests;
mod lm_head;
mod lora;
mod memory;
pub use memory::probe_device_memory;
mod nf4;
mod profile;
mod reduce;
mod rmsnorm;
mod rope;
mod softcap;

pub use adamw_paged::PagedAdamState;
pub use gemm::GemmBackend;

use crate::backend::{AdamMoments, Storage};
use crate::contract::{IdStats, IdsView};
use crate::error::{KernelError, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream};
use half::{bf16, f16};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Element type of a device buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    Bf16,
    /// IEEE binary16: the activation dtype for GPUs without bf16 (sm_75), trained with dynamic loss
    /// scaling (afinar-trainer's loss_scale). Kernels convert f32 -> f16 with round to nearest even;
    /// values beyond ±65504 become ±inf (which the loss scaler detects).
    F16,
}

impl Dtype {
    /// The tag the kernels take next to each pointer (DT_F32 / DT_BF16 / DT_F16 in common.cuh).
    fn tag(self) -> &'static i32 {
        static F32_TAG: i32 = 0;
        static BF16_TAG: i32 = 1;
        static F16_TAG: i32 = 2;
        match self {
            Dtype::F32 => &F32_TAG,
            Dtype::Bf16 => &BF16_TAG,
            Dtype::F16 => &F16_TAG,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    /// `x` rounded to this dtype and back (round to nearest even, as the kernels' f2bf / f2h).
    pub fn round(self, x: f32) -> f32 {
        match self {
            Dtype::F32 => x,
            Dtype::Bf16 => bf16::from_f32(x).to_f32(),
            Dtype::F16 => f16::from_f32(x).to_f32(),
        }
    }
}

pub(crate) enum Data {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
    F16(CudaSlice<f16>),
}

/// A device buffer of `len` logical f32 values stored as f32 or bf16. The allocation holds at least
/// one element so that empty buffers need no special case in the launch code.
pub struct CudaBuf {
    pub(crate) data: Data,
    pub(crate) len: usize,
}

impl CudaBuf {
    pub fn dtype(&self) -> Dtype {
        match self.data {
            Data::F32(_) => Dtype::F32,
            Data::Bf16(_) => Dtype::Bf16,
            Data::F16(_) => Dtype::F16,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// AdamW moments of one parameter tensor on the CUDA backend (`Backend::AdamState`).
pub enum CudaAdamState {
    /// m and v as f32 device buffers.
    Device(AdamMoments<CudaBuf>),
    /// m and v in pinned host memory, streamed through the device at each step (paged optimizer).
    Paged(PagedAdamState),
}

impl CudaAdamState {
    /// Number of parameters the state is for.
    pub fn len(&self) -> usize {
        match self {
            CudaAdamState::Device(d) => d.m.len,
            CudaAdamState::Paged(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the moments live in host memory.
    pub fn is_paged(&self) -> bool {
        matches!(self, CudaAdamState::Paged(_))
    }

    /// The dtypes of (m, v) on the device; None when paged.
    pub fn device_dtypes(&self) -> Option<(Dtype, Dtype)> {
        match self {
            CudaAdamState::Device(d) => Some((d.m.dtype(), d.v.dtype())),
            CudaAdamState::Paged(_) => None,
        }
    }
}

/// i32 values on the device (token ids, labels, positions, segment ids). `len` is the logical length;
/// the allocation holds at least one element (the driver cannot allocate zero bytes).
pub struct CudaIds {
    pub(crate) data: CudaSlice<i32>,
    pub(crate) len: usize,
    /// The values' range and label count, taken from the host data at upload (the ids are never
    /// written afterwards): what the op contracts check, without reading the device.
    pub(crate) stats: IdStats,
}

impl CudaIds {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl IdsView for CudaIds {
    fn len(&self) -> usize {
        self.len
    }
    fn stats(&self) -> IdStats {
        self.stats
    }
    /// Only on an op's error path (a value outside its range), never in a successful op.
    fn host_values(&self) -> Result<Vec<i32>> {
        let mut v = self
            .data
            .stream()
            .clone_dtoh(&self.data)
            .map_err(be("device to host copy"))?;
        v.truncate(self.len);
        Ok(v)
    }
}

/// An NF4 weight on the device, in the bitsandbytes layout (see `crate::nf4`). Uploaded as given;
/// like the CPU backend, the layout is validated against the dims when the weight is used (errors
/// `w`, `w.packed`, `w.absmax`, `w.absmax_code`, `w.nested_absmax`).
pub struct CudaNf4 {
    pub(crate) shape: Vec<usize>,
    /// Host lengths of packed, absmax (plain) or absmax codes (nested), nested absmax (nested).
    pub(crate) packed_len: usize,
    pub(crate) absmax_len: usize,
    pub(crate) nested_len: usize,
    /// The packed bytes plus 8 spare zero bytes (so no allocation is empty and 8-byte loads at the
    /// tail stay inside the allocation).
    pub(crate) packed: CudaSlice<u8>,
    pub(crate) scales: Nf4Scales,
}

pub(crate) enum Nf4Scales {
    /// f32 absmax per 64-block.
    Plain(CudaSlice<f32>),
    /// Double quantization: u8 code per block, f32 nested absmax per 256 blocks, the 256-entry map.
    Nested {
        codes: CudaSlice<u8>,
        nested: CudaSlice<f32>,
        offset: f32,
        code8: CudaSlice<f32>,
        code8_host: Box<[f32; 256]>,
    },
}

/// An element count as the kernels take it (`long long`).
pub(crate) fn n64(n: usize) -> i64 {
    n as i64
}

/// Construction options of [`Cuda`].
#[derive(Clone, Copy, Debug)]
pub struct CudaOptions {
    /// Device ordinal.
    pub ordinal: usize,
    /// The activation dtype: what `Storage::Activation` buffers (and plain `zeros` / `from_host`)
    /// are stored as (see the module docs). `Storage::Master` buffers are f32 whatever this is.
    pub alloc_dtype: Dtype,
    /// Use kernels/gemm.cu instead of cuBLAS for dense GEMMs.
    pub force_fallback_gemm: bool,
    /// Use the CUDA-core attention even where a tensor-core one exists (default:
    /// `AFINAR_ATTN_PATH=simt`).
    pub simt_attention: bool,
    /// Use attention.cu's first tensor-core kernels instead of attention_flash.cu's where both exist
    /// (D ∈ {128, 256}; default: `AFINAR_ATTN_PATH=mma`). For comparisons.
    pub mma_attention: bool,
    /// The flash backward with its ≤ 99 KiB tiling (the `_s` kernels) on any device, not only where
    /// the default tiling does not fit (default: `AFINAR_ATTN_PATH=flash-small`). So that a GPU with
    /// more shared memory tests and measures what sm_86/89 run.
    pub small_flash_bwd: bool,
    /// NF4 linears at training shapes (M ≥ `launch::NF4_DENSE_MIN_M`) on the fused tensor-core GEMM
    /// instead of dequantize + cuBLAS (default: `AFINAR_NF4_FUSED=1`). For comparisons.
    pub nf4_fused: bool,
    /// LoRA's rank-r products on lora.cu's fused kernels instead of GEMMs (default:
    /// `AFINAR_LORA_FUSED=1`). For comparisons.
    pub lora_fused: bool,
}

impl Default for CudaOptions {
    /// Reads `AFINAR_NF4_FUSED` and `AFINAR_LORA_FUSED` (`=1` turns the option on) and
    /// `AFINAR_ATTN_PATH` (`flash`, the default, `flash-small`, `mma` or `simt`; another value is refused by
    /// [`Cuda::try_new_with`]).
    fn default() -> Self {
        let env = |k: &str| std::env::var(k).is_ok_and(|v| v == "1");
        let attn = std::env::var(ATTN_PATH_ENV).ok();
        CudaOptions {
            ordinal: 0,
            alloc_dtype: Dtype::F32,
            force_fallback_gemm: false,
            simt_attention: attn.as_deref() == Some("simt"),
            mma_attention: attn.as_deref() == Some("mma"),
            small_flash_bwd: attn.as_deref() == Some("flash-small"),
            nf4_fused: env("AFINAR_NF4_FUSED"),
            lora_fused: env("AFINAR_LORA_FUSED"),
        }
    }
}

/// The environment variable choosing the attention kernels (see [`CudaOptions`]).
pub const ATTN_PATH_ENV: &str = "AFINAR_ATTN_PATH";

/// `AFINAR_ATTN_PATH`'s value, when set, must be one of the four paths.
fn check_attn_path_env() -> Result<()> {
    match std::env::var(ATTN_PATH_ENV) {
        Ok(v) if !matches!(v.as_str(), "flash" | "flash-small" | "mma" | "simt") => {
            Err(KernelError::Backend {
                backend: "cuda",
                msg: format!(
                    "{ATTN_PATH_ENV}={v:?}: expected flash (the default), flash-small, mma or simt"
                ),
            })
        }
        _ => Ok(()),
    }
}

/// The CUDA backend: one device, its default stream, cuBLAS, and the loaded kernel modules.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    gemm: GemmBackend,
    arch: String,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// The dtype of `Storage::Activation` buffers (fixed at construction).
    alloc_dtype: Dtype,
    simt_attention: bool,
    mma_attention: bool,
    small_flash_bwd: bool,
    /// CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, bytes.
    max_dyn_smem: u32,
    nf4_fused: bool,
    lora_fused: bool,
    /// The dense copy of an NF4 weight for the dequantize + cuBLAS path (nf4.rs), reused by every
    /// NF4 linear: it grows to the largest weight × the activation's dtype size and stays.
    nf4_scratch: Mutex<Option<CudaBuf>>,
    /// High-water mark of the device's used memory (memory.rs `note_device_use`).
    device_peak: std::sync::atomic::AtomicU64,
}

fn be<E: std::fmt::Debug>(what: &'static str) -> impl FnOnce(E) -> KernelError {
    move |e| KernelError::Backend {
        backend: "cuda",
        msg: format!("{what}: {e:?}"),
    }
}

impl Cuda {
    /// Opens device 0 with the default options. `Ok(None)` when there is no CUDA driver (or no
    /// device) on this machine; an error when the driver is there but the device or NVRTC cannot be
    /// used. `AFINAR_NO_CUBLAS=1` forces the fallback GEMM.
    pub fn try_new() -> Result<Option<Cuda>> {
        let force_fallback_gemm = std::env::var("AFINAR_NO_CUBLAS").is_ok_and(|v| v == "1");
        Self::try_new_with(CudaOptions {
            force_fallback_gemm,
            ..CudaOptions::default()
        })
    }

    /// `try_new` with explicit options.
    pub fn try_new_with(opts: CudaOptions) -> Result<Option<Cuda>> {
        // SAFETY: only asks the dynamic loader whether libcuda can be opened. This must come first:
        // CudaContext::new panics (it does not return an error) when libcuda is missing.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Ok(None);
        }
        match CudaContext::device_count() {
            Ok(n) if (n.max(0) as usize) <= opts.ordinal => return Ok(None),
            Ok(_) => {}
            Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => {
                return Ok(None)
            }
            Err(e) => return Err(be("cuInit / cuDeviceGetCount")(e)),
        }
        // SAFETY: as above, for NVRTC (libnvrtc.so.13): without it no kernel can be compiled.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(KernelError::Backend {
                backend: "cuda",
                msg: "a CUDA driver is present but NVRTC (libnvrtc.so.13) cannot be loaded; install it \
                      (python3 -m pip install --target .cuda nvidia-cuda-nvrtc==13.0.88) and put its lib \
                      directory on LD_LIBRARY_PATH"
                    .into(),
            });
        }
        check_attn_path_env()?;
        let ctx = CudaContext::new(opts.ordinal).map_err(be("creating the CUDA context"))?;
        let max_dyn_smem = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(be("reading the shared-memory opt-in limit"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(be("reading the compute capability"))?;
        if (major, minor) < (7, 5) {
            return Err(KernelError::Backend {
                backend: "cuda",
                msg: format!("device {} has compute capability {major}.{minor}; the kernels need sm_75 or newer", opts.ordinal),
            });
        }
        if major < 8 && opts.alloc_dtype == Dtype::Bf16 {
            // sm_75 has no bf16 arithmetic in cuBLAS and no bf16 mma.sync; f16 storage works there.
            return Err(KernelError::Backend {
                backend: "cuda",
                msg: format!("device {} (sm_{major}{minor}) has no bf16 support; use f16 activations (model.dtype = \"f16\") or f32", opts.ordinal),
            });
        }
        // SAFETY: the backend issues all work on one stream (the default stream), so cudarc's
        // per-buffer events for cross-stream synchronization are not needed. A caller that creates
        // more streams on this context must synchronize them itself.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let gemm = if opts.force_fallback_gemm {
            GemmBackend::Fallback
        } else {
            GemmBackend::new(&stream)?
        };
        Ok(Some(Cuda {
            ctx,
            stream,
            gemm,
            arch: format!("sm_{major}{minor}"),
            modules: Mutex::new(HashMap::new()),
            alloc_dtype: opts.alloc_dtype,
            simt_attention: opts.simt_attention,
            mma_attention: opts.mma_attention,
            small_flash_bwd: opts.small_flash_bwd,
            max_dyn_smem: u32::try_from(max_dyn_smem).unwrap_or(0),
            nf4_fused: opts.nf4_fused,
            lora_fused: opts.lora_fused,
            nf4_scratch: Mutex::new(None),
            device_peak: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// The device's architecture, e.g. "sm_90".
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The device name reported by the driver.
    pub fn device_name(&self) -> String {
        self.ctx
            .name()
            .unwrap_or_else(|_| "unknown CUDA device".into())
    }

    /// "cuBLAS" or "fallback SIMT GEMM".
    pub fn gemm_name(&self) -> &'static str {
        self.gemm.name()
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(be("synchronize"))
    }

    /// The activation dtype (what `Storage::Activation` buffers are stored as).
    pub fn alloc_dtype(&self) -> Dtype {
        self.alloc_dtype
    }

    /// The dtype a buffer with intent `storage` is stored as.
    pub fn dtype_for(&self, storage: Storage) -> Dtype {
        match storage {
            Storage::Activation => self.alloc_dtype,
            Storage::Master => Dtype::F32,
        }
    }

    /// A zeroed buffer of `n` elements of `dtype`.
    pub fn zeros_as(&self, n: usize, dtype: Dtype) -> Result<CudaBuf> {
        let cap = n.max(1);
        let data = match dtype {
            Dtype::F32 => Data::F32(self.stream.alloc_zeros::<f32>(cap).map_err(be("alloc"))?),
            Dtype::Bf16 => Data::Bf16(self.stream.alloc_zeros::<bf16>(cap).map_err(be("alloc"))?),
            Dtype::F16 => Data::F16(self.stream.alloc_zeros::<f16>(cap).map_err(be("alloc"))?),
        };
        self.note_device_use();
        Ok(CudaBuf { data, len: n })
    }

    /// Uploads `data` as `dtype` (bf16, f16: round to nearest even; f16 overflows to ±inf).
    pub fn from_host_as(&self, data: &[f32], dtype: Dtype) -> Result<CudaBuf> {
        if data.is_empty() {
            return self.zeros_as(0, dtype);
        }
        let d = match dtype {
            Dtype::F32 => Data::F32(
                self.stream
                    .clone_htod(data)
                    .map_err(be("host to device copy"))?,
            ),
            Dtype::Bf16 => {
                let h: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                Data::Bf16(
                    self.stream
                        .clone_htod(&h)
                        .map_err(be("host to device copy"))?,
                )
            }
            Dtype::F16 => {
                let h: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                Data::F16(
                    self.stream
                        .clone_htod(&h)
                        .map_err(be("host to device copy"))?,
                )
            }
        };
        Ok(CudaBuf {
            data: d,
            len: data.len(),
        })
    }

    pub(crate) fn f32_scratch(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream
            .alloc_zeros::<f32>(n.max(1))
            .map_err(be("alloc scratch"))
    }

    /// The kernel `name` of `file`, compiling and loading the module on first use.
    pub(crate) fn function(&self, file: &'static str, name: &str) -> Result<CudaFunction> {
        let module = {
            let mut modules = self.modules.lock().map_err(|_| KernelError::Backend {
                backend: "cuda",
                msg: "the kernel module cache lock is poisoned (a previous load panicked)".into(),
            })?;
            match modules.get(file) {
                Some(m) => m.clone(),
                None => {
                    let load = |fresh: bool| -> Result<Arc<CudaModule>> {
                        let cubin = compile::cubin(file, &self.arch, fresh)?;
                        self.ctx
                            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
                            .map_err(be("loading a compiled kernel module"))
                    };
                    // A cached CUBIN that does not load (truncated, or from an incompatible driver)
                    // is recompiled and replaced.
                    let m = match load(false) {
                        Ok(m) => m,
                        Err(_) => load(true)?,
                    };
                    modules.insert(file, m.clone());
                    m
                }
            }
        };
        module
            .load_function(name)
            .map_err(|e| KernelError::Backend {
                backend: "cuda",
                msg: format!("kernel `{name}` not found in {file}: {e:?}"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs everywhere: without a driver it must say so with Ok(None), never panic.
    #[test]
    fn try_new_never_panics() {
        match Cuda::try_new() {
            Ok(None) => println!("skipped: no CUDA driver"),
            Ok(Some(c)) => println!(
                "CUDA device: {} ({}), GEMM: {}",
                c.device_name(),
                c.arch(),
                c.gemm_name()
            ),
            Err(e) => panic!("a CUDA driver is present but the backend failed to start: {e}"),
        }
    }

    #[test]
    fn dtype_tags_match_common_cuh() {
        assert_eq!(*Dtype::F32.tag(), 0);
        assert_eq!(*Dtype::Bf16.tag(), 1);
        assert_eq!(*Dtype::F16.tag(), 2);
        assert!(
            crate::abi::COMMON.contains("#define DT_F32 0")
                && crate::abi::COMMON.contains("#define DT_BF16 1")
                && crate::abi::COMMON.contains("#define DT_F16 2")
        );
    }
}
