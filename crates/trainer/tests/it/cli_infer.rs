//! `afinar eval`, `generate`, `data inspect`, `quantize` through the binary: defaults that adapt to
//! the model, and messages that fit the command.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_afinar"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Rewrites `max_position_embeddings` in the fixture model's config.json.
fn set_max_positions(model: &Path, n: usize) {
    let p = model.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["max_position_embeddings"] = n.into();
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn unset_limits_follow_a_short_model_and_messages_fit_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let c = common::config(dir.path());
    let m = c.model.path.to_str().unwrap().to_string();
    let d = c.data.eval.to_str().unwrap().to_string();
    set_max_positions(&c.model.path, 64);

    // No --max-seq-len: eval takes the model's 64 positions instead of refusing the default 1024.
    let o = run(&["eval", "--model", &m, "--data", &d, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["samples"], 6, "{v}");
    // The same rows as an explicit --max-seq-len 64.
    let o64 = run(&[
        "eval",
        "--model",
        &m,
        "--data",
        &d,
        "--max-seq-len",
        "64",
        "--json",
    ]);
    assert_eq!(o64.status.code(), Some(0), "{}", stderr(&o64));
    assert_eq!(o.stdout, o64.stdout);
    // An explicit value beyond the positions is still refused, naming both numbers.
    let o = run(&["eval", "--model", &m, "--data", &d, "--max-seq-len", "65"]);
    assert_ne!(o.status.code(), Some(0));
    let e = stderr(&o);
    assert!(
        e.contains("65") && e.contains("max_position_embeddings = 64"),
        "{e}"
    );

    // No --max-new-tokens: generate stops at the model's last position instead of refusing 128.
    let o = run(&["generate", "--model", &m, "--prompt", "hola", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let n = v[0]["tokens"].as_u64().unwrap();
    assert!((1..64).contains(&n), "{v}");
    let o = run(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "hola",
        "--max-new-tokens",
        "128",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("max_position_embeddings = 64"),
        "{}",
        stderr(&o)
    );

    // data inspect --tokenizer DIR: says what to pass instead of "Is a directory".
    let o = run(&["data", "inspect", "--data", &d, "--tokenizer", &m]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("is a directory")
            && e.contains(&format!("{m}/tokenizer.json"))
            && e.contains(&format!("--model {m}"))
            && !e.contains("os error"),
        "{e}"
    );

    // eval on a file with a bad record: refused, without claiming that anything was trained.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        format!("{}\n{{\"instruction\": \"q\"}}\n", common::records(1, 0)[0]),
    )
    .unwrap();
    let o = run(&["eval", "--model", &m, "--data", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("1 invalid record") && e.contains("bad.jsonl:2") && !e.contains("trained"),
        "{e}"
    );
}

fn golden() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/fixtures")
}

/// (dtype, shape, bytes) of every tensor of a one-file safetensors checkpoint.
fn tensors(path: &Path) -> std::collections::BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let d = format!("{:?}", v.dtype());
            (n, (d, v.shape().to_vec(), v.data().to_vec()))
        })
        .collect()
}

