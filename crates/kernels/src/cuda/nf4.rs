//! NF4 weights on the device: upload/download, whole dequantization (kernels/nf4_dequant.cu), and the
//! NF4 linears (`launch::nf4_path` picks): kernels/nf4_gemv.cu for M ≤ 8 (decode), dequantize into a
//! reused scratch + cuBLAS (`nf4_dense`) at training shapes and for non-bf16 data, the fused
//! tensor-core GEMM kernels/nf4_gemm.cu for small M with bf16 data (or everywhere with
//! `AFINAR_NF4_FUSED=1`). The format is `crate::nf4`; CPU twin: cpu/nf4.rs.

use super::gemm::{op, stores};
use super::{be, n64, Cuda, CudaBuf, CudaNf4, Data, Dtype, Nf4Scales};
use cudarc::driver::CudaSlice;

/// The six NF4 kernel arguments (see `Cuda::nf4_args`).
type Nf4Args<'a> = (
    &'a CudaSlice<u8>,
    Option<&'a CudaSlice<u8>>,
    &'a CudaSlice<f32>,
    Option<&'a CudaSlice<f32>>,
    f32,
    i32,
);
use crate::contract::{self, AbsmaxDims, Nf4Dims};
use crate::error::{KernelError, Result};
use crate::launch::{self, to_i32, Nf4Path};
use crate::nf4::{Absmax, Nf4Tensor, RawDtype};

impl CudaNf4 {
    /// The lengths the NF4 contract checks.
    pub(super) fn dims(&self) -> Nf4Dims<'_> {
        Nf4Dims {
            shape: &self.shape,
            packed: self.packed_len,
            absmax: match self.scales {
                Nf4Scales::Plain(_) => AbsmaxDims::Plain(self.absmax_len),
                Nf4Scales::Nested { .. } => AbsmaxDims::Nested {
                    codes: self.absmax_len,
                    nested: self.nested_len,
                },
            },
        }
    }
}

impl Cuda {
    /// The NF4 arguments every NF4 kernel takes: packed, codes, absmax, code8, offset, nested
    /// (plain absmax: codes and code8 null, nested = 0).
    pub(super) fn nf4_args(w: &CudaNf4) -> Nf4Args<'_> {
        match &w.scales {
            Nf4Scales::Plain(a) => (&w.packed, None, a, None, 0.0, 0),
            Nf4Scales::Nested {
                codes,
                nested,
                offset,
                code8,
                ..
            } => (&w.packed, Some(codes), nested, Some(code8), *offset, 1),
        }
    }

    /// Y (= or +=) X·W̃ᵀ + s·XA·Bᵀ with an NF4 base, on the path `launch::nf4_path` picks (GEMV for
    /// M ≤ 8, dequantize + cuBLAS at training shapes and for non-bf16 data, the fused tensor-core GEMM
    /// for small M or when asked). `lora` = (xa `[M,R]`, B `[N,R]`, R, s).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn nf4_forward(
        &self,
        x: &CudaBuf,
        w: &CudaNf4,
        y: &CudaBuf,
        acc: bool,
        lora: Option<(&CudaBuf, &CudaBuf, usize, f32)>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let (kernel, l) = match launch::nf4_path(self.caps(), m, stores([x])[0], true) {
            Nf4Path::DequantGemm => {
                return self.nf4_dense(Nf4Dir::Forward, x, w, y, acc, lora, m, k, n)
            }
            Nf4Path::Gemv => ("nf4_gemv_k", launch::nf4_gemv(m, n)?),
            Nf4Path::FusedMma => ("nf4_gemm_xwt_k", launch::nf4_gemm(m, n)?),
        };
        let (mi, ni, ki) = (
            to_i32("lora_fwd", "m", m)?,
            to_i32("lora_fwd", "n", n)?,
            to_i32("lora_fwd", "k", k)?,
        );
        let (xa, lb, r, s) = match lora {
            Some((xa, b, r, s)) => (Some(xa), Some(b), to_i32("lora_fwd", "r", r)?, s),
            None => (None, None, 0, 0.0),
        };
        let (p, c, a, c8, o, nest) = Self::nf4_args(w);
        self.nf4_xwt_k(
            kernel, l, x, p, c, a, c8, o, nest, y, acc as i32, mi, ni, ki, xa, lb, r, s,
        )
    }

    /// dX (= or +=) dY·W̃ + s·dYB·A with an NF4 base (dequantize + cuBLAS, or the fused tensor-core
    /// GEMM: `launch::nf4_path`). `lora` = (dyb `[M,R]`, A `[R,K]`, R, s).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn nf4_backward(
        &self,
        dy: &CudaBuf,
        w: &CudaNf4,
        dx: &CudaBuf,
        acc: bool,
        lora: Option<(&CudaBuf, &CudaBuf, usize, f32)>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        if launch::nf4_path(self.caps(), m, stores([dy])[0], false) != Nf4Path::FusedMma {
            return self.nf4_dense(Nf4Dir::Backward, dy, w, dx, acc, lora, m, k, n);
        }
        let (mi, ni, ki) = (
            to_i32("lora_bwd", "m", m)?,
            to_i32("lora_bwd", "n", n)?,
            to_i32("lora_bwd", "k", k)?,
        );
        let (dyb, la, r, s) = match lora {
            Some((dyb, a, r, s)) => (Some(dyb), Some(a), to_i32("lora_bwd", "r", r)?, s),
            None => (None, None, 0, 0.0),
        };
        let (p, c, a, c8, o, nest) = Self::nf4_args(w);
        self.nf4_gemm_dyw_k(
            launch::nf4_gemm(m, k)?,
            dy,
            p,
            c,
            a,
            c8,
            o,
            nest,
            dx,
            acc as i32,
            mi,
            ni,
            ki,
            dyb,
            la,
            r,
            s,
        )
    }
}

