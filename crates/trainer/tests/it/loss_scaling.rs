//! Dynamic loss scaling in the training loop (train.loss_scaling), on the CPU with a tiny random Gemma-2:
//! scaling without overflow changes nothing; an overflow skips the step, halves the scale and training
//! goes on; overflows do not trigger the non-finite stop while the scale can still back off; the scaler
//! state survives a resume bit for bit.

use crate::common;

use crate::common::opts;

use std::sync::Arc;

use afinar_kernels::cpu::Cpu;
use afinar_trainer::checkpoint;
use afinar_trainer::loss_scale::{LossScalerState, LossScaling};
use afinar_trainer::metrics::StopReason;
use afinar_trainer::train::{self, Faults};
use afinar_trainer::{Resume, TrainOptions, TrainOutcome};

fn run(o: &TrainOptions, overflow_at: &[u64]) -> TrainOutcome {
    let faults = Faults {
        grad_overflow_at_steps: overflow_at.to_vec(),
    };
    train::train_with_faults(Arc::new(Cpu::new()), o, &faults).unwrap()
}

fn adapter(o: &TrainOutcome) -> Vec<u8> {
    std::fs::read(o.run_dir.join("adapter/adapter_model.safetensors")).unwrap()
}

fn scaler_state(o: &TrainOutcome) -> Option<LossScalerState> {
    checkpoint::load(&o.checkpoint).unwrap().state.loss_scale
}

fn base(dir: &std::path::Path) -> afinar_trainer::Config {
    let mut cfg = common::config(dir);
    cfg.data.eval = Default::default();
    cfg.data.eval_fraction = 0.0;
    cfg.train.max_steps = 6;
    cfg
}

/// Power-of-two scaling is exact in f32: grad_scale S/count = S·(1/count), every backward op is linear
/// in the gradient seed, and dividing by S again restores the same bits (nothing here comes near the
/// f32 overflow or subnormal range). So "dynamic" trains the bit-identical adapter of "none".
#[test]
fn dynamic_scaling_without_overflow_is_bit_identical_to_none() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base(dir.path());
    cfg.lora.dropout = 0.1;
    cfg.train.loss_scaling = LossScaling::None;
    cfg.output.run_name = "none".into();
    let a = run(&opts(cfg.clone()), &[]);
    cfg.train.loss_scaling = LossScaling::Dynamic;
    cfg.output.run_name = "dynamic".into();
    let b = run(&opts(cfg.clone()), &[]);
    assert_eq!(adapter(&a), adapter(&b), "adapters differ");
    let bits = |o: &TrainOutcome| {
        o.records
            .iter()
            .map(|r| (r.loss.unwrap().to_bits(), r.grad_norm.unwrap().to_bits()))
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(scaler_state(&a), None);
    assert_eq!(
        scaler_state(&b),
        Some(LossScalerState {
            scale: 65536.0,
            growth_tracker: 6
        })
    );
    // "auto" with an f32 model does not scale.
    cfg.train.loss_scaling = LossScaling::Auto;
    cfg.output.run_name = "auto".into();
    let c = run(&opts(cfg), &[]);
    assert_eq!(scaler_state(&c), None);
    assert_eq!(adapter(&a), adapter(&c));
}

