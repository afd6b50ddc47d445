//! The NCCL communicator on one GPU (world size 1: no machine here has two). Built with
//! `--features nccl`; prints `skipped` and passes where there is no CUDA driver; with a driver, a
//! missing libnccl.so fails the test (the GPU bundle's run.sh puts one on the loader path).
#![cfg(feature = "nccl")]

use std::time::Duration;

use afinar_kernels::cuda::Cuda;
use afinar_kernels::nccl::{self, NcclComm};
use afinar_kernels::{Backend, Storage};

fn setup() -> Option<(Cuda, NcclComm)> {
    let cuda = Cuda::try_new().expect("CUDA driver present but unusable")?;
    // cudarc looks for libnccl.so (not the .so.2 of the runtime packages): run.sh links one.
    assert!(
        nccl::is_available(),
        "a CUDA driver but no libnccl.so on the loader path (symlink libnccl.so to libnccl.so.2)"
    );
    let id = nccl::unique_id().unwrap();
    let comm = NcclComm::new(&cuda, 0, 1, &id, Duration::from_secs(60)).unwrap();
    Some((cuda, comm))
}

#[test]
fn cuda_nccl_one_rank_collectives_keep_the_values() {
    let Some((cuda, comm)) = setup() else {
        eprintln!("skipped: no CUDA driver");
        return;
    };
    let a: Vec<f32> = (0..1000).map(|i| i as f32 * 0.25 - 7.0).collect();
    let mut ba = cuda.from_host_for(&a, Storage::Master).unwrap();
    let mut bb = cuda.from_host_for(&[3.5], Storage::Master).unwrap();
    // An activation-dtype (bf16 by default) buffer goes through NCCL's bf16 sum.
    let mut bc = cuda.from_host(&[1.0, -2.0]).unwrap();
    comm.all_reduce_sum(&mut [&mut ba, &mut bb, &mut bc])
        .unwrap();
    assert_eq!(cuda.to_host(&ba).unwrap(), a);
    assert_eq!(cuda.to_host(&bb).unwrap(), vec![3.5]);
    assert_eq!(cuda.to_host(&bc).unwrap(), vec![1.0, -2.0]);
    let mut x = [1.5f64, -2.25];
    comm.all_reduce_f64(&mut x).unwrap();
    assert_eq!(x, [1.5, -2.25]);
    let mut bytes: Vec<u8> = (0..=255).collect();
    comm.broadcast_bytes(0, &mut bytes).unwrap();
    assert_eq!(bytes, (0..=255).collect::<Vec<u8>>());
    comm.barrier().unwrap();
    assert!(
        comm.broadcast_bytes(1, &mut bytes).is_err(),
        "root 1 in a world of 1"
    );
    // After an abort every call fails instead of touching the communicator.
    comm.abort();
    let e = comm.barrier().unwrap_err().to_string();
    assert!(e.contains("aborted"), "{e}");
}
