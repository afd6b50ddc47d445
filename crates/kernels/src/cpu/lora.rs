//! LoRA linear over a dense or NF4 frozen base weight.
//!
//! Contract: x [M,K], W̃ [N,K] (dense f32 or NF4), a [R,K], b [N,R], s = α/R or α/√R, optional dropout
//! mask [M,K] (0 or 1/(1−p)); drop(X) = X⊙mask.
//! - `lora_fwd`: writes y [M,N] = X·W̃ᵀ + s·(drop(X)·Aᵀ)·Bᵀ and, when given, xa [M,R] = drop(X)·Aᵀ
//!   (saved for the backward; untouched when there is no LoRA).
//! - `lora_bwd`: dx (= or += per `dx_acc`) dY·W̃ + s·((dY·B)·A)⊙mask;
//!   da [R,K] += s·(dY·B)ᵀ·drop(X);  db [N,R] += s·dYᵀ·xa.  No gradient for the frozen W̃.
//!
//! NF4 tiling: the base GEMMs walk W̃ in tiles of `tile_rows` output rows. Each tile (rows n0..n0+tn,
//! i.e. flat elements [n0·K, (n0+tn)·K)) is dequantized into one reused [tile_rows, K] scratch and fed
//! to the GEMM: forward writes the column block Y[:, n0..n0+tn] = X·tileᵀ (strided destination), backward
//! adds dY[:, n0..n0+tn]·tile into dX. The dense W̃ never exists; the scratch is ~512 KiB by default
//! (sized to stay in L2 while the GEMM streams it).

use crate::backend::Accum;
use crate::contract::{self, LoraDims, LoraGradDims, Nf4Dims, WeightDims};
use crate::cpu::gemm::{gemm, MatMut, MatRef};
use crate::cpu::nf4::dequantize_range;
use crate::error::{check_len, ensure, Result};
use crate::nf4::Nf4Tensor;

/// The frozen base weight [N,K] as the CPU free functions take it.
#[derive(Clone, Copy, Debug)]
pub enum WeightRef<'a> {
    Dense(&'a [f32]),
    Nf4(&'a Nf4Tensor),
}

/// LoRA factors: a [R,K], b [N,R], scale s, optional dropout mask [M,K].
#[derive(Clone, Copy, Debug)]
pub struct LoraFactors<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub r: usize,
    pub scale: f32,
    pub mask: Option<&'a [f32]>,
}

/// Saved activation and gradient sinks of the LoRA backward.
#[derive(Debug)]
pub struct LoraGrads<'a> {
    /// xa = drop(X)·Aᵀ [M,R] from the forward.
    pub xa: &'a [f32],
    /// Adds into da [R,K].
    pub da: &'a mut [f32],
    /// Adds into db [N,R].
    pub db: &'a mut [f32],
}

/// Elements of one dequantized tile (128 Ki f32 = 512 KiB).
const TILE_ELEMS: usize = 1 << 17;

/// Default NF4 tile height for a layer of K inputs: ~TILE_ELEMS elements, between 16 and 256 rows.
pub fn default_tile_rows(k: usize) -> usize {
    (TILE_ELEMS / k.max(1)).clamp(16, 256)
}

fn dims(m: usize, k: usize, n: usize) -> impl Fn() -> String {
    move || format!("[M={m}, K={k}, N={n}]")
}

fn weight_dims<'a>(w: &WeightRef<'a>) -> WeightDims<'a> {
    match w {
        WeightRef::Dense(w) => WeightDims::Dense(w.len()),
        WeightRef::Nf4(w) => WeightDims::Nf4(Nf4Dims::of(w)),
    }
}

fn lora_dims(l: &LoraFactors<'_>) -> LoraDims {
    LoraDims {
        a: l.a.len(),
        b: l.b.len(),
        r: l.r,
        scale: l.scale,
        mask: l.mask.map(<[f32]>::len),
    }
}

