//! The in-process collective: N ranks as threads of one process, meeting at one rendezvous.
//!
//! Every collective is one *round*: each rank deposits its contribution (tagged with the operation
//! and its length), the last to arrive publishes all contributions in rank order and wakes the
//! others, and each rank computes its result from that list — sums are taken in rank order, in the
//! element type of the data (f32 gradients are added as f32, as NCCL does), so every rank gets the
//! same bits. The rendezvous is poisoned by [`Collective::abort`], by a rank's handle being dropped
//! while others still wait for it (a rank that returned early, or panicked), by a timeout, and by
//! ranks calling different operations: every rank waiting or arriving later gets the error.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use afinar_kernels::{Backend, Storage};

use super::{Collective, DistError, Result};

#[derive(Clone, Debug)]
enum Payload {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<u8>),
    Nothing,
}

impl Payload {
    fn describe(&self) -> String {
        match self {
            Payload::F32(v) => format!("{} f32", v.len()),
            Payload::F64(v) => format!("{} f64", v.len()),
            Payload::Bytes(v) => format!("{} bytes", v.len()),
            Payload::Nothing => "nothing".into(),
        }
    }
}

struct State {
    /// Completed rounds.
    generation: u64,
    /// This round's contributions, by rank: (operation, data).
    slots: Vec<Option<(&'static str, Payload)>>,
    /// The last completed round's contributions, in rank order.
    last: Arc<Vec<Payload>>,
    /// Set once; every later or waiting call fails with it.
    failed: Option<DistError>,
    /// Ranks whose handle was dropped.
    left: Vec<bool>,
}

struct Shared {
    n: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

/// One rank's handle on an in-process group (see [`local_group`]). Dropping it tells the others this
/// rank left: a collective they are in (or start) that needs it fails instead of waiting.
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
}

/// N handles on one in-process group, rank 0 first; give one to each thread. `timeout` bounds each
/// wait in a collective.
pub fn local_group(n: usize, timeout: Duration) -> Vec<LocalComm> {
    let shared = Arc::new(Shared {
        n,
        timeout,
        state: Mutex::new(State {
            generation: 0,
            slots: vec![None; n],
            last: Arc::new(Vec::new()),
            failed: None,
            left: vec![false; n],
        }),
        cv: Condvar::new(),
    });
    (0..n)
        .map(|rank| LocalComm {
            rank,
            shared: shared.clone(),
        })
        .collect()
}

fn clone_err(e: &DistError) -> DistError {
    match e {
        DistError::PeerFailed { rank, message } => DistError::PeerFailed {
            rank: *rank,
            message: message.clone(),
        },
        DistError::Timeout { rank, op, secs } => DistError::Timeout {
            rank: *rank,
            op: op.clone(),
            secs: *secs,
        },
        other => DistError::Mismatch(other.to_string()),
    }
}

impl LocalComm {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A rank that panicked while holding the lock cannot have left the state half-updated in a
        // way that matters: every update is a plain assignment. Keep going with its contents.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One round: deposit `data` for `op`, return every rank's contribution in rank order.
    fn round(&self, op: &'static str, data: Payload) -> Result<Arc<Vec<Payload>>> {
        let sh = &*self.shared;
        let mut st = self.lock();
        if let Some(e) = &st.failed {
            return Err(clone_err(e));
        }
        if let Some(r) = st.left.iter().position(|&l| l) {
            let e = DistError::PeerFailed {
                rank: r,
                message: format!("it left the group before `{op}` of rank {}", self.rank),
            };
            st.failed = Some(clone_err(&e));
            sh.cv.notify_all();
            return Err(e);
        }
        st.slots[self.rank] = Some((op, data));
        if st.slots.iter().all(Option::is_some) {
            let taken: Vec<(&'static str, Payload)> =
                st.slots.iter_mut().map(|s| s.take().unwrap()).collect();
            if let Some((r, (other, p))) = taken.iter().enumerate().find(|(_, (o, p))| {
                *o != taken[0].0 || std::mem::discriminant(p) != std::mem::discriminant(&taken[0].1)
            }) {
                let e = DistError::Mismatch(format!(
                    "rank 0 called `{}` ({}) while rank {r} called `{other}` ({})",
                    taken[0].0,
                    taken[0].1.describe(),
                    p.describe()
                ));
                st.failed = Some(clone_err(&e));
                sh.cv.notify_all();
                return Err(e);
            }
            st.last = Arc::new(taken.into_iter().map(|(_, p)| p).collect());
            st.generation += 1;
            sh.cv.notify_all();
            return Ok(st.last.clone());
        }
        let gen = st.generation;
        let deadline = Instant::now() + sh.timeout;
        loop {
            // A completed round wins over a failure that came after it.
            if st.generation != gen {
                return Ok(st.last.clone());
            }
            if let Some(e) = &st.failed {
                return Err(clone_err(e));
            }
            let now = Instant::now();
            if now >= deadline {
                let e = DistError::Timeout {
                    rank: self.rank,
                    op: op.into(),
                    secs: sh.timeout.as_secs_f64(),
                };
                st.failed = Some(clone_err(&e));
                sh.cv.notify_all();
                return Err(e);
            }
            st = sh
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        let sh = self.shared.clone();
        let mut st = self.lock();
        st.left[self.rank] = true;
        // Ranks already waiting for this one's contribution cannot complete their round.
        let waiting = st.slots.iter().any(Option::is_some) && st.slots[self.rank].is_none();
        if waiting && st.failed.is_none() {
            st.failed = Some(DistError::PeerFailed {
                rank: self.rank,
                message: "it left the group while the others waited in a collective".into(),
            });
        }
        sh.cv.notify_all();
    }
}

fn sum_f32(all: &[Payload]) -> Result<Vec<f32>> {
    let mut out: Option<Vec<f32>> = None;
    for (r, p) in all.iter().enumerate() {
        let Payload::F32(v) = p else {
            unreachable!("checked by round")
        };
        match &mut out {
            None => out = Some(v.clone()),
            Some(o) if o.len() == v.len() => o.iter_mut().zip(v).for_each(|(a, b)| *a += b),
            Some(o) => {
                return Err(DistError::Mismatch(format!(
                    "all_reduce of {} f32 on rank 0, {} on rank {r}",
                    o.len(),
                    v.len()
                )))
            }
        }
    }
    Ok(out.unwrap_or_default())
}

impl<B: Backend> Collective<B> for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.n
    }

