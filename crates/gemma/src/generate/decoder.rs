//! [`Decoder`]: runs the model on a growing sequence, one chunk of tokens at a time, with a KV cache.
//!
//! Every step runs each layer on the new tokens only, through the same layer forward as training and
//! evaluation (`crate::layer::layer_fwd` with `Kv::Cache`): keys and values are appended to the layer's
//! cache and attention runs with TK = cached rows + T, so decoding gives the numbers of recomputing the
//! whole sequence. Then the final norm and the tied head run on the last position only; the host sees
//! only those logits [V] (needed for sampling).

use afinar_kernels::profile::{self, Phase, Role};
use afinar_kernels::{Accum, Backend};

use crate::error::{GemmaError, Result};
use crate::kv_cache::{KvCache, LayerCache};
use crate::layer::{layer_fwd, Ctx, Kv, LayerActs};
use crate::model::Gemma2Model;

/// Runs a model on a growing sequence, one chunk of tokens at a time, keeping a KV cache.
pub struct Decoder<'m, B: Backend> {
    model: &'m Gemma2Model<B>,
    cache: KvCache<B>,
}

impl<'m, B: Backend> Decoder<'m, B> {
    /// An empty decoder (position 0).
    pub fn new(model: &'m Gemma2Model<B>) -> Self {
        Decoder {
            model,
            cache: KvCache::new(&model.config),
        }
    }

    /// The cache (for inspection).
    pub fn cache(&self) -> &KvCache<B> {
        &self.cache
    }

    /// Tokens fed so far.
    pub fn position(&self) -> usize {
        self.cache.position()
    }

    /// Forgets everything (position 0) and frees the cache buffers.
    pub fn reset(&mut self) {
        self.cache.clear();
    }

    /// Feeds `ids` (a prompt chunk or one sampled token) at the next positions and returns the logits
    /// [V] of the last one, after the final soft-cap (what transformers' `generate` scores). On error the
    /// cache is unchanged.
    pub fn feed(&mut self, ids: &[i32]) -> Result<Vec<f32>> {
        let model = self.model;
        let cfg = &model.config;
        let be = &**model.backend();
        let t = ids.len();
        if t == 0 {
            return Err(GemmaError::Invalid(
                "generate: no tokens to feed (empty prompt?)".into(),
            ));
        }
        // Range-checked here, on the host: the embedding op does not read ids back.
        let v = cfg.vocab_size;
        if let Some((i, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id < 0 || id as usize >= v)
        {
            return Err(GemmaError::Invalid(format!(
                "generate: token {i} of the input is id {id}, outside the vocabulary [0, {v})"
            )));
        }
        let p0 = self.cache.position();
        let pos: Vec<i32> = (p0..p0 + t)
            .map(|p| {
                i32::try_from(p).map_err(|_| {
                    GemmaError::Invalid(format!("generate: position {p} does not fit in i32"))
                })
            })
            .collect::<Result<_>>()?;
        let _pass = profile::phase(Phase::Forward);
        let (pos, ids_dev) = {
            let _label = profile::role(Role::Data);
            (be.ids_from_host(&pos)?, be.ids_from_host(ids)?)
        };
        let x = model.embed(&ids_dev, t)?;
        // Each layer's cache becomes [old rows ++ new rows] as the layers run; if any op fails, the
        // step is undone (see `KvCache::step`), so an error leaves the cache unchanged.
        self.cache
            .step(t, |layers| layers_and_head(model, layers, x, &pos, t))
    }
}

/// Runs every layer on x [T,H] (extending each layer's cache by the T new rows), then the final norm
/// and the tied head on the last position. Returns the soft-capped logits [V].
fn layers_and_head<B: Backend>(
    model: &Gemma2Model<B>,
    caches: &mut [LayerCache<B>],
    mut x: B::Buf,
    pos: &B::Ids,
    t: usize,
) -> Result<Vec<f32>> {
    let cfg = &model.config;
    let be = &**model.backend();
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let ctx = Ctx {
        backend: be,
        cfg,
        b: 1,
        t,
        pos,
        seg: None,
        train: false,
        dropout_seed: 0,
        dropout_row_offset: 0,
    };
    let _label = profile::role(Role::LayerOther);
    let mut next = be.zeros(t * h)?;
    // One workspace for all layers: nothing is kept (see `LayerActs`).
    let mut ws = LayerActs::new(&ctx)?;
    for ((li, layer), cache) in model.layers.iter().enumerate().zip(caches) {
        layer_fwd(&ctx, layer, li, &x, Kv::Cache(cache), &mut next, &mut ws)?;
        std::mem::swap(&mut x, &mut next);
    }
    // Final norm and tied head on the last position only.
    let _label = profile::role(Role::LmHead);
    let mut last = be.zeros(h)?;
    be.copy_range(&x, (t - 1) * h, &mut last, 0, h)?;
    let mut xf = be.zeros(h)?;
    let mut r1 = be.zeros(1)?;
    be.rmsnorm_fwd(
        &last,
        &model.norm,
        &mut xf,
        &mut r1,
        1,
        h,
        cfg.rms_norm_eps as f32,
    )?;
    let mut logits = be.zeros(v)?;
    be.matmul_xwt(
        &xf,
        &model.embed_tokens,
        &mut logits,
        1,
        h,
        v,
        Accum::Overwrite,
    )?;
    if let Some(cap) = cfg.final_logit_softcapping {
        be.softcap_fwd(&mut logits, cap as f32)?;
    }
    Ok(be.to_host(&logits)?)
}
