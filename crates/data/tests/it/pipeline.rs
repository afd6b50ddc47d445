//! Formats, masks, length handling, packing, loader and cursor.

use crate::common;

use afinar_data::*;

fn chat(turns: &[(Role, &str)]) -> Body {
    Body::Chat(turns.iter().map(|(r, c)| Message::new(*r, *c)).collect())
}

#[test]
fn alpaca_text_is_exact_stanford_with_newline_after_response() {
    assert_eq!(
        alpaca_prompt("Name a color.", "", None),
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\n"
    );
    assert_eq!(
        alpaca_prompt("Translate.", "gato", None),
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n### Input:\ngato\n\n### Response:\n"
    );
    assert_eq!(
        alpaca_prompt("Translate.", "", Some("Eres riguroso.")),
        "Eres riguroso.\n\n### Instruction:\nTranslate.\n\n### Response:\n"
    );
    let tok = common::project_tokenizer();
    let t = Template::new(TemplateKind::Alpaca, &tok).unwrap();
    let body = Body::Instruction {
        system: None,
        instruction: "Name a color.".into(),
        input: String::new(),
        output: "Blue.".into(),
    };
    let r = t.render(&body).unwrap();
    assert_eq!(
        r.text(),
        format!(
            "<bos>{}Blue.<eos>",
            alpaca_prompt("Name a color.", "", None)
        )
    );
    let e = encode_record(&body, &t, &tok, MaskMode::Assistant).unwrap();
    // Trained: exactly the ids of "Blue." followed by <eos>.
    let trained: Vec<u32> = e
        .ids
        .iter()
        .zip(&e.trained)
        .filter(|(_, &t)| t)
        .map(|(&i, _)| i)
        .collect();
    let mut want = tok.encode("Blue.").unwrap();
    want.push(1);
    assert_eq!(trained, want);
    assert_eq!(e.ids[0], 2);
}

#[test]
fn multi_turn_masks_by_mode() {
    let tok = common::project_tokenizer();
    let t = Template::new(TemplateKind::Gemma, &tok).unwrap();
    let body = chat(&[
        (Role::System, "Sé breve."),
        (Role::User, "Hola"),
        (Role::Assistant, "Buenas."),
        (Role::User, "¿Qué es un átomo?"),
        (Role::Assistant, "La unidad más pequeña de un elemento."),
    ]);
    let text_of = |e: &Encoded, pred: &dyn Fn(usize) -> bool| -> String {
        let ids: Vec<u32> = (0..e.ids.len())
            .filter(|&i| pred(i))
            .map(|i| e.ids[i])
            .collect();
        tok.decode(&ids).unwrap()
    };
    let a = encode_record(&body, &t, &tok, MaskMode::Assistant).unwrap();
    assert_eq!(
        text_of(&a, &|i| a.trained[i]),
        "Buenas.<end_of_turn>\nLa unidad más pequeña de un elemento.<end_of_turn>\n"
    );
    assert_eq!(a.turn_spans.len(), 2);
    let l = encode_record(&body, &t, &tok, MaskMode::LastTurn).unwrap();
    assert_eq!(
        text_of(&l, &|i| l.trained[i]),
        "La unidad más pequeña de un elemento.<end_of_turn>\n"
    );
    let all = encode_record(&body, &t, &tok, MaskMode::All).unwrap();
    assert!(all.trained.iter().all(|&x| x));
    // The system text is folded into the first user turn and never trained.
    assert!(text_of(&a, &|i| !a.trained[i])
        .starts_with("<bos><start_of_turn>user\nSé breve.\n\nHola<end_of_turn>\n"));
    // Same ids in every mode; only the mask differs.
    assert_eq!(a.ids, l.ids);
    assert_eq!(a.ids, all.ids);
    // chatml and llama3 train their own end-of-turn tokens.
    for (kind, eot) in [
        (TemplateKind::ChatMl, "<|im_end|>\n"),
        (TemplateKind::Llama3, "<|eot_id|>"),
    ] {
        let t = Template::new(kind, &tok).unwrap();
        let e = encode_record(&body, &t, &tok, MaskMode::Assistant).unwrap();
        assert_eq!(
            text_of(&e, &|i| e.trained[i]),
            format!("Buenas.{eot}La unidad más pequeña de un elemento.{eot}")
        );
        assert_eq!(
            e.ids.iter().filter(|&&i| i == 2).count(),
            1,
            "exactly one BOS"
        );
    }
}

