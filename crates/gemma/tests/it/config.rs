//! config.json parsing: the three released Gemma-2 configs (v4 spellings), a v5 config written by
//! transformers 5.24, and the errors a bad config must produce.

use std::path::{Path, PathBuf};

use afinar_gemma::{Gemma2Config, GemmaError, LayerType, LoraConfig, Target};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn parse(json: &str) -> Result<Gemma2Config, GemmaError> {
    Gemma2Config::from_json_str(json, "test/config.json")
}

fn check_common(c: &Gemma2Config) {
    assert_eq!(c.vocab_size, 256_000);
    assert_eq!(c.sliding_window, 4096);
    assert_eq!(c.final_logit_softcapping, Some(30.0));
    assert_eq!(c.attn_logit_softcapping, Some(50.0));
    assert_eq!(c.rope_theta, 10_000.0);
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert_eq!(c.hidden_activation, "gelu_pytorch_tanh");
    assert_eq!(c.eos_token_ids, vec![1]);
    assert_eq!((c.pad_token_id, c.bos_token_id), (Some(0), Some(2)));
    assert!(c.tie_word_embeddings);
    // Even layers slide, odd layers are global.
    assert_eq!(c.layer_types.len(), c.num_hidden_layers);
    for (i, t) in c.layer_types.iter().enumerate() {
        assert_eq!(
            *t,
            if i % 2 == 0 {
                LayerType::Sliding
            } else {
                LayerType::Full
            },
            "layer {i}"
        );
        assert_eq!(c.window(i), if i % 2 == 0 { Some(4096) } else { None });
    }
    assert_ne!(c.q_dim(), c.hidden_size, "no released Gemma-2 has NH·D = H");
}

#[test]
fn gemma_2_2b() {
    let c = Gemma2Config::from_file(fixture("gemma-2-2b.json")).unwrap();
    check_common(&c);
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (2304, 9216, 26)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (8, 4, 256)
    );
    assert_eq!(c.attn_scale(), 0.0625);
    assert_eq!(c.embed_scale(), 48.0);
    assert_eq!(c.torch_dtype.as_deref(), Some("float32"));
    // Parameter count of gemma-2-2b (index.json total_size / 2 bytes).
    assert_eq!(c.num_parameters(), 2_614_341_888);
}

#[test]
fn gemma_2_9b_it() {
    let c = Gemma2Config::from_file(fixture("gemma-2-9b-it.json")).unwrap();
    check_common(&c);
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (3584, 14336, 42)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (16, 8, 256)
    );
    assert_eq!(c.query_pre_attn_scalar, 256.0);
    assert_eq!(c.embed_scale(), 59.866_52_f32);
    assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
}

#[test]
fn gemma_2_27b() {
    let c = Gemma2Config::from_file(fixture("gemma-2-27b.json")).unwrap();
    check_common(&c);
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (4608, 36864, 46)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (32, 16, 128)
    );
    // The attention scale is query_pre_attn_scalar^-0.5 = 144^-0.5, not head_dim^-0.5.
    assert_eq!(c.query_pre_attn_scalar, 144.0);
    assert_eq!(c.attn_scale(), (1.0f64 / 12.0) as f32);
}

#[test]
fn v5_spelling_matches_v4() {
    let v5 = Gemma2Config::from_file(fixture("gemma-2-2b-v5.json")).unwrap();
    let v4 = Gemma2Config::from_file(fixture("gemma-2-2b.json")).unwrap();
    check_common(&v5);
    assert_eq!(
        v5.torch_dtype.as_deref(),
        Some("bfloat16"),
        "v5 `dtype` key"
    );
    let strip = |mut c: Gemma2Config| {
        c.raw = serde_json::Value::Null;
        c.torch_dtype = None;
        c
    };
    assert_eq!(strip(v5), strip(v4));
}

