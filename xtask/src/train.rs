//! `cargo xtask train` and `cargo xtask pretrain-demo`.
//!
//! Both drive the release `afinar` binary (built once with `cargo build --release -p afinar-trainer`): the
//! numeric crates are built with full optimisation there, which the xtask's own dev profile would not
//! give them. Progress goes to the terminal (stderr); results come back as `--json` on stdout.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

fn has_flag(args: &[String], flag: &str) -> bool {
    args.iter()
        .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
}

/// Builds the release `afinar` once per xtask run and returns its path (`$CARGO_TARGET_DIR` respected).
fn afinar_bin() -> Result<PathBuf> {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(b) = BIN.get() {
        return Ok(b.clone());
    }
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root())
        .args([
            "build",
            "--release",
            "-p",
            "afinar-trainer",
            "--bin",
            "afinar",
        ])
        .status()
        .context("running `cargo build --release -p afinar-trainer --bin afinar`")?;
    if !status.success() {
        bail!("building the afinar binary failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        root().join(target)
    };
    let bin = target
        .join("release")
        .join(format!("afinar{}", std::env::consts::EXE_SUFFIX));
    Ok(BIN.get_or_init(|| bin).clone())
}

/// Runs the release `afinar` with `args` in the workspace root; stdout captured, stderr shown.
/// Returns (exit code, stdout).
fn afinar(args: &[String]) -> Result<(i32, String)> {
    let bin = afinar_bin()?;
    let out = Command::new(&bin)
        .current_dir(root())
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    Ok((
        out.status.code().unwrap_or(1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

fn afinar_ok(args: &[String]) -> Result<String> {
    let (code, out) = afinar(args)?;
    if code != 0 {
        bail!("`afinar {}` exited with {code}", args.join(" "));
    }
    Ok(out)
}

fn s(x: &str) -> String {
    x.to_string()
}

/// Reads `key` of `[section]` from a resolved config.toml (plain `key = "value"` lines, as the trainer
/// writes them).
fn toml_value(text: &str, section: &str, key: &str) -> Option<String> {
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            cur = name.trim().to_string();
            continue;
        }
        if cur == section {
            if let Some((k, v)) = t.split_once('=') {
                if k.trim() == key {
                    let v = v.trim();
                    return Some(v.trim_matches('"').replace("\\\\", "\\"));
                }
            }
        }
    }
    None
}

/// `cargo xtask train [afinar train args]`: trains the embedded demo (configs/default.toml unless
/// `--config` is given), then prints and appends to report.md a base-vs-tuned comparison: eval loss
/// before/after and greedy generations for the first eval prompts from the base model and the tuned one.
/// The generations use transformers' repetition penalty [`COMPARE_REPETITION_PENALTY`] and
/// no_repeat_ngram_size [`COMPARE_NO_REPEAT_NGRAM`] (tiny demo models otherwise loop on one phrase); the
/// environment variables `AFINAR_COMPARE_REPETITION_PENALTY` (1 = off) and
/// `AFINAR_COMPARE_NO_REPEAT_NGRAM` (0 = off) override them.
pub fn train(args: &[String]) -> Result<()> {
    let mut a: Vec<String> = vec![s("train")];
    if !has_flag(args, "--config") {
        a.extend([s("--config"), s("configs/default.toml")]);
    }
    a.extend(args.iter().cloned());
    if !has_flag(args, "--run-name")
        && !has_flag(args, "--resume")
        && !has_flag(args, "--overwrite")
    {
        // A fresh run directory per invocation, so a second `cargo xtask train` never collides.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        a.extend([s("--run-name"), format!("demo-{t}")]);
    }
    if !has_flag(args, "--json") {
        a.push(s("--json"));
    }
    let (code, out) = afinar(&a)?;
    if code == 130 {
        bail!("training was interrupted; resume it with the command printed above (through `cargo xtask train ...` or `afinar train ...`)");
    }
    if code != 0 {
        bail!("`afinar train` exited with {code}");
    }
    let summary: Value = serde_json::from_str(&out)
        .with_context(|| format!("parsing `afinar train --json` output: {out}"))?;
    let run_dir = PathBuf::from(
        summary["run_dir"]
            .as_str()
            .context("summary has no run_dir")?,
    );
    let run_dir = if run_dir.is_absolute() {
        run_dir
    } else {
        root().join(run_dir)
    };
    compare(&run_dir, &summary)
}

/// `repetition_penalty` of the base-vs-tuned generations.
pub const COMPARE_REPETITION_PENALTY: f32 = 1.3;

/// The repetition penalty of the comparison: `AFINAR_COMPARE_REPETITION_PENALTY` if set, else
/// [`COMPARE_REPETITION_PENALTY`].
fn compare_repetition_penalty() -> Result<f32> {
    match std::env::var("AFINAR_COMPARE_REPETITION_PENALTY") {
        Ok(v) => {
            let p: f32 = v.trim().parse().with_context(|| {
                format!("AFINAR_COMPARE_REPETITION_PENALTY={v:?} is not a number")
            })?;
            if !(p > 0.0 && p.is_finite()) {
                bail!("AFINAR_COMPARE_REPETITION_PENALTY must be finite and > 0, found {p}");
            }
            Ok(p)
        }
        Err(_) => Ok(COMPARE_REPETITION_PENALTY),
    }
}

/// `no_repeat_ngram_size` of the base-vs-tuned generations: no 3-gram twice (a 1.5 M-parameter demo
/// model still loops on syllables under the repetition penalty alone).
pub const COMPARE_NO_REPEAT_NGRAM: usize = 3;

/// `AFINAR_COMPARE_NO_REPEAT_NGRAM` if set (0 = off), else [`COMPARE_NO_REPEAT_NGRAM`].
fn compare_no_repeat_ngram() -> Result<usize> {
    match std::env::var("AFINAR_COMPARE_NO_REPEAT_NGRAM") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("AFINAR_COMPARE_NO_REPEAT_NGRAM={v:?} is not a whole number")),
        Err(_) => Ok(COMPARE_NO_REPEAT_NGRAM),
    }
}

