//! `afinar plan` on the CPU against measured memory: for three small models whose buffers dominate
//! the process's own noise, a child process (this test binary, re-run with AFINAR_PLAN_RSS_CASE set)
//! builds the model, runs a training forward + backward, an AdamW step and an evaluation pass, and
//! reports its peak RSS (VmHWM) minus its RSS before the model existed. The plan must be within ±15 %.
//!
//! The model is built in memory (`Gemma2Model::random`), so the peak is the training phase's and not
//! the loader's (which also maps the checkpoint file). Linux only (reads /proc/self/status).

use std::sync::Arc;

use afinar_gemma::{Batch, Gemma2Config, Gemma2Model, Grads, LoadOptions, LoraConfig, Target};
use afinar_kernels::cpu::Cpu;
use afinar_kernels::{AdamW, Backend};
use afinar_trainer::config::{Device, Dtype, Quantization};
use afinar_trainer::plan::{plan, PlanSettings};

struct Case {
    name: &'static str,
    cfg: fn() -> Gemma2Config,
    nf4: bool,
    dropout: f64,
    checkpointing: bool,
    b: usize,
    t: usize,
}

const CASES: [Case; 3] = [
    // Activations dominate: no checkpointing, every layer's LayerActs kept.
    Case {
        name: "dense LoRA, no checkpointing, 4 × 128",
        cfg: || Gemma2Config::tiny(512, 256, 1024, 6, 4, 2, 64, 256).unwrap(),
        nf4: false,
        dropout: 0.0,
        checkpointing: false,
        b: 4,
        t: 128,
    },
    // Weights dominate: f32 linears and embedding, checkpointing, LoRA dropout masks.
    Case {
        name: "dense LoRA with dropout, checkpointing, 1 × 64",
        cfg: || Gemma2Config::tiny(4096, 512, 2048, 6, 8, 4, 64, 128).unwrap(),
        nf4: false,
        dropout: 0.1,
        checkpointing: true,
        b: 1,
        t: 64,
    },
    // NF4 base: the embedding and the LM head's cross-entropy chunk dominate.
    Case {
        name: "NF4 LoRA, checkpointing, 1 × 128, V = 32000",
        cfg: || Gemma2Config::tiny(32000, 256, 1024, 4, 4, 1, 64, 256).unwrap(),
        nf4: true,
        dropout: 0.0,
        checkpointing: true,
        b: 1,
        t: 128,
    },
];

const CHILD: &str = "AFINAR_PLAN_RSS_CASE";

/// A field of /proc/self/status in bytes (VmRSS, VmHWM).
fn status_bytes(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(key)).unwrap();
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

fn lora_targets() -> Vec<Target> {
    Target::ALL.to_vec()
}

/// The child: build, train one step, evaluate; print the peak RSS growth.
fn child(c: &Case) {
    let before = status_bytes("VmRSS:");
    let be = Arc::new(Cpu::new());
    let names: Vec<&str> = lora_targets().iter().map(|t| t.name()).collect();
    let opts = LoadOptions {
        quantize: if c.nf4 {
            afinar_gemma::Quantization::Nf4 { double_quant: true }
        } else {
            afinar_gemma::Quantization::None
        },
        lora: Some(LoraConfig::new(8, 16.0, c.dropout, false, &names).unwrap()),
        seed: 3,
        ..Default::default()
    };
    let cfg = (c.cfg)();
    let v = cfg.vocab_size as i32;
    let mut model = Gemma2Model::random(be.clone(), cfg, &opts).unwrap();
    model.checkpointing = c.checkpointing;
    let mut grads = Grads::zeros(&model).unwrap();
    let n = c.b * c.t;
    let ids: Vec<i32> = (0..n).map(|i| (i as i32 * 7919) % v).collect();
    let targets: Vec<i32> = (0..n).map(|i| (i as i32 * 104729 + 1) % v).collect();
    let batch = Batch::new(c.b, c.t, ids, targets);
    model
        .forward_backward(&batch, 1.0 / n as f32, &mut grads)
        .unwrap();
    // AdamW state and one step over every trainable tensor.
    let hp = AdamW {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
    };
    let ids = model.trainable_ids();
    let mut states = Vec::new();
    for id in &ids {
        let len = be.len(grads.get(*id).unwrap());
        states.push(be.adam_state(len, false).unwrap());
    }
    for (id, st) in ids.iter().zip(states.iter_mut()) {
        let g = grads.get(*id).unwrap();
        let p = model.param_mut(*id).unwrap();
        be.adamw_step(p, g, st, &hp).unwrap();
    }
    // The eval pass runs while the training workspace is kept.
    model.loss(&batch).unwrap();
    let peak = status_bytes("VmHWM:");
    println!("RSS_GROWTH {} END", peak.saturating_sub(before));
}

