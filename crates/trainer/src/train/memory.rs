//! Memory around a run: the check before the model is loaded (`afinar train` refuses a run whose
//! plan does not fit the device's free memory, unless `--force`), the memory figure of the progress
//! line, and the peaks written into summary.json. The plan is `crate::plan`.

use afinar_gemma::Gemma2Config;
use afinar_kernels::{Backend, DeviceMemory};

use super::{Result, TrainError};
use crate::config::{Config, Device, Quantization};
use crate::plan::{self, human, Plan, PlanSettings};

const MIB: f64 = 1024.0 * 1024.0;

/// The plan of `cfg` on the model `model_cfg`.
pub fn plan_of(cfg: &Config, model_cfg: &Gemma2Config) -> Plan {
    plan::plan(model_cfg, &PlanSettings::from_config(cfg))
}

/// What the run needs of the device's free memory: the plan's peak less the CUDA context (which the
/// backend that measured `free` already holds).
fn needed(p: &Plan) -> u64 {
    let ctx = if p.settings.device == Device::Cuda {
        plan::CUDA_CONTEXT_BYTES
    } else {
        0
    };
    p.peak.saturating_sub(ctx)
}

/// The refusal when the plan of `s` on `model_cfg` does not fit in `free` bytes of a device of
/// `total` bytes (None when it fits): both numbers, the largest pieces of the plan, and each change
/// that would make it fit, with its own predicted need. Pure, so that it is tested without a GPU.
pub fn refusal(
    model_cfg: &Gemma2Config,
    s: &PlanSettings,
    free: u64,
    total: u64,
) -> Option<String> {
    let p = plan::plan(model_cfg, s);
    let need = needed(&p);
    if need <= free {
        return None;
    }
    let mut pieces: Vec<(&str, u64)> = p.resident.iter().map(|i| (i.name, i.bytes)).collect();
    pieces.push(("largest pass on top", p.train_pass_total().max(p.eval_pass)));
    pieces.sort_by_key(|&(_, b)| std::cmp::Reverse(b));
    let top: Vec<String> = pieces
        .iter()
        .take(4)
        .map(|(n, b)| format!("{n} {}", human(*b)))
        .collect();
    let mut msg = format!(
        "the memory plan of this run needs {} of GPU memory and the device has {} free (of {}); \
         largest pieces: {}.",
        human(need),
        human(free),
        human(total),
        top.join(", ")
    );
    // The budget of the whole plan (context included) that the free memory allows.
    let budget = free + (p.peak - need);
    let fit = plan::fit(model_cfg, s, budget);
    let mut fixes = Vec::new();
    if fit.max_micro_batch > 0 && fit.max_micro_batch < s.micro_batch {
        fixes.push(format!(
            "train.micro_batch_size = {} (raise train.grad_accum to keep the tokens per step)",
            fit.max_micro_batch
        ));
    }
    if fit.max_seq_len > 0 && fit.max_seq_len < s.seq_len {
        fixes.push(format!("data.max_seq_len = {}", fit.max_seq_len));
    }
    let mut try_change = |what: &str, f: &dyn Fn(&mut PlanSettings)| {
        let mut t = s.clone();
        f(&mut t);
        if t != *s {
            let n = needed(&plan::plan(model_cfg, &t));
            if n < need {
                fixes.push(format!(
                    "{what} (needs {}{})",
                    human(n),
                    if n <= free { ", fits" } else { "" }
                ));
            }
        }
    };
    try_change("train.gradient_checkpointing = true", &|t| {
        t.gradient_checkpointing = true
    });
    try_change("train.paged_optimizer = true", &|t| {
        t.paged_optimizer = true
    });
    if !s.full_finetune {
        try_change("model.quantization = \"nf4\"", &|t| {
            t.quantization = Quantization::Nf4
        });
    }
    if s.nf4_cost {
        try_change("eval.nf4_cost = false", &|t| t.nf4_cost = false);
    }
    if s.merge_fidelity {
        try_change("eval.merge_fidelity = false", &|t| t.merge_fidelity = false);
    }
    if fixes.is_empty() {
        msg.push_str(" No setting of this run makes it fit on this device.");
    } else {
        msg.push_str(" Change: ");
        msg.push_str(&fixes.join("; or "));
        msg.push('.');
    }
    msg.push_str(
        " `afinar plan --config …` prints the whole breakdown; `afinar train --force` starts anyway.",
    );
    Some(msg)
}

