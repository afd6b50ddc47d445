//! One linear layer of the decoder: y = x·Wᵀ (dense or NF4 base) + s·(drop(x)·Aᵀ)·Bᵀ (LoRA), forward
//! and backward, with the LoRA dropout mask drawn on the backend.

use afinar_kernels::profile::{self, Role};
use afinar_kernels::{Accum, Backend, LoraGradRef, LoraRef, Storage};

use super::Ctx;
use crate::error::{GemmaError, Result};
use crate::grads::Grads;
use crate::lora::{dropout_seed_at, dropout_stream, Target};
use crate::params::{Linear, LinearBase, ParamId};

/// What one linear's forward saved: the LoRA activation xa = drop(x)·Aᵀ [N,R] and the dropout mask
/// [N,in] (None without an adapter, outside training, or, for the mask, without dropout). A forward
/// reuses the buffers an earlier forward of the same shape left here.
pub(crate) struct LinSaved<B: Backend> {
    xa: Option<B::Buf>,
    mask: Option<B::Buf>,
}

// By hand: a derive would ask for `B: Default`.
impl<B: Backend> Default for LinSaved<B> {
    fn default() -> Self {
        Self {
            xa: None,
            mask: None,
        }
    }
}

/// `slot`'s buffer when it has `len` elements, else a fresh one of `len` (f32 master storage) put in
/// `slot`. The caller overwrites it.
fn reuse<'s, B: Backend>(
    be: &B,
    slot: &'s mut Option<B::Buf>,
    len: usize,
) -> Result<&'s mut B::Buf> {
    if slot.as_ref().is_some_and(|b| be.len(b) != len) {
        *slot = None;
    }
    match slot {
        Some(buf) => Ok(buf),
        None => Ok(slot.insert(be.zeros_for(len, Storage::Master)?)),
    }
}

/// The profiler's label of a linear (`afinar_kernels::profile`).
fn role(t: Target) -> Role {
    match t {
        Target::QProj => Role::QProj,
        Target::KProj => Role::KProj,
        Target::VProj => Role::VProj,
        Target::OProj => Role::OProj,
        Target::GateProj => Role::GateProj,
        Target::UpProj => Role::UpProj,
        Target::DownProj => Role::DownProj,
    }
}

/// y [N,out] = x [N,in]·Wᵀ (+ LoRA). Fills `saved` with what the backward needs (nothing outside
/// training).
pub(super) fn linear_fwd<B: Backend>(
    ctx: &Ctx<'_, B>,
    lin: &Linear<B>,
    layer: usize,
    x: &B::Buf,
    y: &mut B::Buf,
    saved: &mut LinSaved<B>,
) -> Result<()> {
    let _label = profile::layer_role(layer, role(lin.target));
    let be = ctx.backend;
    let m = ctx.n();
    let lora = lin.lora.as_ref().filter(|_| ctx.train);
    let Some(lo) = lora else {
        // No adapter, or outside training: the adapter (if any) runs without dropout and xa is not
        // kept (the op computes it in an f32 scratch buffer, the same numbers as a kept one).
        let lref = lin.lora.as_ref().map(|lo| LoraRef {
            a: &lo.a,
            b: &lo.b,
            r: lo.r,
            scale: lo.scale,
            mask: None,
        });
        be.lora_fwd(
            x,
            lin.weight(),
            lref,
            y,
            None,
            m,
            lin.in_features,
            lin.out_features,
        )?;
        saved.xa = None;
        saved.mask = None;
        return Ok(());
    };
    // The mask holds 0 or 1/(1−p), which bf16 cannot represent (p = 0.1: 1.111… → 1.109): f32. The
    // adapter path runs in f32 as in peft (x is cast to the adapter's dtype), so xa is f32 too.
    // Generated on the backend from (seed, layer, target) by a counter-based hash: no host draw and no
    // upload per forward (`lora::dropout_mask` is the same mask on the host). It overwrites the whole
    // buffer, so a reused one gives the same bits.
    let LinSaved { xa, mask } = saved;
    if lo.dropout > 0.0 {
        let mk = reuse(be, mask, m * lin.in_features)?;
        // A slice of a larger batch (data parallelism) takes its rows of the whole batch's mask: the
        // element offset of row `dropout_row_offset` in the [B·T, K] input.
        let stream = dropout_stream(layer, lin.target);
        let offset = (ctx.dropout_row_offset as u64)
            .wrapping_mul(ctx.t as u64)
            .wrapping_mul(lin.in_features as u64);
        be.dropout_mask(
            mk,
            lo.dropout,
            dropout_seed_at(ctx.dropout_seed, stream, offset),
            stream,
        )?;
    } else {
        *mask = None;
    }
    let xa = reuse(be, xa, m * lo.r)?;
    let lref = LoraRef {
        a: &lo.a,
        b: &lo.b,
        r: lo.r,
        scale: lo.scale,
        mask: mask.as_ref(),
    };
    // Writes y and xa (whatever a reused xa held).
    be.lora_fwd(
        x,
        lin.weight(),
        Some(lref),
        y,
        Some(xa),
        m,
        lin.in_features,
        lin.out_features,
    )?;
    Ok(())
}

