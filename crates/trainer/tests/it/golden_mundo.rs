//! The demo model (models/afinar-mundo) as transformers reads it: `afinar eval`'s loss on a fixed set
//! of held-out prose equals the loss Gemma2ForCausalLM computes from the same checkpoint
//! (tests/golden/make_mundo_loss.py → tests/golden/fixtures/mundo_loss/). The model is committed and
//! made by `cargo xtask pretrain-demo`; the fixture records its SHA-256, so a regenerated model
//! fails here with the command that remakes the fixture instead of a puzzling loss difference.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn afinar_eval_gives_the_loss_transformers_gives_on_the_demo_model() {
    let model = repo().join("models/afinar-mundo");
    let fixture = repo().join("tests/golden/fixtures/mundo_loss");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("loss.json")).unwrap()).unwrap();
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    let sha: String = Sha256::digest(&weights)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        sha,
        want["model_sha256"].as_str().unwrap(),
        "models/afinar-mundo is not the model the fixture was made from: after `cargo xtask \
         pretrain-demo`, run `/work/venv/bin/python tests/golden/make_mundo_loss.py` (tests/golden/README.md)"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_afinar"))
        .args(["eval", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(fixture.join("prose.jsonl"))
        .args(["--format", "text", "--json", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "afinar eval failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The same tokenization: as many scored targets (BOS + text + EOS, every token after the first).
    assert_eq!(got["tokens"], want["tokens"], "scored token counts differ");
    assert_eq!(got["samples"], want["records"]);
    let (g, w) = (
        got["loss"].as_f64().unwrap(),
        want["loss"].as_f64().unwrap(),
    );
    // Both are f32 forward passes that differ in summation order only; they agreed to ~2e-6 when the
    // fixture was made. 1e-4 leaves room for another CPU's vector width, not for a different model.
    assert!(
        (g - w).abs() <= 1e-4 * w.abs().max(1.0),
        "afinar eval loss {g} vs transformers {w}"
    );
}
