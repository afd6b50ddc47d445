//! `cargo xtask kernels-check`: compiles every `kernels/*.cu` with NVRTC for sm_75, sm_80 and sm_90 (exactly the
//! text the CUDA backend compiles at run time: `kernels/common.cuh` prepended to the file), with
//! `--ptxas-options=-v`, and prints one row per kernel and arch: registers, shared memory, stack frame,
//! spill stores/loads. It fails on any compile error, and on spills in kernels marked hot (a line
//! `// afinar:hot` right before the kernel's `__global__` line).
//!
//! NVRTC is found without any environment setup: the repo's pip folder `.cuda/nvidia/cu13/lib` (made by
//! the pip line printed below), then `$AFINAR_NVRTC_DIR`, then each `LD_LIBRARY_PATH` entry. It is
//! dlopened by absolute path, libnvrtc-builtins first (NVRTC itself dlopens that by SONAME at compile
//! time, which fails unless it is already loaded or on the loader path).
//!
//! Then it runs the kernels themselves on the CPU: `kernels/emu/check_<family>.cpp` (one per kernel
//! family, each including its family's real .cu files) run through a small CUDA emulator
//! (`kernels/emu/cuda_emu.h`: fibers per thread, barriers, warp shuffles, mma.sync fragment emulation)
//! and compare them with double-precision loops; `kernels/emu/main.cpp` runs every family. That needs
//! g++ with C++20 (`$CXX` to pick another compiler); without one it says so and skips that part.
//!
//! sm_75 (Turing: T4, the fp16-only GPUs) has no bf16 mma.sync: there the tensor-core helpers compile to
//! a trap (`#if __CUDA_ARCH__ >= 800`) and the backend's launch code must not select those kernels; the
//! row is checked so that every other kernel of those files keeps compiling for it.
//!
//! Options: `--arch sm_XX` (repeatable) replaces the default set; `--quiet` prints only failures;
//! `--no-emu` skips the emulated run; `--emu-only` runs only the emulated checks (no NVRTC needed).

use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::ffi::CString;
use std::path::{Path, PathBuf};

const PIP_LINE: &str =
    "python3 -m pip install --target .cuda nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96";

/// One kernel's resource usage for one arch, parsed from the ptxas log.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Usage {
    pub kernel: String,
    pub arch: String,
    pub registers: u32,
    pub smem: u32,
    pub stack: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the repo root")
        .to_path_buf()
}

