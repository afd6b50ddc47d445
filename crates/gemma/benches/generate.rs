//! Generation (decoding) speed on the CPU: prefill of a P-token prompt, then greedy decoding of N tokens with
//! the KV cache (`afinar_gemma::generate::generate`), on the committed demo model (models/afinar-demo: V 4096,
//! H 128, 4 layers, sliding window 128 on the even layers), side by side with transformers' `generate` on the
//! same safetensors, in the same run.
//!
//!     cargo bench -p afinar-gemma --bench generate
//!     AFINAR_GEN_PROMPTS=16,256,1024 AFINAR_GEN_NEW=128 AFINAR_GEN_REPS=3 cargo bench -p afinar-gemma --bench generate
//!     AFINAR_PYTHON=/path/to/python cargo bench ...     # the reference's interpreter (default /work/venv/bin/python)
//!
//! Timing (both sides the same way): per prompt, one untimed warm-up of each call, then t1 = median over R runs
//! of a generation of 1 token (prefill of P tokens + one argmax) and tN = median over R runs of a generation
//! of N tokens. Prefill tok/s = P / t1; the N − 1 decode steps take tN − t1, so ms/token = (tN − t1)/(N − 1)
//! and decode tok/s is its inverse. With P + N > 128 the sliding layers' caches are trimmed every step, so
//! every row exercises the trim path (P = 16, N = 128 crosses the window during decoding).
//!
//! The reference is crates/gemma/benches/torch_generate.py (float32, eager attention, `use_cache=True`,
//! greedy, `torch.set_num_threads` = this process's rayon thread count). It runs when `$AFINAR_PYTHON` or
//! /work/venv/bin/python exists; otherwise the table has afinar's columns only and a line says the
//! reference was skipped. Both sides decode the same prompts (BOS + fixed pseudo-random ids, handed to the
//! script in a JSON file) with no EOS, and the table reports whether the N generated ids are identical.
//!
//! Without `--bench` (e.g. `cargo test --benches`) the binary only prints how to run it: no timing runs in
//! tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use afinar_gemma::export::{export_merged, ExportDtype, ExportOptions};
use afinar_gemma::generate::{generate, GenerateOptions};
use afinar_gemma::{Gemma2Config, Gemma2Model, LoadOptions};
use afinar_kernels::Cpu;

/// One prompt's measurements: medians of the two generate calls (seconds) and the N generated ids.
struct Measured {
    t1: f64,
    tn: f64,
    tokens: Vec<i32>,
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// BOS (2) then P − 1 fixed pseudo-random ids in [12, V) (past the tokenizer's 12 special tokens).
fn prompt(p: usize, vocab: usize) -> Vec<i32> {
    let span = vocab - 12;
    std::iter::once(2)
        .chain((1..p).map(|i| (12 + (i * 7919 + 104_729) % span) as i32))
        .collect()
}

fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Times afinar's `generate` on one prompt (warm-up, then R runs of 1 and of N new tokens).
fn measure_afinar(model: &Gemma2Model<Cpu>, ids: &[i32], n: usize, reps: usize) -> Measured {
    let run = |k: usize| {
        let t0 = Instant::now();
        let g = generate(model, ids, &GenerateOptions::greedy(k)).expect("generate");
        (t0.elapsed().as_secs_f64(), g.tokens)
    };
    run(1);
    run(n);
    let t1 = median((0..reps).map(|_| run(1).0).collect());
    let runs: Vec<(f64, Vec<i32>)> = (0..reps).map(|_| run(n)).collect();
    let tokens = runs[0].1.clone();
    assert!(
        runs.iter().all(|(_, t)| *t == tokens),
        "afinar greedy decoding is not deterministic across runs"
    );
    Measured {
        t1,
        tn: median(runs.iter().map(|r| r.0).collect()),
        tokens,
    }
}

/// The reference interpreter: $AFINAR_PYTHON, else /work/venv/bin/python when it exists.
fn python() -> Option<PathBuf> {
    match std::env::var_os("AFINAR_PYTHON") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            let p = PathBuf::from("/work/venv/bin/python");
            p.exists().then_some(p)
        }
    }
}

