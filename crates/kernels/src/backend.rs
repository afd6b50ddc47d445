//! The op set, once, as a trait. Model code is generic over `B: Backend` and monomorphized: there is no
//! per-op runtime dispatch. `Cpu` (f32, rayon, `gemm`) is the reference; `Cuda` (feature `cuda`) mirrors it.
//!
//! Conventions for every method:
//! - Buffers are flat and row-major; shapes are given in the project's dimension letters
//!   (B batch, T sequence, H hidden, I intermediate, V vocab, NH query heads, NKV kv heads, D head dim,
//!   R LoRA rank). `N` below is a row count (usually B·T), `M,K,N` are GEMM dims.
//! - "writes" means the output is overwritten; "adds into" means the op accumulates (`+=`), which is
//!   how gradients of shared inputs (residual stream, tied embedding) are summed.
//! - A length that does not match the dims returns `KernelError::Shape` naming the op and argument;
//!   inconsistent dims return `KernelError::Invalid`. No method panics on well-typed input.
//! - Each op's argument contract is one function of [`crate::contract`], called first by every
//!   backend's implementation of the op: the checks, their order and their messages are the same on
//!   every backend (tests/it/ops_errors.rs runs the same bad calls on each and compares the messages). A
//!   backend may refuse more than the contract only for a limit of its own (e.g. the CUDA attention's
//!   head dim ≤ 256, dims that must fit the kernels' `int`), with a `KernelError` naming the argument.
//! - Ids (token ids, labels, positions, segment ids) are range-checked against the op's vocabulary
//!   or sign without reading device memory: `ids_from_host` records their range and label count
//!   ([`crate::contract::IdStats`]) from the host data, and ids buffers are never written after
//!   upload. Only a failing check reads the values back, to name the first bad one. The kernels also
//!   never index a table at an id outside its range, whatever the ids hold.
//! - `Self::Buf` holds f32 values logically; a backend may store them in a narrower type (the CUDA
//!   backend keeps activations in bf16), which is why tolerances are per backend. Who decides: the
//!   [`Storage`] intent given when the buffer is allocated (see there for which buffers are which).
//! - Ops accept any mix of storages on their arguments (e.g. X in bf16 with LoRA A in f32) and compute
//!   in f32; a backend that cannot take a combination converts it or refuses it with a `KernelError`,
//!   never reinterprets it.

use crate::error::Result;
use crate::nf4::{Nf4Tensor, RawDtype};

/// What a buffer is for, which decides how a backend stores it. The CPU backend keeps everything in f32
/// and ignores the intent; the CUDA backend stores `Activation` buffers in its activation dtype (bf16
/// when so configured) and `Master` buffers in f32 always.
///
/// - **Master** (f32): whatever an optimizer updates or a long sum accumulates into, where bf16's 8-bit
///   mantissa would lose the update or the sum: LoRA A and B and their gradients; in full fine-tuning
///   every trainable parameter (embedding, norms, dense linears) and its gradient; AdamW m and v; RMSNorm
///   `rstd` and attention `lse` (per-row statistics the backward divides by or exponentiates); LoRA
///   dropout masks (their 1/(1−p) is not a bf16 number) and the saved xa = drop(X)·Aᵀ (peft computes the
///   adapter path in the adapter's f32); loss accumulators and evaluation logits.
/// - **Activation** (bf16 on a bf16 GPU run): everything activation-sized that the reference
///   implementation (transformers with bf16 weights) also keeps in bf16: hidden states and the residual
///   stream, norm outputs, projections, attention outputs, MLP intermediates, their gradients; and the
///   frozen weights (dense linears, embedding, norm offsets when not trained).
///
/// Why the split is per buffer and not per backend: QLoRA's memory budget needs bf16 activations and
/// frozen weights, while its optimizer needs f32 parameters, gradients and moments (an f32 update of
/// size ~lr·|p| vanishes when rounded to bf16).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Storage {
    Activation,
    Master,
}

