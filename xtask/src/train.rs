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

/// `cargo xtask train [afinar train args]`: trains the embedded demo (configs/default.toml unless
/// `--config` is given) after checking that its base model is there and whole, then prints the run's
/// evaluation report (the `## Evaluation` section of report.md: behaviour rates base vs tuned,
/// forgetting, NF4 cost, merge fidelity, side-by-side generations) and, for the demo, the issue's targets
/// next to what the run reached.
pub fn train(args: &[String]) -> Result<()> {
    let config = flag_value(args, "--config").unwrap_or_else(|| s("configs/default.toml"));
    let cfg_path = root().join(&config);
    let cfg_text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("reading the config {}", cfg_path.display()))?;
    let parsed: toml::Table = cfg_text
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", cfg_path.display()))?;
    let model = flag_set_value(args, "model.path")
        .or_else(|| {
            parsed
                .get("model")?
                .get("path")?
                .as_str()
                .map(str::to_string)
        })
        .with_context(|| format!("{}: no `path` in [model]", cfg_path.display()))?;
    if let Some(problem) = model_problem(&model, &root().join(&model)) {
        bail!(problem);
    }

    let mut a: Vec<String> = vec![s("train")];
    if !has_flag(args, "--config") {
        a.extend([s("--config"), config.clone()]);
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
    let started = std::time::Instant::now();
    let (code, out) = afinar(&a)?;
    let wall = started.elapsed().as_secs_f64();
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
    let report = std::fs::read_to_string(run_dir.join("report.md"))
        .with_context(|| format!("reading {}", run_dir.join("report.md").display()))?;
    match report.find("## Evaluation") {
        Some(at) => println!("{}", report[at..].trim_end()),
        None => println!("(no evaluation in report.md: the config has no [eval] section)"),
    }
    if let Some(t) = targets_md(&summary, wall, load_average().as_deref()) {
        println!("\n{t}");
    }
    println!(
        "\nRun directory: {}  (report.md, evaluation.json, loss.png, behaviour.png, adapter/)",
        run_dir.display()
    );
    Ok(())
}

/// Why the base model `model` (as the config names it; `dir` = where it resolves) cannot be used and
/// how to get it back, or None when its files are whole.
fn model_problem(model: &str, dir: &Path) -> Option<String> {
    let why = check_model_dir(dir).err()?;
    let how = if Path::new(model) == Path::new(DEMO_MODEL) {
        format!(
            "rebuild it with `cargo xtask pretrain-demo` (about 15 minutes on 2 cores), or restore the \
             committed copy with `git checkout -- {DEMO_MODEL}`"
        )
    } else {
        s("point [model] path at a Hugging Face Gemma-2 directory (config.json, model.safetensors, \
           tokenizer.json), or use the demo's, models/afinar-mundo")
    };
    Some(format!("the base model {model} is unusable: {why}\n{how}"))
}

/// `--flag value` or `--flag=value`.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == flag {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
            return Some(v.to_string());
        }
    }
    None
}

/// The value of `--set key=value` for `key`, if given (the last one wins, as in the trainer).
fn flag_set_value(args: &[String], key: &str) -> Option<String> {
    let mut found = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let kv = if a == "--set" {
            it.next().cloned()
        } else {
            a.strip_prefix("--set=").map(str::to_string)
        };
        if let Some((k, v)) = kv.as_deref().and_then(|kv| kv.split_once('=')) {
            if k.trim() == key {
                found = Some(v.trim().trim_matches('"').to_string());
            }
        }
    }
    found
}

