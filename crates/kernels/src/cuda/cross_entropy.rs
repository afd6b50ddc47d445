//! Soft-capped cross-entropy over materialized logits: kernels/cross_entropy.cu (`ce_row_k`) and
//! reduce.cu for the sum. CPU twin: cpu/cross_entropy.rs.

use super::{be, Cuda, CudaBuf, CudaIds, Data, Dtype};
use crate::error::{check_len, ensure, KernelError, Result};
use crate::launch::{self, to_i32};
use cudarc::driver::CudaSlice;

impl Cuda {
    /// Validates labels (−100 or in [0, V)) and counts the scored rows.
    pub(super) fn count_labels(
        &self,
        op: &'static str,
        labels: &CudaIds,
        off: usize,
        n: usize,
        v: usize,
    ) -> Result<usize> {
        let host = self
            .stream
            .clone_dtoh(&labels.data.slice(off..off + n))
            .map_err(be("device to host copy"))?;
        if let Some((i, &l)) = host
            .iter()
            .enumerate()
            .find(|(_, &l)| l != -100 && (l < 0 || l as usize >= v))
        {
            return Err(KernelError::Invalid {
                op,
                arg: "labels",
                msg: format!("labels[{i}] = {l} is neither −100 nor in [0, V={v})"),
            });
        }
        Ok(host.iter().filter(|&&l| l != -100).count())
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn cross_entropy(
    cu: &Cuda,
    logits: &CudaBuf,
    labels: &CudaIds,
    n: usize,
    v: usize,
    softcap: Option<f32>,
    grad_scale: f32,
    dlogits: Option<&mut CudaBuf>,
) -> Result<(f64, usize)> {
    check_len("cross_entropy", "logits", logits.len, n * v, || {
        format!("[N={n}, V={v}]")
    })?;
    if let Some(d) = &dlogits {
        check_len("cross_entropy", "dlogits", d.len, n * v, || {
            format!("[N={n}, V={v}]")
        })?;
    }
    if n == 0 {
        return Ok((0.0, 0));
    }
    check_len("cross_entropy", "labels", labels.len, n, || {
        format!("[N={n}]")
    })?;
    let cap = check_cap("cross_entropy", softcap)?;
    let count = cu.count_labels("cross_entropy", labels, 0, n, v)?;
    let row_loss = cu.zeros_as(n, Dtype::F32)?;
    let l = launch::rows("cross_entropy", n, v, 1024)?;
    let (d_arg, want) = match dlogits {
        Some(d) => (Some(&*d), 1),
        None => (None, 0),
    };
    cu.ce_row_k(
        l,
        logits,
        &labels.data,
        to_i32("cross_entropy", "v", v)?,
        cap,
        grad_scale,
        d_arg,
        want,
        f32_slice(&row_loss)?,
    )?;
    Ok((cu.reduce(&row_loss, 0, n, 1)?, count))
}

pub(super) fn f32_slice(b: &CudaBuf) -> Result<&CudaSlice<f32>> {
    match &b.data {
        Data::F32(s) => Ok(s),
        Data::Bf16(_) | Data::F16(_) => Err(KernelError::Backend {
            backend: "cuda",
            msg: "internal: expected an f32 scratch buffer".into(),
        }),
    }
}

pub(super) fn check_cap(op: &'static str, cap: Option<f32>) -> Result<f32> {
    match cap {
        None => Ok(0.0),
        Some(c) => {
            ensure(op, "softcap", c > 0.0 && c.is_finite(), || {
                format!("soft-cap {c} must be finite and > 0")
            })?;
            Ok(c)
        }
    }
}
