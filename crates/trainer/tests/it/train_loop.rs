//! The training loop on a tiny random Gemma-2: accumulation equivalence, a learning run, exact resume,
//! adapter round trip, refusals.

use crate::common;

use crate::common::opts;

use std::sync::Arc;

use afinar_data::{DataLoader, LoaderConfig, TextTokenizer};
use afinar_gemma::{Gemma2Model, Grads};
use afinar_kernels::cpu::Cpu;
use afinar_kernels::Tolerance;
use afinar_trainer::train::{self, accumulate, data_config, load_options};
use afinar_trainer::{Resume, TrainError};
use rand::SeedableRng;

#[test]
fn accumulation_4x1_equals_micro_batch_4() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::config(dir.path());
    let tok = TextTokenizer::from_model_dir(&cfg.model.path).unwrap();
    let data = afinar_data::prepare(&data_config(&cfg), &tok).unwrap();
    let mk = |bs| {
        let lc = LoaderConfig {
            batch_size: bs,
            packing: false,
            shuffle: false,
            seed: 0,
            drop_last: false,
        };
        DataLoader::new(data.train.clone(), 128, tok.pad_id(), lc).unwrap()
    };
    let (mut l1, mut l4) = (mk(1), mk(4));
    let w1: Vec<_> = (0..4).map(|_| l1.next_batch()).collect();
    let w4 = vec![l4.next_batch()];
    assert_eq!(w4[0].b, 4);
    // Rows of different lengths: the micro-batch of 4 is padded, the singles are not.
    assert!(w1.iter().map(|b| b.t).min() != w1.iter().map(|b| b.t).max());
    let model = Gemma2Model::load(
        Arc::new(Cpu::new()),
        &cfg.model.path,
        &load_options(&cfg).unwrap(),
    )
    .unwrap();
    // B = 0 at init gives zero A-gradients; make B non-zero so every LoRA gradient is exercised.
    let mut model = model;
    for name in model.lora_names() {
        if name.contains("lora_B") {
            let n = model.get_tensor(&name).unwrap().len();
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.01)
                .collect();
            model.set_tensor(&name, &v).unwrap();
        }
    }
    let (mut g1, mut g4) = (Grads::zeros(&model).unwrap(), Grads::zeros(&model).unwrap());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (s1, c1) = accumulate(&model, &mut g1, &w1, &mut rng).unwrap();
    let (s4, c4) = accumulate(&model, &mut g4, &w4, &mut rng).unwrap();
    assert_eq!(c1, c4);
    Tolerance::new(1e-6, 1e-5).assert_close("window loss", [s1 / c1 as f64], [s4 / c4 as f64]);
    let mut nonzero = 0;
    for id in g1.ids().to_vec() {
        let (a, b) = (g1.to_host(id).unwrap(), g4.to_host(id).unwrap());
        nonzero += a.iter().filter(|x| **x != 0.0).count();
        Tolerance::new(1e-7, 1e-5).assert_close(&id.name(), a, b);
    }
    assert!(nonzero > 0);
}

#[test]
fn training_lowers_eval_loss_and_adapter_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path());
    cfg.train.max_steps = 30;
    cfg.train.eval_every = 10;
    cfg.train.save_every = 10;
    cfg.train.keep_checkpoints = 2;
    let out = train::train(&opts(cfg.clone())).unwrap();
    let s = &out.summary;
    let (e0, e1) = (s.initial_eval_loss.unwrap(), s.final_eval_loss.unwrap());
    eprintln!(
        "eval loss {e0} → {e1}; train {:?} → {:?}",
        s.first_train_loss, s.final_train_loss
    );
    assert!(e1 < e0 - 0.1, "eval loss {e0} → {e1}");
    assert_eq!(s.steps, 30);
    assert_eq!(out.records.len(), 30);
    assert_eq!(
        out.records.iter().filter(|r| r.eval_loss.is_some()).count(),
        3
    );
    for f in [
        "config.toml",
        "metrics.jsonl",
        "loss.svg",
        "loss.png",
        "summary.json",
        "report.md",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(out.run_dir.join(f).is_file(), "{f} missing");
    }
    let cks = afinar_trainer::checkpoint::list(&out.run_dir.join("checkpoints")).unwrap();
    assert_eq!(cks.iter().map(|c| c.0).collect::<Vec<_>>(), vec![20, 30]);

    // The adapter reproduces the trained model's logits: base + adapter vs base + checkpoint tensors.
    let ck = afinar_trainer::checkpoint::load(&out.checkpoint).unwrap();
    let be = Arc::new(Cpu::new());
    let mut a =
        Gemma2Model::load(be.clone(), &cfg.model.path, &load_options(&cfg).unwrap()).unwrap();
    for (name, t) in &ck.tensors {
        a.set_tensor(name, &t.param).unwrap();
    }
    let mut plain = load_options(&cfg).unwrap();
    plain.lora = None;
    let mut b = Gemma2Model::load(be, &cfg.model.path, &plain).unwrap();
    afinar_gemma::peft::load_adapter(&mut b, out.run_dir.join("adapter")).unwrap();
    let batch = afinar_gemma::Batch::new(1, 6, vec![2, 40, 41, 42, 43, 44], vec![-100; 6]);
    Tolerance::EXACT.assert_close(
        "logits",
        b.logits(&batch).unwrap(),
        a.logits(&batch).unwrap(),
    );
}

