//! The LoRA linear Y = X·W̃ᵀ + s·(drop(X)·Aᵀ)·Bᵀ and its backward: cuBLAS (or gemm.cu) for a dense
//! base, nf4.rs for an NF4 base, kernels/lora.cu for the small-rank halves. CPU twin: cpu/lora.rs.

use super::gemm::op;
use super::{n64, Cuda, CudaBuf, Dtype};
use crate::backend::{Accum, LoraGradRef, LoraRef, Weight};
use crate::contract::{self, LoraDims, LoraGradDims, WeightDims};
use crate::error::Result;
use crate::launch::{self, to_i32};

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
    // xa = drop(X)·Aᵀ first (the fused NF4 kernels consume it).
    let mut xa_tmp = None;
    let lora_parts = match &lora {
        Some(l) => {
            let xa_buf: &CudaBuf = match xa {
                Some(b) => b,
                None => xa_tmp.insert(cu.zeros_as(m * l.r, Dtype::F32)?),
            };
            cu.lora_proj(x, l.mask, l.a, k, 1, xa_buf, m, k, l.r)?;
            Some((xa_buf, l.b, l.r, l.scale))
        }
        None => None,
    };
    match w {
        Weight::Dense(wb) => {
            cu.gemm(op(x, 0, false), op(wb, 0, true), y, 0, m, n, k, 1.0, 0.0)?;
            if let Some((xa, b, r, s)) = lora_parts {
                // Dense base: a second pass over Y (cuBLAS owns the base GEMM's epilogue).
                cu.lora_add_k(
                    launch::elementwise(m * n),
                    y,
                    xa,
                    b,
                    n64(m),
                    to_i32("lora_fwd", "n", n)?,
                    to_i32("lora_fwd", "r", r)?,
                    s,
                )?;
            }
            Ok(())
        }
        Weight::Nf4(q) => {
            if m == 0 || n == 0 {
                return Ok(());
            }
            cu.nf4_forward(x, q, y, false, lora_parts, m, k, n)
        }
    }
}

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
    let mut dyb_tmp = None;
    let lora_parts = match lora {
        Some(l) => {
            let r = l.r;
            // dYB = dY·B [M, R] (B [N, R]: element (j, n) at b[n·R + j]).
            let dyb: &CudaBuf = dyb_tmp.insert(cu.zeros_as(m * r, Dtype::F32)?);
            cu.lora_proj(dy, None, l.b, 1, r, dyb, m, n, r)?;
            let (ri, ki, ni) = (
                to_i32("lora_bwd", "r", r)?,
                to_i32("lora_bwd", "k", k)?,
                to_i32("lora_bwd", "n", n)?,
            );
            let (mask_arg, has) = (l.mask, l.mask.is_some() as i32);
            // dA += s·dYBᵀ·drop(X);  dB += s·dYᵀ·XA.
            let da: &CudaBuf = l.da;
            let db: &CudaBuf = l.db;
            if m > 0 {
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
                )?;
            }
            Some((dyb, l.a, r, l.scale, l.mask))
        }
        None => None,
    };
    let add_lora_dx = |cuda: &Cuda,
                       (dyb, a, r, s, mask): (&CudaBuf, &CudaBuf, usize, f32, Option<&CudaBuf>)|
     -> Result<()> {
        let (mask_arg, has) = (mask, mask.is_some() as i32);
        cuda.lora_dx_k(
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
        )
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
                // Without dropout the LoRA term joins the NF4 GEMM as extra reduction steps.
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