#[test]
fn rope_parameters_and_explicit_layer_types() {
    let c = parse(
        r#"{"model_type": "gemma2", "num_hidden_layers": 3, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
            "layer_types": ["full_attention", "sliding_attention", "sliding_attention"], "sliding_window_size": 7,
            "final_logit_softcapping": null, "eos_token_id": [1, 107]}"#,
    )
    .unwrap();
    assert_eq!(c.rope_theta, 500.0);
    assert_eq!(
        c.layer_types,
        vec![LayerType::Full, LayerType::Sliding, LayerType::Sliding]
    );
    assert_eq!(c.window(0), None);
    assert_eq!(c.window(2), Some(7));
    assert_eq!(c.final_logit_softcapping, None);
    assert_eq!(
        c.attn_logit_softcapping,
        Some(50.0),
        "absent key takes the class default"
    );
    assert_eq!(c.eos_token_ids, vec![1, 107]);
}

#[test]
fn quantization_config_is_read() {
    let c = parse(
        r#"{"model_type": "gemma2", "quantization_config": {"_load_in_4bit": true, "_load_in_8bit": false,
            "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": true, "load_in_4bit": true, "load_in_8bit": false, "quant_method": "bitsandbytes"}}"#,
    )
    .unwrap();
    let q = c.quantization_config.unwrap();
    assert!(q.load_in_4bit && !q.load_in_8bit && q.bnb_4bit_use_double_quant);
    assert_eq!(
        (q.quant_method.as_str(), q.bnb_4bit_quant_type.as_str()),
        ("bitsandbytes", "nf4")
    );
    assert_eq!(q.bnb_4bit_compute_dtype, "bfloat16");
}

#[test]
fn other_model_type_is_refused() {
    let err = parse(r#"{"model_type": "llama", "hidden_size": 4096}"#).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, GemmaError::UnsupportedModelType { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("\"llama\"") && msg.contains("gemma2") && msg.contains("test/config.json"),
        "{msg}"
    );
    let err = parse(r#"{"hidden_size": 4096}"#).unwrap_err();
    assert!(err.to_string().contains("<missing>"), "{err}");
}

#[test]
fn bad_values_name_the_key() {
    let cases = [
        (
            r#"{"model_type": "gemma2", "hidden_size": "big"}"#,
            "hidden_size",
        ),
        (
            r#"{"model_type": "gemma2", "num_attention_heads": 8, "num_key_value_heads": 3}"#,
            "num_key_value_heads",
        ),
        (
            r#"{"model_type": "gemma2", "num_hidden_layers": 2, "layer_types": ["sliding_attention"]}"#,
            "layer_types",
        ),
        (
            r#"{"model_type": "gemma2", "num_hidden_layers": 1, "layer_types": ["local"]}"#,
            "layer_types[0]",
        ),
        (
            r#"{"model_type": "gemma2", "hidden_activation": "relu"}"#,
            "hidden_activation",
        ),
        (
            r#"{"model_type": "gemma2", "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}"#,
            "rope_parameters.rope_type",
        ),
        (
            r#"{"model_type": "gemma2", "tie_word_embeddings": false}"#,
            "tie_word_embeddings",
        ),
        (r#"{"model_type": "gemma2", "head_dim": 0}"#, "head_dim"),
        (
            r#"{"model_type": "gemma2", "final_logit_softcapping": -1}"#,
            "final_logit_softcapping",
        ),
        (
            r#"{"model_type": "gemma2", "num_hidden_layers": 1000000000000}"#,
            "num_hidden_layers",
        ),
        (
            r#"{"model_type": "gemma2", "use_bidirectional_attention": true}"#,
            "use_bidirectional_attention",
        ),
        (
            r#"{"model_type": "gemma2", "rms_norm_eps": -1}"#,
            "rms_norm_eps",
        ),
        (r#"{"model_type": "gemma2", "rope_theta": 0}"#, "rope_theta"),
        (
            r#"{"model_type": "gemma2", "rope_parameters": {"rope_theta": -5}}"#,
            "rope_theta",
        ),
        (
            r#"{"model_type": "gemma2", "vocab_size": 1000000000000}"#,
            "vocab_size",
        ),
    ];
    for (json, key) in cases {
        let err = parse(json).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&format!("`{key}`")), "{json} → {msg}");
    }
    let err = parse("{not json").unwrap_err();
    assert!(matches!(err, GemmaError::Json { .. }), "{err}");
    let err = Gemma2Config::from_file(fixture("does-not-exist.json")).unwrap_err();
    assert!(err.to_string().contains("does-not-exist.json"), "{err}");
}

#[test]
fn lora_config_targets() {
    let l = LoraConfig::new(16, 32.0, 0.05, false, &["all-linear"]).unwrap();
    assert_eq!(l.targets, Target::ALL.to_vec());
    assert_eq!(l.scale(), 2.0);
    let l = LoraConfig::new(
        16,
        32.0,
        0.0,
        true,
        &["v_proj", "self_attn.q_proj", "v_proj"],
    )
    .unwrap();
    assert_eq!(l.targets, vec![Target::QProj, Target::VProj]);
    assert_eq!(l.scale(), 8.0, "rsLoRA: α/√r");
    let err = LoraConfig::new(8, 8.0, 0.0, false, &["q_proj", "qkv_proj"]).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("qkv_proj") && msg.contains("gate_proj") && msg.contains("all-linear"),
        "{msg}"
    );
    assert!(LoraConfig::new(0, 8.0, 0.0, false, &["q_proj"]).is_err());
    assert!(LoraConfig::new(8, 8.0, 1.0, false, &["q_proj"]).is_err());
    assert!(LoraConfig::new::<&str>(8, 8.0, 0.0, false, &[]).is_err());
}

