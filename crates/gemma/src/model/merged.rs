//! The merged model's logits without a merged copy of the model: layer-streamed.
//!
//! Merging (`crate::export::merged_weight`: W, dequantized if NF4, + s·B·A in f32) changes only the
//! seven linears of each layer; the embedding (also the tied LM head), the norms and the config of the
//! merged model are the base's, i.e. the tuned model's own buffers (LoRA training never touches them).
//! So the merged forward needs one merged layer at a time: every prompt is embedded, then for each
//! layer ONE dense merged layer is built, run over every prompt's hidden state and dropped, and the
//! final norm, the tied head and the final soft-cap end it exactly as [`Gemma2Model::logits`] does.
//! Peak memory on top of the model: one dense layer in the activation dtype (plus the f32
//! temporaries of `merged_weight` for one linear while it is built), every prompt's hidden state
//! [T,H], one prompt's layer workspace, and one prompt's logits [T,V] in f32 — instead of a whole
//! dense merged model (17.2 GiB in bf16 at Gemma-2-9B's shape).
//!
//! The values are those of the dense merged model the trainer used to build (`Gemma2Model::load` of
//! the base with default options, every linear overwritten by `set_tensor(merged_weight(..))`): each
//! merged weight goes through the same f32 (`Storage::Master`) upload and `copy` into activation
//! storage as `set_tensor` does (rounded to bf16 on a bf16 CUDA run, exact in f32 on the CPU), and the
//! layer runs through the same `layer_fwd` with no LoRA. On the CPU the logits are bit-identical
//! (tests/it/model_merged.rs).

use afinar_kernels::{Backend, Storage};

use crate::batch::Batch;
use crate::error::{GemmaError, Result};
use crate::export::merged_weight;
use crate::lora::Target;
use crate::params::{Layer, Linear, LinearBase, NormKind};

use super::Gemma2Model;

impl<B: Backend> Gemma2Model<B> {
    /// Logits of the merged model (W + s·B·A per linear, LoRA folded in) on each batch, as
    /// [`Gemma2Model::logits`] of that model returns them: [B·T, V] row-major after the final soft-cap,
    /// one Vec per batch. Holds one dense merged layer at a time (see the module doc); for a few short
    /// prompts (the merge-fidelity check), since every batch's hidden state is kept across layers.
    /// Without an adapter this is the base (NF4 dequantized) model's logits.
    pub fn merged_logits(&self, batches: &[Batch]) -> Result<Vec<Vec<f32>>> {
        let devs = batches
            .iter()
            .map(|b| self.upload(b))
            .collect::<Result<Vec<_>>>()?;
        let xfs = self.streamed_final_hidden(batches, &devs, self.layers.len(), |li| {
            self.merged_layer(li)
        })?;
        xfs.iter()
            .zip(batches)
            .map(|(xf, b)| self.head_logits(xf, b.tokens()))
            .collect()
    }

    /// Layer `li` of the merged model: its norms copied from this model's (in activation storage, as
    /// a default load stores frozen norms), each linear dense `merged_weight` in activation storage
    /// stored as `set_tensor` stores it, no LoRA.
    fn merged_layer(&self, li: usize) -> Result<Layer<B>> {
        let be = &*self.backend;
        let l = self
            .layers
            .get(li)
            .ok_or_else(|| GemmaError::Invalid(format!("no layer {li}")))?;
        let h = self.config.hidden_size;
        let norm = |kind: NormKind| -> Result<B::Buf> {
            let mut w = be.zeros_for(h, Storage::Activation)?;
            be.copy(l.norm(kind), &mut w)?;
            Ok(w)
        };
        let norms = [
            norm(NormKind::Input)?,
            norm(NormKind::PostAttention)?,
            norm(NormKind::PreFeedforward)?,
            norm(NormKind::PostFeedforward)?,
        ];
        let mut linears = Vec::with_capacity(Target::ALL.len());
        for t in Target::ALL {
            let lin = l.linear(t);
            let (out_f, in_f) = (lin.out_features, lin.in_features);
            let w = merged_weight(self, li, t)?;
            // As `set_tensor`: the f32 values reach the device unrounded (Master), and `copy` converts
            // them to the weight's storage (the activation dtype of a default load).
            let src = be.from_host_for(&w, Storage::Master)?;
            drop(w);
            let mut dense = be.zeros_for(out_f * in_f, Storage::Activation)?;
            be.copy(&src, &mut dense)?;
            linears.push(Linear {
                target: t,
                out_features: out_f,
                in_features: in_f,
                base: LinearBase::Dense(dense),
                lora: None,
            });
        }
        let linears: [Linear<B>; 7] = linears.try_into().map_err(|_| {
            GemmaError::Invalid("internal: a layer must have exactly seven linears".into())
        })?;
        Ok(Layer { norms, linears })
    }
}
