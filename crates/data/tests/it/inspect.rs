//! `inspect`: report content, rendering with markers / colour, and the failure conditions.

use crate::common;

use afinar_data::*;

fn opts(p: &std::path::Path, template: TemplateKind, max_seq_len: usize) -> InspectOptions {
    InspectOptions {
        data: p.to_path_buf(),
        format: None,
        template,
        mask: MaskMode::Assistant,
        max_seq_len,
        overflow: Overflow::Truncate,
        samples: 2,
    }
}

const DATA: &str = r#"{"messages": [{"role": "user", "content": "¿Capital de Francia?"}, {"role": "assistant", "content": "París."}]}
{"messages": [{"role": "user", "content": "Hola"}, {"role": "assistant", "content": "Hola."}, {"role": "user", "content": "¿2+2?"}, {"role": "assistant", "content": "4"}]}
{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
"#;

#[test]
fn report_shows_trained_tokens_and_stats() {
    let tok = common::project_tokenizer();
    let (_d, p) = common::temp_file("d.jsonl", DATA);
    let r = inspect(&opts(&p, TemplateKind::Gemma, 256), &tok).unwrap();
    assert!(r.passed(), "{:?}", r.problems);
    assert_eq!(r.format, Format::Messages);
    assert_eq!(
        (r.stats.records, r.stats.samples, r.samples.len()),
        (3, 3, 2)
    );
    assert_eq!(r.histogram.iter().map(|b| b.count).sum::<usize>(), 3);
    let mut out = Vec::new();
    render_report(&r, &mut out, false).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("<bos><start_of_turn>user\n¿Capital de Francia?<end_of_turn>\n<start_of_turn>model\n[[París.<end_of_turn>↵\n]]"),
        "{text}"
    );
    assert!(text.contains("[[Hola.<end_of_turn>↵\n]]<start_of_turn>user\n¿2+2?<end_of_turn>\n<start_of_turn>model\n[[4<end_of_turn>↵\n]]"), "{text}");
    assert!(text.contains("\nOK"), "{text}");
    assert!(!text.contains('\x1b'));
    let mut out = Vec::new();
    render_report(&r, &mut out, true).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("\x1b[1;32mParís.<end_of_turn>↵\n\x1b[0m") && !text.contains("[["),
        "{text}"
    );
}

#[test]
fn truncation_that_cuts_the_end_of_turn_fails() {
    let tok = common::project_tokenizer();
    let (_d, p) = common::temp_file("d.jsonl", DATA);
    // Cut the first sample two tokens before its end: its answer keeps content but loses
    // `<end_of_turn>` and the trained newline.
    let t = Template::new(TemplateKind::Gemma, &tok).unwrap();
    let first = read_dataset(&p, None).unwrap().records[0].body.clone();
    let n = encode_record(&first, &t, &tok, MaskMode::Assistant)
        .unwrap()
        .ids
        .len();
    let r = inspect(&opts(&p, TemplateKind::Gemma, n - 2), &tok).unwrap();
    assert!(!r.passed());
    assert!(
        r.problems
            .iter()
            .any(|p| p.loc.line == 1 && p.message.contains("cut by truncation")),
        "{:?}",
        r.problems
    );
    let mut out = Vec::new();
    render_report(&r, &mut out, false).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("FAILED") && text.contains("TRUNCATED") && text.contains("> max_seq_len"),
        "{text}"
    );
}

#[test]
fn a_template_whose_turns_end_without_a_special_token_fails() {
    // A Jinja template that ends assistant turns with plain text: nothing teaches the model to stop.
    let tok = common::tokenizer_with_template(
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
    );
    let (_d, p) = common::temp_file("d.jsonl", DATA);
    let r = inspect(&opts(&p, TemplateKind::Tokenizer, 256), &tok).unwrap();
    assert!(!r.passed());
    assert!(
        r.problems[0].message.contains("no special token"),
        "{:?}",
        r.problems
    );
}

#[test]
fn invalid_datasets_are_errors_not_reports() {
    let tok = common::project_tokenizer();
    let (_d, p) = common::temp_file("d.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"user\", \"content\": \"b\"}]}\n");
    let e = inspect(&opts(&p, TemplateKind::Gemma, 64), &tok).unwrap_err();
    assert!(
        e.to_string()
            .contains(":1: field `messages`: no assistant turn"),
        "{e}"
    );
}

#[test]
fn text_records_pass_with_their_eos() {
    let tok = TextTokenizer::open(&common::tokenizer_dir().join("tokenizer.json")).unwrap();
    assert_eq!(
        tok.chat_template()
            .map(|t| t.starts_with("{{ bos_token }}")),
        Some(true)
    );
    let (_d, p) = common::temp_file("t.jsonl", "{\"text\": \"El agua hierve a 100 °C.\"}\n");
    let r = inspect(&opts(&p, TemplateKind::Gemma, 64), &tok).unwrap();
    assert!(r.passed(), "{:?}", r.problems);
    assert_eq!(
        r.samples[0].pieces,
        vec![Piece {
            text: "<bos>El agua hierve a 100 °C.<eos>".into(),
            trained: true
        }]
    );
}
