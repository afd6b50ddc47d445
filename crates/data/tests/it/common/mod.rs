//! Shared test helpers: the project tokenizer and temporary dataset files.
#![allow(dead_code)]

use std::path::PathBuf;

use afinar_data::TextTokenizer;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn tokenizer_dir() -> PathBuf {
    repo_root().join("tests/fixtures/tokenizer")
}

/// The committed project tokenizer (tokenizer.json + tokenizer_config.json).
pub fn project_tokenizer() -> TextTokenizer {
    TextTokenizer::from_model_dir(&tokenizer_dir()).expect("project tokenizer loads")
}

/// The project tokenizer with another chat_template in its config.
pub fn tokenizer_with_template(template: &str) -> TextTokenizer {
    let dir = tokenizer_dir();
    let cfg_path = dir.join("tokenizer_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["chat_template"] = serde_json::Value::String(template.to_string());
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    TextTokenizer::from_parts(tok, dir.join("tokenizer.json"), Some((&cfg_path, &cfg))).unwrap()
}

/// Writes `content` to `name` in a fresh temporary directory (kept alive by the returned guard).
pub fn temp_file(name: &str, content: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    std::fs::write(&p, content).unwrap();
    (dir, p)
}
