//! The behaviour suite end to end: `afinar eval --suite` on the shipped demo model with and without an
//! adapter (deterministic on a rerun, malformed records named by file and line), and `afinar train` with
//! an `[eval]` section writing every measure into summary.json, evaluation.json, behaviour.jsonl and
//! report.md (also across a resume).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use afinar_gemma::Gemma2Model;
use afinar_kernels::cpu::Cpu;
use afinar_trainer::suite::{run_suite, GenLimits, Rules, Suite};
use afinar_trainer::{train, Config, Resume};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn demo() -> PathBuf {
    root().join("models/afinar-demo")
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_afinar"))
        .args(args)
        .output()
        .unwrap()
}

const SUITE: &str = r#"{"prompt": "¿Quién escribió «Las horas de cristal» (1931)?", "category": "no_lo_se", "expect": "refuse"}
{"instruction": "¿Cuál es la masa molar del agua?", "input": "", "output": "Aproximadamente 18,02 g/mol.", "category": "factual", "expect": "answer"}
{"prompt": "¿Cuánto es 17 × 23?", "category": "factual", "expect": "answer", "answer": "391"}
{"prompt": "¿Por qué la Gran Muralla es visible desde la Luna?", "category": "premisa_falsa", "expect": "premise"}
{"prompt": "Devuelve solo JSON con las claves \"fecha\" y \"hora\".", "category": "json", "expect": "json", "keys": ["fecha", "hora"]}
"#;

/// A PEFT adapter for the demo model whose B factors are small and non-zero (so base and tuned
/// differ), written under `dir/adapter`.
fn demo_adapter(dir: &Path) -> PathBuf {
    let mut cfg = Config::default();
    cfg.lora.r = 4;
    cfg.lora.alpha = 8.0;
    let mut opts = afinar_trainer::train::load_options(&cfg).unwrap();
    opts.seed = 3;
    let mut model = Gemma2Model::load(Arc::new(Cpu::new()), demo(), &opts).unwrap();
    for (k, name) in model.lora_names().into_iter().enumerate() {
        if name.contains("lora_B") {
            let n = model.get_tensor(&name).unwrap().len();
            let v: Vec<f32> = (0..n)
                .map(|i| 0.05 * ((i * 7 + k * 13) as f32).sin())
                .collect();
            model.set_tensor(&name, &v).unwrap();
        }
    }
    let out = dir.join("adapter");
    afinar_gemma::peft::save_adapter(&model, &out, None).unwrap();
    out
}

fn without_seconds(mut v: serde_json::Value) -> serde_json::Value {
    v["summary"]["seconds"] = 0.into();
    v["evaluation"]["seconds"] = 0.into();
    v
}

