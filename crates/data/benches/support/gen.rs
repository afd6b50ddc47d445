//! Deterministic synthetic conversations for the data-pipeline benchmarks (shared by
//! benches/pipeline.rs and examples/bench_pipeline.rs): messages JSONL, two exchanges,
//! ~300 tokens per sample with the project tokenizer, words drawn from the project corpus.

/// The words of the project's Spanish corpus, in text order (sampling positions uniformly gives
/// the corpus's own word frequencies, so the vocabulary is as diverse as real data).
pub fn corpus_words() -> Vec<String> {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tokenizer/corpus/academico-riguroso.txt");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    text.split_whitespace().map(str::to_string).collect()
}

/// Deterministic text of about `words` words.
fn sentence(rng: &mut u64, pool: &[String], words: usize) -> String {
    let mut s = String::new();
    for i in 0..words {
        *rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let w = pool[(*rng >> 33) as usize % pool.len()].as_str();
        if i > 0 {
            s.push(' ');
        }
        s.push_str(w);
    }
    s
}

pub fn generate(n: usize, pool: &[String]) -> String {
    let mut rng = 42u64;
    let mut out = String::with_capacity(n * 1500);
    for _ in 0..n {
        let msgs = serde_json::json!({"messages": [
            {"role": "user", "content": sentence(&mut rng, pool, 35)},
            {"role": "assistant", "content": sentence(&mut rng, pool, 65)},
            {"role": "user", "content": sentence(&mut rng, pool, 25)},
            {"role": "assistant", "content": sentence(&mut rng, pool, 65)},
        ]});
        out.push_str(&msgs.to_string());
        out.push('\n');
    }
    out
}
