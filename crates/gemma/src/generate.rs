//! Text generation with a KV cache: prefill the prompt, then decode token by token.
//!
//! Every decode step runs each layer on the new tokens only. Keys (after RoPE, at their absolute
//! positions) and values are appended to a per-layer cache, and attention runs with the op's TK ≥ T
//! form (`AttnShape::tk` = cache length, the queries are the last T keys), so decoding uses the same
//! `attn_fwd` as training and gives the same numbers as recomputing the whole sequence.
//!
//! Sliding-window layers (`layer_types` "sliding_attention", the even layers of Gemma-2): a query sees at
//! most W keys, itself included. The op masks with `window = W`, and the cache of such a layer keeps only
//! its last W entries (a query at the next position needs the W − 1 before it), so its memory is
//! bounded by W whatever the generation length. Dropping older keys does not change the result: the
//! window is measured in relative key indices and the kept keys are the most recent, contiguous ones.
//!
//! The cache lives on the backend (on a GPU: device memory) and grows without visiting the host. The
//! attention op checks that k and v hold exactly [TK, NKV·D] (no views in the trait), so a step builds
//! one buffer of the TK = L + T rows it attends to with two device-side `copy_range`s, the L cached rows
//! then the T new ones, and that buffer becomes the layer's cache. The copy moves as many bytes as the
//! attention then reads, on the device; the host sees only the final logits [V] (needed for sampling).
//!
//! A layer's cache is a buffer plus a logical row range [start, start + len). Sliding layers trim by
//! moving `start` (no copy): after a step they keep their last W rows, so the next step attends to
//! L ≤ W cached rows + T new ones, exactly the keys the old host cache gave it, and the buffer holds at
//! most W + T rows (W + 1 when decoding). Positions stay right because the op places the T queries at
//! relative key indices TK − T .. TK − 1 and measures the window in relative indices over contiguous
//! keys, while RoPE already encoded each key's absolute position when it was cached.
//!
//! Errors: layer i's new buffer replaces its old one right after its attention (so at most one layer
//! holds two copies at a time), and its first L rows are the old cache. If any op of the step fails, every
//! layer already advanced is cut back to those first L rows by resetting its range (no allocation, so
//! the restore itself cannot fail), and the cache is exactly as before the call.
//!
//! Sampling follows transformers' `generate`. First the repetition penalty (transformers'
//! `RepetitionPenaltyLogitsProcessor`, `repetition_penalty` ≠ 1): every id already in the sequence
//! (prompt + generated so far, each id once) has its soft-capped logit divided by p if positive, multiplied
//! by p otherwise. Then the n-gram ban (transformers' `NoRepeatNGramLogitsProcessor`,
//! `no_repeat_ngram_size` = n > 0): every id that would complete an n-gram already present in the sequence
//! (prompt included) gets logit −∞, i.e. for each earlier window of n tokens whose first n − 1 equal the
//! last n − 1 tokens of the sequence, the window's last token is banned. Then greedy when `temperature == 0` (`do_sample=False`, argmax,
//! first index on ties); otherwise logits / temperature, then top-k, then top-p (nucleus), then a draw
//! from a ChaCha8 stream seeded by `seed`. Generation stops after `max_new_tokens`, or when an EOS id or
//! an extra stop id (e.g. Gemma's `<end_of_turn>` = 107) is produced; like transformers, the stop token is
//! included in the output.

use afinar_kernels::{Accum, AttnShape, Backend, LoraRef};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{GemmaError, Result};
use crate::lora::Target;
use crate::model::Gemma2Model;
use crate::params::{Linear, NormKind};

/// One layer's cache: keys (after RoPE) and values, the rows [start, start + len) of two [rows, NKV·D]
/// row-major backend buffers (None while empty).
struct LayerCache<B: Backend> {
    k: Option<B::Buf>,
    v: Option<B::Buf>,
    /// First cached row of the buffers.
    start: usize,
    /// Cached rows (≤ W on sliding layers between steps).
    len: usize,
    /// Entries kept at most (Some(W) on sliding layers).
    keep: Option<usize>,
}

/// The KV cache of one sequence, held on the model's backend.
pub struct KvCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    /// Absolute position of the next token (= tokens fed so far).
    pos: usize,
}

impl<B: Backend> KvCache<B> {
    /// Tokens fed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Entries held by layer `layer` (≤ W on sliding layers).
    pub fn layer_len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |c| c.len)
    }
}