pub(super) fn nf4_from_host(cu: &Cuda, w: &Nf4Tensor) -> Result<CudaNf4> {
    // Uploaded as given (validated at use, as on the CPU); every array gets spare zero elements so
    // no allocation is empty.
    let mut packed_h = w.packed.clone();
    packed_h.resize(w.packed.len() + 8, 0);
    let packed = cu
        .stream
        .clone_htod(&packed_h)
        .map_err(be("host to device copy"))?;
    let (scales, absmax_len, nested_len) = match &w.absmax {
        Absmax::Plain(a) => {
            let mut a = a.clone();
            let len = a.len();
            a.push(0.0);
            (
                Nf4Scales::Plain(
                    cu.stream
                        .clone_htod(&a)
                        .map_err(be("host to device copy"))?,
                ),
                len,
                0,
            )
        }
        Absmax::Nested {
            codes,
            nested_absmax,
            offset,
            code8,
        } => {
            let mut c = codes.clone();
            c.push(0);
            let mut na = nested_absmax.clone();
            na.push(0.0);
            (
                Nf4Scales::Nested {
                    codes: cu
                        .stream
                        .clone_htod(&c)
                        .map_err(be("host to device copy"))?,
                    nested: cu
                        .stream
                        .clone_htod(&na)
                        .map_err(be("host to device copy"))?,
                    offset: *offset,
                    code8: cu
                        .stream
                        .clone_htod(&code8[..])
                        .map_err(be("host to device copy"))?,
                    code8_host: code8.clone(),
                },
                codes.len(),
                nested_absmax.len(),
            )
        }
    };
    Ok(CudaNf4 {
        shape: w.shape.clone(),
        packed_len: w.packed.len(),
        absmax_len,
        nested_len,
        packed,
        scales,
    })
}

