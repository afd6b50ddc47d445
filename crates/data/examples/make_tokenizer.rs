//! Rebuilds the project's tokenizer: `cargo run -p afinar-data --example make_tokenizer [OUT_DIR]`
//! (default OUT_DIR: tests/fixtures/tokenizer). Trains a byte-level BPE on every
//! `tests/fixtures/tokenizer/corpus/*.txt` (sorted by name, one text per line) and writes
//! tokenizer.json + tokenizer_config.json. Deterministic: the same corpus gives the same files.

use std::path::PathBuf;

use afinar_data::{
    add_bos_post_processor, project_tokenizer_config, train_tokenizer, PROJECT_SPECIAL_TOKENS,
};

/// Vocabulary size of the project tokenizer (embedding rows of the demo model).
const VOCAB_SIZE: usize = 4096;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()?;
    let fixture = root.join("tests/fixtures/tokenizer");
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| fixture.clone());
    let mut files: Vec<PathBuf> = std::fs::read_dir(fixture.join("corpus"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    let mut texts = Vec::new();
    for f in &files {
        let s = std::fs::read_to_string(f)?;
        texts.extend(
            s.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    let mut tok = train_tokenizer(&texts, VOCAB_SIZE, &PROJECT_SPECIAL_TOKENS)?;
    add_bos_post_processor(&mut tok, "<bos>")?;
    std::fs::create_dir_all(&out)?;
    tok.save(out.join("tokenizer.json"), true)
        .map_err(|e| e.to_string())?;
    let cfg = serde_json::to_string_pretty(&project_tokenizer_config())?;
    std::fs::write(out.join("tokenizer_config.json"), cfg + "\n")?;
    println!(
        "trained on {} texts from {} files; vocab {} → {}",
        texts.len(),
        files.len(),
        tok.get_vocab_size(true),
        out.display()
    );
    Ok(())
}