/// Two distinct gradient buffers at once (LoRA A and B).
fn two_mut<B: Backend>(
    grads: &mut Grads<B>,
    a: ParamId,
    b: ParamId,
) -> Result<(&mut B::Buf, &mut B::Buf)> {
    let missing = |id: ParamId| {
        GemmaError::Invalid(format!(
            "gradients have no slot for `{}` (made for another model?)",
            id.name()
        ))
    };
    let ia = grads.position(a).ok_or_else(|| missing(a))?;
    let ib = grads.position(b).ok_or_else(|| missing(b))?;
    let bufs = grads.bufs_mut();
    if ia < ib {
        let (lo, hi) = bufs.split_at_mut(ib);
        Ok((&mut lo[ia], &mut hi[0]))
    } else if ib < ia {
        let (lo, hi) = bufs.split_at_mut(ia);
        Ok((&mut hi[0], &mut lo[ib]))
    } else {
        Err(GemmaError::Invalid(format!(
            "`{}` and `{}` share a gradient slot",
            a.name(),
            b.name()
        )))
    }
}

/// Backward of `linear_fwd`: dx (= or +=) ∂/∂x; LoRA dA, dB and (full fine-tuning) dW accumulate into `grads`.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_bwd<B: Backend>(
    ctx: &Ctx<'_, B>,
    lin: &Linear<B>,
    layer: usize,
    saved: &LinSaved<B>,
    x: &B::Buf,
    dy: &B::Buf,
    dx: &mut B::Buf,
    dx_acc: Accum,
    grads: &mut Grads<B>,
    full: bool,
) -> Result<()> {
    let _label = profile::layer_role(layer, role(lin.target));
    let be = ctx.backend;
    let (m, k, n) = (ctx.n(), lin.in_features, lin.out_features);
    let target = lin.target;
    match (&lin.lora, &saved.xa) {
        (Some(lo), Some(xa)) => {
            let (da, db) = two_mut(
                grads,
                ParamId::LoraA { layer, target },
                ParamId::LoraB { layer, target },
            )?;
            let g = LoraGradRef {
                a: &lo.a,
                b: &lo.b,
                r: lo.r,
                scale: lo.scale,
                mask: saved.mask.as_ref(),
                xa,
                da,
                db,
            };
            be.lora_bwd(dy, x, lin.weight(), Some(g), dx, dx_acc, m, k, n)?;
        }
        (None, _) => be.lora_bwd(dy, x, lin.weight(), None, dx, dx_acc, m, k, n)?,
        (Some(_), None) => {
            return Err(GemmaError::Invalid(format!(
                "{}: LoRA activation was not saved by the forward",
                target.module_path(layer)
            )))
        }
    }
    if full {
        if let LinearBase::Dense(_) = lin.base {
            let id = ParamId::Weight { layer, target };
            let dw = grads.get_mut(id).ok_or_else(|| {
                GemmaError::Invalid(format!("gradients have no slot for `{}`", id.name()))
            })?;
            be.matmul_dytx(dy, x, dw, m, k, n, Accum::Add)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Gemma2Config;
    use crate::lora::{dropout_mask, Target};
    use crate::params::LoraWeights;
    use afinar_kernels::{Cpu, Tolerance};

    /// The training forward of a LoRA linear applies exactly `lora::dropout_mask(seed, layer, target)`
    /// (generated on the backend, never uploaded): y = x·Wᵀ + s·((x ⊙ mask)·Aᵀ)·Bᵀ against an f64
    /// loop, the saved mask bit-identical to the host one, and another layer index gives another mask.
    #[test]
    fn training_forward_uses_the_seeded_backend_mask() {
        let (m, k, n, r, p, seed) = (5usize, 7usize, 4usize, 2usize, 0.4, 77u64);
        let val =
            |i: usize, mul: usize, md: usize| ((i * mul % md) as f32 - (md / 2) as f32) * 0.05;
        let x: Vec<f32> = (0..m * k).map(|i| val(i, 7, 13)).collect();
        let w: Vec<f32> = (0..n * k).map(|i| val(i, 5, 11)).collect();
        let a: Vec<f32> = (0..r * k).map(|i| val(i, 3, 9)).collect();
        let b: Vec<f32> = (0..n * r).map(|i| val(i, 11, 7)).collect();
        let scale = 1.5f32;
        let lin = Linear::<Cpu> {
            target: Target::UpProj,
            out_features: n,
            in_features: k,
            base: LinearBase::Dense(w.clone()),
            lora: Some(LoraWeights {
                a: a.clone(),
                b: b.clone(),
                r,
                scale,
                dropout: p,
            }),
        };
        let cfg = Gemma2Config::tiny(16, 8, 8, 3, 1, 1, 8, 4).unwrap();
        let pos: Vec<i32> = (0..m as i32).collect();
        let ctx = Ctx {
            backend: &Cpu,
            cfg: &cfg,
            b: 1,
            t: m,
            pos: &pos,
            seg: None,
            train: true,
            dropout_seed: seed,
            dropout_row_offset: 0,
        };
        let run = |layer: usize| {
            let mut y = vec![f32::NAN; m * n];
            let mut saved = LinSaved::default();
            linear_fwd(&ctx, &lin, layer, &x, &mut y, &mut saved).unwrap();
            (y, saved.mask.expect("dropout on: a mask is saved"))
        };
        let (y, mask) = run(2);
        let want_mask = dropout_mask(seed, 2, Target::UpProj, p, m * k).unwrap();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&mask), bits(&want_mask));
        assert!(want_mask.contains(&0.0) && want_mask.iter().any(|&v| v > 1.0));
        let mut want = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let base: f64 = (0..k)
                    .map(|q| f64::from(x[i * k + q]) * f64::from(w[j * k + q]))
                    .sum();
                let lora: f64 = (0..r)
                    .map(|t| {
                        let xa: f64 = (0..k)
                            .map(|q| {
                                f64::from(x[i * k + q] * want_mask[i * k + q])
                                    * f64::from(a[t * k + q])
                            })
                            .sum();
                        xa * f64::from(b[j * r + t])
                    })
                    .sum();
                want[i * n + j] = base + f64::from(scale) * lora;
            }
        }
        Tolerance::F32.assert_close("y", y.iter().copied(), want.iter().copied());
        // Another layer (same seed, same target) draws another mask.
        let (_, mask3) = run(3);
        assert_ne!(bits(&mask3), bits(&mask));
    }
}
