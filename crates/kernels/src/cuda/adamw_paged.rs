//! Paged optimizer state (the third QLoRA idea): AdamW's m and v live in pinned host memory and are
//! streamed through a small device buffer chunk by chunk at each step, so optimizer state never takes
//! device memory from activations. Costs two PCIe transfers of the state per step (2·8 bytes per
//! parameter); for LoRA-sized parameter counts that is milliseconds.
//!
//! Reached through the `Backend` trait: `adam_state(n, paged = true)` gives a
//! `CudaAdamState::Paged`, and `adamw_step` on it calls [`Cuda::adamw_paged`]. The kernel and the
//! scalars are the resident step's (`adamw_k`, `AdamScalars`), so paged and resident give
//! bit-identical parameters and moments.

use super::args::BufArg;
use super::{be, Cuda, CudaBuf, Data, Dtype};
use crate::backend::AdamW;
use crate::cpu::adamw::AdamScalars;
use crate::error::{check_len, KernelError, Result};
use cudarc::driver::PinnedHostSlice;

/// Elements of m (and of v) on the device at once: 16 MiB each.
const CHUNK: usize = 1 << 22;

/// AdamW first and second moments of `len` parameters in pinned (page-locked, cached) host memory.
pub struct PagedAdamState {
    m: PinnedHostSlice<f32>,
    v: PinnedHostSlice<f32>,
    len: usize,
}

impl PagedAdamState {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host copies of (m, v), e.g. for a checkpoint.
    pub fn to_vecs(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let m = self.m.as_slice().map_err(be("reading pinned state"))?[..self.len].to_vec();
        let v = self.v.as_slice().map_err(be("reading pinned state"))?[..self.len].to_vec();
        Ok((m, v))
    }
}

impl Cuda {
    /// Zeroed paged AdamW state for `len` parameters.
    pub fn paged_adam_state(&self, len: usize) -> Result<PagedAdamState> {
        Ok(PagedAdamState {
            m: self.pinned_from(len, None)?,
            v: self.pinned_from(len, None)?,
            len,
        })
    }

    /// Paged AdamW state holding the given moments (a checkpoint's), bit for bit.
    pub fn paged_adam_state_from_host(&self, m: &[f32], v: &[f32]) -> Result<PagedAdamState> {
        check_len("paged_adam_state_from_host", "v", v.len(), m.len(), || {
            format!("[len(m)={}]", m.len())
        })?;
        Ok(PagedAdamState {
            m: self.pinned_from(m.len(), Some(m))?,
            v: self.pinned_from(v.len(), Some(v))?,
            len: m.len(),
        })
    }

    /// `len` f32 of pinned host memory holding `init` (zeros when None).
    fn pinned_from(&self, len: usize, init: Option<&[f32]>) -> Result<PinnedHostSlice<f32>> {
        // SAFETY: flags 0 = plain page-locked memory (not write-combined, so the host may read it);
        // every element is initialised right below, before any read.
        let mut s = unsafe { self.ctx.alloc_pinned_with_flags::<f32>(len.max(1), 0) }
            .map_err(be("allocating pinned host memory"))?;
        let dst = s.as_mut_slice().map_err(be("writing pinned state"))?;
        dst.fill(0.0);
        if let Some(src) = init {
            dst[..src.len()].copy_from_slice(src);
        }
        Ok(s)
    }

    /// One torch-AdamW step like `Backend::adamw`, with m and v in `state` (host); p and g on the
    /// device. Returns after the state is back on the host.
    pub fn adamw_paged(
        &self,
        p: &mut CudaBuf,
        g: &CudaBuf,
        state: &mut PagedAdamState,
        h: &AdamW,
    ) -> Result<()> {
        let n = p.len;
        check_len("adamw_paged", "g", g.len, n, || format!("[{n}]"))?;
        check_len("adamw_paged", "state", state.len, n, || format!("[{n}]"))?;
        let sc = AdamScalars::new("adamw_paged", h)?;
        self.paged_step(p, g, state, &sc)
    }

    /// The step of `adamw_paged` once the lengths and scalars are checked.
    pub(super) fn paged_step(
        &self,
        p: &mut CudaBuf,
        g: &CudaBuf,
        state: &mut PagedAdamState,
        sc: &AdamScalars,
    ) -> Result<()> {
        let n = p.len;
        if n == 0 {
            return Ok(());
        }
        let chunk = CHUNK.min(n);
        let mut dm = self.zeros_as(chunk, Dtype::F32)?;
        let mut dv = self.zeros_as(chunk, Dtype::F32)?;
        let p: &CudaBuf = p;
        let mut off = 0;
        while off < n {
            let c = chunk.min(n - off);
            {
                let (Data::F32(ms), Data::F32(vs)) = (&mut dm.data, &mut dv.data) else {
                    return Err(KernelError::Backend {
                        backend: "cuda",
                        msg: "internal: paged state scratch is not f32".into(),
                    });
                };
                let hm = &state.m.as_slice().map_err(be("reading pinned state"))?[off..off + c];
                self.stream
                    .memcpy_htod(hm, &mut ms.slice_mut(0..c))
                    .map_err(be("state host to device"))?;
                let hv = &state.v.as_slice().map_err(be("reading pinned state"))?[off..off + c];
                self.stream
                    .memcpy_htod(hv, &mut vs.slice_mut(0..c))
                    .map_err(be("state host to device"))?;
            }
            self.launch_adamw(
                BufArg::at(p, off),
                BufArg::at(g, off),
                (&dm).into(),
                (&dv).into(),
                c,
                sc,
            )?;
            {
                let (Data::F32(ms), Data::F32(vs)) = (&dm.data, &dv.data) else {
                    return Err(KernelError::Backend {
                        backend: "cuda",
                        msg: "internal: paged state scratch is not f32".into(),
                    });
                };
                let hm =
                    &mut state.m.as_mut_slice().map_err(be("writing pinned state"))?[off..off + c];
                self.stream
                    .memcpy_dtoh(&ms.slice(0..c), hm)
                    .map_err(be("state device to host"))?;
                let hv =
                    &mut state.v.as_mut_slice().map_err(be("writing pinned state"))?[off..off + c];
                self.stream
                    .memcpy_dtoh(&vs.slice(0..c), hv)
                    .map_err(be("state device to host"))?;
            }
            off += c;
        }
        // Copies into pinned memory are asynchronous: the state is only valid after this.
        self.synchronize()
    }
}
