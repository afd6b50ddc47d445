//! Generation: greedy tokens equal transformers' `generate(do_sample=False)` on the fixture model
//! (sliding_window 6 < 8 prompt + 20 new tokens, so the window matters), KV-cache decoding equals a full
//! recompute at every step, stop ids, sampling options, bad input.

use crate::io_common::*;
use afinar_gemma::generate::{generate, Decoder, GenerateOptions, StopReason};
use afinar_gemma::model::Batch;
use afinar_gemma::peft::load_adapter;
use afinar_gemma::{Gemma2Model, LoadOptions, Quantization};
use afinar_kernels::cpu::Cpu;
use afinar_kernels::Tolerance;

/// Logits of the last position of `seq`, recomputed from scratch by the training forward.
fn full_last_logits(model: &Gemma2Model<Cpu>, seq: &[i32]) -> Vec<f32> {
    let t = seq.len();
    let all = model
        .logits(&Batch::new(1, t, seq.to_vec(), vec![-100; t]))
        .unwrap();
    let v = model.config.vocab_size;
    all[(t - 1) * v..].to_vec()
}

#[test]
fn greedy_matches_transformers_generate() {
    let model = load_model(&LoadOptions::default());
    let c = cases();
    assert!(model.config.sliding_window < 8 + 20);
    for i in 0..2 {
        let prompt = ints(&c, &format!("gen_prompt_{i}"));
        let want = ints(&c, &format!("gen_tokens_{i}"));
        let got = generate(&model, &prompt, &GenerateOptions::greedy(20)).unwrap();
        assert_eq!(got.tokens, want, "prompt {i}");
        assert_eq!(got.stop, StopReason::MaxNewTokens);
    }
}

#[test]
fn greedy_with_peft_adapter_matches_transformers() {
    let mut model = load_model(&LoadOptions::default());
    load_adapter(&mut model, adapter_a()).unwrap();
    let c = cases();
    let got = generate(
        &model,
        &ints(&c, "gen_prompt_0"),
        &GenerateOptions::greedy(20),
    )
    .unwrap();
    assert_eq!(got.tokens, ints(&c, "gen_tokens_a_0"));
}

#[test]
fn kv_cache_equals_full_recompute_at_every_step() {
    // NF4 base + LoRA adapter: the decode path goes through the same LoRA linear as training.
    let mut model = load_model(&LoadOptions {
        quantize: Quantization::Nf4 { double_quant: true },
        ..LoadOptions::default()
    });
    load_adapter(&mut model, adapter_a()).unwrap();
    let c = cases();
    let mut seq = ints(&c, "gen_prompt_1");
    let w = model.config.sliding_window;
    let mut dec = Decoder::new(&model);
    // Prefill in two chunks (5 + 3 tokens) to exercise T > 1 with a non-empty cache.
    dec.feed(&seq[..5]).unwrap();
    let mut logits = dec.feed(&seq[5..]).unwrap();
    for step in 0..16 {
        Tolerance::F32.assert_close(
            &format!("step {step} logits"),
            logits.iter().copied(),
            full_last_logits(&model, &seq),
        );
        // Sliding layers hold at most W entries; full layers hold everything.
        assert_eq!(dec.cache().layer_len(0), seq.len().min(w), "step {step}");
        assert_eq!(dec.cache().layer_len(1), seq.len(), "step {step}");
        let next = logits
            .iter()
            .enumerate()
            .fold(0, |b, (i, &x)| if x > logits[b] { i } else { b }) as i32;
        seq.push(next);
        logits = dec.feed(&[next]).unwrap();
    }
    assert_eq!(dec.position(), seq.len());
}