pub(super) fn nf4_to_host(cu: &Cuda, w: &CudaNf4) -> Result<Nf4Tensor> {
    let mut packed = cu
        .stream
        .clone_dtoh(&w.packed)
        .map_err(be("device to host copy"))?;
    packed.truncate(w.packed_len);
    let absmax = match &w.scales {
        Nf4Scales::Plain(a) => {
            let mut a = cu.stream.clone_dtoh(a).map_err(be("device to host copy"))?;
            a.truncate(w.absmax_len);
            Absmax::Plain(a)
        }
        Nf4Scales::Nested {
            codes,
            nested,
            offset,
            code8_host,
            ..
        } => {
            let mut c = cu
                .stream
                .clone_dtoh(codes)
                .map_err(be("device to host copy"))?;
            c.truncate(w.absmax_len);
            let mut n = cu
                .stream
                .clone_dtoh(nested)
                .map_err(be("device to host copy"))?;
            n.truncate(w.nested_len);
            Absmax::Nested {
                codes: c,
                nested_absmax: n,
                offset: *offset,
                code8: code8_host.clone(),
            }
        }
    };
    Ok(Nf4Tensor {
        shape: w.shape.clone(),
        packed,
        absmax,
    })
}

pub(super) fn nf4_dequantize(cu: &Cuda, w: &CudaNf4, out: &mut CudaBuf) -> Result<()> {
    let numel = contract::nf4_dequantize(&w.dims(), out.len)?;
    let (p, c, a, c8, o, nest) = Cuda::nf4_args(w);
    cu.nf4_dequant_k(
        launch::nf4_dequant(numel),
        p,
        c,
        a,
        c8,
        o,
        nest,
        n64(numel),
        out,
    )
}

impl Cuda {
    /// The NF4 linear as dequantize + GEMM, in either direction:
    /// - forward (`Nf4Dir::Forward`): out `[M,N]` (= or +=) X·W̃ᵀ + s·XA·Bᵀ, with
    ///   `lora` = (xa `[M,R]`, B `[N,R]`, R, s);
    /// - backward (`Nf4Dir::Backward`): dX `[M,K]` (= or +=) dY·W̃ + s·dYB·A, with
    ///   `lora` = (dyb `[M,R]`, A `[R,K]`, R, s).
    ///
    /// W̃ `[N, K]` is dequantized (nf4_dequant.cu, bit-exact with the host's decode, rounded once to the
    /// storage dtype) into the backend's reused scratch, stored in X's dtype so the GEMM multiplies in
    /// X's precision: bf16 activations → a bf16 cuBLAS GEMM (as bitsandbytes' bf16 compute dtype), f32
    /// → an f32 GEMM, f16 → f16. The scratch is allocated once and grows to the largest weight seen:
    /// N·K·2 bytes for bf16 = 98 MiB for Gemma-2-9B's 14336×3584 projections (196 MiB for an f32
    /// model). The caller has checked every length.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn nf4_dense(
        &self,
        dir: Nf4Dir,
        x: &CudaBuf,
        w: &super::CudaNf4,
        out: &CudaBuf,
        acc: bool,
        lora: Option<(&CudaBuf, &CudaBuf, usize, f32)>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let mut scratch = self.nf4_scratch.lock().map_err(|_| KernelError::Backend {
            backend: "cuda",
            msg: "the NF4 scratch lock is poisoned (a previous NF4 linear panicked)".into(),
        })?;
        let wt = self.scratch_as(&mut scratch, n * k, x.dtype())?;
        super::nf4::nf4_dequantize(self, w, wt)?;
        // Forward multiplies by W̃ᵀ and Bᵀ (out width N, inner K); backward by W̃ and A as stored
        // (out width K, inner N).
        let (width, inner, trans) = match dir {
            Nf4Dir::Forward => (n, k, true),
            Nf4Dir::Backward => (k, n, false),
        };
        let beta = if acc { 1.0 } else { 0.0 };
        self.gemm(
            op(x, 0, false),
            op(wt, 0, trans),
            out,
            0,
            m,
            width,
            inner,
            1.0,
            beta,
        )?;
        drop(scratch);
        match lora {
            Some((xl, l, r, s)) if r > 0 => {
                self.rank_gemm(op(xl, 0, false), op(l, 0, trans), out, m, width, r, s, 1.0)
            }
            _ => Ok(()),
        }
    }

    /// The scratch in `slot` viewed as `len` elements of `dtype`, reallocated (the old one freed
    /// first) when it is smaller or of another dtype.
    fn scratch_as<'a>(
        &self,
        slot: &'a mut Option<CudaBuf>,
        len: usize,
        dtype: Dtype,
    ) -> Result<&'a mut CudaBuf> {
        let fits = slot
            .as_ref()
            .is_some_and(|b| b.dtype() == dtype && b.capacity() >= len);
        if !fits {
            *slot = None;
            *slot = Some(self.zeros_as(len, dtype)?);
        }
        let buf = slot.as_mut().expect("allocated above");
        // The allocation holds at least `len` elements (checked or just made).
        buf.len = len;
        Ok(buf)
    }
}

