//! Kernel arguments as the typed launch methods of `crate::abi` take them, and the launch itself.
//!
//! A [`BufArg`] becomes two C parameters, the device pointer and then the `int` dtype tag of the
//! buffer it points into (`const void* x, int xdt`); a [`PtrArg`] one typed pointer. Either may
//! start at an element offset (a row chunk, a `copy_range` window) or be null (an unused optional
//! argument: the kernel takes a flag next to it and does not read it).

use super::{CudaBuf, Data, Dtype};
use crate::error::{KernelError, Result};
use crate::launch::Launch;
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

/// The null device pointer pushed for an absent argument.
static NULL: u64 = 0;

/// A dtype-tagged buffer argument.
#[derive(Clone, Copy)]
pub(crate) enum BufArg<'a> {
    Whole(&'a CudaBuf),
    /// The buffer from this element on (the offset lies within the allocation: callers checked it).
    At(&'a CudaBuf, usize),
    /// A null pointer with the f32 tag.
    Null,
}

impl<'a> BufArg<'a> {
    pub(crate) fn at(buf: &'a CudaBuf, off: usize) -> Self {
        BufArg::At(buf, off)
    }

    /// The pointer to push and the tag that follows it.
    pub(crate) fn view(self) -> (BufView<'a>, &'static i32) {
        let (buf, off) = match self {
            BufArg::Whole(b) => (b, 0),
            BufArg::At(b, off) => (b, off),
            BufArg::Null => return (BufView::Null, Dtype::F32.tag()),
        };
        let v = match &buf.data {
            Data::F32(s) => BufView::F32(s.slice(off..)),
            Data::Bf16(s) => BufView::Bf16(s.slice(off..)),
            Data::F16(s) => BufView::F16(s.slice(off..)),
        };
        (v, buf.dtype().tag())
    }
}

impl<'a> From<&'a CudaBuf> for BufArg<'a> {
    fn from(b: &'a CudaBuf) -> Self {
        BufArg::Whole(b)
    }
}

impl<'a> From<&'a mut CudaBuf> for BufArg<'a> {
    fn from(b: &'a mut CudaBuf) -> Self {
        BufArg::Whole(b)
    }
}

impl<'a> From<Option<&'a CudaBuf>> for BufArg<'a> {
    fn from(b: Option<&'a CudaBuf>) -> Self {
        b.map_or(BufArg::Null, BufArg::Whole)
    }
}

/// The device pointer of a [`BufArg`].
pub(crate) enum BufView<'a> {
    F32(CudaView<'a, f32>),
    Bf16(CudaView<'a, bf16>),
    F16(CudaView<'a, f16>),
    Null,
}

impl BufView<'_> {
    pub(crate) fn push<'b>(&'b self, args: &mut LaunchArgs<'b>) {
        match self {
            BufView::F32(v) => args.arg(v),
            BufView::Bf16(v) => args.arg(v),
            BufView::F16(v) => args.arg(v),
            BufView::Null => args.arg(&NULL),
        };
    }
}

/// A typed pointer argument (`int*`, `u8*`, `float*`, `double*`).
pub(crate) enum PtrArg<'a, T> {
    Whole(&'a CudaSlice<T>),
    /// The slice from this element on.
    At(&'a CudaSlice<T>, usize),
    Null,
}

impl<'a, T> PtrArg<'a, T> {
    pub(crate) fn view(self) -> PtrView<'a, T> {
        match self {
            PtrArg::Whole(s) => PtrView::View(s.slice(0..)),
            PtrArg::At(s, off) => PtrView::View(s.slice(off..)),
            PtrArg::Null => PtrView::Null,
        }
    }
}

impl<'a, T> From<&'a CudaSlice<T>> for PtrArg<'a, T> {
    fn from(s: &'a CudaSlice<T>) -> Self {
        PtrArg::Whole(s)
    }
}

impl<'a, T> From<Option<&'a CudaSlice<T>>> for PtrArg<'a, T> {
    fn from(s: Option<&'a CudaSlice<T>>) -> Self {
        s.map_or(PtrArg::Null, PtrArg::Whole)
    }
}

/// The device pointer of a [`PtrArg`].
pub(crate) enum PtrView<'a, T> {
    View(CudaView<'a, T>),
    Null,
}

impl<T> PtrView<'_, T> {
    pub(crate) fn push<'b>(&'b self, args: &mut LaunchArgs<'b>) {
        match self {
            PtrView::View(v) => args.arg(v),
            PtrView::Null => args.arg(&NULL),
        };
    }
}

/// The file of `kernel` in a group declaration, or an error naming the group.
pub(crate) fn group_file(
    group: &[(&'static str, &'static str)],
    method: &str,
    kernel: &str,
) -> Result<&'static str> {
    group
        .iter()
        .find(|(_, k)| *k == kernel)
        .map(|(f, _)| *f)
        .ok_or_else(|| KernelError::Backend {
            backend: "cuda",
            msg: format!("internal: kernel `{kernel}` is not one of `{method}`'s kernels"),
        })
}

/// Opts `func` in to the dynamic shared memory `geometry` asks for when that is above the 48 KiB a
/// block may use without asking (attention_flash.cu's kernels: up to 148.5 KiB). The path functions
/// only select such a kernel when the device's opt-in limit allows it (`PathCaps::max_dyn_smem`).
pub(crate) fn allow_dynamic_smem(func: &CudaFunction, geometry: Launch, name: &str) -> Result<()> {
    if geometry.shared_mem_bytes <= crate::launch::SMEM_STATIC_MAX {
        return Ok(());
    }
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        geometry.shared_mem_bytes as i32,
    )
    .map_err(|e| KernelError::Backend {
        backend: "cuda",
        msg: format!(
            "allowing {name} {} bytes of dynamic shared memory: {e:?}",
            geometry.shared_mem_bytes
        ),
    })
}

/// Launches with the arguments pushed so far.
///
/// # Safety
/// `args` must push exactly the kernel's parameters, in order and kind, and every pointer must be
/// valid for what the kernel reads and writes under `geometry` and the pushed dims. The launch methods
/// generated from the declarations of `crate::abi` are the only callers.
pub(crate) unsafe fn launch(mut args: LaunchArgs<'_>, geometry: Launch, name: &str) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: geometry.grid,
        block_dim: geometry.block,
        shared_mem_bytes: geometry.shared_mem_bytes,
    };
    // SAFETY: forwarded from this function's contract.
    unsafe { args.launch(cfg) }.map_err(|e| KernelError::Backend {
        backend: "cuda",
        msg: format!("launching {name}: {e:?}"),
    })?;
    Ok(())
}