/// The base-vs-tuned section.
fn compare(run_dir: &Path, summary: &Value) -> Result<()> {
    let rp = compare_repetition_penalty()?;
    let nr = compare_no_repeat_ngram()?;
    let cfg = std::fs::read_to_string(run_dir.join("config.toml"))
        .context("reading the run's config.toml")?;
    let model = toml_value(&cfg, "model", "path").context("model.path in config.toml")?;
    let template = toml_value(&cfg, "data", "template").unwrap_or_else(|| s("gemma"));
    let eval = toml_value(&cfg, "data", "eval").filter(|e| !e.is_empty());
    let train = toml_value(&cfg, "data", "train").context("data.train in config.toml")?;
    let quant = toml_value(&cfg, "model", "quantization").unwrap_or_else(|| s("none"));
    let src = root().join(eval.unwrap_or(train));
    let text =
        std::fs::read_to_string(&src).with_context(|| format!("reading {}", src.display()))?;
    // The first prompts of the eval file; the references are kept for the report.
    let picked: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(3)
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let prompts = run_dir.join("compare_prompts.jsonl");
    std::fs::write(
        &prompts,
        picked
            .iter()
            .map(|v| v.to_string() + "\n")
            .collect::<String>(),
    )?;
    let gen = |adapter: Option<&Path>| -> Result<Vec<Value>> {
        let mut g = vec![
            s("generate"),
            s("--model"),
            model.clone(),
            s("--quantization"),
            quant.clone(),
            s("--prompts"),
            prompts.display().to_string(),
            s("--template"),
            template.clone(),
            s("--max-new-tokens"),
            s("96"),
            s("--repetition-penalty"),
            rp.to_string(),
            s("--no-repeat-ngram-size"),
            nr.to_string(),
            s("--json"),
        ];
        if let Some(a) = adapter {
            g.extend([s("--adapter"), a.display().to_string()]);
        }
        let out = afinar_ok(&g)?;
        Ok(serde_json::from_str::<Value>(&out)?
            .as_array()
            .cloned()
            .unwrap_or_default())
    };
    let adapter = run_dir.join("adapter");
    let base = gen(None)?;
    let tuned = if adapter.is_dir() {
        gen(Some(&adapter))?
    } else {
        Vec::new()
    };

    let f = |v: &Value| {
        v.as_f64()
            .map(|x| format!("{x:.4}"))
            .unwrap_or_else(|| s("—"))
    };
    let mut md = String::from("\n## Base vs tuned\n\n");
    md.push_str(&format!(
        "Eval loss (CE per trained token): **{}** before training → **{}** after ({} steps, {:.0} s).\n\n",
        f(&summary["initial_eval_loss"]),
        f(&summary["final_eval_loss"]),
        summary["steps"],
        summary["elapsed_s"].as_f64().unwrap_or(0.0)
    ));
    md.push_str(&format!(
        "Generations: greedy, up to 96 new tokens, repetition_penalty = {rp} and no_repeat_ngram_size = \
         {nr} (transformers' logits processors; AFINAR_COMPARE_REPETITION_PENALTY and \
         AFINAR_COMPARE_NO_REPEAT_NGRAM change them, 1 and 0 = off).\n\n"
    ));
    for (i, p) in picked.iter().enumerate() {
        let q = p.get("instruction").and_then(Value::as_str).unwrap_or("");
        let inp = p.get("input").and_then(Value::as_str).unwrap_or("");
        let reference = p.get("output").and_then(Value::as_str).unwrap_or("");
        let b = base
            .get(i)
            .and_then(|g| g["completion"].as_str())
            .unwrap_or("");
        let t = tuned
            .get(i)
            .and_then(|g| g["completion"].as_str())
            .unwrap_or("");
        md.push_str(&format!(
            "### Prompt {}\n\n> {}\n",
            i + 1,
            q.replace('\n', "\n> ")
        ));
        if !inp.is_empty() {
            md.push_str(&format!(">\n> {}\n", inp.replace('\n', "\n> ")));
        }
        md.push_str(&format!(
            "\n**Reference:** {}\n\n**Base:** {}\n\n**Tuned:** {}\n\n",
            reference.trim(),
            b.trim(),
            t.trim()
        ));
    }
    print!("{md}");
    let report = run_dir.join("report.md");
    let mut r = std::fs::read_to_string(&report).unwrap_or_default();
    r.push_str(&md);
    std::fs::write(&report, r)?;
    println!(
        "Run directory: {}  (report.md, loss.png, adapter/, metrics.jsonl)",
        run_dir.display()
    );
    Ok(())
}

