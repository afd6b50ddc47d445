//! Serde for the pipeline's options as a config file writes them.
//!
//! [`Format`], [`TemplateKind`], [`MaskMode`] and [`Overflow`] serialize as their canonical names and
//! deserialize through their `FromStr`, so a config accepts the spellings the command line accepts
//! (any case, the aliases) and a bad value is reported with the valid names. [`TemplateDate`] is its
//! `FromStr` / `Display` form (`YYYY-MM-DDTHH:MM:SS`). Two optional values have a string for "none":
//! [`format_or_auto`] ("auto": detect the format) and [`date_or_now`] ("": the local time at the start).

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::encode::{MaskMode, Overflow};
use crate::error::DataError;
use crate::jinja::TemplateDate;
use crate::record::Format;
use crate::template::TemplateKind;

/// The message of a bad option name: the problem alone (a config error names the key itself).
fn problem(e: DataError) -> String {
    match e {
        DataError::Option { problem, .. } => problem,
        other => other.to_string(),
    }
}

macro_rules! deserialize_by_name {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(|e| D::Error::custom(problem(e)))
            }
        }
    )*};
}

deserialize_by_name!(Format, TemplateKind, MaskMode, Overflow);

impl Serialize for TemplateDate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TemplateDate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

/// `Option<Format>` as a config writes it: "auto" is `None` (detect from the first record).
pub mod format_or_auto {
    use super::*;

    pub const AUTO: &str = "auto";

    pub fn serialize<S: Serializer>(f: &Option<Format>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(f.map_or(AUTO, Format::name))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Format>, D::Error> {
        let s = String::deserialize(d)?;
        if s.eq_ignore_ascii_case(AUTO) {
            return Ok(None);
        }
        s.parse()
            .map(Some)
            .map_err(|e| D::Error::custom(format!("{}; or \"{AUTO}\"", problem(e))))
    }
}

/// `Option<TemplateDate>` as a config writes it: "" is `None` (the local time when the run starts).
pub mod date_or_now {
    use super::*;

    pub fn serialize<S: Serializer>(t: &Option<TemplateDate>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => t.serialize(s),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TemplateDate>, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Ok(None);
        }
        s.parse().map(Some).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Opts {
        template: TemplateKind,
        mask: MaskMode,
        overflow: Overflow,
        #[serde(with = "format_or_auto")]
        format: Option<Format>,
        #[serde(with = "date_or_now")]
        date: Option<TemplateDate>,
    }

    #[test]
    fn names_round_trip_and_accept_the_command_line_spellings() {
        let o: Opts = serde_json::from_str(
            r#"{"template":"Gemma2","mask":"last_turn","overflow":"raise","format":"openai","date":""}"#,
        )
        .unwrap();
        assert_eq!(
            o,
            Opts {
                template: TemplateKind::Gemma,
                mask: MaskMode::LastTurn,
                overflow: Overflow::Error,
                format: Some(Format::Messages),
                date: None,
            }
        );
        assert_eq!(
            serde_json::to_string(&o).unwrap(),
            r#"{"template":"gemma","mask":"last-turn","overflow":"error","format":"messages","date":""}"#
        );
        let o: Opts = serde_json::from_str(
            r#"{"template":"chatml","mask":"all","overflow":"drop","format":"auto","date":"2024-02-29"}"#,
        )
        .unwrap();
        assert_eq!(o.format, None);
        let text = serde_json::to_string(&o).unwrap();
        assert!(text.contains(r#""format":"auto""#) && text.contains("2024-02-29T00:00:00"));
        assert_eq!(serde_json::from_str::<Opts>(&text).unwrap(), o);
    }

    #[test]
    fn a_bad_name_lists_the_valid_ones() {
        let e = serde_json::from_str::<TemplateKind>(r#""vicuna""#).unwrap_err();
        assert!(
            e.to_string().contains("expected alpaca, chatml, gemma"),
            "{e}"
        );
        #[derive(Debug, Deserialize)]
        struct F {
            #[serde(with = "format_or_auto")]
            #[allow(dead_code)]
            format: Option<Format>,
        }
        let e = serde_json::from_str::<F>(r#"{"format":"csv"}"#).unwrap_err();
        assert!(
            e.to_string().contains("sharegpt or text); or \"auto\""),
            "{e}"
        );
        let e = serde_json::from_str::<TemplateDate>(r#""2021-02-30""#).unwrap_err();
        assert!(e.to_string().contains("2021-02-30"), "{e}");
    }
}