#[test]
fn resume_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path());
    cfg.lora.dropout = 0.1; // the dropout RNG must resume too
    cfg.train.max_steps = 6;
    cfg.output.run_name = "straight".into();
    let a = train::train(&opts(cfg.clone())).unwrap();

    cfg.output.run_name = "resumed".into();
    let mut o = opts(cfg.clone());
    o.stop_after = Some(3);
    let part = train::train(&o).unwrap();
    assert_eq!(part.summary.steps, 3);
    assert_eq!(
        part.summary.stop_reason,
        afinar_trainer::metrics::StopReason::Interrupted
    );
    let mut o = opts(cfg.clone());
    o.resume = Some(Resume::Auto);
    let b = train::train(&o).unwrap();
    assert_eq!(b.summary.steps, 6);
    let la: Vec<u64> = a
        .records
        .iter()
        .map(|r| r.loss.unwrap().to_bits())
        .collect();
    let lb: Vec<u64> = b
        .records
        .iter()
        .map(|r| r.loss.unwrap().to_bits())
        .collect();
    assert_eq!(la, lb, "losses differ after resume");
    let gn = |o: &afinar_trainer::TrainOutcome| {
        o.records
            .iter()
            .map(|r| r.grad_norm.unwrap().to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(gn(&a), gn(&b));
    let read =
        |p: &std::path::Path| std::fs::read(p.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(read(&a.run_dir), read(&b.run_dir), "adapters differ");
    assert_eq!(
        a.summary.final_eval_loss.map(f64::to_bits),
        b.summary.final_eval_loss.map(f64::to_bits)
    );

    // Counters edited into impossible values are refused (they overflowed before: adam_t + 1, and the
    // loader's epoch + 1 at the next rollover).
    let ck_src = std::fs::read_dir(b.run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("step-")
        })
        .max()
        .unwrap();
    for (key, sub, value) in [
        ("adam_t", None, u64::MAX),
        ("step", None, u64::MAX),
        ("cursor", Some("epoch"), u64::MAX),
        ("cursor", Some("position"), 0),
    ] {
        let ck = dir
            .path()
            .join(format!("edited-{key}-{}", sub.unwrap_or("")));
        std::fs::create_dir_all(&ck).unwrap();
        for f in ["config.toml", "tensors.safetensors", "trainer_state.json"] {
            std::fs::copy(ck_src.join(f), ck.join(f)).unwrap();
        }
        let sp = ck.join("trainer_state.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&sp).unwrap()).unwrap();
        match sub {
            None => v[key] = value.into(),
            Some(s) => v[key][s] = value.into(),
        }
        std::fs::write(&sp, serde_json::to_vec(&v).unwrap()).unwrap();
        let mut o = opts(cfg.clone());
        o.resume = Some(Resume::Dir(ck));
        match train::train(&o) {
            Err(e @ TrainError::BadCheckpoint { .. }) => {
                assert!(e.to_string().contains(sub.unwrap_or(key)), "{key}: {e}")
            }
            other => panic!(
                "{key}: expected BadCheckpoint, got {:?}",
                other.map(|o| o.run_dir)
            ),
        }
    }

    // A different config is refused, naming the keys.
    let mut c2 = cfg.clone();
    c2.lora.r = 8;
    c2.train.lr = 5e-3;
    let mut o = opts(c2);
    o.resume = Some(Resume::Dir(b.run_dir.clone()));
    match train::train(&o) {
        Err(TrainError::ConfigMismatch { diff, .. }) => assert!(
            diff.contains("lora.r") && diff.contains("train.lr"),
            "{diff}"
        ),
        other => panic!(
            "expected ConfigMismatch, got {:?}",
            other.map(|o| o.run_dir)
        ),
    }
}

#[test]
fn existing_run_dir_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::config(dir.path());
    let run = cfg.output.dir.join(&cfg.output.run_name);
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("precious.txt"), "keep me").unwrap();
    match train::train(&opts(cfg.clone())) {
        Err(e @ TrainError::RunDirExists(_)) => assert!(e.to_string().contains("--resume"), "{e}"),
        other => panic!("expected RunDirExists, got {:?}", other.map(|o| o.run_dir)),
    }
    assert_eq!(
        std::fs::read_to_string(run.join("precious.txt")).unwrap(),
        "keep me"
    );
    assert_eq!(std::fs::read_dir(&run).unwrap().count(), 1);
}

