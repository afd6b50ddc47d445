//! Trainer inputs: the run config TOML with `--set` overrides (`Config::from_toml_str` + `validate`
//! + the renderings written into a run), and a checkpoint directory (`checkpoint::load`).
//!
//! Input: byte 0 bit 0 = which. Config: TOML, SEP, overrides (one `--set` argument a line).
//! Checkpoint: trainer_state.json, SEP, config.toml, SEP, tensors.safetensors.
#![no_main]

use afinar_fuzz::{put, repo_root, scratch, split};
use afinar_trainer::checkpoint;
use afinar_trainer::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
        let parts = split(rest, 2);
        let Ok(text) = std::str::from_utf8(parts[0]) else {
            return;
        };
        let overrides: Vec<String> = match parts.get(1) {
            Some(o) => String::from_utf8_lossy(o)
                .lines()
                .map(str::to_string)
                .collect(),
            None => Vec::new(),
        };
        let Ok(cfg) = Config::from_toml_str(text, "fuzz.toml", &overrides) else {
            return;
        };
        let _ = cfg.validate();
        // validate() stops at a missing model directory or training file first: check the rest of
        // the values with both pointing at the committed demo model and dataset.
        let mut patched = cfg.clone();
        patched.model.path = repo_root().join("models/afinar-demo");
        patched.data.train = repo_root().join("datasets/academico-riguroso/train.jsonl");
        patched.data.eval = Default::default();
        let _ = patched.validate();
        let toml = cfg.to_toml();
        let _ = cfg.flatten();
        let _ = cfg.resume_diff(&cfg);
        let again = Config::from_toml_str(&toml, "written.toml", &[]);
        assert!(
            again.is_ok(),
            "a loaded config re-reads: {:?}\n{toml}",
            again.err()
        );
    } else {
        let parts = split(rest, 3);
        let dir = scratch("ckpt");
        let names = ["trainer_state.json", "config.toml", "tensors.safetensors"];
        for (p, n) in parts.iter().zip(names) {
            put(&dir, n, p);
        }
        if let Ok(c) = checkpoint::load(&dir) {
            let _ = c.state.rng.restore();
        }
    }
});
