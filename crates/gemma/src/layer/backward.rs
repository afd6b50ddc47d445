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

/// The backward's intermediate gradients, one set for all layers of a pass: `layer_bwd` writes each
/// before it reads it (ops with `Accum::Overwrite` or that *write* their output), so reusing them from
/// layer to layer gives the bits of fresh buffers without allocating (and page-faulting) ≈ 12 buffers
/// per layer. The MLP half and the attention half of the backward share the two [N,H] buffers whose
/// lifetimes do not overlap.
pub(crate) struct BwdScratch<B: Backend> {
    /// ∂/∂d (MLP half), then ∂/∂o (attention half) [N,H].
    dnorm_in: B::Buf,
    dact: B::Buf,
    dgate: B::Buf,
    dup: B::Buf,
    /// ∂/∂xn2 (MLP half), then ∂/∂xn1 (attention half) [N,H].
    dxn: B::Buf,
    dh1: B::Buf,
    dao: B::Buf,
    dq: B::Buf,
    dk: B::Buf,
    dv: B::Buf,
}

impl<B: Backend> BwdScratch<B> {
    /// Gradient buffers [N, width] for `ctx`'s N rows, in activation storage.
    pub(crate) fn new(ctx: &Ctx<'_, B>) -> Result<Self> {
        let be = ctx.backend;
        let n = ctx.n();
        let (h, qd, kd, i) = ctx.widths();
        let z = |w: usize| be.zeros(n * w);
        Ok(Self {
            dnorm_in: z(h)?,
            dact: z(i)?,
            dgate: z(i)?,
            dup: z(i)?,
            dxn: z(h)?,
            dh1: z(h)?,
            dao: z(qd)?,
            dq: z(qd)?,
            dk: z(kd)?,
            dv: z(kd)?,
        })
    }
}

/// Backward of layer `li`: given dout = ∂L/∂out [N,H], writes dx = ∂L/∂x [N,H] and accumulates parameter
/// gradients. `x` is the layer input and `a` what `layer_fwd` saved for it; `s` is scratch.
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
    s: &mut BwdScratch<B>,
) -> Result<()> {
    // Profiler labels: allocations and residual adds are the layer's own; the pieces label themselves.
    let _label = profile::layer_role(li, Role::LayerOther);
    let be = ctx.backend;
    let n = ctx.n();
    let h = ctx.cfg.hidden_size;
    let BwdScratch {
        dnorm_in,
        dact,
        dgate,
        dup,
        dxn,
        dh1,
        dao,
        dq,
        dk,
        dv,
    } = s;
    // MLP half: dd = ∂/∂d, dxn2 = ∂/∂xn2; attention half: d_o = ∂/∂o, dxn1 = ∂/∂xn1 (same buffers).
    let (dd, dxn2) = (&mut *dnorm_in, &mut *dxn);
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
    norm_bwd(NormKind::PostFeedforward, dout, &a.d, &a.rstd4, dd, grads)?;
    lin_bwd(Target::DownProj, &a.act, dd, dact, Accum::Overwrite, grads)?;
    {
        let _label = profile::layer_role(li, Role::MlpAct);
        be.geglu_bwd(dact, &a.gate, &a.up, dgate, dup)?;
    }
    lin_bwd(
        Target::GateProj,
        &a.xn2,
        dgate,
        dxn2,
        Accum::Overwrite,
        grads,
    )?;
    lin_bwd(Target::UpProj, &a.xn2, dup, dxn2, Accum::Add, grads)?;
    // dh1 = dout + preff_norm'(dxn2)
    norm_bwd(NormKind::PreFeedforward, dxn2, &a.h1, &a.rstd3, dh1, grads)?;
    be.axpy(1.0, dout, dh1)?;

    // h1 = x + postattn_norm(o).
    let (d_o, dxn1) = (dnorm_in, dxn);
    norm_bwd(NormKind::PostAttention, dh1, &a.o, &a.rstd2, d_o, grads)?;
    lin_bwd(Target::OProj, &a.ao, d_o, dao, Accum::Overwrite, grads)?;
    let attn_label = profile::layer_role(li, Role::Attention);
    be.attn_bwd(
        &a.q,
        &a.k,
        &a.v,
        ctx.seg,
        &a.ao,
        &a.lse,
        dao,
        dq,
        dk,
        dv,
        &ctx.attn_shape(li, ctx.t),
    )?;
    ctx.rope_qk(dq, dk, true)?;
    drop(attn_label);
    lin_bwd(Target::QProj, &a.xn1, dq, dxn1, Accum::Overwrite, grads)?;
    lin_bwd(Target::KProj, &a.xn1, dk, dxn1, Accum::Add, grads)?;
    lin_bwd(Target::VProj, &a.xn1, dv, dxn1, Accum::Add, grads)?;
    // dx = dh1 + input_norm'(dxn1)
    norm_bwd(NormKind::Input, dxn1, x, &a.rstd1, dx, grads)?;
    be.axpy(1.0, dh1, dx)?;
    Ok(())
}