impl<B: Backend> std::fmt::Debug for KvCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("pos", &self.pos)
            .field(
                "layer_lens",
                &self.layers.iter().map(|c| c.len).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Runs a model on a growing sequence, one chunk of tokens at a time, keeping a KV cache.
pub struct Decoder<'m, B: Backend> {
    model: &'m Gemma2Model<B>,
    cache: KvCache<B>,
}

impl<'m, B: Backend> Decoder<'m, B> {
    /// An empty decoder (position 0).
    pub fn new(model: &'m Gemma2Model<B>) -> Self {
        let cfg = &model.config;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| LayerCache {
                k: None,
                v: None,
                start: 0,
                len: 0,
                keep: cfg.window(l),
            })
            .collect();
        Decoder {
            model,
            cache: KvCache { layers, pos: 0 },
        }
    }

    /// The cache (for inspection).
    pub fn cache(&self) -> &KvCache<B> {
        &self.cache
    }

    /// Tokens fed so far.
    pub fn position(&self) -> usize {
        self.cache.pos
    }

    /// Forgets everything (position 0) and frees the cache buffers.
    pub fn reset(&mut self) {
        for c in &mut self.cache.layers {
            (c.k, c.v, c.start, c.len) = (None, None, 0, 0);
        }
        self.cache.pos = 0;
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
        let h = cfg.hidden_size;
        let p0 = self.cache.pos;
        let pos: Vec<i32> = (p0..p0 + t)
            .map(|p| {
                i32::try_from(p).map_err(|_| {
                    GemmaError::Invalid(format!("generate: position {p} does not fit in i32"))
                })
            })
            .collect::<Result<_>>()?;
        let pos = be.ids_from_host(&pos)?;
        let ids_dev = be.ids_from_host(ids)?;

        // x [T,H] = embedding · sqrt(H).
        let mut x = be.zeros(t * h)?;
        be.embedding_fwd(
            &ids_dev,
            &model.embed_tokens,
            &mut x,
            v,
            h,
            be.round_activation(cfg.embed_scale()),
        )?;
        // Each layer's cache is replaced by [old rows ++ new rows] as the layers run; `advanced` counts
        // the layers already replaced. If any op fails, those layers are cut back to their first
        // `old_len` rows (= the old cache), so an error leaves the cache unchanged.
        let old_len: Vec<usize> = self.cache.layers.iter().map(|c| c.len).collect();
        let mut advanced = 0;
        let result = Self::layers_and_head(model, &mut self.cache, x, &pos, t, &mut advanced);
        match result {
            Ok(logits) => {
                // Sliding layers keep their last W entries (a range change, no copy).
                for c in &mut self.cache.layers {
                    if let Some(w) = c.keep {
                        if c.len > w {
                            c.start += c.len - w;
                            c.len = w;
                        }
                    }
                }
                self.cache.pos = p0 + t;
                Ok(logits)
            }
            Err(e) => {
                for (c, &n) in self.cache.layers.iter_mut().zip(&old_len).take(advanced) {
                    (c.start, c.len) = (0, n);
                }
                Err(e)
            }
        }
    }

    /// Runs every layer on x [T,H] (replacing layer i's cache by [its rows ++ the T new rows] and then
    /// setting `*advanced = i + 1`), then the final norm and the tied head on the last position.
    /// Returns the soft-capped logits [V].
    fn layers_and_head(
        model: &Gemma2Model<B>,
        cache: &mut KvCache<B>,
        mut x: B::Buf,
        pos: &B::Ids,
        t: usize,
        advanced: &mut usize,
    ) -> Result<Vec<f32>> {
        let cfg = &model.config;
        let be = &**model.backend();
        let v = cfg.vocab_size;
        let (h, qd, kd, inter) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        let (nh, nkv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let eps = cfg.rms_norm_eps as f32;
        let theta = cfg.rope_theta as f32;
        let mut rstd = be.zeros(t)?;
        for (li, layer) in model.layers.iter().enumerate() {
            let lin = |tg: Target| layer.linear(tg);
            // Attention block on the new tokens.
            let mut xn = be.zeros(t * h)?;
            be.rmsnorm_fwd(
                &x,
                layer.norm(NormKind::Input),
                &mut xn,
                &mut rstd,
                t,
                h,
                eps,
            )?;
            let mut q = be.zeros(t * qd)?;
            let mut k = be.zeros(t * kd)?;
            let mut vv = be.zeros(t * kd)?;
            linear(be, lin(Target::QProj), &xn, &mut q, t)?;
            linear(be, lin(Target::KProj), &xn, &mut k, t)?;
            linear(be, lin(Target::VProj), &xn, &mut vv, t)?;
            be.rope(&mut q, pos, t, nh, d, theta, false)?;
            be.rope(&mut k, pos, t, nkv, d, theta, false)?;
            // Keys/values = cached rows followed by the new ones, [TK, NKV·D], built on the backend.
            let c = &mut cache.layers[li];
            let tk = c.len + t;
            let append = |old: Option<&B::Buf>, new: &B::Buf| -> Result<B::Buf> {
                let mut buf = be.zeros(tk * kd)?;
                if let Some(old) = old {
                    be.copy_range(old, c.start * kd, &mut buf, 0, c.len * kd)?;
                }
                be.copy_range(new, 0, &mut buf, c.len * kd, t * kd)?;
                Ok(buf)
            };
            let kbuf = append(c.k.as_ref(), &k)?;
            let vbuf = append(c.v.as_ref(), &vv)?;
            let shape = AttnShape {
                b: 1,
                t,
                tk,
                nh,
                nkv,
                d,
                scale: cfg.attn_scale(),
                softcap: cfg.attn_logit_softcapping.map(|c| c as f32),
                window: cfg.window(li),
            };
            let mut ao = be.zeros(t * qd)?;
            let mut lse = be.zeros(nh * t)?;
            be.attn_fwd(&q, &kbuf, &vbuf, None, &mut ao, &mut lse, &shape)?;
            // The old rows are rows [0, len) of the new buffers: they replace the old ones (freed here).
            (c.k, c.v, c.start, c.len) = (Some(kbuf), Some(vbuf), 0, tk);
            *advanced = li + 1;
            let mut o = be.zeros(t * h)?;
            linear(be, lin(Target::OProj), &ao, &mut o, t)?;
            // h1 = x + post_attention_layernorm(o)
            let mut h1 = be.zeros(t * h)?;
            be.rmsnorm_fwd(
                &o,
                layer.norm(NormKind::PostAttention),
                &mut h1,
                &mut rstd,
                t,
                h,
                eps,
            )?;
            be.axpy(1.0, &x, &mut h1)?;
            // MLP block: out = h1 + post_feedforward_layernorm(down(gelu_tanh(gate(xn2))·up(xn2)))
            be.rmsnorm_fwd(
                &h1,
                layer.norm(NormKind::PreFeedforward),
                &mut xn,
                &mut rstd,
                t,
                h,
                eps,
            )?;
            let mut g = be.zeros(t * inter)?;
            let mut u = be.zeros(t * inter)?;
            linear(be, lin(Target::GateProj), &xn, &mut g, t)?;
            linear(be, lin(Target::UpProj), &xn, &mut u, t)?;
            let mut a = be.zeros(t * inter)?;
            be.geglu_fwd(&g, &u, &mut a)?;
            let mut dn = be.zeros(t * h)?;
            linear(be, lin(Target::DownProj), &a, &mut dn, t)?;
            be.rmsnorm_fwd(
                &dn,
                layer.norm(NormKind::PostFeedforward),
                &mut x,
                &mut rstd,
                t,
                h,
                eps,
            )?;
            be.axpy(1.0, &h1, &mut x)?;
        }
        // Final norm and tied head on the last position only.
        let mut last = be.zeros(h)?;
        be.copy_range(&x, (t - 1) * h, &mut last, 0, h)?;
        let mut xf = be.zeros(h)?;
        let mut r1 = be.zeros(1)?;
        be.rmsnorm_fwd(&last, &model.norm, &mut xf, &mut r1, 1, h, eps)?;
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
}

/// y [M,out] = x [M,in]·Wᵀ + LoRA (inference: no dropout).
fn linear<B: Backend>(be: &B, lin: &Linear<B>, x: &B::Buf, y: &mut B::Buf, m: usize) -> Result<()> {
    let lora = lin.lora.as_ref().map(|lo| LoraRef {
        a: &lo.a,
        b: &lo.b,
        r: lo.r,
        scale: lo.scale,
        mask: None,
    });
    be.lora_fwd(
        x,
        lin.weight(),
        lora,
        y,
        None,
        m,
        lin.in_features,
        lin.out_features,
    )?;
    Ok(())
}

/// How to pick tokens and when to stop.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 = greedy (transformers `do_sample=False`); otherwise the softmax temperature.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off). Ties with the k-th logit are kept, as in transformers.
    pub top_k: usize,
    /// Nucleus sampling: keep the most likely tokens whose mass reaches top_p (1 = off).
    pub top_p: f32,
    /// Seed of the sampling stream (same seed, same model, same prompt → same tokens).
    pub seed: u64,
    /// Stop after producing one of these (the config's `eos_token_id`s by default).
    pub eos_token_ids: Vec<i32>,
    /// Extra stop ids, e.g. a chat template's end-of-turn token (Gemma `<end_of_turn>` = 107).
    pub stop_token_ids: Vec<i32>,
    /// transformers' `repetition_penalty` (1 = off, > 1 discourages repeats): applied to the soft-capped
    /// logits of every id already in the prompt or the output, before temperature/top-k/top-p/argmax.
    /// Must be finite and > 0.
    pub repetition_penalty: f32,
    /// transformers' `no_repeat_ngram_size` (0 = off): no n-gram of this size occurs twice in the sequence
    /// (prompt + output). Applied after the repetition penalty, before temperature/top-k/top-p/argmax.
    pub no_repeat_ngram_size: usize,
}

