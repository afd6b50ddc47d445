//! cargo bench -p afinar-data: templating + tokenization + masking throughput (criterion).
//! The side-by-side comparison with transformers is examples/bench_pipeline.rs.

use std::path::PathBuf;

use afinar_data::{
    encode_dataset, pack_ffd, parse_dataset, EncodeOptions, MaskMode, Overflow, Template,
    TemplateKind, TextTokenizer,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[path = "support/gen.rs"]
mod gen;

fn bench(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tok = TextTokenizer::from_model_dir(&root.join("tests/fixtures/tokenizer")).unwrap();
    let n = 2000;
    let text = gen::generate(n, &gen::corpus_words());
    let path = PathBuf::from("bench.jsonl");
    let raw = parse_dataset(&path, &text, None).unwrap();
    let opts = EncodeOptions {
        mask: MaskMode::Assistant,
        max_seq_len: 4096,
        overflow: Overflow::Error,
    };
    let mut g = c.benchmark_group("data");
    g.throughput(Throughput::Elements(n as u64));
    g.sample_size(10);
    g.bench_function("parse_2000", |b| {
        b.iter(|| parse_dataset(&path, &text, None).unwrap())
    });
    for kind in [TemplateKind::Gemma, TemplateKind::Tokenizer] {
        let template = Template::new(kind, &tok).unwrap();
        g.bench_function(format!("encode_2000_{kind}"), |b| {
            b.iter(|| encode_dataset(&raw, &template, &tok, &opts).unwrap())
        });
    }
    let template = Template::new(TemplateKind::Gemma, &tok).unwrap();
    let ds = encode_dataset(&raw, &template, &tok, &opts).unwrap();
    let lengths: Vec<usize> = ds.samples.iter().map(|s| s.len()).collect();
    g.bench_function("pack_ffd_2000_into_2048", |b| {
        b.iter(|| pack_ffd(&lengths, 2048).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
