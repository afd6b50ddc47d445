//! The model's own chat template (`chat_template` of tokenizer_config.json), rendered with
//! `minijinja` in the configuration transformers uses (`trim_blocks`, `lstrip_blocks`, loop
//! controls, `raise_exception`, `strftime_now`, Python string methods such as `.strip()`, a `tojson`
//! with Python's separators), with `messages`, `bos_token`, `eos_token`, `pad_token`, `unk_token` and
//! `add_generation_prompt` in the context. TRL's `{% generation %}` tags are accepted and ignored.
//!
//! `strftime_now(fmt)` (Llama-3.x templates: `strftime_now("%d %b %Y")` → "26 Jul 2024") is Python's
//! `datetime.now().strftime(fmt)`, see [`strftime`]. The clock is read once per [`ChatTemplate`]: every
//! rendering of a run carries the same date. A template that prints the date makes the rendered text,
//! hence the token ids and the data fingerprint of a checkpoint, depend on the day the run started.
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

mod date;
pub use date::{strftime, TemplateDate};

pub struct ChatTemplate {
    env: Environment<'static>,
    /// The date `strftime_now` formats (read once, at construction).
    today: TemplateDate,
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
        // The closing `%}` is searched after the opening `{%`: in `{%}` the two overlap, and that
        // is an unclosed tag (minijinja reports it), not an empty one.
        let Some(end) = tail[2..].find("%}").map(|e| e + 2) else {
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
        // strftime_now's own errors (an unsupported format) are not the template's raise_exception.
        (ErrorKind::InvalidOperation, Some(d)) if d.starts_with("strftime_now:") => {
            format!("chat template error: {d}")
        }
        (ErrorKind::InvalidOperation, Some(d)) => format!("the chat template raised: {d}"),
        (ErrorKind::OutOfFuel, _) => format!(
            "the chat template ran more than {TEMPLATE_FUEL} instructions for one conversation \
             (an endless or huge loop?)"
        ),
        _ => format!("chat template error: {e}"),
    }
}

/// Longest chat template accepted, in bytes. Real templates are a few KiB (the longest known
/// ones, with tool-calling logic, are ~20 KiB); the limit bounds the compile stack below.
pub const MAX_TEMPLATE_LEN: usize = 256 * 1024;
/// Stack of the compile thread: a base plus this much per source byte (≈5× what a release build
/// uses at the deepest recursion per byte, for unoptimized builds' larger frames).
const COMPILE_STACK_BASE: usize = 8 << 20;
const COMPILE_STACK_PER_BYTE: usize = 2048;

/// The environment transformers renders chat templates in, with `src` compiled as "chat_template".
fn compile(
    src: String,
    today: TemplateDate,
) -> std::result::Result<Environment<'static>, minijinja::Error> {
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
    env.add_function(
        "strftime_now",
        move |fmt: String| -> std::result::Result<Value, minijinja::Error> {
            strftime(&fmt, &today)
                .map(Value::from)
                .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e))
        },
    );
    env.add_filter("tojson", tojson);
    env.add_template_owned("chat_template", src)?;
    Ok(env)
}

impl ChatTemplate {
    /// Compiles `src`; `strftime_now` formats the local time read now.
    pub fn new(src: &str, source_name: &str, tok: &TextTokenizer) -> Result<Self> {
        Self::with_date(src, source_name, tok, TemplateDate::now_local())
    }

