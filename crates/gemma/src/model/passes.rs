//! The whole-model passes: evaluation logits and loss, and the training forward + backward of one
//! micro-batch (with optional activation checkpointing). The per-layer math is in `crate::layer`.

use afinar_kernels::profile::{self, Phase, Role};
use afinar_kernels::{Accum, Backend, Storage};

use crate::batch::{Batch, DeviceBatch};
use crate::error::{GemmaError, Result};
use crate::grads::Grads;
use crate::layer::{layer_bwd, layer_fwd, BwdScratch, Ctx, Kv, LayerActs};
use crate::params::ParamId;

use super::Gemma2Model;

/// The buffers of one training pass that `forward_backward` keeps for the next call with the same
/// shape (B, T) and checkpointing mode: the layer outputs, the saved activations (every layer's
/// without checkpointing, one layer's workspace with it) and the backward's gradient buffers. Every
/// one is overwritten before it is read, so a reused workspace gives the bits of fresh buffers; what
/// it saves is allocating (and, on the CPU, page-faulting and zeroing) hundreds of MiB per step.
pub(crate) struct TrainWorkspace<B: Backend> {
    /// (B, T, checkpointing) it was made for.
    key: (usize, usize, bool),
    /// Outputs of layers 0 … L−1 [N,H] (= inputs of layers 1 … L); the embedding is made per call.
    outs: Vec<B::Buf>,
    /// Without checkpointing: L per-layer activations. With it: one workspace.
    acts: Vec<LayerActs<B>>,
    scratch: BwdScratch<B>,
    /// With checkpointing and L > 1: where a recomputed layer writes its (unused) output [N,H].
    recompute_out: Option<B::Buf>,
}

impl<B: Backend> TrainWorkspace<B> {
    fn new(ctx: &Ctx<'_, B>, n_layers: usize, checkpointing: bool) -> Result<Self> {
        let be = ctx.backend;
        let nh = ctx.b * ctx.t * ctx.cfg.hidden_size;
        let n_acts = if checkpointing { 1 } else { n_layers };
        Ok(Self {
            key: (ctx.b, ctx.t, checkpointing),
            outs: (0..n_layers)
                .map(|_| be.zeros(nh))
                .collect::<std::result::Result<_, _>>()?,
            acts: (0..n_acts)
                .map(|_| LayerActs::new(ctx))
                .collect::<Result<_>>()?,
            scratch: BwdScratch::new(ctx)?,
            recompute_out: if checkpointing && n_layers > 1 {
                Some(be.zeros(nh)?)
            } else {
                None
            },
        })
    }
}

impl<B: Backend> Gemma2Model<B> {
    pub(super) fn upload(&self, batch: &Batch) -> Result<DeviceBatch<B>> {
        let _label = profile::role(Role::Data);
        DeviceBatch::upload(&*self.backend, batch, self.config.vocab_size)
    }

