//! PEFT adapters: adapters saved by peft 0.21.2 load here and give transformers + peft's logits; our
//! saved adapters round-trip and carry peft's key set; mismatches and broken files are clear errors.

use std::collections::BTreeMap;

use crate::io_common::*;
use afinar_gemma::model::Batch;
use afinar_gemma::peft::{
    load_adapter, save_adapter, PeftAdapter, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME,
};
use afinar_gemma::safetensors_io::{write_safetensors, TensorOut};
use afinar_gemma::{Gemma2Model, LoadOptions, LoraConfig, Target, TensorStore};
use afinar_kernels::cpu::Cpu;
use afinar_kernels::Tolerance;
use serde_json::Value;

/// The issue's logits tolerance: 1e-4 relative (plus a tiny absolute floor for logits near 0).
const LOGITS: Tolerance = Tolerance::new(1e-5, 1e-4);

/// The fixture batch [2, 10] as a Batch (targets unused for logits).
fn batch() -> Batch {
    let ids = ints(&cases(), "input_ids");
    Batch::new(2, 10, ids.clone(), vec![-100; ids.len()])
}

fn logits(model: &Gemma2Model<Cpu>) -> Vec<f32> {
    model.logits(&batch()).unwrap()
}

#[test]
fn base_model_matches_transformers() {
    let model = load_model(&LoadOptions::default());
    LOGITS.assert_close(
        "logits_base",
        logits(&model),
        floats(&cases(), "logits_base").0,
    );
}

#[test]
fn peft_adapter_all_linear_gives_peft_logits() {
    let mut model = load_model(&LoadOptions::default());
    let cfg = load_adapter(&mut model, adapter_a()).unwrap();
    assert_eq!((cfg.r, cfg.lora_alpha, cfg.use_rslora), (4, 8.0, false));
    assert_eq!(model.lora.as_ref().unwrap().targets, Target::ALL.to_vec());
    let got = logits(&model);
    LOGITS.assert_close(
        "logits_adapter_a",
        got.iter().copied(),
        floats(&cases(), "logits_adapter_a").0,
    );
    // The adapter changes the output (B is non-zero), so this is not the base model passing by accident.
    let base = floats(&cases(), "logits_base").0;
    assert!(got.iter().zip(&base).any(|(a, b)| (a - b).abs() > 0.1));
}

#[test]
fn peft_adapter_rslora_module_paths_gives_peft_logits() {
    let mut model = load_model(&LoadOptions::default());
    let cfg = load_adapter(&mut model, adapter_b()).unwrap();
    // peft writes target_modules from a set: any order.
    let mut tm = cfg.target_modules.clone();
    tm.sort();
    assert_eq!(
        tm,
        vec![
            "self_attn.q_proj".to_string(),
            "self_attn.v_proj".to_string()
        ]
    );
    assert!(cfg.use_rslora);
    assert_eq!(
        model.lora.as_ref().unwrap().targets,
        vec![Target::QProj, Target::VProj]
    );
    // rsLoRA: s = α/√r = 4/√2.
    let s = model.layers[0]
        .linear(Target::QProj)
        .lora
        .as_ref()
        .unwrap()
        .scale;
    assert_eq!(s, (4.0f64 / 2f64.sqrt()) as f32);
    LOGITS.assert_close(
        "logits_adapter_b",
        logits(&model),
        floats(&cases(), "logits_adapter_b").0,
    );
}