#[test]
fn eval_suite_scores_base_and_adapter_side_by_side_and_reruns_identically() {
    let dir = tempfile::tempdir().unwrap();
    let suite = dir.path().join("suite.jsonl");
    std::fs::write(&suite, SUITE).unwrap();
    let adapter = demo_adapter(dir.path());
    let general = root().join("datasets/texto-general/general.jsonl");
    let (m, s, a, g) = (demo(), suite.clone(), adapter.clone(), general.clone());
    let args = [
        "eval",
        "--model",
        m.to_str().unwrap(),
        "--quantization",
        "nf4",
        "--adapter",
        a.to_str().unwrap(),
        "--suite",
        s.to_str().unwrap(),
        "--general",
        g.to_str().unwrap(),
        "--merge-fidelity",
        "--max-new-tokens",
        "12",
        "--json",
    ];
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let sum = &v["summary"]["behaviour"];
    assert_eq!(sum["records"], 5);
    let cats: Vec<&str> = sum["categories"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(cats, ["factual", "json", "no_lo_se", "premisa_falsa"]);
    for c in ["base", "tuned"] {
        let r = sum["overall"][c].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&r), "{c}: {r}");
    }
    let items = v["evaluation"]["behaviour"]["tuned"]["items"]
        .as_array()
        .unwrap();
    assert_eq!(items.len(), 5);
    assert_eq!(items[1]["line"], 2);
    assert!(items.iter().all(|i| i["tokens"].as_u64().unwrap() <= 12));
    let f = &v["summary"]["forgetting"];
    assert!(f["tokens"].as_u64().unwrap() > 1000, "{f}");
    assert!(f["base_perplexity"].as_f64().unwrap() > 1.0);
    assert!(f["change_pct"].as_f64().unwrap().is_finite());
    // The merged model (dequantized NF4 + B·A in f32) reproduces base + adapter to rounding.
    let d = v["summary"]["merge_fidelity"]["max_abs_logit_diff"]
        .as_f64()
        .unwrap();
    assert!(d < 1e-3, "merge fidelity {d}");
    // The adapter changes the model, so the tuned generations are not all the base's.
    let base_items = v["evaluation"]["behaviour"]["base"]["items"]
        .as_array()
        .unwrap();
    assert!(
        base_items
            .iter()
            .zip(items)
            .any(|(b, t)| b["completion"] != t["completion"]),
        "the adapter changed nothing"
    );

    // Greedy and fixed-order: a rerun gives the same numbers and the same text.
    let o2 = run(&args);
    let v2: serde_json::Value = serde_json::from_slice(&o2.stdout).unwrap();
    assert_eq!(without_seconds(v.clone()), without_seconds(v2));

    // The markdown report: rates, and the generations side by side.
    let md = run(&args[..args.len() - 1]);
    assert!(md.status.success());
    let md = String::from_utf8_lossy(&md.stdout);
    for needle in [
        "| **overall** |",
        "#### Generations, side by side",
        "| line | category | prompt | expected | base | tuned |",
        "### Forgetting",
        "### Merge fidelity",
    ] {
        assert!(md.contains(needle), "{needle}\n{md}");
    }
}