    pub(super) fn ctx<'a>(
        &'a self,
        batch: &Batch,
        dev: &'a DeviceBatch<B>,
        train: bool,
    ) -> Ctx<'a, B> {
        Ctx {
            backend: &*self.backend,
            cfg: &self.config,
            b: batch.b,
            t: batch.t,
            pos: &dev.pos,
            seg: dev.seg.as_ref(),
            train,
            dropout_seed: batch.dropout_seed,
            dropout_row_offset: batch.dropout_row_offset,
        }
    }

    /// x [N,H] = embedding(ids [N]) · sqrt(H), the normalizer rounded to the activation dtype (transformers
    /// casts it to the hidden states' dtype). The ids were range-checked on the host.
    pub(crate) fn embed(&self, ids: &B::Ids, n: usize) -> Result<B::Buf> {
        let _label = profile::role(Role::Embed);
        let be = &*self.backend;
        let h = self.config.hidden_size;
        let mut x = be.zeros(n * h)?;
        be.embedding_fwd(
            ids,
            &self.embed_tokens,
            &mut x,
            self.config.vocab_size,
            h,
            be.round_activation(self.config.embed_scale()),
        )?;
        Ok(x)
    }

    /// Embedding and all layers in inference mode (no dropout, nothing kept): the final hidden state
    /// after the final norm [N,H].
    fn final_hidden(&self, batch: &Batch, dev: &DeviceBatch<B>) -> Result<B::Buf> {
        let _pass = profile::phase(Phase::Forward);
        let _label = profile::role(Role::LayerOther);
        let be = &*self.backend;
        let ctx = self.ctx(batch, dev, false);
        let (n, h) = (batch.tokens(), self.config.hidden_size);
        let mut x = self.embed(&dev.ids, n)?;
        let mut next = be.zeros(n * h)?;
        // One workspace for all layers: nothing is kept (see `LayerActs`).
        let mut ws = LayerActs::new(&ctx)?;
        for (li, layer) in self.layers.iter().enumerate() {
            layer_fwd(&ctx, layer, li, &x, Kv::Chunk, &mut next, &mut ws)?;
            std::mem::swap(&mut x, &mut next);
        }
        self.final_norm(&x, &mut next, n)?;
        Ok(next)
    }

    /// out [N,H] = the final RMSNorm of the last layer's output x [N,H].
    pub(super) fn final_norm(&self, x: &B::Buf, out: &mut B::Buf, n: usize) -> Result<()> {
        let _label = profile::role(Role::Norm);
        let be = &*self.backend;
        let mut rstd = be.zeros_for(n, Storage::Master)?;
        be.rmsnorm_fwd(
            x,
            &self.norm,
            out,
            &mut rstd,
            n,
            self.config.hidden_size,
            self.config.rms_norm_eps as f32,
        )?;
        Ok(())
    }

    /// Logits [B·T, V] (row-major, after the final soft-cap, as transformers returns them). For tests and
    /// evaluation on small batches only: training never builds [N,V].
    pub fn logits(&self, batch: &Batch) -> Result<Vec<f32>> {
        let dev = self.upload(batch)?;
        let xf = self.final_hidden(batch, &dev)?;
        self.head_logits(&xf, batch.tokens())
    }

    /// The tied LM head and the final soft-cap on the final hidden state xf [N,H]: logits [N,V] in
    /// f32 on the host.
    pub(super) fn head_logits(&self, xf: &B::Buf, n: usize) -> Result<Vec<f32>> {
        let be = &*self.backend;
        let _pass = profile::phase(Phase::Forward);
        let _label = profile::role(Role::LmHead);
        let (h, v) = (self.config.hidden_size, self.config.vocab_size);
        // Evaluation logits in f32 (small batches only; see above).
        let mut logits = be.zeros_for(n * v, Storage::Master)?;
        be.matmul_xwt(
            xf,
            &self.embed_tokens,
            &mut logits,
            n,
            h,
            v,
            Accum::Overwrite,
        )?;
        if let Some(c) = self.config.final_logit_softcapping {
            be.softcap_fwd(&mut logits, c as f32)?;
        }
        Ok(be.to_host(&logits)?)
    }

    /// (Σ cross-entropy over scored targets, number of scored targets), inference mode, no gradients.
    /// Mean loss = Σ / count (what transformers returns for one batch).
    pub fn loss(&self, batch: &Batch) -> Result<(f64, usize)> {
        let dev = self.upload(batch)?;
        let xf = self.final_hidden(batch, &dev)?;
        self.head_loss(&xf, &dev, batch.tokens())
    }

    /// (Σ cross-entropy, scored count) of the final hidden state xf [N,H] against the batch's
    /// targets: the fused tied LM head with the final soft-cap, no gradients.
    pub(super) fn head_loss(
        &self,
        xf: &B::Buf,
        dev: &DeviceBatch<B>,
        n: usize,
    ) -> Result<(f64, usize)> {
        let (h, v) = (self.config.hidden_size, self.config.vocab_size);
        let cap = self.config.final_logit_softcapping.map(|c| c as f32);
        let _pass = profile::phase(Phase::Forward);
        let _label = profile::role(Role::LmHead);
        Ok(self.backend.lm_head_ce(
            xf,
            &self.embed_tokens,
            &dev.targets,
            n,
            h,
            v,
            cap,
            1.0,
            None,
            None,
        )?)
    }

    /// Forward and backward of one micro-batch in training mode (LoRA dropout on, masks from
    /// `batch.dropout_seed`). Adds grad_scale·∂(Σ loss)/∂θ into `grads` for every trainable θ (gradients
    /// ACCUMULATE; zero them after each optimizer step) and returns (Σ loss, scored count) of this batch.
    ///
    /// For "loss normalised by the trained tokens of the whole accumulation window", pass
    /// grad_scale = 1 / (tokens in the window).
    ///
    /// The activation buffers stay with the model for the next call of the same shape (see
    /// [`Gemma2Model::release_workspace`]).
    pub fn forward_backward(
        &self,
        batch: &Batch,
        grad_scale: f32,
        grads: &mut Grads<B>,
    ) -> Result<(f64, usize)> {
        if grads.ids() != self.trainable_ids() {
            return Err(GemmaError::Invalid("gradients do not match this model's trainable parameters (made for another model?)".into()));
        }
        let dev = self.upload(batch)?;
        let ctx = self.ctx(batch, &dev, true);
        // The workspace of the previous call when it fits, else a new one (the old one freed first);
        // put back at the end. A failed pass drops it.
        let key = (batch.b, batch.t, self.checkpointing);
        let kept = self
            .train_ws
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .filter(|ws| ws.key == key);
        let mut ws = match kept {
            Some(ws) => ws,
            None => {
                // Profiler: the workspace's allocations count with the layers' own buffers.
                let _label = profile::role(Role::LayerOther);
                let _pass = profile::phase(Phase::Forward);
                TrainWorkspace::new(&ctx, self.layers.len(), self.checkpointing)?
            }
        };
        let (sum, count) = self.train_pass(&ctx, &dev, &mut ws, grad_scale, grads)?;
        *self.train_ws.lock().unwrap_or_else(|e| e.into_inner()) = Some(ws);
        Ok((sum, count))
    }

    /// `forward_backward` in the workspace `ws` (made for this batch's shape and checkpointing mode).
    fn train_pass(
        &self,
        ctx: &Ctx<'_, B>,
        dev: &DeviceBatch<B>,
        ws: &mut TrainWorkspace<B>,
        grad_scale: f32,
        grads: &mut Grads<B>,
    ) -> Result<(f64, usize)> {
        let be = &*self.backend;
        let cfg = &self.config;
        let (n, h, v) = (ctx.b * ctx.t, cfg.hidden_size, cfg.vocab_size);
        let full = self.full_finetune;
        let eps = cfg.rms_norm_eps as f32;
        let n_layers = self.layers.len();
        let TrainWorkspace {
            outs,
            acts,
            scratch,
            recompute_out,
            ..
        } = ws;

        // Forward. Layer l reads x_l (x_0 = the embedding, x_l = outs[l−1]) and writes outs[l].
        // Without checkpointing every layer saves its activations in acts[l]. With it, all layers run in
        // the one workspace acts[0], which ends up holding the last layer's activations: the backward
        // uses those as they are and recomputes only layers L−2 … 0 into it (the same inputs and
        // dropout masks give the same bits), so checkpointing costs L − 1 layer forwards, not L.
        // Profiler labels: the buffers between the pieces count with the layers' own.
        let _label = profile::role(Role::LayerOther);
        let pass = profile::phase(Phase::Forward);
        let x0 = self.embed(&dev.ids, n)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let (done, rest) = outs.split_at_mut(li);
            let x = done.last().unwrap_or(&x0);
            let a = &mut acts[if self.checkpointing { 0 } else { li }];
            layer_fwd(ctx, layer, li, x, Kv::Chunk, &mut rest[0], a)?;
        }
        let last = outs.last().unwrap_or(&x0);
        let mut xf = be.zeros(n * h)?;
        let mut rstdf = be.zeros_for(n, Storage::Master)?;
        {
            let _label = profile::role(Role::Norm);
            be.rmsnorm_fwd(last, &self.norm, &mut xf, &mut rstdf, n, h, eps)?;
        }
        drop(pass);
        let _pass = profile::phase(Phase::Backward);

        // Fused LM head + soft-capped cross-entropy: ∂/∂xf, and ∂/∂emb (tied head) in full fine-tuning.
        let cap = cfg.final_logit_softcapping.map(|c| c as f32);
        let mut dxf = be.zeros(n * h)?;
        let (sum, count) = {
            let _label = profile::role(Role::LmHead);
            let demb = if full {
                grads.get_mut(ParamId::Embed)
            } else {
                None
            };
            be.lm_head_ce(
                &xf,
                &self.embed_tokens,
                &dev.targets,
                n,
                h,
                v,
                cap,
                grad_scale,
                Some(&mut dxf),
                demb,
            )?
        };
        drop(xf);
        let mut dh = be.zeros(n * h)?;
        {
            let _label = profile::role(Role::Norm);
            let dw = if full {
                grads.get_mut(ParamId::FinalNorm)
            } else {
                None
            };
            be.rmsnorm_bwd(&dxf, last, &self.norm, &rstdf, &mut dh, dw, n, h)?;
        }
        drop(dxf);

        // Backward through the layers, last to first, in one set of gradient buffers.
        let mut dnext = be.zeros(n * h)?;
        for li in (0..n_layers).rev() {
            let layer = &self.layers[li];
            let x = if li == 0 { &x0 } else { &outs[li - 1] };
            let a = if self.checkpointing {
                let a = &mut acts[0];
                if li + 1 < n_layers {
                    let out = recompute_out.as_mut().ok_or_else(|| {
                        GemmaError::Invalid("internal: no recompute buffer".into())
                    })?;
                    let recompute = profile::phase(Phase::Recompute);
                    layer_fwd(ctx, layer, li, x, Kv::Chunk, out, a)?;
                    drop(recompute);
                }
                &acts[0]
            } else {
                &acts[li]
            };
            layer_bwd(ctx, layer, li, x, a, &dh, &mut dnext, grads, full, scratch)?;
            std::mem::swap(&mut dh, &mut dnext);
        }
        if full {
            let _label = profile::role(Role::Embed);
            let demb = grads.get_mut(ParamId::Embed).ok_or_else(|| {
                GemmaError::Invalid("gradients have no slot for the embedding".into())
            })?;
            be.embedding_bwd(
                &dev.ids,
                &dh,
                demb,
                v,
                h,
                be.round_activation(cfg.embed_scale()),
            )?;
        }
        Ok((sum, count))
    }
}
