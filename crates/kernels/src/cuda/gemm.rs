//! Dense GEMMs for the CUDA backend: row-major C[M, N] = alpha·op(A)·op(B) + beta·C.
//!
//! cuBLAS is column-major, so the row-major product is computed as the column-major Cᵀ = op(B)ᵀ·op(A)ᵀ:
//! B's storage is passed as cuBLAS's first operand. For row-major storage, "not transposed" in our
//! terms is also "not transposed" for cuBLAS with the leading dimension = the stored row length.
//!
//! Dtypes: `cublasGemmEx` with CUBLAS_COMPUTE_32F accepts (bf16, bf16 → bf16 or f32), (f16, f16 → f16
//! or f32: CUDA_R_16F) and (f32, f32 → f32). An f32 operand next to a 16-bit one is cast to that type
//! first (the 16-bit operand already limits precision, as under autocast); bf16 next to f16 goes
//! through f32 ([`cublas_input_dtype`]). An output of another type than the inputs' (or a 16-bit output
//! from f32 inputs) goes through an f32 temporary. The fallback kernel takes any mix.

use super::args::BufArg;
use super::{be, Cuda, CudaBuf, Data, Dtype};
use crate::backend::Accum;
use crate::contract;
use crate::error::{KernelError, Result};
use crate::launch;
use cudarc::cublas::{sys, CudaBlas};
use cudarc::driver::{CudaStream, DevicePtr};
use std::sync::Arc;

pub enum GemmBackend {
    Cublas(CudaBlas),
    Fallback,
}

impl GemmBackend {
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        // SAFETY: only asks the dynamic loader whether libcublas can be opened (cudarc panics on first
        // use of a library that is missing, so this check must come first).
        if !unsafe { sys::is_culib_present() } {
            return Ok(GemmBackend::Fallback);
        }
        Ok(GemmBackend::Cublas(
            CudaBlas::new(stream.clone()).map_err(be("creating the cuBLAS handle"))?,
        ))
    }

    pub fn name(&self) -> &'static str {
        match self {
            GemmBackend::Cublas(_) => "cuBLAS",
            GemmBackend::Fallback => "fallback SIMT GEMM (kernels/gemm.cu)",
        }
    }
}

/// One GEMM operand: a buffer, the element offset where the matrix starts, and whether it is stored
/// transposed (op(X) = Xᵀ of the stored row-major matrix).
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    pub buf: &'a CudaBuf,
    pub off: usize,
    pub trans: bool,
}

pub(crate) fn op(buf: &CudaBuf, off: usize, trans: bool) -> Operand<'_> {
    Operand { buf, off, trans }
}