#[test]
fn warmup_longer_than_training_and_template_length_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path());
    cfg.train.max_steps = 0;
    cfg.train.epochs = 1.0;
    cfg.train.warmup_steps = 1000;
    let e = train::train(&opts(cfg.clone())).unwrap_err().to_string();
    assert!(
        e.contains("train.warmup_steps") && e.contains("not shorter"),
        "{e}"
    );
    cfg.train.warmup_steps = 0;
    cfg.data.max_seq_len = 8;
    let e = train::train(&opts(cfg)).unwrap_err().to_string();
    assert!(
        e.contains("data.max_seq_len") && e.contains("template"),
        "{e}"
    );
    assert!(
        !dir.path().join("runs/t").exists(),
        "nothing may be written before validation"
    );
}

#[test]
fn non_finite_steps_are_skipped_logged_and_stop_after_five() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path());
    // Poison the base model: a NaN final-norm offset makes every logit, loss and gradient NaN.
    let be = Arc::new(Cpu::new());
    let mut m =
        Gemma2Model::load(be, &cfg.model.path, &afinar_gemma::LoadOptions::default()).unwrap();
    let h = m.config.hidden_size;
    m.set_tensor("model.norm.weight", &vec![f32::NAN; h])
        .unwrap();
    let poisoned = dir.path().join("poisoned");
    train::save_full_model(&m, &cfg.model.path, &poisoned).unwrap();
    cfg.model.path = poisoned;
    cfg.data.eval = Default::default();
    cfg.data.eval_fraction = 0.0;
    cfg.train.max_steps = 20;
    let out = train::train(&opts(cfg)).unwrap();
    assert_eq!(
        out.summary.stop_reason,
        afinar_trainer::metrics::StopReason::NonFinite
    );
    assert_eq!(out.summary.steps, train::MAX_NONFINITE_IN_ROW as u64);
    assert_eq!(out.summary.skipped_steps, 5);
    for r in &out.records {
        assert!(r.skipped && r.loss.is_none());
        assert!(
            !r.bad_samples.is_empty() && r.bad_samples.iter().all(|s| s.contains("train.jsonl:")),
            "{:?}",
            r.bad_samples
        );
    }
    // No update was applied: the adapter's B factors are still zero.
    let ck = afinar_trainer::checkpoint::load(&out.checkpoint).unwrap();
    assert!(ck
        .tensors
        .iter()
        .filter(|(n, _)| n.contains("lora_B"))
        .all(|(_, t)| t.param.iter().all(|&x| x == 0.0)));
    assert_eq!(ck.state.adam_t, 0);
}

/// A finished run resumed with a larger `train.max_steps` continues where it stopped. Under a schedule
/// that does not depend on the total (constant with warmup), 3 steps + extend to 6 equals 6 straight,
/// bit for bit; under cosine the rest of the run follows the schedule rebuilt for the new total; a
/// total below the saved step is refused by key.
#[test]
fn max_steps_can_be_raised_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path());
    cfg.train.schedule = afinar_trainer::config::ScheduleKind::ConstantWithWarmup;
    cfg.train.max_steps = 6;
    cfg.output.run_name = "straight".into();
    let a = train::train(&opts(cfg.clone())).unwrap();

    cfg.output.run_name = "extended".into();
    cfg.train.max_steps = 3;
    let first = train::train(&opts(cfg.clone())).unwrap();
    assert_eq!(first.summary.steps, 3);
    cfg.train.max_steps = 6;
    let mut o = opts(cfg.clone());
    o.resume = Some(Resume::Auto);
    let b = train::train(&o).unwrap();
    assert_eq!(b.summary.steps, 6);
    let bits = |o: &afinar_trainer::TrainOutcome| {
        o.records
            .iter()
            .map(|r| (r.step, r.loss.unwrap().to_bits(), r.lr.to_bits()))
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&a), bits(&b), "losses or lrs differ after extending");
    let read =
        |p: &std::path::Path| std::fs::read(p.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(read(&a.run_dir), read(&b.run_dir), "adapters differ");

    // Cosine: the extension follows the schedule of the new total from the resume step on.
    cfg.train.schedule = afinar_trainer::config::ScheduleKind::Cosine;
    cfg.output.run_name = "cosine".into();
    cfg.train.max_steps = 3;
    train::train(&opts(cfg.clone())).unwrap();
    cfg.train.max_steps = 5;
    let mut o = opts(cfg.clone());
    o.resume = Some(Resume::Auto);
    let c = train::train(&o).unwrap();
    assert_eq!(c.summary.steps, 5);
    let sched = afinar_trainer::schedule::Schedule {
        kind: afinar_trainer::config::ScheduleKind::Cosine,
        base_lr: cfg.train.lr,
        warmup: 1,
        total: 5,
    };
    let lrs: Vec<f64> = c.records.iter().map(|r| r.lr).collect();
    assert_eq!(lrs.len(), 5);
    for (i, lr) in lrs.iter().enumerate().skip(3) {
        assert_eq!(
            lr.to_bits(),
            sched.lr(i as u64).to_bits(),
            "lr of step {}",
            i + 1
        );
    }
    // Under the old 3-step plan the run had ended at lr 0; the extension must not reuse it.
    assert!(lrs[3] > 0.0);

    // Shortening below where the checkpoint stands is refused, naming the key.
    cfg.train.max_steps = 2;
    let mut o = opts(cfg.clone());
    o.resume = Some(Resume::Auto);
    let err = train::train(&o).unwrap_err();
    assert!(
        matches!(&err, TrainError::Invalid { key, .. } if key == "train.max_steps"),
        "{err}"
    );
    assert!(err.to_string().contains("already at step 5"), "{err}");
}

