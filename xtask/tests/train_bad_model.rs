//! `cargo xtask train` with an unusable base model: a clear message naming the problem, a non-zero
//! exit, no panic and no stack trace, and nothing started (the check runs before any build or run).

use std::process::Command;

#[test]
fn train_with_a_missing_model_says_what_is_wrong_without_a_panic() {
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("c.toml");
    let missing = t.path().join("no-model");
    std::fs::write(&cfg, format!("[model]\npath = \"{}\"\n", missing.display())).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["train", "--config", cfg.to_str().unwrap()])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("unusable") && err.contains("does not exist"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("stack backtrace"),
        "{err}"
    );
}