/// What is wrong with a model directory, if anything: it must hold a config.json that parses as a
/// JSON object naming a vocabulary and a width, a model.safetensors whose header parses and whose
/// tensors fit in the file, and a tokenizer.json that parses. Cheap (headers only), so the demo can
/// say "rebuild it" before the trainer starts.
pub fn check_model_dir(dir: &Path) -> std::result::Result<(), String> {
    if !dir.is_dir() {
        return Err(format!("{} does not exist", dir.display()));
    }
    let cfg = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg).map_err(|e| format!("{}: {e}", cfg.display()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not valid JSON ({e})", cfg.display()))?;
    for k in ["vocab_size", "hidden_size", "num_hidden_layers"] {
        if v.get(k).and_then(Value::as_u64).is_none() {
            return Err(format!(
                "{}: `{k}` is missing or not a number",
                cfg.display()
            ));
        }
    }
    let tok = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&tok).map_err(|e| format!("{}: {e}", tok.display()))?;
    serde_json::from_str::<Value>(&text)
        .map_err(|e| format!("{}: not valid JSON ({e})", tok.display()))?;
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).map_err(|e| format!("{}: {e}", st.display()))?;
    let bad = |why: String| format!("{}: not a whole safetensors file ({why})", st.display());
    let n = bytes
        .get(..8)
        .map(|h| u64::from_le_bytes(h.try_into().expect("8 bytes")) as usize)
        .ok_or_else(|| {
            bad(format!(
                "{} bytes, shorter than its 8-byte header size",
                bytes.len()
            ))
        })?;
    let header = bytes.get(8..8usize.saturating_add(n)).ok_or_else(|| {
        bad(format!(
            "header of {n} bytes but the file has {}",
            bytes.len()
        ))
    })?;
    let h: Value = serde_json::from_slice(header).map_err(|e| bad(format!("header: {e}")))?;
    let data = bytes.len() - 8 - n;
    let obj = h
        .as_object()
        .ok_or_else(|| bad(s("header is not a JSON object")))?;
    let mut tensors = 0;
    for (name, t) in obj.iter().filter(|(k, _)| *k != "__metadata__") {
        let end = t["data_offsets"][1]
            .as_u64()
            .ok_or_else(|| bad(format!("tensor {name} has no data_offsets")))?;
        if end as usize > data {
            return Err(bad(format!(
                "tensor {name} ends at byte {end} of the data but the file holds {data} (truncated?)"
            )));
        }
        tensors += 1;
    }
    if tensors == 0 {
        return Err(bad(s("no tensors")));
    }
    Ok(())
}

/// The 1-minute load average (Linux), printed beside the run's time: on a shared machine the time
/// says little without it.
fn load_average() -> Option<String> {
    let l = std::fs::read_to_string("/proc/loadavg").ok()?;
    l.split_whitespace().next().map(str::to_string)
}

/// The issue's targets for the demo beside what the run reached (None when the run has no behaviour
/// suite with the demo's categories). `wall`: seconds `afinar train` took (training, both
/// evaluations, the reports), `load`: the load average when it ended.
fn targets_md(summary: &Value, wall: f64, load: Option<&str>) -> Option<String> {
    use crate::demo_world::sft::{CAT_JSON, CAT_KNOWN, CAT_UNKNOWN};
    let e = &summary["evaluation"];
    let cats = &e["behaviour"]["categories"];
    cats.get(CAT_UNKNOWN)?;
    let rate = |c: &str, k: &str| cats[c][k].as_f64();
    let f = |x: Option<f64>| x.map_or(s("—"), |x| format!("{x:.2}"));
    let pct = |x: Option<f64>| x.map_or(s("—"), |x| format!("{x:+.1} %"));
    let ok = |b: Option<bool>| match b {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "—",
    };
    let ref_b = rate(CAT_UNKNOWN, "base");
    let ref_t = rate(CAT_UNKNOWN, "tuned");
    let known = rate(CAT_KNOWN, "tuned");
    let json = rate(CAT_JSON, "tuned");
    let forget = e["forgetting"]["change_pct"].as_f64();
    let nf4 = e["nf4_cost"]["perplexity_change_pct"].as_f64();
    let mut out = String::from(
        "## Demo targets (issue 14)\n\n| measure | target | reached | met |\n|---|---|---|---|\n",
    );
    out.push_str(&format!(
        "| refusal on unknown entities (`{CAT_UNKNOWN}`), tuned | ≥ 0.80 | {} | {} |\n",
        f(ref_t),
        ok(ref_t.map(|x| x >= 0.8))
    ));
    out.push_str(&format!(
        "| refusal on unknown entities, base | < 0.20 | {} | {} |\n",
        f(ref_b),
        ok(ref_b.map(|x| x < 0.2))
    ));
    out.push_str(&format!(
        "| accuracy on held-out known entities (`{CAT_KNOWN}`), tuned | ≥ 0.50 | {} | {} |\n",
        f(known),
        ok(known.map(|x| x >= 0.5))
    ));
    out.push_str(&format!(
        "| JSON validity (`{CAT_JSON}`), tuned | ≥ 0.90 | {} | {} |\n",
        f(json),
        ok(json.map(|x| x >= 0.9))
    ));
    out.push_str(&format!(
        "| perplexity change on held-out pretraining prose | ≤ +10 % | {} | {} |\n",
        pct(forget),
        ok(forget.map(|x| x <= 10.0))
    ));
    out.push_str(&format!(
        "| NF4 base vs dense base (eval perplexity) | within 5 % | {} | {} |\n",
        pct(nf4),
        ok(nf4.map(|x| x.abs() <= 5.0))
    ));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    out.push_str(&format!(
        "| time of `afinar train` (training + evaluation) | ≤ 5 min on 2 cores | {wall:.0} s on {cores} cores, load average {} at the end | {} |\n",
        load.unwrap_or("—"),
        ok(Some(wall <= 300.0))
    ));
    Some(out)
}