#[test]
fn an_overflow_skips_the_step_halves_the_scale_and_training_continues() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base(dir.path());
    cfg.train.loss_scaling = LossScaling::Dynamic;
    cfg.output.run_name = "clean".into();
    let clean = run(&opts(cfg.clone()), &[]);
    cfg.output.run_name = "overflow".into();
    let o = run(&opts(cfg.clone()), &[2]);
    assert_eq!(o.summary.stop_reason, StopReason::Completed);
    assert_eq!(o.summary.steps, 6);
    assert_eq!(o.summary.skipped_steps, 1);
    let r2 = &o.records[1];
    assert!(r2.skipped && r2.grad_norm.is_none());
    // The loss of the overflow step is finite and is reported; no sample is blamed.
    assert_eq!(
        r2.loss.map(f64::to_bits),
        clean.records[1].loss.map(f64::to_bits)
    );
    assert!(r2.bad_samples.is_empty());
    assert!(o
        .records
        .iter()
        .enumerate()
        .all(|(i, r)| r.skipped == (i == 1)));
    // Step 1 is identical to the clean run; after the skip the runs differ (one update fewer).
    assert_eq!(o.records[0].grad_norm, clean.records[0].grad_norm);
    assert_ne!(adapter(&o), adapter(&clean));
    let ck = checkpoint::load(&o.checkpoint).unwrap();
    assert_eq!(ck.state.adam_t, 5);
    assert_eq!(ck.state.nonfinite_in_row, 0);
    // Halved at step 2, then 4 finite steps.
    assert_eq!(
        ck.state.loss_scale,
        Some(LossScalerState {
            scale: 32768.0,
            growth_tracker: 4
        })
    );
    // The B factors moved (training continued after the skip).
    assert!(ck
        .tensors
        .iter()
        .filter(|(n, _)| n.contains("lora_B"))
        .all(|(_, t)| t.param.iter().any(|&x| x != 0.0)));
}

/// Six overflows in a row under dynamic scaling back the scale off six times and do not stop the run;
/// the same six non-finite steps without scaling stop it after MAX_NONFINITE_IN_ROW = 5.
#[test]
fn overflows_do_not_count_toward_the_non_finite_stop_above_the_floor() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base(dir.path());
    cfg.train.max_steps = 8;
    cfg.train.loss_scaling = LossScaling::Dynamic;
    cfg.output.run_name = "dynamic".into();
    let o = run(&opts(cfg.clone()), &[1, 2, 3, 4, 5, 6]);
    assert_eq!(o.summary.stop_reason, StopReason::Completed);
    assert_eq!(o.summary.steps, 8);
    assert_eq!(o.summary.skipped_steps, 6);
    assert_eq!(
        scaler_state(&o),
        Some(LossScalerState {
            scale: 1024.0,
            growth_tracker: 2
        })
    );
    cfg.train.loss_scaling = LossScaling::None;
    cfg.output.run_name = "none".into();
    let n = run(&opts(cfg), &[1, 2, 3, 4, 5, 6]);
    assert_eq!(n.summary.stop_reason, StopReason::NonFinite);
    assert_eq!(n.summary.steps, train::MAX_NONFINITE_IN_ROW as u64);
    assert!(n.records.iter().all(|r| !r.bad_samples.is_empty()));
}

/// At the floor (scale 1) an overflow is no longer the scaling's doing: it counts like any non-finite
/// step. Reached here by resuming from a checkpoint whose scale was edited down to 2.
#[test]
fn at_the_floor_overflows_count_and_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base(dir.path());
    cfg.train.max_steps = 12;
    cfg.train.loss_scaling = LossScaling::Dynamic;
    let mut o = opts(cfg.clone());
    o.stop_after = Some(1);
    let part = run(&o, &[]);
    let sp = part.checkpoint.join("trainer_state.json");
    let mut st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sp).unwrap()).unwrap();
    st["loss_scale"]["scale"] = 2.0.into();
    std::fs::write(&sp, st.to_string()).unwrap();
    let mut o = opts(cfg);
    o.resume = Some(Resume::Auto);
    // Step 2 backs off 2 → 1 (not counted); steps 3..7 overflow at the floor and count: stop after 5.
    let r = run(&o, &[2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(r.summary.stop_reason, StopReason::NonFinite);
    assert_eq!(r.summary.steps, 7);
    let ck = checkpoint::load(&r.checkpoint).unwrap();
    assert_eq!(ck.state.nonfinite_in_row, 5);
    assert_eq!(ck.state.loss_scale.map(|s| s.scale), Some(1.0));
}

/// k steps + resume equals the straight run, overflow and scaler state included.
#[test]
fn scaler_state_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base(dir.path());
    cfg.train.loss_scaling = LossScaling::Dynamic;
    cfg.output.run_name = "straight".into();
    let a = run(&opts(cfg.clone()), &[2]);
    cfg.output.run_name = "resumed".into();
    let mut o = opts(cfg.clone());
    o.stop_after = Some(3);
    let part = run(&o, &[2]);
    assert_eq!(
        scaler_state(&part),
        Some(LossScalerState {
            scale: 32768.0,
            growth_tracker: 1
        })
    );
    let b_cfg = cfg.clone();
    let mut o = opts(cfg);
    o.resume = Some(Resume::Auto);
    let b = run(&o, &[]);
    assert_eq!(adapter(&a), adapter(&b));
    assert_eq!(scaler_state(&a), scaler_state(&b));
    // A corrupt saved scale is refused by name.
    let sp = b.checkpoint.join("trainer_state.json");
    let mut st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sp).unwrap()).unwrap();
    st["loss_scale"]["scale"] = 0.25.into();
    std::fs::write(&sp, st.to_string()).unwrap();
    let mut o = opts(b_cfg);
    o.resume = Some(Resume::Dir(b.checkpoint.clone()));
    let e = train::train(&o).unwrap_err().to_string();
    assert!(e.contains("loss_scale.scale"), "{e}");
}