/// `cargo xtask pretrain-demo [afinar train args]`: pretrains the tiny demo Gemma-2 from a random init
/// (full fine-tune) on Spanish text — the strings of the TRAINING split of the academico-riguroso
/// dataset (never its eval file) and the project's own prose in tests/fixtures/tokenizer/corpus/propio.txt
/// — and writes models/afinar-demo/.
pub fn pretrain_demo(args: &[String]) -> Result<()> {
    let root = root();
    let work = root.join("target/afinar-demo");
    std::fs::create_dir_all(&work)?;

    // 1. The corpus, as text records (every token trained).
    let mut texts: Vec<String> = Vec::new();
    let train = std::fs::read_to_string(root.join("datasets/academico-riguroso/train.jsonl"))?;
    for line in train.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).context("datasets/academico-riguroso/train.jsonl")?;
        for k in ["instruction", "input", "output"] {
            if let Some(t) = v.get(k).and_then(Value::as_str) {
                if t.trim().len() > 1 {
                    texts.push(t.trim().to_string());
                }
            }
        }
    }
    let own = std::fs::read_to_string(root.join("tests/fixtures/tokenizer/corpus/propio.txt"))?;
    texts.extend(
        own.lines()
            .map(str::trim)
            .filter(|l| l.len() > 20)
            .map(str::to_string),
    );
    let corpus = work.join("corpus.jsonl");
    std::fs::write(
        &corpus,
        texts
            .iter()
            .map(|t| serde_json::json!({ "text": t }).to_string() + "\n")
            .collect::<String>(),
    )?;
    eprintln!(
        "pretrain-demo: corpus of {} texts at {}",
        texts.len(),
        corpus.display()
    );

    // 2. A random init with the project tokenizer.
    let init = work.join("init");
    if init.exists() {
        std::fs::remove_dir_all(&init)?;
    }
    afinar_ok(&[
        s("init"),
        s("--tokenizer"),
        s("tests/fixtures/tokenizer"),
        s("--out"),
        init.display().to_string(),
        s("--seed"),
        s("7"),
    ])?;

    // 3. Full fine-tune from it.
    let mut a = vec![
        s("train"),
        s("--config"),
        s("configs/pretrain-demo.toml"),
        s("--overwrite"),
        s("--json"),
    ];
    a.extend(args.iter().cloned());
    let out = afinar_ok(&a)?;
    let summary: Value = serde_json::from_str(&out)?;
    let run_dir = PathBuf::from(summary["run_dir"].as_str().context("no run_dir")?);
    let run_dir = if run_dir.is_absolute() {
        run_dir
    } else {
        root.join(run_dir)
    };

    // 4. Ship it.
    let dest = root.join("models/afinar-demo");
    if dest.exists() {
        std::fs::remove_dir_all(&dest)?;
    }
    std::fs::create_dir_all(&dest)?;
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(run_dir.join("model").join(f), dest.join(f))
            .with_context(|| format!("copying {f}"))?;
    }
    let card = format!(
        "# afinar-demo\n\nA tiny Gemma-2 (see config.json) made by `cargo xtask pretrain-demo`: random init (`afinar init`, seed 7)\n\
         with the project tokenizer (tests/fixtures/tokenizer), then a full fine-tune (configs/pretrain-demo.toml) on\n\
         the instruction/input/output strings of datasets/academico-riguroso/train.jsonl (never the eval file) and\n\
         tests/fixtures/tokenizer/corpus/propio.txt, as plain text.\n\n\
         Pretraining: {} steps, train loss {:.3} → {:.3}, held-out loss {:.3} → {:.3}, {:.0} s on the machine that made it.\n\n\
         It is the base model of the embedded demo (`cargo xtask train`, configs/default.toml). It writes\n\
         Spanish-looking text and knows nothing useful: it exists to make the fine-tuning loop visible in minutes on a CPU.\n",
        summary["steps"],
        summary["first_train_loss"].as_f64().unwrap_or(f64::NAN),
        summary["final_train_loss"].as_f64().unwrap_or(f64::NAN),
        summary["initial_eval_loss"].as_f64().unwrap_or(f64::NAN),
        summary["final_eval_loss"].as_f64().unwrap_or(f64::NAN),
        summary["elapsed_s"].as_f64().unwrap_or(0.0)
    );
    std::fs::write(dest.join("README.md"), card)?;
    let size: u64 = std::fs::read_dir(&dest)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!("models/afinar-demo written ({:.1} MB)", size as f64 / 1e6);
    Ok(())
}

/// `cargo xtask bench [criterion args]`: the criterion benches of the op set and of the model
/// (`cargo bench -p afinar-kernels` then `cargo bench -p afinar-gemma`), then where to record them.
pub fn bench(args: &[String]) -> Result<()> {
    for pkg in ["afinar-kernels", "afinar-gemma"] {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(root()).args(["bench", "-p", pkg]);
        if !args.is_empty() {
            cmd.arg("--").args(args);
        }
        let status = cmd
            .status()
            .with_context(|| format!("running cargo bench -p {pkg}"))?;
        if !status.success() {
            bail!("cargo bench -p {pkg} failed");
        }
    }
    println!(
        "Record the results with date, machine, commit and load in docs/benchmarks.md (the trainer's \
         end-to-end numbers come from `cargo xtask pretrain-demo` / `cargo xtask train`: see summary.json)."
    );
    Ok(())
}