/// Runs torch_generate.py on the same model and prompts; one `Measured` per prompt, or why not.
fn measure_torch(
    py: &Path,
    model_dir: &Path,
    prompts: &[Vec<i32>],
    threads: usize,
    n: usize,
    reps: usize,
) -> Result<Vec<Measured>, String> {
    let spec = serde_json::json!({
        "model": model_dir,
        "threads": threads,
        "new_tokens": n,
        "reps": reps,
        "prompts": prompts,
    });
    let spec_path =
        std::env::temp_dir().join(format!("afinar-gen-bench-{}.json", std::process::id()));
    std::fs::write(&spec_path, spec.to_string()).map_err(|e| format!("{spec_path:?}: {e}"))?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/torch_generate.py");
    let out = Command::new(py).arg(&script).arg(&spec_path).output();
    let _ = std::fs::remove_file(&spec_path);
    let out = out.map_err(|e| format!("running {py:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "{script:?} failed ({}): {}",
            out.status,
            err.lines().last().unwrap_or("")
        ));
    }
    for l in stdout.lines().filter_map(|l| l.strip_prefix("INFO ")) {
        println!("reference: {l}");
    }
    let results: Vec<Measured> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .map(|r| {
            let v: serde_json::Value =
                serde_json::from_str(r).map_err(|e| format!("bad RESULT line {r:?}: {e}"))?;
            let num = |k: &str| {
                v[k].as_f64()
                    .ok_or_else(|| format!("RESULT without {k}: {r}"))
            };
            let tokens = v["tokens"]
                .as_array()
                .ok_or_else(|| format!("RESULT without tokens: {r}"))?
                .iter()
                .map(|t| t.as_i64().map(|t| t as i32).ok_or("non-integer token"))
                .collect::<Result<_, _>>()?;
            Ok(Measured {
                t1: num("t1")?,
                tn: num("tn")?,
                tokens,
            })
        })
        .collect::<Result<_, String>>()?;
    if results.len() != prompts.len() {
        return Err(format!(
            "expected {} RESULT lines, got {}",
            prompts.len(),
            results.len()
        ));
    }
    Ok(results)
}

/// (prefill tok/s, decode tok/s, decode ms/token).
fn rates(m: &Measured, p: usize, n: usize) -> (f64, f64, f64) {
    let step = (m.tn - m.t1) / (n - 1) as f64;
    (p as f64 / m.t1, 1.0 / step, step * 1e3)
}

/// The "small" config of the training bench (benches/gemma.rs): H 512, 8 layers, 8 heads, 4 kv heads,
/// D 64, I 2048, V 8192, window 128.
fn small_config() -> Gemma2Config {
    let mut c =
        Gemma2Config::tiny(8192, 512, 2048, 8, 8, 4, 64, 128).expect("valid built-in config");
    c.query_pre_attn_scalar = 64.0;
    c
}