/// AdamW's first and second moments of one parameter tensor, held as two backend buffers. The state
/// type of a backend that keeps moments in its ordinary memory (the CPU backend's `AdamState`; the CUDA
/// backend's device-resident variant).
pub struct AdamMoments<Buf> {
    pub m: Buf,
    pub v: Buf,
}

/// Whether an op overwrites its output or accumulates into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accum {
    Overwrite,
    Add,
}

/// The frozen base weight of a linear layer, W̃: [N=out, K=in].
pub enum Weight<'a, B: Backend> {
    Dense(&'a B::Buf),
    Nf4(&'a B::Nf4),
}

/// Attention geometry and masking. Shapes: q, out: [B, T, NH, D]; k, v: [B, TK, NKV, D] (the layout
/// a row-major projection output already has). Query head h reads kv head h / (NH/NKV).
///
/// TK ≥ T: the queries are the LAST T positions of the TK keys, i.e. query i sits at absolute position
/// TK − T + i (training: TK = T; decoding with a KV cache: T = 1 or a prefill chunk, TK = cache length).
/// The backward requires TK = T.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub b: usize,
    /// Query length T.
    pub t: usize,
    /// Key/value length TK (≥ T).
    pub tk: usize,
    pub nh: usize,
    pub nkv: usize,
    pub d: usize,
    /// Multiplies q·k (Gemma-2: query_pre_attn_scalar^-0.5, not D^-0.5).
    pub scale: f32,
    /// c·tanh(s/c) on the scaled scores, BEFORE the mask.
    pub softcap: Option<f32>,
    /// A query at q sees keys kv with q − W < kv ≤ q (W keys, itself included).
    pub window: Option<usize>,
}

/// AdamW hyper-parameters for one step (torch semantics). `step` is 1-based (the t in 1 − β^t).
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u64,
}

// The op set takes explicit dimensions (no tensor type carries a shape), so ops have many arguments;
// `from_host` is a backend method, not a conversion of `self`.
#[allow(clippy::too_many_arguments, clippy::wrong_self_convention)]
pub trait Backend: Send + Sync + Sized {
    /// A buffer of (logically) f32 values.
    type Buf: Send + Sync;
    /// A buffer of i32 values: token ids, labels (−100 = ignore), positions, segment ids.
    type Ids: Send + Sync;
    /// An NF4 weight resident on this backend (packed codes + double-quantized absmax).
    type Nf4: Send + Sync;
    /// AdamW moments (m, v; f32) of one parameter tensor, wherever this backend keeps them: its own
    /// memory, or, for a paged optimizer, pinned host memory streamed through the device at each step.
    /// Opaque to the trainer, which only creates, steps, saves and restores it (see `adam_state`).
    type AdamState: Send + Sync;

    fn name(&self) -> &'static str;

    // ---- profiling (see `crate::profile`) ------------------------------------------------------
    /// A clock on this backend's device for [`crate::profile::Profiled`]: events recorded in the
    /// order of the backend's work. None (the default) = ops are timed by host wall time, right for a
    /// backend whose ops finish before they return (the CPU).
    fn device_timer(&self) -> Result<Option<Box<dyn crate::profile::DeviceTimer>>> {
        Ok(None)
    }
    /// The profiler when this backend is a [`crate::profile::Profiled`] one (None otherwise): how
    /// generic code marks steps and reads the report. Never times anything itself.
    fn profiler(&self) -> Option<&crate::profile::Profiler> {
        None
    }

    /// Device memory as (used now, high-water mark, total) in bytes, for a backend with its own device
    /// memory (CUDA: `total − free` as the driver reports it, so it includes the context and anything
    /// else on the device, as nvidia-smi does; the mark is sampled at every allocation). None (the
    /// default) for a backend that computes in host memory, whose peak is the process's RSS.
    fn device_memory(&self) -> Option<crate::backend::DeviceMemory> {
        None
    }

