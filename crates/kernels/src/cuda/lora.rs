//! The LoRA linear Y = X·W̃ᵀ + s·(drop(X)·Aᵀ)·Bᵀ and its backward: cuBLAS (or gemm.cu) for a dense
//! base, nf4.rs for an NF4 base, kernels/lora.cu for the small-rank halves. CPU twin: cpu/lora.rs.

use super::gemm::op;
use super::{n64, Cuda, CudaBuf, Dtype};
use crate::backend::{Accum, LoraGradRef, LoraRef, Weight};
use crate::error::{check_len, ensure, Result};
use crate::launch::{self, to_i32};

impl Cuda {
    /// out[M,R] = (X ⊙ mask)·Wᵀ where W's element (j, k) is at w[j·sj + k·sk].
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
        let (mask_arg, has) = match mask {
            Some(mk) => (Some(mk), 1),
            None => (None, 0),
        };
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

    pub(super) fn dense_or_nf4_dims(
        &self,
        op: &'static str,
        w: &Weight<'_, Self>,
        n: usize,
        k: usize,
    ) -> Result<()> {
        match w {
            Weight::Dense(wb) => check_len(op, "w", wb.len, n * k, || format!("[N={n}, K={k}]")),
            Weight::Nf4(q) => self.check_nf4_shape(op, q, n, k),
        }
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
    check_len("lora_fwd", "x", x.len, m * k, || format!("[M={m}, K={k}]"))?;
    check_len("lora_fwd", "y", y.len, m * n, || format!("[M={m}, N={n}]"))?;
    cu.dense_or_nf4_dims("lora_fwd", &w, n, k)?;
    let y: &CudaBuf = y;
    // xa = drop(X)·Aᵀ first (the fused NF4 kernels consume it).
    let mut xa_tmp = None;
    let lora_parts = match &lora {
        Some(l) => {
            ensure("lora_fwd", "r", l.r > 0, || {
                "LoRA rank R must be > 0".into()
            })?;
            ensure("lora_fwd", "scale", l.scale.is_finite(), || {
                format!("LoRA scale must be finite, got {}", l.scale)
            })?;
            check_len("lora_fwd", "a", l.a.len, l.r * k, || {
                format!("[R={}, K={k}]", l.r)
            })?;
            check_len("lora_fwd", "b", l.b.len, n * l.r, || {
                format!("[N={n}, R={}]", l.r)
            })?;
            if let Some(mk) = l.mask {
                check_len("lora_fwd", "mask", mk.len, m * k, || {
                    format!("[M={m}, K={k}]")
                })?;
            }
            let xa_buf: &CudaBuf = match xa {
                Some(b) => {
                    check_len("lora_fwd", "xa", b.len, m * l.r, || {
                        format!("[M={m}, R={}]", l.r)
                    })?;
                    b
                }
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
    check_len("lora_bwd", "dy", dy.len, m * n, || {
        format!("[M={m}, N={n}]")
    })?;
    check_len("lora_bwd", "x", x.len, m * k, || format!("[M={m}, K={k}]"))?;
    check_len("lora_bwd", "dx", dx.len, m * k, || {
        format!("[M={m}, K={k}]")
    })?;
    cu.dense_or_nf4_dims("lora_bwd", &w, n, k)?;
    let dx: &CudaBuf = dx;
    let acc = dx_acc == Accum::Add;
    let mut dyb_tmp = None;
    let lora_parts = match lora {
        Some(l) => {
            ensure("lora_bwd", "r", l.r > 0, || {
                "LoRA rank R must be > 0".into()
            })?;
            ensure("lora_bwd", "scale", l.scale.is_finite(), || {
                format!("LoRA scale must be finite, got {}", l.scale)
            })?;
            let r = l.r;
            check_len("lora_bwd", "a", l.a.len, r * k, || {
                format!("[R={r}, K={k}]")
            })?;
            check_len("lora_bwd", "b", l.b.len, n * r, || {
                format!("[N={n}, R={r}]")
            })?;
            check_len("lora_bwd", "xa", l.xa.len, m * r, || {
                format!("[M={m}, R={r}]")
            })?;
            check_len("lora_bwd", "da", l.da.len, r * k, || {
                format!("[R={r}, K={k}]")
            })?;
            check_len("lora_bwd", "db", l.db.len, n * r, || {
                format!("[N={n}, R={r}]")
            })?;
            if let Some(mk) = l.mask {
                check_len("lora_bwd", "mask", mk.len, m * k, || {
                    format!("[M={m}, K={k}]")
                })?;
            }
            // dYB = dY·B [M, R] (B [N, R]: element (j, n) at b[n·R + j]).
            let dyb: &CudaBuf = dyb_tmp.insert(cu.zeros_as(m * r, Dtype::F32)?);
            cu.lora_proj(dy, None, l.b, 1, r, dyb, m, n, r)?;
            let (ri, ki, ni) = (
                to_i32("lora_bwd", "r", r)?,
                to_i32("lora_bwd", "k", k)?,
                to_i32("lora_bwd", "n", n)?,
            );
            let (mask_arg, has) = match l.mask {
                Some(mk) => (Some(mk), 1),
                None => (None, 0),
            };
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
        let (mask_arg, has) = match mask {
            Some(mk) => (Some(mk), 1),
            None => (None, 0),
        };
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
