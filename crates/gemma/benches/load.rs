//! Loading a sharded bf16 checkpoint on the CPU backend: wall time and peak host memory, dense and NF4
//! (double quant). The checkpoint is a random Gemma-2 of a mid-size shape (hidden 1024, intermediate
//! 4096, 8 layers, 8 heads, 4 kv heads, head_dim 128, vocab 32000: 153 M parameters, 306 MB in bf16,
//! shards of ≤ 100 MB), written once into a temporary directory (or AFINAR_LOAD_BENCH_DIR, kept).
//!
//!     cargo bench -p afinar-gemma --bench load
//!
//! Each load runs in its own child process, so its peak RSS (VmHWM of /proc/self/status, which counts
//! the mapped checkpoint pages the process has touched and not released as well as its own memory) is
//! the load's alone. Printed as Markdown rows for docs/benchmarks.md. The model itself is part of the
//! RSS on the CPU backend: 612 MB of f32 dense, ~82 MB of NF4 linears + 131 MB of f32 embedding and
//! norms.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use afinar_gemma::export::{export_merged, ExportDtype, ExportOptions};
use afinar_gemma::{Gemma2Config, Gemma2Model, LoadOptions, Quantization};
use afinar_kernels::Cpu;

fn vm_hwm_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

fn make_checkpoint(dir: &Path) {
    if dir.join("model.safetensors.index.json").is_file() {
        return;
    }
    let cfg = Gemma2Config::tiny(32000, 1024, 4096, 8, 8, 4, 128, 4096).expect("config");
    let model = Gemma2Model::random(Arc::new(Cpu::new()), cfg, &LoadOptions::default())
        .expect("random model");
    let e = ExportOptions {
        dtype: ExportDtype::BF16,
        max_shard_bytes: 100_000_000,
        source_dir: None,
    };
    export_merged(&model, dir, &e).expect("export");
}

/// The child: one load, then one line `load_s peak_rss_bytes`.
fn child(dir: &Path, nf4: bool) {
    let opts = LoadOptions {
        quantize: if nf4 {
            Quantization::Nf4 { double_quant: true }
        } else {
            Quantization::None
        },
        ..Default::default()
    };
    let t = Instant::now();
    let m = Gemma2Model::load(Arc::new(Cpu::new()), dir, &opts).expect("load");
    let s = t.elapsed().as_secs_f64();
    std::hint::black_box(&m);
    println!("{s:.3} {}", vm_hwm_bytes().unwrap_or(0));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(Path::new(&args[i + 1]), args[i + 2] == "nf4");
        return;
    }
    let tmp;
    let dir: PathBuf = match std::env::var_os("AFINAR_LOAD_BENCH_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir().expect("tempdir");
            tmp.path().join("ckpt")
        }
    };
    make_checkpoint(&dir);
    let bytes: u64 = std::fs::read_dir(&dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    let exe = std::env::current_exe().expect("current exe");
    println!(
        "| load (CPU backend, {:.0} MB bf16 shards) | seconds | peak RSS (MB) |",
        bytes as f64 / 1e6
    );
    println!("|---|---:|---:|");
    for (label, mode) in [("dense f32", "dense"), ("NF4 + double quant", "nf4")] {
        // The first load also warms the page cache; the second is reported.
        let mut last = String::new();
        for _ in 0..2 {
            let out = Command::new(&exe)
                .args(["--child", dir.to_str().expect("utf-8 path"), mode])
                .output()
                .expect("child");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            last = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        let mut it = last.split_whitespace();
        let s: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
        let rss: f64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
        println!("| {label} | {s:.2} | {:.0} |", rss / 1e6);
    }
}
