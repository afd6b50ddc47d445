//! The keys of peft's `LoraConfig` that afinar refuses when they are set, rather than ignoring them.

use std::path::Path;

use serde_json::{Map, Value};

use super::adapter_config::cfg_err;
use crate::error::{GemmaError, Result};

/// Refuses every key of peft 0.21.2's `LoraConfig` that changes which modules get LoRA or what they
/// compute, when it is set to something afinar does not implement (the error names the key and says why).
///
/// The full field list (`inspect.signature(peft.LoraConfig)`) and what happens to each:
/// - handled: `peft_type`, `task_type`, `r`, `lora_alpha`, `lora_dropout`, `use_rslora`, `target_modules`
///   (checked against the tensors by `check_targets`);
/// - metadata, no effect on the math: `peft_version`, `base_model_name_or_path`, `revision`,
///   `auto_mapping`, `inference_mode`, `runtime_config` (never saved);
/// - initialization that the stored A and B replace: `init_lora_weights` true / false / "gaussian" /
///   "eva" / "orthogonal", and the configs only those refused below read (`eva_config`, `loftq_config`,
///   `corda_config`, `lora_ga_config`);
/// - inert for the seven Gemma-2 linears: `megatron_config` / `megatron_core` (Megatron parallel layers
///   only), `ensure_weight_tying` (tied modules in `modules_to_save` / embedding targets, both refused),
///   `qalora_group_size` (only with `use_qalora`);
/// - refused when set: the module selection keys `layers_to_transform`, `layers_pattern` (peft adapts
///   only the listed layer indices; afinar adapts every layer) and `exclude_modules`; `rank_pattern`,
///   `alpha_pattern`; `modules_to_save`, `layer_replication`, `trainable_token_indices`,
///   `target_parameters`; `bias` ≠ "none", `lora_bias`, `fan_in_fan_out`; the LoRA variants `use_dora`,
///   `use_qalora`, `use_bdlora`, `arrow_config`, `alora_invocation_tokens`, `velora_config`,
///   `monteclora_config`, `kasa_config`; and the `init_lora_weights` values that peft re-runs when it
///   loads the adapter and that rewrite the base weights ("pissa…", "corda", "olora", "loftq",
///   "lora_ga") or select a variant ("mica", which trains A only).
///
/// "Set" follows peft: null, false, an empty list, an empty string and an empty object are unset (peft
/// tests these keys for truthiness, and treats `layers_to_transform = []` as "every layer").
pub(super) fn refuse_unsupported_keys(obj: &Map<String, Value>, path: &Path) -> Result<()> {
    let is_set = |v: &Value| match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::Number(_) => true,
    };
    let why_layers =
        "peft adapts only the listed layers; afinar adapts the same modules in every layer";
    let why_variant = "a LoRA variant that computes something else than W·x + s·B·A·x";
    let table: [(&str, &str); 21] = [
        ("layers_to_transform", why_layers),
        ("layers_pattern", why_layers),
        (
            "exclude_modules",
            "it removes modules from the targets; afinar has no exclusion list",
        ),
        ("rank_pattern", "per-module ranks"),
        ("alpha_pattern", "per-module alphas"),
        ("modules_to_save", "fully trained extra modules"),
        ("layer_replication", "replicated layers"),
        ("trainable_token_indices", "trainable embedding rows"),
        ("target_parameters", "LoRA on parameters instead of modules"),
        ("lora_bias", "a trained bias on lora_B"),
        ("fan_in_fan_out", "transposed (Conv1D) weights"),
        ("use_dora", why_variant),
        ("use_qalora", why_variant),
        ("use_bdlora", why_variant),
        ("arrow_config", why_variant),
        ("alora_invocation_tokens", why_variant),
        ("velora_config", why_variant),
        ("monteclora_config", why_variant),
        ("kasa_config", why_variant),
        ("bias", "trained biases"),
        ("init_lora_weights", ""),
    ];
    for (key, why) in table {
        let Some(v) = obj.get(key) else { continue };
        match key {
            "bias" => match v {
                Value::Null => {}
                Value::String(b) if b == "none" => {}
                _ => return Err(unsupported(path, key, &v.to_string(), why)),
            },
            "init_lora_weights" => match v {
                Value::Null | Value::Bool(_) => {}
                Value::String(s) => {
                    let l = s.to_lowercase();
                    if l.starts_with("pissa")
                        || l.starts_with("corda")
                        || ["olora", "loftq", "lora_ga"].contains(&l.as_str())
                    {
                        return Err(unsupported(
                            path,
                            key,
                            &v.to_string(),
                            "peft re-runs this initialization when it loads the adapter, which \
                             rewrites the base weights (W − s·B₀·A₀ or a quantized residual); afinar \
                             loads the base checkpoint as is (convert the adapter to plain LoRA with \
                             peft's path_initial_model_for_weight_conversion)",
                        ));
                    }
                    if l == "mica" {
                        return Err(unsupported(path, key, &v.to_string(), why_variant));
                    }
                    if !["gaussian", "eva", "orthogonal"].contains(&l.as_str()) {
                        return Err(cfg_err(path, key, format!("unknown initialization {s:?}")));
                    }
                }
                _ => {
                    return Err(cfg_err(
                        path,
                        key,
                        format!("expected a boolean or a string, found {v}"),
                    ))
                }
            },
            _ => {
                if is_set(v) {
                    return Err(unsupported(path, key, &v.to_string(), why));
                }
            }
        }
    }
    Ok(())
}

fn unsupported(path: &Path, key: &str, value: &str, why: &str) -> GemmaError {
    GemmaError::NotSupported {
        what: format!("{}: `{key}` = {value} ({why})", path.display()),
        hint:
            "afinar implements plain LoRA (and rsLoRA) on the same Gemma-2 linears of every layer; \
             refused rather than ignored"
                .into(),
    }
}
