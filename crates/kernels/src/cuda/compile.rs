//! Run-time compilation of `kernels/*.cu` with NVRTC, for the device's own architecture, with an
//! on-disk cache of the resulting CUBINs.
//!
//! The sources are embedded with `include_str!`. Each module's program text is `kernels/common.cuh`
//! followed by the file (`cargo xtask kernels-check` compiles exactly the same text). Compiling to a
//! real `sm_XY` target gives a CUBIN, so the driver never has to JIT PTX (and a PTX version newer than
//! the driver cannot happen as long as NVRTC is not newer than the driver: pin NVRTC 13.0 for a 13.0
//! driver).
//!
//! Cache: `$AFINAR_KERNEL_CACHE`, else `$XDG_CACHE_HOME/afinar/kernels`, else `~/.cache/afinar/kernels`.
//! File name: `<stem>-sm<XY>-nvrtc<maj>.<min>-<hash>.cubin`, hash = FNV-1a 64 over the program text and
//! the compile options, so any change to a kernel, the shared header, the arch, the options or the NVRTC
//! version gives a new entry. Writes go to a temporary file renamed into place (atomic on one file
//! system); a cache that cannot be read or written only costs a recompile.

use crate::abi::{COMMON, SOURCES};
use crate::error::{KernelError, Result};
use std::ffi::CString;
use std::path::PathBuf;

fn nvrtc_err(msg: String) -> KernelError {
    KernelError::Backend {
        backend: "cuda",
        msg,
    }
}

/// The program text compiled for `file` (same as xtask's `program_text`).
pub(crate) fn program_text(file: &str) -> Result<String> {
    let src = SOURCES
        .iter()
        .find(|(name, _)| *name == file)
        .map(|(_, s)| *s)
        .ok_or_else(|| nvrtc_err(format!("no embedded kernel source named {file}")))?;
    Ok(format!("{COMMON}\n#line 1 \"{file}\"\n{src}"))
}

/// FNV-1a, 64 bit: a stable content hash for cache keys (not for security).
pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub(crate) fn cache_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("AFINAR_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Ok(d) = std::env::var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("afinar/kernels"));
    }
    std::env::var("HOME")
        .ok()
        .map(|h| PathBuf::from(h).join(".cache/afinar/kernels"))
}

/// NVRTC's (major, minor) version.
pub(crate) fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: the caller checked that NVRTC is loadable; nvrtcVersion writes two ints.
    let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(nvrtc_err(format!("nvrtcVersion failed: {rc:?}")));
    }
    Ok((major, minor))
}

fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
    ]
}

/// Compiles `file` for `arch` (e.g. "sm_90") to a CUBIN.
pub(crate) fn compile_cubin(file: &str, arch: &str) -> Result<Vec<u8>> {
    use cudarc::nvrtc::{result, sys};
    let text = program_text(file)?;
    let src =
        CString::new(text).map_err(|_| nvrtc_err(format!("{file}: source contains a NUL byte")))?;
    let name = CString::new(file).map_err(|_| nvrtc_err(format!("{file}: bad file name")))?;
    let prog = result::create_program(&src, Some(&name))
        .map_err(|e| nvrtc_err(format!("{file}: nvrtcCreateProgram: {e:?}")))?;
    let opts = options(arch);
    // SAFETY: `prog` is a live program handle (destroyed below); options are valid strings.
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let out = match compiled {
        Err(e) => {
            // SAFETY: `prog` is live.
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
            Err(nvrtc_err(format!(
                "NVRTC failed to compile {file} for {arch} ({e:?}):\n{log}"
            )))
        }
        Ok(()) => {
            let mut n = 0usize;
            // SAFETY: the program compiled for a real sm_ target, so it has a CUBIN; writes one usize.
            let rc = unsafe { sys::nvrtcGetCUBINSize(prog, &mut n) };
            if rc != sys::nvrtcResult::NVRTC_SUCCESS || n == 0 {
                Err(nvrtc_err(format!(
                    "{file} ({arch}): nvrtcGetCUBINSize failed: {rc:?}"
                )))
            } else {
                let mut buf = vec![0u8; n];
                // SAFETY: `buf` has exactly the n bytes NVRTC reported.
                let rc = unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _) };
                if rc != sys::nvrtcResult::NVRTC_SUCCESS {
                    Err(nvrtc_err(format!(
                        "{file} ({arch}): nvrtcGetCUBIN failed: {rc:?}"
                    )))
                } else {
                    Ok(buf)
                }
            }
        }
    };
    // SAFETY: destroying the handle we created; it is not used afterwards.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// CUBINs already produced in this process, by (file, arch): several backends (e.g. parallel tests)
