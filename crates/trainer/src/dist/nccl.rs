//! The NCCL transport (feature `nccl`): [`Collective`] over `afinar_kernels::nccl::NcclComm`, and
//! the setup of one rank — its GPU (LOCAL_RANK), rank 0's unique id through the TCP rendezvous, the
//! communicator.

use afinar_kernels::cuda::Cuda;
use afinar_kernels::nccl::{self, NcclComm};
use afinar_kernels::profile::Profiled;

use super::{rendezvous, timeout_from_env, Collective, DistError, Result, WorldEnv};

fn k(e: afinar_kernels::KernelError) -> DistError {
    DistError::Backend(e.to_string())
}

/// Makes this rank's communicator on `cuda` (the device LOCAL_RANK): rank 0 creates the unique id and
/// serves it at MASTER_ADDR:MASTER_PORT, the others fetch it; then every rank joins.
pub fn connect(cuda: &Cuda, world: &WorldEnv) -> Result<NcclComm> {
    let timeout = timeout_from_env();
    let id: [u8; 128] = if world.rank == 0 {
        let id = nccl::unique_id().map_err(k)?;
        if world.world_size > 1 {
            rendezvous::serve(&world.master, world.world_size, &id, timeout)?;
        }
        id
    } else {
        let got = rendezvous::fetch(&world.master, world.rank, world.world_size, timeout)?;
        got.try_into().map_err(|v: Vec<u8>| DistError::Rendezvous {
            addr: world.master.clone(),
            message: format!("rank 0 sent a {}-byte id, NCCL's is 128", v.len()),
        })?
    };
    NcclComm::new(cuda, world.rank, world.world_size, &id, timeout).map_err(k)
}

impl Collective<Cuda> for NcclComm {
    fn rank(&self) -> usize {
        NcclComm::rank(self)
    }
    fn world_size(&self) -> usize {
        NcclComm::world_size(self)
    }
    fn all_reduce_bufs(
        &self,
        _: &Cuda,
        bufs: &mut [&mut <Cuda as afinar_kernels::Backend>::Buf],
    ) -> Result<()> {
        self.all_reduce_sum(bufs).map_err(k)
    }
    fn all_reduce_f64(&self, xs: &mut [f64]) -> Result<()> {
        NcclComm::all_reduce_f64(self, xs).map_err(k)
    }
    fn broadcast_bytes(&self, root: usize, bytes: &mut Vec<u8>) -> Result<()> {
        NcclComm::broadcast_bytes(self, root, bytes).map_err(k)
    }
    fn barrier(&self) -> Result<()> {
        NcclComm::barrier(self).map_err(k)
    }
    fn abort(&self, _reason: &str) {
        NcclComm::abort(self)
    }
    fn exchanges(&self) -> bool {
        true
    }
}

/// The profiled CUDA backend (`train.profile`) has the same buffers.
impl Collective<Profiled<Cuda>> for NcclComm {
    fn rank(&self) -> usize {
        NcclComm::rank(self)
    }
    fn world_size(&self) -> usize {
        NcclComm::world_size(self)
    }
    fn all_reduce_bufs(
        &self,
        _: &Profiled<Cuda>,
        bufs: &mut [&mut <Cuda as afinar_kernels::Backend>::Buf],
    ) -> Result<()> {
        self.all_reduce_sum(bufs).map_err(k)
    }
    fn all_reduce_f64(&self, xs: &mut [f64]) -> Result<()> {
        NcclComm::all_reduce_f64(self, xs).map_err(k)
    }
    fn broadcast_bytes(&self, root: usize, bytes: &mut Vec<u8>) -> Result<()> {
        NcclComm::broadcast_bytes(self, root, bytes).map_err(k)
    }
    fn barrier(&self) -> Result<()> {
        NcclComm::barrier(self).map_err(k)
    }
    fn abort(&self, _reason: &str) {
        NcclComm::abort(self)
    }
    fn exchanges(&self) -> bool {
        true
    }
}
