//! `train.profile` and `AFINAR_PROFILE=1`: a profiled run writes profile.json with the ops, roles and
//! passes of the model, in counts that follow from its shape and the number of steps, and shares that
//! add up to the step; it computes bit for bit what an unprofiled run computes; an unprofiled run
//! writes no profile.json. With feature `cuda` the same runs on the GPU, timed by CUDA events (it prints
//! `skipped: no CUDA driver` without a driver).

use crate::common;

use crate::common::{adapter, loss_bits};

use std::process::Command;

use afinar_trainer::config::{Device, Dtype};
use afinar_trainer::train;
use serde_json::Value;

fn read_profile(o: &afinar_trainer::TrainOutcome) -> Value {
    let text = std::fs::read_to_string(o.run_dir.join("profile.json")).expect("profile.json");
    serde_json::from_str(&text).expect("profile.json parses")
}

/// Calls of row `name` in grouping `group` (0 when absent).
fn calls(p: &Value, group: &str, name: &str) -> u64 {
    p[group]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .map_or(0, |r| r["calls"].as_u64().unwrap())
}

/// Calls of (op, role, phase) in the detail rows.
fn detail(p: &Value, op: &str, role: &str, phase: &str) -> u64 {
    p["detail"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["op"] == op && r["role"] == role && r["phase"] == phase)
        .map(|r| r["calls"].as_u64().unwrap())
        .sum()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

/// A profiled run and an unprofiled one of the same config, on `device`: identical numbers, and the
/// profile's counts and shares. `checkpointing` adds the recompute pass.
fn body(device: Device, dtype: Dtype, checkpointing: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path());
    cfg.model.device = device;
    cfg.model.dtype = dtype;
    cfg.lora.dropout = 0.1;
    cfg.train.max_steps = 4;
    cfg.train.eval_every = 2;
    cfg.train.gradient_checkpointing = checkpointing;

    cfg.train.profile = false;
    cfg.output.run_name = "plain".into();
    let a = train::train(&common::opts(cfg.clone())).unwrap();
    assert!(
        !a.run_dir.join("profile.json").exists(),
        "train.profile = false wrote profile.json"
    );

    cfg.train.profile = true;
    cfg.output.run_name = "profiled".into();
    let b = train::train(&common::opts(cfg.clone())).unwrap();
    assert_eq!(loss_bits(&a), loss_bits(&b), "profiling changed the losses");
    assert_eq!(adapter(&a), adapter(&b), "profiling changed the adapter");

    let p = read_profile(&b);
    let timing = if device == Device::Cpu {
        "wall"
    } else {
        "device-events"
    };
    assert_eq!(p["timing"], timing, "{p}");
    assert_eq!(p["steps"], 4);
    // The first step is warm-up; three measured steps of grad_accum = 2 micro-batches each.
    let measured = 3u64;
    assert_eq!(p["measured_steps"], measured);
    let micro = measured * cfg.train.grad_accum as u64;
    let layers = common::tiny_config().num_hidden_layers as u64;
    // Every linear of every layer once forward and once backward per micro-batch (LoRA on all seven);
    // checkpointing recomputes every layer but the last (its activations are still in the workspace).
    let recomputed = if checkpointing { layers - 1 } else { 0 };
    assert_eq!(
        calls(&p, "ops", "lora_fwd"),
        7 * (layers + recomputed) * micro
    );
    assert_eq!(calls(&p, "ops", "lora_bwd"), 7 * layers * micro);
    for role in [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ] {
        assert_eq!(
            detail(&p, "lora_fwd", role, "forward"),
            layers * micro,
            "{role}"
        );
        assert_eq!(
            detail(&p, "lora_bwd", role, "backward"),
            layers * micro,
            "{role}"
        );
        // Each adapted linear draws its dropout mask in every training forward.
        assert_eq!(
            detail(&p, "dropout_mask", role, "forward"),
            layers * micro,
            "{role}"
        );
        assert_eq!(
            detail(&p, "lora_fwd", role, "recompute"),
            recomputed * micro,
            "{role}"
        );
    }
    assert_eq!(
        detail(&p, "attn_fwd", "attention", "forward"),
        layers * micro
    );
    assert_eq!(
        detail(&p, "attn_bwd", "attention", "backward"),
        layers * micro
    );
    // Four norms per layer and the final one.
    assert_eq!(
        detail(&p, "rmsnorm_fwd", "norm", "forward"),
        (4 * layers + 1) * micro
    );
    assert_eq!(
        detail(&p, "rmsnorm_bwd", "norm", "backward"),
        (4 * layers + 1) * micro
    );
    assert_eq!(detail(&p, "lm_head_ce", "lm_head_ce", "backward"), micro);
    assert_eq!(detail(&p, "embedding_fwd", "embed", "forward"), micro);
    // One AdamW update of each LoRA factor per step; the gradient norm reads each gradient once.
    let tensors = 2 * 7 * layers;
    assert_eq!(
        detail(&p, "adamw_step", "optimizer", "other"),
        tensors * measured
    );
    assert_eq!(
        detail(&p, "sum_squares", "grads", "other"),
        tensors * measured
    );
    assert_eq!(
        calls(&p, "roles", "other"),
        0,
        "unlabelled ops: {}",
        p["detail"]
    );
    for l in 0..layers {
        assert!(calls(&p, "layers", &format!("layer {l}")) > 0);
    }
    assert!(calls(&p, "layers", "no layer") > 0);
    // Syncs: the loss of each micro-batch and the gradient norm.
    assert_eq!(calls(&p, "syncs", "lm_head_ce"), micro);
    assert_eq!(calls(&p, "syncs", "sum_squares"), tensors * measured);
    // The scheduled eval and the checkpoint run outside the steps.
    assert!(p["outside_steps"]["calls"].as_u64().unwrap() > 0);

    // Shares: op time + the rest (host gaps on the CPU, device idle on a GPU) = the step's wall time.
    let t = &p["totals"];
    let wall = f(&t["wall_ms"]);
    assert!(wall > 0.0);
    for group in ["ops", "roles", "phases", "layers"] {
        let s: f64 = p[group]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| f(&r["share"]))
            .sum();
        let total = s + f(&t["unaccounted_ms"]) / wall;
        assert!((total - 1.0).abs() < 1e-6, "{group}: shares sum to {total}");
    }
    let linear: f64 = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    .iter()
    .map(|n| {
        let r = p["roles"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == *n);
        f(&r.unwrap()["ms"])
    })
    .sum();
    assert!((f(&t["linear_ms"]) - linear).abs() < 1e-9 * wall);
    let host = f(&t["host_ops_ms"]) + f(&t["host_gaps_ms"]) + f(&t["end_sync_ms"]);
    assert!(
        (host - wall).abs() < 1e-6 * wall,
        "host {host} vs wall {wall}"
    );
    assert!((f(&p["step_ms"]) - wall / measured as f64).abs() < 1e-9 * wall);
}

