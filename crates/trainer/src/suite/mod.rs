//! The behaviour suite: JSONL records, each a prompt, a `category` and an expectation, scored on greedy
//! generations (`afinar eval --suite`, and `afinar train` with an `[eval]` section).
//!
//! A record (one JSON object per line; blank lines are skipped):
//!
//! | field | |
//! |---|---|
//! | `prompt` \| `messages` \| `instruction` (+ `input`, `system`) | exactly one prompt source: a user message, a conversation ending with a user turn, or alpaca fields (so a training-format eval file can be a suite) |
//! | `category` | non-empty string; rates are reported per category |
//! | `expect` | `answer`, `refuse`, `premise` or `json` |
//! | `answer` | `answer`: the reference (else `output`) |
//! | `key_facts` | `answer` / `premise`: facts that must all appear (optional for `answer`: derived from the reference) |
//! | `keys` | `json`: keys the object (or every object of a list) must carry (else those of a JSON `output`) |
//! | `output` | the training answer of an alpaca record: the reference when `answer` is absent |
//!
//! Any other field, a missing or mistyped one, is an error naming the file, the line and the field
//! ([`SuiteError`]). The scoring rules are in `score.rs`; running a model over a suite in `run.rs`;
//! the forgetting, NF4 and merge measures in `measures.rs`; the markdown in `report.rs`.

use std::path::{Path, PathBuf};

use afinar_data::record::type_name;
use afinar_data::{Message, Role};
use serde_json::{Map, Value};

use crate::infer::Prompt;

mod measures;
mod report;
mod run;
mod score;
mod standalone;

pub use measures::{
    merge_fidelity, pct_change, perplexity, Forgetting, MergeFidelity, Nf4Cost, MERGE_PROMPTS,
};
pub use report::{evaluation_md, md_cell};
pub use run::{
    run_suite, BehaviourPoint, BehaviourSummary, CategoryScore, EvalSummary, Evaluation, GenLimits,
    ItemResult, RatePair, SuiteComparison, SuiteScore,
};
pub use score::{normalize, score, Rules, Verdict, DEFAULT_PREMISE_MARKERS, DEFAULT_REFUSE};
pub use standalone::{evaluate_standalone, evaluate_standalone_on, StandaloneOptions, SuiteArgs};

/// A malformed suite, or one that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    #[error("cannot read suite {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: field `{field}`: {message}")]
    Record {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
    #[error("{path}: the suite has no records")]
    Empty { path: PathBuf },
}

/// What an answer must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Expect {
    /// Carry the reference's key facts (exact match for a short reference). `key_facts` = None:
    /// derived from the reference (see `score.rs`).
    Answer {
        reference: String,
        key_facts: Option<Vec<String>>,
    },
    /// Decline, with the configured refusal pattern.
    Refuse,
    /// Reject the false premise of the question (a premise marker), with `key_facts` if any.
    Premise { key_facts: Vec<String> },
    /// Parse as JSON whose object (or every object of a list) carries `keys`.
    Json { keys: Vec<String> },
}

impl Expect {
    pub fn name(&self) -> &'static str {
        match self {
            Expect::Answer { .. } => "answer",
            Expect::Refuse => "refuse",
            Expect::Premise { .. } => "premise",
            Expect::Json { .. } => "json",
        }
    }

    /// What is expected, in a few words (for reports).
    pub fn describe(&self, rules: &Rules) -> String {
        match self {
            Expect::Answer {
                reference,
                key_facts,
            } => match key_facts {
                Some(k) => format!("answer with {}", k.join(" · ")),
                None => format!("answer like: {reference}"),
            },
            Expect::Refuse => format!("decline («{}»)", rules.refuse_pattern),
            Expect::Premise { key_facts } if key_facts.is_empty() => "reject the premise".into(),
            Expect::Premise { key_facts } => {
                format!("reject the premise, with {}", key_facts.join(" · "))
            }
            Expect::Json { keys } => format!("JSON with keys {}", keys.join(", ")),
        }
    }
}

