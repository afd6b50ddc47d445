//! The hand-written backward of one decoder layer.

use afinar_kernels::profile::{self, Role};
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
    // Profiler labels: allocations and residual adds are the layer's own; the pieces label themselves.
    let _label = profile::layer_role(li, Role::LayerOther);
    let be = ctx.backend;
    let n = ctx.n();
    let (h, qd, kd, i) = ctx.widths();
    // Backward of linear `t` on its forward input `xin`: dxin (= or +=) from dy; parameter gradients
    // accumulate into `g`.
    let lin_bwd = |t: Target,
                   xin: &B::Buf,
                   dy: &B::Buf,
                   dxin: &mut B::Buf,
                   acc: Accum,
                   g: &mut Grads<B>|
     -> Result<()> {
        let saved = &a.lin[t.index()];
        linear_bwd(ctx, layer.linear(t), li, saved, xin, dy, dxin, acc, g, full)
    };
    // Backward of norm `kind` applied to `xin` (with its saved rstd): dxin = norm'(dy); in full
    // fine-tuning its weight gradient accumulates into `g`.
    let norm_bwd = |kind: NormKind,
                    dy: &B::Buf,
                    xin: &B::Buf,
                    rstd: &B::Buf,
                    dxin: &mut B::Buf,
                    g: &mut Grads<B>|
     -> Result<()> {
        let _label = profile::layer_role(li, Role::Norm);
        let dw = norm_grad(g, ParamId::Norm { layer: li, kind }, full)?;
        Ok(be.rmsnorm_bwd(dy, xin, layer.norm(kind), rstd, dxin, dw, n, h)?)
    };

    // out = h1 + postff_norm(d): dh1 = dout + (path through the MLP), dd = postff_norm'(dout).
    let mut dd = be.zeros(n * h)?;
    norm_bwd(
        NormKind::PostFeedforward,
        dout,
        &a.d,
        &a.rstd4,
        &mut dd,
        grads,
    )?;
    let mut dact = be.zeros(n * i)?;
    lin_bwd(
        Target::DownProj,
        &a.act,
        &dd,
        &mut dact,
        Accum::Overwrite,
        grads,
    )?;
    drop(dd);
    let mut dgate = be.zeros(n * i)?;
    let mut dup = be.zeros(n * i)?;
    {
        let _label = profile::layer_role(li, Role::MlpAct);
        be.geglu_bwd(&dact, &a.gate, &a.up, &mut dgate, &mut dup)?;
    }
    drop(dact);
    let mut dxn2 = be.zeros(n * h)?;
    lin_bwd(
        Target::GateProj,
        &a.xn2,
        &dgate,
        &mut dxn2,
        Accum::Overwrite,
        grads,
    )?;
    lin_bwd(Target::UpProj, &a.xn2, &dup, &mut dxn2, Accum::Add, grads)?;
    drop((dgate, dup));
    // dh1 = dout + preff_norm'(dxn2)
    let mut dh1 = be.zeros(n * h)?;
    norm_bwd(
        NormKind::PreFeedforward,
        &dxn2,
        &a.h1,
        &a.rstd3,
        &mut dh1,
        grads,
    )?;
    be.axpy(1.0, dout, &mut dh1)?;
    drop(dxn2);

    // h1 = x + postattn_norm(o).
    let mut d_o = be.zeros(n * h)?;
    norm_bwd(
        NormKind::PostAttention,
        &dh1,
        &a.o,
        &a.rstd2,
        &mut d_o,
        grads,
    )?;
    let mut dao = be.zeros(n * qd)?;
    lin_bwd(
        Target::OProj,
        &a.ao,
        &d_o,
        &mut dao,
        Accum::Overwrite,
        grads,
    )?;
    drop(d_o);
    let attn_label = profile::layer_role(li, Role::Attention);
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
    ctx.rope_qk(&mut dq, &mut dk, true)?;
    drop(attn_label);
    let mut dxn1 = be.zeros(n * h)?;
    lin_bwd(
        Target::QProj,
        &a.xn1,
        &dq,
        &mut dxn1,
        Accum::Overwrite,
        grads,
    )?;
    lin_bwd(Target::KProj, &a.xn1, &dk, &mut dxn1, Accum::Add, grads)?;
    lin_bwd(Target::VProj, &a.xn1, &dv, &mut dxn1, Accum::Add, grads)?;
    drop((dq, dk, dv));
    // dx = dh1 + input_norm'(dxn1)
    norm_bwd(NormKind::Input, &dxn1, x, &a.rstd1, dx, grads)?;
    be.axpy(1.0, &dh1, dx)?;
    Ok(())
}
