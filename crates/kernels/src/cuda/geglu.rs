//! tanh-GELU gate × up: kernels/geglu.cu. CPU twin: cpu/geglu.rs.

use super::{n64, Cuda, CudaBuf};
use crate::error::{check_len, Result};
use crate::launch::{self};

pub(super) fn geglu_fwd(cu: &Cuda, gate: &CudaBuf, up: &CudaBuf, out: &mut CudaBuf) -> Result<()> {
    check_len("geglu_fwd", "up", up.len, gate.len, || {
        format!("[{}]", gate.len)
    })?;
    check_len("geglu_fwd", "out", out.len, gate.len, || {
        format!("[{}]", gate.len)
    })?;
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
    check_len("geglu_bwd", "dout", dout.len, n, || format!("[{n}]"))?;
    check_len("geglu_bwd", "up", up.len, n, || format!("[{n}]"))?;
    check_len("geglu_bwd", "dgate", dgate.len, n, || format!("[{n}]"))?;
    check_len("geglu_bwd", "dup", dup.len, n, || format!("[{n}]"))?;
    cu.geglu_bwd_k(launch::elementwise(n), dout, gate, up, dgate, dup, n64(n))
}
