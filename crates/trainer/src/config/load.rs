//! Reading a config: TOML text, `--set` overrides typed by their target field, deserialization
//! section by section (so a type error names `section.key`), and the renderings of a resolved config
//! (config.toml, flattened `section.key` values for resume diffs).

use std::collections::BTreeMap;
use std::path::Path;

use super::keys::check_keys;
use super::{
    Config, ConfigError, DataSection, LoraSection, ModelSection, OutputSection, TrainSection,
};

/// Applies one `section.key=value` override to the table. The value is typed by the target field:
/// string fields take the text verbatim; string lists also take `a,b,c`; others parse it as a TOML
/// value (`1e-4`, `true`, `["q_proj","v_proj"]`), falling back to a string so serde reports the type
/// error by key.
pub fn apply_override(table: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
    let bad = || ConfigError::BadOverride {
        arg: arg.to_string(),
    };
    let (lhs, raw) = arg.split_once('=').ok_or_else(bad)?;
    let (sec, key) = lhs.trim().split_once('.').ok_or_else(bad)?;
    let (sec, key, raw) = (sec.trim(), key.trim(), raw.trim());
    if sec.is_empty() || key.is_empty() {
        return Err(bad());
    }
    let defaults = toml::Table::try_from(Config::default()).expect("the default config serializes");
    let default = defaults
        .get(sec)
        .and_then(|s| s.as_table())
        .and_then(|s| s.get(key));
    let is_string_field = default.is_some_and(|v| v.is_str());
    // A list of strings (lora.targets) also takes the plain form `q_proj,v_proj`.
    let is_string_list = default
        .and_then(|v| v.as_array())
        .is_some_and(|a| a.iter().all(|x| x.is_str()));
    let value = if is_string_field {
        toml::Value::String(raw.trim_matches('"').to_string())
    } else if is_string_list && !raw.starts_with('[') {
        toml::Value::Array(
            raw.split(',')
                .map(|x| toml::Value::String(x.trim().trim_matches('"').to_string()))
                .filter(|x| x.as_str() != Some(""))
                .collect(),
        )
    } else {
        match format!("v = {raw}").parse::<toml::Table>() {
            Ok(mut t) => t
                .remove("v")
                .unwrap_or_else(|| toml::Value::String(raw.into())),
            Err(_) => toml::Value::String(raw.to_string()),
        }
    };
    let section = table
        .entry(sec.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match section {
        toml::Value::Table(t) => {
            t.insert(key.to_string(), value);
            Ok(())
        }
        other => Err(ConfigError::NotATable {
            path: "--set".into(),
            key: sec.into(),
            found: other.type_str().into(),
        }),
    }
}

impl Config {
    /// Parses TOML text (named `path` in messages), applies the overrides, checks keys, deserializes.
    pub fn from_toml_str(
        text: &str,
        path: &str,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: path.into(),
                    message: e.to_string(),
                })?;
        check_keys(&table, path, text)?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        check_keys(&table, &format!("{path} (with --set)"), text)?;
        Config::from_table(table, path)
    }

    /// Reads a config file and applies overrides. Relative model/data paths stay relative to the
    /// working directory (documented in the config files).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.into(),
            source,
        })?;
        let mut cfg = Self::from_toml_str(&text, &path.display().to_string(), overrides)?;
        if cfg.output.run_name.is_empty() {
            cfg.output.run_name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into());
        }
        Ok(cfg)
    }

    fn from_table(table: toml::Table, path: &str) -> Result<Config, ConfigError> {
        // Deserialize section by section so a type error names `section.key`.
        let mut cfg = Config::default();
        for (sec, value) in table {
            let err = |e: toml::de::Error| {
                let msg = e.message().to_string();
                // serde's message names the field for missing/unknown fields; for type errors we find
                // the key by trying each one alone.
                ConfigError::Type {
                    path: path.into(),
                    key: format!("{sec}{}", locate_bad_key(&sec, &value)),
                    message: msg,
                }
            };
            match sec.as_str() {
                "model" => cfg.model = value.clone().try_into().map_err(err)?,
                "lora" => cfg.lora = value.clone().try_into().map_err(err)?,
                "data" => cfg.data = value.clone().try_into().map_err(err)?,
                "train" => cfg.train = value.clone().try_into().map_err(err)?,
                "output" => cfg.output = value.clone().try_into().map_err(err)?,
                "eval" => cfg.eval = value.clone().try_into().map_err(err)?,
                _ => unreachable!("check_keys rejected unknown sections"),
            }
        }
        Ok(cfg)
    }

    /// The resolved config as TOML (written to the run directory and into checkpoints).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serializes")
    }

    /// Flattened `section.key` → value rendering, for diffs.
    pub fn flatten(&self) -> BTreeMap<String, String> {
        let table = toml::Table::try_from(self).expect("the config serializes");
        let mut out = BTreeMap::new();
        for (sec, v) in table {
            if let toml::Value::Table(t) = v {
                for (k, v) in t {
                    out.insert(format!("{sec}.{k}"), v.to_string());
                }
            }
        }
        out
    }

    /// Keys whose values change the numbers a run computes. A checkpoint may be resumed under a
    /// config that differs only in the other keys (output location, logging/saving cadence).
    pub fn is_resume_relevant(key: &str) -> bool {
        // The run's length may change on resume (to extend a finished run): the trainer checks the new
        // total against the saved step and recomputes the schedule, see `train_with`.
        // The evaluation reads the model and never changes it.
        !(key.starts_with("output.")
            || key.starts_with("eval.")
            || matches!(
                key,
                "train.log_every"
                    | "train.save_every"
                    | "train.keep_checkpoints"
                    | "train.eval_every"
                    | "train.max_steps"
                    | "train.epochs"
                    // Where the AdamW moments live changes no number (the same kernel runs on either).
                    | "train.paged_optimizer"
                    // Profiling only observes.
                    | "train.profile"
            ))
    }

    /// The keys whose resume-relevant values differ between two configs, with both values.
    pub fn resume_diff(&self, other: &Config) -> Vec<(String, String, String)> {
        let (a, b) = (self.flatten(), other.flatten());
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|k| Self::is_resume_relevant(k))
            .filter_map(|k| {
                let (x, y) = (
                    a.get(k).cloned().unwrap_or_default(),
                    b.get(k).cloned().unwrap_or_default(),
                );
                (x != y).then(|| (k.clone(), x, y))
            })
            .collect()
    }
}

