//! `cargo xtask gpu-bundle`: builds here, with the `cuda` feature and in release mode, every test binary
//! of the crates that have a `cuda` feature plus the GPU bench (`crates/kernels/examples/gpu_bench.rs`),
//! strips them into `gpu-bundle/bin/`, and writes `gpu-bundle/run.sh`: one script for a GPU machine
//! that has the CUDA 13.0 driver and NVRTC but no Rust toolchain and no network. It runs the CUDA tests
//! and the kernel benchmarks and writes everything under `$OUT` (or `./results`): `summary.md` (tests
//! passed/failed per binary, the bench table, device and library info) plus one log per binary.
//!
//! The build uses its own target directory (`target-cuda/`) so it does not invalidate the shared one.
//! The bundle must stay ≤ 60 MiB; the command fails otherwise.
//!
//! Options: `--out DIR` (default gpu-bundle), `--all-tests` (bundle's run.sh then runs every test, not
//! only those whose name contains `cuda`).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MAX_BYTES: u64 = 60 << 20;

/// Workspace packages whose Cargo.toml declares a `cuda` feature.
fn cuda_packages(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for dir in [
        "crates/kernels",
        "crates/gemma",
        "crates/trainer",
        "crates/data",
    ] {
        let toml = std::fs::read_to_string(root.join(dir).join("Cargo.toml"))
            .with_context(|| format!("reading {dir}/Cargo.toml"))?;
        let mut in_features = false;
        let mut has = false;
        let mut name = None;
        for line in toml.lines() {
            let t = line.trim();
            if t.starts_with('[') {
                in_features = t == "[features]";
                continue;
            }
            if name.is_none() && t.starts_with("name") {
                name = t.split('"').nth(1).map(str::to_string);
            }
            if in_features && (t.starts_with("cuda =") || t.starts_with("cuda=")) {
                has = true;
            }
        }
        if has {
            out.push(name.with_context(|| format!("{dir}/Cargo.toml has no package name"))?);
        }
    }
    if out.is_empty() {
        bail!("no workspace crate declares a `cuda` feature");
    }
    Ok(out)
}

/// Runs cargo with `--message-format=json` and returns the executables of the compiled artifacts
/// (test binaries when `tests`, otherwise examples/bins).
fn cargo_executables(root: &Path, args: &[String], tests: bool) -> Result<Vec<(String, PathBuf)>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(&cargo)
        .current_dir(root)
        .env("CARGO_TARGET_DIR", root.join("target-cuda"))
        .args(args)
        .arg("--message-format=json")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cargo} {}", args.join(" ")))?;
    if !output.status.success() {
        bail!("`cargo {}` failed", args.join(" "));
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = v["executable"].as_str() else {
            continue;
        };
        if v["profile"]["test"].as_bool() != Some(tests) {
            continue;
        }
        let target = v["target"]["name"].as_str().unwrap_or("bin");
        let pkg = v["package_id"].as_str().unwrap_or("").to_string();
        let pkg = package_name(&pkg);
        exes.push((format!("{pkg}-{target}"), PathBuf::from(exe)));
    }
    Ok(exes)
}

/// The crate name out of a cargo package id (`path+file:///…/crates/kernels#afinar-kernels@0.1.0`
/// or the older `afinar-kernels 0.1.0 (path+file://…)`).
fn package_name(id: &str) -> String {
    if let Some(frag) = id.rsplit('#').next().filter(|_| id.contains('#')) {
        return frag.split('@').next().unwrap_or(frag).to_string();
    }
    id.split_whitespace().next().unwrap_or("pkg").to_string()
}

