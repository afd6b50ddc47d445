//! NCCL collectives on the CUDA backend's device buffers (feature `nccl`), for data-parallel training.
//!
//! One [`NcclComm`] per process (one rank per GPU), made from rank 0's unique id ([`unique_id`],
//! handed to the other ranks by the trainer's TCP rendezvous). Every operation is enqueued on the
//! backend's own stream — the stream the gradients were computed on — so it is ordered after the
//! backward without an extra synchronization, and the caller then waits for it with [`NcclComm`]'s
//! watchdog: the stream is polled together with `ncclCommGetAsyncError`, and a peer's failure (an
//! asynchronous NCCL error) or a timeout aborts the communicator (`ncclCommAbort`) and returns an
//! error instead of blocking forever. Several buffers go in one `ncclGroupStart/End` (a bucket: NCCL
//! fuses them into one launch).
//!
//! libnccl is loaded at run time (cudarc's dynamic loading): a build with this feature runs on a
//! machine without NCCL until a communicator is asked for, which then fails with a clear error.
//!
//! Status: compiled and checked here; it has never run with more than one GPU (see the README).

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaStream, DevicePtrMut};
use cudarc::nccl::{result, sys};

use crate::cuda::{Cuda, CudaBuf, Data};
use crate::error::{KernelError, Result};

fn err(msg: impl Into<String>) -> KernelError {
    KernelError::Backend {
        backend: "nccl",
        msg: msg.into(),
    }
}

/// The error for a machine where cudarc cannot open libnccl.
fn missing() -> KernelError {
    err(
            "libnccl.so cannot be loaded: install NCCL (e.g. python3 -m pip install nvidia-nccl-cu13) and \
             put its lib directory on LD_LIBRARY_PATH; cudarc opens `libnccl.so`, so where only \
             libnccl.so.2 exists (pip wheels, the libnccl2 package) add a symlink libnccl.so -> libnccl.so.2 \
             in a directory on LD_LIBRARY_PATH"
    )
}

/// Whether libnccl can be loaded on this machine.
pub fn is_available() -> bool {
    // SAFETY: only asks the dynamic loader whether libnccl can be opened (cudarc's loader panics
    // when a symbol is used without the library, so this comes before any NCCL call).
    unsafe { sys::is_culib_present() }
}

/// A new NCCL unique id (rank 0 makes it and sends its 128 bytes to the other ranks).
pub fn unique_id() -> Result<[u8; 128]> {
    if !is_available() {
        return Err(missing());
    }
    let id = result::get_uniqueid().map_err(|e| err(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal.map(|c| c as u8))
}

/// One rank's NCCL communicator, bound to a CUDA backend's device and stream.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    /// Set once the communicator has been aborted (after that every call fails).
    aborted: AtomicBool,
    /// NCCL calls on one communicator must not run concurrently.
    lock: Mutex<()>,
}

