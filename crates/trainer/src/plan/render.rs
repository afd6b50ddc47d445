//! The plan as text, and memory sizes as people write them.

use std::fmt::Write;

use super::{Fit, Plan};
use crate::config::{Device, Quantization};

const KIB: f64 = 1024.0;

/// `bytes` as MiB or GiB with one decimal ("9.1 GiB", "512.0 MiB").
pub fn human(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= KIB * KIB * KIB {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    } else {
        format!("{:.1} MiB", b / (KIB * KIB))
    }
}

/// A memory size: a number with an optional unit, binary (KiB, MiB, GiB, TiB; also K, M, G, T) or
/// decimal (kB, MB, GB, TB), case-insensitive, e.g. "24GiB", "80 GB", "9109MiB", "1e9". Plain numbers
/// are bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 24GiB, 80GB or 9109MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => KIB,
        "m" | "mib" => KIB * KIB,
        "g" | "gib" => KIB * KIB * KIB,
        "t" | "tib" => KIB * KIB * KIB * KIB,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (use KiB, MiB, GiB, TiB, kB, MB, GB or TB)"
            ))
        }
    };
    let bytes = x * mult;
    if !(bytes.is_finite() && bytes > 0.0 && bytes < 1.8e19) {
        return Err(format!("{s:?}: expected a positive size"));
    }
    Ok(bytes as u64)
}

/// The plan as a table (and the fit, when a memory was given).
pub fn plan_table(p: &Plan, fit: Option<&Fit>) -> String {
    let s = &p.settings;
    let mut o = String::new();
    let where_ = match s.device {
        Device::Cpu => "CPU (f32; host memory)".to_string(),
        Device::Cuda => format!("CUDA ({:?} activations)", s.dtype).to_lowercase(),
    };
    let _ = writeln!(
        o,
        "plan: {where_}, micro-batch {} × {} tokens, {}{}, gradient checkpointing {}, AdamW {}",
        s.micro_batch,
        s.seq_len,
        if s.full_finetune {
            "full fine-tuning".to_string()
        } else {
            format!(
                "LoRA r {} on {} projections",
                s.lora_r,
                s.lora_targets.len()
            )
        },
        if s.quantization == Quantization::Nf4 && !s.full_finetune {
            if s.double_quant {
                ", NF4 base (double quant)"
            } else {
                ", NF4 base"
            }
        } else {
            ", dense base"
        },
        if s.gradient_checkpointing {
            "on"
        } else {
            "off"
        },
        if p.host_pinned > 0 {
            "paged"
        } else {
            "resident"
        },
    );
    let row = |o: &mut String, name: &str, b: u64, note: &str| {
        let _ = writeln!(o, "  {name:<46} {:>12}  {note}", human(b));
    };
    let _ = writeln!(o, "held for the whole run:");
    for i in &p.resident {
        row(&mut o, i.name, i.bytes, &i.note);
    }
    row(&mut o, "= resident", p.resident_total(), "");
    let _ = writeln!(o, "on top, during a training pass:");
    for i in &p.train_pass {
        row(&mut o, i.name, i.bytes, &i.note);
    }
    if p.eval_pass > 0 {
        row(&mut o, "on top, during an eval pass", p.eval_pass, "");
    }
    if p.nf4_cost_phase > 0 {
        row(
            &mut o,
            "eval.nf4_cost: dense base layer by layer",
            p.nf4_cost_phase,
            "(alone, before training)",
        );
    }
    if p.merge_fidelity_extra > 0 {
        row(
            &mut o,
            "eval.merge_fidelity: merged layer by layer",
            p.merge_fidelity_extra,
            "(on top, after training)",
        );
    }
    if p.host_pinned > 0 {
        row(
            &mut o,
            "AdamW m, v in pinned host memory",
            p.host_pinned,
            "(host, not counted)",
        );
    }
    let other = if s.gradient_checkpointing {
        "without"
    } else {
        "with"
    };
    row(
        &mut o,
        &format!("(kept activations {other} checkpointing)"),
        p.activations_other_mode,
        "",
    );
    let _ = writeln!(o, "predicted peak: {}", human(p.peak));
    if let Some(f) = fit {
        let verdict = if p.peak <= f.memory {
            "fits"
        } else {
            "does NOT fit"
        };
        let _ = writeln!(o, "in {}: {verdict}", human(f.memory));
        let _ = writeln!(
            o,
            "  longest sequence at micro-batch {}: {}",
            s.micro_batch,
            if f.max_seq_len == 0 {
                "none fits".to_string()
            } else {
                f.max_seq_len.to_string()
            }
        );
        let _ = writeln!(
            o,
            "  largest micro-batch at {} tokens: {}",
            s.seq_len,
            if f.max_micro_batch == 0 {
                "none fits".to_string()
            } else {
                f.max_micro_batch.to_string()
            }
        );
    }
    o
}
