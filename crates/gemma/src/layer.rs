//! One Gemma-2 decoder layer: the forward that training, evaluation and KV-cache decoding all run, and
//! the hand-written backward.
//!
//! Shapes (N = B·T rows, H hidden, QD = NH·D, KD = NKV·D, I intermediate, R LoRA rank):
//! ```text
//!   x [N,H] ─ rmsnorm(in) → xn1 [N,H] ─┬ q_proj → q [N,QD] ─ rope ┐
//!                                      ├ k_proj → k [N,KD] ─ rope ├ attn → ao [N,QD] ─ o_proj → o [N,H]
//!                                      └ v_proj → v [N,KD] ───────┘
//!   h1 = x + rmsnorm(post_attn)(o)                                                       h1 [N,H]
//!   xn2 = rmsnorm(pre_ff)(h1) ─ gate_proj → g [N,I], up_proj → u [N,I]; a = gelu_tanh(g)·u [N,I]
//!   d = down_proj(a) [N,H];  out = h1 + rmsnorm(post_ff)(d)
//! ```
//! Attention reads the keys and values named by [`Kv`]: the chunk's own k, v (training, evaluation; TK = T)
//! or a layer's KV cache extended by them (decoding; TK = cached rows + T, the queries are the last T
//! keys, see `crate::kv_cache`). Everything else is the same code for the three uses, so decoding gives
//! the numbers of a full recompute. In training mode (`Ctx::train`) the forward also draws the LoRA
//! dropout masks and keeps each LoRA linear's xa for the backward.
//!
//! The backward runs the same graph in reverse. Residual gradients are summed with `axpy`; LoRA gradients
//! (and, in full fine-tuning, norm and dense-weight gradients) ACCUMULATE into `Grads`.
//!
//! Storage (see `afinar_kernels::Storage`): activations and their gradients are `zeros` (the
//! backend's activation dtype, bf16 on a bf16 GPU run); the per-row statistics the backward divides by
//! or exponentiates (RMSNorm rstd, attention lse), the LoRA dropout mask and the saved xa are f32
//! (`Storage::Master`).

use afinar_kernels::{Accum, AttnShape, Backend, LoraGradRef, LoraRef, Storage};

use crate::config::Gemma2Config;
use crate::error::{GemmaError, Result};
use crate::grads::Grads;
use crate::kv_cache::LayerCache;
use crate::lora::{dropout_stream, Target};
use crate::params::{Layer, Linear, LinearBase, NormKind, ParamId};

/// Per-call context shared by all layers of one pass.
pub(crate) struct Ctx<'a, B: Backend> {
    pub backend: &'a B,
    pub cfg: &'a Gemma2Config,
    /// Rows B and T (N = B·T).
    pub b: usize,
    pub t: usize,
    /// RoPE positions [N].
    pub pos: &'a B::Ids,
    /// Packed-sample ids [N] (None = one sample per row).
    pub seg: Option<&'a B::Ids>,
    /// Training: LoRA dropout on (masks from `dropout_seed`) and each LoRA linear keeps xa for the
    /// backward. Off (evaluation, decoding): no dropout, nothing kept for a backward.
    pub train: bool,
    pub dropout_seed: u64,
}

impl<B: Backend> Ctx<'_, B> {
    fn n(&self) -> usize {
        self.b * self.t
    }

    /// Attention over TK keys (TK = T for the chunk's own keys, cached rows + T when decoding).
    fn attn_shape(&self, layer: usize, tk: usize) -> AttnShape {
        AttnShape {
            b: self.b,
            t: self.t,
            tk,
            nh: self.cfg.num_attention_heads,
            nkv: self.cfg.num_key_value_heads,
            d: self.cfg.head_dim,
            scale: self.cfg.attn_scale(),
            softcap: self.cfg.attn_logit_softcapping.map(|c| c as f32),
            window: self.cfg.window(layer),
        }
    }

    fn eps(&self) -> f32 {
        self.cfg.rms_norm_eps as f32
    }
}

/// Where attention takes its keys and values from.
pub(crate) enum Kv<'c, B: Backend> {
    /// The chunk's own keys and values (training, evaluation): TK = T.
    Chunk,
    /// A layer's KV cache (decoding, B = 1, no packing): the forward extends it by the chunk's keys and
    /// values and attends to all of them, TK = cached rows + T.
    Cache(&'c mut LayerCache<B>),
}

/// What one linear's forward saved: the LoRA activation xa = drop(x)·Aᵀ [N,R] and the dropout mask [N,in].
#[derive(Default)]
pub(crate) struct LinSaved<B: Backend> {
    xa: Option<B::Buf>,
    mask: Option<B::Buf>,
}