impl Cuda {
    /// Row-major C[m, n] (at element `c_off` of `c`) = alpha·op(A)[m, k]·op(B)[k, n] + beta·C.
    /// beta = 0 overwrites C without reading it. Callers have checked every operand's extent.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &self,
        a: Operand<'_>,
        b: Operand<'_>,
        c: &CudaBuf,
        c_off: usize,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (mi, ni, ki) = (
            launch::to_i32("gemm", "m", m)?,
            launch::to_i32("gemm", "n", n)?,
            launch::to_i32("gemm", "k", k.max(1))?,
        );
        // Stored row lengths.
        let lda = if a.trans { m } else { k };
        let ldb = if b.trans { k } else { n };
        if k == 0 {
            // An empty reduction: C = beta·C.
            let tmp = self.slice_copy(c, c_off, m * n, c.dtype())?;
            let l = launch::elementwise(m * n);
            self.scale_k(l, &tmp, (m * n) as i64, beta)?;
            return self.copy_into(&tmp, c, c_off);
        }
        match &self.gemm {
            GemmBackend::Fallback => {
                let l = launch::gemm_fallback(m, n)?;
                self.gemm_fallback_k(
                    l,
                    BufArg::at(a.buf, a.off),
                    lda as i64,
                    a.trans as i32,
                    BufArg::at(b.buf, b.off),
                    ldb as i64,
                    b.trans as i32,
                    BufArg::at(c, c_off),
                    mi,
                    ni,
                    ki,
                    alpha,
                    beta,
                )
            }
            GemmBackend::Cublas(blas) => {
                let (lda_i, ldb_i) = (
                    launch::to_i32("gemm", "lda", lda)?,
                    launch::to_i32("gemm", "ldb", ldb)?,
                );
                let inp = cublas_input_dtype(a.buf.dtype(), b.buf.dtype());
                if c.dtype() != Dtype::F32 && c.dtype() != inp {
                    // cuBLAS writes the input type or f32 (f32 only, from f32 inputs): compute into
                    // an f32 copy of C, then convert back.
                    let tmp = self.slice_copy(c, c_off, m * n, Dtype::F32)?;
                    self.gemm(a, b, &tmp, 0, m, n, k, alpha, beta)?;
                    return self.copy_into(&tmp, c, c_off);
                }
                // Bring the inputs that are not `inp` to it (only those are copied). Stored extents
                // (the same count whether or not the operand is transposed).
                let (mut a_conv, mut b_conv) = (None, None);
                let a = self.operand_as(a, m * k, inp, &mut a_conv)?;
                let b = self.operand_as(b, k * n, inp, &mut b_conv)?;
                self.cublas(
                    blas,
                    a,
                    b,
                    c,
                    c_off,
                    (mi, ni, ki),
                    (lda_i, ldb_i),
                    alpha,
                    beta,
                )
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn cublas(
        &self,
        blas: &CudaBlas,
        a: Operand<'_>,
        b: Operand<'_>,
        c: &CudaBuf,
        c_off: usize,
        (m, n, k): (i32, i32, i32),
        (lda, ldb): (i32, i32),
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        fn dt(d: Dtype) -> sys::cudaDataType {
            match d {
                Dtype::F32 => sys::cudaDataType::CUDA_R_32F,
                Dtype::Bf16 => sys::cudaDataType::CUDA_R_16BF,
                Dtype::F16 => sys::cudaDataType::CUDA_R_16F,
            }
        }
        let s = &self.stream;
        let (pa, _ga) = dev_ptr(a.buf, s);
        let (pb, _gb) = dev_ptr(b.buf, s);
        let (pc, _gc) = dev_ptr(c, s);
        let pa = pa + (a.off * a.buf.dtype().size()) as u64;
        let pb = pb + (b.off * b.buf.dtype().size()) as u64;
        let pc = pc + (c_off * c.dtype().size()) as u64;
        let t = |x: bool| {
            if x {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        // SAFETY: the pointers are live device allocations on `self.stream` (the handle's stream),
        // offset within their extents (checked by the calling op); alpha/beta are host f32 scalars as
        // CUBLAS_COMPUTE_32F requires; the dtype pairs are ones cublasGemmEx supports (see the module
        // docs). Column-major view: C^T[n, m] = op(B)^T · op(A)^T.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                t(b.trans),
                t(a.trans),
                n,
                m,
                k,
                (&alpha) as *const f32 as *const _,
                pb as *const _,
                dt(b.buf.dtype()),
                ldb,
                pa as *const _,
                dt(a.buf.dtype()),
                lda,
                (&beta) as *const f32 as *const _,
                pc as *mut _,
                dt(c.dtype()),
                n,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| KernelError::Backend {
            backend: "cuda",
            msg: format!("cublasGemmEx (m={m}, n={n}, k={k}): {e:?}"),
        })
    }

    /// C[m, n] = alpha·op(A)[m, k]·op(B)[k, n] + beta·C where A and B are both small rank-r operands (LoRA's
    /// XA, dYB, A, B: f32, k or the other dim = R) and C is a large activation. With cuBLAS and a
    /// 16-bit C, A and B are converted to C's dtype first (a few KiB to MiB), so cuBLAS accumulates
    /// into C directly (β = 1, f32 compute) instead of through an f32 copy of C; the products are then
    /// bf16 × bf16 as under autocast, which bf16 C's own rounding already dominates. An f32 C keeps
    /// f32 operands (an f32 GEMM).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rank_gemm(
        &self,
        a: Operand<'_>,
        b: Operand<'_>,
        c: &CudaBuf,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        if c.dtype() != Dtype::F32 && matches!(self.gemm, GemmBackend::Cublas(_)) {
            let (mut a_conv, mut b_conv) = (None, None);
            let a = self.operand_as(a, m * k, c.dtype(), &mut a_conv)?;
            let b = self.operand_as(b, k * n, c.dtype(), &mut b_conv)?;
            return self.gemm(a, b, c, 0, m, n, k, alpha, beta);
        }
        self.gemm(a, b, c, 0, m, n, k, alpha, beta)
    }

    /// `o` (its `len` stored elements) as `dtype`: itself, or a converted copy kept in `hold`.
    fn operand_as<'a>(
        &self,
        o: Operand<'a>,
        len: usize,
        dtype: Dtype,
        hold: &'a mut Option<CudaBuf>,
    ) -> Result<Operand<'a>> {
        if o.buf.dtype() == dtype {
            return Ok(o);
        }
        let conv = hold.insert(self.slice_copy(o.buf, o.off, len, dtype)?);
        Ok(op(conv, 0, o.trans))
    }