    /// The bucket's buffers are read to the host, concatenated, summed in rank order and written back
    /// (a test transport: the CPU backend's buffers are host memory anyway).
    fn all_reduce_bufs(&self, backend: &B, bufs: &mut [&mut B::Buf]) -> Result<()> {
        let mut flat = Vec::new();
        let mut lens = Vec::with_capacity(bufs.len());
        for b in bufs.iter() {
            let h = backend.to_host(b)?;
            lens.push(h.len());
            flat.extend_from_slice(&h);
        }
        let all = self.round("all_reduce_bufs", Payload::F32(flat))?;
        let sum = sum_f32(&all)?;
        let mut off = 0;
        for (b, n) in bufs.iter_mut().zip(lens) {
            **b = backend.from_host_for(&sum[off..off + n], Storage::Master)?;
            off += n;
        }
        Ok(())
    }

    fn all_reduce_f64(&self, xs: &mut [f64]) -> Result<()> {
        let all = self.round("all_reduce_f64", Payload::F64(xs.to_vec()))?;
        xs.fill(0.0);
        for (r, p) in all.iter().enumerate() {
            let Payload::F64(v) = p else {
                unreachable!("checked by round")
            };
            if v.len() != xs.len() {
                return Err(DistError::Mismatch(format!(
                    "all_reduce of {} f64 on rank {}, {} on rank {r}",
                    xs.len(),
                    self.rank,
                    v.len()
                )));
            }
            xs.iter_mut().zip(v).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn broadcast_bytes(&self, root: usize, bytes: &mut Vec<u8>) -> Result<()> {
        if root >= self.shared.n {
            return Err(DistError::Mismatch(format!(
                "broadcast from rank {root} in a group of {}",
                self.shared.n
            )));
        }
        let all = self.round("broadcast_bytes", Payload::Bytes(bytes.clone()))?;
        let Payload::Bytes(v) = &all[root] else {
            unreachable!("checked by round")
        };
        bytes.clone_from(v);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.round("barrier", Payload::Nothing).map(|_| ())
    }

    fn abort(&self, reason: &str) {
        let mut st = self.lock();
        if st.failed.is_none() {
            st.failed = Some(DistError::PeerFailed {
                rank: self.rank,
                message: reason.to_string(),
            });
        }
        self.shared.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use afinar_kernels::Cpu;
    use std::thread;

    fn run<T: Send + 'static>(
        n: usize,
        timeout: Duration,
        f: impl Fn(LocalComm) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let hs: Vec<_> = local_group(n, timeout)
            .into_iter()
            .map(|c| {
                let f = f.clone();
                thread::spawn(move || f(c))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn collectives_sum_in_rank_order_and_agree_on_every_rank() {
        let out = run(3, Duration::from_secs(20), |c| {
            let cpu = Cpu::new();
            let r = c.rank as f32;
            let mut a = vec![r, 1.0, 1e8];
            let mut b = vec![r * 10.0];
            Collective::<Cpu>::all_reduce_bufs(&c, &cpu, &mut [&mut a, &mut b]).unwrap();
            let mut x = [c.rank as f64, 1.0];
            Collective::<Cpu>::all_reduce_f64(&c, &mut x).unwrap();
            let mut bytes = vec![c.rank as u8; c.rank + 1];
            Collective::<Cpu>::broadcast_bytes(&c, 2, &mut bytes).unwrap();
            Collective::<Cpu>::barrier(&c).unwrap();
            (a, b, x, bytes)
        });
        for (a, b, x, bytes) in &out {
            // 1e8 + 1e8 + 1e8 in f32, left to right.
            assert_eq!(a, &vec![3.0, 3.0, (1e8f32 + 1e8) + 1e8]);
            assert_eq!(b, &vec![30.0]);
            assert_eq!(x, &[3.0, 3.0]);
            assert_eq!(bytes, &vec![2u8; 3]);
        }
    }

    #[test]
    fn an_aborting_rank_fails_the_others_instead_of_hanging() {
        let out = run(2, Duration::from_secs(60), |c| {
            if c.rank == 1 {
                Collective::<Cpu>::abort(&c, "data error at step 3");
                return String::new();
            }
            Collective::<Cpu>::barrier(&c).unwrap_err().to_string()
        });
        assert_eq!(out[0], "rank 1 failed: data error at step 3");
    }

    #[test]
    fn a_rank_that_leaves_fails_the_waiting_ones() {
        let out = run(3, Duration::from_secs(60), |c| {
            if c.rank == 2 {
                drop(c);
                return String::new();
            }
            Collective::<Cpu>::all_reduce_f64(&c, &mut [1.0])
                .unwrap_err()
                .to_string()
        });
        assert!(
            out[0].starts_with("rank 2 failed: it left the group"),
            "{}",
            out[0]
        );
        assert!(
            out[1].starts_with("rank 2 failed: it left the group"),
            "{}",
            out[1]
        );
    }

    #[test]
    fn different_operations_and_timeouts_are_errors() {
        let out = run(2, Duration::from_secs(60), |c| {
            let r = if c.rank == 0 {
                Collective::<Cpu>::barrier(&c)
            } else {
                Collective::<Cpu>::all_reduce_f64(&c, &mut [1.0])
            };
            r.unwrap_err().to_string()
        });
        assert!(
            out.iter().all(|e| e.contains("collective mismatch")),
            "{out:?}"
        );
        // One rank alone in a group of two: the wait ends at the timeout.
        let mut g = local_group(2, Duration::from_millis(50));
        let c = g.remove(0);
        let e = Collective::<Cpu>::barrier(&c).unwrap_err().to_string();
        drop(g);
        assert!(e.contains("timed out") && e.contains("barrier"), "{e}");
    }
}
