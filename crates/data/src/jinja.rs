//! The model's own chat template (`chat_template` of tokenizer_config.json), rendered with
//! `minijinja` in the configuration transformers uses (`trim_blocks`, `lstrip_blocks`, loop
//! controls, `raise_exception`, Python string methods such as `.strip()`, a `tojson` with
//! Python's separators), with `messages`, `bos_token`, `eos_token`, `pad_token`, `unk_token` and
//! `add_generation_prompt` in the context. TRL's `{% generation %}` tags are accepted and ignored.
//!
//! Segments come from incremental rendering, not from searching the output: for every assistant
//! message k, `P = render(messages[..k], add_generation_prompt=true)` and
//! `F = render(messages[..=k])`; the text before P (since the previous assistant turn) is prompt,
//! `F[P.len()..]` is the assistant turn (content + whatever the template closes the turn with,
//! e.g. `<end_of_turn>\n`) and is trained. This requires each rendering to be a prefix of the
//! next (true of gemma, chatml, llama3 and most templates); a template that rewrites earlier turns
//! (e.g. strips reasoning from all but the last turn) is reported as an error on the record.

use minijinja::{Environment, ErrorKind, Value};

use crate::error::{DataError, Result};
use crate::record::{Message, Role};
use crate::template::{SegKind, Segment};
use crate::tokenizer::TextTokenizer;

pub struct ChatTemplate {
    env: Environment<'static>,
    source_name: String,
    bos: String,
    eos: String,
    pad: String,
    unk: String,
}

/// Turns TRL's `{% generation %}` / `{% endgeneration %}` into `{% if true %}` / `{% endif %}`:
/// a no-op block with exactly the same whitespace behaviour (trim_blocks, lstrip_blocks and any
/// `-`/`+` markers are kept), which minijinja understands.
fn strip_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(p) = rest.find("{%") {
        out.push_str(&rest[..p]);
        let tail = &rest[p..];
        let Some(end) = tail.find("%}") else {
            out.push_str(tail);
            return out;
        };
        let tag = &tail[..end + 2];
        let inner = tail[2..end].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        match inner {
            "generation" => out.push_str(&tag.replacen("generation", "if true", 1)),
            "endgeneration" => out.push_str(&tag.replacen("endgeneration", "endif", 1)),
            _ => out.push_str(tag),
        }
        rest = &tail[end + 2..];
    }
    out.push_str(rest);
    out
}

/// serde_json formatter with Python `json.dumps` separators (", " and ": ").
struct PyFormatter;
impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

fn tojson(v: Value) -> std::result::Result<Value, minijinja::Error> {
    let mut buf = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, PyFormatter);
    serde::Serialize::serialize(&v, &mut ser)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(
        String::from_utf8_lossy(&buf).into_owned(),
    ))
}

/// A message as transformers passes it: a dict with keys in the order role, content (the order
/// `tojson` prints them in).
#[derive(serde::Serialize)]
struct JinjaMessage<'a> {
    role: &'a str,
    content: &'a str,
}

fn message_value(messages: &[Message]) -> Value {
    let list: Vec<JinjaMessage<'_>> = messages
        .iter()
        .map(|m| JinjaMessage {
            role: m.role.name(),
            content: &m.content,
        })
        .collect();
    Value::from_serialize(&list)
}

/// Instruction budget of one render. A real chat template spends a few dozen instructions per message;
/// the budget stops a template from tokenizer_config.json that loops (nearly) forever.
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// A readable message for a render error (the `raise_exception` text when that is what failed).
fn describe(e: &minijinja::Error) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(d)) => format!("the chat template raised: {d}"),
        (ErrorKind::OutOfFuel, _) => format!(
            "the chat template ran more than {TEMPLATE_FUEL} instructions for one conversation \
             (an endless or huge loop?)"
        ),
        _ => format!("chat template error: {e}"),
    }
}