/// `afinar quantize` of the f32 golden model equals, tensor for tensor and byte for byte, what
/// transformers + bitsandbytes wrote when they loaded the same checkpoint in 4 bit
/// (tests/golden/fixtures/gemma_io_bnb, made by make_gemma_io.py): the weights are quantized from
/// their f32 values. The one known exception (tests/golden/README.md): 2 of the 1152 double-quant 8-bit
/// absmax codes, where bitsandbytes' CPU lookup table is one step off the nearest code and afinar
/// follows the CUDA rule (what GPU-made QLoRA checkpoints hold). With `--dtype bf16` the weights are
/// rounded first, and some packed 4-bit codes differ.
#[test]
fn quantize_of_an_f32_checkpoint_matches_bitsandbytes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let model = golden().join("gemma_io_model");
    let want = tensors(&golden().join("gemma_io_bnb/model.safetensors"));
    let out = dir.path().join("q");
    let o = run(&[
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains("float32 weights (the checkpoint's dtype)"),
        "{said}"
    );
    let got = tensors(&out.join("model.safetensors"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    let mut packed = 0;
    let mut absmax_steps = Vec::new();
    for (name, (wd, ws, wb)) in &want {
        let (gd, gs, gb) = &got[name];
        assert_eq!((gd, gs), (wd, ws), "{name}");
        if name.ends_with("quant_state.bitsandbytes__nf4") {
            // A JSON blob: the same keys and values (key order is free).
            let j = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
            assert_eq!(j(gb), j(wb), "{name}");
        } else if name.ends_with(".weight.absmax") {
            for (g, w) in gb.iter().zip(wb) {
                if g != w {
                    absmax_steps.push(i32::from(*g) - i32::from(*w));
                }
            }
        } else {
            assert!(gb == wb, "{name}: bytes differ");
        }
        packed += usize::from(name.ends_with("_proj.weight"));
    }
    assert_eq!(packed, 14, "every linear of the 2-layer fixture is NF4");
    assert_eq!(absmax_steps.len(), 2, "{absmax_steps:?}");
    assert!(
        absmax_steps.iter().all(|d| d.abs() == 1),
        "{absmax_steps:?}"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "float32", "{cfg}");

    // --dtype bf16: what transformers does with dtype=torch.bfloat16; codes of rounded weights.
    let out16 = dir.path().join("q16");
    let o = run(&[
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out16.to_str().unwrap(),
        "--dtype",
        "bf16",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("bfloat16 weights (--dtype)"));
    let got16 = tensors(&out16.join("model.safetensors"));
    let differing: usize = want
        .iter()
        .filter(|(n, _)| n.ends_with("_proj.weight"))
        .map(|(n, (_, _, wb))| wb.iter().zip(&got16[n].2).filter(|(a, b)| a != b).count())
        .sum();
    assert!(differing > 0, "bf16 rounding changed no NF4 code");
    assert_eq!(got16["model.embed_tokens.weight"].0, "BF16");
    let o = run(&[
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--out",
        "x",
        "--dtype",
        "f8",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// `afinar plan` from a run config, a model directory and a bare config.json of the 9B shape; the
/// table, the JSON, the fit, and the usage errors.
#[test]
fn plan_reads_a_config_a_model_dir_or_a_bare_config_json() {
    let dir = tempfile::tempdir().unwrap();
    let c = common::config(dir.path());
    let toml = dir.path().join("run.toml");
    std::fs::write(&toml, c.to_toml()).unwrap();
    let o = run(&[
        "plan",
        "--config",
        toml.to_str().unwrap(),
        "--memory",
        "1GiB",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.contains("plan: CPU")
            && t.contains("micro-batch 2 × 128")
            && t.contains("in 1.00 GiB: fits"),
        "{t}"
    );
    // --set reaches the plan; --json carries the same numbers.
    let json = |args: &[&str]| -> serde_json::Value {
        let o = run(args);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let base = json(&["plan", "--config", toml.to_str().unwrap(), "--json"]);
    let wide = json(&[
        "plan",
        "--config",
        toml.to_str().unwrap(),
        "--set",
        "train.micro_batch_size=8",
        "--json",
    ]);
    assert_eq!(wide["plan"]["settings"]["micro_batch"], 8);
    assert!(wide["plan"]["peak"].as_u64() > base["plan"]["peak"].as_u64());
    assert!(base["fit"].is_null(), "no --memory on the CPU: no fit");

    // The model directory alone: planned on cuda in bf16.
    let m = c.model.path.to_str().unwrap();
    let v = json(&["plan", "--model", m, "--memory", "64MiB", "--json"]);
    assert_eq!(v["plan"]["settings"]["device"], "cuda");
    assert_eq!(v["fit"]["memory"], 64 << 20);

    // A bare config.json of the 9B shape: the first GPU run's settings fit in 24 GiB, not in 8.
    let cfg9 = serde_json::json!({
        "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 3584,
        "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256,
        "sliding_window": 4096, "max_position_embeddings": 8192,
        "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0
    });
    let p9 = dir.path().join("gemma-2-9b.json");
    std::fs::write(&p9, cfg9.to_string()).unwrap();
    let qlora = [
        "--set",
        "model.quantization=nf4",
        "--set",
        "train.micro_batch_size=2",
        "--set",
        "data.max_seq_len=2048",
        "--set",
        "train.gradient_checkpointing=true",
        "--set",
        "train.paged_optimizer=true",
    ];
    let mut args = vec![
        "plan",
        "--model",
        p9.to_str().unwrap(),
        "--json",
        "--memory",
        "24GiB",
    ];
    args.extend(qlora);
    let v = json(&args);
    let peak = v["plan"]["peak"].as_u64().unwrap();
    assert!(peak > 8 << 30 && peak < 24 << 30, "{v}");
    assert!(v["fit"]["max_seq_len"].as_u64().unwrap() >= 2048, "{v}");
    // In 8 GiB: no micro-batch of 2048 tokens fits, a shorter sequence at micro-batch 2 does.
    args[5] = "8GiB";
    let v = json(&args);
    assert_eq!(v["fit"]["max_micro_batch"], 0, "{v}");
    let t = v["fit"]["max_seq_len"].as_u64().unwrap();
    assert!(t > 0 && t < 2048, "{v}");

    // Usage errors name what is wrong.
    for (args, want) in [
        (vec!["plan", "--model", m, "--memory", "lots"], "--memory"),
        (vec!["plan", "--model", "/no/such/model"], "/no/such/model"),
        (
            vec!["plan", "--model", m, "--set", "train.micro_batch_size=0"],
            "micro_batch_size",
        ),
        (vec!["plan"], "--config"),
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
}

/// summary.json carries the plan's predicted peak and the device peak (null on the CPU); the progress
/// line names the process's peak RSS on the CPU.
#[test]
fn train_reports_its_planned_and_measured_peaks() {
    let dir = tempfile::tempdir().unwrap();
    let c = common::config(dir.path());
    let toml = dir.path().join("run.toml");
    std::fs::write(&toml, c.to_toml()).unwrap();
    let o = run(&[
        "train",
        "--config",
        toml.to_str().unwrap(),
        "--set",
        "train.max_steps=2",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["peak_gpu_mib"].is_null(), "{v}");
    let planned = v["planned_peak_mib"].as_f64().unwrap();
    assert!(
        planned > 0.0 && planned < v["peak_rss_mib"].as_f64().unwrap(),
        "{v}"
    );
    let e = stderr(&o);
    assert!(e.contains("step 2/2") && e.contains("rss peak "), "{e}");
}

/// --device / --dtype on the CPU: the first line says where the command runs, eval's JSON carries
/// it, a bad value or a device this build lacks is a usage error; generate reports its speeds; eval
/// warns when an adapter trained on a dense base is scored on an NF4 one.
#[test]
fn device_flags_and_the_quantization_warning() {
    let dir = tempfile::tempdir().unwrap();
    let c = common::config(dir.path());
    let toml = dir.path().join("run.toml");
    std::fs::write(&toml, c.to_toml()).unwrap();
    let m = c.model.path.to_str().unwrap().to_string();
    let d = c.data.eval.to_str().unwrap().to_string();
    let o = run(&[
        "eval", "--model", &m, "--data", &d, "--device", "cpu", "--dtype", "bf16", "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("afinar eval: device cpu (--device cpu; f32: the CPU computes in f32"),
        "{e}"
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v["device"].as_str(), v["dtype"].as_str()),
        (Some("cpu"), Some("f32"))
    );
    // Without --device this CPU-only machine (or build) runs on the CPU and says why.
    let o = run(&["eval", "--model", &m, "--data", &d]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("afinar eval: device "),
        "{}",
        stderr(&o)
    );
    for args in [
        vec!["eval", "--model", &m, "--data", &d, "--device", "tpu"],
        vec![
            "eval", "--model", &m, "--data", &d, "--device", "cpu", "--dtype", "f8",
        ],
        vec![
            "generate", "--model", &m, "--prompt", "hola", "--device", "gpu",
        ],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("--d"), "{}", stderr(&o));
    }
    if !afinar_trainer::device::HAS_CUDA_BACKEND {
        let o = run(&["eval", "--model", &m, "--data", &d, "--device", "cuda"]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("built without the CUDA backend"),
            "{}",
            stderr(&o)
        );
    }
    let o = run(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "hola",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("prefill ") && e.contains("decode ") && e.contains("tok/s"),
        "{e}"
    );

    // An adapter of a dense (LoRA) run scored on an NF4 base: warned, still scored.
    let o = run(&[
        "train",
        "--config",
        toml.to_str().unwrap(),
        "--quiet",
        "--set",
        "train.max_steps=2",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let adapter = dir.path().join("runs/t/adapter");
    let a = adapter.to_str().unwrap();
    let o = run(&[
        "eval",
        "--model",
        &m,
        "--adapter",
        a,
        "--data",
        &d,
        "--quantization",
        "nf4",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("trained on a dense base")
            && e.contains("scored on an NF4 (QLoRA) base")
            && e.contains("--quantization none"),
        "{e}"
    );
    let o = run(&["eval", "--model", &m, "--adapter", a, "--data", &d]);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
}

/// `quantize` loads the checkpoint straight to NF4 when its projections are stored in the export dtype
/// (the default), so the dense model never exists; the file must be byte for byte what quantizing the
/// dense model gives (`export_nf4` of a dense load, the path taken before). Checked for an f32 and a
/// bf16 checkpoint; the bf16 one is the f32 model exported with `export_merged` in bf16.
#[test]
fn quantize_straight_to_nf4_equals_quantizing_the_dense_model() {
    use afinar_gemma::export::{
        export_merged, export_nf4, ExportDtype, ExportOptions, QuantizeOptions,
    };
    use afinar_trainer::infer;
    let dir = tempfile::tempdir().unwrap();
    let f32_model = golden().join("gemma_io_model");
    let bf16_model = dir.path().join("bf16");
    let dense = infer::load_model(&f32_model, None, false).unwrap();
    let bf16_opts = ExportOptions {
        dtype: ExportDtype::BF16,
        source_dir: Some(f32_model.clone()),
        ..Default::default()
    };
    export_merged(&dense, &bf16_model, &bf16_opts).unwrap();
    for (model, dtype) in [
        (&f32_model, ExportDtype::F32),
        (&bf16_model, ExportDtype::BF16),
    ] {
        let got_dir = dir.path().join(format!("direct-{dtype:?}"));
        let (_, used) = infer::quantize(model, &got_dir, None).unwrap();
        assert_eq!(used, dtype);
        let want_dir = dir.path().join(format!("dense-{dtype:?}"));
        let dense = infer::load_model(model, None, false).unwrap();
        let opts = QuantizeOptions {
            export: ExportOptions {
                dtype,
                source_dir: Some(model.to_path_buf()),
                ..Default::default()
            },
            ..Default::default()
        };
        export_nf4(&dense, &want_dir, &opts).unwrap();
        let (got, want) = (
            tensors(&got_dir.join("model.safetensors")),
            tensors(&want_dir.join("model.safetensors")),
        );
        assert_eq!(got.len(), want.len(), "{dtype:?}");
        for (name, w) in &want {
            let g = &got[name];
            if name.ends_with("quant_state.bitsandbytes__nf4") {
                let j = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
                assert_eq!(j(&g.2), j(&w.2), "{dtype:?} {name}");
            } else {
                assert!(
                    g == w,
                    "{dtype:?} {name}: differs from quantizing the dense model"
                );
            }
        }
    }
}