#[test]
fn cpu_profile_counts_and_changes_nothing() {
    body(Device::Cpu, Dtype::F32, false);
}

#[test]
fn cpu_profile_with_checkpointing_has_the_recompute_pass() {
    body(Device::Cpu, Dtype::F32, true);
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_bf16_profile_counts_and_changes_nothing() {
    match afinar_kernels::cuda::Cuda::try_new() {
        Ok(None) => println!("skipped: no CUDA driver"),
        Ok(Some(_)) => body(Device::Cuda, Dtype::Bf16, true),
        Err(e) => panic!("a CUDA driver is present but the backend failed to start: {e}"),
    }
}

#[test]
fn profile_key_parses_and_may_change_on_resume() {
    use afinar_trainer::Config;
    assert!(!Config::default().train.profile, "default is off");
    let c = Config::from_toml_str("", "x.toml", &["train.profile=true".to_string()]).unwrap();
    assert!(c.train.profile);
    let e = Config::from_toml_str("[train]\nprofile = 1\n", "x.toml", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("train.profile"), "{e}");
    assert!(!Config::is_resume_relevant("train.profile"));
}

/// `AFINAR_PROFILE=1` profiles a command without a run directory: `afinar eval` prints the table and
/// writes `$AFINAR_PROFILE_JSON`; without the variable it prints no table.
#[test]
fn env_profiles_eval() {
    let dir = tempfile::tempdir().unwrap();
    let c = common::config(dir.path());
    let json = dir.path().join("eval-profile.json");
    let run = |profile: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_afinar"));
        cmd.args(["eval", "--model"])
            .arg(&c.model.path)
            .arg("--data")
            .arg(&c.data.eval)
            .args(["--max-seq-len", "128", "--batch-size", "1"])
            .env_remove("AFINAR_PROFILE")
            .env_remove("AFINAR_PROFILE_JSON");
        if profile {
            cmd.env("AFINAR_PROFILE", "1")
                .env("AFINAR_PROFILE_JSON", &json);
        }
        cmd.output().unwrap()
    };
    let o = run(false);
    assert_eq!(o.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("profile ("));
    assert!(!json.exists());
    let o = run(true);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("profile (cpu, wall time): 1 of 1 steps"),
        "{err}"
    );
    let p: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let layers = common::tiny_config().num_hidden_layers as u64;
    // The six eval records in batches of one: every linear of every layer once per batch.
    assert_eq!(calls(&p, "ops", "lora_fwd"), 7 * layers * 6);
    assert_eq!(calls(&p, "ops", "lm_head_ce"), 6);
}