#[test]
fn lora_init_matches_peft_distribution() {
    // A ~ U(±1/√in): the bound holds, the values are spread over it, and the stream depends on
    // (seed, layer, target) only.
    let a = afinar_gemma::lora::init_a(7, 3, Target::UpProj, 8, 256);
    let bound = 1.0 / 16.0;
    assert!(a.iter().all(|&x| x.abs() <= bound));
    let max = a.iter().fold(0f32, |m, &x| m.max(x.abs()));
    assert!(max > 0.9 * bound, "{max}");
    let mean = a.iter().sum::<f32>() / a.len() as f32;
    assert!(mean.abs() < 0.1 * bound, "{mean}");
    assert_eq!(a, afinar_gemma::lora::init_a(7, 3, Target::UpProj, 8, 256));
    assert_ne!(a, afinar_gemma::lora::init_a(7, 2, Target::UpProj, 8, 256));
    assert_ne!(a, afinar_gemma::lora::init_a(8, 3, Target::UpProj, 8, 256));
}

#[test]
fn attention_dropout_is_refused_for_training_only() {
    // Released configs have 0.0: trainable.
    let c = Gemma2Config::from_file(fixture("gemma-2-2b.json")).unwrap();
    assert_eq!(c.attention_dropout, 0.0);
    c.check_trainable(Path::new("m/config.json")).unwrap();
    // A non-zero value parses (evaluation and generation ignore it, as transformers does outside
    // training) but training refuses it, naming the key and the file.
    let c = parse(r#"{"model_type": "gemma2", "attention_dropout": 0.1}"#).unwrap();
    assert_eq!(c.attention_dropout, 0.1);
    let err = c.check_trainable(Path::new("m/config.json")).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, GemmaError::Config { key, .. } if key == "attention_dropout"),
        "{msg}"
    );
    assert!(
        msg.contains("m/config.json") && msg.contains("0.1"),
        "{msg}"
    );
    // Not a probability: refused when the config is read, as torch's dropout would refuse it.
    for bad in ["-0.1", "1.5"] {
        let err = parse(&format!(
            r#"{{"model_type": "gemma2", "attention_dropout": {bad}}}"#
        ))
        .unwrap_err();
        assert!(err.to_string().contains("attention_dropout"), "{err}");
    }
}
