//! Causal attention forward and backward: kernels/attention_flash.cu (FlashAttention-2-style
//! tensor-core kernels, the default for D ∈ {128, 256} on sm_80+ with bf16 Q, K, V), kernels/attention.cu
//! (its first tensor-core kernels for D ∈ {16, 32, 64, 128, 256}, and the CUDA-core kernels for
//! everything else): see `launch::attention_path`. CPU twin: cpu/attention.rs.

use super::gemm::stores;
use super::{Cuda, CudaBuf, CudaIds};
use crate::backend::AttnShape;
use crate::contract;
use crate::error::{ensure, Result};
use crate::launch::{self, to_i32, AttnPath};
use cudarc::driver::CudaSlice;

#[allow(clippy::too_many_arguments)]
pub(super) fn attn_fwd(
    cu: &Cuda,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    seg: Option<&CudaIds>,
    out: &mut CudaBuf,
    lse: &mut CudaBuf,
    s: &AttnShape,
) -> Result<()> {
    contract::attn_fwd(
        q.len,
        k.len,
        v.len,
        seg.map(CudaIds::len),
        out.len,
        lse.len,
        s,
    )?;
    max_head_dim("attn_fwd", s)?;
    let qn = q.len;
    let (seg_p, has_seg) = seg_arg(seg);
    if qn == 0 {
        return Ok(());
    }
    // Flash kernels for D ∈ {128, 256} (Gemma-2: 256), the first tensor-core kernels for the other
    // multiples of 16 up to 256, with bf16 Q, K, V; CUDA cores otherwise (f32 data keeps f32
    // precision). All take the same arguments.
    let flash = launch::attention_flash(s.b, s.t, s.nh, s.d)?;
    let mma = launch::attention_mma(s.b, s.t, s.nh, s.d)?;
    let path = launch::attention_path(
        cu.caps(),
        &stores([q, k, v]),
        flash.map(|(l, _)| l.shared_mem_bytes),
        mma.is_some(),
    );
    let (l, kernel) = match (path, flash, mma) {
        (AttnPath::Flash, Some(plan), _) | (AttnPath::TensorCores, _, Some(plan)) => plan,
        _ => (launch::attention(s.b * s.t * s.nh, s.d)?, "attn_fwd_k"),
    };
    let out: &CudaBuf = out;
    let lse: &CudaBuf = lse;
    cu.attn_fwd_any_k(
        kernel,
        l,
        q,
        k,
        v,
        seg_p,
        has_seg,
        out,
        lse,
        to_i32("attn_fwd", "b", s.b)?,
        to_i32("attn_fwd", "t", s.t)?,
        to_i32("attn_fwd", "tk", s.tk)?,
        to_i32("attn_fwd", "nh", s.nh)?,
        to_i32("attn_fwd", "nkv", s.nkv)?,
        to_i32("attn_fwd", "d", s.d)?,
        s.scale,
        s.softcap.unwrap_or(0.0),
        to_i32("attn_fwd", "window", s.window.unwrap_or(0))?,
    )
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attn_bwd(
    cu: &Cuda,
    q: &CudaBuf,
    k: &CudaBuf,
    v: &CudaBuf,
    seg: Option<&CudaIds>,
    out: &CudaBuf,
    lse: &CudaBuf,
    dout: &CudaBuf,
    dq: &mut CudaBuf,
    dk: &mut CudaBuf,
    dv: &mut CudaBuf,
    s: &AttnShape,
) -> Result<()> {
    contract::attn_bwd(
        q.len,
        k.len,
        v.len,
        seg.map(CudaIds::len),
        out.len,
        lse.len,
        dout.len,
        dq.len,
        dk.len,
        dv.len,
        s,
    )?;
    max_head_dim("attn_bwd", s)?;
    let qn = q.len;
    let (seg_p, has_seg) = seg_arg(seg);
    if qn == 0 {
        return Ok(());
    }
    let (b, t, nh, nkv, d) = (
        to_i32("attn_bwd", "b", s.b)?,
        to_i32("attn_bwd", "t", s.t)?,
        to_i32("attn_bwd", "nh", s.nh)?,
        to_i32("attn_bwd", "nkv", s.nkv)?,
        to_i32("attn_bwd", "d", s.d)?,
    );
    let (scale, cap) = (s.scale, s.softcap.unwrap_or(0.0));
    let window = to_i32("attn_bwd", "window", s.window.unwrap_or(0))?;
    let delta = cu.f32_scratch(s.b * s.nh * s.t)?;
    cu.attn_bwd_delta_k(
        launch::attention(s.b * s.t * s.nh, s.d)?,
        out,
        dout,
        &delta,
        b,
        t,
        nh,
        d,
    )?;
    // Flash kernels for D ∈ {128, 256} (dq, then dk and dv together), the first tensor-core kernels
    // (dq, dk, dv each in its own kernel) for the other multiples of 16, with bf16 Q, K, V, dOut; CUDA
    // cores otherwise. No kernel accumulates with atomics: the gradients are bit-deterministic.
    // The default tiling where the device's shared memory holds it, else the ≤ 99 KiB `_s` kernels
    // (sm_86/89: without them the D = 256 backward of the 24 GB GPUs fell back to the older kernels),
    // or those on request (`CudaOptions::small_flash_bwd`).
    let tiling = if cu.small_flash_bwd {
        launch::BwdTiling::Small
    } else {
        launch::flash_bwd_tiling(s.d, cu.caps().max_dyn_smem)
    };
    let flash = launch::attention_flash_bwd(s.b, s.t, s.nh, s.nkv, s.d, tiling)?;
    let mma = launch::attention_mma_bwd(s.b, s.t, s.nh, s.nkv, s.d)?;
    let path = launch::attention_path(
        cu.caps(),
        &stores([q, k, v, dout]),
        flash.map(|(lq, lkv, _)| lq.shared_mem_bytes.max(lkv.shared_mem_bytes)),
        mma.is_some(),
    );
    match (path, flash, mma) {
        (AttnPath::Flash, Some((ldq, ldkv, [kdq, kdkv])), _) => {
            let (dq, dk, dv): (&CudaBuf, &CudaBuf, &CudaBuf) = (dq, dk, dv);
            cu.attn_bwd_dq_flash_k(
                kdq, ldq, q, k, v, seg_p, has_seg, lse, &delta, dout, dq, b, t, nh, nkv, d, scale,
                cap, window,
            )?;
            return cu.attn_bwd_dkv_flash_k(
                kdkv, ldkv, q, k, v, seg_p, has_seg, lse, &delta, dout, dk, dv, b, t, nh, nkv, d,
                scale, cap, window,
            );
        }
        (AttnPath::TensorCores, _, Some((ldq, ldkv, [kdq, kdk, kdv]))) => {
            for (kernel, l, grad) in [(kdq, ldq, &*dq), (kdk, ldkv, &*dk), (kdv, ldkv, &*dv)] {
                cu.attn_bwd_mma_k(
                    kernel, l, q, k, v, seg_p, has_seg, lse, &delta, dout, grad, b, t, nh, nkv, d,
                    scale, cap, window,
                )?;
            }
            return Ok(());
        }
        _ => {}
    }
    let dq: &CudaBuf = dq;
    cu.attn_bwd_dq_k(
        launch::attention(s.b * s.t * s.nh, s.d)?,
        q,
        k,
        v,
        seg_p,
        has_seg,
        lse,
        &delta,
        dout,
        dq,
        b,
        t,
        nh,
        nkv,
        d,
        scale,
        cap,
        window,
    )?;
    let (dk, dv): (&CudaBuf, &CudaBuf) = (dk, dv);
    cu.attn_bwd_dkv_k(
        launch::attention(s.b * s.t * s.nkv, s.d)?,
        q,
        k,
        v,
        seg_p,
        has_seg,
        lse,
        &delta,
        dout,
        dk,
        dv,
        b,
        t,
        nh,
        nkv,
        d,
        scale,
        cap,
        window,
    )
}

/// This backend's limit beyond the contract: D ≤ 256 (each lane keeps D/32 values in registers).
fn max_head_dim(op: &'static str, s: &AttnShape) -> Result<()> {
    ensure(op, "d", s.d <= launch::ATTN_MAX_D, || {
        format!("head dim D = {} outside 1..={}", s.d, launch::ATTN_MAX_D)
    })
}

/// The segment-id pointer (null when absent) and the `has_seg` flag.
fn seg_arg(seg: Option<&CudaIds>) -> (Option<&CudaSlice<i32>>, i32) {
    match seg {
        Some(sg) => (Some(&sg.data), 1),
        None => (None, 0),
    }
}
