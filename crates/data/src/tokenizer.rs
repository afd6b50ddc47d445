//! The model's tokenizer: `tokenizer.json` (HF `tokenizers`) plus the special tokens and chat
//! template of `tokenizer_config.json`.
//!
//! Text is always encoded with `add_special_tokens = false`: the post-processor never adds a BOS,
//! so the templates decide where the single BOS goes (see `encode`). Special-token strings that
//! appear in the text ARE recognised as special tokens (as transformers does when it tokenizes a
//! rendered chat template); for that reason record content that contains a special-token string is
//! rejected at validation time (`find_special`) instead of being silently turned into control tokens.

use std::path::{Path, PathBuf};

use aho_corasick::AhoCorasick;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{DataError, Result};

/// A special token: its text and id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialToken {
    pub text: String,
    pub id: u32,
}

pub struct TextTokenizer {
    tok: Tokenizer,
    path: PathBuf,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    pad: Option<SpecialToken>,
    unk: Option<SpecialToken>,
    add_bos: bool,
    chat_template: Option<String>,
    /// Every added token flagged `special`, longest first; matched in record content to reject it.
    specials: Vec<String>,
    special_ids: std::collections::HashSet<u32>,
    special_matcher: Option<AhoCorasick>,
    /// Cached piece-wise encoder (byte-level BPE tokenizers only; see `fastpath`).
    fast: Option<crate::fastpath::PieceCache>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .finish()
    }
}

