//! Layer-streamed forwards: the model's embedding and final norm, with decoder layers that exist one
//! at a time (built by a closure, run over every batch's hidden state, dropped before the next). The
//! merged logits of merge fidelity (`merged.rs`: layers merged from this model's) and the dense base's
//! eval loss of the NF4 cost ([`Gemma2Model::streamed_base_loss`]: layers read from the checkpoint)
//! use it, so neither needs a whole dense copy of the model.

use std::path::Path;
use std::sync::Arc;

use afinar_kernels::profile::{self, Phase, Role};
use afinar_kernels::Backend;

use crate::batch::{Batch, DeviceBatch};
use crate::config::Gemma2Config;
use crate::error::{GemmaError, Result};
use crate::layer::{layer_fwd, Kv, LayerActs};
use crate::params::Layer;
use crate::safetensors_io::TensorStore;

use super::load::{layer_plan, store_layer, store_tensor};
use super::stream::with_stream;
use super::Gemma2Model;

/// Batches whose hidden states [B·T, H] [`Gemma2Model::streamed_base_loss`] keeps at once: the layers
/// are read from the checkpoint once per group of this many batches.
pub const STREAM_GROUP_BATCHES: usize = 16;

impl<B: Backend> Gemma2Model<B> {
    /// Embeds every batch, runs `n_layers` layers over all of them, each built by `layer_at(li)` just
    /// before it runs and dropped right after, and returns every batch's final hidden state after the
    /// final norm [B·T, H]. The per-layer math is `final_hidden`'s (same `layer_fwd`, inference mode,
    /// no dropout), so with the same layers the result has the same bits.
    pub(super) fn streamed_final_hidden(
        &self,
        batches: &[Batch],
        devs: &[DeviceBatch<B>],
        n_layers: usize,
        mut layer_at: impl FnMut(usize) -> Result<Layer<B>>,
    ) -> Result<Vec<B::Buf>> {
        let be = &*self.backend;
        let h = self.config.hidden_size;
        let pass = profile::phase(Phase::Forward);
        let label = profile::role(Role::LayerOther);
        // Every batch's residual stream [B·T, H], advanced one layer at a time.
        let mut xs = batches
            .iter()
            .zip(devs)
            .map(|(b, d)| self.embed(&d.ids, b.tokens()))
            .collect::<Result<Vec<_>>>()?;
        for li in 0..n_layers {
            let layer = layer_at(li)?;
            for ((batch, dev), x) in batches.iter().zip(devs).zip(xs.iter_mut()) {
                let ctx = self.ctx(batch, dev, false);
                let mut ws = LayerActs::new(&ctx)?;
                let mut next = be.zeros(batch.tokens() * h)?;
                layer_fwd(&ctx, &layer, li, x, Kv::Chunk, &mut next, &mut ws)?;
                *x = next;
            }
            // `layer` is dropped here, before the next one is built.
        }
        drop(label);
        drop(pass);
        xs.iter()
            .zip(batches)
            .map(|(x, b)| {
                let n = b.tokens();
                let mut xf = be.zeros(n * h)?;
                self.final_norm(x, &mut xf, n)?;
                Ok(xf)
            })
            .collect()
    }

    /// (Σ cross-entropy, scored count) of each batch under the dense model in `dir`, equal to
    /// `Gemma2Model::load(backend, dir, &LoadOptions::default())?.loss(batch)` for each batch (the
    /// same tensors in the same storage through the same kernels: bit-identical on the CPU) without
    /// that model: the embedding and final norm are loaded, then, for each group of
    /// [`STREAM_GROUP_BATCHES`] batches, every decoder layer is read from the checkpoint, run over
    /// the group's hidden states and dropped. Peak memory: the embedding, one dense layer, one
    /// group's hidden states and one batch's layer pass and LM head, instead of the whole dense model
    /// (the NF4 cost's dense eval loss at Gemma-2-9B: ≈ 2.5 GiB instead of 17.2 GiB in bf16).
    /// Pre-quantized bitsandbytes linears are read as NF4, as `load` reads them.
    pub fn streamed_base_loss(
        backend: Arc<B>,
        dir: impl AsRef<Path>,
        batches: &[Batch],
    ) -> Result<Vec<(f64, usize)>> {
        let dir = dir.as_ref();
        let config = Gemma2Config::from_file(crate::config::config_path(dir))?;
        let store = TensorStore::open_dir(dir)?;
        let (v, h, nl) = (
            config.vocab_size,
            config.hidden_size,
            config.num_hidden_layers,
        );
        const EMB: &str = "model.embed_tokens.weight";
        const NORM: &str = "model.norm.weight";
        let ends = [EMB.to_string(), NORM.to_string()];
        let (embed_tokens, norm) = with_stream(Some(&store), &ends, 0, false, |st| {
            Ok::<_, GemmaError>((
                store_tensor(&*backend, &store, EMB, &[v, h], st)?,
                store_tensor(&*backend, &store, NORM, &[h], st)?,
            ))
        })?;
        // The model without its layers: the embedding (also the tied head) and the final norm.
        let shell = Gemma2Model {
            backend,
            config,
            embed_tokens,
            layers: Vec::new(),
            norm,
            lora: None,
            full_finetune: false,
            checkpointing: false,
            train_ws: Default::default(),
        };
        let be = &*shell.backend;
        let plan: Vec<String> = (0..nl).flat_map(layer_plan).collect();
        let mut out = Vec::with_capacity(batches.len());
        for group in batches.chunks(STREAM_GROUP_BATCHES) {
            let devs = group
                .iter()
                .map(|b| shell.upload(b))
                .collect::<Result<Vec<_>>>()?;
            let xfs = with_stream(Some(&store), &plan, 0, false, |st| {
                shell.streamed_final_hidden(group, &devs, nl, |li| {
                    store_layer(be, &shell.config, &store, li, st)
                })
            })?;
            for ((b, dev), xf) in group.iter().zip(&devs).zip(&xfs) {
                out.push(shell.head_loss(xf, dev, b.tokens())?);
            }
        }
        Ok(out)
    }
}