#[test]
fn plan_matches_measured_peak_rss_on_the_cpu() {
    if let Ok(i) = std::env::var(CHILD) {
        child(&CASES[i.parse::<usize>().unwrap()]);
        return;
    }
    if !std::path::Path::new("/proc/self/status").is_file() {
        eprintln!("skipped: no /proc/self/status on this system");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    // This test's full name inside the one test binary (`plan_rss::…`), for the child's --exact filter.
    let module = module_path!()
        .split_once("::")
        .map_or(module_path!(), |(_, m)| m);
    let name = format!("{module}::plan_matches_measured_peak_rss_on_the_cpu");
    for (i, c) in CASES.iter().enumerate() {
        let o = std::process::Command::new(&exe)
            .args(["--exact", name.as_str(), "--nocapture", "--test-threads=1"])
            .env(CHILD, i.to_string())
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{}: child failed\n{out}\n{}",
            c.name,
            String::from_utf8_lossy(&o.stderr)
        );
        let measured: u64 = out
            .lines()
            .find_map(|l| l.split("RSS_GROWTH ").nth(1))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{}: no RSS_GROWTH line in\n{out}", c.name));
        let s = PlanSettings {
            device: Device::Cpu,
            dtype: Dtype::F32,
            quantization: if c.nf4 {
                Quantization::Nf4
            } else {
                Quantization::None
            },
            double_quant: true,
            full_finetune: false,
            lora_r: 8,
            lora_targets: lora_targets(),
            lora_dropout: c.dropout > 0.0,
            micro_batch: c.b,
            seq_len: c.t,
            gradient_checkpointing: c.checkpointing,
            paged_optimizer: false,
            eval: true,
            nf4_cost: false,
            merge_fidelity: false,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let predicted = plan(&(c.cfg)(), &s).peak;
        let ratio = predicted as f64 / measured as f64;
        eprintln!(
            "{}: predicted {:.1} MiB, measured {:.1} MiB (ratio {ratio:.3})",
            c.name,
            predicted as f64 / 1048576.0,
            measured as f64 / 1048576.0
        );
        assert!(
            (0.85..=1.15).contains(&ratio),
            "{}: predicted {predicted} B vs measured {measured} B",
            c.name
        );
    }
}

const MERGE_CHILD: &str = "AFINAR_PLAN_RSS_MERGE";

/// The merge-fidelity phase on the CPU: a child builds an NF4 LoRA model (B non-zero), then runs
/// `suite::merge_fidelity` on [`afinar_trainer::suite::MERGE_PROMPTS`] prompts of `T` tokens and
/// reports its peak RSS (VmHWM) minus its RSS just before the check; the plan's
/// `merge_fidelity_extra` (prompts of seq_len = T) must be within ±15 % of it.
#[test]
fn merge_fidelity_plan_matches_measured_rss_on_the_cpu() {
    const T: usize = 128;
    let cfg = || Gemma2Config::tiny(32000, 256, 1024, 4, 4, 1, 64, 256).unwrap();
    if std::env::var(MERGE_CHILD).is_ok() {
        let be = Arc::new(Cpu::new());
        let names: Vec<&str> = lora_targets().iter().map(|t| t.name()).collect();
        let opts = LoadOptions {
            quantize: afinar_gemma::Quantization::Nf4 { double_quant: true },
            lora: Some(LoraConfig::new(8, 16.0, 0.0, false, &names).unwrap()),
            seed: 3,
            ..Default::default()
        };
        let mut model = Gemma2Model::random(be, cfg(), &opts).unwrap();
        for id in model.lora_ids() {
            if let afinar_gemma::ParamId::LoraB { .. } = id {
                let name = id.name();
                let n = model.get_tensor(&name).unwrap().len();
                model.set_tensor(&name, &vec![0.01; n]).unwrap();
            }
        }
        let prompts: Vec<Vec<i32>> = (0..afinar_trainer::suite::MERGE_PROMPTS)
            .map(|p| {
                (0..T)
                    .map(|i| ((i * 7919 + p * 13) % 32000) as i32)
                    .collect()
            })
            .collect();
        let before = status_bytes("VmRSS:");
        let m = afinar_trainer::suite::merge_fidelity(&model, &prompts)
            .unwrap()
            .unwrap();
        assert!(m.max_abs_logit_diff.is_finite());
        let peak = status_bytes("VmHWM:");
        println!("RSS_GROWTH {} END", peak.saturating_sub(before));
        return;
    }
    if !std::path::Path::new("/proc/self/status").is_file() {
        eprintln!("skipped: no /proc/self/status on this system");
        return;
    }
    let module = module_path!()
        .split_once("::")
        .map_or(module_path!(), |(_, m)| m);
    let name = format!("{module}::merge_fidelity_plan_matches_measured_rss_on_the_cpu");
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name.as_str(), "--nocapture", "--test-threads=1"])
        .env(MERGE_CHILD, "1")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "child failed\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let measured: u64 = out
        .lines()
        .find_map(|l| l.split("RSS_GROWTH ").nth(1))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no RSS_GROWTH line in\n{out}"));
    let s = PlanSettings {
        device: Device::Cpu,
        dtype: Dtype::F32,
        quantization: Quantization::Nf4,
        double_quant: true,
        full_finetune: false,
        lora_r: 8,
        lora_targets: lora_targets(),
        lora_dropout: false,
        micro_batch: 1,
        seq_len: T,
        gradient_checkpointing: true,
        paged_optimizer: false,
        eval: true,
        nf4_cost: false,
        merge_fidelity: true,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let predicted = plan(&cfg(), &s).merge_fidelity_extra;
    let ratio = predicted as f64 / measured as f64;
    eprintln!(
        "merge fidelity: predicted {:.1} MiB, measured {:.1} MiB (ratio {ratio:.3})",
        predicted as f64 / 1048576.0,
        measured as f64 / 1048576.0
    );
    assert!(
        (0.85..=1.15).contains(&ratio),
        "predicted {predicted} B vs measured {measured} B"
    );
}
