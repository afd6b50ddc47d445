//! One rank of a data-parallel job started by `afinar train --nproc N` or torchrun (the RANK /
//! WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT variables): the rank's GPU, its NCCL
//! communicator, then [`super::train_with_dist`].
//!
//! Why data parallelism is CUDA-only: the CPU backend already spreads one step over every core
//! (rayon), so N CPU processes on one machine would share the same cores, and across machines a
//! home-made TCP all-reduce is exactly the transport the design avoids (NCCL is what multi-GPU
//! trainers use). The in-process collective (`dist::local`) runs the same trainer code on the CPU in
//! the tests; a CPU run with WORLD_SIZE > 1 is refused with that explanation.

use super::{Result, TrainError, TrainOptions, TrainOutcome};
use crate::config::Device;
use crate::dist::WorldEnv;

/// Trains as rank `world.rank` of `world.world_size`. Rank 0 returns the outcome, the others None.
/// A world of one on the CPU is the ordinary run; on CUDA (built with `nccl`) it goes through NCCL,
/// so a one-GPU machine exercises the whole multi-GPU path.
pub fn train_rank(opts: &TrainOptions, world: &WorldEnv) -> Result<Option<TrainOutcome>> {
    match opts.config.model.device {
        Device::Cpu if world.world_size == 1 => super::train(opts).map(Some),
        Device::Cpu => Err(TrainError::Unsupported(format!(
            "WORLD_SIZE = {}: data-parallel training runs on CUDA GPUs over NCCL (model.device = \"cuda\"). \
             The CPU backend trains in one process and already uses every core; run it without --nproc \
             and without the torchrun variables",
            world.world_size
        ))),
        Device::Cuda => cuda_rank(opts, world),
    }
}

#[cfg(feature = "nccl")]
fn cuda_rank(opts: &TrainOptions, world: &WorldEnv) -> Result<Option<TrainOutcome>> {
    use afinar_kernels::cuda::Cuda;
    use std::sync::Arc;
    let Some(cuda) = Cuda::try_new_with(super::cuda_options(&opts.config, world.local_rank))?
    else {
        return Err(TrainError::Unsupported(format!(
            "rank {}: no CUDA device {} (LOCAL_RANK) on this machine; --nproc must not exceed the GPUs of a node",
            world.rank, world.local_rank
        )));
    };
    let comm = crate::dist::nccl::connect(&cuda, world)?;
    let faults = super::Faults::default();
    if opts.config.train.profile || crate::profile::env_enabled() {
        let be = Arc::new(afinar_kernels::profile::Profiled::new(cuda)?);
        super::train_with_dist(be, opts, &faults, &comm)
    } else {
        super::train_with_dist(Arc::new(cuda), opts, &faults, &comm)
    }
}

#[cfg(not(feature = "nccl"))]
fn cuda_rank(opts: &TrainOptions, world: &WorldEnv) -> Result<Option<TrainOutcome>> {
    if world.world_size == 1 {
        return super::train(opts).map(Some);
    }
    Err(TrainError::Unsupported(format!(
        "WORLD_SIZE = {}: this afinar was built without NCCL; rebuild with \
         `cargo build --release -p afinar-trainer --features nccl` (it includes `cuda`)",
        world.world_size
    )))
}
