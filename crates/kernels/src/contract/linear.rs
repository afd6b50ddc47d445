//! The contracts of the linear ops: the dense GEMMs, NF4 weights and the LoRA linear (see the
//! parent module for the conventions).

use crate::error::{check_len, ensure, KernelError, Result};
use crate::nf4::{Absmax, Nf4Tensor, BLOCK, NESTED_BLOCK};

// ---- dense GEMMs --------------------------------------------------------------------------------

fn gemm_dims(m: usize, k: usize, n: usize) -> impl Fn() -> String {
    move || format!("[M={m}, K={k}, N={n}]")
}

fn prod(op: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| KernelError::Invalid {
        op,
        arg: "dims",
        msg: format!("{a}·{b} overflows usize"),
    })
}

/// X `[M,K]`, W `[N,K]`, Y `[M,N]`.
pub fn matmul_xwt(x: usize, w: usize, y: usize, m: usize, k: usize, n: usize) -> Result<()> {
    const OP: &str = "matmul_xwt";
    check_len(OP, "x", x, prod(OP, m, k)?, gemm_dims(m, k, n))?;
    check_len(OP, "w", w, prod(OP, n, k)?, gemm_dims(m, k, n))?;
    check_len(OP, "y", y, prod(OP, m, n)?, gemm_dims(m, k, n))
}

/// dY `[M,N]`, W `[N,K]`, dX `[M,K]`.
pub fn matmul_dyw(dy: usize, w: usize, dx: usize, m: usize, k: usize, n: usize) -> Result<()> {
    const OP: &str = "matmul_dyw";
    check_len(OP, "dy", dy, prod(OP, m, n)?, gemm_dims(m, k, n))?;
    check_len(OP, "w", w, prod(OP, n, k)?, gemm_dims(m, k, n))?;
    check_len(OP, "dx", dx, prod(OP, m, k)?, gemm_dims(m, k, n))
}

/// dY `[M,N]`, X `[M,K]`, dW `[N,K]`.
pub fn matmul_dytx(dy: usize, x: usize, dw: usize, m: usize, k: usize, n: usize) -> Result<()> {
    const OP: &str = "matmul_dytx";
    check_len(OP, "dy", dy, prod(OP, m, n)?, gemm_dims(m, k, n))?;
    check_len(OP, "x", x, prod(OP, m, k)?, gemm_dims(m, k, n))?;
    check_len(OP, "dw", dw, prod(OP, n, k)?, gemm_dims(m, k, n))
}

// ---- NF4 and the LoRA linear --------------------------------------------------------------------

/// The lengths of an NF4 weight's arrays (what its checks need), on any backend.
#[derive(Clone, Copy, Debug)]
pub struct Nf4Dims<'a> {
    pub shape: &'a [usize],
    pub packed: usize,
    pub absmax: AbsmaxDims,
}

/// Plain: f32 absmax per block. Nested: a u8 code per block and an f32 per 256 blocks.
#[derive(Clone, Copy, Debug)]
pub enum AbsmaxDims {
    Plain(usize),
    Nested { codes: usize, nested: usize },
}

impl<'a> Nf4Dims<'a> {
    pub fn of(w: &'a Nf4Tensor) -> Self {
        Nf4Dims {
            shape: &w.shape,
            packed: w.packed.len(),
            absmax: match &w.absmax {
                Absmax::Plain(a) => AbsmaxDims::Plain(a.len()),
                Absmax::Nested {
                    codes,
                    nested_absmax,
                    ..
                } => AbsmaxDims::Nested {
                    codes: codes.len(),
                    nested: nested_absmax.len(),
                },
            },
        }
    }

    fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |a, &x| a.checked_mul(x))
    }
}

/// A consistent NF4 weight of N·K elements (shape `[N, K]` when 2-D).
pub fn nf4_weight(op: &'static str, w: &Nf4Dims<'_>, n: usize, k: usize) -> Result<()> {
    let numel = w.numel();
    ensure(
        op,
        "w",
        numel.is_some() && numel == n.checked_mul(k),
        || {
            format!(
                "NF4 weight of shape {:?} does not hold [N={n}, K={k}]",
                w.shape
            )
        },
    )?;
    ensure(op, "w", w.shape.len() != 2 || w.shape == [n, k], || {
        format!("NF4 weight of shape {:?} is not [N={n}, K={k}]", w.shape)
    })?;
    nf4_layout(op, w, n * k)
}

/// The packed and absmax lengths of an NF4 weight of `numel` elements.
pub fn nf4_layout(op: &'static str, w: &Nf4Dims<'_>, numel: usize) -> Result<()> {
    let nb = numel.div_ceil(BLOCK);
    check_len(op, "w.packed", w.packed, numel.div_ceil(2), || {
        format!("{:?}", w.shape)
    })?;
    match w.absmax {
        AbsmaxDims::Plain(a) => check_len(op, "w.absmax", a, nb, || format!("[blocks={nb}]")),
        AbsmaxDims::Nested { codes, nested } => {
            check_len(op, "w.absmax_code", codes, nb, || format!("[blocks={nb}]"))?;
            let nn = nb.div_ceil(NESTED_BLOCK);
            check_len(op, "w.nested_absmax", nested, nn, || {
                format!("[nested blocks={nn}]")
            })
        }
    }
}

