//! Prompt rendering for generation: exactly the training rendering, cut before the answer.

use std::path::Path;

use afinar_data::{Template, TemplateKind, TextTokenizer};
use afinar_trainer::infer::{prompt_ids, Prompt};

fn project_tokenizer() -> TextTokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer");
    TextTokenizer::from_model_dir(&dir).unwrap()
}

#[test]
fn gemma_prompt_ends_with_the_model_turn_header() {
    let tok = project_tokenizer();
    let t = Template::new(TemplateKind::Gemma, &tok).unwrap();
    let ids = prompt_ids(&Prompt::text("¿Qué es un átomo?"), &t, &tok).unwrap();
    let text = tok
        .decode(&ids.iter().map(|&i| i as u32).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(
        text,
        "<bos><start_of_turn>user\n¿Qué es un átomo?<end_of_turn>\n<start_of_turn>model\n"
    );
    assert_eq!(
        ids.iter().filter(|&&i| i == 2).count(),
        1,
        "exactly one BOS"
    );
}

#[test]
fn alpaca_prompt_with_input_ends_with_response_header() {
    let tok = project_tokenizer();
    let t = Template::new(TemplateKind::Alpaca, &tok).unwrap();
    let p = Prompt::Instruction {
        system: None,
        instruction: "Resume el texto.".into(),
        input: "Texto: hola.".into(),
    };
    let ids = prompt_ids(&p, &t, &tok).unwrap();
    let text = tok
        .decode(&ids.iter().map(|&i| i as u32).collect::<Vec<_>>())
        .unwrap();
    // Exactly the Stanford text with input (and the data crate's "### Response:\n" choice).
    let expected = afinar_data::alpaca_prompt("Resume el texto.", "Texto: hola.", None);
    assert_eq!(text, format!("<bos>{expected}"));
    assert!(text.contains("### Input:\nTexto: hola."), "{text:?}");
}

#[test]
fn chat_prompt_keeps_earlier_turns() {
    use afinar_data::{Message, Role};
    let tok = project_tokenizer();
    let t = Template::new(TemplateKind::Gemma, &tok).unwrap();
    let p = Prompt::Chat(vec![
        Message::new(Role::User, "Hola"),
        Message::new(Role::Assistant, "Hola, ¿en qué te ayudo?"),
        Message::new(Role::User, "¿Qué es un mol?"),
    ]);
    let ids = prompt_ids(&p, &t, &tok).unwrap();
    let text = tok
        .decode(&ids.iter().map(|&i| i as u32).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(
        text,
        "<bos><start_of_turn>user\nHola<end_of_turn>\n<start_of_turn>model\nHola, ¿en qué te ayudo?<end_of_turn>\n\
         <start_of_turn>user\n¿Qué es un mol?<end_of_turn>\n<start_of_turn>model\n"
    );
}

#[test]
fn init_refuses_an_absurd_model_size_before_allocating() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer");
    let out = tempfile::tempdir().unwrap();
    let shape = afinar_trainer::infer::InitShape {
        hidden: 1 << 20,
        intermediate: 1 << 22,
        layers: 4096,
        heads: 4,
        kv_heads: 2,
        head_dim: 32,
        sliding_window: 128,
        seed: 0,
    };
    let target = out.path().join("m");
    let err = afinar_trainer::infer::init_model(&dir, &target, &shape).unwrap_err();
    assert!(err.to_string().contains("parameters"), "{err}");
    assert!(!target.exists());
}

#[test]
fn generate_answer_passes_no_repeat_ngram_size_through() {
    use afinar_gemma::generate::{generate, GenerateOptions};
    use afinar_trainer::infer::{generate_answer, SampleOptions};
    use std::sync::Arc;

    let tok = project_tokenizer();
    let t = Template::new(TemplateKind::Gemma, &tok).unwrap();
    // A random model over the project tokenizer's 4096 ids (no file needed).
    let cfg = afinar_gemma::Gemma2Config::tiny(4096, 32, 64, 2, 2, 1, 16, 16).unwrap();
    let opts = afinar_gemma::LoadOptions {
        seed: 7,
        ..Default::default()
    };
    let model = afinar_gemma::Gemma2Model::random(Arc::new(afinar_kernels::Cpu::new()), cfg, &opts)
        .unwrap();
    let prompt = Prompt::text("¿Cuál es la capital de Perú?");
    let sample = |n: usize| SampleOptions {
        max_new_tokens: 16,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
        repetition_penalty: 1.0,
        no_repeat_ngram_size: n,
    };
    let plain = generate_answer(&model, &tok, &t, &prompt, &sample(0)).unwrap();
    let banned = generate_answer(&model, &tok, &t, &prompt, &sample(1)).unwrap();
    // The same decode straight through afinar-gemma with the n-gram ban on.
    let ids = prompt_ids(&prompt, &t, &tok).unwrap();
    let mut o = GenerateOptions::greedy_for(&model, 16);
    o.no_repeat_ngram_size = 1;
    o.eos_token_ids.extend(tok.eos().map(|e| e.id as i32));
    o.stop_token_ids
        .extend(t.end_of_turn_id().map(|e| e as i32));
    let g = generate(&model, &ids, &o).unwrap();
    assert_eq!(banned.tokens, g.tokens.len());
    let mut toks: Vec<u32> = g.tokens.iter().map(|&x| x as u32).collect();
    if toks.last().is_some_and(|&x| {
        o.eos_token_ids.contains(&(x as i32)) || o.stop_token_ids.contains(&(x as i32))
    }) {
        toks.pop();
    }
    assert_eq!(banned.completion, tok.decode(&toks).unwrap());
    // With n = 1 no output id occurs earlier in the prompt or the output; plain greedy on this model
    // does repeat one.
    for (j, x) in g.tokens.iter().enumerate() {
        assert!(
            !ids.contains(x) && !g.tokens[..j].contains(x),
            "token {j} = {x}: {:?}",
            g.tokens
        );
    }
    assert_ne!(plain.completion, banned.completion);
}