    // ---- memory -------------------------------------------------------------------------------
    /// `n` zeros in `Storage::Activation` storage (= `zeros_for(n, Storage::Activation)`).
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    /// `data` in `Storage::Activation` storage (= `from_host_for(data, Storage::Activation)`).
    fn from_host(&self, data: &[f32]) -> Result<Self::Buf>;
    /// `n` zeros stored as `storage` asks (see [`Storage`]). Default: the backend has one storage.
    fn zeros_for(&self, n: usize, storage: Storage) -> Result<Self::Buf> {
        let _ = storage;
        self.zeros(n)
    }
    /// `data` stored as `storage` asks. Default: the backend has one storage.
    fn from_host_for(&self, data: &[f32], storage: Storage) -> Result<Self::Buf> {
        let _ = storage;
        self.from_host(data)
    }
    /// `x` rounded as an activation of this backend is stored (bf16 on a bf16 backend; identity when
    /// activations are f32). For scalars the reference keeps in the activation dtype, e.g. Gemma's
    /// embedding normalizer sqrt(H), which transformers builds as a tensor of the hidden states' dtype.
    fn round_activation(&self, x: f32) -> f32 {
        x
    }
    /// Like `from_host_for`, taking ownership: a backend whose buffers are host vectors keeps the
    /// allocation instead of copying it (loading a [V,H] embedding then needs one host copy, not two).
    fn from_vec_for(&self, data: Vec<f32>, storage: Storage) -> Result<Self::Buf> {
        self.from_host_for(&data, storage)
    }
    fn to_host(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Uploads ids; a backend records their [`crate::contract::IdStats`] here (see the module docs).
    fn ids_from_host(&self, ids: &[i32]) -> Result<Self::Ids>;
    fn ids_len(&self, ids: &Self::Ids) -> usize;
    fn nf4_from_host(&self, w: &Nf4Tensor) -> Result<Self::Nf4>;
    /// Back to host form (for saving a quantized checkpoint).
    fn nf4_to_host(&self, w: &Self::Nf4) -> Result<Nf4Tensor>;
    /// NF4-quantizes a weight given as its stored bytes (`raw`: little-endian `dtype`, row-major
    /// `shape`), as bitsandbytes `quantize_4bit(blocksize=64, quant_type="nf4",
    /// compress_statistics=double_quant)`: the result is bit-identical to
    /// `nf4::quantize(decoded, shape, double_quant)` on every backend (packed codes, absmax, nested
    /// codes, nested absmax, offset). The loader hands it a slice of the memory-mapped checkpoint: no
    /// f32 copy of the tensor is made on the host. The CPU quantizes block by block from the bytes; the
    /// CUDA backend uploads the bytes and quantizes on the device (kernels/nf4_quant.cu). Errors as
    /// `nf4::quantize` (a non-finite element named by its flat index), plus `raw` not holding exactly
    /// Π shape elements. Default: quantize on the host, then `nf4_from_host`.
    fn nf4_quantize(
        &self,
        raw: &[u8],
        dtype: RawDtype,
        shape: &[usize],
        double_quant: bool,
    ) -> Result<Self::Nf4> {
        self.nf4_from_host(&crate::nf4::quantize_raw(raw, dtype, shape, double_quant)?)
    }
    /// A buffer holding the values of `raw` (little-endian `dtype`, `raw.len() / dtype.size()`
    /// elements; a trailing partial element is `KernelError::Shape`), stored as `storage` asks. Equal
    /// bit for bit to `from_host_for(decoded, storage)`. Default: decode on the host (in parallel),
    /// then `from_vec_for`; a device backend uploads the bytes as they are when the storage dtype is
    /// `dtype` (a bf16 checkpoint into bf16 activations: no conversion at all).
    fn from_raw_for(&self, raw: &[u8], dtype: RawDtype, storage: Storage) -> Result<Self::Buf> {
        crate::error::check_len(
            "from_raw",
            "raw",
            raw.len(),
            raw.len() / dtype.size() * dtype.size(),
            || format!("whole {} elements", dtype.as_str()),
        )?;
        self.from_vec_for(dtype.decode(raw), storage)
    }
    /// Copies `src` into `dst` (same length).
    fn copy(&self, src: &Self::Buf, dst: &mut Self::Buf) -> Result<()>;
    /// Sets every element to `value`.
    fn fill(&self, buf: &mut Self::Buf, value: f32) -> Result<()>;
    /// dst[dst_off..dst_off+n] ← src[src_off..src_off+n], converting between storages as `copy` does;
    /// the rest of dst is untouched. A range outside its buffer (offset + n > len, or an overflowing
    /// sum) is `KernelError::Invalid` naming `src_off` or `dst_off`. On a device backend this is a
    /// device-side copy with no host round trip: generation grows its KV cache with it.
    fn copy_range(
        &self,
        src: &Self::Buf,
        src_off: usize,
        dst: &mut Self::Buf,
        dst_off: usize,
        n: usize,
    ) -> Result<()>;
    /// Fills `out` with an inverted-dropout mask: element i is 0 with probability p, else
    /// f32(1/(1−p)), decided by a counter-based hash of (seed, stream, i) — see `cpu::dropout` for the
    /// exact integer formula. Every backend gives the same bits (store it in `Storage::Master`: 1/(1−p)
    /// is not a bf16 number), the same (seed, stream) always gives the same mask, and a mask of
    /// length n is the first n elements of any longer mask of the same (seed, stream). p outside
    /// [0, 1) (or not finite) is `KernelError::Invalid` naming `p`.
    fn dropout_mask(&self, out: &mut Self::Buf, p: f64, seed: u64, stream: u64) -> Result<()>;

    // ---- elementwise --------------------------------------------------------------------------
    /// y += alpha · x (same length).
    fn axpy(&self, alpha: f32, x: &Self::Buf, y: &mut Self::Buf) -> Result<()>;
    /// x *= alpha.
    fn scale(&self, x: &mut Self::Buf, alpha: f32) -> Result<()>;
    /// x ← x ⊙ m (same length); m is a dropout mask holding 0 or 1/(1−p).
    fn mul(&self, x: &mut Self::Buf, m: &Self::Buf) -> Result<()>;
    /// Σ x² in f64 (a piece of the global gradient norm).
    fn sum_squares(&self, x: &Self::Buf) -> Result<f64>;

    // ---- linear GEMMs: X [M,K], W [N,K], Y [M,N] ----------------------------------------------
    /// Y (= or +=) X·Wᵀ.
    fn matmul_xwt(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        y: &mut Self::Buf,
        m: usize,
        k: usize,
        n: usize,
        acc: Accum,
    ) -> Result<()>;
    /// dX (= or +=) dY·W.
    fn matmul_dyw(
        &self,
        dy: &Self::Buf,
        w: &Self::Buf,
        dx: &mut Self::Buf,
        m: usize,
        k: usize,
        n: usize,
        acc: Accum,
    ) -> Result<()>;
    /// dW (= or +=) dYᵀ·X.
    fn matmul_dytx(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        dw: &mut Self::Buf,
        m: usize,
        k: usize,
        n: usize,
        acc: Accum,
    ) -> Result<()>;

    // ---- LoRA linear: Y = X·W̃ᵀ + s·(drop(X)·Aᵀ)·Bᵀ ------------------------------------------
    /// x [M,K], a [R,K], b [N,R], dropout mask [M,K] (None = no dropout). Writes y [M,N] and the saved
    /// activation xa = drop(X)·Aᵀ [M,R]. With `lora = None` it is the plain base linear. An NF4 base is
    /// dequantized tile by tile: the dense W of the layer never exists whole.
    #[allow(clippy::too_many_arguments)]
    fn lora_fwd(
        &self,
        x: &Self::Buf,
        w: Weight<'_, Self>,
        lora: Option<LoraRef<'_, Self>>,
        y: &mut Self::Buf,
        xa: Option<&mut Self::Buf>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()>;
    /// Backward of `lora_fwd`. Writes dx [M,K] (= dY·W̃ + s·((dY·B)·A)⊙mask); adds into da [R,K] and
    /// db [N,R]. No gradient for the frozen W̃.
    #[allow(clippy::too_many_arguments)]
    fn lora_bwd(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: Weight<'_, Self>,
        lora: Option<LoraGradRef<'_, Self>>,
        dx: &mut Self::Buf,
        dx_acc: Accum,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()>;
    /// Dequantizes a whole NF4 weight (for merge and tests; training never calls it).
    fn nf4_dequantize(&self, w: &Self::Nf4, out: &mut Self::Buf) -> Result<()>;

    // ---- norms and pointwise -------------------------------------------------------------------
    /// Gemma RMSNorm over rows x [N,H]: y = x·rsqrt(mean(x²)+eps)·(1+w). Writes y [N,H], rstd [N].
    fn rmsnorm_fwd(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        y: &mut Self::Buf,
        rstd: &mut Self::Buf,
        n: usize,
        h: usize,
        eps: f32,
    ) -> Result<()>;
    /// Writes dx [N,H]; adds into dw [H] when given (None for a frozen norm).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        dx: &mut Self::Buf,
        dw: Option<&mut Self::Buf>,
        n: usize,
        h: usize,
    ) -> Result<()>;
    /// RoPE in place on x [N, heads, D], split-halves (NeoX) convention, angle = pos·theta^(−2i/D),
    /// positions [N] per token (packing restarts them). `inverse` rotates by −angle (the backward).
    fn rope(
        &self,
        x: &mut Self::Buf,
        pos: &Self::Ids,
        n: usize,
        heads: usize,
        d: usize,
        theta: f32,
        inverse: bool,
    ) -> Result<()>;
    /// out = gelu_tanh(gate)·up, all [N]-element buffers (any shape). Writes out.
    fn geglu_fwd(&self, gate: &Self::Buf, up: &Self::Buf, out: &mut Self::Buf) -> Result<()>;
    /// Writes dgate, dup.
    fn geglu_bwd(
        &self,
        dout: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
    ) -> Result<()>;
    /// x ← c·tanh(x/c) in place.
    fn softcap_fwd(&self, x: &mut Self::Buf, cap: f32) -> Result<()>;
    /// dy ← dy·(1 − (y/c)²) in place, given the capped output y.
    fn softcap_bwd(&self, y: &Self::Buf, dy: &mut Self::Buf, cap: f32) -> Result<()>;

    // ---- attention ------------------------------------------------------------------------------
    /// Causal softmax attention (see `AttnShape`); segment ids [B·TK] over the key positions (queries use
    /// the last T of them; None = one segment per row) forbid attention across packed samples.
    /// Writes out [B,T,NH,D] and lse [B,NH,T] (log-sum-exp of the masked scores, saved for the backward).
    #[allow(clippy::too_many_arguments)]
    fn attn_fwd(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        seg: Option<&Self::Ids>,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        s: &AttnShape,
    ) -> Result<()>;
    /// Writes dq, dk, dv.
    #[allow(clippy::too_many_arguments)]
    fn attn_bwd(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        seg: Option<&Self::Ids>,
        out: &Self::Buf,
        lse: &Self::Buf,
        dout: &Self::Buf,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        s: &AttnShape,
    ) -> Result<()>;

    // ---- embedding and loss --------------------------------------------------------------------
    /// out [N,H] = table[ids]·scale (table [V,H]). An id outside [0,V) is an `Invalid` error.
    fn embedding_fwd(
        &self,
        ids: &Self::Ids,
        table: &Self::Buf,
        out: &mut Self::Buf,
        v: usize,
        h: usize,
        scale: f32,
    ) -> Result<()>;
    /// Adds scale·dout[i] into dtable[ids[i]].
    fn embedding_bwd(
        &self,
        ids: &Self::Ids,
        dout: &Self::Buf,
        dtable: &mut Self::Buf,
        v: usize,
        h: usize,
        scale: f32,
    ) -> Result<()>;
    /// Cross-entropy over logits [N,V] with an optional final soft-cap applied first, labels [N]
    /// (−100 = ignored; the caller has already shifted them). Returns (Σ loss, count of scored rows).
    /// When `dlogits` is given it writes grad_scale·∂(Σ loss)/∂logits (pre-cap logits), zero on ignored rows.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy(
        &self,
        logits: &Self::Buf,
        labels: &Self::Ids,
        n: usize,
        v: usize,
        softcap: Option<f32>,
        grad_scale: f32,
        dlogits: Option<&mut Self::Buf>,
    ) -> Result<(f64, usize)>;
    /// Fused tied LM head + cross-entropy: logits = hidden [N,H] · embᵀ (emb [V,H]), soft-capped, scored
    /// against labels [N], processed `chunk` rows at a time so the [N,V] logits never exist at once.
    /// Adds grad_scale·∂/∂hidden into dhidden [N,H] and, when given, into demb [V,H].
    #[allow(clippy::too_many_arguments)]
    fn lm_head_ce(
        &self,
        hidden: &Self::Buf,
        emb: &Self::Buf,
        labels: &Self::Ids,
        n: usize,
        h: usize,
        v: usize,
        softcap: Option<f32>,
        grad_scale: f32,
        dhidden: Option<&mut Self::Buf>,
        demb: Option<&mut Self::Buf>,
    ) -> Result<(f64, usize)>;

    // ---- optimizer ------------------------------------------------------------------------------
    /// Zeroed AdamW state for a parameter tensor of `n` elements. `paged` asks for a paged optimizer:
    /// the moments live in (pinned) host memory and are streamed through the device at each step, so
    /// they take no device memory between steps. A backend whose memory is host memory already (the
    /// CPU) ignores it.
    fn adam_state(&self, n: usize, paged: bool) -> Result<Self::AdamState>;
    /// AdamW state from host moments (a checkpoint), same placement rules as `adam_state`. m and v
    /// must have the same length.
    fn adam_state_from_host(&self, m: &[f32], v: &[f32], paged: bool) -> Result<Self::AdamState>;
    /// The moments back on the host, (m, v), bit-exact (they are f32 everywhere).
    fn adam_state_to_host(&self, s: &Self::AdamState) -> Result<(Vec<f32>, Vec<f32>)>;
    /// One torch-AdamW step (as `adamw`) on param `p` with gradient `g` and the moments in `s`
    /// (lengths must match). A paged state gives bit-identical results to a resident one.
    fn adamw_step(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        s: &mut Self::AdamState,
        h: &AdamW,
    ) -> Result<()>;

    /// One torch-AdamW step on param/grad/m/v (same length): p ← p·(1 − lr·wd); m, v updated;
    /// p ← p − lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps).
    fn adamw(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        h: &AdamW,
    ) -> Result<()>;
}

/// LoRA factors for the forward: a [R,K], b [N,R], s = α/R (or α/√R), optional dropout mask [M,K].
pub struct LoraRef<'a, B: Backend> {
    pub a: &'a B::Buf,
    pub b: &'a B::Buf,
    pub r: usize,
    pub scale: f32,
    pub mask: Option<&'a B::Buf>,
}

