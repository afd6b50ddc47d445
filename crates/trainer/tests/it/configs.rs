//! The shipped configs parse, validate, and say what the docs say they say.

use std::path::{Path, PathBuf};

use afinar_gemma::Target;
use afinar_trainer::config::{Device, Dtype, Quantization, ScheduleKind};
use afinar_trainer::Config;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn load(name: &str) -> Config {
    Config::load(&root().join("configs").join(name), &[]).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn default_demo_config_validates() {
    let mut c = load("default.toml");
    // Paths in configs are relative to the repository root.
    c.model.path = root().join(&c.model.path);
    c.data.train = root().join(&c.data.train);
    c.data.eval = root().join(&c.data.eval);
    c.data.replay = root().join(&c.data.replay);
    c.eval.suite = root().join(&c.eval.suite);
    c.eval.general_text = root().join(&c.eval.general_text);
    c.validate().unwrap();
    // The demo evaluates behaviour, forgetting, the NF4 cost and merge fidelity at the end (and on the base);
    // no evaluations in between (`every = 0`), to stay within its time.
    assert!(c.eval.suite.is_file() && c.eval.general_text.is_file());
    assert!(c.eval.at_end && c.eval.nf4_cost && c.eval.merge_fidelity);
    // Pretraining text replayed beside the SFT records, against forgetting.
    assert!(
        c.data.replay.is_file(),
        "the demo replays its pretraining text"
    );
    assert_eq!(c.model.device, Device::Cpu);
    assert_eq!(c.model.quantization, Quantization::Nf4);
    assert!(
        c.model.path.join("model.safetensors").is_file(),
        "the demo model is shipped"
    );
}

#[test]
fn gemma2_9b_qlora_is_the_seed_recipe() {
    let c = load("gemma2-9b-qlora.toml");
    assert_eq!(c.model.quantization, Quantization::Nf4);
    assert!(c.model.double_quant);
    assert_eq!(c.model.dtype, Dtype::Bf16);
    assert_eq!(c.model.device, Device::Cuda);
    assert_eq!((c.lora.r, c.lora.alpha), (16, 32.0));
    assert_eq!(c.lora.targets, Target::ALL.to_vec());
    assert_eq!(c.train.lr, 2e-4);
    assert_eq!(c.train.schedule, ScheduleKind::Cosine);
    assert_eq!(c.train.warmup_ratio, 0.03);
    assert!((1.0..=3.0).contains(&c.train.epochs) && c.train.max_steps == 0);
}

#[test]
fn other_configs_parse() {
    let c = load("gemma2-2b-lora.toml");
    assert_eq!(c.model.quantization, Quantization::None);
    for name in ["gemma2-2b-lora.toml", "gemma2-9b-qlora.toml"] {
        let c = load(name);
        assert!(root().join(&c.eval.suite).is_file(), "{name}: eval.suite");
        assert!(
            root().join(&c.eval.general_text).is_file(),
            "{name}: eval.general_text"
        );
    }
    let p = load("pretrain-demo.toml");
    assert!(root().join(&p.eval.general_text).is_file());
    assert!(p.model.full_finetune);
    assert_eq!(p.data.format, Some(afinar_data::Format::Text));
}