    /// Compiles `src` with `strftime_now` formatting `today` (reproducible renderings, tests).
    pub fn with_date(
        src: &str,
        source_name: &str,
        tok: &TextTokenizer,
        today: TemplateDate,
    ) -> Result<Self> {
        if src.len() > MAX_TEMPLATE_LEN {
            return Err(DataError::ChatTemplate {
                source_name: source_name.into(),
                message: format!(
                    "the template is {} bytes, above the limit of {MAX_TEMPLATE_LEN} (real chat \
                     templates are a few KiB)",
                    src.len()
                ),
            });
        }
        let src = strip_generation_tags(src);
        // minijinja's parser and compiler recurse once per level of an expression without a depth
        // limit for some forms (`- - - … 1`, `1+1+…`, `x|f|f|…`, `x.a.a.…`: ~400 bytes of stack per
        // source byte in a release build): a 25 KB template overflowed the 8 MiB main stack (a
        // SIGSEGV, found with the jinja fuzz target). The compilation runs on its own thread with a
        // stack that grows with the source, so any template up to MAX_TEMPLATE_LEN compiles or
        // fails cleanly.
        // The stack is virtual memory: only what the recursion touches is used. Rendering runs the
        // compiled (flat) instructions and needs no such stack.
        let stack = COMPILE_STACK_BASE + src.len() * COMPILE_STACK_PER_BYTE;
        let compiled = std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("chat-template-compile".into())
                .stack_size(stack)
                .spawn_scoped(scope, move || compile(src, today))
                .map(|h| h.join())
        });
        let env = match compiled {
            Ok(Ok(Ok(env))) => env,
            Ok(Ok(Err(e))) => {
                return Err(DataError::ChatTemplate {
                    source_name: source_name.into(),
                    message: e.to_string(),
                })
            }
            // The compile thread panicked: minijinja's own bug, re-raised as it is.
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(e) => {
                return Err(DataError::ChatTemplate {
                    source_name: source_name.into(),
                    message: format!(
                        "cannot start a thread with a {stack}-byte stack to compile it: {e}"
                    ),
                })
            }
        };
        let text = |t: Option<&crate::tokenizer::SpecialToken>| {
            t.map(|t| t.text.clone()).unwrap_or_default()
        };
        Ok(ChatTemplate {
            env,
            today,
            source_name: source_name.into(),
            bos: text(tok.bos()),
            eos: text(tok.eos()),
            pad: text(tok.pad()),
            unk: text(tok.unk()),
        })
    }

    /// The date `strftime_now` formats in this template's renderings.
    pub fn today(&self) -> TemplateDate {
        self.today
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
    use super::date::tests::date;
    use super::{strip_generation_tags, ChatTemplate, TemplateDate};
    use crate::record::{Message, Role};

    fn project_tokenizer() -> crate::tokenizer::TextTokenizer {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/tokenizer");
        crate::tokenizer::TextTokenizer::from_model_dir(&dir).unwrap()
    }

    #[test]
    fn llama31_template_prints_the_injected_date() {
        // The date logic of the Llama-3.1 / 3.2 chat templates (tokenizer_config.json), then one turn.
        let src = r#"{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;
        let tok = project_tokenizer();
        let t =
            ChatTemplate::with_date(src, "llama31", &tok, date(2024, 3, 5, 23, 59, 59)).unwrap();
        assert_eq!(t.today(), date(2024, 3, 5, 23, 59, 59));
        let out = t
            .render(&[Message::new(Role::User, " Hola ")], true)
            .unwrap();
        assert_eq!(
            out,
            "<bos><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\
             Today Date: 05 Mar 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHola<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        // Another day, another date: the text comes from the injected reading, not from the clock.
        let t = ChatTemplate::with_date(src, "llama31", &tok, date(1999, 12, 31, 0, 0, 0)).unwrap();
        assert!(t
            .render(&[Message::new(Role::User, "x")], false)
            .unwrap()
            .contains("Today Date: 31 Dec 1999\n"));
        // A format that strftime_now cannot honour is a render error naming it.
        let bad = ChatTemplate::with_date(
            "{{ strftime_now('%s') }}",
            "x",
            &tok,
            date(2024, 1, 1, 0, 0, 0),
        )
        .unwrap();
        let err = bad.render(&[], false).unwrap_err();
        assert!(err.contains("strftime_now") && err.contains("%s"), "{err}");
        // ChatTemplate::new reads the clock once: a valid date, kept for every render.
        let live = ChatTemplate::new("{{ strftime_now('%Y') }}", "x", &tok).unwrap();
        let year: i32 = live.render(&[], false).unwrap().parse().unwrap();
        assert!((1..=9999).contains(&year));
        assert_eq!(
            live.render(&[], false).unwrap(),
            live.render(&[], false).unwrap()
        );
    }

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

    /// Fuzz-found: `{%}` (the `%}` overlapping the `{%`) panicked slicing `tail[2..1]`.
    #[test]
    fn overlapping_tag_delimiters_are_a_template_error() {
        for s in ["{%}", "a{%}{% endif %}", "{%}%}", "{%-}"] {
            assert_eq!(strip_generation_tags(s), s);
        }
        assert_eq!(
            strip_generation_tags("{%}{% generation %}x{% endgeneration %}"),
            "{%}{% generation %}x{% endif %}"
        );
        let tok = project_tokenizer();
        let e = ChatTemplate::new("{%}{% endif %}", "tokenizer_config.json", &tok)
            .err()
            .expect("an unclosed tag does not compile")
            .to_string();
        assert!(e.contains("tokenizer_config.json"), "{e}");
    }

    /// Found with hand-written deep-nesting inputs run through the `jinja` fuzz target: minijinja's
    /// parser/compiler recurse once per level of `- - … 1`, `1+1+…`, `x|f|f|…` and `x.a.a…` with
    /// no depth limit; a 25 KB template overflowed the main thread's stack (SIGSEGV). Compilation now runs on a stack sized from the source: these compile (or
    /// fail cleanly) even here, on a 2 MiB test thread, at the size limit.
    #[test]
    fn deeply_nested_expressions_compile_without_overflowing_the_stack() {
        let tok = project_tokenizer();
        let date = TemplateDate::new(2026, 1, 1, 0, 0, 0).unwrap();
        let fill = |unit: &str, head: &str, tail: &str| {
            let n = (super::MAX_TEMPLATE_LEN - head.len() - tail.len()) / unit.len();
            format!("{head}{}{tail}", unit.repeat(n))
        };
        let cases = [
            fill("-", "{{ ", "1 }}"),
            fill("+1", "{{ 1", " }}"),
            fill("|trim", "{{ 'a'", " }}"),
            fill(".a", "{{ messages", " }}"),
            fill("~1", "{{ 'a'", " }}"),
        ];
        for src in &cases {
            assert!(src.len() <= super::MAX_TEMPLATE_LEN);
            match ChatTemplate::with_date(src, "tokenizer_config.json", &tok, date) {
                // Rendering evaluates the compiled instructions without recursion.
                Ok(t) => {
                    let _ = t.render(&[Message::new(Role::User, "u")], true);
                }
                Err(e) => assert!(e.to_string().contains("tokenizer_config.json"), "{e}"),
            }
        }
        // `- - 1` folds to 1: an even chain renders the number itself.
        let t = ChatTemplate::with_date(&fill("-", "{{ ", "1 }}"), "t", &tok, date);
        let n = super::MAX_TEMPLATE_LEN - 7;
        let want = if n.is_multiple_of(2) { "1" } else { "-1" };
        assert_eq!(t.unwrap().render(&[], false).unwrap(), want);
    }

    /// Rendering happens on rayon workers (2 MiB stacks, like this test thread): recursion a
    /// template asks for at render time (a macro calling itself, nested includes of loops) stops
    /// at minijinja's recursion limit with an error, well within that stack.
    #[test]
    fn runaway_macro_recursion_is_a_render_error_on_a_small_stack() {
        let tok = project_tokenizer();
        let date = TemplateDate::new(2026, 1, 1, 0, 0, 0).unwrap();
        for src in [
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "{% macro f(n) %}{% for m in messages %}{{ f(n + 1) }}{% endfor %}{% endmacro %}{{ f(0) }}",
            "{% macro f(n) %}{{ caller() }}{{ f(n + 1) }}{% endmacro %}{% call f(0) %}x{% endcall %}",
        ] {
            let t = ChatTemplate::with_date(src, "t", &tok, date).unwrap();
            let e = t
                .render(&[Message::new(Role::User, "u")], false)
                .expect_err("endless recursion");
            assert!(!e.is_empty());
        }
    }

    #[test]
    fn a_template_above_the_size_limit_is_refused() {
        let tok = project_tokenizer();
        let src = "x".repeat(super::MAX_TEMPLATE_LEN + 1);
        let e = ChatTemplate::new(&src, "tokenizer_config.json", &tok)
            .err()
            .expect("too long")
            .to_string();
        assert!(
            e.contains("tokenizer_config.json") && e.contains("above the limit"),
            "{e}"
        );
    }
}
