//! Dataset files → records. Four formats (alpaca, messages, sharegpt, text), JSON array or JSONL,
//! auto-detected from the first record with an explicit override.
//!
//! Reading never stops at the first bad record: every JSON syntax error (path:line:column) and every
//! field problem (path:line, field, what is wrong) is collected (the first 20 are kept, all are
//! counted) and the read fails with the whole list, so a dataset is never partially trained on.
//! The one exception is a syntax error inside a JSON *array* file: after it the element boundaries
//! are unknown, so that file's scan stops there (the error is still reported with its position).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::{Map, Value};

use crate::error::{DataError, ErrorList, Loc, RecordError, Result};

/// Dataset file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `{"instruction", "input"?, "output", "system"?}` (Stanford Alpaca fields).
    Alpaca,
    /// `{"messages": [{"role": "system"|"user"|"assistant", "content"}]}` (OpenAI / HF conversational).
    Messages,
    /// `{"conversations": [{"from": "system"|"human"|"user"|"gpt"|"assistant", "value"}]}`.
    #[serde(rename = "sharegpt")]
    ShareGpt,
    /// `{"text": ...}`: plain text, every token trained (BOS + text + EOS).
    Text,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Alpaca => "alpaca",
            Format::Messages => "messages",
            Format::ShareGpt => "sharegpt",
            Format::Text => "text",
        }
    }
}

impl FromStr for Format {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "alpaca" => Ok(Format::Alpaca),
            "messages" | "openai" | "chat" => Ok(Format::Messages),
            "sharegpt" => Ok(Format::ShareGpt),
            "text" => Ok(Format::Text),
            _ => Err(DataError::Option {
                option: "format".into(),
                problem: format!(
                    "unknown format `{s}` (expected alpaca, messages, sharegpt or text)"
                ),
            }),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role named `s` in the OpenAI / `messages` spelling (`system`, `user`, `assistant`): the
    /// inverse of [`Role::name`].
    pub fn from_name(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
}

/// The content of one record, format-independent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// An alpaca record; `input` is "" when absent.
    Instruction {
        system: Option<String>,
        instruction: String,
        input: String,
        output: String,
    },
    /// A conversation (messages or sharegpt).
    Chat(Vec<Message>),
    /// Plain text (every token trained).
    Text(String),
}

impl Body {
    /// The record as a conversation: alpaca becomes [system?, user, assistant] with the user turn
    /// `instruction` or `instruction + "\n\n" + input` (the join Stanford's own text uses between
    /// sections). `None` for text records.
    pub fn to_messages(&self) -> Option<Vec<Message>> {
        match self {
            Body::Instruction {
                system,
                instruction,
                input,
                output,
            } => {
                let mut m = Vec::with_capacity(3);
                if let Some(s) = system {
                    m.push(Message::new(Role::System, s.clone()));
                }
                let user = if input.is_empty() {
                    instruction.clone()
                } else {
                    format!("{instruction}\n\n{input}")
                };
                m.push(Message::new(Role::User, user));
                m.push(Message::new(Role::Assistant, output.clone()));
                Some(m)
            }
            Body::Chat(m) => Some(m.clone()),
            Body::Text(_) => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub loc: Loc,
    pub body: Body,
}

/// A dataset file read and validated at the format level.
#[derive(Clone, Debug)]
pub struct RawDataset {
    pub path: PathBuf,
    pub format: Format,
    pub records: Vec<Record>,
}

/// Reads and validates a dataset file. `format = None` detects it from the first JSON object.
pub fn read_dataset(path: &Path, format: Option<Format>) -> Result<RawDataset> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        // Name the line (and byte column) of the first invalid byte, as for any other bad record.
        let bad = e.utf8_error().valid_up_to();
        let before = &e.as_bytes()[..bad];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = bad
            - before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1)
            + 1;
        DataError::InvalidRecords {
            what: path.display().to_string(),
            errors: vec![RecordError {
                loc: Loc {
                    path: path.to_path_buf(),
                    line,
                    column: Some(column),
                },
                field: "-".into(),
                problem: "invalid UTF-8 (the file must be UTF-8 text)".into(),
            }],
            total: 1,
        }
    })?;
    parse_dataset(path, &text, format)
}