#[test]
fn adapter_into_a_lora_model_checks_rank_and_targets() {
    // Same rank and targets: accepted, factors overwritten.
    let lora = LoraConfig::new(4, 16.0, 0.0, false, &["all-linear"]).unwrap();
    let mut model = load_model(&LoadOptions {
        lora: Some(lora),
        ..LoadOptions::default()
    });
    load_adapter(&mut model, adapter_a()).unwrap();
    assert_eq!(
        model.lora.as_ref().unwrap().alpha,
        8.0,
        "α is the adapter's"
    );
    LOGITS.assert_close(
        "logits_adapter_a",
        logits(&model),
        floats(&cases(), "logits_adapter_a").0,
    );

    // Another rank.
    let lora = LoraConfig::new(8, 16.0, 0.0, false, &["all-linear"]).unwrap();
    let mut model = load_model(&LoadOptions {
        lora: Some(lora),
        ..LoadOptions::default()
    });
    let err = load_adapter(&mut model, adapter_a())
        .unwrap_err()
        .to_string();
    assert!(err.contains("r = 4") && err.contains("r = 8"), "{err}");

    // Other targets.
    let lora = LoraConfig::new(4, 8.0, 0.0, false, &["q_proj", "v_proj"]).unwrap();
    let mut model = load_model(&LoadOptions {
        lora: Some(lora),
        ..LoadOptions::default()
    });
    let err = load_adapter(&mut model, adapter_a())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("targets") && err.contains("gate_proj") && err.contains("[q_proj, v_proj]"),
        "{err}"
    );
    // The failed load left the model's own LoRA untouched.
    assert_eq!(model.lora.as_ref().unwrap().r, 4);
    assert!(model.layers[0].linear(Target::KProj).lora.is_none());
}

#[test]
fn saved_adapter_round_trips_with_peft_key_set() {
    let mut model = load_model(&LoadOptions::default());
    load_adapter(&mut model, adapter_a()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    save_adapter(&model, &dir, Some("google/gemma-2-9b")).unwrap();
    // Saving again over an existing directory replaces it (atomic rename), leaving no temporaries.
    save_adapter(&model, &dir, Some("google/gemma-2-9b")).unwrap();
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["adapter".to_string()]);
    if let Some(root) = std::env::var_os("AFINAR_IO_EXPORT_DIR") {
        // For check_gemma_io_export.py, which loads it with peft.
        save_adapter(
            &model,
            std::path::PathBuf::from(root).join("adapter_saved"),
            Some("google/gemma-2-9b"),
        )
        .unwrap();
    }

    // adapter_config.json: exactly the keys peft 0.21.2 wrote for the fixture, sorted, indent 2.
    let ours: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG_NAME)).unwrap())
            .unwrap();
    let peft: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter_a().join(ADAPTER_CONFIG_NAME)).unwrap(),
    )
    .unwrap();
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    let mut peft_keys = keys(&peft);
    peft_keys.sort();
    assert_eq!(keys(&ours), peft_keys);
    for k in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "bias",
        "fan_in_fan_out",
        "inference_mode",
    ] {
        assert_eq!(ours[k], peft[k], "key {k}");
    }
    assert_eq!(ours["base_model_name_or_path"], "google/gemma-2-9b");
    let text = std::fs::read_to_string(dir.join(ADAPTER_CONFIG_NAME)).unwrap();
    assert!(
        text.starts_with("{\n  \"alora_invocation_tokens\": null,\n"),
        "{text}"
    );

    // adapter_model.safetensors: F32, {"format": "pt"}, peft's tensor names and shapes.
    let st = TensorStore::open_files(&[dir.join(ADAPTER_WEIGHTS_NAME)]).unwrap();
    let reference = TensorStore::open_files(&[adapter_a().join(ADAPTER_WEIGHTS_NAME)]).unwrap();
    assert_eq!(
        st.metadata(0).unwrap().get("format").map(String::as_str),
        Some("pt")
    );
    assert_eq!(st.names(), reference.names());
    for name in reference.names() {
        let (a, b) = (st.info(name).unwrap(), reference.info(name).unwrap());
        assert_eq!((a.dtype, &a.shape), (b.dtype, &b.shape), "{name}");
        assert_eq!(
            st.read_f32(name).unwrap(),
            reference.read_f32(name).unwrap(),
            "{name}"
        );
    }

    // Loads back into a fresh model with identical logits.
    let mut again = load_model(&LoadOptions::default());
    load_adapter(&mut again, &dir).unwrap();
    assert_eq!(logits(&again), logits(&model));
    assert_eq!(
        PeftAdapter::load(&dir).unwrap().tensors,
        PeftAdapter::load(adapter_a()).unwrap().tensors
    );
}