/// then compile each module once, and a second compile of the same module waits for the first.
static MEMORY: std::sync::Mutex<Option<CubinMap>> = std::sync::Mutex::new(None);

/// (file, arch) → CUBIN.
type CubinMap = std::collections::HashMap<(String, String), Vec<u8>>;

/// The CUBIN for `file` on `arch`: from this process's memory, the disk cache, or freshly compiled (and
/// then cached in both). `fresh` skips both caches (used when a cached CUBIN failed to load: it is then
/// replaced).
pub(crate) fn cubin(file: &str, arch: &str, fresh: bool) -> Result<Vec<u8>> {
    // A poisoned lock only means another thread panicked while compiling: the map is still usable.
    let mut memory = MEMORY.lock().unwrap_or_else(|p| p.into_inner());
    let key = (file.to_string(), arch.to_string());
    if !fresh {
        if let Some(bytes) = memory.as_ref().and_then(|m| m.get(&key)) {
            return Ok(bytes.clone());
        }
    }
    let bytes = cubin_from_disk_or_nvrtc(file, arch, fresh)?;
    memory
        .get_or_insert_with(Default::default)
        .insert(key, bytes.clone());
    Ok(bytes)
}

fn cubin_from_disk_or_nvrtc(file: &str, arch: &str, fresh: bool) -> Result<Vec<u8>> {
    let (maj, min) = nvrtc_version()?;
    let text = program_text(file)?;
    let opts = options(arch).join(" ");
    let hash = fnv1a(&[
        text.as_bytes(),
        opts.as_bytes(),
        format!("{maj}.{min}").as_bytes(),
    ]);
    let stem = file.trim_end_matches(".cu");
    let entry = cache_dir().map(|d| {
        (
            d.join(format!(
                "{stem}-{}-nvrtc{maj}.{min}-{hash:016x}.cubin",
                arch.replace('_', "")
            )),
            d,
        )
    });
    if let (Some((path, _)), false) = (&entry, fresh) {
        if let Ok(bytes) = std::fs::read(path) {
            if !bytes.is_empty() {
                return Ok(bytes);
            }
        }
    }
    let bytes = compile_cubin(file, arch)?;
    if let Some((path, dir)) = entry {
        // Best effort: a read-only or full disk only means the next run compiles again.
        if std::fs::create_dir_all(&dir).is_ok() {
            // Unique per process and call: concurrent compiles (e.g. parallel tests) never share a
            // temporary file, and the rename makes the final file appear whole or not at all.
            static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = dir.join(format!(
                ".{}.{}.{seq}.tmp",
                path.file_name().and_then(|n| n.to_str()).unwrap_or("k"),
                std::process::id()
            ));
            if std::fs::write(&tmp, &bytes).is_ok() && std::fs::rename(&tmp, &path).is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_file_is_embedded() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../kernels");
        let Ok(entries) = std::fs::read_dir(dir) else {
            // A bundled test binary on another machine has no source tree to compare with.
            eprintln!("skipped: no source tree at {dir}");
            return;
        };
        let mut on_disk: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cu"))
            .collect();
        on_disk.sort();
        let embedded: Vec<String> = SOURCES.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(
            embedded, on_disk,
            "SOURCES in abi/mod.rs must list every kernels/*.cu (sorted)"
        );
    }

    #[test]
    fn cache_key_changes_with_any_part() {
        let a = fnv1a(&[b"src", b"--gpu-architecture=sm_90"]);
        assert_ne!(a, fnv1a(&[b"src", b"--gpu-architecture=sm_80"]));
        assert_ne!(a, fnv1a(&[b"src2", b"--gpu-architecture=sm_90"]));
        // Part boundaries matter: ("ab","c") and ("a","bc") differ.
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        assert_eq!(a, fnv1a(&[b"src", b"--gpu-architecture=sm_90"]));
    }

    #[test]
    fn program_text_prepends_the_common_header() {
        let t = program_text("adamw.cu").unwrap();
        assert!(t.starts_with(COMMON));
        assert!(t.contains("#line 1 \"adamw.cu\""));
        assert!(program_text("nope.cu").is_err());
    }
}