    /// A new buffer holding elements [off, off + len) of `src`, converted to `dtype`.
    pub(crate) fn slice_copy(
        &self,
        src: &CudaBuf,
        off: usize,
        len: usize,
        dtype: Dtype,
    ) -> Result<CudaBuf> {
        let out = self.zeros_as(len, dtype)?;
        let l = launch::elementwise(len);
        self.copy_k(l, BufArg::at(src, off), &out, len as i64)?;
        Ok(out)
    }

    /// Copies all of `src` into `dst` starting at element `off` (converting dtype).
    pub(crate) fn copy_into(&self, src: &CudaBuf, dst: &CudaBuf, off: usize) -> Result<()> {
        let l = launch::elementwise(src.len);
        self.copy_k(l, src, BufArg::at(dst, off), src.len as i64)
    }
}

fn dev_ptr<'a>(b: &'a CudaBuf, s: &'a CudaStream) -> (u64, cudarc::driver::SyncOnDrop<'a>) {
    match &b.data {
        Data::F32(x) => x.device_ptr(s),
        Data::Bf16(x) => x.device_ptr(s),
        Data::F16(x) => x.device_ptr(s),
    }
}

/// The one input type cuBLAS multiplies in for operands stored as `a` and `b`: an f32 operand joins the
/// 16-bit one (that operand already limits the precision, as under autocast); bf16 with f16 (no common
/// 16-bit type without losing range or mantissa) goes through f32.
pub(crate) fn cublas_input_dtype(a: Dtype, b: Dtype) -> Dtype {
    match (a, b) {
        (Dtype::F32, Dtype::F32) => Dtype::F32,
        (Dtype::Bf16, Dtype::Bf16) | (Dtype::Bf16, Dtype::F32) | (Dtype::F32, Dtype::Bf16) => {
            Dtype::Bf16
        }
        (Dtype::F16, Dtype::F16) | (Dtype::F16, Dtype::F32) | (Dtype::F32, Dtype::F16) => {
            Dtype::F16
        }
        (Dtype::Bf16, Dtype::F16) | (Dtype::F16, Dtype::Bf16) => Dtype::F32,
    }
}

/// Whether `arch` ("sm_XY", optionally with a suffix such as "sm_90a") has bf16 `mma.sync` (sm_80 and
/// newer). sm_75 (Turing: T4, the GPUs without bf16) compiles the tensor-core helpers to a trap.
pub(crate) fn arch_has_bf16_mma(arch: &str) -> bool {
    arch.strip_prefix("sm_")
        .map(|d| d.trim_end_matches(|c: char| c.is_ascii_alphabetic()))
        .and_then(|d| d.parse::<u32>().ok())
        .is_some_and(|v| v >= 80)
}

/// `AFINAR_NO_MMA=1`: take the sm_75 paths (no tensor-core kernels) on any GPU, so they can be
/// validated on an sm_80+ machine. Read once per process.
fn mma_disabled_by_env() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("AFINAR_NO_MMA").is_ok_and(|v| v == "1"))
}