#[test]
fn stops_on_eos_and_extra_stop_ids() {
    let model = load_model(&LoadOptions::default());
    let c = cases();
    // The EOS ids default to config.json's eos_token_id.
    assert_eq!(
        GenerateOptions::greedy_for(&model, 20).eos_token_ids,
        vec![1]
    );
    // Stop on an EOS id: take the 3rd greedy token of prompt 1 as the EOS id.
    let want = ints(&c, "gen_tokens_1");
    let eos = want[2];
    let first = want.iter().position(|&t| t == eos).unwrap();
    let opts = GenerateOptions {
        eos_token_ids: vec![eos],
        ..GenerateOptions::greedy(20)
    };
    let got = generate(&model, &ints(&c, "gen_prompt_1"), &opts).unwrap();
    assert_eq!(got.tokens, want[..=first].to_vec());
    assert_eq!(got.stop, StopReason::Eos(eos));

    // An end-of-turn style stop id: the 4th greedy token of prompt 0.
    let want = ints(&c, "gen_tokens_0");
    let stop = want[3];
    let first = want.iter().position(|&t| t == stop).unwrap();
    let opts = GenerateOptions {
        stop_token_ids: vec![stop],
        ..GenerateOptions::greedy(20)
    };
    let got = generate(&model, &ints(&c, "gen_prompt_0"), &opts).unwrap();
    assert_eq!(got.tokens, want[..=first].to_vec());
    assert_eq!(got.stop, StopReason::StopToken(stop));

    // max_new_tokens bounds the output.
    let got = generate(
        &model,
        &ints(&c, "gen_prompt_0"),
        &GenerateOptions::greedy(3),
    )
    .unwrap();
    assert_eq!(got.tokens, want[..3].to_vec());
    assert!(generate(&model, &[2], &GenerateOptions::greedy(0))
        .unwrap()
        .tokens
        .is_empty());
}

#[test]
fn sampling_options() {
    let model = load_model(&LoadOptions::default());
    let c = cases();
    let prompt = ints(&c, "gen_prompt_0");
    let greedy = ints(&c, "gen_tokens_0");
    let sample = |temperature, top_k, top_p, seed| {
        let o = GenerateOptions {
            temperature,
            top_k,
            top_p,
            seed,
            ..GenerateOptions::greedy(20)
        };
        generate(&model, &prompt, &o).unwrap().tokens
    };
    // top_k = 1 and a vanishing top_p reduce sampling to greedy.
    assert_eq!(sample(1.0, 1, 1.0, 5), greedy);
    assert_eq!(sample(0.7, 0, 1e-6, 5), greedy);
    // Same seed → same tokens; another seed → other tokens (for these fixed seeds).
    let a = sample(1.5, 0, 1.0, 1);
    assert_eq!(a, sample(1.5, 0, 1.0, 1));
    assert_ne!(a, sample(1.5, 0, 1.0, 2));
    assert_ne!(a, greedy);
    assert!(a
        .iter()
        .all(|&t| t >= 0 && (t as usize) < model.config.vocab_size));
}

#[test]
fn bad_input_is_an_error() {
    let model = load_model(&LoadOptions::default());
    let err = generate(&model, &[], &GenerateOptions::greedy(5))
        .unwrap_err()
        .to_string();
    assert!(err.contains("empty"), "{err}");
    let err = generate(&model, &[2, 97], &GenerateOptions::greedy(5))
        .unwrap_err()
        .to_string();
    assert!(err.contains("97") && err.contains("[0, 97)"), "{err}");
    let err = generate(&model, &[2, -3], &GenerateOptions::greedy(5))
        .unwrap_err()
        .to_string();
    assert!(err.contains("-3"), "{err}");
    let o = GenerateOptions {
        temperature: -0.5,
        ..GenerateOptions::greedy(5)
    };
    assert!(generate(&model, &[2], &o)
        .unwrap_err()
        .to_string()
        .contains("temperature"));
    // An absurd max_new_tokens (or a prompt longer than the model's positions) is an error up front,
    // not a huge allocation or an endless decode.
    let max_pos = model.config.max_position_embeddings;
    for (prompt, max_new) in [
        (vec![2], usize::MAX),
        (vec![2], 100_000_000_000),
        (vec![2; 3], max_pos - 2),
    ] {
        let err = generate(&model, &prompt, &GenerateOptions::greedy(max_new))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("max_position_embeddings") && err.contains(&max_pos.to_string()),
            "{err}"
        );
    }
    // A failed feed leaves the decoder usable and unchanged.
    let mut dec = Decoder::new(&model);
    dec.feed(&[2, 5]).unwrap();
    assert!(dec.feed(&[500]).is_err());
    assert_eq!(dec.position(), 2);
    let l = dec.feed(&[7]).unwrap();
    Tolerance::F32.assert_close(
        "after error",
        l.iter().copied(),
        full_last_logits(&model, &[2, 5, 7]),
    );
}