impl GenerateOptions {
    /// Greedy decoding of up to `max_new_tokens`, no stop ids.
    pub fn greedy(max_new_tokens: usize) -> Self {
        GenerateOptions {
            max_new_tokens,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            eos_token_ids: Vec::new(),
            stop_token_ids: Vec::new(),
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
        }
    }

    /// Greedy decoding that stops on the model's EOS ids (config.json `eos_token_id`).
    pub fn greedy_for<B: Backend>(model: &Gemma2Model<B>, max_new_tokens: usize) -> Self {
        let eos = model
            .config
            .eos_token_ids
            .iter()
            .filter_map(|&e| i32::try_from(e).ok())
            .collect();
        GenerateOptions {
            eos_token_ids: eos,
            ..Self::greedy(max_new_tokens)
        }
    }

    fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(GemmaError::Invalid(format!(
                "generate: temperature must be finite and ≥ 0, found {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(GemmaError::Invalid(format!(
                "generate: top_p must be in (0, 1], found {}",
                self.top_p
            )));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(GemmaError::Invalid(format!(
                "generate: repetition_penalty must be finite and > 0 (1 = off), found {}",
                self.repetition_penalty
            )));
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An EOS id was produced (it is the last output token).
    Eos(i32),
    /// An extra stop id was produced (it is the last output token).
    StopToken(i32),
    /// `max_new_tokens` were produced.
    MaxNewTokens,
}

