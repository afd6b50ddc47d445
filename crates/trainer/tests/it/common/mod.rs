//! Shared fixtures for the trainer's integration tests: a tiny random Gemma-2 model directory (config.json,
//! model.safetensors, tokenizer.json, tokenizer_config.json) with a byte-level BPE tokenizer trained
//! in-process on the test data, and small Spanish alpaca datasets with a learnable pattern.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use afinar_gemma::{Gemma2Config, Gemma2Model, LoadOptions};
use afinar_kernels::cpu::Cpu;
use afinar_trainer::{Config, TrainOptions};

pub const VOCAB: usize = 320;

const PAISES: [(&str, &str); 16] = [
    ("Francia", "París"),
    ("España", "Madrid"),
    ("Italia", "Roma"),
    ("Portugal", "Lisboa"),
    ("Alemania", "Berlín"),
    ("Perú", "Lima"),
    ("Chile", "Santiago"),
    ("México", "Ciudad de México"),
    ("Argentina", "Buenos Aires"),
    ("Colombia", "Bogotá"),
    ("Uruguay", "Montevideo"),
    ("Cuba", "La Habana"),
    ("Grecia", "Atenas"),
    ("Japón", "Tokio"),
    ("Egipto", "El Cairo"),
    ("Noruega", "Oslo"),
];

/// Alpaca JSONL lines: questions about capitals with answers in one fixed form.
pub fn records(n: usize, offset: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let (p, c) = PAISES[(i + offset) % PAISES.len()];
            let (instr, out) = if (i + offset).is_multiple_of(3) {
                (
                    format!("¿Cuál es la capital de {p}?"),
                    format!("La capital de {p} es {c}."),
                )
            } else if (i + offset) % 3 == 1 {
                (
                    format!("Dime la capital de {p}."),
                    format!("La capital de {p} es {c}."),
                )
            } else {
                (
                    format!("¿Quién escribió el libro inventado «{p} en {c}»?"),
                    "No lo sé: ese libro no existe en mis fuentes.".to_string(),
                )
            };
            serde_json::json!({ "instruction": instr, "input": "", "output": out }).to_string()
        })
        .collect()
}

/// Writes train.jsonl (n_train) and eval.jsonl (n_eval) into `dir`.
pub fn write_data(dir: &Path, n_train: usize, n_eval: usize) -> (PathBuf, PathBuf) {
    let (t, e) = (dir.join("train.jsonl"), dir.join("eval.jsonl"));
    std::fs::write(&t, records(n_train, 0).join("\n") + "\n").unwrap();
    std::fs::write(&e, records(n_eval, 5).join("\n") + "\n").unwrap();
    (t, e)
}

pub fn tiny_config() -> Gemma2Config {
    // V=320, H=32, I=64, L=2, NH=2, NKV=1, D=16, sliding window 16.
    Gemma2Config::tiny(VOCAB, 32, 64, 2, 2, 1, 16, 16).unwrap()
}

/// A random tiny Gemma-2 in the Hugging Face layout under `dir/model`.
pub fn write_model(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    let opts = LoadOptions {
        seed: 1234,
        ..Default::default()
    };
    let model = Gemma2Model::random(Arc::new(Cpu::new()), tiny_config(), &opts).unwrap();
    // Writes config.json + model.safetensors (the directory is replaced atomically, so the tokenizer
    // files are written after it).
    afinar_trainer::train::save_full_model(&model, Path::new("/nonexistent"), &m).unwrap();
    let mut texts: Vec<String> = records(48, 0);
    texts.extend([
        "<start_of_turn>user\n".to_string(),
        "<end_of_turn>\n<start_of_turn>model\n".to_string(),
    ]);
    let tok =
        afinar_data::train_tokenizer(&texts, VOCAB, &afinar_data::PROJECT_SPECIAL_TOKENS).unwrap();
    tok.save(m.join("tokenizer.json"), false).unwrap();
    std::fs::write(
        m.join("tokenizer_config.json"),
        afinar_data::project_tokenizer_config().to_string(),
    )
    .unwrap();
    m
}

/// A ready-to-run config for the fixtures in `dir` (model, data, output under `dir`).
pub fn config(dir: &Path) -> Config {
    let model = if dir.join("model/config.json").is_file() {
        dir.join("model")
    } else {
        write_model(dir)
    };
    let (t, e) = if dir.join("train.jsonl").is_file() {
        (dir.join("train.jsonl"), dir.join("eval.jsonl"))
    } else {
        write_data(dir, 24, 6)
    };
    let mut c = Config::default();
    c.model.path = model;
    c.data.train = t;
    c.data.eval = e;
    c.data.max_seq_len = 128;
    c.lora.r = 4;
    c.lora.alpha = 8.0;
    c.train.lr = 1e-2;
    c.train.max_steps = 6;
    c.train.micro_batch_size = 2;
    c.train.grad_accum = 2;
    c.train.warmup_steps = 1;
    c.output.dir = dir.join("runs");
    c.output.run_name = "t".into();
    c
}

/// Options of a quiet, fresh run of `c` (no resume, no overwrite, no interruption).
pub fn opts(c: Config) -> TrainOptions {
    TrainOptions {
        config: c,
        resume: None,
        overwrite: false,
        quiet: true,
        stop_after: None,
        force: false,
    }
}

/// The bytes of a finished run's adapter (adapter_model.safetensors).
pub fn adapter(o: &afinar_trainer::TrainOutcome) -> Vec<u8> {
    std::fs::read(o.run_dir.join("adapter/adapter_model.safetensors")).unwrap()
}

/// The bits of every step's training loss.
pub fn loss_bits(o: &afinar_trainer::TrainOutcome) -> Vec<u64> {
    o.records
        .iter()
        .map(|r| r.loss.unwrap().to_bits())
        .collect()
}