/// One suite record.
#[derive(Clone, Debug, PartialEq)]
pub struct SuiteItem {
    /// 1-based line in the suite file.
    pub line: usize,
    pub category: String,
    pub prompt: Prompt,
    pub expect: Expect,
}

/// A parsed suite, records in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct Suite {
    pub path: PathBuf,
    pub items: Vec<SuiteItem>,
}

const FIELDS: &[&str] = &[
    "prompt",
    "messages",
    "instruction",
    "input",
    "system",
    "output",
    "category",
    "expect",
    "answer",
    "key_facts",
    "keys",
];

impl Suite {
    /// Reads and checks a suite file.
    pub fn load(path: &Path) -> Result<Suite, SuiteError> {
        let text = std::fs::read_to_string(path).map_err(|source| SuiteError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Suite::parse(&text, path)
    }

    /// Parses suite text; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Suite, SuiteError> {
        let mut items = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let err = |field: &str, message: String| SuiteError::Record {
                path: path.to_path_buf(),
                line: i + 1,
                field: field.into(),
                message,
            };
            let v: Value = serde_json::from_str(line)
                .map_err(|e| err("(record)", format!("invalid JSON: {e}")))?;
            let Value::Object(obj) = v else {
                return Err(err(
                    "(record)",
                    format!("expected a JSON object, found {}", type_name(&v)),
                ));
            };
            items.push(parse_item(&obj, i + 1).map_err(|(f, m)| err(&f, m))?);
        }
        if items.is_empty() {
            return Err(SuiteError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Suite {
            path: path.to_path_buf(),
            items,
        })
    }

    /// A subset, in file order: at most `per_category` records of each category (0 = no limit),
    /// then at most `max_records` in all (0 = no limit). Keeps a CPU demo's evaluation short while
    /// every category stays represented.
    pub fn limited(mut self, max_records: usize, per_category: usize) -> Suite {
        if per_category > 0 {
            let mut seen: std::collections::HashMap<String, usize> = Default::default();
            self.items.retain(|i| {
                let n = seen.entry(i.category.clone()).or_default();
                *n += 1;
                *n <= per_category
            });
        }
        if max_records > 0 {
            self.items.truncate(max_records);
        }
        self
    }
}

type FieldError = (String, String);

fn opt_str(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, FieldError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err((
            key.into(),
            format!("expected a string, found {}", type_name(v)),
        )),
    }
}

fn req_str(obj: &Map<String, Value>, key: &str) -> Result<String, FieldError> {
    match opt_str(obj, key)? {
        Some(s) if !s.trim().is_empty() => Ok(s),
        Some(_) => Err((key.into(), "empty".into())),
        None => Err((key.into(), "missing".into())),
    }
}

fn opt_str_list(obj: &Map<String, Value>, key: &str) -> Result<Option<Vec<String>>, FieldError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => {
            let mut out = Vec::with_capacity(a.len());
            for (i, x) in a.iter().enumerate() {
                match x {
                    Value::String(s) if !s.trim().is_empty() => out.push(s.clone()),
                    Value::String(_) => return Err((format!("{key}[{i}]"), "empty".into())),
                    v => {
                        return Err((
                            format!("{key}[{i}]"),
                            format!("expected a string, found {}", type_name(v)),
                        ))
                    }
                }
            }
            if out.is_empty() {
                return Err((key.into(), "empty list".into()));
            }
            Ok(Some(out))
        }
        Some(v) => Err((
            key.into(),
            format!("expected an array of strings, found {}", type_name(v)),
        )),
    }
}

