//! Token embedding gather (forward) and scatter-add (backward).
//!
//! Contract, ids [N] in [0, V), table [V,H]:
//! - `embedding_fwd`: out[i,:] = table[ids[i],:]·scale           (writes out [N,H])
//! - `embedding_bwd`: dtable[ids[i],:] += scale·dout[i,:]        (adds into dtable [V,H])
//!
//! Gemma-2 multiplies by √H cast to the activation dtype; the caller passes that constant as `scale`.
//! The backward runs rows in order (repeated ids accumulate deterministically).

use rayon::prelude::*;

use crate::error::{check_len, ensure, KernelError, Result};

fn check_ids(op: &'static str, ids: &[i32], v: usize) -> Result<()> {
    match ids
        .iter()
        .enumerate()
        .find(|(_, &t)| t < 0 || t as usize >= v)
    {
        Some((i, &t)) => Err(KernelError::Invalid {
            op,
            arg: "ids",
            msg: format!("token id {t} at row {i} is outside the vocabulary [0, {v})"),
        }),
        None => Ok(()),
    }
}

fn check_dims(op: &'static str, n: usize, v: usize, h: usize) -> Result<()> {
    ensure(
        op,
        "h",
        n.checked_mul(h).is_some() && v.checked_mul(h).is_some(),
        || format!("N={n}, V={v}, H={h} overflow"),
    )
}

/// out [N,H] = table[ids]·scale.
pub fn embedding_fwd(
    ids: &[i32],
    table: &[f32],
    out: &mut [f32],
    v: usize,
    h: usize,
    scale: f32,
) -> Result<()> {
    const OP: &str = "embedding_fwd";
    let n = ids.len();
    check_dims(OP, n, v, h)?;
    let shape = || format!("[N={n}, V={v}, H={h}]");
    check_len(OP, "table", table.len(), v * h, shape)?;
    check_len(OP, "out", out.len(), n * h, shape)?;
    check_ids(OP, ids, v)?;
    if h == 0 {
        return Ok(());
    }
    out.par_chunks_mut(h)
        .zip(ids.par_iter())
        .for_each(|(o, &t)| {
            let row = &table[t as usize * h..(t as usize + 1) * h];
            for (o, &r) in o.iter_mut().zip(row) {
                *o = r * scale;
            }
        });
    Ok(())
}

/// dtable[ids[i]] += scale·dout[i].
pub fn embedding_bwd(
    ids: &[i32],
    dout: &[f32],
    dtable: &mut [f32],
    v: usize,
    h: usize,
    scale: f32,
) -> Result<()> {
    const OP: &str = "embedding_bwd";
    let n = ids.len();
    check_dims(OP, n, v, h)?;
    let shape = || format!("[N={n}, V={v}, H={h}]");
    check_len(OP, "dout", dout.len(), n * h, shape)?;
    check_len(OP, "dtable", dtable.len(), v * h, shape)?;
    check_ids(OP, ids, v)?;
    if h == 0 {
        return Ok(());
    }
    for (d, &t) in dout.chunks(h).zip(ids) {
        let row = &mut dtable[t as usize * h..(t as usize + 1) * h];
        for (r, &d) in row.iter_mut().zip(d) {
            *r += scale * d;
        }
    }
    Ok(())
}
