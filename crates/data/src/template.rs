//! Prompt templates. A template turns a record into SEGMENTS — pieces of text with a kind — and the
//! label mask comes from the kinds: each segment is tokenized on its own and the ids concatenated,
//! so no marker string is ever searched for in the token stream (the bug class of string-marker
//! masking: a marker that tokenizes differently in context is never found and everything, or
//! nothing, is masked).
//!
//! Built-in templates (rendered text identical to the reference Jinja templates, golden-tested
//! against transformers' `apply_chat_template`):
//! - `alpaca`: the exact Stanford Alpaca text, with and without input, then the output and EOS.
//!   The response follows `"### Response:\n"` (Stanford itself has no character after the colon).
//!   Why the newline: (1) the prompt/response boundary then falls on a pre-tokenizer split (a
//!   newline), so tokenizing the prompt and the response separately gives exactly the ids of the
//!   joined text — with nothing after the colon, a BPE may merge `:` with the first letters of the
//!   answer and the separately-tokenized prompt would not be a prefix; (2) it is what axolotl
//!   ships and what an inference prompt naturally ends with, so the model does not learn to glue
//!   its first word to the colon. A `system` field, when present, replaces the fixed preamble
//!   sentence ("Below is an instruction ...") followed by a blank line.
//! - `chatml`: `<|im_start|>{role}\n{content}<|im_end|>\n` (TRL's ChatML), content not trimmed.
//! - `gemma`: `<bos><start_of_turn>user\n{u}<end_of_turn>\n<start_of_turn>model\n{a}<end_of_turn>\n`,
//!   content trimmed; a leading system message is folded into the first user turn as
//!   `"{system}\n\n{user}"` (Gemma's template raises on a system role); roles must alternate
//!   user/assistant starting with user.
//! - `llama3`: `<bos>` + `<|start_header_id|>{role}<|end_header_id|>\n\n{content|trim}<|eot_id|>`
//!   per message (TRL's "original Llama 3" template; BOS is the tokenizer's BOS).
//! - `tokenizer`: the model's own `chat_template` (see `jinja.rs`).
//!
//! What is trained (default, `MaskMode::Assistant`): each assistant turn's content AND its end-of-turn
//! markup: `<end_of_turn>\n` (gemma), `<|im_end|>\n` (chatml), `<|eot_id|>` (llama3), EOS (alpaca).
//! The newline after `<end_of_turn>` / `<|im_end|>` is trained too: TRL's `gemma_training.jinja`
//! trains it, every later turn of the rendered text starts after it, and it costs one token per
//! turn; at inference generation stops at the end-of-turn token, so the newline prediction is
//! never used but also never wrong. (The bug this guards against, axolotl#3754: the end-of-turn
//! token masked, so the model never learns to stop.)

use std::collections::HashMap;

use crate::error::{DataError, Result};
use crate::jinja::ChatTemplate;
use crate::record::{Body, Message, Role};
use crate::tokenizer::TextTokenizer;

/// Which template renders the records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateKind {
    Alpaca,
    ChatMl,
    Gemma,
    Llama3,
    /// The tokenizer's own Jinja `chat_template` (tokenizer_config.json).
    Tokenizer,
}

impl TemplateKind {
    pub fn name(self) -> &'static str {
        match self {
            TemplateKind::Alpaca => "alpaca",
            TemplateKind::ChatMl => "chatml",
            TemplateKind::Gemma => "gemma",
            TemplateKind::Llama3 => "llama3",
            TemplateKind::Tokenizer => "tokenizer",
        }
    }
}

impl std::str::FromStr for TemplateKind {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "alpaca" => Ok(TemplateKind::Alpaca),
            "chatml" => Ok(TemplateKind::ChatMl),
            "gemma" | "gemma2" => Ok(TemplateKind::Gemma),
            "llama3" | "llama-3" => Ok(TemplateKind::Llama3),
            "tokenizer" | "jinja" => Ok(TemplateKind::Tokenizer),
            _ => Err(DataError::Option {
                option: "template".into(),
                problem: format!(
                    "unknown template `{s}` (expected alpaca, chatml, gemma, llama3 or tokenizer)"
                ),
            }),
        }
    }
}