/// Benchmarks one checkpoint directory on both sides and prints its table.
fn bench_model(
    label: &str,
    dir: &Path,
    prompts_p: &[usize],
    n: usize,
    reps: usize,
    threads: usize,
) {
    let model = Gemma2Model::load(Arc::new(Cpu::new()), dir, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    let cfg = &model.config;
    println!();
    println!(
        "Generation, {label}: V {} H {} L {} NH {} NKV {} D {} I {} window {}, f32 dense, greedy, N = {n} new \
         tokens, median of {reps}, {threads} threads, load average {}",
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.sliding_window,
        load_avg()
    );
    let prompts: Vec<Vec<i32>> = prompts_p
        .iter()
        .map(|&p| prompt(p, cfg.vocab_size))
        .collect();
    let ours: Vec<Measured> = prompts
        .iter()
        .map(|ids| measure_afinar(&model, ids, n, reps))
        .collect();
    let theirs = match python() {
        None => Err(
            "no Python (set AFINAR_PYTHON to an interpreter with torch + transformers)".to_string(),
        ),
        Some(py) => measure_torch(&py, dir, &prompts, threads, n, reps),
    };
    if let Err(e) = &theirs {
        println!("reference skipped: {e}");
    }
    println!("load average after: {}", load_avg());
    println!(
        "| P | N | prefill tok/s afinar | prefill tok/s transformers | decode tok/s afinar | decode tok/s transformers \
         | ms/token afinar | ms/token transformers | decode speed-up | same {n} tokens |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (i, (&p, m)) in prompts_p.iter().zip(&ours).enumerate() {
        let (pf, dt, ms) = rates(m, p, n);
        match &theirs {
            Ok(t) => {
                let r = &t[i];
                let (rpf, rdt, rms) = rates(r, p, n);
                let same = if r.tokens == m.tokens {
                    "yes".to_string()
                } else {
                    let k = r
                        .tokens
                        .iter()
                        .zip(&m.tokens)
                        .take_while(|(a, b)| a == b)
                        .count();
                    format!("no (first {k} equal)")
                };
                println!(
                    "| {p} | {n} | {pf:.0} | {rpf:.0} | {dt:.0} | {rdt:.0} | {ms:.3} | {rms:.3} | {:.1}× | {same} |",
                    rms / ms
                );
            }
            Err(_) => println!("| {p} | {n} | {pf:.0} | — | {dt:.0} | — | {ms:.3} | — | — | — |"),
        }
    }
    for (&p, m) in prompts_p.iter().zip(&ours) {
        println!(
            "P = {p}: afinar's first 16 ids {:?}",
            &m.tokens[..m.tokens.len().min(16)]
        );
    }
}

fn main() {
    // `cargo test --benches` runs bench binaries without `--bench`; do nothing heavy there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("generate bench: run with `cargo bench -p afinar-gemma --bench generate`");
        return;
    }
    let prompts_p: Vec<usize> = std::env::var("AFINAR_GEN_PROMPTS")
        .unwrap_or_else(|_| "16,256,1024".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("AFINAR_GEN_PROMPTS: comma-separated integers")
        })
        .collect();
    let n: usize = env_or("AFINAR_GEN_NEW", 128).max(2);
    let reps: usize = env_or("AFINAR_GEN_REPS", 3).max(1);
    let models = std::env::var("AFINAR_GEN_MODELS").unwrap_or_else(|_| "demo,small".into());
    let threads = rayon_threads();
    for which in models.split(',').map(str::trim) {
        match which {
            "demo" => {
                let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/afinar-demo");
                let dir = dir.canonicalize().unwrap_or(dir);
                bench_model("models/afinar-demo", &dir, &prompts_p, n, reps, threads);
            }
            "small" => {
                // Random weights (seed 1), written as an f32 HF checkpoint that both sides load.
                let tmp = tempfile::tempdir().expect("temporary directory");
                let dir = tmp.path().join("small");
                let model = Gemma2Model::random(
                    Arc::new(Cpu::new()),
                    small_config(),
                    &LoadOptions {
                        seed: 1,
                        ..Default::default()
                    },
                )
                .expect("random small model");
                let opts = ExportOptions {
                    dtype: ExportDtype::F32,
                    ..Default::default()
                };
                export_merged(&model, &dir, &opts).expect("writing the random small model");
                drop(model);
                bench_model(
                    "random \"small\" Gemma-2 (seed 1)",
                    &dir,
                    &prompts_p,
                    n,
                    reps,
                    threads,
                );
            }
            other => println!("AFINAR_GEN_MODELS: unknown model {other:?} (demo, small)"),
        }
    }
}

/// rayon's thread count (RAYON_NUM_THREADS, else the available parallelism), handed to torch as well.
fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
