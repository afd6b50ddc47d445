//! The decoder-layer forward that training, evaluation and KV-cache decoding all run.

use afinar_kernels::profile::{self, Role};
use afinar_kernels::Backend;

use super::linear::linear_fwd;
use super::{Ctx, Kv, LayerActs};
use crate::error::{GemmaError, Result};
use crate::lora::Target;
use crate::params::{Layer, NormKind};

/// Forward of layer `li` on x [N,H], attending to the keys and values `kv` names; writes out [N,H] and
/// every activation the backward reads into `a` (callers outside training reuse one `a` for all layers
/// and ignore it).
///
/// Every buffer of `a` is overwritten before it is read (each op below *writes* its outputs), so `a`
/// may hold any earlier layer's values: the checkpointed backward recomputes all layers into one
/// workspace, which gives the same bits as fresh buffers.
pub(crate) fn layer_fwd<B: Backend>(
    ctx: &Ctx<'_, B>,
    layer: &Layer<B>,
    li: usize,
    x: &B::Buf,
    kv: Kv<'_, B>,
    out: &mut B::Buf,
    a: &mut LayerActs<B>,
) -> Result<()> {
    // Profiler labels: residual adds are the layer's own; the pieces label themselves.
    let _label = profile::layer_role(li, Role::LayerOther);
    let be = ctx.backend;
    let n = ctx.n();
    let (h, _, kd, _) = ctx.widths();
    let eps = ctx.eps();
    let lin = |t: Target| layer.linear(t);
    // y = norm `kind`(xin), its rstd [N] (f32) into `rstd` for the backward.
    let norm_fwd =
        |kind: NormKind, xin: &B::Buf, y: &mut B::Buf, rstd: &mut B::Buf| -> Result<()> {
            let _label = profile::layer_role(li, Role::Norm);
            Ok(be.rmsnorm_fwd(xin, layer.norm(kind), y, rstd, n, h, eps)?)
        };
    let LayerActs {
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
    } = a;

    // Attention block.
    norm_fwd(NormKind::Input, x, xn1, rstd1)?;
    linear_fwd(ctx, lin(Target::QProj), li, xn1, q, sq)?;
    linear_fwd(ctx, lin(Target::KProj), li, xn1, k, sk)?;
    linear_fwd(ctx, lin(Target::VProj), li, xn1, v, sv)?;
    let attn_label = profile::layer_role(li, Role::Attention);
    ctx.rope_qk(q, k, false)?;
    let (kk, vv, tk) = match kv {
        Kv::Chunk => (&*k, &*v, ctx.t),
        Kv::Cache(c) => {
            if ctx.b != 1 || ctx.seg.is_some() {
                return Err(GemmaError::Invalid(
                    "internal: a KV cache holds one unpacked sequence (B = 1, no segments)".into(),
                ));
            }
            c.extend(be, k, v, n, kd)?
        }
    };
    be.attn_fwd(q, kk, vv, ctx.seg, ao, lse, &ctx.attn_shape(li, tk))?;
    drop(attn_label);
    linear_fwd(ctx, lin(Target::OProj), li, ao, o, so)?;
    // h1 = x + post_attention_layernorm(o)
    norm_fwd(NormKind::PostAttention, o, h1, rstd2)?;
    be.axpy(1.0, x, h1)?;

    // MLP block.
    norm_fwd(NormKind::PreFeedforward, h1, xn2, rstd3)?;
    linear_fwd(ctx, lin(Target::GateProj), li, xn2, gate, sg)?;
    linear_fwd(ctx, lin(Target::UpProj), li, xn2, up, su)?;
    {
        let _label = profile::layer_role(li, Role::MlpAct);
        be.geglu_fwd(gate, up, act)?;
    }
    linear_fwd(ctx, lin(Target::DownProj), li, act, d, sd)?;
    // out = h1 + post_feedforward_layernorm(d)
    norm_fwd(NormKind::PostFeedforward, d, out, rstd4)?;
    be.axpy(1.0, h1, out)?;
    Ok(())
}
