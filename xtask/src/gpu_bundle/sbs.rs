//! What the bundle's side-by-side stage needs besides the `afinar` binary: the driver script, the shared
//! config, the demo tokenizer and some text (copied from the repo into `sbs/`), and a bitsandbytes wheel
//! reduced to its CUDA 13 library (`sbs/wheels/`), because the GPU machine has no bitsandbytes and no
//! network. The full wheel (≈ 43 MB, every CUDA/ROCm/XPU build) is downloaded once with pip into
//! `target-cuda/wheels/` (git-ignored) and reused; the reduced one is ≈ 3.6 MB.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Files of `sbs/` in the bundle: (name in the bundle, source relative to the repo root).
pub const SBS_FILES: &[(&str, &str)] = &[
    ("sbs.py", "xtask/gpu/sbs.py"),
    ("afinar-sbs.toml", "xtask/gpu/afinar-sbs.toml"),
    // `sbs.py make` copies these into the random model's folder (Afinar reads the tokenizer from there;
    // ids stay < 4096, the model's vocabulary is 256000 as in the 9B).
    ("tokenizer.json", "models/afinar-demo/tokenizer.json"),
    (
        "tokenizer_config.json",
        "models/afinar-demo/tokenizer_config.json",
    ),
    // `sbs.py data` concatenates these records into rows longer than max_seq_len tokens.
    ("texts.jsonl", "datasets/academico-riguroso/train.jsonl"),
];

/// The bitsandbytes the transformers side uses (the version of the published figures).
pub const BNB_VERSION: &str = "0.50.2";
/// The wheel's platform tag on PyPI (pure-Python wheel carrying prebuilt native libraries).
const BNB_PLATFORM: &str = "manylinux_2_24_x86_64";
/// The CUDA build kept: the GPU machine's torch is built for CUDA 13.0 and bitsandbytes picks
/// `libbitsandbytes_cuda{torch.version.cuda without the dot}.so`.
pub const BNB_KEEP_CUDA: &str = "130";
/// Where the reduced wheel lies in the bundle (run.sh installs `sbs/wheels/bitsandbytes-*.whl`).
pub const WHEEL_DIR: &str = "sbs/wheels";

/// Copies [`SBS_FILES`] into `out/sbs/` and the reduced bitsandbytes wheel into `out/sbs/wheels/`.
pub fn write(root: &Path, out: &Path) -> Result<()> {
    let sbs = out.join("sbs");
    std::fs::create_dir_all(&sbs)?;
    for (name, src) in SBS_FILES {
        std::fs::copy(root.join(src), sbs.join(name))
            .with_context(|| format!("copying {src} into the bundle"))?;
    }
    let wheel = cached_wheel(root)?;
    let wheels = out.join(WHEEL_DIR);
    let status = Command::new("python3")
        .arg(root.join("xtask/gpu/sbs.py"))
        .arg("repack-wheel")
        .arg(&wheel)
        .arg(&wheels)
        .args(["--keep-cuda", BNB_KEEP_CUDA])
        .status()
        .context("running python3 xtask/gpu/sbs.py repack-wheel (python3 ≥ 3.11 is needed)")?;
    if !status.success() {
        bail!(
            "reducing {} to the CUDA {BNB_KEEP_CUDA} library failed",
            wheel.display()
        );
    }
    Ok(())
}

