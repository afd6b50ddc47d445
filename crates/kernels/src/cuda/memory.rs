//! Device memory of the CUDA backend: buffers and ids to and from the host (the allocation
//! helpers `Cuda::zeros_as` / `Cuda::from_host_as` are in mod.rs).

use super::{be, Cuda, CudaBuf, CudaIds, Data};
use crate::contract::IdStats;
use crate::error::Result;
use cudarc::driver::{CudaSlice, DeviceRepr};

pub(super) fn to_host(cu: &Cuda, buf: &CudaBuf) -> Result<Vec<f32>> {
    let mut v: Vec<f32> = match &buf.data {
        Data::F32(s) => cu.stream.clone_dtoh(s).map_err(be("device to host copy"))?,
        Data::Bf16(s) => widen(cu, s)?,
        Data::F16(s) => widen(cu, s)?,
    };
    v.truncate(buf.len);
    Ok(v)
}

/// A 16-bit device slice on the host as f32 (exact).
fn widen<T: DeviceRepr + Copy>(cu: &Cuda, s: &CudaSlice<T>) -> Result<Vec<f32>>
where
    f32: From<T>,
{
    let h = cu.stream.clone_dtoh(s).map_err(be("device to host copy"))?;
    Ok(h.into_iter().map(f32::from).collect())
}

pub(super) fn ids_from_host(cu: &Cuda, ids: &[i32]) -> Result<CudaIds> {
    let data = if ids.is_empty() {
        cu.stream.alloc_zeros::<i32>(1).map_err(be("alloc"))?
    } else {
        cu.stream
            .clone_htod(ids)
            .map_err(be("host to device copy"))?
    };
    Ok(CudaIds {
        data,
        len: ids.len(),
        stats: IdStats::of(ids),
    })
}