// SAFETY: `comm` is an opaque NCCL handle; NCCL allows using a communicator from any thread as long
// as calls on it are not concurrent, which `lock` ensures (abort, which NCCL allows from another
// thread, is the one call made without it).
unsafe impl Send for NcclComm {}
// SAFETY: as above; every method that calls NCCL takes `lock` or only aborts.
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// Joins the communicator of `id` as `rank` of `world_size`, on `cuda`'s device and stream.
    /// Blocks until every rank has joined (ncclCommInitRank); the trainer's rendezvous has already
    /// seen every rank alive by then.
    pub fn new(
        cuda: &Cuda,
        rank: usize,
        world_size: usize,
        id: &[u8; 128],
        timeout: Duration,
    ) -> Result<Self> {
        if !is_available() {
            return Err(missing());
        }
        if rank >= world_size {
            return Err(err(format!("rank {rank} of a world of {world_size}")));
        }
        let stream = cuda.stream().clone();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| err(format!("binding the CUDA context: {e:?}")))?;
        let id = sys::ncclUniqueId {
            internal: id.map(|b| b as ::core::ffi::c_char),
        };
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by NCCL on success and only read then; the device is current.
        let comm = unsafe {
            result::comm_init_rank(comm.as_mut_ptr(), world_size as i32, id, rank as i32).map_err(
                |e| {
                    err(format!(
                        "ncclCommInitRank (rank {rank} of {world_size}): {e:?}"
                    ))
                },
            )?;
            comm.assume_init()
        };
        Ok(NcclComm {
            comm,
            stream,
            rank,
            world_size,
            timeout,
            aborted: AtomicBool::new(false),
            lock: Mutex::new(()),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Aborts the communicator (idempotent): pending and later operations fail on this rank, and the
    /// other ranks' operations that need it report an asynchronous error.
    pub fn abort(&self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: the handle is valid until Drop, which does nothing after an abort.
            let _ = unsafe { result::comm_abort(self.comm) };
        }
    }

    fn check_open(&self, op: &str) -> Result<()> {
        if self.aborted.load(Ordering::SeqCst) {
            return Err(err(format!(
                "{op}: the communicator was aborted after an earlier failure"
            )));
        }
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| err(format!("binding the CUDA context: {e:?}")))
    }

    /// Waits for the stream (and so the collectives just enqueued), watching NCCL's asynchronous
    /// error state and the timeout; either aborts the communicator and returns an error.
    fn wait(&self, op: &str) -> Result<()> {
        use cudarc::driver::sys::CUresult;
        let deadline = Instant::now() + self.timeout;
        loop {
            // SAFETY: queries the backend's stream, alive as long as `self.stream`.
            match unsafe { cudarc::driver::sys::cuStreamQuery(self.stream.cu_stream()) } {
                CUresult::CUDA_SUCCESS => return Ok(()),
                CUresult::CUDA_ERROR_NOT_READY => {}
                e => {
                    self.abort();
                    return Err(err(format!("{op}: the CUDA stream failed: {e:?}")));
                }
            }
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is valid (not destroyed); `state` is a valid out pointer.
            let r = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            let bad = |s: sys::ncclResult_t| {
                s != sys::ncclResult_t::ncclSuccess && s != sys::ncclResult_t::ncclInProgress
            };
            if bad(r) || bad(state) {
                self.abort();
                return Err(err(format!(
                    "{op} on rank {}: NCCL reports {:?} (another rank failed or the network between \
                     ranks broke); communicator aborted",
                    self.rank,
                    if bad(state) { state } else { r }
                )));
            }
            if Instant::now() >= deadline {
                self.abort();
                return Err(err(format!(
                    "{op} on rank {}: timed out after {:.0} s waiting for the other ranks; communicator \
                     aborted (AFINAR_DIST_TIMEOUT_S sets the limit)",
                    self.rank,
                    self.timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Sums every buffer over the ranks, in place, in one NCCL group (one fused launch); waits.
    pub fn all_reduce_sum(&self, bufs: &mut [&mut CudaBuf]) -> Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.check_open("all_reduce")?;
        let stream = &self.stream;
        let (comm, cu) = (self.comm, stream.cu_stream());
        result::group_start().map_err(|e| err(format!("ncclGroupStart: {e:?}")))?;
        let mut first_err = None;
        for b in bufs.iter_mut() {
            let n = b.len;
            if n == 0 {
                continue;
            }
            // The pointer and NCCL's name for the storage dtype; `_rec` records this stream's write
            // when dropped, so it lives until the all-reduce is enqueued.
            let (p, dtype, _rec) = match &mut b.data {
                Data::F32(s) => {
                    let (p, rec) = s.device_ptr_mut(stream);
                    (p, sys::ncclDataType_t::ncclFloat32, rec)
                }
                Data::Bf16(s) => {
                    let (p, rec) = s.device_ptr_mut(stream);
                    (p, sys::ncclDataType_t::ncclBfloat16, rec)
                }
                Data::F16(s) => {
                    let (p, rec) = s.device_ptr_mut(stream);
                    (p, sys::ncclDataType_t::ncclFloat16, rec)
                }
            };
            // SAFETY: `p` is a live device allocation of at least `n` elements of `dtype` on this
            // stream's device, reduced in place (send = receive buffer), as NCCL allows.
            let r = unsafe {
                result::all_reduce(
                    p as *const c_void,
                    p as *mut c_void,
                    n,
                    dtype,
                    sys::ncclRedOp_t::ncclSum,
                    comm,
                    cu as _,
                )
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        // The group must be closed even when an enqueue failed.
        let end = result::group_end();
        if let Some(e) = first_err.or(end.err()) {
            self.abort();
            return Err(err(format!("ncclAllReduce: {e:?}")));
        }
        self.wait("all_reduce")
    }

    /// Sums host f64 values over the ranks (through a small device buffer).
    pub fn all_reduce_f64(&self, xs: &mut [f64]) -> Result<()> {
        if xs.is_empty() {
            return Ok(());
        }
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.check_open("all_reduce_f64")?;
        let stream = &self.stream;
        let mut d = stream
            .clone_htod(xs)
            .map_err(|e| err(format!("upload: {e:?}")))?;
        {
            let (p, _rec) = d.device_ptr_mut(stream);
            // SAFETY: `d` holds xs.len() f64 on this device; reduced in place.
            unsafe {
                result::all_reduce(
                    p as *const c_void,
                    p as *mut c_void,
                    xs.len(),
                    sys::ncclDataType_t::ncclFloat64,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm,
                    stream.cu_stream() as _,
                )
            }
            .map_err(|e| {
                self.abort();
                err(format!("ncclAllReduce (f64): {e:?}"))
            })?;
        }
        self.wait("all_reduce_f64")?;
        let host = stream
            .clone_dtoh(&d)
            .map_err(|e| err(format!("download: {e:?}")))?;
        xs.copy_from_slice(&host);
        Ok(())
    }

    /// Rank `root`'s bytes on every rank: the length first, then the bytes.
    pub fn broadcast_bytes(&self, root: usize, bytes: &mut Vec<u8>) -> Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.check_open("broadcast")?;
        if root >= self.world_size {
            return Err(err(format!(
                "broadcast from rank {root} in a world of {}",
                self.world_size
            )));
        }
        let stream = &self.stream;
        let bcast = |p: u64, n: usize, t: sys::ncclDataType_t| {
            // SAFETY: `p` is a live device allocation of `n` elements of type `t`, in place.
            unsafe {
                result::broadcast(
                    p as *const c_void,
                    p as *mut c_void,
                    n,
                    t,
                    root as i32,
                    self.comm,
                    stream.cu_stream() as _,
                )
            }
            .map_err(|e| {
                self.abort();
                err(format!("ncclBroadcast: {e:?}"))
            })
        };
        let mut len = stream
            .clone_htod(&[bytes.len() as u64])
            .map_err(|e| err(format!("upload: {e:?}")))?;
        {
            let (p, _rec) = len.device_ptr_mut(stream);
            bcast(p, 1, sys::ncclDataType_t::ncclUint64)?;
        }
        self.wait("broadcast")?;
        let n = stream
            .clone_dtoh(&len)
            .map_err(|e| err(format!("download: {e:?}")))?[0] as usize;
        if n == 0 {
            bytes.clear();
            return Ok(());
        }
        let mut host = bytes.clone();
        host.resize(n, 0);
        let mut d = stream
            .clone_htod(&host)
            .map_err(|e| err(format!("upload: {e:?}")))?;
        {
            let (p, _rec) = d.device_ptr_mut(stream);
            bcast(p, n, sys::ncclDataType_t::ncclUint8)?;
        }
        self.wait("broadcast")?;
        *bytes = stream
            .clone_dtoh(&d)
            .map_err(|e| err(format!("download: {e:?}")))?;
        Ok(())
    }

    /// Returns when every rank has reached it (an all-reduce of one value).
    pub fn barrier(&self) -> Result<()> {
        self.all_reduce_f64(&mut [0.0])
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.aborted.load(Ordering::SeqCst) {
            // Nothing is pending (every operation waited for its stream); destroy frees the
            // communicator's resources.
            // SAFETY: the handle is valid and used by no other call (we own it).
            let _ = unsafe { result::comm_destroy(self.comm) };
        }
    }
}