impl ChatTemplate {
    pub fn new(src: &str, source_name: &str, tok: &TextTokenizer) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat_template", strip_generation_tags(src))
            .map_err(|e| DataError::ChatTemplate {
                source_name: source_name.into(),
                message: e.to_string(),
            })?;
        let text = |t: Option<&crate::tokenizer::SpecialToken>| {
            t.map(|t| t.text.clone()).unwrap_or_default()
        };
        Ok(ChatTemplate {
            env,
            source_name: source_name.into(),
            bos: text(tok.bos()),
            eos: text(tok.eos()),
            pad: text(tok.pad()),
            unk: text(tok.unk()),
        })
    }

    /// Renders `messages`; Err is the template's complaint (e.g. a `raise_exception` message).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> std::result::Result<String, String> {
        let t = self
            .env
            .get_template("chat_template")
            .map_err(|e| describe(&e))?;
        let ctx = minijinja::context! {
            messages => message_value(messages),
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
            pad_token => self.pad.as_str(),
            unk_token => self.unk.as_str(),
            add_generation_prompt => add_generation_prompt,
        };
        t.render(ctx).map_err(|e| describe(&e))
    }

    /// Segments by incremental rendering (see the module docs).
    pub(crate) fn render_segments(
        &self,
        msgs: &[Message],
        from_alpaca: bool,
    ) -> std::result::Result<Vec<Segment>, (String, String)> {
        let field = |i: usize| {
            if from_alpaca {
                "-".to_string()
            } else {
                format!("messages[{i}]")
            }
        };
        let mut segs = Vec::new();
        let mut done = String::new();
        let mut turn = 0;
        for (k, m) in msgs.iter().enumerate() {
            if m.role != Role::Assistant {
                continue;
            }
            let p = self.render(&msgs[..k], true).map_err(|e| (field(k), e))?;
            let f = self.render(&msgs[..=k], false).map_err(|e| (field(k), e))?;
            if !p.starts_with(&done) || !f.starts_with(&p) {
                return Err((
                    field(k),
                    format!(
                        "the chat template of {} is not prefix-stable here (a rendering of the first turns is not a prefix of a longer one), so the assistant turn cannot be delimited; use a built-in template",
                        self.source_name
                    ),
                ));
            }
            if p.len() > done.len() {
                segs.push(Segment {
                    text: p[done.len()..].to_string(),
                    kind: SegKind::Prompt,
                });
            }
            if f.len() == p.len() {
                return Err((
                    field(k),
                    "the chat template rendered this assistant turn as empty text".into(),
                ));
            }
            segs.push(Segment {
                text: f[p.len()..].to_string(),
                kind: SegKind::Completion { turn },
            });
            turn += 1;
            done = f;
        }
        if msgs.last().is_some_and(|m| m.role != Role::Assistant) {
            let f = self
                .render(msgs, false)
                .map_err(|e| (field(msgs.len() - 1), e))?;
            if !f.starts_with(&done) {
                return Err((
                    field(msgs.len() - 1),
                    "the chat template is not prefix-stable after the last assistant turn".into(),
                ));
            }
            if f.len() > done.len() {
                segs.push(Segment {
                    text: f[done.len()..].to_string(),
                    kind: SegKind::Prompt,
                });
            }
        }
        Ok(segs)
    }

    /// The end-of-turn token: the first special token of the assistant turn of a probe
    /// conversation, rendered and tokenized (None when the turn holds no special token).
    pub(crate) fn probe_end_of_turn(&self, tok: &TextTokenizer) -> Result<Option<u32>> {
        let probe = [
            Message::new(Role::User, "Hola"),
            Message::new(Role::Assistant, "Hola"),
        ];
        let segs =
            self.render_segments(&probe, false)
                .map_err(|(_, e)| DataError::ChatTemplate {
                    source_name: self.source_name.clone(),
                    message: format!(
                        "rendering a probe conversation [user, assistant] failed: {e}"
                    ),
                })?;
        for s in segs
            .iter()
            .filter(|s| matches!(s.kind, SegKind::Completion { .. }))
        {
            if let Some(id) = tok
                .encode(&s.text)?
                .into_iter()
                .find(|&id| tok.is_special_id(id))
            {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::{strip_generation_tags, ChatTemplate};
    use crate::record::{Message, Role};

    #[test]
    fn tojson_matches_python_json_dumps() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/tokenizer");
        let tok = crate::tokenizer::TextTokenizer::from_model_dir(&dir).unwrap();
        let t = ChatTemplate::new(
            "{{ messages | tojson }}|{{ {'a': [1, 2.5, none, true]} | tojson }}",
            "test",
            &tok,
        )
        .unwrap();
        let out = t
            .render(&[Message::new(Role::User, "a \"b\" ñ\n<x>")], false)
            .unwrap();
        // Python: json.dumps(x, ensure_ascii=False) (transformers' tojson).
        assert_eq!(
            out,
            r#"[{"role": "user", "content": "a \"b\" ñ\n<x>"}]|{"a": [1, 2.5, null, true]}"#
        );
    }

    #[test]
    fn generation_tags_become_no_op_blocks() {
        let s = "{% for m in messages %}{%- generation -%}{{ m.content }}{% endgeneration %}{% endfor %}";
        assert_eq!(
            strip_generation_tags(s),
            "{% for m in messages %}{%- if true -%}{{ m.content }}{% endif %}{% endfor %}"
        );
    }
}