/// For a type error in a section, finds which key is at fault by deserializing the section with each
/// key alone (cheap: a handful of keys). Returns ".key" or "" when it cannot tell.
fn locate_bad_key(sec: &str, value: &toml::Value) -> String {
    let Some(t) = value.as_table() else {
        return String::new();
    };
    for (k, v) in t {
        let mut one = toml::Table::new();
        one.insert(k.clone(), v.clone());
        let v = toml::Value::Table(one);
        let bad = match sec {
            "model" => v.try_into::<ModelSection>().is_err(),
            "lora" => v.try_into::<LoraSection>().is_err(),
            "data" => v.try_into::<DataSection>().is_err(),
            "train" => v.try_into::<TrainSection>().is_err(),
            "output" => v.try_into::<OutputSection>().is_err(),
            _ => false,
        };
        if bad {
            return format!(".{k}");
        }
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use afinar_gemma::Target;
    use std::path::PathBuf;

    #[test]
    fn overrides_are_typed_and_checked() {
        let c = Config::from_toml_str(
            "[train]\nlr = 1e-4\n",
            "x.toml",
            &[
                "train.lr=3e-4".into(),
                "model.path=/m/gemma".into(),
                "lora.targets=[\"q_proj\"]".into(),
                "output.run_name=123".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.lr, 3e-4);
        assert_eq!(c.model.path, PathBuf::from("/m/gemma"));
        assert_eq!(c.lora.targets, vec![Target::QProj]);
        assert_eq!(c.output.run_name, "123");
        let c =
            Config::from_toml_str("", "x.toml", &["lora.targets=q_proj, v_proj".into()]).unwrap();
        assert_eq!(c.lora.targets, vec![Target::QProj, Target::VProj]);
        let c = Config::from_toml_str("", "x.toml", &["lora.targets=all-linear".into()]).unwrap();
        assert_eq!(c.lora.targets, Target::ALL.to_vec());
        // Canonical order, no duplicates; an unknown module is refused by key, naming the valid ones.
        let c = Config::from_toml_str("", "x.toml", &["lora.targets=v_proj,q_proj,v_proj".into()])
            .unwrap();
        assert_eq!(c.lora.targets, vec![Target::QProj, Target::VProj]);
        let e = Config::from_toml_str("[lora]\ntargets = [\"qkv\"]\n", "x.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lora.targets") && e.contains("\"qkv\"") && e.contains("gate_proj"),
            "{e}"
        );
        let e = Config::from_toml_str("", "x.toml", &["train.lrate=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `train.lr`"), "{e}");
        let e = Config::from_toml_str("", "x.toml", &["train.lr=fast".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.lr"), "{e}");
        assert!(matches!(
            Config::from_toml_str("", "x", &["nodot=1".into()]),
            Err(ConfigError::BadOverride { .. })
        ));
    }

    #[test]
    fn type_error_names_key() {
        let e = Config::from_toml_str("[train]\nlr = 1e-4\ngrad_accum = \"four\"\n", "x.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.grad_accum"), "{e}");
    }

    #[test]
    fn round_trip_and_diff() {
        let mut a = Config::default();
        a.train.lr = 1e-3;
        let b = Config::from_toml_str(&a.to_toml(), "r.toml", &[]).unwrap();
        assert_eq!(a, b);
        let mut c = b.clone();
        c.lora.r = 4;
        c.output.run_name = "other".into();
        c.train.save_every = 7;
        let d = a.resume_diff(&c);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].0, "lora.r");
    }
}