#[test]
fn loss_scaling_key_parses_and_is_resume_relevant() {
    use afinar_trainer::Config;
    assert_eq!(Config::default().train.loss_scaling, LossScaling::Auto);
    for (text, want) in [
        ("auto", LossScaling::Auto),
        ("dynamic", LossScaling::Dynamic),
        ("none", LossScaling::None),
    ] {
        let c = Config::from_toml_str(
            &format!("[train]\nloss_scaling = \"{text}\"\n"),
            "x.toml",
            &[],
        )
        .unwrap();
        assert_eq!(c.train.loss_scaling, want);
        let c =
            Config::from_toml_str("", "x.toml", &[format!("train.loss_scaling={text}")]).unwrap();
        assert_eq!(c.train.loss_scaling, want);
    }
    let e = Config::from_toml_str("[train]\nloss_scaling = \"static\"\n", "x.toml", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("train.loss_scaling"), "{e}");
    // It changes the numbers of a run that overflows: a resume may not switch it.
    assert!(Config::is_resume_relevant("train.loss_scaling"));
}

/// model.dtype = "f16" on the GPU: f16 activations with dynamic loss scaling ("auto") train the tiny
/// model to completion; the first step's loss matches the CPU's f32 loss within f16/bf16 rounding.
#[cfg(feature = "cuda")]
#[test]
fn cuda_f16_training_with_dynamic_loss_scaling() {
    match afinar_kernels::cuda::Cuda::try_new() {
        Ok(Some(_)) => {}
        Ok(None) => {
            eprintln!("skipped: no CUDA driver");
            return;
        }
        Err(e) => panic!("the CUDA backend failed to start: {e}"),
    }
    use afinar_trainer::config::{Device, Dtype};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = base(dir.path());
    cfg.output.run_name = "cpu".into();
    let cpu = train::train(&opts(cfg.clone())).unwrap();
    cfg.model.device = Device::Cuda;
    cfg.model.dtype = Dtype::F16;
    cfg.output.run_name = "cuda-f16".into();
    let gpu = train::train(&opts(cfg)).unwrap();
    assert_eq!(gpu.summary.stop_reason, StopReason::Completed);
    assert_eq!(gpu.summary.steps, 6);
    // Overflows (if any) were skipped and backed the scale off; most steps applied an update.
    let st = scaler_state(&gpu).expect("f16 scales the loss under \"auto\"");
    let skipped = gpu.summary.skipped_steps;
    assert!(skipped <= 3, "{skipped} of 6 steps skipped");
    assert_eq!(st.scale, 65536.0 / 2f32.powi(skipped as i32));
    let (a, b) = (cpu.records[0].loss.unwrap(), gpu.records[0].loss.unwrap());
    afinar_kernels::Tolerance::new(1e-2, 2e-2).assert_close("first loss", [b], [a]);
}
