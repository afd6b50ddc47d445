//! `afinar train --nproc N`: one child process per local GPU, started the way torchrun starts them.
//!
//! The parent re-runs its own executable with the same arguments (minus `--nproc`) N times, each with
//! RANK = LOCAL_RANK = i, WORLD_SIZE = N, MASTER_ADDR = 127.0.0.1 and MASTER_PORT, then waits. When a
//! child fails, the parent kills the others (they would otherwise wait in their next collective until
//! the timeout) and exits with the failed child's code; the last checkpoint, written atomically by
//! rank 0 between steps, is intact.

use std::ffi::OsString;
use std::process::{Child, Command};
use std::time::Duration;

use super::{DistError, Result};

/// How the parent's children ended.
#[derive(Debug)]
pub struct LaunchOutcome {
    /// The exit code to report: 0 when every rank succeeded, else the first failed rank's code
    /// (1 for a rank killed by a signal).
    pub code: i32,
    /// One line per failed rank, in the order they ended.
    pub failures: Vec<String>,
}

/// `afinar train --nproc N`: N ranks of this executable with this process's arguments minus
/// `--nproc`. Ctrl-C reaches every rank (one process group); they stop together at a step boundary
/// and rank 0 checkpoints, so the launcher only keeps waiting (a second Ctrl-C exits at once, as a
/// rank does).
pub fn launch_self(nproc: usize) -> Result<LaunchOutcome> {
    if nproc == 0 {
        return Err(DistError::Env("--nproc 0: at least one process".into()));
    }
    let exe = std::env::current_exe().map_err(|e| {
        DistError::Env(format!(
            "cannot find this executable to start the ranks: {e}"
        ))
    })?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if let Err(e) = crate::signal::install() {
        eprintln!("warning: cannot install the Ctrl-C handler ({e})");
    }
    launch_local(&exe, &strip_nproc(&args), nproc, None)
}

/// `afinar train --nproc N` from the CLI: refuses a CPU run (`cuda` false) as a usage error, then
/// [`launch_self`]; Ok(0) when every rank succeeded, Ok(130) when the run was interrupted (rank 0
/// wrote a checkpoint), else [`DistError::RanksFailed`] with the failed rank's exit code.
pub fn launch_train(nproc: usize, cuda: bool) -> Result<u8> {
    if !cuda {
        return Err(DistError::Env(format!(
            "--nproc {nproc}: data-parallel training runs on CUDA GPUs over NCCL (model.device = \"cuda\"); \
             the CPU backend trains in one process and already uses every core"
        )));
    }
    let out = launch_self(nproc)?;
    match out.code {
        0 | 130 => Ok(out.code as u8),
        c => Err(DistError::RanksFailed {
            code: c.clamp(1, 255) as u8,
            failures: out.failures.join("; "),
        }),
    }
}

/// Starts `nproc` ranks of `exe args…` and waits for them (see the module docs). `port` is
/// MASTER_PORT (`None`: MASTER_PORT from the environment, else 29500, torchrun's default).
pub fn launch_local(
    exe: &std::path::Path,
    args: &[OsString],
    nproc: usize,
    port: Option<u16>,
) -> Result<LaunchOutcome> {
    launch_with_grace(exe, args, nproc, port, Duration::from_secs(2))
}

/// [`launch_local`], giving the surviving ranks `grace` to report a failure before they are killed.
fn launch_with_grace(
    exe: &std::path::Path,
    args: &[OsString],
    nproc: usize,
    port: Option<u16>,
    grace: Duration,
) -> Result<LaunchOutcome> {
    if nproc == 0 {
        return Err(DistError::Env("--nproc 0: at least one process".into()));
    }
    let port = match port {
        Some(p) => p,
        None => match std::env::var("MASTER_PORT") {
            Ok(v) => v
                .trim()
                .parse()
                .map_err(|_| DistError::Env(format!("MASTER_PORT={v:?} is not a port number")))?,
            Err(_) => 29500,
        },
    };
    let mut children: Vec<Option<Child>> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let child = Command::new(exe)
            .args(args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn();
        match child {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                kill_all(&mut children);
                return Err(DistError::Env(format!(
                    "starting rank {rank} ({}): {e}",
                    exe.display()
                )));
            }
        }
    }
    let mut out = LaunchOutcome {
        code: 0,
        failures: Vec::new(),
    };
    while children.iter().any(Option::is_some) {
        let mut failed = false;
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(c) = slot else { continue };
            match c.try_wait() {
                Ok(Some(status)) => {
                    *slot = None;
                    if !status.success() {
                        let code = status.code().unwrap_or(1);
                        if out.code == 0 {
                            out.code = code;
                        }
                        out.failures
                            .push(format!("rank {rank} exited with {status}"));
                        failed = true;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    *slot = None;
                    out.failures
                        .push(format!("rank {rank}: waiting for it: {e}"));
                    if out.code == 0 {
                        out.code = 1;
                    }
                    failed = true;
                }
            }
        }
        if failed {
            // Give the others a moment to report the failure themselves (their collective fails
            // with the peer's error), then stop them.
            std::thread::sleep(grace);
            for (rank, slot) in children.iter_mut().enumerate() {
                if let Some(c) = slot {
                    if let Ok(None) = c.try_wait() {
                        out.failures
                            .push(format!("rank {rank} stopped by the launcher"));
                    }
                }
            }
            kill_all(&mut children);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(out)
}

/// Kills and reaps every child still running (each by its own handle).
fn kill_all(children: &mut [Option<Child>]) {
    for c in children.iter_mut().flatten() {
        let _ = c.kill();
        let _ = c.wait();
    }
    children.iter_mut().for_each(|c| *c = None);
}

/// `args` without `--nproc N` / `--nproc=N` (the children must not launch again).
pub fn strip_nproc(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        match a.to_str() {
            Some("--nproc") => skip = true,
            Some(s) if s.starts_with("--nproc=") => {}
            _ => out.push(a.clone()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nproc_is_removed_from_the_children_arguments() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            strip_nproc(&a(&["train", "c.toml", "--nproc", "2", "--set", "x=1"])),
            a(&["train", "c.toml", "--set", "x=1"])
        );
        assert_eq!(
            strip_nproc(&a(&["train", "--nproc=4", "c.toml"])),
            a(&["train", "c.toml"])
        );
    }

    #[test]
    fn a_failing_rank_stops_the_others_and_sets_the_exit_code() {
        // /bin/sh as the "executable": rank 1 fails at once, rank 0 would sleep for a minute.
        let args: Vec<OsString> = ["-c", "if [ \"$RANK\" = 1 ]; then exit 3; fi; sleep 60"]
            .iter()
            .map(OsString::from)
            .collect();
        let out = launch_with_grace(
            std::path::Path::new("/bin/sh"),
            &args,
            2,
            Some(29999),
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(out.code, 3);
        assert!(
            out.failures[0].starts_with("rank 1 exited"),
            "{:?}",
            out.failures
        );
        assert_eq!(out.failures[1], "rank 0 stopped by the launcher");
    }
}