/// Returns the element count.
pub fn nf4_dequantize(w: &Nf4Dims<'_>, out: usize) -> Result<usize> {
    const OP: &str = "nf4_dequantize";
    let numel = w.numel().ok_or_else(|| KernelError::Invalid {
        op: OP,
        arg: "w",
        msg: format!("shape {:?} overflows", w.shape),
    })?;
    nf4_layout(OP, w, numel)?;
    check_len(OP, "out", out, numel, || format!("{:?}", w.shape))?;
    Ok(numel)
}

/// The frozen base weight of a LoRA linear.
#[derive(Clone, Copy, Debug)]
pub enum WeightDims<'a> {
    Dense(usize),
    Nf4(Nf4Dims<'a>),
}

/// The LoRA factors' lengths: a `[R,K]`, b `[N,R]`, mask `[M,K]`, and the rank and scale.
#[derive(Clone, Copy, Debug)]
pub struct LoraDims {
    pub a: usize,
    pub b: usize,
    pub r: usize,
    pub scale: f32,
    pub mask: Option<usize>,
}

/// The backward's extra LoRA buffers: xa `[M,R]`, da `[R,K]`, db `[N,R]`.
#[derive(Clone, Copy, Debug)]
pub struct LoraGradDims {
    pub xa: usize,
    pub da: usize,
    pub db: usize,
}

/// M·K, N·K, M·N and R·max(M, K, N) fit in usize.
pub fn lora_dims(op: &'static str, m: usize, k: usize, n: usize, r: usize) -> Result<()> {
    let ok = [
        m.checked_mul(k),
        n.checked_mul(k),
        m.checked_mul(n),
        r.checked_mul(k.max(n).max(m)),
    ]
    .iter()
    .all(Option::is_some);
    ensure(op, "dims", ok, || {
        format!("M={m}, K={k}, N={n}, R={r} overflow usize")
    })
}

/// The base weight W̃ `[N,K]`.
pub fn lora_weight(
    op: &'static str,
    w: &WeightDims<'_>,
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    match w {
        WeightDims::Dense(len) => check_len(op, "w", *len, n * k, gemm_dims(m, k, n)),
        WeightDims::Nf4(q) => nf4_weight(op, q, n, k),
    }
}

fn lora_factors(op: &'static str, l: &LoraDims, m: usize, k: usize, n: usize) -> Result<()> {
    ensure(op, "r", l.r > 0, || "LoRA rank R must be > 0".to_string())?;
    ensure(op, "scale", l.scale.is_finite(), || {
        format!("LoRA scale must be finite, got {}", l.scale)
    })?;
    let r = l.r;
    check_len(op, "a", l.a, r * k, || format!("[R={r}, K={k}]"))?;
    check_len(op, "b", l.b, n * r, || format!("[N={n}, R={r}]"))?;
    if let Some(mask) = l.mask {
        check_len(op, "mask", mask, m * k, gemm_dims(m, k, n))?;
    }
    Ok(())
}

/// x `[M,K]`, w, lora, y `[M,N]`, xa `[M,R]`.
#[allow(clippy::too_many_arguments)]
pub fn lora_fwd(
    x: usize,
    w: &WeightDims<'_>,
    lora: Option<&LoraDims>,
    y: usize,
    xa: Option<usize>,
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    const OP: &str = "lora_fwd";
    lora_dims(OP, m, k, n, lora.map_or(1, |l| l.r))?;
    if let Some(l) = lora {
        lora_factors(OP, l, m, k, n)?;
        if let Some(xa) = xa {
            check_len(OP, "xa", xa, m * l.r, || format!("[M={m}, R={}]", l.r))?;
        }
    }
    lora_weight(OP, w, m, k, n)?;
    check_len(OP, "x", x, m * k, gemm_dims(m, k, n))?;
    check_len(OP, "y", y, m * n, gemm_dims(m, k, n))
}

/// dy `[M,N]`, x `[M,K]`, w, lora (+ xa, da, db), dx `[M,K]`.
#[allow(clippy::too_many_arguments)]
pub fn lora_bwd(
    dy: usize,
    x: usize,
    w: &WeightDims<'_>,
    lora: Option<(&LoraDims, &LoraGradDims)>,
    dx: usize,
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    const OP: &str = "lora_bwd";
    lora_dims(OP, m, k, n, lora.map_or(1, |l| l.0.r))?;
    check_len(OP, "x", x, m * k, gemm_dims(m, k, n))?;
    if let Some((l, g)) = lora {
        lora_factors(OP, l, m, k, n)?;
        let r = l.r;
        check_len(OP, "xa", g.xa, m * r, || format!("[M={m}, R={r}]"))?;
        check_len(OP, "da", g.da, r * k, || format!("[R={r}, K={k}]"))?;
        check_len(OP, "db", g.db, n * r, || format!("[N={n}, R={r}]"))?;
    }
    lora_weight(OP, w, m, k, n)?;
    check_len(OP, "dy", dy, m * n, gemm_dims(m, k, n))?;
    check_len(OP, "dx", dx, m * k, gemm_dims(m, k, n))
}
