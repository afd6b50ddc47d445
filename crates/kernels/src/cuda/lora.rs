//! The LoRA linear Y = X·W̃ᵀ + s·(drop(X)·Aᵀ)·Bᵀ and its backward: cuBLAS (or gemm.cu) for a dense
//! base, nf4.rs for an NF4 base; the rank-r halves as GEMMs (default, `launch::LoraPath::Gemm`) or
//! kernels/lora.cu's fused kernels (`AFINAR_LORA_FUSED=1`). CPU twin: cpu/lora.rs.
//!
//! Precision of the GEMM path follows storage: all-f32 operands (an f32 model) multiply in f32; a
//! 16-bit activation (X, dY) next to an f32 rank-r operand (A, B, xa, dYB: Master storage) converts
//! the small f32 operand to the activation's dtype, as gemm.rs does for every mixed product (cuBLAS
//! has no mixed-input GEMM; the big operand is never copied), and the products accumulate in f32
//! into f32 xa, dYB, dA, dB, or with β = 1 into the activation Y or dX (`Cuda::rank_gemm`). That is
//! what autocast does for a bf16 model; the fused kernels instead read the f32 factors unrounded.

use super::gemm::op;
use super::{n64, Cuda, CudaBuf, Dtype};
use crate::backend::{Accum, LoraGradRef, LoraRef, Weight};
use crate::contract::{self, LoraDims, LoraGradDims, WeightDims};
use crate::error::Result;
use crate::launch::{self, to_i32, LoraPath};

impl Cuda {
    /// out `[M,R]` = (X ⊙ mask)·Wᵀ where W's element (j, k) is at w[j·sj + k·sk].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lora_proj(
        &self,
        x: &CudaBuf,
        mask: Option<&CudaBuf>,
        w: &CudaBuf,
        sj: usize,
        sk: usize,
        out: &CudaBuf,
        m: usize,
        kdim: usize,
        r: usize,
    ) -> Result<()> {
        if m == 0 || r == 0 {
            return Ok(());
        }
        let (mask_arg, has) = (mask, mask.is_some() as i32);
        self.lora_proj_k(
            launch::lora_proj(m, r)?,
            x,
            mask_arg,
            has,
            w,
            n64(sj),
            n64(sk),
            out,
            to_i32("lora", "k", kdim)?,
            to_i32("lora", "r", r)?,
        )
    }
}

impl Cuda {
    /// drop(X) = X ⊙ mask as a new buffer of X's dtype (for the GEMM path; the fused kernels apply
    /// the mask as they read), or X itself without a mask.
    fn dropped<'a>(
        &self,
        x: &'a CudaBuf,
        mask: Option<&CudaBuf>,
        hold: &'a mut Option<CudaBuf>,
    ) -> Result<&'a CudaBuf> {
        match mask {
            None => Ok(x),
            Some(mk) => {
                let mut t = self.slice_copy(x, 0, x.len, x.dtype())?;
                super::elementwise::mul(self, &mut t, mk)?;
                Ok(&*hold.insert(t))
            }
        }
    }
}

