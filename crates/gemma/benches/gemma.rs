//! CPU forward+backward throughput of the "small" Gemma-2 config, QLoRA r=16 on all linears:
//! hidden 512, 8 layers, 8 heads, 4 kv heads, head_dim 64, intermediate 2048, vocab 8192, B=4, T=256.
//!
//!     cargo bench -p afinar-gemma                      # both modes, 3 timed steps each
//!     AFINAR_BENCH_STEPS=10 cargo bench -p afinar-gemma
//!     AFINAR_BENCH_B=1 AFINAR_BENCH_T=128 cargo bench -p afinar-gemma   # a smaller batch (e.g. under callgrind)
//!
//! Each mode (activation checkpointing off / on) runs in its own child process so that its peak RSS
//! (VmHWM from /proc/self/status) is its own. The parent prints one Markdown table row per mode, ready for
//! docs/benchmarks.md. Timings are wall-clock over whole optimizer-free steps (forward_backward), after one
//! warm-up step; the thread count is rayon's default (RAYON_NUM_THREADS to change it).

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use afinar_gemma::{
    Batch, Gemma2Config, Gemma2Model, Grads, LoadOptions, LoraConfig, Quantization,
};
use afinar_kernels::profile::Profiled;
use afinar_kernels::{Backend, Cpu};

/// Batch rows and length: AFINAR_BENCH_B / AFINAR_BENCH_T, default 4 × 256.
fn batch_shape() -> (usize, usize) {
    let var = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    (var("AFINAR_BENCH_B", 4), var("AFINAR_BENCH_T", 256))
}

fn small_config() -> Gemma2Config {
    // window 128 < T so the sliding layers do mask.
    let mut c =
        Gemma2Config::tiny(8192, 512, 2048, 8, 8, 4, 64, 128).expect("valid built-in config");
    c.query_pre_attn_scalar = 64.0;
    c
}

fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// One mode, in this process: prints `RESULT <tokens/s> <s/step> <peak MiB> <loss>`. With
/// `AFINAR_BENCH_PROFILE=1` the backend is `Profiled<Cpu>` and the per-op table of the timed steps
/// goes to stderr (the profiler's own cost is in that run's tokens/s).
fn child(checkpointing: bool, nf4: bool, steps: usize) {
    if std::env::var("AFINAR_BENCH_PROFILE").is_ok_and(|v| v == "1") {
        let backend = Profiled::new(Cpu::new()).expect("profiled backend");
        child_on(backend, checkpointing, nf4, steps);
    } else {
        child_on(Cpu::new(), checkpointing, nf4, steps);
    }
}

fn child_on<B: Backend>(backend: B, checkpointing: bool, nf4: bool, steps: usize) {
    let opts = LoadOptions {
        quantize: if nf4 {
            Quantization::Nf4 { double_quant: true }
        } else {
            Quantization::None
        },
        lora: Some(
            LoraConfig::new(16, 32.0, 0.0, false, &["all-linear"]).expect("valid LoRA config"),
        ),
        seed: 1,
        ..Default::default()
    };
    let mut model = Gemma2Model::random(Arc::new(backend), small_config(), &opts).expect("model");
    model.checkpointing = checkpointing;
    let (b, t) = batch_shape();
    let n = b * t;
    let ids: Vec<i32> = (0..n).map(|i| ((i * 7919 + 13) % 8192) as i32).collect();
    let targets: Vec<i32> = (0..n).map(|i| ((i * 104_729 + 7) % 8192) as i32).collect();
    let batch = Batch::new(b, t, ids, targets);
    let mut grads = Grads::zeros(&model).expect("grads");
    let (loss, count) = model
        .forward_backward(&batch, 1.0, &mut grads)
        .expect("warm-up step");
    let t0 = Instant::now();
    let prof = model.backend().profiler();
    for _ in 0..steps {
        if let Some(p) = prof {
            p.begin_step().expect("profiler step");
        }
        model
            .forward_backward(&batch, 1.0, &mut grads)
            .expect("step");
        if let Some(p) = prof {
            p.end_step().expect("profiler step");
        }
    }
    let secs = t0.elapsed().as_secs_f64() / steps as f64;
    if let Some(p) = prof {
        eprint!("{}", p.report().expect("profile report").table());
    }
    println!(
        "RESULT {} {} {} {}",
        n as f64 / secs,
        secs,
        peak_rss_mib().unwrap_or(f64::NAN),
        loss / count as f64
    );
}

