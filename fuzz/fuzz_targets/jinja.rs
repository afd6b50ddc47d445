//! Jinja chat templates (a tokenizer_config.json `chat_template` is user input): compile + render
//! fixed conversations directly, and as the `tokenizer` template of a tokenizer (end-of-turn probe,
//! incremental segment rendering, `encode_record`). The same bytes also go through `strftime`,
//! `TemplateDate::from_str` and `TemplateDate::from_unix_utc`.
//!
//! Input: the template source (UTF-8, lossily decoded).
#![no_main]

use afinar_data::jinja::{strftime, ChatTemplate, TemplateDate};
use afinar_data::{
    encode_record, Body, MaskMode, Message, Role, Template, TemplateKind, TextTokenizer,
};
use afinar_fuzz::{tokenizer, tokenizer_parts};
use libfuzzer_sys::fuzz_target;

fn bodies() -> Vec<Body> {
    vec![
        Body::Chat(vec![
            Message::new(Role::User, "hola"),
            Message::new(Role::Assistant, " adiós "),
        ]),
        Body::Chat(vec![
            Message::new(Role::System, "sé breve"),
            Message::new(Role::User, "uno"),
            Message::new(Role::Assistant, "dos"),
            Message::new(Role::User, "tres"),
            Message::new(Role::Assistant, "cuatro"),
        ]),
        Body::Instruction {
            system: None,
            instruction: "suma".into(),
            input: "1 2".into(),
            output: "3".into(),
        },
        Body::Text("texto".into()),
    ]
}

fuzz_target!(|data: &[u8]| {
    let src = String::from_utf8_lossy(data);
    let date = TemplateDate::new(2026, 2, 28, 23, 59, 58).expect("valid date");
    if data.len() >= 8 {
        let secs = i64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        let d = TemplateDate::from_unix_utc(secs, u32::from(data[0]) * 4001);
        let _ = strftime(&src, &d);
    }
    let _ = strftime(&src, &date);
    let _ = src.parse::<TemplateDate>();

    let tok = tokenizer();
    if let Ok(t) = ChatTemplate::with_date(&src, "fuzz", tok, date) {
        for b in bodies() {
            if let Some(m) = b.to_messages() {
                let _ = t.render(&m, false);
                let _ = t.render(&m, true);
            }
        }
        let _ = t.render(&[], true);
    }

    // The same source as a tokenizer's chat_template: the `tokenizer` template kind.
    let (inner, tj, cj, cfg) = tokenizer_parts();
    let mut cfg = cfg.clone();
    cfg["chat_template"] = serde_json::Value::String(src.into_owned());
    let Ok(tt) = TextTokenizer::from_parts(inner.clone(), tj.clone(), Some((cj.as_path(), &cfg)))
    else {
        return;
    };
    let Ok(template) = Template::with_date(TemplateKind::Tokenizer, &tt, Some(date)) else {
        return;
    };
    for b in bodies() {
        for mask in [MaskMode::Assistant, MaskMode::LastTurn] {
            let _ = encode_record(&b, &template, &tt, mask);
        }
    }
});
