//! Data-pipeline throughput, side by side with transformers (docs/benchmarks.md, "Data pipeline").
//!
//! cargo run --release -p afinar-data --example bench_pipeline -- [--samples N] [--python /work/venv/bin/python]
//!
//! 1. Generates N (default 50,000) two-exchange conversations (messages JSONL, ~300 tokens each
//!    with the project tokenizer), deterministic, into a temporary file.
//! 2. Rust: read + validate + gemma template + segment-wise tokenization + masks
//!    (`read_dataset` + `encode_dataset`, rayon over the machine's cores). Best of 3 runs.
//! 3. Python (when `--python` is given): tests/golden/bench_data.py on the same file and the same
//!    cores: json parsing + transformers `apply_chat_template(tokenize=True,
//!    return_assistant_tokens_mask=True)` in batches with the same Gemma template (with TRL-style
//!    generation tags for the mask) and the same tokenizer.json. Totals are compared.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use afinar_data::{
    encode_dataset, read_dataset, EncodeOptions, MaskMode, Overflow, Template, TemplateKind,
    TextTokenizer,
};

#[path = "../benches/support/gen.rs"]
mod gen;
use gen::generate;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let n: usize = arg("--samples")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(50_000);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()?;
    let tok_dir = root.join("tests/fixtures/tokenizer");
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("bench.jsonl");
    std::fs::File::create(&data)?.write_all(generate(n, &gen::corpus_words()).as_bytes())?;

    let mut tok = TextTokenizer::from_model_dir(&tok_dir)?;
    let opts = EncodeOptions {
        mask: MaskMode::Assistant,
        max_seq_len: 4096,
        overflow: Overflow::Error,
    };
    let threads = rayon::current_num_threads();
    let mut sps = Vec::new();
    let mut totals = (0, 0);
    for cache in [false, true] {
        // A fresh tokenizer per configuration: the piece cache starts empty (it is filled
        // during the first of the three runs, which are all timed).
        tok.set_piece_cache(cache);
        let template = Template::new(TemplateKind::Gemma, &tok)?;
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t0 = Instant::now();
            let raw = read_dataset(&data, None)?;
            let t_read = t0.elapsed().as_secs_f64();
            let ds = encode_dataset(&raw, &template, &tok, &opts)?;
            let s = t0.elapsed().as_secs_f64();
            eprintln!(
                "  read+validate {t_read:.3} s, template+tokenize+mask {:.3} s",
                s - t_read
            );
            best = best.min(s);
            totals = (ds.stats.tokens, ds.stats.trained_tokens);
        }
        let rust_sps = n as f64 / best;
        sps.push(rust_sps);
        println!(
            "rust{}: {n} samples, {} tokens ({:.0}/sample), {} trained; best of 3: {best:.3} s = {rust_sps:.0} samples/s ({threads} threads)",
            if cache { " (piece cache)   " } else { " (tokenizers only)" },
            totals.0,
            totals.0 as f64 / n as f64,
            totals.1
        );
    }
    if let Some(py) = arg("--python") {
        let out = std::process::Command::new(py)
            .arg(root.join("tests/golden/bench_data.py"))
            .arg(&data)
            .arg(&tok_dir)
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "bench_data.py failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let py_sps = v["samples_per_s"].as_f64().unwrap_or(0.0);
        println!(
            "python                  : {} samples, {} tokens, {} trained; best of 3: {:.3} s = {py_sps:.0} samples/s ({} threads)",
            v["samples"], v["tokens"], v["trained"], v["seconds"].as_f64().unwrap_or(0.0), v["threads"]
        );
        // The comparison is only meaningful if both sides produced the same tokens and masks.
        let same = v["tokens"].as_u64() == Some(totals.0 as u64)
            && v["trained"].as_u64() == Some(totals.1 as u64);
        println!(
            "same totals: {same}; speed-up: {:.1}x (tokenizers only), {:.1}x (piece cache)",
            sps[0] / py_sps,
            sps[1] / py_sps
        );
    }
    Ok(())
}