pub fn run(args: &[String]) -> Result<()> {
    let root = crate::kernels_check::repo_root();
    let mut out_dir = root.join("gpu-bundle");
    let mut all_tests = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out_dir = PathBuf::from(it.next().context("--out needs a directory")?),
            "--all-tests" => all_tests = true,
            other => bail!("unknown argument `{other}` (expected --out DIR, --all-tests)"),
        }
    }
    let pkgs = cuda_packages(&root)?;
    let features: Vec<String> = pkgs.iter().map(|p| format!("{p}/cuda")).collect();
    println!(
        "gpu-bundle: building CUDA tests of {} in release mode (target-cuda/)",
        pkgs.join(", ")
    );
    let mut test_args: Vec<String> = vec!["test".into(), "--release".into(), "--no-run".into()];
    for p in &pkgs {
        test_args.push("-p".into());
        test_args.push(p.clone());
    }
    test_args.push("--features".into());
    test_args.push(features.join(","));
    let tests = cargo_executables(&root, &test_args, true)?;
    let bench_args: Vec<String> = [
        "build",
        "--release",
        "-p",
        "afinar-kernels",
        "--features",
        "cuda",
        "--example",
        "gpu_bench",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut benches = cargo_executables(&root, &bench_args, false)?;
    // The `afinar` CLI with the CUDA backend, for run.sh's end-to-end train steps (CPU vs GPU loss).
    if pkgs.iter().any(|p| p == "afinar-trainer") {
        let cli_args: Vec<String> = [
            "build",
            "--release",
            "-p",
            "afinar-trainer",
            "--features",
            "cuda",
            "--bin",
            "afinar",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (_, exe) in cargo_executables(&root, &cli_args, false)? {
            if exe.file_name().is_some_and(|n| n == "afinar") {
                benches.push(("afinar".to_string(), exe));
            }
        }
    }
    if tests.is_empty() || benches.is_empty() {
        bail!("cargo produced no test binaries or no gpu_bench executable");
    }

    if out_dir.exists() {
        std::fs::remove_dir_all(&out_dir)
            .with_context(|| format!("removing the old {}", out_dir.display()))?;
    }
    let bin = out_dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    let mut names = Vec::new();
    let mut left_out = Vec::new();
    for (name, exe) in tests.iter().chain(benches.iter()) {
        let is_test = !name.ends_with("-gpu_bench") && name != "afinar";
        // A test binary with no test the bundle's filter selects would only cost bundle size.
        if is_test && !all_tests && count_tests(exe, "cuda")? == 0 {
            left_out.push(name.clone());
            continue;
        }
        let dst = bin.join(name);
        std::fs::copy(exe, &dst).with_context(|| format!("copying {}", exe.display()))?;
        // Debug info is most of a release test binary (profile.release has debug = 1); the bundle
        // needs none of it.
        match Command::new("strip").arg(&dst).status() {
            Ok(s) if s.success() => {}
            _ => eprintln!(
                "gpu-bundle: warning: could not strip {} (is binutils installed?)",
                dst.display()
            ),
        }
        names.push(name.clone());
    }
    if !left_out.is_empty() {
        println!(
            "gpu-bundle: left out (no test matches `cuda`): {}",
            left_out.join(", ")
        );
    }
    let test_names: Vec<&String> = names
        .iter()
        .filter(|n| !n.ends_with("-gpu_bench") && n.as_str() != "afinar")
        .collect();
    let commit = Command::new("git")
        .current_dir(&root)
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let dirty = Command::new("git")
        .current_dir(&root)
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    std::fs::write(
        out_dir.join("BUILD_INFO"),
        format!(
            "commit={commit}{}\nbuilt_root={}\ntests={}\nfilter={}\n",
            if dirty {
                " (with uncommitted changes)"
            } else {
                ""
            },
            root.display(),
            test_names
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            if all_tests { "" } else { "cuda" }
        ),
    )?;
    let script = run_sh(
        &test_names.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        all_tests,
    );
    let script_path = out_dir.join("run.sh");
    std::fs::write(&script_path, script)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script_path, std::fs::Permissions::from_mode(0o755))?;
    }
    let total: u64 = std::fs::read_dir(&bin)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "gpu-bundle: {} binaries, {:.1} MiB in {}",
        names.len(),
        total as f64 / (1 << 20) as f64,
        out_dir.display()
    );
    if total > MAX_BYTES {
        bail!(
            "the bundle is {:.1} MiB, over the 60 MiB limit",
            total as f64 / (1 << 20) as f64
        );
    }
    println!(
        "gpu-bundle: on the GPU machine run `{}/run.sh` (results under $OUT or ./results)",
        out_dir.display()
    );
    Ok(())
}

/// How many tests of a libtest binary match `filter` (`--list` prints one `name: test` line each).
fn count_tests(exe: &Path, filter: &str) -> Result<usize> {
    let out = Command::new(exe)
        .args([filter, "--list"])
        .output()
        .with_context(|| format!("listing the tests of {}", exe.display()))?;
    if !out.status.success() {
        bail!("`{} {filter} --list` failed", exe.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.ends_with(": test"))
        .count())
}

