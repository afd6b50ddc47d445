//! End-to-end tests of the `afinar` binary: bad configs, refusals, Ctrl-C + resume, and the
//! eval / generate / data inspect subcommands with --json.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn afinar() -> Command {
    Command::new(env!("CARGO_BIN_EXE_afinar"))
}

fn run(args: &[&str]) -> Output {
    afinar().args(args).output().unwrap()
}

/// `generate --json` output without its timings (prefill/decode tokens per second vary run to run).
fn answers(o: &Output) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for g in v.as_array_mut().unwrap() {
        let g = g.as_object_mut().unwrap();
        assert!(g.remove("prefill_tokens_per_s").is_some());
        assert!(g.remove("decode_tokens_per_s").is_some());
    }
    v
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A config file for the fixtures in `dir`, plus extra TOML appended verbatim.
fn config_file(dir: &Path, extra: &str) -> PathBuf {
    let c = common::config(dir);
    let p = dir.join("run.toml");
    std::fs::write(&p, c.to_toml() + extra).unwrap();
    p
}

#[test]
fn unknown_key_is_named_with_the_nearest_valid_one() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        "[model]\npath = \"m\"\n\n[train]\nlearning_rate = 1e-4\n",
    )
    .unwrap();
    let o = run(&["train", "--config", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("unknown key `train.learning_rate`") && e.contains("bad.toml:5"),
        "{e}"
    );
    // The nearest key by edit distance.
    std::fs::write(&p, "[lora]\nalpah = 16\n").unwrap();
    let e = stderr(&run(&["train", "--config", p.to_str().unwrap()]));
    assert!(e.contains("did you mean `lora.alpha`"), "{e}");
    std::fs::write(&p, "[lora]\nalpha = 16\n").unwrap();
    let e = stderr(&run(&[
        "train",
        "--config",
        p.to_str().unwrap(),
        "--set",
        "lora.alpha=1",
        "--set",
        "trian.lr=1",
    ]));
    assert!(e.contains("unknown key `trian`"), "{e}");
}

#[test]
fn invalid_values_and_missing_paths_are_refused_before_work() {
    let dir = tempfile::tempdir().unwrap();
    let p = config_file(dir.path(), "");
    let ps = p.to_str().unwrap();
    for (set, key) in [
        ("lora.r=0", "lora.r"),
        ("train.lr=0", "train.lr"),
        ("train.lr=-0.001", "train.lr"),
        ("data.eval_fraction=1.0", "data.eval_fraction"),
        ("model.path=/no/such/model", "model.path"),
        ("data.train=/no/such/train.jsonl", "data.train"),
        ("data.template=vicuna", "data.template"),
    ] {
        let mut args = vec!["train", "--config", ps, "--set", set];
        if set.starts_with("data.eval_fraction") {
            args.extend(["--set", "data.eval="]);
        }
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{set}: {}", stderr(&o));
        assert!(stderr(&o).contains(key), "{set}: {}", stderr(&o));
    }
    // Warmup longer than training and max_seq_len below the template are found after reading the data,
    // still before anything is written.
    let o = run(&[
        "train",
        "--config",
        ps,
        "--set",
        "train.max_steps=4",
        "--set",
        "train.warmup_steps=9",
    ]);
    assert!(stderr(&o).contains("warmup"), "{}", stderr(&o));
    let o = run(&["train", "--config", ps, "--set", "data.max_seq_len=6"]);
    assert!(stderr(&o).contains("data.max_seq_len"), "{}", stderr(&o));
    // Absurd sizes are errors naming the key, not allocation aborts (exit 134) or hangs.
    for (sets, needle, code) in [
        (
            &["data.packing=true", "data.max_seq_len=100000000000"][..],
            "max_position_embeddings",
            2,
        ),
        (
            &["train.grad_accum=100000000000"][..],
            "train.grad_accum",
            2,
        ),
        (&["lora.r=100000000000"][..], "r = 100000000000", 1),
    ] {
        let mut args = vec!["train", "--config", ps];
        for s in sets {
            args.extend(["--set", s]);
        }
        let o = run(&args);
        assert_eq!(o.status.code(), Some(code), "{sets:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{sets:?}: {}", stderr(&o));
    }
    assert!(!dir.path().join("runs").exists());
    // The CUDA device in a CPU-only build.
    if !cfg!(feature = "cuda") {
        let o = run(&["train", "--config", ps, "--set", "model.device=cuda"]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("--features cuda"), "{}", stderr(&o));
    }
    // A missing config file.
    let o = run(&["train", "--config", "/no/such.toml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/no/such.toml"));
}

