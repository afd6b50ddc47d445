//! Device memory of the CUDA backend: buffers and ids to and from the host (the allocation
//! helpers `Cuda::zeros_as` / `Cuda::from_host_as` are in mod.rs).

use std::sync::atomic::Ordering;

use super::{be, Cuda, CudaBuf, CudaIds, Data};
use crate::backend::DeviceMemory;
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

impl Cuda {
    /// (free, total) bytes of this device, as the driver reports them (cuMemGetInfo: other processes
    /// and the context count as used).
    pub fn mem_info(&self) -> Result<(u64, u64)> {
        let (free, total) = self.ctx.mem_get_info().map_err(be("cuMemGetInfo"))?;
        Ok((free as u64, total as u64))
    }

    /// Raises the high-water mark to the device's current use. Called after every `zeros_as` (the
    /// allocation every buffer of the backend goes through but the f32 scratch of a few kernels); one
    /// cuMemGetInfo, a driver call of about a microsecond. A failed query leaves the mark as it was.
    pub(super) fn note_device_use(&self) {
        if let Ok((free, total)) = self.mem_info() {
            self.device_peak
                .fetch_max(total.saturating_sub(free), Ordering::Relaxed);
        }
    }

    /// Used, peak and total device memory now (None if the driver cannot be asked).
    pub fn device_memory_now(&self) -> Option<DeviceMemory> {
        let (free, total) = self.mem_info().ok()?;
        let used = total.saturating_sub(free);
        let peak = self
            .device_peak
            .fetch_max(used, Ordering::Relaxed)
            .max(used);
        Some(DeviceMemory { used, peak, total })
    }
}

/// (free, total) bytes of device `ordinal` without building a backend (`afinar plan`, the train
/// refusal): Ok(None) when there is no CUDA driver or no such device. Creates (and drops) a context,
/// which itself takes a few hundred MiB while it lives.
pub fn probe_device_memory(ordinal: usize) -> Result<Option<(u64, u64)>> {
    // SAFETY: only asks the dynamic loader whether libcuda can be opened; CudaContext::new would
    // panic without it (see `Cuda::try_new_with`).
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Ok(None);
    }
    match cudarc::driver::CudaContext::device_count() {
        Ok(n) if (n.max(0) as usize) > ordinal => {}
        _ => return Ok(None),
    }
    let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(be("creating the CUDA context"))?;
    let (free, total) = ctx.mem_get_info().map_err(be("cuMemGetInfo"))?;
    Ok(Some((free as u64, total as u64)))
}
