//! tanh-GELU gate × up: kernels/geglu.cu. CPU twin: cpu/geglu.rs.

use super::{n64, Cuda, CudaBuf};
use crate::contract;
use crate::error::Result;
use crate::launch::{self};

pub(super) fn geglu_fwd(cu: &Cuda, gate: &CudaBuf, up: &CudaBuf, out: &mut CudaBuf) -> Result<()> {
    contract::geglu_fwd(gate.len, up.len, out.len)?;
    cu.geglu_fwd_k(launch::elementwise(gate.len), gate, up, out, n64(gate.len))
}

pub(super) fn geglu_bwd(
    cu: &Cuda,
    dout: &CudaBuf,
    gate: &CudaBuf,
    up: &CudaBuf,
    dgate: &mut CudaBuf,
    dup: &mut CudaBuf,
) -> Result<()> {
    let n = gate.len;
    contract::geglu_bwd(dout.len, gate.len, up.len, dgate.len, dup.len)?;
    cu.geglu_bwd_k(launch::elementwise(n), dout, gate, up, dgate, dup, n64(n))
}
