//! Token selection, as transformers' `generate` does it.
//!
//! First the repetition penalty (transformers' `RepetitionPenaltyLogitsProcessor`,
//! `repetition_penalty` ≠ 1): every id already in the sequence (prompt + generated so far, each id once)
//! has its soft-capped logit divided by p if positive, multiplied by p otherwise. Then the n-gram ban
//! (transformers' `NoRepeatNGramLogitsProcessor`, `no_repeat_ngram_size` = n > 0): every id that would
//! complete an n-gram already present in the sequence (prompt included) gets logit −∞, i.e. for each
//! earlier window of n tokens whose first n − 1 equal the last n − 1 tokens of the sequence, the
//! window's last token is banned. Then greedy when `temperature == 0` (`do_sample=False`, argmax, first
//! index on ties); otherwise logits / temperature, then top-k, then top-p (nucleus), then a draw from a
//! ChaCha8 stream seeded by `seed`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::GenerateOptions;
use crate::error::{GemmaError, Result};

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
