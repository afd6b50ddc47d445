//! Text generation with a KV cache: prefill the prompt, then decode token by token.
//!
//! - `decoder.rs`: [`Decoder`], the model on a growing sequence with its [`KvCache`] (the cache itself
//!   is `crate::kv_cache`; each step runs the same layer forward as training);
//! - `sampling.rs`: [`Sampler`], transformers' logits processors and token selection;
//! - this file: [`GenerateOptions`] and the [`generate`] loop.
//!
//! Sliding-window layers (`layer_types` "sliding_attention", the even layers of Gemma-2): a query sees at
//! most W keys, itself included; their cache keeps only the last W entries, so its memory is bounded by
//! W whatever the generation length.
//!
//! Generation stops after `max_new_tokens`, or when an EOS id or an extra stop id (e.g. Gemma's
//! `<end_of_turn>` = 107) is produced; like transformers, the stop token is included in the output.

use std::time::{Duration, Instant};

mod decoder;
mod sampling;

use afinar_kernels::Backend;

use crate::error::{GemmaError, Result};
use crate::model::Gemma2Model;

pub use crate::kv_cache::KvCache;
pub use decoder::Decoder;
pub use sampling::{apply_repetition_penalty, ban_repeated_ngrams, Sampler};

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

/// The new tokens (prompt excluded), why generation stopped, and how long its two phases took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    pub tokens: Vec<i32>,
    pub stop: StopReason,
    /// The prompt's forward (one pass over every prompt token, filling the KV cache) up to its
    /// logits on the host; it yields the first new token.
    pub prefill: Duration,
    /// Everything after the prefill: one cached forward per further token, and sampling.
    pub decode: Duration,
}

impl Generation {
    /// Prompt tokens per second of the prefill (None when it took no measurable time).
    pub fn prefill_tokens_per_s(&self, prompt_len: usize) -> Option<f64> {
        let s = self.prefill.as_secs_f64();
        (s > 0.0).then(|| prompt_len as f64 / s)
    }

    /// New tokens per second of the decode phase (the first token comes from the prefill, so
    /// `tokens − 1` decode steps; None when there were none).
    pub fn decode_tokens_per_s(&self) -> Option<f64> {
        let s = self.decode.as_secs_f64();
        let steps = self.tokens.len().saturating_sub(1);
        (s > 0.0 && steps > 0).then(|| steps as f64 / s)
    }
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
            prefill: Duration::ZERO,
            decode: Duration::ZERO,
        });
    }
    // `feed` returns the logits on the host, so the device work of each phase is inside its time.
    let t0 = Instant::now();
    let mut logits = dec.feed(prompt)?;
    let prefill = t0.elapsed();
    let t1 = Instant::now();
    sampler.observe(prompt);
    let stop = loop {
        let next = sampler.next(&logits)?;
        tokens.push(next);
        if opts.eos_token_ids.contains(&next) {
            break StopReason::Eos(next);
        }
        if opts.stop_token_ids.contains(&next) {
            break StopReason::StopToken(next);
        }
        if tokens.len() >= opts.max_new_tokens {
            break StopReason::MaxNewTokens;
        }
        logits = dec.feed(&[next])?;
    };
    Ok(Generation {
        tokens,
        stop,
        prefill,
        decode: t1.elapsed(),
    })
}