/// The full bitsandbytes wheel, from `target-cuda/wheels/` or downloaded there with pip.
fn cached_wheel(root: &Path) -> Result<PathBuf> {
    let cache = root.join("target-cuda/wheels");
    let prefix = format!("bitsandbytes-{BNB_VERSION}-");
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(&cache)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
            })
    };
    if let Some(w) = find() {
        return Ok(w);
    }
    std::fs::create_dir_all(&cache)?;
    println!(
        "gpu-bundle: downloading bitsandbytes {BNB_VERSION} ({BNB_PLATFORM}) into {} (once)",
        cache.display()
    );
    let out = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args([
            "--platform",
            BNB_PLATFORM,
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(&cache)
        .arg(format!("bitsandbytes=={BNB_VERSION}"))
        .output()
        .context("running `python3 -m pip download` (is python3 with pip installed?)")?;
    match find() {
        Some(w) if out.status.success() => Ok(w),
        _ => bail!(
            "could not download bitsandbytes {BNB_VERSION} for {BNB_PLATFORM} from PyPI:\n{}\n\
             The GPU machine has no network, so the bundle must carry this wheel. Retry where pip reaches \
             PyPI, or put bitsandbytes-{BNB_VERSION}-py3-none-{BNB_PLATFORM}.whl into {} by hand, or build \
             without the side by side: `cargo xtask gpu-bundle --no-sbs`.",
            String::from_utf8_lossy(&out.stderr).trim(),
            cache.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    //! What CI can check of the side by side without a GPU, torch or the network: the files exist, the
    //! script compiles, its CPU-only subcommands work, and it reads the same settings from the config
    //! that the trainer's own loader accepts.
    use super::*;
    use crate::kernels_check::repo_root;

    /// python3, or None (the test then says it skipped: the Rust toolchain does not need python).
    fn python() -> Option<Command> {
        let ok = Command::new("python3")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("skipped: no python3");
        }
        ok.then(|| Command::new("python3"))
    }

    fn run_py(args: &[&str]) -> String {
        let mut cmd = python().expect("checked by the caller");
        let out = cmd.args(args).output().expect("python3 runs");
        assert!(
            out.status.success(),
            "python3 {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    #[test]
    fn every_bundled_file_exists_in_the_repo() {
        let root = repo_root();
        for (_, src) in SBS_FILES {
            assert!(root.join(src).is_file(), "{src} is missing");
        }
    }

    #[test]
    fn the_side_by_side_script_compiles() {
        if python().is_none() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let script = repo_root().join("xtask/gpu/sbs.py");
        let cfile = dir.path().join("sbs.pyc");
        run_py(&[
            "-c",
            "import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True)",
            script.to_str().unwrap(),
            cfile.to_str().unwrap(),
        ]);
    }

    /// The trainer's loader accepts the bundle's config with the overrides sbs.py passes, the result
    /// validates, and holds the settings the issue fixes for the comparison.
    #[test]
    fn afinar_config_loads_with_the_trainer_loader() {
        use afinar_trainer::config::{Device, Dtype, Quantization};
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        for f in ["train.jsonl", "eval.jsonl"] {
            std::fs::write(dir.path().join(f), "{\"text\": \"x\"}\n").unwrap();
        }
        let set = |k: &str, v: &Path| format!("{k}={}", v.display());
        let cfg = afinar_trainer::Config::load(
            &repo_root().join("xtask/gpu/afinar-sbs.toml"),
            &[
                set("model.path", &model),
                set("data.train", &dir.path().join("train.jsonl")),
                set("data.eval", &dir.path().join("eval.jsonl")),
                "train.max_steps=6".into(),
            ],
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.model.device, Device::Cuda);
        assert_eq!(cfg.model.dtype, Dtype::Bf16);
        assert_eq!(cfg.model.quantization, Quantization::Nf4);
        assert!(cfg.model.double_quant);
        assert_eq!(
            (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout),
            (16, 32.0, 0.0)
        );
        assert_eq!(cfg.lora.targets.len(), 7);
        assert_eq!((cfg.train.micro_batch_size, cfg.train.grad_accum), (2, 1));
        assert_eq!(cfg.data.max_seq_len, 2048);
        assert!(cfg.train.gradient_checkpointing && cfg.train.paged_optimizer);
    }

    /// sbs.py's transformers side reads its settings from the same file: they must equal what the
    /// trainer read (a key renamed on one side would silently compare different runs).
    #[test]
    fn both_sides_read_the_same_settings() {
        if python().is_none() {
            return;
        }
        let root = repo_root();
        let toml = root.join("xtask/gpu/afinar-sbs.toml");
        let out = run_py(&[
            "-c",
            "import json, sys; sys.path.insert(0, sys.argv[1]); import sbs; print(json.dumps(sbs.load_settings(sys.argv[2])))",
            root.join("xtask/gpu").to_str().unwrap(),
            toml.to_str().unwrap(),
        ]);
        let py: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let cfg = afinar_trainer::Config::load(&toml, &[]).unwrap();
        assert_eq!(py["r"], cfg.lora.r);
        assert_eq!(py["alpha"].as_f64().unwrap(), f64::from(cfg.lora.alpha));
        assert_eq!(py["dropout"].as_f64().unwrap(), f64::from(cfg.lora.dropout));
        assert_eq!(
            py["targets"].as_array().unwrap().len(),
            cfg.lora.targets.len()
        );
        assert_eq!(py["batch"], cfg.train.micro_batch_size);
        assert_eq!(py["seq"], cfg.data.max_seq_len);
        assert_eq!(py["lr"].as_f64().unwrap(), cfg.train.lr);
        assert_eq!(
            py["max_grad_norm"].as_f64().unwrap(),
            cfg.train.max_grad_norm
        );
        assert_eq!(py["checkpointing"], cfg.train.gradient_checkpointing);
        assert_eq!(py["paged"], cfg.train.paged_optimizer);
        assert_eq!(py["double_quant"], cfg.model.double_quant);
        assert_eq!(py["nf4"], true);
    }

    /// The CPU-only subcommands: long rows from the bundled texts, the report's ratio line, and the
    /// wheel reduction on a small stand-in wheel.
    #[test]
    fn cpu_subcommands_work() {
        if python().is_none() {
            return;
        }
        let root = repo_root();
        let script = root.join("xtask/gpu/sbs.py");
        let s = script.to_str().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let texts = root.join("datasets/academico-riguroso/train.jsonl");
        run_py(&[
            s,
            "data",
            texts.to_str().unwrap(),
            d.join("data").to_str().unwrap(),
            "--rows",
            "3",
        ]);
        let rows = std::fs::read_to_string(d.join("data/train.jsonl")).unwrap();
        assert_eq!(rows.lines().count(), 3);
        for l in rows.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v["text"].as_str().unwrap().len() >= 19_000);
        }

        std::fs::write(
            d.join("hf.json"),
            r#"{"side": "t", "kind": "hf", "tok_s": 2000.0, "nvsmi_peak_mib": 30000}"#,
        )
        .unwrap();
        std::fs::write(
            d.join("af.json"),
            r#"{"side": "a", "kind": "afinar", "tok_s": 1000.0, "nvsmi_peak_mib": 9000}"#,
        )
        .unwrap();
        let report = run_py(&[
            s,
            "report",
            d.join("hf.json").to_str().unwrap(),
            d.join("af.json").to_str().unwrap(),
            "--profile",
            d.join("none.json").to_str().unwrap(),
        ]);
        assert!(
            report.contains("**0.50× the speed**, 0.30× the peak GPU memory"),
            "{report}"
        );
        assert!(report.contains("no profile.json"), "{report}");

        let whl = d.join("bitsandbytes-0.0.1-py3-none-any.whl");
        run_py(&[
            "-c",
            "import sys, zipfile\n\
             z = zipfile.ZipFile(sys.argv[1], 'w')\n\
             libs = ['cpu', 'cuda118', 'cuda130', 'rocm64']\n\
             for l in libs: z.writestr(f'bitsandbytes/libbitsandbytes_{l}.so', 'x')\n\
             z.writestr('bitsandbytes/__init__.py', '')\n\
             z.writestr('bitsandbytes-0.0.1.dist-info/RECORD', ''.join(f'bitsandbytes/libbitsandbytes_{l}.so,sha256=x,1\\n' for l in libs))\n\
             z.close()",
            whl.to_str().unwrap(),
        ]);
        run_py(&[
            s,
            "repack-wheel",
            whl.to_str().unwrap(),
            d.join("out").to_str().unwrap(),
            "--keep-cuda",
            BNB_KEEP_CUDA,
        ]);
        let listing = run_py(&[
            "-c",
            "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); print(sorted(z.namelist())); print(z.read('bitsandbytes-0.0.1.dist-info/RECORD').decode())",
            d.join("out/bitsandbytes-0.0.1-py3-none-any.whl").to_str().unwrap(),
        ]);
        assert!(
            listing.contains("libbitsandbytes_cuda130.so")
                && listing.contains("libbitsandbytes_cpu.so"),
            "{listing}"
        );
        assert!(
            !listing.contains("cuda118") && !listing.contains("rocm64"),
            "{listing}"
        );
    }
}