/// One JSON value found in the file, with the (line, column) where it starts.
struct Item {
    value: Value,
    line: usize,
}

/// Byte offset → (1-based line, 1-based byte column).
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset];
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let col = offset - before.rfind('\n').map(|p| p + 1).unwrap_or(0) + 1;
    (line, col)
}

/// serde_json's message without its " at line L column C" suffix (we print our own position).
fn json_message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(p) => s[..p].to_string(),
        None => s,
    }
}

fn syntax_error(path: &Path, line: usize, column: usize, e: &serde_json::Error) -> RecordError {
    RecordError {
        loc: Loc {
            path: path.to_path_buf(),
            line,
            column: Some(column),
        },
        field: "-".into(),
        problem: format!("malformed JSON: {}", json_message(e)),
    }
}

fn split_jsonl(path: &Path, text: &str, errs: &mut ErrorList) -> Vec<Item> {
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(value) => items.push(Item { value, line: i + 1 }),
            Err(e) => errs.push(syntax_error(path, i + 1, e.column().max(1), &e)),
        }
    }
    items
}

fn skip_ws(text: &str, mut pos: usize) -> usize {
    let b = text.as_bytes();
    while pos < b.len() && (b[pos] as char).is_ascii_whitespace() {
        pos += 1;
    }
    pos
}

/// A JSON array file: elements are parsed one at a time so each keeps its own line number.
fn split_json_array(path: &Path, text: &str, start: usize, errs: &mut ErrorList) -> Vec<Item> {
    let mut items = Vec::new();
    let b = text.as_bytes();
    let mut pos = skip_ws(text, start + 1); // after '['
    if pos < b.len() && b[pos] == b']' {
        return items;
    }
    loop {
        let (line, col) = line_col(text, pos.min(text.len()));
        let mut stream = serde_json::Deserializer::from_str(&text[pos..]).into_iter::<Value>();
        match stream.next() {
            Some(Ok(value)) => {
                items.push(Item { value, line });
                pos = skip_ws(text, pos + stream.byte_offset());
            }
            Some(Err(e)) => {
                // Positions are relative to `pos`: shift them to the file.
                let (el, ec) = (e.line().max(1), e.column().max(1));
                let (l, c) = if el == 1 {
                    (line, col + ec - 1)
                } else {
                    (line + el - 1, ec)
                };
                errs.push(syntax_error(path, l, c, &e));
                return items;
            }
            None => {
                errs.push(RecordError {
                    loc: Loc {
                        path: path.to_path_buf(),
                        line,
                        column: Some(col),
                    },
                    field: "-".into(),
                    problem: "malformed JSON: unexpected end of file inside the top-level array"
                        .into(),
                });
                return items;
            }
        }
        match b.get(pos) {
            Some(b',') => pos = skip_ws(text, pos + 1),
            Some(b']') => {
                let rest = skip_ws(text, pos + 1);
                if rest < b.len() {
                    let (l, c) = line_col(text, rest);
                    errs.push(RecordError {
                        loc: Loc {
                            path: path.to_path_buf(),
                            line: l,
                            column: Some(c),
                        },
                        field: "-".into(),
                        problem: "malformed JSON: trailing characters after the top-level array"
                            .into(),
                    });
                }
                return items;
            }
            _ => {
                let (l, c) = line_col(text, pos.min(text.len()));
                errs.push(RecordError {
                    loc: Loc {
                        path: path.to_path_buf(),
                        line: l,
                        column: Some(c),
                    },
                    field: "-".into(),
                    problem: "malformed JSON: expected `,` or `]` after an array element".into(),
                });
                return items;
            }
        }
    }
}