/// Before loading: on a backend with device memory, refuses (unless `force`) a run whose plan does
/// not fit the free memory. With `force`, says that it goes ahead.
pub fn check_before_loading<B: Backend>(
    backend: &B,
    cfg: &Config,
    model_cfg: &Gemma2Config,
    force: bool,
    say: &dyn Fn(&str),
) -> Result<()> {
    let Some(dm) = backend.device_memory() else {
        return Ok(());
    };
    let free = dm.total.saturating_sub(dm.used);
    let s = PlanSettings::from_config(cfg);
    match refusal(model_cfg, &s, free, dm.total) {
        None => Ok(()),
        Some(m) if force => {
            say(&format!("warning (--force): {m}"));
            Ok(())
        }
        Some(m) => Err(TrainError::WouldNotFit(m)),
    }
}

/// The memory figure of the progress line: the device's peak on a GPU backend, else the process's
/// peak RSS ("" where neither is known).
pub fn progress_note(dm: Option<DeviceMemory>) -> String {
    match dm {
        Some(d) => format!("gpu peak {:.0} MiB", d.peak as f64 / MIB),
        None => crate::metrics::peak_rss_bytes()
            .map(|b| format!("rss peak {:.0} MiB", b as f64 / MIB))
            .unwrap_or_default(),
    }
}

/// (peak device memory MiB, predicted peak MiB) for summary.json.
pub fn summary_fields<B: Backend>(
    backend: &B,
    cfg: &Config,
    model_cfg: &Gemma2Config,
) -> (Option<f64>, f64) {
    (
        backend.device_memory().map(|d| d.peak as f64 / MIB),
        plan_of(cfg, model_cfg).peak as f64 / MIB,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use afinar_gemma::Target;

    fn s(mb: usize, t: usize, ckpt: bool) -> PlanSettings {
        PlanSettings {
            device: Device::Cuda,
            dtype: crate::config::Dtype::Bf16,
            quantization: Quantization::Nf4,
            double_quant: true,
            full_finetune: false,
            lora_r: 16,
            lora_targets: Target::ALL.to_vec(),
            lora_dropout: false,
            micro_batch: mb,
            seq_len: t,
            gradient_checkpointing: ckpt,
            paged_optimizer: false,
            eval: true,
            nf4_cost: false,
            merge_fidelity: false,
            threads: 1,
        }
    }

    fn gemma9b() -> Gemma2Config {
        Gemma2Config::tiny(256000, 3584, 14336, 42, 16, 8, 256, 4096).unwrap()
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn a_run_that_fits_is_not_refused() {
        assert_eq!(
            refusal(&gemma9b(), &s(2, 2048, true), 40 * GIB, 80 * GIB),
            None
        );
    }

    #[test]
    fn the_refusal_names_the_numbers_and_what_to_change() {
        // 9B QLoRA at 8 × 1024 without checkpointing on a 24 GiB card with 23 GiB free.
        let m = refusal(&gemma9b(), &s(8, 1024, false), 23 * GIB, 24 * GIB).unwrap();
        for want in [
            "23.00 GiB free (of 24.00 GiB)",
            "activations: every layer",
            "train.micro_batch_size = ",
            "data.max_seq_len = ",
            "train.gradient_checkpointing = true (needs",
            "train.paged_optimizer = true",
            "--force",
        ] {
            assert!(m.contains(want), "{want}: {m}");
        }
        // The micro-batch it proposes fits, and one more does not.
        let mb: usize = m
            .split("train.micro_batch_size = ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|d| d.parse().ok())
            .unwrap();
        assert!(refusal(&gemma9b(), &s(mb, 1024, false), 23 * GIB, 24 * GIB).is_none());
        assert!(refusal(&gemma9b(), &s(mb + 1, 1024, false), 23 * GIB, 24 * GIB).is_some());
    }

    #[test]
    fn nothing_fits_a_device_smaller_than_the_weights() {
        let m = refusal(&gemma9b(), &s(1, 512, true), 3 * GIB, 4 * GIB).unwrap();
        assert!(!m.contains("train.micro_batch_size ="), "{m}");
        assert!(!m.contains("data.max_seq_len ="), "{m}");
    }

    #[test]
    fn the_progress_note_prefers_the_device_peak() {
        let d = DeviceMemory {
            used: 1 << 30,
            peak: 3 << 30,
            total: 8 << 30,
        };
        assert_eq!(progress_note(Some(d)), "gpu peak 3072 MiB");
        if std::path::Path::new("/proc/self/status").is_file() {
            assert!(progress_note(None).starts_with("rss peak "));
        }
    }
}