fn parse_prompt(obj: &Map<String, Value>) -> Result<Prompt, FieldError> {
    let sources: Vec<&str> = ["prompt", "messages", "instruction"]
        .into_iter()
        .filter(|k| obj.get(*k).is_some_and(|v| !v.is_null()))
        .collect();
    match sources.as_slice() {
        [] => Err((
            "prompt".into(),
            "missing: give one of `prompt`, `messages` or `instruction`".into(),
        )),
        ["prompt"] => {
            let p = req_str(obj, "prompt")?;
            let system = opt_str(obj, "system")?.filter(|s| !s.trim().is_empty());
            let mut m = Vec::new();
            if let Some(s) = system {
                m.push(Message::new(Role::System, &s));
            }
            m.push(Message::new(Role::User, &p));
            Ok(Prompt::Chat(m))
        }
        ["messages"] => {
            let Some(Value::Array(turns)) = obj.get("messages") else {
                return Err(("messages".into(), "expected an array of turns".into()));
            };
            let mut m = Vec::with_capacity(turns.len());
            for (i, t) in turns.iter().enumerate() {
                let f = |k: &str| format!("messages[{i}].{k}");
                let Some(t) = t.as_object() else {
                    return Err((format!("messages[{i}]"), "expected an object".into()));
                };
                let Some(role) = t
                    .get("role")
                    .and_then(Value::as_str)
                    .and_then(Role::from_name)
                else {
                    return Err((f("role"), "expected system, user or assistant".into()));
                };
                let Some(content) = t.get("content").and_then(Value::as_str) else {
                    return Err((f("content"), "expected a string".into()));
                };
                m.push(Message::new(role, content));
            }
            if m.last().is_none_or(|x| x.role != Role::User) {
                return Err((
                    "messages".into(),
                    "the conversation must end with a user turn".into(),
                ));
            }
            Ok(Prompt::Chat(m))
        }
        ["instruction"] => Ok(Prompt::Instruction {
            system: opt_str(obj, "system")?.filter(|s| !s.trim().is_empty()),
            instruction: req_str(obj, "instruction")?,
            input: opt_str(obj, "input")?.unwrap_or_default(),
        }),
        several => Err((
            several.join("/"),
            "give only one of `prompt`, `messages` or `instruction`".into(),
        )),
    }
}

fn parse_item(obj: &Map<String, Value>, line: usize) -> Result<SuiteItem, FieldError> {
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err((
            k.clone(),
            format!("unknown field (expected {})", FIELDS.join(", ")),
        ));
    }
    let prompt = parse_prompt(obj)?;
    let category = req_str(obj, "category")?;
    let expect_name = req_str(obj, "expect")?;
    let key_facts = opt_str_list(obj, "key_facts")?;
    let output = opt_str(obj, "output")?;
    let expect = match expect_name.as_str() {
        "answer" => {
            let reference = match opt_str(obj, "answer")? {
                Some(a) => a,
                None => output.clone().ok_or_else(|| {
                    (
                        "answer".to_string(),
                        "missing: an `answer` record needs `answer` (or `output`)".to_string(),
                    )
                })?,
            };
            if reference.trim().is_empty() {
                return Err(("answer".into(), "empty".into()));
            }
            Expect::Answer {
                reference,
                key_facts,
            }
        }
        "refuse" => Expect::Refuse,
        "premise" => Expect::Premise {
            key_facts: key_facts.unwrap_or_default(),
        },
        "json" => {
            let keys = match opt_str_list(obj, "keys")? {
                Some(k) => k,
                None => keys_of_reference(output.as_deref()).ok_or_else(|| {
                    (
                        "keys".to_string(),
                        "missing: a `json` record needs `keys`, or an `output` that is a JSON object (or list of objects)"
                            .to_string(),
                    )
                })?,
            };
            Expect::Json { keys }
        }
        other => {
            return Err((
                "expect".into(),
                format!("unknown expectation `{other}` (expected answer, refuse, premise or json)"),
            ))
        }
    };
    Ok(SuiteItem {
        line,
        category,
        prompt,
        expect,
    })
}

