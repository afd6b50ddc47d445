//! The decoder-layer forward that training, evaluation and KV-cache decoding all run.

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
