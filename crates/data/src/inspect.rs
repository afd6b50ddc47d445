//! `afinar data inspect`: the logic (the CLI in afinar-trainer is a thin wrapper).
//!
//! [`inspect`] validates and tokenizes a dataset exactly as training would, and returns an
//! [`InspectReport`]: the first samples split into trained / untrained pieces, the counts, a
//! length histogram, and the problems that make the command fail (exit non-zero): a sample with
//! no trained token, or an assistant turn whose end-of-turn token is not trained (the model would
//! never learn to stop). [`render_report`] writes it to any `io::Write`, with ANSI colour
//! (trained tokens bold green, the rest dim) or with `[[…]]` markers around trained text.

use std::io::{self, Write};
use std::path::PathBuf;

use rayon::prelude::*;

use crate::encode::{
    encode_dataset, encode_record, EncodeOptions, EncodeStats, MaskMode, Overflow,
};
use crate::error::{ErrorList, Loc, RecordError, Result};
use crate::record::{read_dataset, Body, Format};
use crate::template::{Template, TemplateKind};
use crate::tokenizer::TextTokenizer;

#[derive(Clone, Debug)]
pub struct InspectOptions {
    pub data: PathBuf,
    pub format: Option<Format>,
    pub template: TemplateKind,
    pub mask: MaskMode,
    pub max_seq_len: usize,
    pub overflow: Overflow,
    /// How many samples to render.
    pub samples: usize,
}

/// A run of consecutive tokens with the same trained state, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub text: String,
    pub trained: bool,
}

