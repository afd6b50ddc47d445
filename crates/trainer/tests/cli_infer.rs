//! `afinar eval`, `generate`, `data inspect`, `quantize` through the binary: defaults that adapt to
//! the model, and messages that fit the command.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_afinar"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Rewrites `max_position_embeddings` in the fixture model's config.json.
fn set_max_positions(model: &Path, n: usize) {
    let p = model.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["max_position_embeddings"] = n.into();
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn unset_limits_follow_a_short_model_and_messages_fit_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let c = common::config(dir.path());
    let m = c.model.path.to_str().unwrap().to_string();
    let d = c.data.eval.to_str().unwrap().to_string();
    set_max_positions(&c.model.path, 64);

    // No --max-seq-len: eval takes the model's 64 positions instead of refusing the default 1024.
    let o = run(&["eval", "--model", &m, "--data", &d, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["samples"], 6, "{v}");
    // The same rows as an explicit --max-seq-len 64.
    let o64 = run(&[
        "eval",
        "--model",
        &m,
        "--data",
        &d,
        "--max-seq-len",
        "64",
        "--json",
    ]);
    assert_eq!(o64.status.code(), Some(0), "{}", stderr(&o64));
    assert_eq!(o.stdout, o64.stdout);
    // An explicit value beyond the positions is still refused, naming both numbers.
    let o = run(&["eval", "--model", &m, "--data", &d, "--max-seq-len", "65"]);
    assert_ne!(o.status.code(), Some(0));
    let e = stderr(&o);
    assert!(
        e.contains("65") && e.contains("max_position_embeddings = 64"),
        "{e}"
    );

    // No --max-new-tokens: generate stops at the model's last position instead of refusing 128.
    let o = run(&["generate", "--model", &m, "--prompt", "hola", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let n = v[0]["tokens"].as_u64().unwrap();
    assert!(n >= 1 && n < 64, "{v}");
    let o = run(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "hola",
        "--max-new-tokens",
        "128",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("max_position_embeddings = 64"),
        "{}",
        stderr(&o)
    );

    // data inspect --tokenizer DIR: says what to pass instead of "Is a directory".
    let o = run(&["data", "inspect", "--data", &d, "--tokenizer", &m]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("is a directory")
            && e.contains(&format!("{m}/tokenizer.json"))
            && e.contains(&format!("--model {m}"))
            && !e.contains("os error"),
        "{e}"
    );

    // eval on a file with a bad record: refused, without claiming that anything was trained.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        format!("{}\n{{\"instruction\": \"q\"}}\n", common::records(1, 0)[0]),
    )
    .unwrap();
    let o = run(&["eval", "--model", &m, "--data", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("1 invalid record") && e.contains("bad.jsonl:2") && !e.contains("trained"),
        "{e}"
    );
}
