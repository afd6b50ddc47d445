//! Paged optimizer state (the third QLoRA idea): AdamW's m and v live in pinned host memory and are
//! streamed through a small device buffer chunk by chunk at each step, so optimizer state never takes
//! device memory from activations. Costs two PCIe transfers of the state per step (2·8 bytes per
//! parameter); for LoRA-sized parameter counts that is milliseconds.
//!
//! Not part of the `Backend` trait (which has no notion of host-resident state): a trainer that runs on
//! `Cuda` calls [`Cuda::adamw_paged`] instead of `Backend::adamw` when the switch is on.

use super::{be, Arg, Cuda, CudaBuf, Data, Dtype};
use crate::backend::AdamW;
use crate::error::{check_len, ensure, KernelError, Result};
use crate::launch;
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
        let alloc = || -> Result<PinnedHostSlice<f32>> {
            // SAFETY: flags 0 = plain page-locked memory (not write-combined, so the host may read it);
            // every element is initialised right below, before any read.
            let mut s = unsafe { self.ctx.alloc_pinned_with_flags::<f32>(len.max(1), 0) }
                .map_err(be("allocating pinned host memory"))?;
            s.as_mut_slice()
                .map_err(be("writing pinned state"))?
                .fill(0.0);
            Ok(s)
        };
        Ok(PagedAdamState {
            m: alloc()?,
            v: alloc()?,
            len,
        })
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
        ensure("adamw_paged", "step", h.step >= 1, || {
            "AdamW step is 1-based".into()
        })?;
        if n == 0 {
            return Ok(());
        }
        let t = h.step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - (h.beta1 as f64).powi(t);
        let bc2 = 1.0 - (h.beta2 as f64).powi(t);
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
            self.launch(
                "adamw.cu",
                "adamw_k",
                launch::elementwise(c),
                &[
                    Arg::BufAt(p, off),
                    Arg::BufAt(g, off),
                    Arg::Buf(&dm),
                    Arg::Buf(&dv),
                    Arg::I64(c as i64),
                    Arg::F32(h.lr),
                    Arg::F32(h.beta1),
                    Arg::F32(h.beta2),
                    Arg::F32(h.eps),
                    Arg::F32(h.weight_decay),
                    Arg::F32(bc1 as f32),
                    Arg::F32(bc2.sqrt() as f32),
                ],
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
