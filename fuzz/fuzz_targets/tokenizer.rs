//! A model directory's tokenizer files: `TextTokenizer::from_model_dir` with a fuzzed
//! `tokenizer_config.json` (special tokens, add_bos_token, chat_template, ...) next to the project
//! tokenizer.json, or a fuzzed `tokenizer.json` next to the project config; then encode/decode and
//! binding the built-in templates.
//!
//! Input: byte 0 bit 0 = which file is fuzzed; rest = that file.
#![no_main]

use afinar_data::jinja::TemplateDate;
use afinar_data::{Template, TemplateKind, TextTokenizer};
use afinar_fuzz::{put, repo_root, scratch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let fixture = repo_root().join("tests/fixtures/tokenizer");
    let dir = scratch("tok");
    if which & 1 == 0 {
        std::fs::copy(fixture.join("tokenizer.json"), dir.join("tokenizer.json")).expect("copy");
        put(&dir, "tokenizer_config.json", rest);
    } else {
        put(&dir, "tokenizer.json", rest);
        std::fs::copy(
            fixture.join("tokenizer_config.json"),
            dir.join("tokenizer_config.json"),
        )
        .expect("copy");
    }
    let Ok(tok) = TextTokenizer::from_model_dir(&dir) else {
        return;
    };
    if let Ok(ids) = tok.encode("hola <bos> qué tal\n") {
        let _ = tok.decode(&ids);
    }
    let _ = tok.pad_id();
    let date = TemplateDate::new(2026, 1, 2, 3, 4, 5);
    for k in [
        TemplateKind::Alpaca,
        TemplateKind::ChatMl,
        TemplateKind::Gemma,
        TemplateKind::Llama3,
        TemplateKind::Tokenizer,
    ] {
        let _ = Template::with_date(k, &tok, date);
    }
});