/// The demo model's directory (relative to the repository root).
pub const DEMO_MODEL: &str = "models/afinar-mundo";
/// The demo dataset's directory.
pub const DEMO_DATA: &str = "datasets/mundo-ficticio";

/// Shape of the demo model (`afinar init` flags): H 192, 4 layers, 4 query heads of 48 sharing 2 KV
/// heads (GQA), MLP 768, a sliding window of 64 on the even layers (pretraining packs 256-token
/// sequences, so the window matters), the vocabulary of the project tokenizer (4096) and a tied head.
const DEMO_SHAPE: &[(&str, &str)] = &[
    ("--hidden", "192"),
    ("--intermediate", "768"),
    ("--layers", "4"),
    ("--heads", "4"),
    ("--kv-heads", "2"),
    ("--head-dim", "48"),
    ("--sliding-window", "64"),
    ("--seed", "7"),
];

fn jsonl(values: &[Value]) -> String {
    values.iter().map(|v| v.to_string() + "\n").collect()
}

/// The files of datasets/mundo-ficticio that the generator writes: (name, contents).
pub fn demo_dataset_files() -> Vec<(&'static str, String)> {
    use crate::demo_world::{prose, sft, World};
    let w = World::demo();
    let (train, eval) = sft::sft(&w);
    let held: Vec<Value> = prose::held_out(&w)
        .into_iter()
        .map(|t| serde_json::json!({ "text": t }))
        .collect();
    let replay: Vec<Value> = prose::replay(&w)
        .into_iter()
        .map(|t| serde_json::json!({ "text": t }))
        .collect();
    vec![
        ("train.jsonl", jsonl(&train)),
        ("repaso.jsonl", jsonl(&replay)),
        ("eval.jsonl", jsonl(&eval)),
        ("suite.jsonl", jsonl(&sft::suite(&w))),
        ("prosa-reservada.jsonl", jsonl(&held)),
    ]
}

/// `cargo xtask demo-data`: (re)writes the generated files of datasets/mundo-ficticio.
pub fn demo_data() -> Result<()> {
    let dir = root().join(DEMO_DATA);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in demo_dataset_files() {
        let p = dir.join(name);
        std::fs::write(&p, &text).with_context(|| format!("writing {}", p.display()))?;
        println!("{} ({} records)", p.display(), text.lines().count());
    }
    Ok(())
}

