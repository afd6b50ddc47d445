//! Helpers shared by the fuzz targets: the project tokenizer (loaded once), a scratch directory
//! per process, and the multi-file input convention.
//!
//! Multi-file inputs: one fuzz input holds several files separated by [`SEP`] (a line `=====`);
//! the seeds in `fuzz/seeds/` use it, and libFuzzer's comparison tracing finds it by itself.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use afinar_data::TextTokenizer;

/// Separates the files of a multi-file input.
pub const SEP: &[u8] = b"\n=====\n";

/// Splits `data` at every [`SEP`] into at most `max` parts (the last part keeps any further SEPs).
pub fn split(data: &[u8], max: usize) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() + 1 < max {
        match rest.windows(SEP.len()).position(|w| w == SEP) {
            Some(p) => {
                out.push(&rest[..p]);
                rest = &rest[p + SEP.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

/// The repository root (fuzz/..).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The committed project tokenizer: every built-in template's markup is a special token of it.
pub fn tokenizer() -> &'static TextTokenizer {
    static TOK: OnceLock<TextTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        TextTokenizer::from_model_dir(&repo_root().join("tests/fixtures/tokenizer"))
            .expect("the project tokenizer loads")
    })
}

/// The project tokenizer as a `tokenizers::Tokenizer` and its parsed config (to rebuild a
/// `TextTokenizer` with another `chat_template`).
pub fn tokenizer_parts() -> &'static (tokenizers::Tokenizer, PathBuf, PathBuf, serde_json::Value) {
    static PARTS: OnceLock<(tokenizers::Tokenizer, PathBuf, PathBuf, serde_json::Value)> =
        OnceLock::new();
    PARTS.get_or_init(|| {
        let dir = repo_root().join("tests/fixtures/tokenizer");
        let tj = dir.join("tokenizer.json");
        let cj = dir.join("tokenizer_config.json");
        let tok = tokenizers::Tokenizer::from_file(&tj).expect("tokenizer.json loads");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cj).expect("config reads"))
                .expect("config parses");
        (tok, tj, cj, cfg)
    })
}

/// A fresh, empty scratch directory for this process (the same path every call: each input
/// overwrites the previous one's files).
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("afinar-fuzz-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Writes `bytes` to `dir/name`.
pub fn put(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("scratch write");
    p
}