impl CudaBuf {
    /// Elements the allocation holds (≥ `len`).
    fn capacity(&self) -> usize {
        match &self.data {
            super::Data::F32(d) => d.len(),
            super::Data::Bf16(d) => d.len(),
            super::Data::F16(d) => d.len(),
        }
    }
}

/// Direction of [`Cuda::nf4_dense`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Nf4Dir {
    Forward,
    Backward,
}

// ---- Quantization on the device (kernels/nf4_quant.cu) --------------------------------------------

impl Cuda {
    /// `raw` (little-endian `dtype`, a whole number of elements) uploaded as it is into a device
    /// buffer of that dtype: the bytes of a memory-mapped checkpoint go to the device with no host
    /// copy (a pageable copy: the driver has read `raw` when this returns, so the caller may unmap it).
    pub(crate) fn upload_raw(&self, raw: &[u8], dtype: RawDtype) -> Result<CudaBuf> {
        let n = raw.len() / dtype.size();
        let mut buf = self.zeros_as(n, device_dtype(dtype))?;
        match &mut buf.data {
            Data::F32(s) => copy_bytes(self, raw, s)?,
            Data::Bf16(s) => copy_bytes(self, raw, s)?,
            Data::F16(s) => copy_bytes(self, raw, s)?,
        }
        Ok(buf)
    }
}

/// The device dtype that holds `RawDtype` values unchanged.
fn device_dtype(dtype: RawDtype) -> Dtype {
    match dtype {
        RawDtype::F32 => Dtype::F32,
        RawDtype::Bf16 => Dtype::Bf16,
        RawDtype::F16 => Dtype::F16,
    }
}

/// Copies `raw` into the first `raw.len()` bytes of `dst`.
fn copy_bytes<T>(cu: &Cuda, raw: &[u8], dst: &mut CudaSlice<T>) -> Result<()> {
    if raw.is_empty() {
        return Ok(());
    }
    // SAFETY: the view is `raw.len()` bytes of `dst`'s allocation (checked by `transmute_mut`, which
    // returns None when the allocation is smaller), and every byte pattern is a valid f32, bf16 or
    // f16, so the typed slice stays valid whatever the bytes are.
    let mut bytes =
        unsafe { dst.transmute_mut::<u8>(raw.len()) }.ok_or_else(|| KernelError::Backend {
            backend: "cuda",
            msg: format!(
                "internal: a staging buffer is smaller than the {} bytes it receives",
                raw.len()
            ),
        })?;
    cu.stream
        .memcpy_htod(raw, &mut bytes)
        .map_err(be("host to device copy"))
}

/// `Backend::from_raw_for`: the bytes uploaded as they are; converted on the device (`copy_k`, the
/// rounding `from_host_as` does on the host) when the storage dtype differs from `dtype`.
pub(super) fn from_raw_for(
    cu: &Cuda,
    raw: &[u8],
    dtype: RawDtype,
    storage: crate::backend::Storage,
) -> Result<CudaBuf> {
    crate::error::check_len(
        "from_raw",
        "raw",
        raw.len(),
        raw.len() / dtype.size() * dtype.size(),
        || format!("whole {} elements", dtype.as_str()),
    )?;
    let staged = cu.upload_raw(raw, dtype)?;
    let want = cu.dtype_for(storage);
    if staged.dtype() == want {
        return Ok(staged);
    }
    let mut out = cu.zeros_as(staged.len, want)?;
    super::elementwise::copy(cu, &staged, &mut out)?;
    Ok(out)
}