/// A JSON value's type for error messages ("a string", "an array", …).
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Detects the format from one JSON object's keys.
fn detect(obj: &Map<String, Value>) -> Option<Format> {
    if obj.contains_key("messages") {
        Some(Format::Messages)
    } else if obj.contains_key("conversations") {
        Some(Format::ShareGpt)
    } else if obj.contains_key("instruction") || obj.contains_key("output") {
        Some(Format::Alpaca)
    } else if obj.contains_key("text") {
        Some(Format::Text)
    } else {
        None
    }
}

/// Field-level validation of one record.
struct Ctx<'a> {
    loc: Loc,
    errs: &'a mut ErrorList,
    ok: bool,
}

impl Ctx<'_> {
    fn err(&mut self, field: &str, problem: impl Into<String>) {
        self.ok = false;
        self.errs.push(RecordError {
            loc: self.loc.clone(),
            field: field.to_string(),
            problem: problem.into(),
        });
    }
    /// A required string field (present, not null, a string).
    fn req_str(&mut self, obj: &Map<String, Value>, key: &str, field: &str) -> Option<String> {
        match obj.get(key) {
            None | Some(Value::Null) => {
                self.err(field, "missing");
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => {
                self.err(field, format!("expected a string, found {}", type_name(v)));
                None
            }
        }
    }
    /// An optional string field (absent or null = None).
    fn opt_str(&mut self, obj: &Map<String, Value>, key: &str, field: &str) -> Option<String> {
        match obj.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => {
                self.err(field, format!("expected a string, found {}", type_name(v)));
                None
            }
        }
    }
}

fn parse_alpaca(cx: &mut Ctx<'_>, obj: &Map<String, Value>) -> Option<Body> {
    let instruction = cx.req_str(obj, "instruction", "instruction");
    let input = cx.opt_str(obj, "input", "input").unwrap_or_default();
    let output = cx.req_str(obj, "output", "output");
    let system = cx
        .opt_str(obj, "system", "system")
        .filter(|s| !s.trim().is_empty());
    if let Some(i) = &instruction {
        if i.trim().is_empty() {
            cx.err("instruction", "empty instruction");
        }
    }
    if let Some(o) = &output {
        if o.trim().is_empty() {
            cx.err("output", "empty output: nothing to train on");
        }
    }
    if !cx.ok {
        return None;
    }
    Some(Body::Instruction {
        system,
        instruction: instruction?,
        input,
        output: output?,
    })
}

fn parse_turns(cx: &mut Ctx<'_>, obj: &Map<String, Value>, format: Format) -> Option<Body> {
    let (list_key, role_key, content_key) = match format {
        Format::Messages => ("messages", "role", "content"),
        _ => ("conversations", "from", "value"),
    };
    let turns = match obj.get(list_key) {
        None | Some(Value::Null) => {
            cx.err(list_key, "missing");
            return None;
        }
        Some(Value::Array(a)) => a,
        Some(v) => {
            cx.err(
                list_key,
                format!("expected an array, found {}", type_name(v)),
            );
            return None;
        }
    };
    if turns.is_empty() {
        cx.err(list_key, "empty conversation");
        return None;
    }
    let mut messages = Vec::with_capacity(turns.len());
    for (i, t) in turns.iter().enumerate() {
        let path = format!("{list_key}[{i}]");
        let Some(t) = t.as_object() else {
            cx.err(&path, format!("expected an object, found {}", type_name(t)));
            continue;
        };
        let role_field = format!("{path}.{role_key}");
        let content_field = format!("{path}.{content_key}");
        let role_s = cx.req_str(t, role_key, &role_field);
        let content = cx.req_str(t, content_key, &content_field);
        let role = role_s.and_then(|r| {
            let role = match (format, r.as_str()) {
                (Format::ShareGpt, "human") => Some(Role::User),
                (Format::ShareGpt, "gpt") => Some(Role::Assistant),
                (_, name) => Role::from_name(name),
            };
            if role.is_none() {
                let allowed = if format == Format::Messages {
                    "system, user or assistant"
                } else {
                    "system, human, user, gpt or assistant"
                };
                cx.err(
                    &role_field,
                    format!("unknown role `{r}` (expected {allowed})"),
                );
            }
            role
        });
        if let (Some(Role::Assistant), Some(c)) = (role, &content) {
            if c.trim().is_empty() {
                cx.err(
                    &content_field,
                    "empty assistant content: nothing to train on",
                );
            }
        }
        if let (Some(role), Some(content)) = (role, content) {
            messages.push(Message { role, content });
        }
    }
    if cx.ok && !messages.iter().any(|m| m.role == Role::Assistant) {
        cx.err(list_key, "no assistant turn: nothing to train on");
    }
    if !cx.ok {
        return None;
    }
    Some(Body::Chat(messages))
}