/// Preloads NVRTC from the first directory that has it; returns that directory.
fn load_nvrtc(root: &Path) -> Result<PathBuf> {
    let mut dirs: Vec<PathBuf> = vec![root.join(".cuda/nvidia/cu13/lib")];
    if let Ok(d) = std::env::var("AFINAR_NVRTC_DIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(p) = std::env::var("LD_LIBRARY_PATH") {
        dirs.extend(p.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    for dir in &dirs {
        let lib = dir.join("libnvrtc.so.13");
        if !lib.exists() {
            continue;
        }
        let builtins = dir.join("libnvrtc-builtins.so.13.0");
        // SAFETY: loading NVRTC's shared libraries runs their initializers, which have no preconditions;
        // the handles are leaked so the libraries stay loaded for the life of the process (cudarc
        // later dlopens "libnvrtc.so.13" by SONAME and gets this same copy).
        unsafe {
            if builtins.exists() {
                std::mem::forget(
                    libloading::Library::new(&builtins)
                        .with_context(|| format!("loading {}", builtins.display()))?,
                );
            }
            std::mem::forget(
                libloading::Library::new(&lib)
                    .with_context(|| format!("loading {}", lib.display()))?,
            );
        }
        return Ok(dir.clone());
    }
    bail!(
        "NVRTC 13.0 not found (looked in {}).\nInstall it into the repo (no GPU needed):\n    {PIP_LINE}\nor set AFINAR_NVRTC_DIR / LD_LIBRARY_PATH to a directory with libnvrtc.so.13",
        dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    )
}

/// The exact program text the backend compiles: the shared header, then the kernel file.
pub fn program_text(common: &str, file_name: &str, src: &str) -> String {
    format!("{common}\n#line 1 \"{file_name}\"\n{src}")
}

/// Kernel names marked hot: a `// afinar:hot` line right before the kernel's `__global__` line (comment
/// lines in between are fine), or `// afinar:hot NAME` naming the kernel explicitly (for kernels that a
/// macro defines).
pub fn hot_kernels(src: &str) -> BTreeSet<String> {
    let mut hot = BTreeSet::new();
    let mut armed = false;
    for line in src.lines() {
        if let Some(rest) = line.split("afinar:hot").nth(1) {
            match rest.split_whitespace().next() {
                Some(name) => {
                    hot.insert(name.to_string());
                }
                None => armed = true,
            }
            continue;
        }
        if armed && line.contains("__global__") {
            if let Some(name) = kernel_name(line) {
                hot.insert(name);
            }
            armed = false;
        } else if armed && !line.trim().is_empty() && !line.trim_start().starts_with("//") {
            armed = false;
        }
    }
    hot
}

/// The identifier right before the first '(' on a `__global__` line.
fn kernel_name(line: &str) -> Option<String> {
    // Drop `__launch_bounds__(…)` so its parenthesis is not taken for the parameter list.
    let mut line = line.to_string();
    while let Some(i) = line.find("__launch_bounds__(") {
        let close = line[i..].find(')')? + i;
        line.replace_range(i..=close, "");
    }
    let before = &line[..line.find('(')?];
    let name: String = before
        .chars()
        .rev()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    let name: String = name.chars().rev().collect();
    (!name.is_empty()).then_some(name)
}

fn num_before(s: &str, suffix: &str) -> Option<u32> {
    let i = s.find(suffix)?;
    s[..i].split_whitespace().last()?.parse().ok()
}

/// Parses NVRTC's `--ptxas-options=-v` log into one `Usage` per entry function.
pub fn parse_ptxas_log(log: &str, arch: &str) -> Vec<Usage> {
    let mut out: Vec<Usage> = Vec::new();
    let mut current: Option<usize> = None;
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(Usage {
                kernel: name,
                arch: arch.to_string(),
                ..Default::default()
            });
            current = Some(out.len() - 1);
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            let name = rest.trim();
            current = out.iter().position(|u| u.kernel == name).or(current);
        } else if let Some(i) = current {
            let u = &mut out[i];
            if line.contains("bytes stack frame") {
                u.stack = num_before(line, "bytes stack frame").unwrap_or(0);
                u.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
                u.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
            }
            if line.contains("Used") && line.contains("registers") {
                u.registers = num_before(line, "registers").unwrap_or(0);
                u.smem = num_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

fn compile(text: &str, name: &str, arch: &str, include: Option<&Path>) -> Result<(String, usize)> {
    use cudarc::nvrtc::{result, sys};
    let src = CString::new(text).context("kernel source contains a NUL byte")?;
    let cname = CString::new(name).context("file name contains a NUL byte")?;
    let prog = result::create_program(&src, Some(&cname))
        .map_err(|e| anyhow::anyhow!("{name}: nvrtcCreateProgram: {e:?}"))?;
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--ptxas-options=-v".to_string(),
        "-std=c++17".to_string(),
    ];
    if let Some(inc) = include {
        opts.push(format!("--include-path={}", inc.display()));
    }
    // SAFETY: `prog` was just created and is destroyed below; the options are valid C strings.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    // SAFETY: `prog` is a live program handle.
    let log = unsafe { result::get_program_log(prog) }
        .map(|l| {
            let bytes: Vec<u8> = l
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .unwrap_or_default();
    let mut cubin_len = 0usize;
    if compiled.is_ok() {
        // SAFETY: the program compiled for a real sm_ arch, so a CUBIN exists; nvrtcGetCUBINSize writes one usize.
        unsafe { sys::nvrtcGetCUBINSize(prog, &mut cubin_len) };
    }
    // SAFETY: destroying the handle we own; it is not used afterwards.
    let _ = unsafe { result::destroy_program(prog) };
    match compiled {
        Ok(()) if cubin_len > 0 => Ok((log, cubin_len)),
        Ok(()) => bail!("{name} ({arch}): NVRTC produced no CUBIN\n{log}"),
        Err(e) => bail!("{name} ({arch}): compile error {e:?}\n{log}"),
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let mut archs: Vec<String> = Vec::new();
    let mut quiet = false;
    let (mut emu, mut emu_only) = (true, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--arch" => archs.push(
                it.next()
                    .context("--arch needs a value such as sm_90")?
                    .clone(),
            ),
            "--quiet" => quiet = true,
            "--no-emu" => emu = false,
            "--emu-only" => emu_only = true,
            other => bail!(
                "unknown argument `{other}` (expected --arch sm_XX, --quiet, --no-emu, --emu-only)"
            ),
        }
    }
    if emu_only {
        return run_emulated(&repo_root(), true);
    }
    if archs.is_empty() {
        archs = vec!["sm_75".into(), "sm_80".into(), "sm_90".into()];
    }
    let root = repo_root();
    let dir = load_nvrtc(&root)?;
    // SAFETY: only checks whether the (now preloaded) library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!(
            "libnvrtc.so.13 was found in {} but cudarc cannot open it; install with:\n    {PIP_LINE}",
            dir.display()
        );
    }
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: NVRTC is loaded; nvrtcVersion writes two ints.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    let include = dir
        .parent()
        .map(|p| p.join("include"))
        .filter(|p| p.exists());
    let kdir = root.join("kernels");
    let common =
        std::fs::read_to_string(kdir.join("common.cuh")).context("reading kernels/common.cuh")?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&kdir)
        .with_context(|| format!("listing {}", kdir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no kernels/*.cu found in {}", kdir.display());
    }
    println!(
        "NVRTC {major}.{minor} from {}; {} files; archs {}",
        dir.display(),
        files.len(),
        archs.join(", ")
    );
    println!(
        "{:<16} {:<24} {:<6} {:>5} {:>7} {:>6} {:>8} {:>8}  hot",
        "file", "kernel", "arch", "regs", "smem", "stack", "spill_st", "spill_ld"
    );
    // Every (file, arch) pair is an independent NVRTC program: compile them on all cores (NVRTC is
    // thread-safe for distinct programs), then report in file/arch order so the table is stable.
    let mut jobs: Vec<(String, String, BTreeSet<String>, String)> = Vec::new();
    for path in &files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let src =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let hot = hot_kernels(&src);
        let text = program_text(&common, &name, &src);
        for arch in &archs {
            jobs.push((name.clone(), arch.clone(), hot.clone(), text.clone()));
        }
    }
    let results = parallel_map(&jobs, |(name, arch, _, text)| {
        compile(text, name, arch, include.as_deref())
    });
    let mut failures: Vec<String> = Vec::new();
    for ((name, arch, hot, _), result) in jobs.iter().zip(results) {
        let (name, arch) = (name.as_str(), arch.as_str());
        match result {
            Err(e) => {
                println!("{name:<16} COMPILE ERROR for {arch}");
                failures.push(format!("{e:#}"));
            }
            Ok((log, _)) => {
                let usage = parse_ptxas_log(&log, arch);
                if usage.is_empty() {
                    failures.push(format!(
                        "{name} ({arch}): no entry functions found in the ptxas log:\n{log}"
                    ));
                }
                for u in usage {
                    let is_hot = hot.contains(&u.kernel);
                    let spills = u.spill_stores + u.spill_loads;
                    if is_hot && spills > 0 {
                        failures.push(format!(
                            "{name}: hot kernel `{}` spills on {arch} ({} B stores, {} B loads)",
                            u.kernel, u.spill_stores, u.spill_loads
                        ));
                    }
                    if !quiet || (is_hot && spills > 0) {
                        println!(
                            "{:<16} {:<24} {:<6} {:>5} {:>7} {:>6} {:>8} {:>8}  {}",
                            name,
                            u.kernel,
                            u.arch,
                            u.registers,
                            u.smem,
                            u.stack,
                            u.spill_stores,
                            u.spill_loads,
                            if is_hot { "yes" } else { "" }
                        );
                    }
                }
                for h in hot {
                    if !log.contains(&format!("'{h}'")) {
                        failures.push(format!(
                            "{name}: kernel `{h}` is marked hot but ptxas did not compile it"
                        ));
                    }
                }
            }
        }
    }
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("error: {f}");
        }
        bail!("kernels-check failed: {} problem(s)", failures.len());
    }
    println!("kernels-check: all kernels compiled; no spills in hot kernels");
    if emu {
        run_emulated(&root, false)?;
    }
    Ok(())
}

/// Compiles kernels/emu/*.cpp (the per-family checks and their main) into one program and runs it.
/// `required`: a missing compiler is an error rather than a skip.
fn run_emulated(root: &Path, required: bool) -> Result<()> {
    use std::process::Command;
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let out_dir = root.join("target").join("kernels-emu");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let exe = out_dir.join("check");
    let emu = root.join("kernels/emu");
    let sources = emu_sources(&emu)?;
    println!(
        "kernels-check: running the kernels on the CPU emulator ({cxx}, {} files in {})",
        sources.len(),
        emu.display()
    );
    // One object per source, compiled on all cores, then one link: the checks are independent
    // translation units (check.h declares them), so a serial `g++ *.cpp` only wastes cores.
    let objects: Vec<PathBuf> = sources
        .iter()
        .map(|src| {
            out_dir
                .join(src.file_stem().unwrap_or_default())
                .with_extension("o")
        })
        .collect();
    let jobs: Vec<(&PathBuf, &PathBuf)> = sources.iter().zip(&objects).collect();
    let kernels_dir = root.join("kernels");
    let statuses = parallel_map(&jobs, |(src, obj)| {
        Command::new(&cxx)
            .args(["-std=c++20", "-O1", "-pthread", "-c", "-I"])
            .arg(&kernels_dir)
            .arg(src)
            .arg("-o")
            .arg(obj)
            .status()
    });
    for (status, (src, _)) in statuses.into_iter().zip(&jobs) {
        match status {
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                println!("kernels-check: `{cxx}` not found; skipped the emulated kernel run (install g++ ≥ 12)");
                return Ok(());
            }
            Err(e) => bail!("running {cxx}: {e}"),
            Ok(s) if !s.success() => bail!("{cxx} failed to compile {}", src.display()),
            Ok(_) => {}
        }
    }
    let link = Command::new(&cxx)
        .arg("-pthread")
        .args(&objects)
        .arg("-o")
        .arg(&exe)
        .status()
        .with_context(|| format!("running {cxx}"))?;
    if !link.success() {
        bail!("{cxx} failed to link the emulated checks in kernels/emu");
    }
    let run = Command::new(&exe)
        .status()
        .with_context(|| format!("running {}", exe.display()))?;
    if !run.success() {
        bail!("emulated kernel checks failed (see the FAIL lines above)");
    }
    Ok(())
}

/// `f` over `items` on up to `available_parallelism` threads; results in the order of `items`.
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    let slots = std::sync::Mutex::new(&mut out);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                slots.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
            });
        }
    });
    out.into_iter()
        .map(|r| r.expect("every index is taken by exactly one thread"))
        .collect()
}

/// The emulator's C++ sources, sorted: main.cpp and one check_<family>.cpp per kernel family.
fn emu_sources(emu: &Path) -> Result<Vec<PathBuf>> {
    let mut sources: Vec<PathBuf> = std::fs::read_dir(emu)
        .with_context(|| format!("listing {}", emu.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cpp"))
        .collect();
    sources.sort();
    if !sources.iter().any(|p| p.ends_with("main.cpp")) {
        bail!("{} has no main.cpp", emu.display());
    }
    Ok(sources)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_log() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'spill_kernel' for 'sm_90'\n\
ptxas info    : Function properties for spill_kernel\n\
ptxas         .     1088 bytes stack frame, 136 bytes spill stores, 140 bytes spill loads\n\
ptxas info    : Used 255 registers, used 0 barriers, 1088 bytes cumulative stack size\n\
ptxas info    : Compiling entry function 'smem_kernel' for 'sm_90'\n\
ptxas info    : Function properties for smem_kernel\n\
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 12 registers, used 1 barriers, 6272 bytes smem\n";
        let u = parse_ptxas_log(log, "sm_90");
        assert_eq!(u.len(), 2);
        assert_eq!(
            (
                u[0].kernel.as_str(),
                u[0].registers,
                u[0].stack,
                u[0].spill_stores,
                u[0].spill_loads
            ),
            ("spill_kernel", 255, 1088, 136, 140)
        );
        assert_eq!(
            (
                u[1].kernel.as_str(),
                u[1].registers,
                u[1].smem,
                u[1].spill_stores
            ),
            ("smem_kernel", 12, 6272, 0)
        );
    }

    #[test]
    fn finds_hot_markers() {
        let src = "// afinar:hot\nextern \"C\" __global__ void a_k(int x) {}\n__global__ void cold_k() {}\n\
                   // afinar:hot\n// more words\nextern \"C\" __global__ void __launch_bounds__(256) b_k(int y) {}\n\
                   // afinar:hot c_k\nMACRO(c)\n";
        let hot: Vec<String> = hot_kernels(src).into_iter().collect();
        assert_eq!(
            hot,
            vec!["a_k".to_string(), "b_k".to_string(), "c_k".to_string()]
        );
    }

    #[test]
    fn every_hot_marker_in_the_repo_names_a_kernel() {
        let kdir = repo_root().join("kernels");
        for e in std::fs::read_dir(&kdir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "cu") {
                let src = std::fs::read_to_string(&p).unwrap();
                let markers = src.lines().filter(|l| l.contains("afinar:hot")).count();
                assert_eq!(
                    hot_kernels(&src).len(),
                    markers,
                    "{}: a `// afinar:hot` marker is not followed by a kernel",
                    p.display()
                );
            }
        }
    }

    /// The family of kernels/<stem>.cu: nf4_dequant.cu, nf4_gemm.cu, nf4_gemv.cu are the parts of nf4;
    /// attention_flash.cu is a part of attention.
    fn kernel_family(stem: &str) -> String {
        match stem.split_once('_') {
            Some(("nf4", _)) => "nf4".to_string(),
            Some(("attention", _)) => "attention".to_string(),
            _ => stem.to_string(),
        }
    }

    /// Every kernel family (kernels/<family>.cu, or its parts <family>_<part>.cu) has its emulated
    /// check kernels/emu/check_<family>.cpp, and every check file names a family.
    #[test]
    fn every_kernel_family_has_an_emulated_check() {
        let root = repo_root();
        let mut families = BTreeSet::new();
        for e in std::fs::read_dir(root.join("kernels")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "cu") {
                families.insert(kernel_family(p.file_stem().unwrap().to_str().unwrap()));
            }
        }
        let mut checks = BTreeSet::new();
        for p in emu_sources(&root.join("kernels/emu")).unwrap() {
            let name = p.file_stem().unwrap().to_str().unwrap().to_string();
            if let Some(f) = name.strip_prefix("check_") {
                checks.insert(f.to_string());
            }
        }
        checks.remove("common");
        assert_eq!(
            families, checks,
            "kernels/*.cu families vs kernels/emu/check_*.cpp"
        );
    }

    /// One name per op family: crates/kernels/src/cpu/<family>.rs and cuda/<family>.rs name the same
    /// families, and kernels/<family>.cu (or its parts) exist for each, with the exceptions listed.
    #[test]
    fn cpu_cuda_and_kernel_files_share_family_names() {
        let root = repo_root();
        let stems = |dir: &Path, ext: &str| -> BTreeSet<String> {
            std::fs::read_dir(dir)
                .unwrap()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == ext))
                .map(|p| p.file_stem().unwrap().to_str().unwrap().to_string())
                .collect()
        };
        let src = root.join("crates/kernels/src");
        let without = |set: BTreeSet<String>, drop: &[&str]| -> BTreeSet<String> {
            set.into_iter()
                .filter(|s| !drop.contains(&s.as_str()))
                .collect()
        };
        // CPU only: the module root and the vectorized math helpers.
        let cpu = without(stems(&src.join("cpu"), "rs"), &["mod", "fastmath"]);
        // CUDA only: the module root, the trait impl, kernel arguments, NVRTC, host transfers, the
        // shared device sum, the paged optimizer (part of adamw), the profiler's event timer and the GPU
        // tests.
        let cuda = without(
            stems(&src.join("cuda"), "rs"),
            &[
                "mod",
                "backend",
                "args",
                "compile",
                "memory",
                "reduce",
                "adamw_paged",
                "profile",
                "gpu_tests",
            ],
        );
        assert_eq!(cpu, cuda, "cpu/*.rs vs cuda/*.rs op families");
        let kernels: BTreeSet<String> = stems(&root.join("kernels"), "cu")
            .into_iter()
            .map(|s| kernel_family(&s))
            .collect();
        // lm_head has no kernel of its own (GEMMs around cross_entropy.cu); reduce.cu is the shared
        // device sum.
        let mut want = without(cpu, &["lm_head"]);
        want.insert("reduce".to_string());
        assert_eq!(kernels, want, "kernels/*.cu families vs cpu/*.rs");
    }
}