/// `Backend::nf4_quantize` on the device: upload the stored bytes, `nf4_quant_k` (packed codes and f32
/// absmax), and for double quantization the offset on the host — torch's f32 mean of the absmax in
/// torch's CPU summation order (`nf4::torch_mean_f32`), which is what makes the result bit-identical
/// to the host quantizer (a device reduction would sum in another order and differ in the last bits
/// of the offset) — then `nf4_quant_nested_k`. The absmax read back is 4 bytes per 64 weights (1/32
/// of a bf16 weight's bytes); the sum is ~1 ns per block on one host core. Peak device memory: the
/// staged weight plus the result (freed staging on return).
pub(super) fn nf4_quantize(
    cu: &Cuda,
    raw: &[u8],
    dtype: RawDtype,
    shape: &[usize],
    double_quant: bool,
) -> Result<CudaNf4> {
    const OP: &str = "nf4_quantize";
    let numel = crate::nf4::check_raw(OP, raw, dtype, shape)?;
    let blocks = numel.div_ceil(crate::nf4::BLOCK);
    let staged = cu.upload_raw(raw, dtype)?;
    // Every array gets spare zero elements, as `nf4_from_host` gives them (no empty allocation; the
    // dequant kernel's 8-byte loads stay inside `packed`).
    let packed = cu
        .stream
        .alloc_zeros::<u8>(numel.div_ceil(2) + 8)
        .map_err(be("alloc"))?;
    let absmax = cu
        .stream
        .alloc_zeros::<f32>(blocks + 1)
        .map_err(be("alloc"))?;
    let bad = cu.stream.alloc_zeros::<i32>(1).map_err(be("alloc"))?;
    cu.nf4_quant_k(
        launch::nf4_quant(numel),
        &staged,
        n64(numel),
        &packed,
        &absmax,
        &bad,
    )?;
    drop(staged);
    // Reading the flag waits for the kernel.
    let flagged = cu
        .stream
        .clone_dtoh(&bad)
        .map_err(be("device to host copy"))?[0]
        != 0;
    if flagged {
        // Name the first bad element exactly as the host quantizer does.
        return Err(match crate::nf4::first_non_finite(raw, dtype) {
            Some((i, v)) => crate::nf4::non_finite_error(shape, i, v),
            None => KernelError::Backend {
                backend: "cuda",
                msg: format!(
                    "{OP}: the device saw a non-finite element in a {shape:?} tensor the host reads \
                     as finite"
                ),
            },
        });
    }
    let (scales, nested_len) = if double_quant {
        let mut host = cu
            .stream
            .clone_dtoh(&absmax)
            .map_err(be("device to host copy"))?;
        host.truncate(blocks);
        let offset = crate::nf4::torch_mean_f32(&host);
        let code8_host = crate::nf4::dynamic_map();
        let code8 = cu
            .stream
            .clone_htod(&code8_host[..])
            .map_err(be("host to device copy"))?;
        let nested_len = blocks.div_ceil(crate::nf4::NESTED_BLOCK);
        let codes = cu
            .stream
            .alloc_zeros::<u8>(blocks + 1)
            .map_err(be("alloc"))?;
        let nested = cu
            .stream
            .alloc_zeros::<f32>(nested_len + 1)
            .map_err(be("alloc"))?;
        cu.nf4_quant_nested_k(
            launch::nf4_quant_nested(blocks),
            &absmax,
            n64(blocks),
            offset,
            &code8,
            &codes,
            &nested,
        )?;
        (
            Nf4Scales::Nested {
                codes,
                nested,
                offset,
                code8,
                code8_host,
            },
            nested_len,
        )
    } else {
        (Nf4Scales::Plain(absmax), 0)
    };
    Ok(CudaNf4 {
        shape: shape.to_vec(),
        packed_len: numel.div_ceil(2),
        absmax_len: blocks,
        nested_len,
        packed,
        scales,
    })
}