/// Forward. GEMM path (default): xa = drop(X)·Aᵀ (a GEMM with N = R, f32 out), the base (cuBLAS, or
/// the NF4 linear), then Y += s·xa·Bᵀ (β = 1; `Cuda::rank_gemm`). Fused path (`AFINAR_LORA_FUSED=1`):
/// lora_proj_k for xa and lora_add_k for the dense base's LoRA term. With an NF4 base the LoRA term
/// joins the NF4 linear either way (fused into its kernel, or a β = 1 GEMM after the dequantized one).
#[allow(clippy::too_many_arguments)]
pub(super) fn lora_fwd(
    cu: &Cuda,
    x: &CudaBuf,
    w: Weight<'_, Cuda>,
    lora: Option<LoraRef<'_, Cuda>>,
    y: &mut CudaBuf,
    xa: Option<&mut CudaBuf>,
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    contract::lora_fwd(
        x.len,
        &weight_dims(&w),
        lora.as_ref().map(lora_dims).as_ref(),
        y.len,
        xa.as_deref().map(CudaBuf::len),
        m,
        k,
        n,
    )?;
    let y: &CudaBuf = y;
    let fused = launch::lora_path(cu.caps()) == LoraPath::Fused;
    // xa = drop(X)·Aᵀ first (the NF4 linears consume it).
    let mut xa_tmp = None;
    let lora_parts = match &lora {
        Some(l) => {
            let xa_buf: &CudaBuf = match xa {
                Some(b) => b,
                None => xa_tmp.insert(cu.zeros_as(m * l.r, Dtype::F32)?),
            };
            if fused {
                cu.lora_proj(x, l.mask, l.a, k, 1, xa_buf, m, k, l.r)?;
            } else {
                let mut hold = None;
                let xd = cu.dropped(x, l.mask, &mut hold)?;
                // [M,K]·[R,K]ᵀ: a bf16 X meets A converted to bf16 (gemm.rs), f32 out.
                cu.gemm(
                    op(xd, 0, false),
                    op(l.a, 0, true),
                    xa_buf,
                    0,
                    m,
                    l.r,
                    k,
                    1.0,
                    0.0,
                )?;
            }
            Some((xa_buf, l.b, l.r, l.scale))
        }
        None => None,
    };
    match w {
        Weight::Dense(wb) => {
            cu.gemm(op(x, 0, false), op(wb, 0, true), y, 0, m, n, k, 1.0, 0.0)?;
            match lora_parts {
                Some((xa, b, r, s)) if fused => cu.lora_add_k(
                    launch::elementwise(m * n),
                    y,
                    xa,
                    b,
                    n64(m),
                    to_i32("lora_fwd", "n", n)?,
                    to_i32("lora_fwd", "r", r)?,
                    s,
                ),
                // Y += s·xa·Bᵀ: [M,R]·[N,R]ᵀ.
                Some((xa, b, r, s)) => {
                    cu.rank_gemm(op(xa, 0, false), op(b, 0, true), y, m, n, r, s, 1.0)
                }
                None => Ok(()),
            }
        }
        Weight::Nf4(q) => {
            if m == 0 || n == 0 {
                return Ok(());
            }
            cu.nf4_forward(x, q, y, false, lora_parts, m, k, n)
        }
    }
}

/// Backward. dYB = dY·B `[M,R]`; dA += s·dYBᵀ·drop(X); dB += s·dYᵀ·xa; dX (= or +=) dY·W̃ +
/// s·(dYB·A)⊙mask. GEMM path (default): every product a GEMM, accumulating with β = 1 into the f32
/// gradients and into dX; with dropout the dX term goes through a temporary, masked, then added.
/// Fused path (`AFINAR_LORA_FUSED=1`): lora_proj_k, lora_da_k, lora_db_k and lora_dx_k.
#[allow(clippy::too_many_arguments)]
pub(super) fn lora_bwd(
    cu: &Cuda,
    dy: &CudaBuf,
    x: &CudaBuf,
    w: Weight<'_, Cuda>,
    lora: Option<LoraGradRef<'_, Cuda>>,
    dx: &mut CudaBuf,
    dx_acc: Accum,
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    let dims = lora.as_ref().map(|l| {
        let grads = LoraGradDims {
            xa: l.xa.len,
            da: l.da.len,
            db: l.db.len,
        };
        (lora_grad_dims(l), grads)
    });
    contract::lora_bwd(
        dy.len,
        x.len,
        &weight_dims(&w),
        dims.as_ref().map(|(l, g)| (l, g)),
        dx.len,
        m,
        k,
        n,
    )?;
    let dx: &CudaBuf = dx;
    let acc = dx_acc == Accum::Add;
    let fused = launch::lora_path(cu.caps()) == LoraPath::Fused;
    let mut dyb_tmp = None;
    let lora_parts = match lora {
        Some(l) => {
            let r = l.r;
            // dYB = dY·B [M, R] (B [N, R]).
            let dyb: &CudaBuf = dyb_tmp.insert(cu.zeros_as(m * r, Dtype::F32)?);
            if fused {
                lora_grads_fused(cu, dy, x, &l, dyb, m, k, n)?;
            } else if m > 0 {
                cu.gemm(
                    op(dy, 0, false),
                    op(l.b, 0, false),
                    dyb,
                    0,
                    m,
                    r,
                    n,
                    1.0,
                    0.0,
                )?;
                let mut hold = None;
                let xd = cu.dropped(x, l.mask, &mut hold)?;
                // dA [R,K] += s·dYBᵀ·drop(X): [M,R]ᵀ·[M,K].
                cu.gemm(
                    op(dyb, 0, true),
                    op(xd, 0, false),
                    l.da,
                    0,
                    r,
                    k,
                    m,
                    l.scale,
                    1.0,
                )?;
                // dB [N,R] += s·dYᵀ·xa: [M,N]ᵀ·[M,R].
                cu.gemm(
                    op(dy, 0, true),
                    op(l.xa, 0, false),
                    l.db,
                    0,
                    n,
                    r,
                    m,
                    l.scale,
                    1.0,
                )?;
            }
            Some((dyb, l.a, r, l.scale, l.mask))
        }
        None => None,
    };
    let add_lora_dx = |cuda: &Cuda,
                       (dyb, a, r, s, mask): (&CudaBuf, &CudaBuf, usize, f32, Option<&CudaBuf>)|
     -> Result<()> {
        if fused {
            let (mask_arg, has) = (mask, mask.is_some() as i32);
            return cuda.lora_dx_k(
                launch::elementwise(m * k),
                dx,
                dyb,
                a,
                mask_arg,
                has,
                n64(m),
                to_i32("lora_bwd", "k", k)?,
                to_i32("lora_bwd", "r", r)?,
                s,
            );
        }
        match mask {
            // dX += s·dYB·A: [M,R]·[R,K].
            None => cuda.rank_gemm(op(dyb, 0, false), op(a, 0, false), dx, m, k, r, s, 1.0),
            Some(mk) => {
                let mut t = cuda.zeros_as(m * k, dx.dtype())?;
                cuda.rank_gemm(op(dyb, 0, false), op(a, 0, false), &t, m, k, r, s, 0.0)?;
                super::elementwise::mul(cuda, &mut t, mk)?;
                cuda.axpy_k(launch::elementwise(m * k), 1.0, &t, dx, n64(m * k))
            }
        }
    };
    match w {
        Weight::Dense(wb) => {
            cu.gemm(
                op(dy, 0, false),
                op(wb, 0, false),
                dx,
                0,
                m,
                k,
                n,
                1.0,
                if acc { 1.0 } else { 0.0 },
            )?;
            if let Some(p) = lora_parts {
                add_lora_dx(cu, p)?;
            }
            Ok(())
        }
        Weight::Nf4(q) => {
            if m == 0 || k == 0 {
                return Ok(());
            }
            match lora_parts {
                // Without dropout the LoRA term joins the NF4 linear (extra reduction steps of the
                // fused kernel, or a β = 1 GEMM after the dequantized one).
                Some((dyb, a, r, s, None)) => {
                    cu.nf4_backward(dy, q, dx, acc, Some((dyb, a, r, s)), m, k, n)
                }
                Some(p) => {
                    cu.nf4_backward(dy, q, dx, acc, None, m, k, n)?;
                    add_lora_dx(cu, p)
                }
                None => cu.nf4_backward(dy, q, dx, acc, None, m, k, n),
            }
        }
    }
}

