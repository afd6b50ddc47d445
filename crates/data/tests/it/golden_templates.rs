//! Golden test: built-in templates and tokenizer-supplied Jinja templates against transformers'
//! `apply_chat_template` (rendered text, token ids, assistant mask). Fixture made by
//! tests/golden/make_templates.py with the committed project tokenizer.

use crate::common;

use afinar_data::{encode_record, Body, MaskMode, Message, Role, Template, TemplateKind};
use serde_json::Value;

fn messages(v: &Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                r => panic!("role {r}"),
            };
            Message::new(role, m["content"].as_str().unwrap())
        })
        .collect()
}

#[test]
fn templates_match_transformers_apply_chat_template() {
    let path = common::repo_root().join("tests/golden/fixtures/templates.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tok = common::project_tokenizer();
    let custom_tok = common::tokenizer_with_template(doc["custom_template"].as_str().unwrap());
    let mut checked = 0;
    for case in doc["cases"].as_array().unwrap() {
        let name = format!(
            "{}/{}",
            case["name"].as_str().unwrap(),
            case["template"].as_str().unwrap()
        );
        let (kind, t) = match case["template"].as_str().unwrap() {
            "gemma" => (TemplateKind::Gemma, &tok),
            "chatml" => (TemplateKind::ChatMl, &tok),
            "llama3" => (TemplateKind::Llama3, &tok),
            "alpaca" => (TemplateKind::Alpaca, &tok),
            "tokenizer" => (TemplateKind::Tokenizer, &tok),
            "custom" => (TemplateKind::Tokenizer, &custom_tok),
            other => panic!("unknown template {other}"),
        };
        let template = Template::new(kind, t).unwrap();
        let body = if kind == TemplateKind::Alpaca {
            let r = &case["record"];
            Body::Instruction {
                system: None,
                instruction: r["instruction"].as_str().unwrap().into(),
                input: r["input"].as_str().unwrap().into(),
                output: r["output"].as_str().unwrap().into(),
            }
        } else {
            Body::Chat(messages(&case["messages"]))
        };
        if let Some(err) = case.get("error") {
            let (_, problem) = template.render(&body).expect_err(&name);
            assert!(problem.contains(err.as_str().unwrap()), "{name}: {problem}");
            checked += 1;
            continue;
        }
        let rendered = template
            .render(&body)
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        // afinar adds the single BOS when the template does not emit it (chatml).
        let reference = case["text"].as_str().unwrap();
        let expected = if reference.starts_with("<bos>") {
            reference.to_string()
        } else {
            format!("<bos>{reference}")
        };
        assert_eq!(rendered.text(), expected, "{name}: rendered text");
        let enc = encode_record(&body, &template, t, MaskMode::Assistant).unwrap();
        let ids: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            enc.ids, ids,
            "{name}: ids (segment-wise tokenization vs joint tokenization)"
        );
        let mask: Vec<bool> = case["mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() == 1)
            .collect();
        assert_eq!(enc.trained, mask, "{name}: trained-token mask");
        checked += 1;
    }
    assert_eq!(checked, 27);
}