/// `attention_dropout` ≠ 0 in config.json is refused by name before anything is loaded or written:
/// transformers would apply it while training, afinar's attention has none.
#[test]
fn attention_dropout_is_refused_for_training() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::config(dir.path());
    let cj = cfg.model.path.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cj).unwrap()).unwrap();
    v["attention_dropout"] = serde_json::json!(0.1);
    std::fs::write(&cj, v.to_string()).unwrap();
    let err = train::train(&opts(cfg.clone())).unwrap_err().to_string();
    assert!(err.contains("attention_dropout"), "{err}");
    assert!(err.contains("config.json"), "{err}");
    assert!(!cfg.output.dir.exists(), "nothing may be written");
}

/// A `tokenizer` chat template that prints the date (`strftime_now`, as Llama-3.x templates do) makes
/// token ids depend on the day: the run pins `data.template_date` in its config.toml and a resume without
/// one reuses it (here: a run pinned to 2020-01-01 resumes today), so the data fingerprint still matches;
/// a different explicit date is refused by key.
#[test]
fn template_date_is_pinned_across_resume() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(dir.path());
    let tc = cfg.model.path.join("tokenizer_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tc).unwrap()).unwrap();
    let gemma = v["chat_template"].as_str().unwrap().to_string();
    assert!(gemma.starts_with("{{ bos_token }}"), "{gemma}");
    v["chat_template"] = serde_json::json!(gemma.replacen(
        "{{ bos_token }}",
        "{{ bos_token }}{{ strftime_now('%d %b %Y') }}\n",
        1
    ));
    std::fs::write(&tc, v.to_string()).unwrap();
    cfg.data.template = afinar_data::TemplateKind::Tokenizer;
    cfg.data.template_date = Some("2020-01-01".parse().unwrap());
    let mut o = opts(cfg.clone());
    o.stop_after = Some(2);
    let part = train::train(&o).unwrap();
    assert_eq!(part.summary.steps, 2);
    let saved = std::fs::read_to_string(part.run_dir.join("config.toml")).unwrap();
    assert!(
        saved.contains("template_date = \"2020-01-01T00:00:00\"")
            || saved.contains("template_date = \"2020-01-01\""),
        "{saved}"
    );

    // Resumed with the date left empty: the saved one is used, and the run completes.
    cfg.data.template_date = None;
    let mut o = opts(cfg.clone());
    o.resume = Some(Resume::Auto);
    let done = train::train(&o).unwrap();
    assert_eq!(done.summary.steps, cfg.train.max_steps);

    // An explicit other date changes the data: refused, naming the key.
    cfg.data.template_date = Some("2021-06-30".parse().unwrap());
    cfg.train.max_steps += 2;
    let mut o = opts(cfg.clone());
    o.resume = Some(Resume::Auto);
    let err = train::train(&o).unwrap_err().to_string();
    assert!(err.contains("data.template_date"), "{err}");

    // A fresh run without a date pins the local time it started at.
    cfg.data.template_date = None;
    cfg.output.run_name = "fresh".into();
    let mut o = opts(cfg.clone());
    o.stop_after = Some(1);
    let fresh = train::train(&o).unwrap();
    let c = afinar_trainer::Config::from_toml_str(
        &std::fs::read_to_string(fresh.run_dir.join("config.toml")).unwrap(),
        "config.toml",
        &[],
    )
    .unwrap();
    assert!(c.data.template_date.is_some(), "{:?}", c.data.template_date);

    // A malformed date is refused by key before any work: the config does not load.
    let err = afinar_trainer::Config::from_toml_str(
        "[data]\ntemplate_date = \"2021-02-30\"\n",
        "bad.toml",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("data.template_date"), "{err}");
}
