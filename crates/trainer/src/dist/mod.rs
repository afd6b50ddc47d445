//! Data-parallel training: the collective interface every rank talks through, and its implementations.
//!
//! Every rank holds the frozen base and the same adapter, trains on its slice of each global
//! micro-batch, and sums its LoRA gradients with the other ranks before clipping and AdamW (so every
//! rank steps its own, identical optimizer). The loop calls five collectives (`train/dist_hooks.rs`):
//! the trained-token count and loss sum of a window ([`Collective::all_reduce_f64`]), the gradients
//! ([`Collective::all_reduce_bufs`], in buckets), a fingerprint of the starting state
//! ([`Collective::broadcast_bytes`]) and [`Collective::barrier`] around the run directory.
//!
//! Implementations:
//! - [`Single`]: world size 1, every call returns at once (the ordinary run);
//! - [`local::LocalComm`]: N threads of one process meeting at a rendezvous (Mutex + Condvar), summing
//!   in rank order so every rank gets the same bits. The CPU tests train with it;
//! - NCCL (feature `nccl`, `nccl.rs` here over `afinar_kernels::nccl`): one process per GPU, device
//!   buffers reduced on the CUDA backend's stream, the unique id handed out by [`rendezvous`].
//!
//! Failure: a rank whose run fails calls [`Collective::abort`] with its error; every other rank's
//! next (or current) collective then returns [`DistError::PeerFailed`] naming that rank, so the run
//! ends on every rank with a clear error instead of a hang. Collectives also time out
//! ([`DEFAULT_TIMEOUT`], `AFINAR_DIST_TIMEOUT_S`). Checkpoints are atomic and written by rank 0 only,
//! between steps, so a failure leaves the last one intact.

use std::time::Duration;

use afinar_kernels::Backend;

pub mod launch;
pub mod local;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;

pub use local::{local_group, LocalComm};

/// How long a rank waits in one collective (or the rendezvous) before giving up. NCCL's own
/// watchdogs in torch default to 10 minutes; a scheduled eval or checkpoint on rank 0 happens between
/// collectives, and must fit in it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// [`DEFAULT_TIMEOUT`], or `AFINAR_DIST_TIMEOUT_S` seconds when set to a positive number.
pub fn timeout_from_env() -> Duration {
    std::env::var("AFINAR_DIST_TIMEOUT_S")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(DEFAULT_TIMEOUT)
}

/// Gradient bytes per all-reduce call (torch DDP's default bucket is 25 MiB): a bucket is the
/// consecutive gradient tensors whose sizes add up to at most this, or one larger tensor alone.
pub const BUCKET_BYTES: usize = 25 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// Another rank failed and told the group (its error is the message).
    #[error("rank {rank} failed: {message}")]
    PeerFailed { rank: usize, message: String },
    #[error("rank {rank}: timed out after {secs:.0} s in `{op}` waiting for the other ranks (AFINAR_DIST_TIMEOUT_S sets the limit)")]
    Timeout { rank: usize, op: String, secs: f64 },
    /// The ranks called different collectives (a bug, or ranks that disagree on the data).
    #[error("collective mismatch: {0}")]
    Mismatch(String),
    #[error("rendezvous at {addr}: {message}")]
    Rendezvous { addr: String, message: String },
    /// RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT missing or inconsistent.
    #[error("environment: {0}")]
    Env(String),
    #[error("{0}")]
    Backend(String),
    /// `--nproc`: a rank exited with an error (its own message is above, on stderr).
    #[error("data-parallel run failed ({failures}); the last checkpoint rank 0 wrote is intact: continue with --resume auto")]
    RanksFailed { code: u8, failures: String },
    #[error(transparent)]
    Kernel(#[from] afinar_kernels::KernelError),
}

pub type Result<T> = std::result::Result<T, DistError>;

impl DistError {
    /// The CLI's exit code: 2 for a usage error (the environment, `--nproc` on the CPU), the failed
    /// rank's code for [`DistError::RanksFailed`], else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            DistError::Env(_) => 2,
            DistError::RanksFailed { code, .. } => *code,
            _ => 1,
        }
    }
}

/// What the trainer needs from a group of ranks. Every rank calls the same collectives in the same
/// order; each returns the same result on every rank.
pub trait Collective<B: Backend>: Send + Sync {
    /// This rank, in 0..world_size.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sums each buffer over the ranks, in place; every rank ends with the sum. The buffers are the
    /// f32 (`Storage::Master`) gradients, given bucket by bucket.
    fn all_reduce_bufs(&self, backend: &B, bufs: &mut [&mut B::Buf]) -> Result<()>;
    /// Sums host scalars over the ranks, in place (loss sums, trained-token counts).
    fn all_reduce_f64(&self, xs: &mut [f64]) -> Result<()>;
    /// Rank `root`'s bytes on every rank (`bytes` is replaced on the others).
    fn broadcast_bytes(&self, root: usize, bytes: &mut Vec<u8>) -> Result<()>;
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Whether the run goes through the collectives at all: false for one rank of an in-process or
    /// trivial group (the single-process path, bit for bit); NCCL says true even for one rank, so a
    /// one-GPU run under the torchrun variables exercises every NCCL call.
    fn exchanges(&self) -> bool {
        self.world_size() > 1
    }
    /// Tells the other ranks this one failed with `reason`; their collectives then fail with
    /// [`DistError::PeerFailed`]. Never blocks.
    fn abort(&self, reason: &str);
}