#[test]
fn existing_run_dir_needs_resume_or_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let p = config_file(dir.path(), "");
    let run_dir = dir.path().join("runs/t");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::write(run_dir.join("notes.txt"), "mine").unwrap();
    let o = run(&["train", "--config", p.to_str().unwrap(), "--quiet"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("already exists") && stderr(&o).contains("--overwrite"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_dir(&run_dir).unwrap().count(), 1);
    // --overwrite replaces it and trains.
    let o = run(&[
        "train",
        "--config",
        p.to_str().unwrap(),
        "--quiet",
        "--overwrite",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["stop_reason"], "completed");
    assert!(!run_dir.join("notes.txt").exists());
    assert!(run_dir.join("adapter/adapter_model.safetensors").is_file());
}

fn metrics_lines(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Starts a training child, waits until it has logged `min_steps` steps, sends `sig`, returns its output.
fn interrupt_after(args: &[&str], run_dir: &Path, min_steps: usize, sig: libc::c_int) -> Output {
    let child = afinar()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while metrics_lines(run_dir).len() < min_steps {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the child logged no steps"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) with the pid of a child we spawned and still own (not yet waited for).
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0);
    child.wait_with_output().unwrap()
}

#[test]
fn sigint_checkpoints_and_resume_continues() {
    let dir = tempfile::tempdir().unwrap();
    // Many steps, so the run is still going when the signal arrives.
    let p = config_file(dir.path(), "");
    let ps = p.to_str().unwrap();
    let run_dir = dir.path().join("runs/t");
    let args = [
        "train",
        "--config",
        ps,
        "--set",
        "train.max_steps=100000",
        "--set",
        "train.warmup_steps=0",
    ];
    let o = interrupt_after(&args, &run_dir, 2, libc::SIGINT);
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("resume with: afinar train --config") && e.contains("--resume"),
        "{e}"
    );
    let steps = metrics_lines(&run_dir).len() as u64;
    let cks = afinar_trainer::checkpoint::list(&run_dir.join("checkpoints")).unwrap();
    assert_eq!(
        cks.last().unwrap().0,
        steps,
        "the checkpoint is at the last finished step"
    );

    // Resume: continues at the next step, and a SIGTERM checkpoints like SIGINT.
    let mut rargs = args.to_vec();
    let rd = run_dir.to_str().unwrap().to_string();
    rargs.extend(["--resume", &rd]);
    let o = interrupt_after(&rargs, &run_dir, steps as usize + 2, libc::SIGTERM);
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let m = metrics_lines(&run_dir);
    let ids: Vec<u64> = m.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(
        ids,
        (1..=ids.len() as u64).collect::<Vec<_>>(),
        "steps continue without gaps or repeats"
    );
    assert!(ids.len() as u64 > steps);
    let out = String::from_utf8_lossy(&o.stderr);
    let from = format!(
        "resuming from {} at step {steps}",
        run_dir
            .join("checkpoints")
            .join(format!("step-{steps:08}"))
            .display()
    );
    assert!(out.contains(&from), "{out}");
}

#[test]
fn eval_generate_inspect_json() {
    let dir = tempfile::tempdir().unwrap();
    let c = common::config(dir.path());
    let (m, d) = (
        c.model.path.to_str().unwrap().to_string(),
        c.data.eval.to_str().unwrap().to_string(),
    );
    let o = run(&[
        "eval",
        "--model",
        &m,
        "--data",
        &d,
        "--max-seq-len",
        "128",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    // A random model is close to uniform over V = 320 tokens.
    assert!((loss - (common::VOCAB as f64).ln()).abs() < 1.0, "{v}");
    assert!((v["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-6 * loss.exp());
    assert_eq!(v["samples"], 6);
    // A max_seq_len beyond the model's positions, and a max_new_tokens that could not fit.
    let o = run(&[
        "eval",
        "--model",
        &m,
        "--data",
        &d,
        "--max-seq-len",
        "100000000000",
    ]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("max_position_embeddings"),
        "{}",
        stderr(&o)
    );
    // No batch of zero sequences (it used to be read as 1).
    let o = run(&["eval", "--model", &m, "--data", &d, "--batch-size", "0"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--batch-size"), "{}", stderr(&o));
    let o = run(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "hola",
        "--max-new-tokens",
        "100000000000",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("max_position_embeddings"),
        "{}",
        stderr(&o)
    );
    // An I/O error is printed once, not once per level of the error chain.
    let o = run(&[
        "eval",
        "--model",
        &m,
        "--data",
        &d,
        "--adapter",
        "/no/such/adapter",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert_eq!(e.matches("No such file").count(), 1, "{e}");

    let o = run(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "¿Cuál es la capital de Perú?",
        "--max-new-tokens",
        "5",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["prompt"], "¿Cuál es la capital de Perú?");
    assert!(v[0]["tokens"].as_u64().unwrap() <= 5);
    // Greedy is deterministic.
    let o2 = run(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "¿Cuál es la capital de Perú?",
        "--max-new-tokens",
        "5",
        "--json",
    ]);
    assert_eq!(answers(&o), answers(&o2));
    // --repetition-penalty 1 is off: the same greedy output; an invalid value is a usage error.
    // The command above with one more `--flag=value`.
    let gen_with = |flag: &str| {
        run(&[
            "generate",
            "--model",
            &m,
            "--prompt",
            "¿Cuál es la capital de Perú?",
            "--max-new-tokens",
            "5",
            "--json",
            flag,
        ])
    };
    let gen_rp = |p: &str| gen_with(&format!("--repetition-penalty={p}"));
    let o3 = gen_rp("1");
    assert_eq!(o3.status.code(), Some(0), "{}", stderr(&o3));
    assert_eq!(answers(&o), answers(&o3));
    let o3 = gen_rp("1.3");
    assert_eq!(o3.status.code(), Some(0), "{}", stderr(&o3));
    for bad in ["0", "-1.3", "NaN", "inf"] {
        let o3 = gen_rp(bad);
        assert_eq!(o3.status.code(), Some(2), "{bad}: {}", stderr(&o3));
        assert!(
            stderr(&o3).contains("--repetition-penalty"),
            "{}",
            stderr(&o3)
        );
    }
    // --no-repeat-ngram-size: 0 is off (the same greedy output), 1 bans every id already in the prompt
    // or the output (a different answer on this model), a negative size is a usage error.
    let gen_ng = |n: &str| gen_with(&format!("--no-repeat-ngram-size={n}"));
    let o3 = gen_ng("0");
    assert_eq!(o3.status.code(), Some(0), "{}", stderr(&o3));
    assert_eq!(answers(&o), answers(&o3));
    let o3 = gen_ng("1");
    assert_eq!(o3.status.code(), Some(0), "{}", stderr(&o3));
    assert_ne!(answers(&o), answers(&o3));
    let o3 = gen_ng("-2");
    assert_eq!(o3.status.code(), Some(2), "{}", stderr(&o3));

    let o = run(&[
        "data",
        "inspect",
        "--data",
        &d,
        "--model",
        &m,
        "--max-seq-len",
        "128",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["passed"], true);
    assert_eq!(v["stats"]["samples"], 6);

    // Missing paths.
    let o = run(&["eval", "--model", "/no/model", "--data", &d]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/no/model"));
    let o = run(&["eval", "--model", &m, "--data", "/no/data.jsonl"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/no/data.jsonl"));
}

#[test]
fn merge_and_quantize_produce_loadable_models() {
    let dir = tempfile::tempdir().unwrap();
    let p = config_file(dir.path(), "");
    let o = run(&[
        "train",
        "--config",
        p.to_str().unwrap(),
        "--quiet",
        "--set",
        "train.max_steps=3",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let c = common::config(dir.path());
    let m = c.model.path.to_str().unwrap().to_string();
    let d = c.data.eval.to_str().unwrap().to_string();
    let adapter = dir.path().join("runs/t/adapter");
    let a = adapter.to_str().unwrap();
    let merged = dir.path().join("merged");
    let o = run(&[
        "merge",
        "--model",
        &m,
        "--adapter",
        a,
        "--out",
        merged.to_str().unwrap(),
        "--dtype",
        "f32",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(merged.join("tokenizer.json").is_file());
    let loss = |args: &[&str]| -> f64 {
        let o = run(args);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    let with_adapter = loss(&[
        "eval",
        "--model",
        &m,
        "--adapter",
        a,
        "--data",
        &d,
        "--max-seq-len",
        "128",
        "--json",
    ]);
    let merged_loss = loss(&[
        "eval",
        "--model",
        merged.to_str().unwrap(),
        "--data",
        &d,
        "--max-seq-len",
        "128",
        "--json",
    ]);
    afinar_kernels::Tolerance::new(1e-5, 1e-4).assert_close(
        "merged eval loss",
        [merged_loss],
        [with_adapter],
    );

    let q = dir.path().join("q");
    let o = run(&["quantize", "--model", &m, "--out", q.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(q.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["bnb_4bit_quant_type"], "nf4");
    // A non-empty --out is refused untouched (the export replaces its target directory wholesale).
    let keep = dir.path().join("keep");
    std::fs::create_dir_all(&keep).unwrap();
    std::fs::write(keep.join("notes.txt"), "mine").unwrap();
    for args in [
        vec!["quantize", "--model", &m, "--out", keep.to_str().unwrap()],
        vec![
            "merge",
            "--model",
            &m,
            "--adapter",
            a,
            "--out",
            keep.to_str().unwrap(),
        ],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("not an empty directory"),
            "{}",
            stderr(&o)
        );
        assert_eq!(
            std::fs::read_to_string(keep.join("notes.txt")).unwrap(),
            "mine"
        );
    }
    let ql = loss(&[
        "eval",
        "--model",
        q.to_str().unwrap(),
        "--data",
        &d,
        "--max-seq-len",
        "128",
        "--json",
    ]);
    let base = loss(&[
        "eval",
        "--model",
        &m,
        "--data",
        &d,
        "--max-seq-len",
        "128",
        "--json",
    ]);
    assert!(
        ql.is_finite() && (ql - base).abs() < 0.5,
        "nf4 {ql} vs dense {base}"
    );
    // Bad adapter path.
    let o = run(&[
        "merge",
        "--model",
        &m,
        "--adapter",
        "/no/adapter",
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/no/adapter"));
}
