//! The decoder-layer forward that training, evaluation and KV-cache decoding all run.

use afinar_kernels::profile::{self, Role};
use afinar_kernels::{Backend, Storage};

use super::linear::linear_fwd;
use super::{Ctx, Kv, LayerActs};
use crate::error::{GemmaError, Result};
use crate::lora::Target;
use crate::params::{Layer, NormKind};

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
    // Profiler labels: allocations and residual adds are the layer's own; the pieces label themselves.
    let _label = profile::layer_role(li, Role::LayerOther);
    let be = ctx.backend;
    let cfg = ctx.cfg;
    let n = ctx.n();
    let (h, qd, kd, i) = ctx.widths();
    let eps = ctx.eps();
    let lin = |t: Target| layer.linear(t);
    // y = norm `kind`(xin); returns its rstd [N] (f32) for the backward.
    let norm_fwd = |kind: NormKind, xin: &B::Buf, y: &mut B::Buf| -> Result<B::Buf> {
        let _label = profile::layer_role(li, Role::Norm);
        let mut rstd = be.zeros_for(n, Storage::Master)?;
        be.rmsnorm_fwd(xin, layer.norm(kind), y, &mut rstd, n, h, eps)?;
        Ok(rstd)
    };

    // Attention block.
    let mut xn1 = be.zeros(n * h)?;
    let rstd1 = norm_fwd(NormKind::Input, x, &mut xn1)?;
    let mut q = be.zeros(n * qd)?;
    let mut k = be.zeros(n * kd)?;
    let mut v = be.zeros(n * kd)?;
    let sq = linear_fwd(ctx, lin(Target::QProj), li, &xn1, &mut q)?;
    let sk = linear_fwd(ctx, lin(Target::KProj), li, &xn1, &mut k)?;
    let sv = linear_fwd(ctx, lin(Target::VProj), li, &xn1, &mut v)?;
    let attn_label = profile::layer_role(li, Role::Attention);
    ctx.rope_qk(&mut q, &mut k, false)?;
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
    drop(attn_label);
    let mut o = be.zeros(n * h)?;
    let so = linear_fwd(ctx, lin(Target::OProj), li, &ao, &mut o)?;
    // h1 = x + post_attention_layernorm(o)
    let mut h1 = be.zeros(n * h)?;
    let rstd2 = norm_fwd(NormKind::PostAttention, &o, &mut h1)?;
    be.axpy(1.0, x, &mut h1)?;

    // MLP block.
    let mut xn2 = be.zeros(n * h)?;
    let rstd3 = norm_fwd(NormKind::PreFeedforward, &h1, &mut xn2)?;
    let mut gate = be.zeros(n * i)?;
    let mut up = be.zeros(n * i)?;
    let sg = linear_fwd(ctx, lin(Target::GateProj), li, &xn2, &mut gate)?;
    let su = linear_fwd(ctx, lin(Target::UpProj), li, &xn2, &mut up)?;
    let mut act = be.zeros(n * i)?;
    {
        let _label = profile::layer_role(li, Role::MlpAct);
        be.geglu_fwd(&gate, &up, &mut act)?;
    }
    let mut d = be.zeros(n * h)?;
    let sd = linear_fwd(ctx, lin(Target::DownProj), li, &act, &mut d)?;
    // out = h1 + post_feedforward_layernorm(d)
    let rstd4 = norm_fwd(NormKind::PostFeedforward, &d, out)?;
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