/// Everything the layer backward reads (the layer input x is kept by the caller).
pub(crate) struct LayerActs<B: Backend> {
    xn1: B::Buf,
    rstd1: B::Buf,
    /// q and k after RoPE (what attention saw).
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    ao: B::Buf,
    lse: B::Buf,
    o: B::Buf,
    rstd2: B::Buf,
    h1: B::Buf,
    xn2: B::Buf,
    rstd3: B::Buf,
    gate: B::Buf,
    up: B::Buf,
    act: B::Buf,
    d: B::Buf,
    rstd4: B::Buf,
    lin: [LinSaved<B>; 7],
}

/// y [N,out] = x [N,in]·Wᵀ (+ LoRA). Returns what the backward needs (nothing outside training).
fn linear_fwd<B: Backend>(
    ctx: &Ctx<'_, B>,
    lin: &Linear<B>,
    layer: usize,
    x: &B::Buf,
    y: &mut B::Buf,
) -> Result<LinSaved<B>> {
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
        return Ok(LinSaved {
            xa: None,
            mask: None,
        });
    };
    // The mask holds 0 or 1/(1−p), which bf16 cannot represent (p = 0.1: 1.111… → 1.109): f32. The
    // adapter path runs in f32 as in peft (x is cast to the adapter's dtype), so xa is f32 too.
    // Generated on the backend from (seed, layer, target) by a counter-based hash: no host draw and no
    // upload per forward (`lora::dropout_mask` is the same mask on the host).
    let mask = if lo.dropout > 0.0 {
        let mut mk = be.zeros_for(m * lin.in_features, Storage::Master)?;
        be.dropout_mask(
            &mut mk,
            lo.dropout,
            ctx.dropout_seed,
            dropout_stream(layer, lin.target),
        )?;
        Some(mk)
    } else {
        None
    };
    let mut xa = be.zeros_for(m * lo.r, Storage::Master)?;
    let lref = LoraRef {
        a: &lo.a,
        b: &lo.b,
        r: lo.r,
        scale: lo.scale,
        mask: mask.as_ref(),
    };
    be.lora_fwd(
        x,
        lin.weight(),
        Some(lref),
        y,
        Some(&mut xa),
        m,
        lin.in_features,
        lin.out_features,
    )?;
    Ok(LinSaved { xa: Some(xa), mask })
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
fn linear_bwd<B: Backend>(
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

/// Forward of layer `li` on x [N,H], attending to the keys and values `kv` names; writes out [N,H] and
/// returns the activations the backward reads (callers outside training drop them).
pub(crate) fn layer_fwd<B: Backend>(
    ctx: &Ctx<'_, B>,
    layer: &Layer<B>,
    li: usize,
    x: &B::Buf,
    kv: Kv<'_, B>,
    out: &mut B::Buf,
) -> Result<LayerActs<B>> {
    let be = ctx.backend;
    let cfg = ctx.cfg;
    let n = ctx.n();
    let (h, qd, kd, i) = (
        cfg.hidden_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.intermediate_size,
    );
    let eps = ctx.eps();
    let theta = cfg.rope_theta as f32;
    let lin = |t: Target| layer.linear(t);

    // Attention block.
    let mut xn1 = be.zeros(n * h)?;
    let mut rstd1 = be.zeros_for(n, Storage::Master)?;
    be.rmsnorm_fwd(
        x,
        layer.norm(NormKind::Input),
        &mut xn1,
        &mut rstd1,
        n,
        h,
        eps,
    )?;
    let mut q = be.zeros(n * qd)?;
    let mut k = be.zeros(n * kd)?;
    let mut v = be.zeros(n * kd)?;
    let sq = linear_fwd(ctx, lin(Target::QProj), li, &xn1, &mut q)?;
    let sk = linear_fwd(ctx, lin(Target::KProj), li, &xn1, &mut k)?;
    let sv = linear_fwd(ctx, lin(Target::VProj), li, &xn1, &mut v)?;
    be.rope(
        &mut q,
        ctx.pos,
        n,
        cfg.num_attention_heads,
        cfg.head_dim,
        theta,
        false,
    )?;
    be.rope(
        &mut k,
        ctx.pos,
        n,
        cfg.num_key_value_heads,
        cfg.head_dim,
        theta,
        false,
    )?;
    let (kk, vv, tk) = match kv {
        Kv::Chunk => (&k, &v, ctx.t),
        Kv::Cache(c) => {
            if ctx.b != 1 || ctx.seg.is_some() {
                return Err(GemmaError::Invalid(
                    "internal: a KV cache holds one unpacked sequence (B = 1, no segments)".into(),
                ));
            }
            c.extend(be, &k, &v, n, kd)?
        }
    };
    let mut ao = be.zeros(n * qd)?;
    let mut lse = be.zeros_for(ctx.b * cfg.num_attention_heads * ctx.t, Storage::Master)?;
    be.attn_fwd(
        &q,
        kk,
        vv,
        ctx.seg,
        &mut ao,
        &mut lse,
        &ctx.attn_shape(li, tk),
    )?;
    let mut o = be.zeros(n * h)?;
    let so = linear_fwd(ctx, lin(Target::OProj), li, &ao, &mut o)?;
    // h1 = x + post_attention_layernorm(o); `on` is reused as the buffer for h1.
    let mut h1 = be.zeros(n * h)?;
    let mut rstd2 = be.zeros_for(n, Storage::Master)?;
    be.rmsnorm_fwd(
        &o,
        layer.norm(NormKind::PostAttention),
        &mut h1,
        &mut rstd2,
        n,
        h,
        eps,
    )?;
    be.axpy(1.0, x, &mut h1)?;

    // MLP block.
    let mut xn2 = be.zeros(n * h)?;
    let mut rstd3 = be.zeros_for(n, Storage::Master)?;
    be.rmsnorm_fwd(
        &h1,
        layer.norm(NormKind::PreFeedforward),
        &mut xn2,
        &mut rstd3,
        n,
        h,
        eps,
    )?;
    let mut gate = be.zeros(n * i)?;
    let mut up = be.zeros(n * i)?;
    let sg = linear_fwd(ctx, lin(Target::GateProj), li, &xn2, &mut gate)?;
    let su = linear_fwd(ctx, lin(Target::UpProj), li, &xn2, &mut up)?;
    let mut act = be.zeros(n * i)?;
    be.geglu_fwd(&gate, &up, &mut act)?;
    let mut d = be.zeros(n * h)?;
    let sd = linear_fwd(ctx, lin(Target::DownProj), li, &act, &mut d)?;
    let mut rstd4 = be.zeros_for(n, Storage::Master)?;
    be.rmsnorm_fwd(
        &d,
        layer.norm(NormKind::PostFeedforward),
        out,
        &mut rstd4,
        n,
        h,
        eps,
    )?;
    be.axpy(1.0, &h1, out)?;

    Ok(LayerActs {
        xn1,
        rstd1,
        q,
        k,
        v,
        ao,
        lse,
        o,
        rstd2,
        h1,
        xn2,
        rstd3,
        gate,
        up,
        act,
        d,
        rstd4,
        lin: [sq, sk, sv, so, sg, su, sd],
    })
}

/// Gradient sink of one norm: Some(buffer) in full fine-tuning, None for a frozen norm.
fn norm_grad<B: Backend>(
    grads: &mut Grads<B>,
    id: ParamId,
    full: bool,
) -> Result<Option<&mut B::Buf>> {
    if !full {
        return Ok(None);
    }
    grads
        .get_mut(id)
        .map(Some)
        .ok_or_else(|| GemmaError::Invalid(format!("gradients have no slot for `{}`", id.name())))
}

/// Backward of layer `li`: given dout = ∂L/∂out [N,H], writes dx = ∂L/∂x [N,H] and accumulates parameter
/// gradients. `x` is the layer input and `a` what `layer_fwd` saved for it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_bwd<B: Backend>(
    ctx: &Ctx<'_, B>,
    layer: &Layer<B>,
    li: usize,
    x: &B::Buf,
    a: &LayerActs<B>,
    dout: &B::Buf,
    dx: &mut B::Buf,
    grads: &mut Grads<B>,
    full: bool,
) -> Result<()> {
    let be = ctx.backend;
    let cfg = ctx.cfg;
    let n = ctx.n();
    let (h, qd, kd, i) = (
        cfg.hidden_size,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.intermediate_size,
    );
    let theta = cfg.rope_theta as f32;
    let lin = |t: Target| layer.linear(t);
    let nid = |kind: NormKind| ParamId::Norm { layer: li, kind };

    // out = h1 + postff_norm(d): dh1 = dout + (path through the MLP), dd = postff_norm'(dout).
    let mut dd = be.zeros(n * h)?;
    be.rmsnorm_bwd(
        dout,
        &a.d,
        layer.norm(NormKind::PostFeedforward),
        &a.rstd4,
        &mut dd,
        norm_grad(grads, nid(NormKind::PostFeedforward), full)?,
        n,
        h,
    )?;
    let mut dact = be.zeros(n * i)?;
    linear_bwd(
        ctx,
        lin(Target::DownProj),
        li,
        &a.lin[6],
        &a.act,
        &dd,
        &mut dact,
        Accum::Overwrite,
        grads,
        full,
    )?;
    drop(dd);
    let mut dgate = be.zeros(n * i)?;
    let mut dup = be.zeros(n * i)?;
    be.geglu_bwd(&dact, &a.gate, &a.up, &mut dgate, &mut dup)?;
    drop(dact);
    let mut dxn2 = be.zeros(n * h)?;
    linear_bwd(
        ctx,
        lin(Target::GateProj),
        li,
        &a.lin[4],
        &a.xn2,
        &dgate,
        &mut dxn2,
        Accum::Overwrite,
        grads,
        full,
    )?;
    linear_bwd(
        ctx,
        lin(Target::UpProj),
        li,
        &a.lin[5],
        &a.xn2,
        &dup,
        &mut dxn2,
        Accum::Add,
        grads,
        full,
    )?;
    drop((dgate, dup));
    // dh1 = dout + preff_norm'(dxn2)
    let mut dh1 = be.zeros(n * h)?;
    be.rmsnorm_bwd(
        &dxn2,
        &a.h1,
        layer.norm(NormKind::PreFeedforward),
        &a.rstd3,
        &mut dh1,
        norm_grad(grads, nid(NormKind::PreFeedforward), full)?,
        n,
        h,
    )?;
    be.axpy(1.0, dout, &mut dh1)?;
    drop(dxn2);

    // h1 = x + postattn_norm(o).
    let mut d_o = be.zeros(n * h)?;
    be.rmsnorm_bwd(
        &dh1,
        &a.o,
        layer.norm(NormKind::PostAttention),
        &a.rstd2,
        &mut d_o,
        norm_grad(grads, nid(NormKind::PostAttention), full)?,
        n,
        h,
    )?;
    let mut dao = be.zeros(n * qd)?;
    linear_bwd(
        ctx,
        lin(Target::OProj),
        li,
        &a.lin[3],
        &a.ao,
        &d_o,
        &mut dao,
        Accum::Overwrite,
        grads,
        full,
    )?;
    drop(d_o);
    let mut dq = be.zeros(n * qd)?;
    let mut dk = be.zeros(n * kd)?;
    let mut dv = be.zeros(n * kd)?;
    be.attn_bwd(
        &a.q,
        &a.k,
        &a.v,
        ctx.seg,
        &a.ao,
        &a.lse,
        &dao,
        &mut dq,
        &mut dk,
        &mut dv,
        &ctx.attn_shape(li, ctx.t),
    )?;
    drop(dao);
    // RoPE is an orthogonal rotation per (token, head): its backward rotates the gradient by −angle.
    be.rope(
        &mut dq,
        ctx.pos,
        n,
        cfg.num_attention_heads,
        cfg.head_dim,
        theta,
        true,
    )?;
    be.rope(
        &mut dk,
        ctx.pos,
        n,
        cfg.num_key_value_heads,
        cfg.head_dim,
        theta,
        true,
    )?;
    let mut dxn1 = be.zeros(n * h)?;
    linear_bwd(
        ctx,
        lin(Target::QProj),
        li,
        &a.lin[0],
        &a.xn1,
        &dq,
        &mut dxn1,
        Accum::Overwrite,
        grads,
        full,
    )?;
    linear_bwd(
        ctx,
        lin(Target::KProj),
        li,
        &a.lin[1],
        &a.xn1,
        &dk,
        &mut dxn1,
        Accum::Add,
        grads,
        full,
    )?;
    linear_bwd(
        ctx,
        lin(Target::VProj),
        li,
        &a.lin[2],
        &a.xn1,
        &dv,
        &mut dxn1,
        Accum::Add,
        grads,
        full,
    )?;
    drop((dq, dk, dv));
    // dx = dh1 + input_norm'(dxn1)
    be.rmsnorm_bwd(
        &dxn1,
        x,
        layer.norm(NormKind::Input),
        &a.rstd1,
        dx,
        norm_grad(grads, nid(NormKind::Input), full)?,
        n,
        h,
    )?;
    be.axpy(1.0, &dh1, dx)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::dropout_mask;
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
        };
        let run = |layer: usize| {
            let mut y = vec![f32::NAN; m * n];
            let saved = linear_fwd(&ctx, &lin, layer, &x, &mut y).unwrap();
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