#[test]
fn eval_suite_on_the_shipped_eval_split_without_adapter() {
    let m = demo();
    let s = root().join("datasets/academico-riguroso/eval.jsonl");
    let o = run(&[
        "eval",
        "--model",
        m.to_str().unwrap(),
        "--suite",
        s.to_str().unwrap(),
        "--max-records",
        "8",
        "--max-new-tokens",
        "8",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["summary"]["behaviour"]["records"], 8);
    assert!(v["summary"]["behaviour"]["overall"]["tuned"].is_null());
    assert!(v["evaluation"]["behaviour"]["tuned"].is_null());
}

#[test]
fn malformed_suite_is_an_error_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    let mut text: Vec<&str> = SUITE.lines().take(2).collect();
    text.push(r#"{"prompt": "x", "category": "c", "expect": "guess"}"#);
    std::fs::write(&bad, text.join("\n")).unwrap();
    let m = demo();
    let o = run(&[
        "eval",
        "--model",
        m.to_str().unwrap(),
        "--suite",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("bad.jsonl:3: field `expect`: unknown expectation `guess`"),
        "{e}"
    );
    // Without --adapter, forgetting and merge fidelity have nothing to compare.
    let o = run(&[
        "eval",
        "--model",
        m.to_str().unwrap(),
        "--suite",
        bad.to_str().unwrap(),
        "--merge-fidelity",
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn run_suite_is_deterministic() {
    let model = afinar_trainer::infer::load_model(&demo(), None, true).unwrap();
    let tok = afinar_data::TextTokenizer::from_model_dir(&demo()).unwrap();
    let template = afinar_data::Template::new(afinar_data::TemplateKind::Gemma, &tok).unwrap();
    let suite = Suite::parse(SUITE, Path::new("s.jsonl")).unwrap();
    let limits = GenLimits {
        max_new_tokens: 10,
        repetition_penalty: 1.3,
        no_repeat_ngram_size: 3,
    };
    let a = run_suite(&model, &tok, &template, &suite, &Rules::default(), &limits).unwrap();
    let b = run_suite(&model, &tok, &template, &suite, &Rules::default(), &limits).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.items.len(), 5);
    assert_eq!(a.overall.total, 5);
}

/// A suite for the training fixtures' capitals data, and a general-text file, in `dir`.
fn eval_files(dir: &Path) -> (PathBuf, PathBuf) {
    let suite = dir.join("suite.jsonl");
    std::fs::write(
        &suite,
        concat!(
            r#"{"instruction": "¿Cuál es la capital de Francia?", "category": "capital", "expect": "answer", "answer": "La capital de Francia es París."}"#,
            "\n",
            r#"{"instruction": "¿Quién escribió el libro inventado «Perú en Lima»?", "category": "no_lo_se", "expect": "refuse"}"#,
            "\n",
        ),
    )
    .unwrap();
    let general = dir.join("general.jsonl");
    std::fs::write(
        &general,
        "{\"text\": \"La capital de Grecia es Atenas y la de Japón es Tokio.\"}\n{\"text\": \"Dime la capital de Cuba.\"}\n",
    )
    .unwrap();
    (suite, general)
}

fn eval_config(dir: &Path) -> Config {
    let mut c = common::config(dir);
    let (suite, general) = eval_files(dir);
    c.model.quantization = afinar_trainer::config::Quantization::Nf4;
    c.eval.suite = suite;
    c.eval.general_text = general;
    c.eval.every = 2;
    c.eval.max_new_tokens = 6;
    c
}

#[test]
fn train_writes_every_measure_into_summary_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let c = eval_config(dir.path());
    let out = train(&common::opts(c.clone())).unwrap();
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.run_dir.join("summary.json")).unwrap())
            .unwrap();
    let e = &s["evaluation"];
    let b = &e["behaviour"];
    assert_eq!(b["records"], 2);
    assert!(
        b["overall"]["base"].is_f64() && b["overall"]["tuned"].is_f64(),
        "{b}"
    );
    assert!(b["categories"]["capital"]["tuned"].is_f64());
    assert!(b["categories"]["no_lo_se"]["base"].is_f64());
    assert!(
        e["forgetting"]["change_pct"].as_f64().unwrap().is_finite(),
        "{e}"
    );
    let nf4 = &e["nf4_cost"];
    assert_eq!(
        nf4["nf4_eval_loss"].as_f64(),
        s["initial_eval_loss"].as_f64()
    );
    assert!(nf4["dense_eval_loss"].as_f64().unwrap() > 0.0);
    assert!(e["merge_fidelity"]["max_abs_logit_diff"].as_f64().unwrap() < 1e-3);
    assert!(e["seconds"].as_f64().unwrap() > 0.0);
    // The typed summary reads back too.
    assert!(out.summary.evaluation.is_some());

    // Behaviour over steps: the base at 0, every 2 steps, and the end (6).
    let steps: Vec<u64> = std::fs::read_to_string(out.run_dir.join("behaviour.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, [0, 2, 4, 6]);
    for f in [
        "behaviour.png",
        "behaviour.svg",
        "evaluation.json",
        "eval_base.json",
    ] {
        assert!(out.run_dir.join(f).is_file(), "{f}");
    }
    let md = std::fs::read_to_string(out.run_dir.join("report.md")).unwrap();
    for needle in [
        "![behaviour](behaviour.png)",
        "## Evaluation",
        "| **overall** |",
        "| line | category | prompt | expected | base | tuned |",
        "### Forgetting",
        "### Quantization cost",
        "### Merge fidelity",
    ] {
        assert!(md.contains(needle), "{needle}\n{md}");
    }

    // Interrupted at step 3 and resumed: the same evaluation, the same behaviour points.
    let dir2 = tempfile::tempdir().unwrap();
    let mut c2 = eval_config(dir2.path());
    c2.train.save_every = 1;
    let mut o = common::opts(c2.clone());
    o.stop_after = Some(3);
    train(&o).unwrap();
    let mut o = common::opts(c2);
    o.resume = Some(Resume::Auto);
    let out2 = train(&o).unwrap();
    let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    assert_eq!(
        read(&out.run_dir, "behaviour.jsonl"),
        read(&out2.run_dir, "behaviour.jsonl")
    );
    // The whole evaluation (generations included) but the run-specific paths and times.
    let eval_json = |d: &Path| {
        let mut v: serde_json::Value = serde_json::from_str(&read(d, "evaluation.json")).unwrap();
        v["behaviour"]["suite"] = serde_json::Value::Null;
        v["forgetting"]["general_text"] = serde_json::Value::Null;
        v["seconds"] = serde_json::Value::Null;
        v
    };
    let (a, b) = (eval_json(&out.run_dir), eval_json(&out2.run_dir));
    assert!(a["behaviour"]["tuned"]["items"][0]["completion"].is_string());
    assert!(a["nf4_cost"]["dense_eval_loss"].is_f64() && a["merge_fidelity"].is_object());
    assert_eq!(a, b);
}

#[test]
fn train_refuses_a_malformed_suite_before_creating_the_run_dir() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = eval_config(dir.path());
    std::fs::write(
        &c.eval.suite,
        "{\"prompt\": \"x\", \"category\": \"c\", \"expect\": \"refuse\"}\n{\"prompt\": \"x\", \"expect\": \"refuse\"}\n",
    )
    .unwrap();
    c.output.run_name = "bad".into();
    let e = train(&common::opts(c.clone())).unwrap_err().to_string();
    assert!(
        e.contains("suite.jsonl:2: field `category`: missing"),
        "{e}"
    );
    assert!(!c.output.dir.join("bad").exists());
}

/// The NF4 cost's dense eval loss, read layer by layer from the checkpoint
/// (`evaluate_dense_streamed`), equals `evaluate` of the dense model loaded whole, bit for bit, over
/// more eval batches than one stream group (so the layers are read more than once).
#[test]
fn streamed_dense_eval_loss_equals_the_loaded_dense_model_s() {
    use afinar_data::{DataLoader, LoaderConfig, TemplateKind, TextTokenizer};
    use afinar_trainer::train::{evaluate, evaluate_dense_streamed};
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = common::write_model(tmp.path());
    let n_batches = afinar_gemma::model::STREAM_GROUP_BATCHES + 2;
    let (_, eval) = common::write_data(tmp.path(), 1, 2 * n_batches);
    let tok = TextTokenizer::from_model_dir(&model_dir).unwrap();
    let mut dc = afinar_data::DataConfig::new(&eval, TemplateKind::Gemma);
    dc.max_seq_len = 64;
    let prepared = afinar_data::prepare(&dc, &tok).unwrap();
    let lc = LoaderConfig {
        batch_size: 2,
        packing: false,
        shuffle: false,
        seed: 0,
        drop_last: false,
    };
    let loader = DataLoader::new(prepared.train, 64, tok.pad_id(), lc).unwrap();
    assert!(loader.epoch_batches(0).count() > afinar_gemma::model::STREAM_GROUP_BATCHES);
    let be = Arc::new(Cpu::new());
    let dense = Gemma2Model::load(
        be.clone(),
        &model_dir,
        &afinar_gemma::LoadOptions::default(),
    )
    .unwrap();
    let (want, want_n) = evaluate(&dense, &loader).unwrap();
    let (got, got_n) = evaluate_dense_streamed(be, &model_dir, &loader).unwrap();
    assert!(want_n > 0 && want.is_finite());
    assert_eq!(
        (got.to_bits(), got_n),
        (want.to_bits(), want_n),
        "streamed {got} over {got_n}, loaded {want} over {want_n}"
    );
}