fn parse_text(cx: &mut Ctx<'_>, obj: &Map<String, Value>) -> Option<Body> {
    let text = cx.req_str(obj, "text", "text")?;
    if text.trim().is_empty() {
        cx.err("text", "empty text");
        return None;
    }
    Some(Body::Text(text))
}

/// Parses dataset text (the file's content); `path` is used in locations only.
pub fn parse_dataset(path: &Path, text: &str, format: Option<Format>) -> Result<RawDataset> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut errs = ErrorList::default();
    let first = skip_ws(text, 0);
    let items = if text.as_bytes().get(first) == Some(&b'[') {
        split_json_array(path, text, first, &mut errs)
    } else {
        split_jsonl(path, text, &mut errs)
    };
    let format = match format {
        Some(f) => f,
        None => {
            let first_obj = items
                .iter()
                .find_map(|it| it.value.as_object().map(|o| (o, it.line)));
            match first_obj {
                Some((o, line)) => detect(o).ok_or_else(|| DataError::UnknownFormat {
                    path: path.to_path_buf(),
                    reason: format!(
                        "the record at line {line} has none of the keys messages, conversations, instruction/output, text (keys: {})",
                        o.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                })?,
                None => {
                    // Only syntax errors, values that are not objects, or no records at all.
                    for it in &items {
                        errs.push(RecordError {
                            loc: Loc {
                                path: path.to_path_buf(),
                                line: it.line,
                                column: None,
                            },
                            field: "-".into(),
                            problem: format!(
                                "expected a JSON object, found {}",
                                type_name(&it.value)
                            ),
                        });
                    }
                    errs.into_result(&path.display().to_string())?;
                    return Err(DataError::EmptyDataset { path: path.to_path_buf() });
                }
            }
        }
    };
    let mut records = Vec::with_capacity(items.len());
    for it in items {
        let loc = Loc {
            path: path.to_path_buf(),
            line: it.line,
            column: None,
        };
        let mut cx = Ctx {
            loc: loc.clone(),
            errs: &mut errs,
            ok: true,
        };
        let Some(obj) = it.value.as_object() else {
            cx.err(
                "-",
                format!("expected a JSON object, found {}", type_name(&it.value)),
            );
            continue;
        };
        let body = match format {
            Format::Alpaca => parse_alpaca(&mut cx, obj),
            Format::Messages | Format::ShareGpt => parse_turns(&mut cx, obj, format),
            Format::Text => parse_text(&mut cx, obj),
        };
        if let Some(body) = body {
            records.push(Record { loc, body });
        }
    }
    errs.into_result(&path.display().to_string())?;
    if records.is_empty() {
        return Err(DataError::EmptyDataset {
            path: path.to_path_buf(),
        });
    }
    Ok(RawDataset {
        path: path.to_path_buf(),
        format,
        records,
    })
}
