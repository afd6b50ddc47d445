//! Dataset files: `read_dataset` (JSON array / JSONL, every format, auto-detect) on a temp file, then
//! every record through every built-in template (`encode_record`), `encode_dataset` with a small
//! `max_seq_len` and the chosen overflow policy, and `inspect` (+ its report).
//!
//! Input: byte 0 = options (format, template, mask, overflow), byte 1 = max_seq_len, rest = file.
#![no_main]

use std::sync::OnceLock;

use afinar_data::jinja::TemplateDate;
use afinar_data::{
    encode_dataset, encode_record, inspect, read_dataset, render_report, EncodeOptions, Format,
    InspectOptions, MaskMode, Overflow, Template, TemplateKind,
};
use afinar_fuzz::{put, scratch, tokenizer};
use libfuzzer_sys::fuzz_target;

const KINDS: [TemplateKind; 5] = [
    TemplateKind::Alpaca,
    TemplateKind::ChatMl,
    TemplateKind::Gemma,
    TemplateKind::Llama3,
    TemplateKind::Tokenizer,
];

fn templates() -> &'static Vec<Template> {
    static T: OnceLock<Vec<Template>> = OnceLock::new();
    T.get_or_init(|| {
        let date = TemplateDate::new(2026, 1, 2, 3, 4, 5);
        KINDS
            .iter()
            .map(|&k| Template::with_date(k, tokenizer(), date).expect("built-in template binds"))
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (opt, msl, file) = (data[0], data[1], &data[2..]);
    let format = match opt & 7 {
        0 => Some(Format::Alpaca),
        1 => Some(Format::Messages),
        2 => Some(Format::ShareGpt),
        3 => Some(Format::Text),
        _ => None,
    };
    let ti = usize::from(opt >> 3 & 7) % KINDS.len();
    let mask = [MaskMode::Assistant, MaskMode::LastTurn, MaskMode::All][usize::from(opt >> 6) % 3];
    let overflow = if msl & 1 == 0 {
        Overflow::Truncate
    } else {
        Overflow::Drop
    };
    let max_seq_len = usize::from(msl >> 1);
    let tok = tokenizer();
    let dir = scratch("dataset");
    let path = put(&dir, "data.jsonl", file);
    let Ok(raw) = read_dataset(&path, format) else {
        return;
    };
    for t in templates() {
        for r in &raw.records {
            let _ = encode_record(&r.body, t, tok, mask);
        }
    }
    let opts = EncodeOptions {
        mask,
        max_seq_len,
        overflow,
    };
    let _ = encode_dataset(&raw, &templates()[ti], tok, &opts);
    let iopts = InspectOptions {
        data: path,
        format,
        template: KINDS[ti],
        mask,
        max_seq_len,
        overflow,
        samples: 2,
    };
    if let Ok(rep) = inspect(&iopts, tok) {
        let _ = render_report(&rep, &mut std::io::sink(), true);
    }
});