/// Y [M,N] (= or +=) X [M,K]·W̃ᵀ, NF4 dequantized `tile_rows` rows at a time.
#[allow(clippy::too_many_arguments)]
pub fn base_fwd(
    x: &[f32],
    w: WeightRef<'_>,
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    acc: Accum,
    tile_rows: usize,
) -> Result<()> {
    const OP: &str = "lora_fwd";
    ensure(OP, "tile_rows", tile_rows > 0, || {
        "tile_rows must be > 0".to_string()
    })?;
    contract::lora_dims(OP, m, k, n, 1)?;
    contract::lora_weight(OP, &weight_dims(&w), m, k, n)?;
    check_len(OP, "x", x.len(), m * k, dims(m, k, n))?;
    check_len(OP, "y", y.len(), m * n, dims(m, k, n))?;
    match w {
        WeightRef::Dense(w) => gemm(
            OP,
            MatMut::new(y, m, n),
            MatRef::new(x, m, k),
            MatRef::new(w, n, k).t(),
            1.0,
            acc,
        ),
        WeightRef::Nf4(w) => {
            if m == 0 {
                return Ok(());
            }
            let tr = tile_rows.min(n.max(1));
            let mut tile = vec![0.0f32; tr * k];
            for n0 in (0..n).step_by(tr) {
                let tn = tr.min(n - n0);
                let t = &mut tile[..tn * k];
                dequantize_range(w, n0 * k, t)?;
                // Y[:, n0..n0+tn] (row stride N) = X [M,K] · tileᵀ [K,tn]
                gemm(
                    OP,
                    MatMut::with_row_stride(&mut y[n0..], m, tn, n),
                    MatRef::new(x, m, k),
                    MatRef::new(t, tn, k).t(),
                    1.0,
                    acc,
                )?;
            }
            Ok(())
        }
    }
}

/// dX [M,K] (= or +=) dY [M,N]·W̃, NF4 dequantized `tile_rows` rows at a time.
#[allow(clippy::too_many_arguments)]
pub fn base_bwd(
    dy: &[f32],
    w: WeightRef<'_>,
    dx: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    acc: Accum,
    tile_rows: usize,
) -> Result<()> {
    const OP: &str = "lora_bwd";
    ensure(OP, "tile_rows", tile_rows > 0, || {
        "tile_rows must be > 0".to_string()
    })?;
    contract::lora_dims(OP, m, k, n, 1)?;
    contract::lora_weight(OP, &weight_dims(&w), m, k, n)?;
    check_len(OP, "dy", dy.len(), m * n, dims(m, k, n))?;
    check_len(OP, "dx", dx.len(), m * k, dims(m, k, n))?;
    match w {
        WeightRef::Dense(w) => gemm(
            OP,
            MatMut::new(dx, m, k),
            MatRef::new(dy, m, n),
            MatRef::new(w, n, k),
            1.0,
            acc,
        ),
        WeightRef::Nf4(w) => {
            if m == 0 {
                return Ok(());
            }
            if n == 0 {
                if acc == Accum::Overwrite {
                    dx.fill(0.0);
                }
                return Ok(());
            }
            let tr = tile_rows.min(n);
            let mut tile = vec![0.0f32; tr * k];
            let mut acc = acc;
            for n0 in (0..n).step_by(tr) {
                let tn = tr.min(n - n0);
                let t = &mut tile[..tn * k];
                dequantize_range(w, n0 * k, t)?;
                // dX [M,K] (=/+=) dY[:, n0..n0+tn] [M,tn] (row stride N) · tile [tn,K]
                gemm(
                    OP,
                    MatMut::new(dx, m, k),
                    MatRef::with_row_stride(&dy[n0..], m, tn, n),
                    MatRef::new(t, tn, k),
                    1.0,
                    acc,
                )?;
                acc = Accum::Add;
            }
            Ok(())
        }
    }
}

/// drop(X) = X⊙mask as a new buffer, or None when there is no mask (use X itself).
fn dropped(x: &[f32], mask: Option<&[f32]>) -> Option<Vec<f32>> {
    mask.map(|mk| x.iter().zip(mk).map(|(&x, &mk)| x * mk).collect())
}

/// `lora_fwd_tiled` with `default_tile_rows(k)`.
#[allow(clippy::too_many_arguments)]
pub fn lora_fwd(
    x: &[f32],
    w: WeightRef<'_>,
    lora: Option<LoraFactors<'_>>,
    y: &mut [f32],
    xa: Option<&mut [f32]>,
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    lora_fwd_tiled(x, w, lora, y, xa, m, k, n, default_tile_rows(k))
}

