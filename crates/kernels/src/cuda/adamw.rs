//! AdamW: kernels/adamw.cu, with the CPU reference's host-computed scalars (`AdamScalars`), so both
//! backends run the same f32 operations. Device-resident moments here; the paged optimizer in
//! adamw_paged.rs. CPU twin: cpu/adamw.rs.

use super::args::BufArg;
use super::{n64, Cuda, CudaAdamState, CudaBuf, Dtype};
use crate::backend::{AdamMoments, AdamW, Backend};
use crate::contract;
use crate::cpu::adamw::AdamScalars;
use crate::error::Result;
use crate::launch::{self};

impl Cuda {
    /// Launches `adamw_k` over n elements of (p, g, m, v) with the host-computed scalars `sc` (the
    /// CPU reference's, so both backends run the same f32 operations; see kernels/adamw.cu).
    pub(crate) fn launch_adamw(
        &self,
        p: BufArg<'_>,
        g: BufArg<'_>,
        m: BufArg<'_>,
        v: BufArg<'_>,
        n: usize,
        sc: &AdamScalars,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.adamw_k(
            launch::elementwise(n),
            p,
            g,
            m,
            v,
            n64(n),
            sc.decay.is_some() as i32,
            sc.decay.unwrap_or(1.0),
            sc.w1_small as i32,
            sc.w1,
            sc.w1_minus_1,
            sc.b2,
            sc.one_minus_b2,
            sc.neg_step_size,
            sc.bc2_sqrt,
            sc.eps,
        )
    }
}

pub(super) fn adamw(
    cu: &Cuda,
    p: &mut CudaBuf,
    g: &CudaBuf,
    m: &mut CudaBuf,
    v: &mut CudaBuf,
    h: &AdamW,
) -> Result<()> {
    let n = p.len;
    contract::adamw(n, g.len, m.len, v.len)?;
    let sc = AdamScalars::new("adamw", h)?;
    cu.launch_adamw(p.into(), g.into(), m.into(), v.into(), n, &sc)
}

pub(super) fn adam_state(cu: &Cuda, n: usize, paged: bool) -> Result<CudaAdamState> {
    Ok(if paged {
        CudaAdamState::Paged(cu.paged_adam_state(n)?)
    } else {
        CudaAdamState::Device(AdamMoments {
            m: cu.zeros_as(n, Dtype::F32)?,
            v: cu.zeros_as(n, Dtype::F32)?,
        })
    })
}

pub(super) fn adam_state_from_host(
    cu: &Cuda,
    m: &[f32],
    v: &[f32],
    paged: bool,
) -> Result<CudaAdamState> {
    contract::adam_state_from_host(m.len(), v.len())?;
    Ok(if paged {
        CudaAdamState::Paged(cu.paged_adam_state_from_host(m, v)?)
    } else {
        CudaAdamState::Device(AdamMoments {
            m: cu.from_host_as(m, Dtype::F32)?,
            v: cu.from_host_as(v, Dtype::F32)?,
        })
    })
}

pub(super) fn adam_state_to_host(cu: &Cuda, s: &CudaAdamState) -> Result<(Vec<f32>, Vec<f32>)> {
    match s {
        CudaAdamState::Device(d) => Ok((cu.to_host(&d.m)?, cu.to_host(&d.v)?)),
        CudaAdamState::Paged(p) => p.to_vecs(),
    }
}

pub(super) fn adamw_step(
    cu: &Cuda,
    p: &mut CudaBuf,
    g: &CudaBuf,
    s: &mut CudaAdamState,
    h: &AdamW,
) -> Result<()> {
    match s {
        CudaAdamState::Device(d) => adamw(cu, p, g, &mut d.m, &mut d.v, h),
        CudaAdamState::Paged(st) => {
            // The same contract (and errors) as a resident state: the moments stand in for m and v.
            contract::adamw(p.len, g.len, st.len(), st.len())?;
            let sc = AdamScalars::new("adamw", h)?;
            cu.paged_step(p, g, st, &sc)
        }
    }
}