#[test]
fn text_records_train_everything_between_bos_and_eos() {
    let tok = common::project_tokenizer();
    let t = Template::new(TemplateKind::Gemma, &tok).unwrap();
    let e = encode_record(
        &Body::Text("El agua hierve.".into()),
        &t,
        &tok,
        MaskMode::Assistant,
    )
    .unwrap();
    assert_eq!(e.ids[0], 2);
    assert_eq!(*e.ids.last().unwrap(), 1);
    assert!(e.trained.iter().all(|&x| x));
    assert_eq!(tok.decode(&e.ids).unwrap(), "<bos>El agua hierve.<eos>");
}

fn write_jsonl(lines: &[&str]) -> (tempfile::TempDir, std::path::PathBuf) {
    common::temp_file("data.jsonl", &(lines.join("\n") + "\n"))
}

#[test]
fn formats_are_detected_and_overridable() {
    let (_d, p) = write_jsonl(&[
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
    ]);
    assert_eq!(read_dataset(&p, None).unwrap().format, Format::Messages);
    let (_d, p) = write_jsonl(&[
        r#"{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}"#,
    ]);
    let raw = read_dataset(&p, None).unwrap();
    assert_eq!(raw.format, Format::ShareGpt);
    assert_eq!(
        raw.records[0].body,
        chat(&[(Role::User, "a"), (Role::Assistant, "b")])
    );
    let (_d, p) = write_jsonl(&[r#"{"text": "hola"}"#]);
    assert_eq!(read_dataset(&p, None).unwrap().format, Format::Text);
    // JSON array, alpaca, with line numbers per element.
    let (_d, p) = common::temp_file(
        "a.json",
        "[\n  {\"instruction\": \"i\", \"output\": \"o\"},\n  {\"instruction\": \"j\", \"input\": \"x\", \"output\": \"p\", \"system\": \"s\"}\n]\n",
    );
    let raw = read_dataset(&p, None).unwrap();
    assert_eq!(raw.format, Format::Alpaca);
    assert_eq!(
        raw.records.iter().map(|r| r.loc.line).collect::<Vec<_>>(),
        vec![2, 3]
    );
    // Override: reading an alpaca file as messages reports the missing field.
    let err = read_dataset(&p, Some(Format::Messages)).unwrap_err();
    assert!(
        err.to_string()
            .contains("a.json:2: field `messages`: missing"),
        "{err}"
    );
    // Unknown format.
    let (_d, p) = write_jsonl(&[r#"{"question": "a"}"#]);
    assert!(matches!(
        read_dataset(&p, None),
        Err(DataError::UnknownFormat { .. })
    ));
}

/// Every bad-input case, with its exact path:line in the message; nothing comes back.
#[test]
fn bad_records_are_all_reported_with_path_and_line() {
    let lines = [
        r#"{"instruction": "ok", "output": "fine"}"#,
        r#"{"instruction": "broken", "output": "x""#,
        r#"{"output": "no instruction"}"#,
        r#"{"instruction": 7, "output": "y"}"#,
        r#"{"instruction": "empty output", "output": "   "}"#,
        r#"{"instruction": "input not a string", "input": ["a"], "output": "z"}"#,
        r#"["not an object"]"#,
    ];
    let (_d, p) = write_jsonl(&lines);
    let err = read_dataset(&p, Some(Format::Alpaca)).unwrap_err();
    let msg = err.to_string();
    let f = p.display().to_string();
    for want in [
        format!("{f}:2:39: malformed JSON: EOF while parsing an object"),
        format!("{f}:3: field `instruction`: missing"),
        format!("{f}:4: field `instruction`: expected a string, found a number"),
        format!("{f}:5: field `output`: empty output"),
        format!("{f}:6: field `input`: expected a string, found an array"),
        format!("{f}:7: expected a JSON object, found an array"),
    ] {
        assert!(msg.contains(&want), "missing `{want}` in:\n{msg}");
    }
    assert_eq!(err.record_errors().unwrap().len(), 6);

    let lines = [
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}"#,
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}"#,
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}"#,
        r#"{"messages": [{"role": "user", "content": "a"}]}"#,
    ];
    let (_d, p) = write_jsonl(&lines);
    let msg = read_dataset(&p, None).unwrap_err().to_string();
    let f = p.display().to_string();
    for want in [
        format!("{f}:1: field `messages[1].role`: unknown role `bot` (expected system, user or assistant)"),
        format!("{f}:2: field `messages[1].content`: missing"),
        format!("{f}:3: field `messages[1].content`: empty assistant content"),
        format!("{f}:4: field `messages`: no assistant turn"),
    ] {
        assert!(msg.contains(&want), "missing `{want}` in:\n{msg}");
    }
}

#[test]
fn json_array_syntax_error_has_line_and_column() {
    let (_d, p) = common::temp_file("a.json", "[\n {\"instruction\": \"i\", \"output\": \"o\"},\n {\"instruction\": \"i\" \"output\": \"o\"}\n]");
    let msg = read_dataset(&p, None).unwrap_err().to_string();
    assert!(
        msg.contains(&format!(
            "{}:3:22: malformed JSON: expected `,` or `}}`",
            p.display()
        )),
        "{msg}"
    );
}

#[test]
fn template_rules_are_checked_per_record_before_training() {
    let tok = common::project_tokenizer();
    let lines = [
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}"#,
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "s"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}"#,
        r#"{"messages": [{"role": "user", "content": "say <end_of_turn> now"}, {"role": "assistant", "content": "b"}]}"#,
    ];
    let (_d, p) = write_jsonl(&lines);
    let cfg = DataConfig::new(&p, TemplateKind::Gemma);
    let err = prepare(&cfg, &tok).unwrap_err();
    let msg = err.to_string();
    let f = p.display().to_string();
    for want in [
        format!("{f}:2: field `messages[1].role`: roles must alternate user/assistant/user/... (gemma template): expected assistant, found user"),
        format!("{f}:3: field `messages[2].role`: a system message where the gemma template forbids it"),
        format!("{f}:4: field `messages[0].content`: contains the special token text `<end_of_turn>`"),
    ] {
        assert!(msg.contains(&want), "missing `{want}` in:\n{msg}");
    }
    assert_eq!(err.record_errors().unwrap().len(), 3);
    // The same data is fine for chatml except the special-token text.
    let cfg = DataConfig::new(&p, TemplateKind::ChatMl);
    assert_eq!(
        prepare(&cfg, &tok)
            .unwrap_err()
            .record_errors()
            .unwrap()
            .len(),
        1
    );
    // The alpaca template takes a single exchange only.
    let cfg = DataConfig::new(&p, TemplateKind::Alpaca);
    let msg = prepare(&cfg, &tok).unwrap_err().to_string();
    assert!(msg.contains(&format!("{f}:3: field `messages[2].role`: a system message where the alpaca template forbids it")), "{msg}");
    assert!(
        msg.contains(&format!(
            "{f}:2: field `messages`: the alpaca template takes one user turn"
        )),
        "{msg}"
    );
    // The tokenizer's own (Gemma) template raises on the alternation: its message is reported.
    let cfg = DataConfig::new(&p, TemplateKind::Tokenizer);
    let msg = prepare(&cfg, &tok).unwrap_err().to_string();
    assert!(msg.contains(&format!("{f}:2: field `messages[2]`: the chat template raised: Conversation roles must alternate")), "{msg}");
}