/// The fused path's dYB = dY·B (lora_proj_k), dA += s·dYBᵀ·drop(X) (lora_da_k) and
/// dB += s·dYᵀ·XA (lora_db_k).
#[allow(clippy::too_many_arguments)]
fn lora_grads_fused(
    cu: &Cuda,
    dy: &CudaBuf,
    x: &CudaBuf,
    l: &LoraGradRef<'_, Cuda>,
    dyb: &CudaBuf,
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    let r = l.r;
    // B [N, R]: element (j, n) at b[n·R + j].
    cu.lora_proj(dy, None, l.b, 1, r, dyb, m, n, r)?;
    if m == 0 {
        return Ok(());
    }
    let (ri, ki, ni) = (
        to_i32("lora_bwd", "r", r)?,
        to_i32("lora_bwd", "k", k)?,
        to_i32("lora_bwd", "n", n)?,
    );
    let (mask_arg, has) = (l.mask, l.mask.is_some() as i32);
    let da: &CudaBuf = l.da;
    let db: &CudaBuf = l.db;
    cu.lora_da_k(
        launch::lora_cols(k, r)?,
        dyb,
        x,
        mask_arg,
        has,
        da,
        n64(m),
        ki,
        ri,
        l.scale,
    )?;
    cu.lora_db_k(
        launch::lora_cols(n, r)?,
        dy,
        l.xa,
        db,
        n64(m),
        ni,
        ri,
        l.scale,
    )
}

fn weight_dims<'a>(w: &Weight<'a, Cuda>) -> WeightDims<'a> {
    match w {
        Weight::Dense(b) => WeightDims::Dense(b.len),
        Weight::Nf4(q) => WeightDims::Nf4(q.dims()),
    }
}

fn lora_dims(l: &LoraRef<'_, Cuda>) -> LoraDims {
    LoraDims {
        a: l.a.len,
        b: l.b.len,
        r: l.r,
        scale: l.scale,
        mask: l.mask.map(CudaBuf::len),
    }
}

fn lora_grad_dims(l: &LoraGradRef<'_, Cuda>) -> LoraDims {
    lora_dims(&LoraRef {
        a: l.a,
        b: l.b,
        r: l.r,
        scale: l.scale,
        mask: l.mask,
    })
}