/// World size 1: nothing to exchange.
#[derive(Clone, Copy, Debug, Default)]
pub struct Single;

impl<B: Backend> Collective<B> for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_bufs(&self, _: &B, _: &mut [&mut B::Buf]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _: usize, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, _: &str) {}
}

/// Splits tensors of `sizes` elements (f32) into consecutive buckets of at most `bucket_bytes`
/// (a tensor larger than that is a bucket of its own). Returns index ranges into `sizes`.
pub fn buckets(sizes: &[usize], bucket_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (i, &n) in sizes.iter().enumerate() {
        let b = n.saturating_mul(4);
        if i > start && bytes.saturating_add(b) > bucket_bytes {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes = bytes.saturating_add(b);
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// Where this process stands in a job, from the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK,
/// MASTER_ADDR, MASTER_PORT), which `afinar train --nproc N` sets for its children.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorldEnv {
    pub rank: usize,
    pub world_size: usize,
    /// The GPU this rank uses on its node.
    pub local_rank: usize,
    /// host:port of rank 0's rendezvous: MASTER_ADDR and MASTER_PORT, or MASTER_PORT + 1 under
    /// torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE=True: torchrun's own TCPStore already
    /// listens on MASTER_PORT on node 0), or AFINAR_RENDEZVOUS_PORT when set.
    pub master: String,
}

impl WorldEnv {
    /// None when WORLD_SIZE is unset (a single-process run); an error naming the variable when the
    /// set is incomplete or inconsistent.
    pub fn from_env() -> Result<Option<WorldEnv>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`WorldEnv::from_env`] over any lookup (tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<WorldEnv>> {
        let Some(ws) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        let num = |k: &str, v: String| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| DistError::Env(format!("{k}={v:?} is not a non-negative integer")))
        };
        let world_size = num("WORLD_SIZE", ws)?;
        if world_size == 0 {
            return Err(DistError::Env("WORLD_SIZE=0: at least one rank".into()));
        }
        let need = |k: &str| {
            get(k).ok_or_else(|| {
                DistError::Env(format!(
                    "WORLD_SIZE is set but {k} is not (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)"
                ))
            })
        };
        let rank = num("RANK", need("RANK")?)?;
        if rank >= world_size {
            return Err(DistError::Env(format!(
                "RANK={rank} is not below WORLD_SIZE={world_size}"
            )));
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(v) => num("LOCAL_RANK", v)?,
            None if world_size == 1 => 0,
            None => return Err(need("LOCAL_RANK").unwrap_err()),
        };
        let (addr, port) = if world_size == 1 {
            (
                get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
                get("MASTER_PORT").unwrap_or_else(|| "29500".into()),
            )
        } else {
            (need("MASTER_ADDR")?, need("MASTER_PORT")?)
        };
        let mut port: u16 = port
            .trim()
            .parse()
            .map_err(|_| DistError::Env(format!("MASTER_PORT={port:?} is not a port number")))?;
        if let Some(p) = get("AFINAR_RENDEZVOUS_PORT") {
            port = p.trim().parse().map_err(|_| {
                DistError::Env(format!("AFINAR_RENDEZVOUS_PORT={p:?} is not a port number"))
            })?;
        } else if get("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            port = port.checked_add(1).ok_or_else(|| {
                DistError::Env("MASTER_PORT=65535: no port above it for afinar's rendezvous; set AFINAR_RENDEZVOUS_PORT".into())
            })?;
        }
        Ok(Some(WorldEnv {
            rank,
            world_size,
            local_rank,
            master: format!("{}:{port}", addr.trim()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn buckets_group_consecutive_tensors_up_to_the_limit() {
        // 4-byte elements; a 40-byte limit holds 10 elements.
        assert_eq!(buckets(&[4, 4, 4, 20, 3], 40), vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(buckets(&[2, 3, 5], 40), vec![0..3]);
        assert_eq!(buckets(&[], 40), Vec::<std::ops::Range<usize>>::new());
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn world_env_reads_the_torchrun_variables_and_names_what_is_wrong() {
        assert_eq!(WorldEnv::from_lookup(env(&[])).unwrap(), None);
        let full = [
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29501"),
        ];
        assert_eq!(
            WorldEnv::from_lookup(env(&full)).unwrap(),
            Some(WorldEnv {
                rank: 1,
                world_size: 2,
                local_rank: 1,
                master: "10.0.0.1:29501".into()
            })
        );
        let e = WorldEnv::from_lookup(env(&full[1..]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK is not"), "{e}");
        let e = WorldEnv::from_lookup(env(&[("RANK", "2"), ("WORLD_SIZE", "2")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK=2 is not below WORLD_SIZE=2"), "{e}");
        let mut torchrun = full.to_vec();
        torchrun.push(("TORCHELASTIC_USE_AGENT_STORE", "True"));
        assert_eq!(
            WorldEnv::from_lookup(env(&torchrun))
                .unwrap()
                .unwrap()
                .master,
            "10.0.0.1:29502"
        );
        torchrun.push(("AFINAR_RENDEZVOUS_PORT", "4000"));
        assert_eq!(
            WorldEnv::from_lookup(env(&torchrun))
                .unwrap()
                .unwrap()
                .master,
            "10.0.0.1:4000"
        );
        let mut bad = full;
        bad[4] = ("MASTER_PORT", "http");
        let e = WorldEnv::from_lookup(env(&bad)).unwrap_err().to_string();
        assert!(e.contains("MASTER_PORT=\"http\""), "{e}");
    }
}