/// A token entry of tokenizer_config.json: a string, or an AddedToken object `{"content": ...}`.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and, when given, `tokenizer_config.json`.
    pub fn from_files(tokenizer_json: &Path, config: Option<&Path>) -> Result<Self> {
        let bytes = std::fs::read(tokenizer_json).map_err(|e| DataError::io(tokenizer_json, e))?;
        let bad = |message: String| DataError::Tokenizer {
            path: tokenizer_json.to_path_buf(),
            message,
        };
        // tokenizers 0.23 panics (`expect("Helper")` in its decoder deserializer) instead of
        // returning an error when the JSON inside `"decoder"` is malformed, e.g. in a truncated or
        // hand-edited file (found by fuzzing): the syntax is checked first, here, and any other
        // panic of the library while reading the file becomes an error too.
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
            .map_err(|e| bad(format!("malformed JSON: {e}")))?;
        let tok = std::panic::catch_unwind(|| Tokenizer::from_bytes(&bytes))
            .map_err(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                bad(format!("the tokenizers library failed reading it: {what}"))
            })?
            .map_err(|e| bad(e.to_string()))?;
        let cfg = match config {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| DataError::io(p, e))?;
                let v: Value =
                    serde_json::from_str(&text).map_err(|e| DataError::TokenizerConfig {
                        path: p.to_path_buf(),
                        key: "-".into(),
                        problem: format!("malformed JSON: {e}"),
                    })?;
                Some((p.to_path_buf(), v))
            }
            None => None,
        };
        Self::from_parts(
            tok,
            tokenizer_json.to_path_buf(),
            cfg.as_ref().map(|(p, v)| (p.as_path(), v)),
        )
    }

    /// `path` is a model directory (see [`Self::from_model_dir`]) or a tokenizer.json file, in
    /// which case a `tokenizer_config.json` next to it is used when present (the CLI's
    /// `--tokenizer` / `--model`).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Self::from_model_dir(path);
        }
        let cfg = path.with_file_name("tokenizer_config.json");
        Self::from_files(path, cfg.exists().then_some(cfg.as_path()))
    }

    /// Loads `DIR/tokenizer.json` and `DIR/tokenizer_config.json` (the latter when present).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let cfg = dir.join("tokenizer_config.json");
        Self::from_files(
            &dir.join("tokenizer.json"),
            cfg.exists().then_some(cfg.as_path()),
        )
    }

    /// Builds from an in-memory tokenizer and an optional parsed tokenizer_config.json
    /// (`config.0` names the file in error messages).
    ///
    /// Without a config, the special tokens are guessed from the vocabulary: BOS `<bos>`, `<s>` or
    /// `<|begin_of_text|>`; EOS `<eos>`, `</s>` or `<|end_of_text|>`; PAD `<pad>`; UNK `<unk>`.
    pub fn from_parts(
        tok: Tokenizer,
        path: PathBuf,
        config: Option<(&Path, &Value)>,
    ) -> Result<Self> {
        let lookup = |key: &str, text: &str, cfg_path: &Path| -> Result<SpecialToken> {
            tok.token_to_id(text)
                .map(|id| SpecialToken {
                    text: text.to_string(),
                    id,
                })
                .ok_or_else(|| DataError::TokenizerConfig {
                    path: cfg_path.to_path_buf(),
                    key: key.to_string(),
                    problem: format!(
                        "token `{text}` is not in the vocabulary of {}",
                        path.display()
                    ),
                })
        };
        let guess = |cands: &[&str]| -> Option<SpecialToken> {
            cands.iter().find_map(|c| {
                tok.token_to_id(c).map(|id| SpecialToken {
                    text: c.to_string(),
                    id,
                })
            })
        };
        let (bos, eos, pad, unk, add_bos, chat_template) = match config {
            Some((cp, v)) => {
                let get = |key: &str| -> Result<Option<SpecialToken>> {
                    match v.get(key) {
                        None | Some(Value::Null) => Ok(None),
                        Some(t) => match token_text(t) {
                            Some(s) => lookup(key, &s, cp).map(Some),
                            None => Err(DataError::TokenizerConfig {
                                path: cp.to_path_buf(),
                                key: key.to_string(),
                                problem: "expected a string or an object with `content`".into(),
                            }),
                        },
                    }
                };
                let add_bos = match v.get("add_bos_token") {
                    None | Some(Value::Null) => true,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        return Err(DataError::TokenizerConfig {
                            path: cp.to_path_buf(),
                            key: "add_bos_token".into(),
                            problem: "expected a boolean".into(),
                        })
                    }
                };
                let chat_template = match v.get("chat_template") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    // A list of named templates: use "default" (what transformers picks).
                    Some(Value::Array(list)) => list
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str())
                        .map(str::to_string),
                    Some(_) => {
                        return Err(DataError::TokenizerConfig {
                            path: cp.to_path_buf(),
                            key: "chat_template".into(),
                            problem: "expected a string or a list of {name, template}".into(),
                        })
                    }
                };
                (
                    get("bos_token")?,
                    get("eos_token")?,
                    get("pad_token")?,
                    get("unk_token")?,
                    add_bos,
                    chat_template,
                )
            }
            None => (
                guess(&["<bos>", "<s>", "<|begin_of_text|>"]),
                guess(&["<eos>", "</s>", "<|end_of_text|>"]),
                guess(&["<pad>"]),
                guess(&["<unk>"]),
                true,
                None,
            ),
        };
        let added = tok.get_added_tokens_decoder();
        let special_ids = added
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        let mut specials: Vec<String> = added
            .into_values()
            .filter(|t| t.special)
            .map(|t| t.content)
            .collect();
        specials.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        specials.dedup();
        let special_matcher = if specials.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::new(&specials).map_err(|e| DataError::Tokenizer {
                    path: path.clone(),
                    message: e.to_string(),
                })?,
            )
        };
        let fast = crate::fastpath::eligible(&tok).then(crate::fastpath::PieceCache::new);
        Ok(TextTokenizer {
            tok,
            path,
            bos,
            eos,
            pad,
            unk,
            add_bos,
            chat_template,
            specials,
            special_ids,
            special_matcher,
            fast,
        })
    }

    /// Token ids of `text`, no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(fast) = &self.fast {
            if self.find_special(text).is_none() {
                let mut ids = Vec::with_capacity(text.len() / 3 + 1);
                let done = fast
                    .encode_into(&self.tok, text, &mut ids)
                    .map_err(|message| DataError::Tokenizer {
                        path: self.path.clone(),
                        message,
                    })?;
                if done {
                    return Ok(ids);
                }
            }
        }
        self.encode_uncached(text)
    }

    /// Token ids of `text` straight from the `tokenizers` crate (no piece cache).
    pub fn encode_uncached(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        self.tok
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| DataError::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }

    /// Text of `ids`, special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tok
            .decode(ids, false)
            .map_err(|e| DataError::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.tok.token_to_id(text)
    }
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tok.id_to_token(id)
    }
    /// Number of ids, added tokens included (the embedding rows a model needs at least).
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }
    pub fn bos(&self) -> Option<&SpecialToken> {
        self.bos.as_ref()
    }
    pub fn eos(&self) -> Option<&SpecialToken> {
        self.eos.as_ref()
    }
    pub fn pad(&self) -> Option<&SpecialToken> {
        self.pad.as_ref()
    }
    pub fn unk(&self) -> Option<&SpecialToken> {
        self.unk.as_ref()
    }
    /// Whether sequences start with BOS (tokenizer_config `add_bos_token`, default true when a BOS exists).
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }
    /// The id used to pad batches: PAD, else EOS, else 0.
    pub fn pad_id(&self) -> u32 {
        self.pad
            .as_ref()
            .or(self.eos.as_ref())
            .map(|t| t.id)
            .unwrap_or(0)
    }
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The special-token strings (added tokens flagged special), longest first.
    pub fn special_tokens(&self) -> &[String] {
        &self.specials
    }
    /// Whether `id` is one of the special added tokens.
    pub fn is_special_id(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }
    /// The first special-token string found in `text`, if any.
    pub fn find_special(&self, text: &str) -> Option<&str> {
        let m = self.special_matcher.as_ref()?.find(text)?;
        Some(&self.specials[m.pattern().as_usize()])
    }
    /// Turns the cached piece-wise encoder off (or back on, when the tokenizer is eligible);
    /// for benchmarks and tests — the ids are the same either way.
    pub fn set_piece_cache(&mut self, on: bool) {
        self.fast =
            (on && crate::fastpath::eligible(&self.tok)).then(crate::fastpath::PieceCache::new);
    }
    /// Whether the cached piece-wise encoder is in use (byte-level BPE tokenizers).
    pub fn uses_piece_cache(&self) -> bool {
        self.fast.is_some()
    }
    /// The underlying HF tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tok
    }
}