#[test]
fn errors_are_capped_at_20_counted_in_full_and_span_train_and_eval() {
    let tok = common::project_tokenizer();
    let bad: Vec<String> = (0..25)
        .map(|i| format!(r#"{{"instruction": "q{i}", "output": ""}}"#))
        .collect();
    let good = r#"{"instruction": "q", "output": "a"}"#;
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    let eval = dir.path().join("eval.jsonl");
    std::fs::write(&train, format!("{good}\n{}\n", bad.join("\n"))).unwrap();
    std::fs::write(&eval, "{\"instruction\": \"q\"}\n").unwrap();
    let mut cfg = DataConfig::new(&train, TemplateKind::Gemma);
    cfg.eval_path = Some(eval.clone());
    match prepare(&cfg, &tok) {
        Err(DataError::InvalidRecords { errors, total, .. }) => {
            assert_eq!(total, 26);
            assert_eq!(errors.len(), MAX_REPORTED_ERRORS);
            assert_eq!(errors[0].loc.line, 2);
            let msg = DataError::InvalidRecords {
                what: "x".into(),
                errors,
                total,
            }
            .to_string();
            assert!(msg.contains("... and 6 more"), "{msg}");
        }
        other => panic!("expected InvalidRecords, got {other:?}"),
    }
    // Only the eval file is bad: still refused, and the eval path is named.
    std::fs::write(&train, format!("{good}\n{good}\n")).unwrap();
    let msg = prepare(&cfg, &tok).unwrap_err().to_string();
    assert!(
        msg.contains(&format!("{}:1: field `output`: missing", eval.display())),
        "{msg}"
    );
}

#[test]
fn overflow_strategies_and_counts() {
    let tok = common::project_tokenizer();
    let long = "palabra ".repeat(60);
    let lines = [
        r#"{"instruction": "corto", "output": "sí"}"#.to_string(),
        format!(r#"{{"instruction": "largo", "output": "{long}"}}"#),
    ];
    let (_d, p) = write_jsonl(&lines.iter().map(String::as_str).collect::<Vec<_>>());
    let mut cfg = DataConfig::new(&p, TemplateKind::Gemma);
    cfg.max_seq_len = 32;
    let d = prepare(&cfg, &tok).unwrap();
    assert_eq!((d.train.stats.samples, d.train.stats.truncated), (2, 1));
    assert!(d.train.samples.iter().all(|s| s.len() <= 32));
    assert!(d.train.samples[1].truncated);
    cfg.overflow = Overflow::Drop;
    let d = prepare(&cfg, &tok).unwrap();
    assert_eq!(
        (d.train.stats.samples, d.train.stats.dropped_too_long),
        (1, 1)
    );
    cfg.overflow = Overflow::Error;
    let msg = prepare(&cfg, &tok).unwrap_err().to_string();
    assert!(
        msg.contains(&format!("{}:2: ", p.display())) && msg.contains("exceed max_seq_len 32"),
        "{msg}"
    );
    // Truncation that leaves no trained token drops the sample (counted).
    let long_prompt = "palabra ".repeat(60);
    let (_d, p) = write_jsonl(&[
        &format!(r#"{{"instruction": "{long_prompt}", "output": "sí"}}"#),
        r#"{"instruction": "a", "output": "b"}"#,
    ]);
    let mut cfg = DataConfig::new(&p, TemplateKind::Gemma);
    cfg.max_seq_len = 32;
    let d = prepare(&cfg, &tok).unwrap();
    assert_eq!(
        (d.train.stats.samples, d.train.stats.dropped_untrained),
        (1, 1)
    );
}

fn toy_dataset(n: usize) -> TokenizedDataset {
    // Sample i: length 3 + (i·7 mod 11), ids 10·i + k, trained from position 2.
    let samples: Vec<Sample> = (0..n)
        .map(|i| {
            let len = 3 + (i * 7) % 11;
            let ids: Vec<i32> = (0..len).map(|k| (10 * i + k) as i32).collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(k, &x)| if k >= 2 { x } else { IGNORE_INDEX })
                .collect();
            Sample {
                record: i,
                line: i + 1,
                input_ids: ids,
                labels,
                truncated: false,
            }
        })
        .collect();
    let tokens = samples.iter().map(Sample::len).sum();
    let trained = samples.iter().map(Sample::num_trained).sum();
    TokenizedDataset {
        path: "toy.jsonl".into(),
        samples,
        stats: EncodeStats {
            samples: n,
            records: n,
            tokens,
            trained_tokens: trained,
            ..Default::default()
        },
        replay: None,
    }
}

#[test]
#[allow(clippy::needless_range_loop)]
fn packing_never_crosses_samples_and_positions_restart() {
    let ds = toy_dataset(40);
    let cfg = LoaderConfig {
        batch_size: 3,
        packing: true,
        shuffle: true,
        seed: 7,
        drop_last: false,
    };
    let mut dl = DataLoader::new(ds.clone(), 24, 0, cfg).unwrap();
    let mut seen = vec![0usize; 40];
    for _ in 0..dl.batches_per_epoch() {
        let b = dl.next_batch();
        assert_eq!(b.t, 24);
        let tgt = b.shifted_labels();
        let mut trained = 0;
        for r in 0..b.b {
            let row = &b.sample_ids[r];
            let mut j = r * b.t;
            for (seg, &si) in row.iter().enumerate() {
                seen[si] += 1;
                let s = &ds.samples[si];
                for k in 0..s.len() {
                    assert_eq!(b.input_ids[j + k], s.input_ids[k]);
                    assert_eq!(
                        b.position_ids[j + k],
                        k as i32,
                        "positions restart per sample"
                    );
                    assert_eq!(b.segment_ids[j + k], seg as i32);
                    // The target of token k is token k+1 of the SAME sample, never the next one.
                    let want = if k + 1 < s.len() {
                        s.labels[k + 1]
                    } else {
                        IGNORE_INDEX
                    };
                    assert_eq!(tgt[j + k], want);
                }
                trained += s.num_trained();
                j += s.len();
            }
            for k in j..(r + 1) * b.t {
                assert_eq!(
                    (b.segment_ids[k], b.labels[k], tgt[k], b.input_ids[k]),
                    (-1, IGNORE_INDEX, IGNORE_INDEX, 0)
                );
            }
        }
        assert_eq!(b.num_trained, trained);
        assert_eq!(
            b.num_trained,
            tgt.iter().filter(|&&x| x != IGNORE_INDEX).count()
        );
    }
    assert!(
        seen.iter().all(|&c| c == 1),
        "every sample exactly once per epoch"
    );
}

#[test]
fn unpacked_batches_pad_to_the_longest_row() {
    let ds = toy_dataset(5);
    let cfg = LoaderConfig {
        batch_size: 2,
        packing: false,
        shuffle: false,
        seed: 0,
        drop_last: false,
    };
    let dl = DataLoader::new(ds, 64, 0, cfg).unwrap();
    let batches: Vec<Batch> = dl.epoch_batches(0).collect();
    assert_eq!(batches.len(), 3);
    assert_eq!((batches[0].b, batches[0].t), (2, 10)); // lengths 3 and 10
    assert_eq!((batches[2].b, batches[2].t), (1, 9)); // the last, incomplete batch
    assert_eq!(batches[0].sample_ids, vec![vec![0], vec![1]]);
}

#[test]
fn shuffle_is_deterministic_per_seed_and_epoch() {
    assert_eq!(permutation(50, 3, 0), permutation(50, 3, 0));
    assert_ne!(permutation(50, 3, 0), permutation(50, 3, 1));
    assert_ne!(permutation(50, 3, 0), permutation(50, 4, 0));
    let mut p = permutation(50, 3, 0);
    p.sort();
    assert_eq!(p, (0..50).collect::<Vec<_>>());
    let (train, eval) = split_by_fraction((0..100).collect::<Vec<_>>(), 0.1, 9).unwrap();
    assert_eq!((train.len(), eval.len()), (90, 10));
    assert!(eval.windows(2).all(|w| w[0] < w[1]) && eval.iter().all(|e| !train.contains(e)));
    assert_eq!(
        split_by_fraction((0..100).collect::<Vec<_>>(), 0.1, 9)
            .unwrap()
            .1,
        eval
    );
    assert!(split_by_fraction(vec![1], 0.5, 0).is_err());
    assert!(split_by_fraction(vec![1, 2], 1.0, 0).is_err());
}

#[test]
fn cursor_round_trip_resumes_exactly() {
    let ds = toy_dataset(23);
    let cfg = LoaderConfig {
        batch_size: 2,
        packing: true,
        shuffle: true,
        seed: 11,
        drop_last: false,
    };
    let mut a = DataLoader::new(ds.clone(), 20, 0, cfg.clone()).unwrap();
    let per_epoch = a.batches_per_epoch();
    // Run into the second epoch, save, continue.
    for _ in 0..per_epoch + 1 {
        a.next_batch();
    }
    let saved = serde_json::to_string(&a.cursor()).unwrap();
    let expected: Vec<Batch> = (0..per_epoch + 2).map(|_| a.next_batch()).collect();
    let mut b = DataLoader::new(ds.clone(), 20, 0, cfg.clone()).unwrap();
    let c: LoaderCursor = serde_json::from_str(&saved).unwrap();
    assert_eq!((c.epoch, c.position), (1, 1));
    b.restore(&c).unwrap();
    let got: Vec<Batch> = (0..per_epoch + 2).map(|_| b.next_batch()).collect();
    assert_eq!(got, expected);
    // Epochs differ in order but not in content.
    let e1: Vec<Vec<usize>> = a.epoch_batches(1).flat_map(|b| b.sample_ids).collect();
    let e2: Vec<Vec<usize>> = a.epoch_batches(2).flat_map(|b| b.sample_ids).collect();
    assert_ne!(e1, e2);
    // A cursor from other settings is refused.
    let other = DataLoader::new(ds, 20, 0, LoaderConfig { seed: 12, ..cfg }).unwrap();
    assert!(matches!(
        b.restore(&other.cursor()),
        Err(DataError::CursorMismatch { .. })
    ));
}

#[test]
fn eval_fraction_split_through_prepare() {
    let tok = common::project_tokenizer();
    let lines: Vec<String> = (0..20)
        .map(|i| format!(r#"{{"instruction": "pregunta {i}", "output": "respuesta {i}"}}"#))
        .collect();
    let (_d, p) = write_jsonl(&lines.iter().map(String::as_str).collect::<Vec<_>>());
    let mut cfg = DataConfig::new(&p, TemplateKind::Gemma);
    cfg.eval_fraction = Some(0.25);
    let d = prepare(&cfg, &tok).unwrap();
    let eval = d.eval.unwrap();
    assert_eq!((d.train.samples.len(), eval.samples.len()), (15, 5));
    let mut lines: Vec<usize> = d
        .train
        .samples
        .iter()
        .chain(&eval.samples)
        .map(|s| s.line)
        .collect();
    lines.sort();
    assert_eq!(lines, (1..=20).collect::<Vec<_>>());
}

#[test]
fn jinja_template_that_emits_bos_twice_is_rejected() {
    let tok = common::tokenizer_with_template(
        "{% for m in messages %}{{ bos_token }}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}{{ bos_token }}<start_of_turn>assistant\n{% endif %}",
    );
    let t = Template::new(TemplateKind::Tokenizer, &tok).unwrap();
    let body = chat(&[(Role::User, "a"), (Role::Assistant, "b")]);
    let (_, problem) = encode_record(&body, &t, &tok, MaskMode::Assistant).unwrap_err();
    assert!(problem.contains("holds 2 `<bos>` token(s)"), "{problem}");
}

#[test]
fn endless_jinja_template_is_stopped_and_named() {
    // 10^12 loop iterations: without an instruction budget this never returns.
    let tok = common::tokenizer_with_template(
        "{% for i in range(10000) %}{% for j in range(10000) %}{% for k in range(10000) %}{% endfor %}{% endfor %}{% endfor %}",
    );
    let msg = match Template::new(TemplateKind::Tokenizer, &tok) {
        Ok(_) => panic!("an endless template was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains("tokenizer_config.json") && msg.contains("instructions"),
        "{msg}"
    );
}

#[test]
fn shipped_dataset_loads_with_zero_errors() {
    let dir = common::repo_root().join("datasets/academico-riguroso");
    let tok = common::project_tokenizer();
    // (The tokenizer's own Gemma template raises on the records that carry a `system` field.)
    for template in [
        TemplateKind::Gemma,
        TemplateKind::Alpaca,
        TemplateKind::ChatMl,
        TemplateKind::Llama3,
    ] {
        let mut cfg = DataConfig::new(dir.join("train.jsonl"), template);
        cfg.eval_path = Some(dir.join("eval.jsonl"));
        cfg.format = Some(Format::Alpaca);
        let d = prepare(&cfg, &tok).unwrap_or_else(|e| panic!("{template}: {e}"));
        assert!(
            d.train.samples.len() >= 300,
            "{} training samples",
            d.train.samples.len()
        );
        assert!(d.eval.as_ref().unwrap().samples.len() >= 60);
        assert_eq!(
            d.train.stats.dropped_untrained + d.train.stats.dropped_too_long,
            0
        );
    }
}

#[test]
fn trained_tokenizer_has_fixed_special_ids() {
    let texts = [
        "hola mundo",
        "hola a todos",
        "el mundo es grande",
        "todos los días",
    ];
    let tok = train_tokenizer(&texts, 300, &PROJECT_SPECIAL_TOKENS).unwrap();
    for (i, s) in PROJECT_SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(tok.token_to_id(s), Some(i as u32));
    }
    let enc = tok.encode("<bos>hola ñandú<end_of_turn>", false).unwrap();
    assert_eq!(enc.get_ids()[0], 2);
    assert_eq!(*enc.get_ids().last().unwrap(), 5);
    assert_eq!(
        tok.decode(enc.get_ids(), false).unwrap(),
        "<bos>hola ñandú<end_of_turn>"
    );
    assert!(train_tokenizer(&texts, 100, &PROJECT_SPECIAL_TOKENS).is_err());
    // The committed tokenizer: 4096 ids, Gemma's special ids.
    let p = common::project_tokenizer();
    assert_eq!(p.vocab_size(), 4096);
    assert_eq!(
        (p.pad_id(), p.eos().unwrap().id, p.bos().unwrap().id),
        (0, 1, 2)
    );
    assert_eq!(p.token_id("<start_of_turn>"), Some(4));
    assert_eq!(p.token_id("<end_of_turn>"), Some(5));
}

#[test]
fn sharegpt_roles_and_config_parsing() {
    let (_d, p) = write_jsonl(&[
        r#"{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}"#,
        r#"{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}"#,
        r#"{"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}]}"#,
    ]);
    let msg = read_dataset(&p, None).unwrap_err().to_string();
    let f = p.display().to_string();
    assert!(msg.contains(&format!("{f}:2: field `conversations[1].from`: unknown role `bot` (expected system, human, user, gpt or assistant)")), "{msg}");
    assert!(
        msg.contains(&format!(
            "{f}:3: field `conversations[0].value`: expected a string, found a number"
        )),
        "{msg}"
    );
    assert!(!msg.contains(&format!("{f}:1:")), "{msg}");

    // The config section as the trainer's TOML/JSON gives it; unknown keys are refused.
    let cfg: DataConfig = serde_json::from_str(
        r#"{"path": "d.jsonl", "format": "sharegpt", "template": "chatml", "mask": "last-turn", "overflow": "drop", "eval_fraction": 0.1}"#,
    )
    .unwrap();
    assert_eq!(
        (cfg.format, cfg.template, cfg.mask, cfg.overflow),
        (
            Some(Format::ShareGpt),
            TemplateKind::ChatMl,
            MaskMode::LastTurn,
            Overflow::Drop
        )
    );
    assert_eq!(cfg.max_seq_len, 1024);
    assert!(
        serde_json::from_str::<DataConfig>(r#"{"path": "d.jsonl", "templte": "gemma"}"#).is_err()
    );
    assert_eq!("last-turn".parse::<MaskMode>().unwrap(), MaskMode::LastTurn);
    assert_eq!(
        "llama3".parse::<TemplateKind>().unwrap(),
        TemplateKind::Llama3
    );
    assert!("vicuna".parse::<TemplateKind>().is_err());
    let lc: LoaderConfig = serde_json::from_str(r#"{"batch_size": 4}"#).unwrap();
    assert!(lc.shuffle && !lc.packing && !lc.drop_last);

    // eval_path and eval_fraction are exclusive.
    let tok = common::project_tokenizer();
    let mut cfg = DataConfig::new(&p, TemplateKind::ChatMl);
    cfg.eval_path = Some(p.clone());
    cfg.eval_fraction = Some(0.5);
    assert!(matches!(prepare(&cfg, &tok), Err(DataError::Option { .. })));
}

#[test]
fn sharegpt_template_errors_use_the_file_field_names() {
    let tok = common::project_tokenizer();
    let (_d, p) = write_jsonl(&[
        r#"{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]}"#,
    ]);
    let msg = prepare(&DataConfig::new(&p, TemplateKind::Gemma), &tok)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(&format!(
            "{}:1: field `conversations[1].from`: roles must alternate",
            p.display()
        )),
        "{msg}"
    );
}

#[test]
fn unreadable_or_fully_dropped_data_says_why() {
    // Invalid UTF-8: the line and byte column of the first bad byte.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.jsonl");
    std::fs::write(
        &p,
        b"{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"x\xff\", \"output\": \"b\"}\n",
    )
    .unwrap();
    let msg = read_dataset(&p, None).unwrap_err().to_string();
    assert!(
        msg.contains(&format!("{}:2:19: invalid UTF-8", p.display())),
        "{msg}"
    );
    // Values that are not objects, with the format to detect: each one named, not "no records".
    let (_d, p) = write_jsonl(&["7", "[\"x\"]"]);
    let err = read_dataset(&p, None).unwrap_err();
    let msg = err.to_string();
    let f = p.display().to_string();
    assert!(
        msg.contains(&format!("{f}:1: expected a JSON object, found a number"))
            && msg.contains(&format!("{f}:2: expected a JSON object, found an array")),
        "{msg}"
    );
    // Every record dropped by the length handling: the counts and the limit, not "no records".
    let tok = common::project_tokenizer();
    let long_prompt = "palabra ".repeat(60);
    let (_d, p) = write_jsonl(&[&format!(
        r#"{{"instruction": "{long_prompt}", "output": "sí"}}"#
    )]);
    let mut cfg = DataConfig::new(&p, TemplateKind::Gemma);
    cfg.max_seq_len = 32;
    let err = prepare(&cfg, &tok).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::AllDropped {
                records: 1,
                too_long: 0,
                untrained: 1,
                max_seq_len: 32,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_replay_file_is_trained_beside_the_training_file_and_located_in_its_own_file() {
    let tok = common::project_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    let eval = dir.path().join("eval.jsonl");
    let replay = dir.path().join("replay.jsonl");
    std::fs::write(
        &train,
        "{\"instruction\": \"¿a?\", \"output\": \"b\"}\n{\"instruction\": \"¿c?\", \"output\": \"d\"}\n",
    )
    .unwrap();
    std::fs::write(&eval, "{\"instruction\": \"¿e?\", \"output\": \"f\"}\n").unwrap();
    // Text records (another format than the training file's), the second one on line 3.
    std::fs::write(
        &replay,
        "{\"text\": \"El agua hierve.\"}\n\n{\"text\": \"Llueve.\"}\n",
    )
    .unwrap();
    let mut cfg = DataConfig::new(&train, TemplateKind::Gemma);
    cfg.format = Some(Format::Alpaca);
    cfg.eval_path = Some(eval.clone());
    let alone = prepare(&cfg, &tok).unwrap();
    cfg.replay_path = Some(replay.clone());
    let p = prepare(&cfg, &tok).unwrap();
    assert_eq!(
        p.format,
        Format::Alpaca,
        "the training file's format is reported"
    );
    let t = &p.train;
    assert_eq!(t.samples.len(), 4);
    assert_eq!(
        t.samples[..2],
        alone.train.samples[..],
        "the training file's samples come first, unchanged"
    );
    let r = t.replay.as_ref().unwrap();
    assert_eq!(
        (r.first, r.path.clone(), r.stats.samples),
        (2, replay.clone(), 2)
    );
    // Replayed text: BOS + text + EOS, every token after BOS trained.
    let s = &t.samples[3];
    assert_eq!(
        tok.decode(&s.input_ids.iter().map(|&x| x as u32).collect::<Vec<_>>())
            .unwrap(),
        "<bos>Llueve.<eos>"
    );
    assert_eq!(s.num_trained(), s.len() - 1);
    assert_eq!((t.sample_path(3), s.line), (replay.as_path(), 3));
    assert_eq!(t.sample_path(1), train.as_path());
    assert_eq!(
        afinar_data::encode::sample_loc(t, 3).to_string(),
        format!("{}:3", replay.display())
    );
    assert_eq!(t.stats.samples, alone.train.stats.samples + 2);
    assert_eq!(
        t.stats.trained_tokens,
        alone.train.stats.trained_tokens + r.stats.trained_tokens
    );
    assert_eq!(t.samples[3].record, 3, "record indices stay distinct");
    // The eval set is the eval file's alone.
    assert_eq!(p.eval.as_ref().unwrap().samples.len(), 1);
    assert!(p.eval.as_ref().unwrap().replay.is_none());
    // A broken replay record is reported at its own file and line, with the training file's errors.
    std::fs::write(&replay, "{\"text\": \"ok\"}\n{\"text\": 3}\n").unwrap();
    let e = prepare(&cfg, &tok).unwrap_err().to_string();
    assert!(e.contains(&format!("{}:2", replay.display())), "{e}");
}
