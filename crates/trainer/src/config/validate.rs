//! Value checks of a config that need nothing but the config (and the existence of its paths).

use super::{Config, ConfigError, ScheduleKind, MAX_GRAD_ACCUM};

impl Config {
    /// Value checks that need nothing but the config. Paths are checked for existence too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let inv = |key: &str, value: String, reason: &str| ConfigError::Invalid {
            key: key.into(),
            value,
            reason: reason.into(),
        };
        let l = &self.lora;
        let t = &self.train;
        let d = &self.data;
        if self.model.path.as_os_str().is_empty() {
            return Err(inv("model.path", "\"\"".into(), "required: a Hugging Face model directory (config.json, *.safetensors, tokenizer.json)"));
        }
        if !self.model.path.is_dir() {
            return Err(inv(
                "model.path",
                format!("{:?}", self.model.path),
                "no such directory",
            ));
        }
        if !self.model.path.join("config.json").is_file() {
            return Err(inv(
                "model.path",
                format!("{:?}", self.model.path),
                "the directory has no config.json",
            ));
        }
        if d.train.as_os_str().is_empty() {
            return Err(inv(
                "data.train",
                "\"\"".into(),
                "required: a JSON/JSONL training file",
            ));
        }
        if !d.train.is_file() {
            return Err(inv("data.train", format!("{:?}", d.train), "no such file"));
        }
        if !d.eval.as_os_str().is_empty() && !d.eval.is_file() {
            return Err(inv("data.eval", format!("{:?}", d.eval), "no such file"));
        }
        if !d.replay.as_os_str().is_empty() && !d.replay.is_file() {
            return Err(inv(
                "data.replay",
                format!("{:?}", d.replay),
                "no such file",
            ));
        }
        if !self.model.full_finetune {
            if l.r == 0 {
                return Err(inv(
                    "lora.r",
                    "0".into(),
                    "the LoRA rank must be ≥ 1 (typical 8–64)",
                ));
            }
            if !(l.alpha.is_finite() && l.alpha > 0.0) {
                return Err(inv(
                    "lora.alpha",
                    l.alpha.to_string(),
                    "must be a finite number > 0 (typical 2·r)",
                ));
            }
            if !(0.0..1.0).contains(&l.dropout) {
                return Err(inv(
                    "lora.dropout",
                    l.dropout.to_string(),
                    "must be in [0, 1)",
                ));
            }
            if l.targets.is_empty() {
                return Err(inv(
                    "lora.targets",
                    "[]".into(),
                    "name at least one target module",
                ));
            }
        }
        if d.max_seq_len < 2 {
            return Err(inv(
                "data.max_seq_len",
                d.max_seq_len.to_string(),
                "must be ≥ 2 tokens",
            ));
        }
        if !(0.0..1.0).contains(&d.eval_fraction) {
            return Err(inv(
                "data.eval_fraction",
                d.eval_fraction.to_string(),
                "must be in [0, 1): a split of 1 leaves no training data",
            ));
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return Err(inv(
                "train.lr",
                t.lr.to_string(),
                "the learning rate must be > 0 (QLoRA typical 2e-4)",
            ));
        }
        if t.micro_batch_size == 0 {
            return Err(inv("train.micro_batch_size", "0".into(), "must be ≥ 1"));
        }
        if t.grad_accum == 0 {
            return Err(inv("train.grad_accum", "0".into(), "must be ≥ 1"));
        }
        if t.grad_accum > MAX_GRAD_ACCUM {
            return Err(inv(
                "train.grad_accum",
                t.grad_accum.to_string(),
                &format!(
                    "must be ≤ {MAX_GRAD_ACCUM}: the window's micro-batches are held in memory together \
                     (raise train.micro_batch_size instead)"
                ),
            ));
        }
        if t.max_steps == 0 && !(t.epochs.is_finite() && t.epochs > 0.0) {
            return Err(inv(
                "train.epochs",
                t.epochs.to_string(),
                "must be > 0 when train.max_steps = 0",
            ));
        }
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            return Err(inv(
                "train.warmup_ratio",
                t.warmup_ratio.to_string(),
                "must be in [0, 1)",
            ));
        }
        if t.warmup_steps > 0 && t.warmup_ratio > 0.0 {
            return Err(inv(
                "train.warmup_steps",
                t.warmup_steps.to_string(),
                "set warmup_steps or warmup_ratio, not both",
            ));
        }
        if t.max_steps > 0 && t.warmup_steps >= t.max_steps && t.schedule != ScheduleKind::Constant
        {
            return Err(inv(
                "train.warmup_steps",
                t.warmup_steps.to_string(),
                &format!(
                    "warmup is longer than training (train.max_steps = {})",
                    t.max_steps
                ),
            ));
        }
        for (i, b) in t.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return Err(inv(
                    &format!("train.betas[{i}]"),
                    b.to_string(),
                    "must be in [0, 1)",
                ));
            }
        }
        if !(t.eps.is_finite() && t.eps > 0.0) {
            return Err(inv(
                "train.eps",
                t.eps.to_string(),
                "must be > 0 (typical 1e-8)",
            ));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(inv(
                "train.weight_decay",
                t.weight_decay.to_string(),
                "must be ≥ 0",
            ));
        }
        if !(t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0) {
            return Err(inv(
                "train.max_grad_norm",
                t.max_grad_norm.to_string(),
                "must be ≥ 0 (0 = no clipping)",
            ));
        }
        if t.keep_checkpoints == 0 {
            return Err(inv(
                "train.keep_checkpoints",
                "0".into(),
                "must be ≥ 1 (resume needs one)",
            ));
        }
        if t.log_every == 0 {
            return Err(inv("train.log_every", "0".into(), "must be ≥ 1"));
        }
        if self.output.run_name.contains('/')
            || self.output.run_name.contains('\\')
            || self.output.run_name == ".."
        {
            return Err(inv(
                "output.run_name",
                format!("{:?}", self.output.run_name),
                "must be a plain directory name",
            ));
        }
        self.validate_eval()
    }

    /// `[eval]`: files exist, limits are usable, and a suite runs at least once after the base.
    fn validate_eval(&self) -> Result<(), ConfigError> {
        let e = &self.eval;
        let inv = |key: &str, value: String, reason: &str| ConfigError::Invalid {
            key: key.into(),
            value,
            reason: reason.into(),
        };
        for (key, p) in [
            ("eval.suite", &e.suite),
            ("eval.general_text", &e.general_text),
        ] {
            if !p.as_os_str().is_empty() && !p.is_file() {
                return Err(inv(key, format!("{p:?}"), "no such file"));
            }
        }
        if !e.suite.as_os_str().is_empty() {
            if e.max_new_tokens == 0 {
                return Err(inv("eval.max_new_tokens", "0".into(), "must be ≥ 1"));
            }
            if !e.at_end && e.every == 0 {
                return Err(inv(
                    "eval.at_end",
                    "false".into(),
                    "with eval.every = 0 the suite would only see the base model; set eval.at_end = true or eval.every ≥ 1",
                ));
            }
            if e.refuse_pattern.trim().is_empty() {
                return Err(inv(
                    "eval.refuse_pattern",
                    "\"\"".into(),
                    "must not be empty",
                ));
            }
        }
        if !(e.repetition_penalty > 0.0 && e.repetition_penalty.is_finite()) {
            return Err(inv(
                "eval.repetition_penalty",
                e.repetition_penalty.to_string(),
                "must be finite and > 0 (1 = off)",
            ));
        }
        if let Some(m) = e.premise_markers.iter().find(|m| m.trim().is_empty()) {
            return Err(inv(
                "eval.premise_markers",
                format!("{m:?}"),
                "markers must not be empty",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn valid(dir: &Path) -> Config {
        std::fs::create_dir_all(dir.join("m")).unwrap();
        std::fs::write(dir.join("m/config.json"), "{}").unwrap();
        std::fs::write(dir.join("t.jsonl"), "").unwrap();
        let mut c = Config::default();
        c.model.path = dir.join("m");
        c.data.train = dir.join("t.jsonl");
        c
    }

    #[test]
    fn validation_rejects_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        let base = valid(dir.path());
        base.validate().unwrap();
        type Case = (&'static str, Box<dyn Fn(&mut Config)>);
        let cases: Vec<Case> = vec![
            ("lora.r", Box::new(|c| c.lora.r = 0)),
            ("train.lr", Box::new(|c| c.train.lr = 0.0)),
            ("train.lr", Box::new(|c| c.train.lr = -1e-4)),
            (
                "data.eval_fraction",
                Box::new(|c| c.data.eval_fraction = 1.0),
            ),
            (
                "train.warmup_steps",
                Box::new(|c| {
                    c.train.max_steps = 10;
                    c.train.warmup_steps = 10;
                }),
            ),
            (
                "model.path",
                Box::new(|c| c.model.path = "/nonexistent/model".into()),
            ),
            (
                "data.train",
                Box::new(|c| c.data.train = "/nonexistent/train.jsonl".into()),
            ),
            (
                "data.replay",
                Box::new(|c| c.data.replay = "/nonexistent/replay.jsonl".into()),
            ),
            ("lora.targets", Box::new(|c| c.lora.targets = vec![])),
            ("train.betas[1]", Box::new(|c| c.train.betas = [0.9, 1.0])),
            (
                "train.grad_accum",
                Box::new(|c| c.train.grad_accum = 100_000_000_000),
            ),
            (
                "train.keep_checkpoints",
                Box::new(|c| c.train.keep_checkpoints = 0),
            ),
            (
                "eval.suite",
                Box::new(|c| c.eval.suite = "/nonexistent/suite.jsonl".into()),
            ),
            (
                "eval.general_text",
                Box::new(|c| c.eval.general_text = "/nonexistent/general.jsonl".into()),
            ),
            (
                "eval.repetition_penalty",
                Box::new(|c| c.eval.repetition_penalty = 0.0),
            ),
            (
                "eval.max_new_tokens",
                Box::new(|c| {
                    c.eval.suite = c.data.train.clone();
                    c.eval.max_new_tokens = 0;
                }),
            ),
            (
                "eval.at_end",
                Box::new(|c| {
                    c.eval.suite = c.data.train.clone();
                    c.eval.at_end = false;
                }),
            ),
        ];
        for (key, f) in cases {
            let mut c = base.clone();
            f(&mut c);
            match c.validate() {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: expected Invalid, got {other:?}"),
            }
        }
    }
}
