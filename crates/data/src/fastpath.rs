//! A faster, exactly equivalent encoder for byte-level BPE tokenizers (GPT-2-style pre-tokenizer,
//! no normalizer, no dropout): the text is split into the pre-tokenizer's pieces by a hand-written
//! version of the GPT-2 regex, and each distinct piece is tokenized once by the `tokenizers`
//! crate and cached. Because such a tokenizer applies BPE to every regex piece independently,
//! concatenating the pieces' ids gives exactly `Tokenizer::encode(text)` — which the tests check
//! on the whole corpus and on random strings.
//!
//! The split handles only characters below U+0250 (ASCII, Latin-1, Latin Extended-A/B), where
//! `char::is_alphabetic` / `is_numeric` / `is_whitespace` coincide with the regex's `\p{L}`,
//! `\p{N}` and `\s`; any other character sends the whole text to the regular path.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{ModelWrapper, Tokenizer};

/// rustc's FxHash: fast, fine for short keys that are not adversarial.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);
impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.0 =
                (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(0x517cc1b727220a95);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}
type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
/// piece text → its token ids.
type Shard = Mutex<FxMap<Box<str>, Box<[u32]>>>;

const SHARDS: usize = 64;
/// Upper bound on cached pieces (memory guard: beyond it, misses are tokenized uncached).
const MAX_ENTRIES: usize = 2_000_000;

pub(crate) struct PieceCache {
    shards: Vec<Shard>,
    entries: AtomicUsize,
}

/// Whether `tok` is a tokenizer the fast path reproduces exactly.
pub(crate) fn eligible(tok: &Tokenizer) -> bool {
    let byte_level = matches!(tok.get_pre_tokenizer(), Some(PreTokenizerWrapper::ByteLevel(b)) if b.use_regex && !b.add_prefix_space);
    let bpe = matches!(tok.get_model(), ModelWrapper::BPE(m) if m.dropout.is_none());
    // Added tokens are split out before pre-tokenization; the caller only sends text without
    // special tokens, so non-special added tokens (which we cannot see cheaply) disqualify.
    let only_special_added = tok.get_added_tokens_decoder().values().all(|t| t.special);
    byte_level && bpe && tok.get_normalizer().is_none() && only_special_added
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

fn class(c: char) -> Option<Class> {
    if (c as u32) >= 0x250 {
        return None;
    }
    Some(if c.is_alphabetic() {
        Class::Letter
    } else if c.is_numeric() {
        Class::Number
    } else if c.is_whitespace() {
        Class::Space
    } else {
        Class::Other
    })
}

/// Byte ranges of the GPT-2 pre-tokenizer pieces of `text`:
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
/// (alternatives tried in order at each position, each greedy). None: a character outside the
/// supported range.
pub(crate) fn gpt2_pieces(text: &str, out: &mut Vec<(usize, usize)>) -> Option<()> {
    out.clear();
    let chars: Vec<(usize, char, Class)> = text
        .char_indices()
        .map(|(i, c)| class(c).map(|k| (i, c, k)))
        .collect::<Option<_>>()?;
    let n = chars.len();
    let at = |k: usize| if k < n { chars[k].0 } else { text.len() };
    let run = |mut k: usize, cls: Class| {
        while k < n && chars[k].2 == cls {
            k += 1;
        }
        k
    };
    let mut i = 0;
    while i < n {
        let (_, c, cls) = chars[i];
        // 's 't 're 've 'm 'll 'd
        if c == '\'' && i + 1 < n {
            let c1 = chars[i + 1].1;
            let c2 = if i + 2 < n { chars[i + 2].1 } else { '\0' };
            let len = match (c1, c2) {
                ('s' | 't' | 'm' | 'd', _) => 2,
                ('r', 'e') | ('v', 'e') | ('l', 'l') => 3,
                _ => 0,
            };
            if len > 0 {
                out.push((at(i), at(i + len)));
                i += len;
                continue;
            }
        }
        // " ?X+" for X = letters, numbers, other (not space/letter/number).
        let (start, lead) = if c == ' ' && i + 1 < n && chars[i + 1].2 != Class::Space {
            (i + 1, true)
        } else {
            (i, false)
        };
        let k = chars[start].2;
        if k != Class::Space && (lead || cls != Class::Space) {
            let end = run(start, k);
            out.push((at(i), at(end)));
            i = end;
            continue;
        }
        // Whitespace: \s+(?!\S) leaves the last space before a non-space; else \s+.
        let end = run(i, Class::Space);
        let end = if end < n && end - i >= 2 {
            end - 1
        } else {
            end
        };
        out.push((at(i), at(end)));
        i = end;
    }
    Some(())
}

impl PieceCache {
    pub(crate) fn new() -> Self {
        PieceCache {
            shards: (0..SHARDS).map(|_| Mutex::new(FxMap::default())).collect(),
            entries: AtomicUsize::new(0),
        }
    }

    /// Appends the ids of `text` (no special tokens inside) to `ids`; false when the text has a
    /// character the splitter does not handle (nothing appended then).
    pub(crate) fn encode_into(
        &self,
        tok: &Tokenizer,
        text: &str,
        ids: &mut Vec<u32>,
    ) -> Result<bool, String> {
        let mut pieces = Vec::with_capacity(text.len() / 4 + 1);
        if gpt2_pieces(text, &mut pieces).is_none() {
            return Ok(false);
        }
        for (s, e) in pieces {
            let piece = &text[s..e];
            let mut h = FxHasher::default();
            h.write(piece.as_bytes());
            let shard = &self.shards[(h.finish() >> 58) as usize % SHARDS];
            {
                // A poisoned shard only means another thread panicked mid-insert; the map is
                // still a valid cache.
                let map = shard.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(v) = map.get(piece) {
                    ids.extend_from_slice(v);
                    continue;
                }
            }
            let enc = tok.encode_fast(piece, false).map_err(|e| e.to_string())?;
            let v = enc.get_ids();
            ids.extend_from_slice(v);
            if self.entries.load(Ordering::Relaxed) < MAX_ENTRIES {
                let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
                if map.insert(piece.into(), v.into()).is_none() {
                    self.entries.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(true)
    }
}