#[test]
fn repetition_penalty_greedy_matches_a_full_recompute() {
    // Reference: recompute the logits of the whole sequence each step, penalize every id of the
    // sequence so far (prompt + generated, each once) as transformers does, take the argmax.
    let model = load_model(&LoadOptions::default());
    let c = cases();
    let prompt = ints(&c, "gen_prompt_0");
    let p = 1.3f32;
    let opts = GenerateOptions {
        repetition_penalty: p,
        ..GenerateOptions::greedy(12)
    };
    let got = generate(&model, &prompt, &opts).unwrap().tokens;
    let mut seq = prompt.clone();
    for _ in 0..12 {
        let mut l = full_last_logits(&model, &seq);
        let mut seen = vec![false; l.len()];
        for &t in &seq {
            seen[t as usize] = true;
        }
        for (x, s) in l.iter_mut().zip(&seen) {
            if *s {
                *x = if *x > 0.0 { *x / p } else { *x * p };
            }
        }
        let next = l
            .iter()
            .enumerate()
            .fold(0, |b, (i, &x)| if x > l[b] { i } else { b }) as i32;
        seq.push(next);
    }
    assert_eq!(got, seq[prompt.len()..].to_vec());
    // The penalty changes the greedy output of this prompt (else the test would not test it).
    assert_ne!(got, ints(&c, "gen_tokens_0")[..12].to_vec());
}

#[test]
fn repetition_penalty_matches_transformers_generate() {
    // tests/golden/make_gemma_io_rp.py: generate(do_sample=False, repetition_penalty=1.3) on the fixture.
    let golden =
        afinar_gemma::TensorStore::open_files(&[fixtures().join("gemma_io_rp.safetensors")])
            .expect("open gemma_io_rp.safetensors");
    let model = load_model(&LoadOptions::default());
    let c = cases();
    for i in 0..2 {
        let opts = GenerateOptions {
            repetition_penalty: 1.3,
            ..GenerateOptions::greedy(20)
        };
        let got = generate(&model, &ints(&c, &format!("gen_prompt_{i}")), &opts).unwrap();
        assert_eq!(
            got.tokens,
            ints(&golden, &format!("gen_tokens_rp_{i}")),
            "prompt {i}"
        );
    }
}

#[test]
fn no_repeat_ngram_size_matches_transformers_generate() {
    // tests/golden/make_generate_ngram.py: generate(do_sample=False, no_repeat_ngram_size=n) on the
    // fixture, n = 1, 2, 3, and n = 2 with repetition_penalty=1.3 (the ban applied after the penalty).
    let golden =
        afinar_gemma::TensorStore::open_files(&[fixtures().join("generate_ngram.safetensors")])
            .expect("open generate_ngram.safetensors");
    let model = load_model(&LoadOptions::default());
    let c = cases();
    for i in 0..2 {
        let prompt = ints(&c, &format!("gen_prompt_{i}"));
        let run = |n: usize, rp: f32| {
            let opts = GenerateOptions {
                no_repeat_ngram_size: n,
                repetition_penalty: rp,
                ..GenerateOptions::greedy(20)
            };
            generate(&model, &prompt, &opts).unwrap().tokens
        };
        for n in 1..=3 {
            let got = run(n, 1.0);
            assert_eq!(
                got,
                ints(&golden, &format!("gen_tokens_ng{n}_{i}")),
                "prompt {i}, n = {n}"
            );
            // The ban changes this output (else the comparison would not test it).
            assert_ne!(
                got,
                ints(&c, &format!("gen_tokens_{i}")),
                "prompt {i}, n = {n}"
            );
        }
        let got = run(2, 1.3);
        assert_eq!(
            got,
            ints(&golden, &format!("gen_tokens_ng2_rp_{i}")),
            "prompt {i}, n = 2, repetition_penalty 1.3"
        );
        assert_ne!(got, ints(&golden, &format!("gen_tokens_ng2_{i}")));
    }
}