/// The script run on the GPU machine. Kept dependency-free (bash, coreutils, grep, awk).
fn run_sh(tests: &[&str], all_tests: bool) -> String {
    let filter = if all_tests { "" } else { "cuda" };
    format!(
        r####"#!/usr/bin/env bash
# Afinar GPU bundle: runs every CUDA test and the kernel benchmarks; results under $OUT (or ./results).
# Needs: an NVIDIA GPU (sm_80+), the CUDA 13.0 driver, NVRTC 13.0 (libnvrtc.so.13 + libnvrtc-builtins);
# cuBLAS 13 (libcublas.so.13, libcublasLt.so.13) is used when found, otherwise the fallback GEMM.
# No Rust toolchain and no network needed. Generated by `cargo xtask gpu-bundle`.
set -uo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
OUT="${{OUT:-$PWD/results}}"
mkdir -p "$OUT/logs"
export AFINAR_KERNEL_CACHE="${{AFINAR_KERNEL_CACHE:-$OUT/kernel-cache}}"
FILTER="${{AFINAR_TEST_FILTER:-{filter}}}"
QUICK="${{AFINAR_BENCH_QUICK:-0}}"

# Find NVRTC and cuBLAS if they are not already on the loader path.
export LD_LIBRARY_PATH="${{LD_LIBRARY_PATH:-}}"
add_lib_dir() {{ case ":$LD_LIBRARY_PATH:" in *":$1:"*) ;; *) export LD_LIBRARY_PATH="$1${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}";; esac; }}
for lib in libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13; do
  if ! ldconfig -p 2>/dev/null | grep -q "$lib"; then
    for d in ${{LD_LIBRARY_PATH//:/ }} "$HERE/../.cuda/nvidia/cu13/lib" /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64 \
             /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu \
             $(ls -d /usr/local/lib/python3*/dist-packages/nvidia/cu13/lib /usr/lib/python3*/dist-packages/nvidia/cu13/lib \
                     /usr/local/lib/python3*/site-packages/nvidia/cu13/lib /opt/conda/lib/python3*/site-packages/nvidia/cu13/lib \
                     /usr/local/lib/python3*/dist-packages/nvidia/*/lib 2>/dev/null); do
      if [ -e "$d/$lib" ]; then add_lib_dir "$d"; break; fi
    done
  fi
done

# Tests that read fixtures use paths fixed at build time (built_root in BUILD_INFO). When the bundle sits
# in a copy of the repo at another path, point built_root at that copy (best effort).
BUILT_ROOT="$(sed -n 's/^built_root=//p' "$HERE/BUILD_INFO")"
ROOT_NOTE="built_root $BUILT_ROOT exists"
if [ -n "$BUILT_ROOT" ] && [ ! -e "$BUILT_ROOT" ] && [ -d "$HERE/../crates" ]; then
  if mkdir -p "$(dirname "$BUILT_ROOT")" 2>/dev/null && ln -s "$(cd "$HERE/.." && pwd)" "$BUILT_ROOT" 2>/dev/null; then
    ROOT_NOTE="linked $BUILT_ROOT -> $(cd "$HERE/.." && pwd)"
  else
    ROOT_NOTE="built_root $BUILT_ROOT missing and could not be linked: fixture-reading tests may fail"
  fi
elif [ ! -e "$BUILT_ROOT" ]; then
  ROOT_NOTE="built_root $BUILT_ROOT missing: fixture-reading tests may fail"
fi

{{
  echo "# Afinar GPU run"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- host: $(hostname)"
  sed 's/^/- build: /' "$HERE/BUILD_INFO"
  echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi not available')"
  echo "- LD_LIBRARY_PATH: $LD_LIBRARY_PATH"
  echo "- source tree: $ROOT_NOTE"
  for lib in libcuda.so.1 libnvrtc.so.13 libcublas.so.13; do
    echo "- $lib: $( (ldconfig -p 2>/dev/null | grep -m1 "$lib" | awk '{{print $NF}}') || true ) $(for d in ${{LD_LIBRARY_PATH//:/ }}; do [ -e "$d/$lib" ] && echo "$d/$lib"; done | head -1)"
  done
  echo
  echo "## Tests (filter: '${{FILTER}}')"
  echo
  echo "| binary | passed | failed | skipped (no driver) | exit |"
  echo "|---|---:|---:|---:|---:|"
}} > "$OUT/summary.md"

TOTAL_FAIL=0
for t in {tests}; do
  log="$OUT/logs/$t.log"
  # --nocapture: the "skipped: no CUDA driver" lines of passing tests must reach the log.
  if [ -n "$FILTER" ]; then "$HERE/bin/$t" "$FILTER" --nocapture > "$log" 2>&1; else "$HERE/bin/$t" --nocapture > "$log" 2>&1; fi
  rc=$?
  passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{{s+=$1}} END {{print s+0}}')
  failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{{s+=$1}} END {{print s+0}}')
  skipped=$(grep -c 'skipped: no CUDA driver' "$log")
  # On the GPU machine a skip means the driver was not found: count it as a failure.
  if [ "$rc" -ne 0 ] || [ "$skipped" -ne 0 ]; then TOTAL_FAIL=$((TOTAL_FAIL + 1)); fi
  echo "| $t | $passed | $failed | $skipped | $rc |" >> "$OUT/summary.md"
  echo "$t: passed=$passed failed=$failed skipped=$skipped rc=$rc"
done
if [ "$TOTAL_FAIL" -ne 0 ]; then
  {{ echo; echo "### Failures"; echo; for f in "$OUT"/logs/*.log; do
      grep -E "^test .* FAILED|panicked at|^---- " "$f" | head -40 | sed "s|^|    $(basename "$f" .log): |"; done; }} >> "$OUT/summary.md"
fi

echo >> "$OUT/summary.md"
echo "## Benchmarks" >> "$OUT/summary.md"
echo >> "$OUT/summary.md"
BENCH_ARGS=""
[ "$QUICK" = "1" ] && BENCH_ARGS="--quick"
"$HERE/bin/"*-gpu_bench $BENCH_ARGS > "$OUT/logs/gpu_bench.log" 2>&1
brc=$?
cat "$OUT/logs/gpu_bench.log" >> "$OUT/summary.md"
echo "gpu_bench exit: $brc" >> "$OUT/summary.md"
# End-to-end: two optimizer steps of the shipped demo config on the CPU and on the GPU, when the CLI
# and a repo copy (configs/, models/, datasets/) are next to the bundle. Compare the losses by eye.
REPO="$(cd "$HERE/.." && pwd)"
if [ -x "$HERE/bin/afinar" ] && [ -f "$REPO/configs/default.toml" ]; then
  {{ echo; echo "## End-to-end train steps (configs/default.toml, train.max_steps=2)"; echo; }} >> "$OUT/summary.md"
  for dev in cpu cuda; do
    (cd "$REPO" && timeout 600 "$HERE/bin/afinar" train --config configs/default.toml --set model.device=$dev \
        --set train.max_steps=2 --output "$OUT/runs" --run-name "e2e-$dev" --overwrite --quiet --json) \
        > "$OUT/logs/e2e-$dev.log" 2>&1
    echo "- $dev: exit $?; $(tail -c 600 "$OUT/logs/e2e-$dev.log" | tr '\n' ' ')" >> "$OUT/summary.md"
  done
fi
cat "$OUT/summary.md"
if [ "$TOTAL_FAIL" -ne 0 ] || [ "$brc" -ne 0 ]; then exit 1; fi
"####,
        tests = tests.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_from_both_id_formats() {
        assert_eq!(
            package_name("path+file:///w/crates/kernels#afinar-kernels@0.1.0"),
            "afinar-kernels"
        );
        assert_eq!(
            package_name("afinar-kernels 0.1.0 (path+file:///w/crates/kernels)"),
            "afinar-kernels"
        );
    }

    #[test]
    fn kernels_crate_has_the_cuda_feature() {
        let pkgs = cuda_packages(&crate::kernels_check::repo_root()).unwrap();
        assert!(pkgs.contains(&"afinar-kernels".to_string()), "{pkgs:?}");
    }

    #[test]
    fn run_sh_lists_every_binary_and_writes_under_out() {
        let s = run_sh(
            &["afinar-kernels-ops_linear", "afinar-kernels-afinar_kernels"],
            false,
        );
        assert!(s.contains("for t in afinar-kernels-ops_linear afinar-kernels-afinar_kernels; do"));
        assert!(s.contains("OUT=\"${OUT:-$PWD/results}\""));
        assert!(s.contains("AFINAR_TEST_FILTER:-cuda"));
        assert!(run_sh(&["x"], true).contains("AFINAR_TEST_FILTER:-}"));
    }
}