/// Writes y [M,N] = X·W̃ᵀ + s·(drop(X)·Aᵀ)·Bᵀ and xa [M,R] (when given and LoRA is present).
#[allow(clippy::too_many_arguments)]
pub fn lora_fwd_tiled(
    x: &[f32],
    w: WeightRef<'_>,
    lora: Option<LoraFactors<'_>>,
    y: &mut [f32],
    xa: Option<&mut [f32]>,
    m: usize,
    k: usize,
    n: usize,
    tile_rows: usize,
) -> Result<()> {
    const OP: &str = "lora_fwd";
    contract::lora_fwd(
        x.len(),
        &weight_dims(&w),
        lora.as_ref().map(lora_dims).as_ref(),
        y.len(),
        xa.as_deref().map(<[f32]>::len),
        m,
        k,
        n,
    )?;
    base_fwd(x, w, y, m, k, n, Accum::Overwrite, tile_rows)?;
    let Some(l) = lora else { return Ok(()) };
    let r = l.r;
    let xd = dropped(x, l.mask);
    let xd: &[f32] = xd.as_deref().unwrap_or(x);
    let mut own = Vec::new();
    let xa: &mut [f32] = match xa {
        Some(xa) => xa,
        None => {
            own.resize(m * r, 0.0);
            &mut own
        }
    };
    // xa [M,R] = drop(X) [M,K] · Aᵀ [K,R]
    gemm(
        OP,
        MatMut::new(xa, m, r),
        MatRef::new(xd, m, k),
        MatRef::new(l.a, r, k).t(),
        1.0,
        Accum::Overwrite,
    )?;
    // Y [M,N] += s · xa [M,R] · Bᵀ [R,N]
    gemm(
        OP,
        MatMut::new(y, m, n),
        MatRef::new(xa, m, r),
        MatRef::new(l.b, n, r).t(),
        l.scale,
        Accum::Add,
    )
}

/// `lora_bwd_tiled` with `default_tile_rows(k)`.
#[allow(clippy::too_many_arguments)]
pub fn lora_bwd(
    dy: &[f32],
    x: &[f32],
    w: WeightRef<'_>,
    lora: Option<(LoraFactors<'_>, LoraGrads<'_>)>,
    dx: &mut [f32],
    dx_acc: Accum,
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    lora_bwd_tiled(dy, x, w, lora, dx, dx_acc, m, k, n, default_tile_rows(k))
}

/// dx (=/+=) dY·W̃ + s·((dY·B)·A)⊙mask; da += s·(dY·B)ᵀ·drop(X); db += s·dYᵀ·xa.
#[allow(clippy::too_many_arguments)]
pub fn lora_bwd_tiled(
    dy: &[f32],
    x: &[f32],
    w: WeightRef<'_>,
    lora: Option<(LoraFactors<'_>, LoraGrads<'_>)>,
    dx: &mut [f32],
    dx_acc: Accum,
    m: usize,
    k: usize,
    n: usize,
    tile_rows: usize,
) -> Result<()> {
    const OP: &str = "lora_bwd";
    let grads = lora.as_ref().map(|(l, g)| {
        let grad_dims = LoraGradDims {
            xa: g.xa.len(),
            da: g.da.len(),
            db: g.db.len(),
        };
        (lora_dims(l), grad_dims)
    });
    contract::lora_bwd(
        dy.len(),
        x.len(),
        &weight_dims(&w),
        grads.as_ref().map(|(l, g)| (l, g)),
        dx.len(),
        m,
        k,
        n,
    )?;
    base_bwd(dy, w, dx, m, k, n, dx_acc, tile_rows)?;
    let Some((l, g)) = lora else { return Ok(()) };
    let r = l.r;
    // dyb [M,R] = dY [M,N] · B [N,R]
    let mut dyb = vec![0.0f32; m * r];
    gemm(
        OP,
        MatMut::new(&mut dyb, m, r),
        MatRef::new(dy, m, n),
        MatRef::new(l.b, n, r),
        1.0,
        Accum::Overwrite,
    )?;
    match l.mask {
        None => {
            // dX += s · dyb [M,R] · A [R,K]
            gemm(
                OP,
                MatMut::new(dx, m, k),
                MatRef::new(&dyb, m, r),
                MatRef::new(l.a, r, k),
                l.scale,
                Accum::Add,
            )?;
        }
        Some(mask) => {
            let mut t = vec![0.0f32; m * k];
            gemm(
                OP,
                MatMut::new(&mut t, m, k),
                MatRef::new(&dyb, m, r),
                MatRef::new(l.a, r, k),
                1.0,
                Accum::Overwrite,
            )?;
            for ((d, &t), &mk) in dx.iter_mut().zip(&t).zip(mask) {
                *d += l.scale * t * mk;
            }
        }
    }
    let xd = dropped(x, l.mask);
    let xd: &[f32] = xd.as_deref().unwrap_or(x);
    // da [R,K] += s · dybᵀ [R,M] · drop(X) [M,K]
    gemm(
        OP,
        MatMut::new(g.da, r, k),
        MatRef::new(&dyb, m, r).t(),
        MatRef::new(xd, m, k),
        l.scale,
        Accum::Add,
    )?;
    // db [N,R] += s · dYᵀ [N,M] · xa [M,R]
    gemm(
        OP,
        MatMut::new(g.db, n, r),
        MatRef::new(dy, m, n).t(),
        MatRef::new(g.xa, m, r),
        l.scale,
        Accum::Add,
    )
}