/// The new tokens (prompt excluded) and why generation stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    pub tokens: Vec<i32>,
    pub stop: StopReason,
}

/// Picks the next token from logits according to `GenerateOptions`.
#[derive(Debug)]
pub struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    repetition_penalty: f32,
    /// seen[id] = id occurs in the sequence so far (prompt + sampled tokens); only kept when the
    /// repetition penalty is on. Grown on demand, so it needs no vocabulary size up front.
    seen: Vec<bool>,
    /// n of the n-gram ban (0 = off).
    no_repeat_ngram_size: usize,
    /// The whole sequence so far (prompt + sampled tokens); only kept when the n-gram ban is on.
    history: Vec<i32>,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(opts: &GenerateOptions) -> Result<Self> {
        opts.validate()?;
        Ok(Sampler {
            temperature: opts.temperature,
            top_k: opts.top_k,
            top_p: opts.top_p,
            repetition_penalty: opts.repetition_penalty,
            seen: Vec::new(),
            no_repeat_ngram_size: opts.no_repeat_ngram_size,
            history: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(opts.seed),
        })
    }

    /// Records ids that are now part of the sequence (the prompt, then each produced token), for the
    /// repetition penalty and the n-gram ban. Negative ids are never penalized (they cannot index logits).
    pub fn observe(&mut self, ids: &[i32]) {
        if self.no_repeat_ngram_size > 0 {
            self.history.extend_from_slice(ids);
        }
        if self.repetition_penalty == 1.0 {
            return;
        }
        for &id in ids {
            if let Ok(i) = usize::try_from(id) {
                if i >= self.seen.len() {
                    self.seen.resize(i + 1, false);
                }
                self.seen[i] = true;
            }
        }
    }

    /// The next token id for logits [V], after the repetition penalty and the n-gram ban over the ids
    /// observed so far (transformers' processor order). The chosen id is observed too (it becomes part of
    /// the sequence).
    pub fn next(&mut self, logits: &[f32]) -> Result<i32> {
        let id = if self.repetition_penalty == 1.0 && self.no_repeat_ngram_size == 0 {
            self.sample(logits)?
        } else {
            let mut l = logits.to_vec();
            if self.repetition_penalty != 1.0 {
                apply_repetition_penalty(&mut l, &self.seen, self.repetition_penalty);
            }
            if self.no_repeat_ngram_size > 0 {
                ban_repeated_ngrams(&mut l, &self.history, self.no_repeat_ngram_size);
            }
            self.sample(&l)?
        };
        self.observe(&[id]);
        Ok(id)
    }

    /// The next token id for logits [V] (no repetition penalty; see [`Sampler::next`]).
    pub fn sample(&mut self, logits: &[f32]) -> Result<i32> {
        if logits.is_empty() {
            return Err(GemmaError::Invalid("generate: empty logits".into()));
        }
        if let Some(i) = logits.iter().position(|x| x.is_nan()) {
            return Err(GemmaError::Invalid(format!("generate: logit {i} is NaN")));
        }
        if self.temperature == 0.0 {
            return Ok(argmax(logits) as i32);
        }
        // Scores in f64: logits / temperature.
        let t = self.temperature as f64;
        let scores: Vec<f64> = logits.iter().map(|&x| x as f64 / t).collect();
        let mut keep = vec![true; scores.len()];
        if self.top_k > 0 && self.top_k < scores.len() {
            // transformers TopK: remove scores < the k-th largest (ties with it stay).
            let mut sorted = scores.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[self.top_k - 1];
            for (k, &s) in keep.iter_mut().zip(&scores) {
                *k = s >= kth;
            }
        }
        if self.top_p < 1.0 {
            // transformers TopP: sort ascending, cumulative softmax over the kept tokens, remove those with
            // cumulative mass ≤ 1 − top_p; the most likely token always stays.
            let mut order: Vec<usize> = (0..scores.len()).filter(|&i| keep[i]).collect();
            order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(b.cmp(&a)));
            let probs = softmax(&order.iter().map(|&i| scores[i]).collect::<Vec<_>>());
            let mut cum = 0.0;
            let last = order.len() - 1;
            for (j, &i) in order.iter().enumerate() {
                cum += probs[j];
                if cum <= 1.0 - self.top_p as f64 && j != last {
                    keep[i] = false;
                }
            }
        }
        // Banned (−∞) tokens get probability 0; with every token banned there is nothing to draw from
        // (transformers' multinomial fails on the NaN probabilities there).
        let idx: Vec<usize> = (0..scores.len())
            .filter(|&i| keep[i] && scores[i] > f64::NEG_INFINITY)
            .collect();
        if idx.is_empty() {
            return Err(GemmaError::Invalid(
                "generate: every token has logit −inf (all banned by no_repeat_ngram_size?); \
                 nothing to sample"
                    .into(),
            ));
        }
        let probs = softmax(&idx.iter().map(|&i| scores[i]).collect::<Vec<_>>());
        let u: f64 = self.rng.random::<f64>();
        let mut cum = 0.0;
        for (j, &i) in idx.iter().enumerate() {
            cum += probs[j];
            if u < cum {
                return Ok(i as i32);
            }
        }
        // Rounding left u ≥ Σp: the last kept token.
        Ok(*idx.last().unwrap_or(&0) as i32)
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor` on logits [V]: for each id with `seen[id]` (each id
/// once, however often it occurred), logit / p if logit > 0, else logit · p. Ids ≥ `seen.len()` were
/// never seen; seen ids ≥ V are ignored.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[bool], p: f32) {
    for (x, _) in logits.iter_mut().zip(seen).filter(|(_, &s)| s) {
        *x = if *x > 0.0 { *x / p } else { *x * p };
    }
}

/// transformers' `NoRepeatNGramLogitsProcessor` on logits [V] given the sequence so far `seq` (prompt +
/// generated): with n-1 = the length of the suffix, every window `seq[j..j+n]` (j + n ≤ len) whose first
/// n − 1 ids equal the last n − 1 ids of `seq` bans its last id (logit −∞). Nothing is banned while
/// `seq` is shorter than n. With n = 1 the suffix is empty and every id of `seq` is banned. Ids outside
/// [0, V) are skipped (they cannot be produced). O(len · n) per call.
pub fn ban_repeated_ngrams(logits: &mut [f32], seq: &[i32], n: usize) {
    let len = seq.len();
    if n == 0 || len < n {
        return;
    }
    let suffix = &seq[len + 1 - n..];
    for w in seq.windows(n) {
        if w[..n - 1] == *suffix {
            if let Some(x) = usize::try_from(w[n - 1])
                .ok()
                .and_then(|id| logits.get_mut(id))
            {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// Index of the largest value (the first one on ties, like torch.argmax on CPU).
fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Numerically stable softmax in f64 (−inf scores get probability 0).
fn softmax(s: &[f64]) -> Vec<f64> {
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|&x| (x - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// Generates up to `opts.max_new_tokens` tokens after `prompt` (prefill, then one decode step per token).
pub fn generate<B: Backend>(
    model: &Gemma2Model<B>,
    prompt: &[i32],
    opts: &GenerateOptions,
) -> Result<Generation> {
    let mut sampler = Sampler::new(opts)?;
    if prompt.is_empty() {
        return Err(GemmaError::Invalid(
            "generate: the prompt is empty (it needs at least a BOS token)".into(),
        ));
    }
    // Positions past max_position_embeddings are outside what the model was trained for, and a huge
    // prompt or max_new_tokens would otherwise run (quadratic prefill) or allocate without bound.
    let max_pos = model.config.max_position_embeddings;
    match prompt.len().checked_add(opts.max_new_tokens) {
        Some(total) if total <= max_pos => {}
        _ => {
            return Err(GemmaError::Invalid(format!(
                "generate: the prompt ({} tokens) + max_new_tokens ({}) exceeds the model's \
                 max_position_embeddings = {max_pos}",
                prompt.len(),
                opts.max_new_tokens
            )))
        }
    }
    let mut dec = Decoder::new(model);
    let mut tokens = Vec::with_capacity(opts.max_new_tokens);
    if opts.max_new_tokens == 0 {
        return Ok(Generation {
            tokens,
            stop: StopReason::MaxNewTokens,
        });
    }
    let mut logits = dec.feed(prompt)?;
    sampler.observe(prompt);
    loop {
        let next = sampler.next(&logits)?;
        tokens.push(next);
        if opts.eos_token_ids.contains(&next) {
            return Ok(Generation {
                tokens,
                stop: StopReason::Eos(next),
            });
        }
        if opts.stop_token_ids.contains(&next) {
            return Ok(Generation {
                tokens,
                stop: StopReason::StopToken(next),
            });
        }
        if tokens.len() >= opts.max_new_tokens {
            return Ok(Generation {
                tokens,
                stop: StopReason::MaxNewTokens,
            });
        }
        logits = dec.feed(&[next])?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use afinar_kernels::Tolerance;

    fn opts(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> GenerateOptions {
        GenerateOptions {
            temperature,
            top_k,
            top_p,
            seed,
            ..GenerateOptions::greedy(1)
        }
    }

    #[test]
    fn greedy_is_argmax_first_on_ties() {
        let mut s = Sampler::new(&opts(0.0, 0, 1.0, 0)).unwrap();
        assert_eq!(s.sample(&[0.0, 3.0, 3.0, -1.0]).unwrap(), 1);
        assert!(s
            .sample(&[0.0, f32::NAN])
            .unwrap_err()
            .to_string()
            .contains("NaN"));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [2.0f32, 1.0, 0.5, 3.0, -1.0];
        // top_k = 2 → only ids 3 and 0 can come out.
        let mut s = Sampler::new(&opts(1.0, 2, 1.0, 7)).unwrap();
        let mut seen = [0usize; 5];
        for _ in 0..400 {
            seen[s.sample(&logits).unwrap() as usize] += 1;
        }
        assert_eq!(seen[1] + seen[2] + seen[4], 0, "{seen:?}");
        assert!(seen[0] > 0 && seen[3] > 0, "{seen:?}");
        // top_p small → only the most likely token.
        let mut s = Sampler::new(&opts(1.0, 0, 0.01, 7)).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&logits).unwrap(), 3);
        }
        // probs: id3 0.62, id0 0.23, id1 0.08, id2 0.05, id4 0.01. top_p = 0.7 removes the ascending prefix
        // with cumulative mass ≤ 0.3 (ids 4, 2, 1: 0.15) and keeps {0, 3}.
        let mut s = Sampler::new(&opts(1.0, 0, 0.7, 3)).unwrap();
        let mut seen = [0usize; 5];
        for _ in 0..400 {
            seen[s.sample(&logits).unwrap() as usize] += 1;
        }
        assert_eq!(seen[1] + seen[2] + seen[4], 0, "{seen:?}");
        assert!(seen[0] > 0 && seen[3] > 0, "{seen:?}");
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37 % 11) as f32) * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(&opts(1.0, 0, 1.0, seed)).unwrap();
            (0..30)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(11), draw(11));
        assert_ne!(draw(11), draw(12));
    }

    #[test]
    fn repetition_penalty_matches_hand_computed_values() {
        // Ids 0, 2, 3 seen (3 twice: still penalized once); ids 1 and 4 untouched.
        let mut s = Sampler::new(&GenerateOptions {
            repetition_penalty: 2.0,
            ..GenerateOptions::greedy(1)
        })
        .unwrap();
        s.observe(&[3, 0, 3, 2, 3]);
        let mut l = vec![4.0f32, 1.5, -1.0, 3.0, 0.0];
        apply_repetition_penalty(&mut l, &s.seen, 2.0);
        // 4/2, untouched, −1·2, 3/2, untouched.
        Tolerance::F32.assert_close(
            "penalized",
            l.iter().copied(),
            [2.0f32, 1.5, -2.0, 1.5, 0.0],
        );
        // Greedy picks from the penalized logits: raw argmax is id 0 (4.0), penalized it is 2.0 > 1.5.
        assert_eq!(s.next(&[4.0, 1.5, -1.0, 3.0, 0.0]).unwrap(), 0);
        // A fresh sampler with p = 1.3 and id 3 seen: 3.0 → 2.3077 vs id 1 = 2.5 → id 1 wins.
        let mut s = Sampler::new(&GenerateOptions {
            repetition_penalty: 1.3,
            ..GenerateOptions::greedy(1)
        })
        .unwrap();
        s.observe(&[3]);
        assert_eq!(s.next(&[0.0, 2.5, -5.0, 3.0]).unwrap(), 1);
        // Now 1 and 3 are seen: 2.5/1.3 = 1.923, 3/1.3 = 2.308; ids 0 and 2 (−5) were not seen.
        let mut l = vec![0.0f32, 2.5, -5.0, 3.0];
        apply_repetition_penalty(&mut l, &s.seen, 1.3);
        Tolerance::F32.assert_close(
            "penalized 1.3",
            l.iter().copied(),
            [0.0f32, 2.5 / 1.3, -5.0, 3.0 / 1.3],
        );
        // p < 1 rewards repeats: a negative seen logit shrinks toward 0.
        let mut l = vec![-2.0f32, -1.0];
        apply_repetition_penalty(&mut l, &[true], 0.5);
        assert_eq!(l, vec![-1.0, -1.0]);
    }

    #[test]
    fn repetition_penalty_one_is_off() {
        let logits = [0.5f32, 3.0, 3.0, -1.0, 2.9];
        let mut s = Sampler::new(&GenerateOptions::greedy(1)).unwrap();
        s.observe(&[1, 2]);
        assert!(s.seen.is_empty(), "p = 1 keeps no state");
        assert_eq!(s.next(&logits).unwrap(), 1);
    }

    #[test]
    fn ngram_ban_matches_hand_computed_windows() {
        let inf = f32::NEG_INFINITY;
        // n = 2, sequence 1 2 3 1 2 1: suffix [1]; the windows starting with 1 are (1,2), (1,2) → ban 2.
        let mut l = vec![0.5f32; 5];
        ban_repeated_ngrams(&mut l, &[1, 2, 3, 1, 2, 1], 2);
        assert_eq!(l, vec![0.5, 0.5, inf, 0.5, 0.5]);
        // n = 3, sequence 4 0 3 4 0 2 4 0: suffix [4, 0]; windows (4,0,3), (4,0,2) → ban 3 and 2. The
        // suffix itself has no successor yet, so nothing else.
        let mut l = vec![1.0f32; 6];
        ban_repeated_ngrams(&mut l, &[4, 0, 3, 4, 0, 2, 4, 0], 3);
        assert_eq!(l, vec![1.0, 1.0, inf, inf, 1.0, 1.0]);
        // n = 1: every id of the sequence; ids outside [0, V) are skipped.
        let mut l = vec![1.0f32; 4];
        ban_repeated_ngrams(&mut l, &[3, 0, 9, -1, 3], 1);
        assert_eq!(l, vec![inf, 1.0, 1.0, inf]);
        // Shorter than n, or n = 0: nothing.
        let mut l = vec![1.0f32; 3];
        ban_repeated_ngrams(&mut l, &[1, 1], 3);
        ban_repeated_ngrams(&mut l, &[1, 1, 1], 0);
        assert_eq!(l, vec![1.0; 3]);
        // A run of one id: with n = 2 the last window (1,1) matches its own prefix → 1 is banned.
        let mut l = vec![1.0f32; 3];
        ban_repeated_ngrams(&mut l, &[0, 1, 1], 2);
        assert_eq!(l, vec![1.0, inf, 1.0]);
    }

    #[test]
    fn sampler_applies_penalty_then_ngram_ban() {
        // Prompt 2 0 2; n = 2 bans 0 (the window (2,0)). Greedy would pick 0 (5.0), then 1 (4.0).
        let mut s = Sampler::new(&GenerateOptions {
            no_repeat_ngram_size: 2,
            ..GenerateOptions::greedy(1)
        })
        .unwrap();
        s.observe(&[2, 0, 2]);
        assert_eq!(s.next(&[5.0, 4.0, 1.0]).unwrap(), 1);
        // Sequence 2 0 2 1: suffix [1] has no earlier window → nothing banned, 0 wins again.
        assert_eq!(s.next(&[5.0, 4.0, 1.0]).unwrap(), 0);
        // With the penalty 2 on top: seen {0, 1, 2}, logits halved, then (2,0) banned → 1 (2.0 > 1.5).
        let mut s = Sampler::new(&GenerateOptions {
            no_repeat_ngram_size: 2,
            repetition_penalty: 2.0,
            ..GenerateOptions::greedy(1)
        })
        .unwrap();
        s.observe(&[2, 0, 1, 2]);
        assert_eq!(s.next(&[5.0, 4.0, 3.0]).unwrap(), 1);
        // Sampling never draws a banned id (ids 0 and 2 are 9 nats more likely but banned), and fails
        // cleanly when every id is banned.
        for seed in 0..20 {
            let mut s = Sampler::new(&GenerateOptions {
                no_repeat_ngram_size: 1,
                temperature: 1.0,
                seed,
                ..GenerateOptions::greedy(1)
            })
            .unwrap();
            s.observe(&[0, 2]);
            let id = s.next(&[9.0, 0.0, 9.0, 0.0]).unwrap();
            assert!(id == 1 || id == 3, "{id}");
        }
        let mut s = Sampler::new(&GenerateOptions {
            no_repeat_ngram_size: 1,
            temperature: 1.0,
            ..GenerateOptions::greedy(1)
        })
        .unwrap();
        s.observe(&[0, 1]);
        let err = s.next(&[1.0, 2.0]).unwrap_err();
        assert!(err.to_string().contains("no_repeat_ngram_size"), "{err}");
    }

    #[test]
    fn bad_options_are_errors() {
        for p in [0.0f32, -1.3, f32::NAN, f32::INFINITY] {
            let err = Sampler::new(&GenerateOptions {
                repetition_penalty: p,
                ..GenerateOptions::greedy(1)
            })
            .unwrap_err();
            assert!(matches!(err, GemmaError::Invalid(_)), "{err:?}");
            assert!(err.to_string().contains("repetition_penalty"), "{err}");
        }
        assert!(Sampler::new(&opts(-1.0, 0, 1.0, 0))
            .unwrap_err()
            .to_string()
            .contains("temperature"));
        assert!(Sampler::new(&opts(1.0, 0, 0.0, 0))
            .unwrap_err()
            .to_string()
            .contains("top_p"));
        assert!(Sampler::new(&opts(f32::NAN, 0, 1.0, 0)).is_err());
    }
}