#[derive(Clone, Debug)]
pub struct SampleView {
    pub loc: Loc,
    pub pieces: Vec<Piece>,
    pub tokens: usize,
    pub trained: usize,
    pub truncated: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistBin {
    /// Inclusive token-length range; the last bin may be `max_seq_len + 1 ..= longest` (overflow).
    pub lo: usize,
    pub hi: usize,
    pub count: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub loc: Loc,
    pub message: String,
}

#[derive(Clone, Debug)]
pub struct InspectReport {
    pub path: PathBuf,
    pub format: Format,
    pub template: TemplateKind,
    pub mask: MaskMode,
    pub max_seq_len: usize,
    pub overflow: Overflow,
    /// Counts after length handling (what training would see).
    pub stats: EncodeStats,
    /// Lengths before length handling.
    pub histogram: Vec<HistBin>,
    /// Mean and maximum length before length handling.
    pub mean_len: f64,
    pub longest: usize,
    pub samples: Vec<SampleView>,
    /// The first 20 problems; `problem_count` counts all.
    pub problems: Vec<Problem>,
    pub problem_count: usize,
}

impl InspectReport {
    /// True when the CLI should exit 0.
    pub fn passed(&self) -> bool {
        self.problem_count == 0
    }
}

fn histogram(lengths: &[usize], max_seq_len: usize) -> Vec<HistBin> {
    let width = max_seq_len.div_ceil(10).max(1);
    let mut bins: Vec<HistBin> = (0..10)
        .map(|k| HistBin {
            lo: k * width + 1,
            hi: ((k + 1) * width).min(max_seq_len),
            count: 0,
        })
        .collect();
    bins.retain(|b| b.lo <= b.hi);
    let longest = lengths.iter().copied().max().unwrap_or(0);
    if longest > max_seq_len {
        bins.push(HistBin {
            lo: max_seq_len + 1,
            hi: longest,
            count: 0,
        });
    }
    for &l in lengths {
        if let Some(b) = bins.iter_mut().find(|b| l >= b.lo && l <= b.hi) {
            b.count += 1;
        }
    }
    bins
}

/// Validates and tokenizes `opts.data` like training does and collects the report. A dataset
/// with invalid records returns `DataError::InvalidRecords` (the same list training would print).
pub fn inspect(opts: &InspectOptions, tok: &TextTokenizer) -> Result<InspectReport> {
    let raw = read_dataset(&opts.data, opts.format)?;
    let template = Template::new(opts.template, tok)?;
    let eopts = EncodeOptions {
        mask: opts.mask,
        max_seq_len: opts.max_seq_len,
        overflow: opts.overflow,
    };
    // Training's own path: counts, and every invalid record (incl. overflow = error).
    let ds = encode_dataset(&raw, &template, tok, &eopts)?;
    let eot = template.end_of_turn_id();
    let max = opts.max_seq_len;
    // Per-record checks on what training keeps (after truncation).
    let checked: Vec<(usize, Vec<String>, Option<SampleView>)> = raw
        .records
        .par_iter()
        .enumerate()
        .map(|(i, r)| {
            let e = match encode_record(&r.body, &template, tok, opts.mask) {
                Ok(e) => e,
                // Unreachable in practice: encode_dataset above already rejected invalid records.
                Err((_, p)) => return (0, vec![p], None),
            };
            let full = e.ids.len();
            if full > max && opts.overflow == Overflow::Drop {
                return (full, Vec::new(), None);
            }
            let keep = full.min(max);
            let trained = &e.trained[..keep];
            let mut problems = Vec::new();
            if trained.iter().skip(1).all(|t| !t) {
                problems.push(if keep < full {
                    format!("no trained token left after truncation to {max} tokens (the sample would be dropped)")
                } else {
                    "no trained token".to_string()
                });
            }
            // Text records end with EOS (trained), whatever the template.
            let eot = if matches!(r.body, Body::Text(_)) { tok.eos().map(|t| t.id) } else { eot };
            let eot_text = eot.and_then(|id| tok.id_to_token(id)).unwrap_or_default();
            for (t, &(s, end)) in e.turn_spans.iter().enumerate() {
                let turn_trained = e.trained[s..end].iter().any(|&x| x);
                if !turn_trained || s >= keep {
                    continue;
                }
                let Some(eot) = eot else { continue };
                let has = (s..end.min(keep)).any(|k| e.ids[k] == eot && e.trained[k]);
                if !has {
                    problems.push(if end > keep {
                        format!("assistant turn {t} is cut by truncation to {max} tokens before its end-of-turn token `{eot_text}`")
                    } else {
                        format!("assistant turn {t} lacks a trained end-of-turn token `{eot_text}`")
                    });
                }
            }
            let view = (i < opts.samples).then(|| {
                let mut pieces: Vec<Piece> = Vec::new();
                let mut k = 0;
                while k < keep {
                    let on = trained[k];
                    let mut j = k;
                    while j < keep && trained[j] == on {
                        j += 1;
                    }
                    let text = tok.decode(&e.ids[k..j]).unwrap_or_else(|err| format!("<decode error: {err}>"));
                    pieces.push(Piece { text, trained: on });
                    k = j;
                }
                SampleView {
                    loc: r.loc.clone(),
                    pieces,
                    tokens: keep,
                    trained: trained.iter().skip(1).filter(|&&t| t).count(),
                    truncated: keep < full,
                }
            });
            (full, problems, view)
        })
        .collect();
    let mut problems = ErrorList::default();
    if eot.is_none() {
        problems.push(RecordError {
            loc: Loc { path: tok.path().to_path_buf(), line: 0, column: None },
            field: "chat_template".into(),
            problem: "the template's assistant turns end with no special token: the model cannot learn to stop".into(),
        });
    }
    let mut lengths = Vec::with_capacity(checked.len());
    let mut samples = Vec::new();
    for ((full, ps, view), r) in checked.into_iter().zip(&raw.records) {
        lengths.push(full);
        for p in ps {
            problems.push(RecordError {
                loc: r.loc.clone(),
                field: "-".into(),
                problem: p,
            });
        }
        if let Some(v) = view {
            samples.push(v);
        }
    }
    let mean_len = if lengths.is_empty() {
        0.0
    } else {
        lengths.iter().sum::<usize>() as f64 / lengths.len() as f64
    };
    Ok(InspectReport {
        path: opts.data.clone(),
        format: raw.format,
        template: opts.template,
        mask: opts.mask,
        max_seq_len: max,
        overflow: opts.overflow,
        stats: ds.stats,
        histogram: histogram(&lengths, max),
        mean_len,
        longest: lengths.iter().copied().max().unwrap_or(0),
        samples,
        problems: problems
            .errors
            .into_iter()
            .map(|e| Problem {
                loc: e.loc,
                message: e.problem,
            })
            .collect(),
        problem_count: problems.total,
    })
}

const GREEN: &str = "\x1b[1;32m";
const DIM: &str = "\x1b[2m";
const RED: &str = "\x1b[1;31m";
const RESET: &str = "\x1b[0m";

/// Writes the report. `color`: ANSI colours (a terminal); otherwise trained text is wrapped in
/// `[[` `]]`. A trained newline is shown as `↵` before the line break, so it is visible.
pub fn render_report(r: &InspectReport, w: &mut dyn Write, color: bool) -> io::Result<()> {
    let paint = |code: &'static str| if color { code } else { "" };
    writeln!(
        w,
        "dataset {} (format {}, template {}, mask {}, max_seq_len {}, overflow {})",
        r.path.display(),
        r.format,
        r.template,
        r.mask,
        r.max_seq_len,
        r.overflow
    )?;
    if !color {
        writeln!(w, "trained tokens are shown between [[ and ]]")?;
    }
    for (i, s) in r.samples.iter().enumerate() {
        writeln!(
            w,
            "\n── sample {} · {} · {} tokens, {} trained{} ──",
            i + 1,
            s.loc,
            s.tokens,
            s.trained,
            if s.truncated { " · TRUNCATED" } else { "" }
        )?;
        for p in &s.pieces {
            if p.trained {
                let text = p.text.replace('\n', "↵\n");
                if color {
                    write!(w, "{GREEN}{text}{RESET}")?;
                } else {
                    write!(w, "[[{text}]]")?;
                }
            } else {
                write!(w, "{}{}{}", paint(DIM), p.text, paint(RESET))?;
            }
        }
        writeln!(w)?;
    }
    let st = &r.stats;
    writeln!(w, "\nstats")?;
    writeln!(w, "  records                     {}", st.records)?;
    writeln!(w, "  samples kept                {}", st.samples)?;
    writeln!(w, "  tokens                      {}", st.tokens)?;
    writeln!(
        w,
        "  trained tokens              {} ({:.1}%)",
        st.trained_tokens,
        100.0 * st.trained_share()
    )?;
    writeln!(w, "  truncated                   {}", st.truncated)?;
    writeln!(w, "  dropped (too long)          {}", st.dropped_too_long)?;
    writeln!(w, "  dropped (no trained token)  {}", st.dropped_untrained)?;
    writeln!(
        w,
        "  length min / max (kept)     {} / {}",
        st.min_len, st.max_len
    )?;
    writeln!(
        w,
        "  length mean / max (before)  {:.1} / {}",
        r.mean_len, r.longest
    )?;
    writeln!(w, "\nlength histogram (tokens, before length handling)")?;
    let top = r
        .histogram
        .iter()
        .map(|b| b.count)
        .max()
        .unwrap_or(0)
        .max(1);
    for b in &r.histogram {
        let bar = "█".repeat((b.count * 40).div_ceil(top));
        let over = if b.lo > r.max_seq_len {
            " > max_seq_len"
        } else {
            ""
        };
        writeln!(w, "  {:>6}–{:<6} {:<40} {}{over}", b.lo, b.hi, bar, b.count)?;
    }
    if r.problem_count == 0 {
        writeln!(w, "\n{}OK{}: every sample has trained tokens and every trained assistant turn ends with its trained end-of-turn token", paint(GREEN), paint(RESET))?;
    } else {
        writeln!(
            w,
            "\n{}FAILED{}: {} problem(s)",
            paint(RED),
            paint(RESET),
            r.problem_count
        )?;
        for p in &r.problems {
            writeln!(w, "  {}: {}", p.loc, p.message)?;
        }
        if r.problem_count > r.problems.len() {
            writeln!(w, "  ... and {} more", r.problem_count - r.problems.len())?;
        }
    }
    Ok(())
}