/// LoRA factors, saved activation and gradient sinks for the backward.
pub struct LoraGradRef<'a, B: Backend> {
    pub a: &'a B::Buf,
    pub b: &'a B::Buf,
    pub r: usize,
    pub scale: f32,
    pub mask: Option<&'a B::Buf>,
    /// xa = drop(X)·Aᵀ [M,R] saved by the forward.
    pub xa: &'a B::Buf,
    /// Adds into da [R,K].
    pub da: &'a mut B::Buf,
    /// Adds into db [N,R].
    pub db: &'a mut B::Buf,
}

/// Gradient clipping coefficient, torch `clip_grad_norm_`: min(1, max_norm / (norm + 1e-6)).
pub fn clip_coef(total_norm: f64, max_norm: f64) -> f64 {
    (max_norm / (total_norm + 1e-6)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cpu;

    fn hp(step: u64) -> AdamW {
        AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step,
        }
    }

    /// The CPU backend keeps every intent in f32: the intent methods give the same values as the
    /// plain ones, and `from_vec_for` keeps the caller's allocation (no second copy).
    #[test]
    fn cpu_storage_intents_are_f32_and_from_vec_does_not_copy() {
        let be = Cpu::new();
        let data: Vec<f32> = vec![1.0, -2.5, 1.0e-30, 3.0e38];
        for s in [Storage::Activation, Storage::Master] {
            assert_eq!(be.zeros_for(3, s).unwrap(), vec![0.0; 3]);
            assert_eq!(be.from_host_for(&data, s).unwrap(), data);
            let v = data.clone();
            let ptr = v.as_ptr();
            let b = be.from_vec_for(v, s).unwrap();
            assert_eq!(b, data);
            assert_eq!(b.as_ptr(), ptr, "from_vec_for copied the buffer");
        }
    }

    /// `adamw_step` on an `AdamState` is `adamw` on the moments, bit for bit, paged or not, and the
    /// state survives a host round trip exactly (what a checkpoint does between steps).
    #[test]
    fn cpu_adam_state_steps_and_round_trips_exactly() {
        let be = Cpu::new();
        let n = 37;
        let p0: Vec<f32> = (0..n).map(|i| (i as f32 - 18.0) / 7.0).collect();
        let grad = |step: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 13 + step * 5) % 17) as f32 - 8.0) / 9.0)
                .collect()
        };
        // Reference: the plain op on four buffers.
        let (mut p_ref, mut m_ref, mut v_ref) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
        for step in 1..=3 {
            be.adamw(
                &mut p_ref,
                &grad(step),
                &mut m_ref,
                &mut v_ref,
                &hp(step as u64),
            )
            .unwrap();
        }
        for paged in [false, true] {
            let mut p = p0.clone();
            let mut s = be.adam_state(n, paged).unwrap();
            for step in 1..=3 {
                be.adamw_step(&mut p, &grad(step), &mut s, &hp(step as u64))
                    .unwrap();
                // Save and restore between steps, as a resumed run does.
                let (m, v) = be.adam_state_to_host(&s).unwrap();
                s = be.adam_state_from_host(&m, &v, paged).unwrap();
            }
            let (m, v) = be.adam_state_to_host(&s).unwrap();
            let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&p), bits(&p_ref), "paged = {paged}: p");
            assert_eq!(bits(&m), bits(&m_ref), "paged = {paged}: m");
            assert_eq!(bits(&v), bits(&v_ref), "paged = {paged}: v");
        }
    }

    #[test]
    fn cpu_adam_state_errors_are_typed() {
        let be = Cpu::new();
        let e = be
            .adam_state_from_host(&[0.0; 3], &[0.0; 2], false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("adam_state_from_host") && e.contains("`v`"),
            "{e}"
        );
        let mut s = be.adam_state(4, true).unwrap();
        let e = be
            .adamw_step(&mut vec![0.0; 3], &vec![0.0; 3], &mut s, &hp(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("adamw") && e.contains("`m`"), "{e}");
        let mut p = vec![0.0; 4];
        let e = be
            .adamw_step(&mut p, &vec![0.0; 4], &mut s, &hp(0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("step"), "{e}");
    }
}

/// A backend's device memory (see [`Backend::device_memory`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes in use on the device now (all processes and the context included).
    pub used: u64,
    /// The largest `used` seen since the backend was created (sampled at each allocation).
    pub peak: u64,
    pub total: u64,
}