#[cfg(test)]
mod tests {
    use super::TextTokenizer;

    /// Fuzz-found: a syntax error inside `"decoder"` made tokenizers 0.23 panic (`expect("Helper")`)
    /// instead of returning an error. Now it is an error naming the file and the position.
    #[test]
    fn malformed_json_inside_the_decoder_is_an_error() {
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/tokenizer/tokenizer.json");
        let good = std::fs::read_to_string(fixture).unwrap();
        let key = "\"decoder\": {\n    \"type\": \"ByteLevel\",";
        assert!(good.contains(key), "the fixture's decoder moved");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        for broken in [
            "\"decoder\": {\n    \"type\" \"ByteLevel\",",
            "\"decoder\": {\n    \"type\": \"ByteLevel\" \"x\": 1,",
        ] {
            std::fs::write(&path, good.replacen(key, broken, 1)).unwrap();
            let e = TextTokenizer::from_files(&path, None)
                .expect_err("a malformed tokenizer.json is refused")
                .to_string();
            assert!(
                e.contains("tokenizer.json") && e.contains("malformed JSON") && e.contains("line"),
                "{e}"
            );
        }
        // Truncated anywhere: an error, never a panic.
        for cut in [10, good.len() / 2, good.len() - 3] {
            std::fs::write(&path, &good[..cut]).unwrap();
            assert!(TextTokenizer::from_files(&path, None).is_err());
        }
    }
}
