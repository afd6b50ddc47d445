//! The hand-written backward of one decoder layer.

use afinar_kernels::{Accum, Backend};

use super::linear::linear_bwd;
use super::{Ctx, LayerActs};
use crate::error::{GemmaError, Result};
use crate::grads::Grads;
use crate::lora::Target;
use crate::params::{Layer, NormKind, ParamId};

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