impl std::fmt::Display for TemplateKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a segment is, which decides its labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegKind {
    /// Template markup outside assistant turns (BOS, role headers, separators): never trained
    /// except with `MaskMode::All`.
    Structure,
    /// System/user content (or, for the Jinja template, a whole non-assistant stretch).
    Prompt,
    /// Assistant content of assistant turn `turn` (0-based among the assistant turns). For the
    /// Jinja template this also holds the turn's end-of-turn markup.
    Completion { turn: usize },
    /// The end-of-turn markup of assistant turn `turn` (trained with its content).
    EndOfTurn { turn: usize },
}

impl SegKind {
    pub fn assistant_turn(self) -> Option<usize> {
        match self {
            SegKind::Completion { turn } | SegKind::EndOfTurn { turn } => Some(turn),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub text: String,
    pub kind: SegKind,
}

/// A record rendered to segments, or the (field, problem) that makes the record invalid for
/// this template.
pub type RenderResult = std::result::Result<Rendered, (String, String)>;

#[derive(Clone, Debug)]
pub struct Rendered {
    pub segments: Vec<Segment>,
    /// Text records train every token whatever the mask mode.
    pub train_all: bool,
    pub assistant_turns: usize,
}

impl Rendered {
    /// The full rendered text (what `apply_chat_template` would return).
    pub fn text(&self) -> String {
        self.segments.iter().map(|s| s.text.as_str()).collect()
    }
}

/// A template bound to a tokenizer (its special tokens, cached markup ids, Jinja environment).
pub struct Template {
    kind: TemplateKind,
    bos: String,
    eos: String,
    /// The id that ends an assistant turn (checked by `inspect`): `<end_of_turn>`, `<|im_end|>`,
    /// `<|eot_id|>`, EOS for alpaca; for Jinja templates, found by rendering a probe conversation.
    eot_id: Option<u32>,
    jinja: Option<ChatTemplate>,
    /// Token ids of markup strings, tokenized once.
    cache: HashMap<String, Vec<u32>>,
}

const ALPACA_PREAMBLE_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.";
const ALPACA_PREAMBLE: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.";

/// The exact Stanford Alpaca prompt (`PROMPT_DICT`), plus the "\n" after "### Response:" (see the
/// module docs). `system` replaces the preamble sentence when given.
pub fn alpaca_prompt(instruction: &str, input: &str, system: Option<&str>) -> String {
    if input.is_empty() {
        let pre = system.unwrap_or(ALPACA_PREAMBLE);
        format!("{pre}\n\n### Instruction:\n{instruction}\n\n### Response:\n")
    } else {
        let pre = system.unwrap_or(ALPACA_PREAMBLE_INPUT);
        format!(
            "{pre}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

fn err(field: impl Into<String>, problem: impl Into<String>) -> (String, String) {
    (field.into(), problem.into())
}

/// Python's `str.strip()` (what Jinja's `| trim` does).
fn py_trim(s: &str) -> &str {
    s.trim()
}

impl Template {
    /// Binds `kind` to `tok`; fails when a token the template needs is missing or not a single token.
    /// A `tokenizer` template's `strftime_now` formats the local time read now.
    pub fn new(kind: TemplateKind, tok: &TextTokenizer) -> Result<Self> {
        Self::with_date(kind, tok, None)
    }

    /// Like [`Template::new`], with the date a `tokenizer` template's `strftime_now` formats fixed to
    /// `date` (None = now). A training run pins it so that a resume on another day renders, and so
    /// tokenizes, its samples exactly as the first day did.
    pub fn with_date(
        kind: TemplateKind,
        tok: &TextTokenizer,
        date: Option<crate::jinja::TemplateDate>,
    ) -> Result<Self> {
        let bos = if tok.adds_bos() {
            tok.bos().map(|t| t.text.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        let eos = tok.eos().map(|t| t.text.clone()).unwrap_or_default();
        let need = |token: &str, hint: &str| -> Result<u32> {
            match tok.encode(token) {
                Ok(ids) if ids.len() == 1 => Ok(ids[0]),
                _ => Err(DataError::MissingSpecialToken {
                    template: kind.name().into(),
                    token: token.into(),
                    hint: hint.into(),
                }),
            }
        };
        let mut markup: Vec<String> = vec![bos.clone()];
        let (eot_id, jinja) = match kind {
            TemplateKind::Alpaca => {
                if eos.is_empty() {
                    return Err(DataError::MissingSpecialToken {
                        template: "alpaca".into(),
                        token: "eos_token".into(),
                        hint: "the tokenizer has no EOS; the alpaca template ends each response with it".into(),
                    });
                }
                (Some(need(&eos, "EOS must be a single token")?), None)
            }
            TemplateKind::Gemma => {
                need(
                    "<start_of_turn>",
                    "add it as a special token, or use another template",
                )?;
                let e = need(
                    "<end_of_turn>",
                    "add it as a special token, or use another template",
                )?;
                for r in ["user", "model"] {
                    markup.push(format!("<start_of_turn>{r}\n"));
                    markup.push(format!("{bos}<start_of_turn>{r}\n"));
                }
                markup.push("<end_of_turn>\n<start_of_turn>model\n".into());
                markup.push("<end_of_turn>\n<start_of_turn>user\n".into());
                markup.push("<end_of_turn>\n".into());
                (Some(e), None)
            }
            TemplateKind::ChatMl => {
                need(
                    "<|im_start|>",
                    "add it as a special token, or use another template",
                )?;
                let e = need(
                    "<|im_end|>",
                    "add it as a special token, or use another template",
                )?;
                for r in ["system", "user", "assistant"] {
                    markup.push(format!("<|im_start|>{r}\n"));
                    markup.push(format!("{bos}<|im_start|>{r}\n"));
                    markup.push(format!("<|im_end|>\n<|im_start|>{r}\n"));
                }
                markup.push("<|im_end|>\n".into());
                (Some(e), None)
            }
            TemplateKind::Llama3 => {
                need(
                    "<|start_header_id|>",
                    "add it as a special token, or use another template",
                )?;
                need(
                    "<|end_header_id|>",
                    "add it as a special token, or use another template",
                )?;
                let e = need(
                    "<|eot_id|>",
                    "add it as a special token, or use another template",
                )?;
                for r in ["system", "user", "assistant"] {
                    markup.push(format!("<|start_header_id|>{r}<|end_header_id|>\n\n"));
                    markup.push(format!("{bos}<|start_header_id|>{r}<|end_header_id|>\n\n"));
                    markup.push(format!(
                        "<|eot_id|><|start_header_id|>{r}<|end_header_id|>\n\n"
                    ));
                }
                markup.push("<|eot_id|>".into());
                (Some(e), None)
            }
            TemplateKind::Tokenizer => {
                // The template is the `chat_template` key of tokenizer_config.json, next to tokenizer.json.
                let source = tok
                    .path()
                    .with_file_name("tokenizer_config.json")
                    .display()
                    .to_string();
                let src = tok.chat_template().ok_or_else(|| DataError::ChatTemplate {
                    source_name: source.clone(),
                    message: "the tokenizer has no chat_template (tokenizer_config.json); pick a built-in template".into(),
                })?;
                let j = ChatTemplate::with_date(
                    src,
                    &source,
                    tok,
                    date.unwrap_or_else(crate::jinja::TemplateDate::now_local),
                )?;
                let eot = j.probe_end_of_turn(tok)?;
                (eot, Some(j))
            }
        };
        if !eos.is_empty() {
            markup.push(eos.clone());
        }
        let mut cache = HashMap::new();
        for m in markup {
            if !m.is_empty() {
                let ids = tok.encode(&m)?;
                cache.insert(m, ids);
            }
        }
        Ok(Template {
            kind,
            bos,
            eos,
            eot_id,
            jinja,
            cache,
        })
    }

    pub fn kind(&self) -> TemplateKind {
        self.kind
    }
    /// The end-of-turn id trained at the end of every assistant turn (None: a Jinja template whose
    /// assistant turn ends with no special token).
    pub fn end_of_turn_id(&self) -> Option<u32> {
        self.eot_id
    }
    /// Cached ids of a markup string, if it is one.
    pub(crate) fn cached(&self, text: &str) -> Option<&[u32]> {
        self.cache.get(text).map(Vec::as_slice)
    }

    /// Renders one record into segments (template-level validation included).
    pub fn render(&self, body: &Body) -> RenderResult {
        if let Body::Text(t) = body {
            // Text records: BOS + text + EOS, everything trained.
            let mut segs = Vec::new();
            if !self.bos.is_empty() {
                segs.push(Segment {
                    text: self.bos.clone(),
                    kind: SegKind::Structure,
                });
            }
            segs.push(Segment {
                text: t.clone(),
                kind: SegKind::Completion { turn: 0 },
            });
            if self.eos.is_empty() {
                return Err(err(
                    "text",
                    "the tokenizer has no EOS token to end a text record",
                ));
            }
            segs.push(Segment {
                text: self.eos.clone(),
                kind: SegKind::EndOfTurn { turn: 0 },
            });
            return Ok(Rendered {
                segments: segs,
                train_all: true,
                assistant_turns: 1,
            });
        }
        let (field_prefix, msgs) = match body {
            Body::Chat(m) => ("messages", std::borrow::Cow::Borrowed(m)),
            _ => (
                "messages",
                std::borrow::Cow::Owned(body.to_messages().unwrap_or_default()),
            ),
        };
        let is_alpaca_record = matches!(body, Body::Instruction { .. });
        let segments = match self.kind {
            TemplateKind::Alpaca => self.render_alpaca(body)?,
            TemplateKind::Gemma => self.render_gemma(&msgs, field_prefix, is_alpaca_record)?,
            TemplateKind::ChatMl => self.render_chatml(&msgs),
            TemplateKind::Llama3 => self.render_llama3(&msgs),
            TemplateKind::Tokenizer => match &self.jinja {
                Some(j) => j.render_segments(&msgs, is_alpaca_record)?,
                None => return Err(err("-", "internal: tokenizer template not compiled")),
            },
        };
        let mut segments = merge_structure(segments);
        // Exactly one BOS, first. Templates that emit it themselves (gemma, llama3, most Jinja
        // templates) already start with it; for the others it is added here.
        if !self.bos.is_empty()
            && !segments
                .first()
                .is_some_and(|s| s.text.starts_with(&self.bos))
        {
            segments.insert(
                0,
                Segment {
                    text: self.bos.clone(),
                    kind: SegKind::Structure,
                },
            );
        }
        let assistant_turns = segments
            .iter()
            .filter_map(|s| s.kind.assistant_turn())
            .max()
            .map_or(0, |t| t + 1);
        Ok(Rendered {
            segments,
            train_all: false,
            assistant_turns,
        })
    }

    fn render_alpaca(&self, body: &Body) -> std::result::Result<Vec<Segment>, (String, String)> {
        let (system, instruction, input, output) = match body {
            Body::Instruction {
                system,
                instruction,
                input,
                output,
            } => (
                system.clone(),
                instruction.clone(),
                input.clone(),
                output.clone(),
            ),
            Body::Chat(m) => {
                let mut it = m.iter().enumerate().peekable();
                let mut system = None;
                if let Some((_, first)) = it.peek() {
                    if first.role == Role::System {
                        system = Some(first.content.clone());
                        it.next();
                    }
                }
                let rest: Vec<_> = it.collect();
                match rest.as_slice() {
                    [(_, u), (_, a)] if u.role == Role::User && a.role == Role::Assistant => {
                        (system, u.content.clone(), String::new(), a.content.clone())
                    }
                    _ => {
                        if let Some((i, _)) = rest.iter().find(|(_, m)| m.role == Role::System) {
                            return Err(err(
                                format!("messages[{i}].role"),
                                "a system message where the alpaca template forbids it (only a leading system message is allowed)",
                            ));
                        }
                        return Err(err(
                            "messages",
                            format!(
                                "the alpaca template takes one user turn followed by one assistant turn (found {} messages); use chatml, gemma, llama3 or tokenizer for multi-turn data",
                                m.len()
                            ),
                        ));
                    }
                }
            }
            Body::Text(_) => {
                return Err(err(
                    "text",
                    "a text record has no instruction/response (handled before templating)",
                ))
            }
        };
        Ok(vec![
            Segment {
                text: self.bos.clone(),
                kind: SegKind::Structure,
            },
            Segment {
                text: alpaca_prompt(&instruction, &input, system.as_deref()),
                kind: SegKind::Prompt,
            },
            Segment {
                text: output,
                kind: SegKind::Completion { turn: 0 },
            },
            Segment {
                text: self.eos.clone(),
                kind: SegKind::EndOfTurn { turn: 0 },
            },
        ])
    }

    fn render_gemma(
        &self,
        msgs: &[Message],
        field_prefix: &str,
        from_alpaca: bool,
    ) -> std::result::Result<Vec<Segment>, (String, String)> {
        // Fold a leading system message into the first user turn.
        let mut offset = 0;
        let mut system: Option<&str> = None;
        if msgs.first().is_some_and(|m| m.role == Role::System) {
            system = Some(&msgs[0].content);
            offset = 1;
        }
        let mut segs = vec![Segment {
            text: self.bos.clone(),
            kind: SegKind::Structure,
        }];
        let mut turn = 0;
        for (j, m) in msgs[offset..].iter().enumerate() {
            let i = j + offset;
            let field = if from_alpaca {
                "system".to_string()
            } else {
                format!("{field_prefix}[{i}].role")
            };
            match m.role {
                Role::System => {
                    return Err(err(
                        field,
                        "a system message where the gemma template forbids it (only a leading system message is supported; it is folded into the first user turn)",
                    ))
                }
                r => {
                    let expected = if j % 2 == 0 { Role::User } else { Role::Assistant };
                    if r != expected {
                        return Err(err(
                            field,
                            format!(
                                "roles must alternate user/assistant/user/... (gemma template): expected {}, found {}",
                                expected.name(),
                                r.name()
                            ),
                        ));
                    }
                }
            }
            if m.role == Role::User {
                let content = match (j, system) {
                    (0, Some(s)) => format!("{s}\n\n{}", m.content),
                    _ => m.content.clone(),
                };
                segs.push(Segment {
                    text: "<start_of_turn>user\n".into(),
                    kind: SegKind::Structure,
                });
                segs.push(Segment {
                    text: py_trim(&content).to_string(),
                    kind: SegKind::Prompt,
                });
                segs.push(Segment {
                    text: "<end_of_turn>\n".into(),
                    kind: SegKind::Structure,
                });
            } else {
                segs.push(Segment {
                    text: "<start_of_turn>model\n".into(),
                    kind: SegKind::Structure,
                });
                segs.push(Segment {
                    text: py_trim(&m.content).to_string(),
                    kind: SegKind::Completion { turn },
                });
                segs.push(Segment {
                    text: "<end_of_turn>\n".into(),
                    kind: SegKind::EndOfTurn { turn },
                });
                turn += 1;
            }
        }
        if msgs.len() == offset {
            return Err(err(
                field_prefix,
                "only a system message: nothing to train on",
            ));
        }
        Ok(segs)
    }

    fn render_chatml(&self, msgs: &[Message]) -> Vec<Segment> {
        let mut segs = Vec::with_capacity(msgs.len() * 3);
        let mut turn = 0;
        for m in msgs {
            segs.push(Segment {
                text: format!("<|im_start|>{}\n", m.role.name()),
                kind: SegKind::Structure,
            });
            if m.role == Role::Assistant {
                segs.push(Segment {
                    text: m.content.clone(),
                    kind: SegKind::Completion { turn },
                });
                segs.push(Segment {
                    text: "<|im_end|>\n".into(),
                    kind: SegKind::EndOfTurn { turn },
                });
                turn += 1;
            } else {
                segs.push(Segment {
                    text: m.content.clone(),
                    kind: SegKind::Prompt,
                });
                segs.push(Segment {
                    text: "<|im_end|>\n".into(),
                    kind: SegKind::Structure,
                });
            }
        }
        segs
    }

    fn render_llama3(&self, msgs: &[Message]) -> Vec<Segment> {
        let mut segs = Vec::with_capacity(msgs.len() * 3 + 1);
        segs.push(Segment {
            text: self.bos.clone(),
            kind: SegKind::Structure,
        });
        let mut turn = 0;
        for m in msgs {
            segs.push(Segment {
                text: format!("<|start_header_id|>{}<|end_header_id|>\n\n", m.role.name()),
                kind: SegKind::Structure,
            });
            let content = py_trim(&m.content).to_string();
            if m.role == Role::Assistant {
                segs.push(Segment {
                    text: content,
                    kind: SegKind::Completion { turn },
                });
                segs.push(Segment {
                    text: "<|eot_id|>".into(),
                    kind: SegKind::EndOfTurn { turn },
                });
                turn += 1;
            } else {
                segs.push(Segment {
                    text: content,
                    kind: SegKind::Prompt,
                });
                segs.push(Segment {
                    text: "<|eot_id|>".into(),
                    kind: SegKind::Structure,
                });
            }
        }
        segs
    }
}

/// Joins adjacent Structure segments and drops empty ones (fewer tokenizer calls; markup is
/// split at special tokens anyway, so the ids are the same).
fn merge_structure(segs: Vec<Segment>) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::with_capacity(segs.len());
    for s in segs {
        if s.text.is_empty() && !matches!(s.kind, SegKind::Completion { .. }) {
            continue;
        }
        if let (Some(last), SegKind::Structure) = (out.last_mut(), s.kind) {
            if last.kind == SegKind::Structure {
                last.text.push_str(&s.text);
                continue;
            }
        }
        out.push(s);
    }
    out
}