/// The GEMM floor of one step: the bare f32 `matmul_xwt` / `matmul_dyw` of afinar-kernels (the
/// `gemm` crate, same threads) on exactly the step's dense GEMM shapes — per layer the seven
/// projections forward and their dX backward, the tied head forward and its dX, and with
/// `checkpointing` the L − 1 recomputed layer forwards — and nothing else (no LoRA, no NF4 decode,
/// no attention, norms or activations). No implementation of this f32 step on this machine's `gemm`
/// can be faster, so `n / floor` bounds the tokens/s any row above can reach.
/// Prints `FLOOR <tokens/s> <s/step> <GFLOP/step>`.
fn floor_child(checkpointing: bool, steps: usize) {
    use afinar_kernels::cpu::gemm::{matmul_dyw, matmul_xwt};
    use afinar_kernels::Accum;
    let c = small_config();
    let (b, t) = batch_shape();
    let m = b * t;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    // (K, N) of Y[M,N] = X[M,K]·W[N,K]ᵀ: q, k, v, o, gate, up, down.
    let layer: [(usize, usize); 7] = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)];
    let l = c.num_hidden_layers;
    let fwd_layers = if checkpointing { 2 * l - 1 } else { l };
    let mut shapes: Vec<(usize, usize, usize, bool)> = Vec::new(); // (count, K, N, backward)
    for &(k, n) in &layer {
        shapes.push((fwd_layers, k, n, false));
        shapes.push((l, k, n, true));
    }
    shapes.push((1, h, c.vocab_size, false));
    shapes.push((1, h, c.vocab_size, true));
    let fill = |len: usize, seed: usize| -> Vec<f32> {
        (0..len)
            .map(|j| (((j * 2_654_435_761 + seed) % 1000) as f32 - 500.0) * 1e-3)
            .collect()
    };
    let mut secs = 0.0;
    let mut flops = 0.0;
    for &(count, k, n, backward) in &shapes {
        let w = fill(n * k, 1);
        let (a, mut out) = if backward {
            (fill(m * n, 2), vec![0f32; m * k])
        } else {
            (fill(m * k, 2), vec![0f32; m * n])
        };
        let mut run = || {
            if backward {
                matmul_dyw(&a, &w, &mut out, m, k, n, Accum::Overwrite)
            } else {
                matmul_xwt(&a, &w, &mut out, m, k, n, Accum::Overwrite)
            }
            .expect("gemm")
        };
        run();
        let t0 = Instant::now();
        for _ in 0..steps {
            run();
        }
        secs += count as f64 * t0.elapsed().as_secs_f64() / steps as f64;
        flops += count as f64 * 2.0 * (m * k * n) as f64;
    }
    println!("FLOOR {} {} {}", m as f64 / secs, secs, flops / 1e9);
}

fn main() {
    let steps: usize = std::env::var("AFINAR_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    if let Ok(mode) = std::env::var("AFINAR_BENCH_CHILD") {
        if mode.starts_with("floor") {
            floor_child(mode.contains("ckpt"), steps);
            return;
        }
        child(mode.contains("ckpt"), !mode.contains("dense"), steps);
        return;
    }
    // `cargo test --benches` runs bench binaries with `--test`-like args; do nothing heavy there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("gemma bench: run with `cargo bench -p afinar-gemma`");
        return;
    }
    let exe = std::env::current_exe().expect("current exe");
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .to_string()
    });
    let cfg = small_config();
    let (b, t) = batch_shape();
    println!(
        "Gemma-2 small (H {} L {} NH {} NKV {} D {} I {} V {}), B={b} T={t}, LoRA r=16 all-linear, {threads} threads, {steps} steps",
        cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    );
    println!("| base weights | checkpointing | tokens/s | s/step | peak RSS (MiB) | loss |");
    println!("|---|---|---|---|---|---|");
    for (label, mode) in [
        ("NF4 + DQ | off", "plain"),
        ("NF4 + DQ | on", "ckpt"),
        ("dense f32 | off", "dense"),
    ] {
        let out = Command::new(&exe)
            .env("AFINAR_BENCH_CHILD", mode)
            .output()
            .expect("spawn bench child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        match stdout.lines().find_map(|l| l.strip_prefix("RESULT ")) {
            Some(r) => {
                let v: Vec<f64> = r
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                println!(
                    "| {label} | {:.0} | {:.2} | {:.0} | {:.4} |",
                    v[0], v[1], v[2], v[3]
                );
            }
            None => println!(
                "| {label} | failed: {} |",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ),
        }
    }
    println!();
    println!("GEMM floor: the bare f32 GEMMs of a step on the same shapes (gemm crate, same threads), nothing else");
    println!("| checkpointing | tokens/s (bound) | s/step | GFLOP/step | GFLOP/s |");
    println!("|---|---|---|---|---|");
    for (label, mode) in [("off", "floor"), ("on", "floor-ckpt")] {
        let out = Command::new(&exe)
            .env("AFINAR_BENCH_CHILD", mode)
            .output()
            .expect("spawn bench child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if let Some(r) = stdout.lines().find_map(|l| l.strip_prefix("FLOOR ")) {
            let v: Vec<f64> = r
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            println!(
                "| {label} | {:.0} | {:.3} | {:.1} | {:.0} |",
                v[0],
                v[1],
                v[2],
                v[2] / v[1]
            );
        }
    }
}
