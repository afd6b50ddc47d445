//! Unknown keys: every key of a parsed config table is checked against the field lists serde itself
//! reports for the sections ([`field_names`]), and an unknown one is named with its line and the nearest
//! valid key by edit distance ("`train.lrr` is not a key; did you mean `train.lr`?").

use std::fmt;

use serde::Deserialize;

use super::{
    ConfigError, DataSection, EvalSection, LoraSection, ModelSection, OutputSection, TrainSection,
};

/// The field names serde expects for a struct, read from its own `Deserialize` impl (the list it
/// passes to `deserialize_struct`), so the key check can never drift from the structs.
pub fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};
    struct Probe<'a>(&'a mut &'static [&'static str]);
    #[derive(Debug)]
    struct Stop;
    impl fmt::Display for Stop {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("field probe")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    impl<'de> de::Deserializer<'de> for Probe<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = fields;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// The sections and their keys, from the structs.
pub fn schema() -> Vec<(&'static str, &'static [&'static str])> {
    vec![
        ("model", field_names::<ModelSection>()),
        ("lora", field_names::<LoraSection>()),
        ("data", field_names::<DataSection>()),
        ("train", field_names::<TrainSection>()),
        ("output", field_names::<OutputSection>()),
        ("eval", field_names::<EvalSection>()),
    ]
}

/// Levenshtein distance (bytes are fine: keys are ASCII).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Edit distance with a one-edit bonus for a shared first character (`rank` is nearer `r` than `mask`).
fn key_distance(a: &str, b: &str) -> usize {
    let d = edit_distance(a, b);
    if !a.is_empty() && a.as_bytes().first() == b.as_bytes().first() {
        d.saturating_sub(1)
    } else {
        d
    }
}

/// The nearest valid dotted key for an unknown one. Same-section keys win ties; a key that exists
/// verbatim in another section is suggested there (`lora.lr` → `train.lr`).
fn suggest(section: Option<&str>, key: &str) -> Option<String> {
    let schema = schema();
    // (cost, raw distance, candidate); cost = 3·distance, +2 for another section.
    let mut best: Option<(usize, usize, String)> = None;
    let mut consider = |cost: usize, d: usize, cand: String| {
        if best.as_ref().is_none_or(|(bc, _, _)| cost < *bc) {
            best = Some((cost, d, cand));
        }
    };
    match section {
        None => {
            for (s, _) in &schema {
                let d = key_distance(key, s);
                consider(d * 3, d, s.to_string());
            }
        }
        Some(sec) => {
            if let Some((_, fields)) = schema.iter().find(|(s, _)| *s == sec) {
                for f in fields.iter() {
                    let d = key_distance(key, f);
                    consider(d * 3, d, format!("{sec}.{f}"));
                }
            }
            for (s, fields) in &schema {
                if *s != sec {
                    for f in fields.iter() {
                        let d = key_distance(key, f);
                        consider(d * 3 + 2, d, format!("{s}.{f}"));
                    }
                }
            }
        }
    }
    // Only suggest something plausibly related: at most about half the key edited.
    best.filter(|(_, d, _)| *d <= key.len() / 2 + 1)
        .map(|(_, _, k)| k)
}

/// The 1-based line of `key` in `[section]` of the TOML text, if it can be found (for messages only).
fn find_line(text: &str, section: Option<&str>, key: &str) -> Option<usize> {
    let mut current: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix('[') {
            let name = rest.trim_end_matches(']').trim().to_string();
            if section.is_none() && name == key {
                return Some(i + 1);
            }
            current = Some(name);
            continue;
        }
        let lhs = t.split('=').next().unwrap_or("").trim();
        let matches_here = match (section, &current) {
            (None, None) => lhs == key,
            (Some(s), Some(c)) => c == s && lhs == key,
            (Some(s), None) => lhs == format!("{s}.{key}"),
            (None, Some(_)) => false,
        };
        if matches_here {
            return Some(i + 1);
        }
    }
    None
}

/// Checks every key of a parsed config table against the schema.
pub fn check_keys(table: &toml::Table, path: &str, text: &str) -> Result<(), ConfigError> {
    let schema = schema();
    for (sec, value) in table {
        let Some((_, fields)) = schema.iter().find(|(s, _)| s == sec) else {
            return Err(ConfigError::UnknownKey {
                path: path.into(),
                key: sec.clone(),
                line: find_line(text, None, sec),
                suggestion: suggest(None, sec).or_else(|| suggest(Some(""), sec)),
            });
        };
        let toml::Value::Table(inner) = value else {
            return Err(ConfigError::NotATable {
                path: path.into(),
                key: sec.clone(),
                found: value.type_str().into(),
            });
        };
        for key in inner.keys() {
            if !fields.contains(&key.as_str()) {
                return Err(ConfigError::UnknownKey {
                    path: path.into(),
                    key: format!("{sec}.{key}"),
                    line: find_line(text, Some(sec), key),
                    suggestion: suggest(Some(sec), key),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn field_names_come_from_serde() {
        let f = field_names::<TrainSection>();
        assert!(f.contains(&"lr") && f.contains(&"grad_accum") && f.contains(&"keep_checkpoints"));
        assert_eq!(
            field_names::<Config>(),
            &["model", "lora", "data", "train", "output", "eval"]
        );
    }

    #[test]
    fn unknown_key_names_nearest() {
        let e = Config::from_toml_str("[train]\nlrr = 1e-4\n", "x.toml", &[]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("`train.lrr`")
                && msg.contains("did you mean `train.lr`")
                && msg.contains("x.toml:2"),
            "{msg}"
        );
        let e = Config::from_toml_str("[lora]\nrank = 8\n", "x.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lora.rank") && e.contains("did you mean `lora.r"),
            "{e}"
        );
        let e = Config::from_toml_str("[trian]\nlr = 1e-4\n", "x.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`trian`") && e.contains("did you mean `train`"),
            "{e}"
        );
        // A key of another section is pointed there.
        let e = Config::from_toml_str("[lora]\nlr = 1e-4\n", "x.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `train.lr`"), "{e}");
        let e = Config::from_toml_str("[train]\ngradient_accumulation = 4\n", "x.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("train.gradient_accumulation"), "{e}");
    }

    #[test]
    fn edit_distance_basics() {
        assert_eq!(edit_distance("lrr", "lr"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
