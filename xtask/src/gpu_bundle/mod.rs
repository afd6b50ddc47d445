//! `cargo xtask gpu-bundle`: builds here, with the `cuda` feature and in release mode, every test binary
//! of the crates that have a `cuda` feature, the GPU bench (`crates/kernels/examples/gpu_bench.rs`) and
//! the `afinar` CLI, strips them into `gpu-bundle/bin/` and packs that into `bin.tar.xz`
//! ([`BIN_ARCHIVE`]), adds what the side by side needs (`gpu-bundle/sbs/`, see [`sbs`]) and writes `gpu-bundle/run.sh` ([`run_sh`]): one script for a GPU
//! machine that has the CUDA 13.0 driver, NVRTC and python3 with torch + transformers + peft, but no Rust
//! toolchain and no network. Its stages: the CUDA tests, the kernel benchmarks, two end-to-end train
//! steps, and Afinar against transformers + peft + bitsandbytes QLoRA on a random Gemma-2 with the 9B
//! shape. Results: `$OUT/summary.md` and `$OUT/afinar-gpu-results.tar.gz` (every log and JSON result).
//!
//! The build uses its own target directory (`target-cuda/`) so it does not invalidate the shared one.
//! What travels to the GPU machine (the repo's tracked files plus the carried bundle) must stay ≤ 64 MiB;
//! the command fails when the bundle would break that.
//!
//! Options: `--out DIR` (default gpu-bundle), `--all-tests` (bundle's run.sh then runs every test, not
//! only those whose name contains `cuda`), `--no-sbs` (no side by side: no wheel download).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod run_sh;
mod sbs;

/// What may travel to the GPU machine in one call: the working tree's tracked files plus the carried
/// bundle.
const TRAVEL_LIMIT: u64 = 64 << 20;

/// The stripped binaries travel as this xz archive of `bin/` (≈ 6 MiB instead of ≈ 54 MiB: the three
/// trainer-linked binaries share most of their code, which xz -9's 64 MiB window finds); run.sh unpacks it.
pub const BIN_ARCHIVE: &str = "bin.tar.xz";

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

/// `<package>/nccl` for every workspace package whose Cargo.toml declares an `nccl` feature (the NCCL
/// communicator's test in afinar-kernels, the data-parallel path of the `afinar` CLI).
fn nccl_features(root: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for dir in ["crates/kernels", "crates/trainer"] {
        let toml = std::fs::read_to_string(root.join(dir).join("Cargo.toml"))
            .with_context(|| format!("reading {dir}/Cargo.toml"))?;
        let name = toml
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("name")
                    .and_then(|r| r.split('"').nth(1))
            })
            .with_context(|| format!("{dir}/Cargo.toml has no package name"))?;
        if toml
            .lines()
            .any(|l| l.trim().starts_with("nccl =") || l.trim().starts_with("nccl="))
        {
            out.push(format!("{name}/nccl"));
        }
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
    let mut with_sbs = true;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out_dir = PathBuf::from(it.next().context("--out needs a directory")?),
            "--all-tests" => all_tests = true,
            "--no-sbs" => with_sbs = false,
            other => {
                bail!("unknown argument `{other}` (expected --out DIR, --all-tests, --no-sbs)")
            }
        }
    }
    let pkgs = cuda_packages(&root)?;
    let mut features: Vec<String> = pkgs.iter().map(|p| format!("{p}/cuda")).collect();
    let nccl = nccl_features(&root)?;
    features.extend(nccl.iter().cloned());
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
    // The `afinar` CLI with the CUDA backend, for run.sh's end-to-end train steps (CPU vs GPU loss),
    // and with NCCL when the trainer has it (run.sh's `dist` stage: the NCCL path at world size 1).
    if pkgs.iter().any(|p| p == "afinar-trainer") {
        let cli_feature = if nccl.iter().any(|f| f == "afinar-trainer/nccl") {
            "nccl"
        } else {
            "cuda"
        };
        let cli_args: Vec<String> = [
            "build",
            "--release",
            "-p",
            "afinar-trainer",
            "--features",
            cli_feature,
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
        let is_test = !name.ends_with(run_sh::BENCH_GLOB_SUFFIX) && name != "afinar";
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
        .filter(|n| !n.ends_with(run_sh::BENCH_GLOB_SUFFIX) && n.as_str() != "afinar")
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
    if with_sbs {
        sbs::write(&root, &out_dir)?;
    }
    let script = run_sh::render(
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
    let bins = dir_bytes(&bin)?;
    let status = Command::new("tar")
        .current_dir(&out_dir)
        .env("XZ_OPT", "-9")
        .args(["-cJf", BIN_ARCHIVE, "bin"])
        .status()
        .context("running tar -cJf (tar and xz are needed)")?;
    if !status.success() {
        bail!(
            "packing {} into {BIN_ARCHIVE} failed (is xz installed?)",
            bin.display()
        );
    }
    std::fs::remove_dir_all(&bin)?;
    let total = dir_bytes(&out_dir)?;
    let tracked = tracked_bytes(&root)?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "gpu-bundle: {} binaries ({:.1} MiB stripped, {:.1} MiB in {BIN_ARCHIVE}), bundle {:.1} MiB in \
         {}; with the repo's tracked files ({:.1} MiB) {:.1} of the {:.0} MiB that may travel",
        names.len(),
        mib(bins),
        mib(std::fs::metadata(out_dir.join(BIN_ARCHIVE))?.len()),
        mib(total),
        out_dir.display(),
        mib(tracked),
        mib(total + tracked),
        mib(TRAVEL_LIMIT)
    );
    if total + tracked > TRAVEL_LIMIT {
        bail!(
            "the bundle ({:.1} MiB) and the repo's tracked files ({:.1} MiB) exceed the {:.0} MiB \
             that travel to the GPU machine",
            mib(total),
            mib(tracked),
            mib(TRAVEL_LIMIT)
        );
    }
    println!(
        "gpu-bundle: on the GPU machine run `{}/run.sh` (results under $OUT or ./results; \
         docs/gpu-validation.md has the device command)",
        out_dir.display()
    );
    Ok(())
}

/// Bytes of the files under `dir`, recursively.
fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let m = e.metadata()?;
        total += if m.is_dir() {
            dir_bytes(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(total)
}

/// Bytes of the files git tracks in the repo (they travel with every device call).
fn tracked_bytes(root: &Path) -> Result<u64> {
    let out = Command::new("git")
        .current_dir(root)
        .args(["ls-files", "-z"])
        .output()
        .context("running git ls-files")?;
    Ok(out
        .stdout
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .filter_map(|p| std::fs::metadata(root.join(String::from_utf8_lossy(p).as_ref())).ok())
        .map(|m| m.len())
        .sum())
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
    fn kernels_and_trainer_have_the_nccl_feature() {
        let f = nccl_features(&crate::kernels_check::repo_root()).unwrap();
        assert_eq!(f, vec!["afinar-kernels/nccl", "afinar-trainer/nccl"]);
    }

    #[test]
    fn kernels_crate_has_the_cuda_feature() {
        let pkgs = cuda_packages(&crate::kernels_check::repo_root()).unwrap();
        assert!(pkgs.contains(&"afinar-kernels".to_string()), "{pkgs:?}");
    }
}
