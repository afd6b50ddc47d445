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
//! (`Storage::Master`).//!
//! - this file: the per-pass context [`Ctx`], the keys/values source [`Kv`], the saved activations;
//! - `forward.rs`: [`layer_fwd`]; `backward.rs`: [`layer_bwd`];
//! - `linear.rs`: one linear (base + LoRA) forward and backward.

mod backward;
mod forward;
mod linear;

use afinar_kernels::{AttnShape, Backend, Storage};

use crate::config::Gemma2Config;
use crate::error::Result;
use crate::kv_cache::LayerCache;

pub(crate) use backward::{layer_bwd, BwdScratch};
pub(crate) use forward::layer_fwd;
use linear::LinSaved;

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
    /// `Batch::dropout_row_offset`: the masks are rows offset.. of the whole batch's masks.
    pub dropout_row_offset: usize,
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

    /// Row widths (H, QD = NH·D, KD = NKV·D, I).
    fn widths(&self) -> (usize, usize, usize, usize) {
        let c = self.cfg;
        (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size)
    }

    /// RoPE on q [N, NH·D] then k [N, NKV·D] at the positions `pos`. `inverse` rotates by −angle: RoPE
    /// is an orthogonal rotation per (token, head), so that is its backward.
    fn rope_qk(&self, q: &mut B::Buf, k: &mut B::Buf, inverse: bool) -> Result<()> {
        let c = self.cfg;
        let theta = c.rope_theta as f32;
        let n = self.n();
        let be = self.backend;
        be.rope(
            q,
            self.pos,
            n,
            c.num_attention_heads,
            c.head_dim,
            theta,
            inverse,
        )?;
        be.rope(
            k,
            self.pos,
            n,
            c.num_key_value_heads,
            c.head_dim,
            theta,
            inverse,
        )?;
        Ok(())
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

/// Everything the layer backward reads (the layer input x is kept by the caller). Also the forward's
/// workspace: `layer_fwd` overwrites every buffer, so one `LayerActs` serves all layers of a pass
/// that keeps nothing (evaluation, decoding, the checkpointed training forward and its recompute).
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
    /// Per linear, indexed by `Target::index()` (q, k, v, o, gate, up, down).
    lin: [LinSaved<B>; 7],
}

impl<B: Backend> LayerActs<B> {
    /// Buffers for one layer of `ctx` (N rows): activations [N, width] in activation storage, the
    /// per-row statistics rstd [N] and lse [B,NH,T] in f32 (see the module doc). Each linear's LoRA xa
    /// and dropout mask are allocated by its first forward (their shapes depend on the adapter).
    pub(crate) fn new(ctx: &Ctx<'_, B>) -> Result<Self> {
        let be = ctx.backend;
        let n = ctx.n();
        let (h, qd, kd, i) = ctx.widths();
        let act = |w: usize| be.zeros(n * w);
        let stat = |len: usize| be.zeros_for(len, Storage::Master);
        Ok(Self {
            xn1: act(h)?,
            rstd1: stat(n)?,
            q: act(qd)?,
            k: act(kd)?,
            v: act(kd)?,
            ao: act(qd)?,
            lse: stat(ctx.b * ctx.cfg.num_attention_heads * ctx.t)?,
            o: act(h)?,
            rstd2: stat(n)?,
            h1: act(h)?,
            xn2: act(h)?,
            rstd3: stat(n)?,
            gate: act(i)?,
            up: act(i)?,
            act: act(i)?,
            d: act(h)?,
            rstd4: stat(n)?,
            lin: Default::default(),
        })
    }
}
