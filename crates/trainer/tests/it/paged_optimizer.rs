//! `train.paged_optimizer`: on and off give the same run bit for bit (losses, adapter, AdamW moments),
//! and a checkpoint written with one setting resumes exactly under the other. On the CPU the switch
//! only changes where nothing moves (the state is host memory already); with feature `cuda` the same
//! body runs on the GPU with bf16 activations, where the paged state lives in pinned host memory (it
//! prints `skipped: no CUDA driver` without a driver).

use crate::common;

use crate::common::{adapter, loss_bits, opts};

use afinar_trainer::config::{Device, Dtype};
use afinar_trainer::train;
use afinar_trainer::Resume;

/// The final checkpoint's AdamW moments, as bits, by tensor name.
fn moments(o: &afinar_trainer::TrainOutcome) -> Vec<(String, Vec<u32>, Vec<u32>)> {
    let ck = afinar_trainer::checkpoint::load(&o.checkpoint).unwrap();
    ck.tensors
        .into_iter()
        .map(|(name, t)| {
            let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            (name, bits(&t.m), bits(&t.v))
        })
        .collect()
}

fn body(device: Device, dtype: Dtype) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path());
    cfg.model.device = device;
    cfg.model.dtype = dtype;
    cfg.lora.dropout = 0.1;
    cfg.train.max_steps = 4;
    cfg.train.eval_every = 0;

    cfg.train.paged_optimizer = false;
    cfg.output.run_name = "resident".into();
    let a = train::train(&opts(cfg.clone())).unwrap();

    cfg.train.paged_optimizer = true;
    cfg.output.run_name = "paged".into();
    let b = train::train(&opts(cfg.clone())).unwrap();
    assert_eq!(loss_bits(&a), loss_bits(&b), "losses differ");
    assert_eq!(adapter(&a), adapter(&b), "adapters differ");
    let (ma, mb) = (moments(&a), moments(&b));
    assert!(!ma.is_empty());
    assert_eq!(ma, mb, "AdamW moments differ");
    assert!(
        ma.iter().any(|(_, m, _)| m.iter().any(|&x| x != 0)),
        "the moments were never updated"
    );

    // Paged for two steps, checkpoint, resume resident: the same run.
    cfg.output.run_name = "switched".into();
    let mut o = opts(cfg.clone());
    o.stop_after = Some(2);
    let part = train::train(&o).unwrap();
    assert_eq!(part.summary.steps, 2);
    cfg.train.paged_optimizer = false;
    let mut o = opts(cfg.clone());
    o.resume = Some(Resume::Auto);
    let c = train::train(&o).unwrap();
    assert_eq!(c.summary.steps, 4);
    assert_eq!(
        loss_bits(&a),
        loss_bits(&c),
        "losses differ after a paged → resident resume"
    );
    assert_eq!(
        adapter(&a),
        adapter(&c),
        "adapters differ after a paged → resident resume"
    );
    assert_eq!(
        ma,
        moments(&c),
        "moments differ after a paged → resident resume"
    );
}

#[test]
fn cpu_paged_optimizer_changes_nothing() {
    body(Device::Cpu, Dtype::F32);
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_bf16_paged_optimizer_is_bit_identical() {
    match afinar_kernels::cuda::Cuda::try_new() {
        Ok(Some(_)) => body(Device::Cuda, Dtype::Bf16),
        Ok(None) => eprintln!("skipped: no CUDA driver"),
        Err(e) => panic!("the CUDA backend failed to start: {e}"),
    }
}

#[test]
fn paged_optimizer_key_parses_overrides_and_may_change_on_resume() {
    use afinar_trainer::Config;
    let c = Config::from_toml_str("[train]\npaged_optimizer = true\n", "x.toml", &[]).unwrap();
    assert!(c.train.paged_optimizer);
    assert!(!Config::default().train.paged_optimizer, "default is off");
    let c =
        Config::from_toml_str("", "x.toml", &["train.paged_optimizer=true".to_string()]).unwrap();
    assert!(c.train.paged_optimizer);
    let e = Config::from_toml_str("[train]\npaged_optimizer = \"yes\"\n", "x.toml", &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("train.paged_optimizer"), "{e}");
    // Where the moments live changes no number: a resume may switch it.
    assert!(!Config::is_resume_relevant("train.paged_optimizer"));
    let mut other = c.clone();
    other.train.paged_optimizer = false;
    assert!(c.resume_diff(&other).is_empty());
}