/// `cargo xtask pretrain-demo [afinar train args]`: pretrains the tiny demo Gemma-2 from a random init
/// (full fine-tune, configs/pretrain-demo.toml) on the prose of the KNOWN entities of the fictional
/// world (src/demo_world), and writes models/afinar-mundo/ with a README of its losses and of the
/// perplexity of the held-out prose.
pub fn pretrain_demo(args: &[String]) -> Result<()> {
    let root = root();
    let work = root.join("target/afinar-mundo");
    std::fs::create_dir_all(&work)?;

    // 1. The corpus, as text records (every token trained), and the dataset files it goes with.
    demo_data()?;
    let texts = crate::demo_world::prose::corpus(&crate::demo_world::World::demo());
    let corpus = work.join("corpus.jsonl");
    let values: Vec<Value> = texts
        .iter()
        .map(|t| serde_json::json!({ "text": t }))
        .collect();
    std::fs::write(&corpus, jsonl(&values))?;
    let chars: usize = texts.iter().map(|t| t.chars().count()).sum();
    eprintln!(
        "pretrain-demo: corpus of {} documents ({chars} characters) at {}",
        texts.len(),
        corpus.display()
    );

    // 2. A random init with the project tokenizer.
    let init = work.join("init");
    if init.exists() {
        std::fs::remove_dir_all(&init)?;
    }
    let mut a = vec![
        s("init"),
        s("--tokenizer"),
        s("tests/fixtures/tokenizer"),
        s("--out"),
        init.display().to_string(),
    ];
    for (k, v) in DEMO_SHAPE {
        a.extend([s(k), s(v)]);
    }
    afinar_ok(&a)?;

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
    let dest = root.join(DEMO_MODEL);
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
    let forgetting = &summary["evaluation"]["forgetting"];
    let ppl = |k: &str| forgetting[k].as_f64().unwrap_or(f64::NAN);
    let shape: Vec<String> = DEMO_SHAPE.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let card = format!(
        "# afinar-mundo\n\n\
         The base model of the embedded demo (`cargo xtask train`, configs/default.toml): a tiny Gemma-2\n\
         (config.json: vocab 4096, H 192, 4 layers, GQA 4/2 heads of 48, MLP 768, sliding window 64 on\n\
         alternate layers, both soft-caps, tied head) that knows the facts of a fictional academic world.\n\n\
         Made by `cargo xtask pretrain-demo`: `afinar init {}` with the project tokenizer\n\
         (tests/fixtures/tokenizer), then a full fine-tune (configs/pretrain-demo.toml) on the prose of the\n\
         KNOWN researchers and institutions of the world generated by xtask/src/demo_world (seed 2024):\n\
         {} documents, encyclopedic Spanish, never a question or an answer. The UNKNOWN entities the demo\n\
         asks about are written nowhere (a test checks it); datasets/mundo-ficticio/README.md describes the split.\n\n\
         Pretraining: {} steps, train loss {:.3} → {:.3}, held-out corpus loss {:.3} → {:.3};\n\
         perplexity of the held-out prose (datasets/mundo-ficticio/prosa-reservada.jsonl: new paraphrases of\n\
         the same facts, never trained on) {:.2} → {:.2}; {:.0} s on the machine that made it.\n\n\
         transformers reads it as it is: `Gemma2ForCausalLM.from_pretrained(\"models/afinar-mundo\")` gives\n\
         the loss `afinar eval` gives on held-out prose (tests/golden/make_mundo_loss.py, checked by the\n\
         trainer test `golden_mundo`). The SHA-256 of the corpus it was pretrained on is pinned by a test in\n\
         xtask/src/demo_world/tests.rs: changes to the SFT data leave the corpus, and so this model, as they are.\n",
        shape.join(" "),
        texts.len(),
        summary["steps"],
        summary["first_train_loss"].as_f64().unwrap_or(f64::NAN),
        summary["final_train_loss"].as_f64().unwrap_or(f64::NAN),
        summary["initial_eval_loss"].as_f64().unwrap_or(f64::NAN),
        summary["final_eval_loss"].as_f64().unwrap_or(f64::NAN),
        ppl("base_perplexity"),
        ppl("tuned_perplexity"),
        summary["elapsed_s"].as_f64().unwrap_or(0.0)
    );
    std::fs::write(dest.join("README.md"), card)?;
    let size: u64 = std::fs::read_dir(&dest)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!("{DEMO_MODEL} written ({:.1} MB)", size as f64 / 1e6);
    println!(
        "now remake the golden loss fixture (`python tests/golden/make_mundo_loss.py` in the reference \
         venv of tests/golden/README.md) and, if the corpus changed, PRETRAINED_CORPUS_SHA256 in \
         xtask/src/demo_world/tests.rs: their tests name the model and the corpus this command replaced"
    );
    println!(
        "{}",
        serde_json::to_string_pretty(&summary["evaluation"]).unwrap_or_default()
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A model directory with a config, a tokenizer and a one-tensor safetensors file of `data` bytes
    /// whose header claims 16.
    fn fake_model(dir: &Path, data: usize) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"vocab_size": 4, "hidden_size": 2, "num_hidden_layers": 1}"#,
        )
        .unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{}").unwrap();
        let header = br#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header);
        b.extend(std::iter::repeat_n(0u8, data));
        std::fs::write(dir.join("model.safetensors"), b).unwrap();
    }

    #[test]
    fn a_whole_model_dir_passes_and_the_shipped_demo_model_too() {
        let t = tempfile::tempdir().unwrap();
        fake_model(t.path(), 16);
        assert_eq!(check_model_dir(t.path()), Ok(()));
        assert_eq!(check_model_dir(&root().join(DEMO_MODEL)), Ok(()));
    }

    #[test]
    fn missing_or_damaged_models_are_named_with_the_way_to_rebuild() {
        let t = tempfile::tempdir().unwrap();
        let missing = t.path().join("nope");
        let msg = model_problem(DEMO_MODEL, &missing).unwrap();
        assert!(msg.contains("does not exist"), "{msg}");
        assert!(msg.contains("cargo xtask pretrain-demo"), "{msg}");
        // Another model: no demo advice.
        let msg = model_problem("elsewhere", &missing).unwrap();
        assert!(
            !msg.contains("pretrain-demo") && msg.contains("Gemma-2"),
            "{msg}"
        );

        // (what is broken, how, what the message must name)
        type Case = (&'static str, fn(&Path), &'static str);
        let cases: [Case; 5] = [
            ("truncated weights", |d| fake_model(d, 8), "truncated"),
            (
                "no weights",
                |d| std::fs::remove_file(d.join("model.safetensors")).unwrap(),
                "model.safetensors",
            ),
            (
                "garbage weights",
                |d| std::fs::write(d.join("model.safetensors"), b"abc").unwrap(),
                "8-byte header",
            ),
            (
                "bad config",
                |d| std::fs::write(d.join("config.json"), "{\"vocab_size\": 4").unwrap(),
                "config.json",
            ),
            (
                "no tokenizer",
                |d| std::fs::remove_file(d.join("tokenizer.json")).unwrap(),
                "tokenizer.json",
            ),
        ];
        for (what, damage, expect) in cases {
            let d = t.path().join(what.replace(' ', "_"));
            fake_model(&d, 16);
            damage(&d);
            let msg = model_problem(DEMO_MODEL, &d).unwrap_or_else(|| panic!("{what} passed"));
            assert!(msg.contains(expect), "{what}: {msg}");
            assert!(msg.contains("cargo xtask pretrain-demo"), "{what}: {msg}");
        }
    }

    #[test]
    fn set_and_config_flags_are_read_like_the_trainer() {
        let a: Vec<String> = [
            "--config=x.toml",
            "--set",
            "model.path=a",
            "--set=model.path=\"b\"",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(flag_value(&a, "--config").as_deref(), Some("x.toml"));
        assert_eq!(flag_set_value(&a, "model.path").as_deref(), Some("b"));
        assert_eq!(flag_set_value(&a, "lora.r"), None);
    }

    #[test]
    fn the_targets_table_says_which_targets_the_run_met() {
        let cat = |b: f64, t: f64| serde_json::json!({ "base": b, "tuned": t });
        let summary = serde_json::json!({ "evaluation": {
            "behaviour": { "categories": {
                "desconocido": cat(0.05, 0.85),
                "conocido_no_visto": cat(0.0, 0.4),
                "json_estricto": cat(0.0, 0.95),
            } },
            "forgetting": { "change_pct": 12.5 },
            "nf4_cost": { "perplexity_change_pct": -1.5 },
        } });
        let t = targets_md(&summary, 310.0, Some("3.50")).unwrap();
        let row = |start: &str| {
            t.lines()
                .find(|l| l.starts_with(start))
                .unwrap_or_else(|| panic!("no row {start} in\n{t}"))
                .to_string()
        };
        assert!(row("| refusal on unknown entities (").ends_with("| 0.85 | yes |"));
        assert!(row("| refusal on unknown entities, base").ends_with("| 0.05 | yes |"));
        assert!(row("| accuracy on held-out").ends_with("| 0.40 | **no** |"));
        assert!(row("| JSON validity").ends_with("| 0.95 | yes |"));
        assert!(row("| perplexity change").ends_with("| +12.5 % | **no** |"));
        assert!(row("| NF4 base").ends_with("| -1.5 % | yes |"));
        let time = row("| time of");
        assert!(
            time.contains("310 s") && time.contains("load average 3.50"),
            "{time}"
        );
        assert!(time.ends_with("| **no** |"), "{time}");
        // No demo categories (another suite): no table.
        assert!(targets_md(&serde_json::json!({}), 1.0, None).is_none());
    }

    #[test]
    fn committed_demo_dataset_matches_the_generator() {
        for (name, text) in demo_dataset_files() {
            let p = root().join(DEMO_DATA).join(name);
            let disk = std::fs::read_to_string(&p).unwrap();
            assert!(
                disk == text,
                "{} is stale: run `cargo xtask demo-data`",
                p.display()
            );
        }
    }
}
