//! The evaluation as markdown: behaviour rates base vs tuned, borderline answers, side-by-side
//! generations, forgetting, NF4 cost and merge fidelity (report.md of a run, `afinar eval --suite`).

use std::fmt::Write;

use super::run::{Evaluation, ItemResult, SuiteComparison};

/// Text fit for one markdown table cell: newlines as spaces, `|` escaped, cut to `max` characters.
pub fn md_cell(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    let mut out: String = flat.chars().take(max).collect();
    if flat.chars().count() > max {
        out.push('…');
    }
    out.replace('|', "\\|")
}

fn mark(i: &ItemResult) -> &'static str {
    match (i.verdict.pass, i.verdict.borderline.is_some()) {
        (true, false) => "✓",
        (true, true) => "✓?",
        (false, true) => "✗?",
        (false, false) => "✗",
    }
}

fn rate(passed: usize, total: usize) -> String {
    if total == 0 {
        "—".into()
    } else {
        format!("{:.2} ({passed}/{total})", passed as f64 / total as f64)
    }
}

fn behaviour_md(c: &SuiteComparison, out: &mut String) {
    let tuned = c.tuned.as_ref();
    let _ = writeln!(
        out,
        "### Behaviour suite\n\n`{}`: {} records; greedy, at most {} new tokens (repetition penalty {}, \
         no-repeat n-gram {}); refusal pattern «{}». ✓ passed, ✗ failed, ? borderline (a rule's blind \
         spot applies: read the answer).\n",
        c.suite,
        c.base.overall.total,
        c.limits.max_new_tokens,
        c.limits.repetition_penalty,
        c.limits.no_repeat_ngram_size,
        c.refuse_pattern
    );
    out.push_str("| category | base | tuned | declines (base / tuned) | borderline (base / tuned) |\n|---|---|---|---|---|\n");
    let row = |name: &str, b: &super::CategoryScore, t: Option<&super::CategoryScore>| {
        format!(
            "| {name} | {} | {} | {} / {} | {} / {} |\n",
            rate(b.passed, b.total),
            t.map_or("—".into(), |t| rate(t.passed, t.total)),
            b.declined,
            t.map_or("—".into(), |t| t.declined.to_string()),
            b.borderline,
            t.map_or("—".into(), |t| t.borderline.to_string()),
        )
    };
    for (name, b) in &c.base.categories {
        out.push_str(&row(
            &md_cell(name, 40),
            b,
            tuned.and_then(|t| t.categories.get(name)),
        ));
    }
    out.push_str(&row(
        "**overall**",
        &c.base.overall,
        tuned.map(|t| &t.overall),
    ));

    if let Some(b) = c.base.over_refusal() {
        let _ = writeln!(
            out,
            "\nOver-refusal (answers with «{}» where the suite expects no refusal): base {:.2}, tuned {}.",
            c.refuse_pattern,
            b,
            tuned
                .and_then(|t| t.over_refusal())
                .map_or("—".into(), |x| format!("{x:.2}"))
        );
    }
    let border: Vec<(&str, &ItemResult)> = c
        .base
        .items
        .iter()
        .map(|i| ("base", i))
        .chain(
            tuned
                .iter()
                .flat_map(|t| t.items.iter().map(|i| ("tuned", i))),
        )
        .filter(|(_, i)| i.verdict.borderline.is_some())
        .collect();
    if !border.is_empty() {
        out.push_str("\n#### Borderline answers\n\n| line | model | verdict | why | answer |\n|---|---|---|---|---|\n");
        for (m, i) in border {
            let _ = writeln!(
                out,
                "| {} | {m} | {} | {} | {} |",
                i.line,
                mark(i),
                md_cell(i.verdict.borderline.as_deref().unwrap_or(""), 80),
                md_cell(&i.completion, 160)
            );
        }
    }

    out.push_str(
        "\n#### Generations, side by side\n\n| line | category | prompt | expected | base |",
    );
    out.push_str(if tuned.is_some() {
        " tuned |\n|---|---|---|---|---|---|\n"
    } else {
        "\n|---|---|---|---|---|\n"
    });
    for (k, b) in c.base.items.iter().enumerate() {
        let _ = write!(
            out,
            "| {} | {} | {} | {} | {} {} |",
            b.line,
            md_cell(&b.category, 30),
            md_cell(&b.prompt, 120),
            md_cell(&b.expected, 100),
            mark(b),
            md_cell(&b.completion, 200),
        );
        if let Some(t) = tuned.and_then(|t| t.items.get(k)) {
            let _ = write!(out, " {} {} |", mark(t), md_cell(&t.completion, 200));
        }
        out.push('\n');
    }
    out.push('\n');
}

/// The whole evaluation section (a `## Evaluation` heading and one subsection per measure taken).
pub fn evaluation_md(e: &Evaluation) -> String {
    let mut out = String::from("## Evaluation\n\n");
    if let Some(c) = &e.behaviour {
        behaviour_md(c, &mut out);
    }
    if let Some(f) = &e.forgetting {
        let _ = writeln!(
            out,
            "### Forgetting\n\nPerplexity on held-out general text (`{}`, {} tokens): base {:.3} → tuned {:.3} \
             (**{:+.2} %**; positive = worse at general text).\n",
            f.general_text, f.tokens, f.base_perplexity, f.tuned_perplexity, f.change_pct
        );
    }
    if let Some(n) = &e.nf4_cost {
        let _ = writeln!(
            out,
            "### Quantization cost\n\nEval loss of the base, no adapter: dense {:.4} → NF4 {:.4} \
             (**{:+.2} %** loss, {:+.2} % perplexity).\n",
            n.dense_eval_loss, n.nf4_eval_loss, n.loss_change_pct, n.perplexity_change_pct
        );
    }
    if let Some(m) = &e.merge_fidelity {
        let _ = writeln!(
            out,
            "### Merge fidelity\n\nLargest |logit| difference between the merged model (W + s·B·A in f32) and \
             base + adapter: **{:.3e}** over {} prompts ({} positions).\n",
            m.max_abs_logit_diff, m.prompts, m.tokens
        );
    }
    let _ = writeln!(out, "Evaluation time: {:.1} s.", e.seconds);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_flat_escaped_and_cut() {
        assert_eq!(md_cell("a|b\nc", 10), "a\\|b c");
        assert_eq!(md_cell("abcdef", 3), "abc…");
    }
}