impl Cuda {
    /// Whether the bf16 tensor-core kernels (nf4_gemm.cu, attention.cu's `*_mma_*`) exist here:
    /// sm_80 or newer and not disabled by `AFINAR_NO_MMA=1`. Which operands may take them is
    /// `launch::tensor_cores_for` (bf16 storage only).
    pub(crate) fn bf16_mma(&self) -> bool {
        arch_has_bf16_mma(self.arch()) && !mma_disabled_by_env()
    }

    /// The device's and options' part of every path choice (`crate::launch`'s path functions).
    pub(crate) fn caps(&self) -> launch::PathCaps {
        launch::PathCaps {
            bf16_mma: self.bf16_mma(),
            simt_attention: self.simt_attention,
            mma_attention: self.mma_attention,
            max_dyn_smem: self.max_dyn_smem,
            nf4_fused: self.nf4_fused,
            lora_fused: self.lora_fused,
        }
    }
}

/// The storage dtypes of `bufs`, as the path functions take them.
pub(crate) fn stores<const N: usize>(bufs: [&CudaBuf; N]) -> [launch::Store; N] {
    bufs.map(|b| match b.dtype() {
        Dtype::F32 => launch::Store::F32,
        Dtype::Bf16 => launch::Store::Bf16,
        Dtype::F16 => launch::Store::F16,
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_xwt(
    cu: &Cuda,
    x: &CudaBuf,
    w: &CudaBuf,
    y: &mut CudaBuf,
    m: usize,
    k: usize,
    n: usize,
    acc: Accum,
) -> Result<()> {
    contract::matmul_xwt(x.len, w.len, y.len, m, k, n)?;
    cu.gemm(
        op(x, 0, false),
        op(w, 0, true),
        y,
        0,
        m,
        n,
        k,
        1.0,
        beta(acc),
    )
}

#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_dyw(
    cu: &Cuda,
    dy: &CudaBuf,
    w: &CudaBuf,
    dx: &mut CudaBuf,
    m: usize,
    k: usize,
    n: usize,
    acc: Accum,
) -> Result<()> {
    contract::matmul_dyw(dy.len, w.len, dx.len, m, k, n)?;
    cu.gemm(
        op(dy, 0, false),
        op(w, 0, false),
        dx,
        0,
        m,
        k,
        n,
        1.0,
        beta(acc),
    )
}

#[allow(clippy::too_many_arguments)]
pub(super) fn matmul_dytx(
    cu: &Cuda,
    dy: &CudaBuf,
    x: &CudaBuf,
    dw: &mut CudaBuf,
    m: usize,
    k: usize,
    n: usize,
    acc: Accum,
) -> Result<()> {
    contract::matmul_dytx(dy.len, x.len, dw.len, m, k, n)?;
    cu.gemm(
        op(dy, 0, true),
        op(x, 0, false),
        dw,
        0,
        n,
        k,
        m,
        1.0,
        beta(acc),
    )
}

fn beta(acc: Accum) -> f32 {
    match acc {
        Accum::Overwrite => 0.0,
        Accum::Add => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cublas_input_dtypes() {
        use Dtype::*;
        let all = [F32, Bf16, F16];
        for a in all {
            for b in all {
                let t = cublas_input_dtype(a, b);
                assert_eq!(t, cublas_input_dtype(b, a), "{a:?} {b:?}");
                // f32 only when both are f32 or the two 16-bit types meet; else the 16-bit one.
                let want = match (a, b) {
                    (F32, F32) | (Bf16, F16) | (F16, Bf16) => F32,
                    (x, F32) | (F32, x) => x,
                    (x, _) => x,
                };
                assert_eq!(t, want, "{a:?} {b:?}");
            }
        }
    }
    #[test]
    fn bf16_mma_archs() {
        for (arch, yes) in [
            ("sm_75", false),
            ("sm_70", false),
            ("sm_80", true),
            ("sm_86", true),
            ("sm_90", true),
            ("sm_90a", true),
            ("sm_100", true),
            ("sm_120", true),
            ("compute_80", false),
            ("sm_", false),
        ] {
            assert_eq!(arch_has_bf16_mma(arch), yes, "{arch}");
        }
    }
}