/// The top-level keys of a JSON reference: those of an object, or of the first object of a list.
fn keys_of_reference(output: Option<&str>) -> Option<Vec<String>> {
    let v: Value = serde_json::from_str(output?.trim()).ok()?;
    let obj = match &v {
        Value::Object(o) => o,
        Value::Array(a) => a.first()?.as_object()?,
        _ => return None,
    };
    Some(obj.keys().cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Suite, SuiteError> {
        Suite::parse(text, Path::new("s.jsonl"))
    }

    #[test]
    fn parses_every_prompt_source_and_expectation() {
        let s = parse(concat!(
            r#"{"prompt": "¿Quién?", "category": "a", "expect": "refuse"}"#,
            "\n\n",
            r#"{"instruction": "Di", "input": "x", "output": "{\"a\": 1, \"b\": null}", "category": "j", "expect": "json"}"#,
            "\n",
            r#"{"messages": [{"role": "user", "content": "hola"}], "category": "f", "expect": "answer", "answer": "París"}"#,
            "\n",
            r#"{"prompt": "¿Por qué?", "category": "p", "expect": "premise", "key_facts": ["1921"]}"#,
        ))
        .unwrap();
        assert_eq!(s.items.len(), 4);
        assert_eq!(s.items[1].line, 3);
        assert_eq!(
            s.items[1].expect,
            Expect::Json {
                keys: vec!["a".into(), "b".into()]
            }
        );
        assert!(
            matches!(&s.items[2].expect, Expect::Answer { reference, key_facts: None } if reference == "París")
        );
        assert_eq!(
            s.items[3].expect,
            Expect::Premise {
                key_facts: vec!["1921".into()]
            }
        );
        assert_eq!(s.items[0].prompt.display(), "¿Quién?");
    }

    #[test]
    fn malformed_records_name_file_line_and_field() {
        let cases = [
            (r#"{"prompt": "x", "expect": "refuse"}"#, "category"),
            (
                r#"{"prompt": "x", "category": "c", "expect": "guess"}"#,
                "expect",
            ),
            (
                r#"{"prompt": "x", "category": "c", "expect": "answer"}"#,
                "answer",
            ),
            (
                r#"{"prompt": "x", "category": "c", "expect": "json"}"#,
                "keys",
            ),
            (r#"{"category": "c", "expect": "refuse"}"#, "prompt"),
            (
                r#"{"prompt": "x", "instruction": "y", "category": "c", "expect": "refuse"}"#,
                "prompt/instruction",
            ),
            (
                r#"{"prompt": "x", "category": "c", "expect": "refuse", "categry": 1}"#,
                "categry",
            ),
            (
                r#"{"prompt": 3, "category": "c", "expect": "refuse"}"#,
                "prompt",
            ),
            (
                r#"{"prompt": "x", "category": "c", "expect": "premise", "key_facts": [1]}"#,
                "key_facts[0]",
            ),
            (
                r#"{"messages": [{"role": "assistant", "content": "a"}], "category": "c", "expect": "refuse"}"#,
                "messages",
            ),
            (r#"{"prompt": "x", "category": "c""#, "(record)"),
        ];
        for (rec, field) in cases {
            let text = format!(
                "{}\n\n{rec}\n",
                r#"{"prompt": "ok", "category": "c", "expect": "refuse"}"#
            );
            let e = parse(&text).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(&e, SuiteError::Record { line: 3, field: f, .. } if f == field),
                "{rec}: {msg}"
            );
            assert!(msg.starts_with("s.jsonl:3: field `"), "{msg}");
        }
        assert!(matches!(parse("\n\n"), Err(SuiteError::Empty { .. })));
    }

    #[test]
    fn shipped_eval_split_is_a_suite() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../datasets/academico-riguroso/eval.jsonl");
        let s = Suite::load(&p).unwrap();
        assert_eq!(s.items.len(), 74);
        let count = |e: &str| s.items.iter().filter(|i| i.expect.name() == e).count();
        assert_eq!(count("refuse"), 14);
        assert_eq!(count("premise"), 7);
        assert_eq!(count("json"), 7);
        assert_eq!(count("answer"), 46);
        // Two per category, in file order, then at most 7 in all.
        let l = s.clone().limited(0, 2);
        assert_eq!(l.items.len(), 10);
        assert!(l.items.windows(2).all(|w| w[0].line < w[1].line));
        assert_eq!(
            l.items
                .iter()
                .filter(|i| i.category == "json_estricto")
                .count(),
            2
        );
        assert_eq!(s.limited(7, 2).items.len(), 7);
    }
}