/// Copies adapter `src` to `dst`, renaming every tensor with `rename` (values unchanged).
fn copy_adapter_renamed(
    src: &std::path::Path,
    dst: &std::path::Path,
    rename: impl Fn(&str) -> Option<String>,
) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join(ADAPTER_CONFIG_NAME), dst.join(ADAPTER_CONFIG_NAME)).unwrap();
    let st = TensorStore::open_files(&[src.join(ADAPTER_WEIGHTS_NAME)]).unwrap();
    let outs: Vec<TensorOut> = st
        .names()
        .into_iter()
        .filter_map(|n| {
            let info = st.info(n).unwrap();
            rename(n).map(|new| TensorOut::f32(new, info.shape.clone(), &st.read_f32(n).unwrap()))
        })
        .collect();
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    write_safetensors(&dst.join(ADAPTER_WEIGHTS_NAME), &outs, Some(&meta)).unwrap();
}

#[test]
fn accepts_default_adapter_name_and_missing_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("renamed");
    copy_adapter_renamed(&adapter_a(), &dir, |n| {
        let n = n
            .strip_prefix("base_model.model.")
            .unwrap()
            .replace(".lora_A.weight", ".lora_A.default.weight");
        Some(n.replace(".lora_B.weight", ".lora_B.default.weight"))
    });
    let a = PeftAdapter::load(&dir).unwrap();
    assert_eq!(a.tensors, PeftAdapter::load(adapter_a()).unwrap().tensors);
}

#[test]
fn broken_adapters_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();

    // A missing lora_B.
    let dir = tmp.path().join("no_b");
    copy_adapter_renamed(&adapter_a(), &dir, |n| {
        (n != "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight").then(|| n.to_string())
    });
    let err = PeftAdapter::load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"),
        "{err}"
    );

    // A target present in only some layers.
    let dir = tmp.path().join("partial");
    copy_adapter_renamed(&adapter_b(), &dir, |n| {
        (!n.contains("layers.1.self_attn.v_proj")).then(|| n.to_string())
    });
    let err = PeftAdapter::load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("v_proj") && err.contains("[0]") && err.contains("0..2"),
        "{err}"
    );

    // A layer index far beyond any model.
    let dir = tmp.path().join("huge_layer");
    copy_adapter_renamed(&adapter_b(), &dir, |n| {
        Some(n.replace("layers.1.", "layers.18446744073709551615."))
    });
    let err = PeftAdapter::load(&dir).unwrap_err().to_string();
    assert!(err.contains("18446744073709551615"), "{err}");

    // target_modules that disagree with the tensors.
    let dir = tmp.path().join("targets");
    copy_adapter_renamed(&adapter_b(), &dir, |n| Some(n.to_string()));
    let p = dir.join(ADAPTER_CONFIG_NAME);
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["target_modules"] = serde_json::json!(["q_proj", "k_proj", "v_proj"]);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let err = PeftAdapter::load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("target_modules") && err.contains("k_proj"),
        "{err}"
    );
    // An unknown module name lists the valid ones.
    cfg["target_modules"] = serde_json::json!(["q_proj", "lm_head"]);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let err = PeftAdapter::load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("lm_head") && err.contains("gate_proj"),
        "{err}"
    );
    // r in the config that disagrees with the tensors.
    cfg["target_modules"] = serde_json::json!(["q_proj", "v_proj"]);
    cfg["r"] = serde_json::json!(3);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let err = PeftAdapter::load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("lora_A.weight") && err.contains("[3, 64]") && err.contains("[2, 64]"),
        "{err}"
    );

    // A truncated weights file.
    let dir = tmp.path().join("truncated");
    copy_adapter_renamed(&adapter_a(), &dir, |n| Some(n.to_string()));
    let w = dir.join(ADAPTER_WEIGHTS_NAME);
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let err = PeftAdapter::load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("truncated"),
        "{err}"
    );

    // No directory at all.
    let err = PeftAdapter::load(tmp.path().join("nope"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter_config.json"), "{err}");

    // An adapter for another model (hidden size 64 vs a model of width 16) names the tensor.
    let cfg = afinar_gemma::Gemma2Config::tiny(97, 16, 64, 2, 4, 2, 32, 6).unwrap();
    let mut other = Gemma2Model::random(backend(), cfg, &LoadOptions::default()).unwrap();
    let err = load_adapter(&mut other, adapter_a())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lora_A.weight") && err.contains("[4, 16]"),
        "{err}"
    );
}
