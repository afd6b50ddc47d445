//! Token embedding gather (forward) and scatter-add (backward).
//!
//! Contract, ids [N] in [0, V), table [V,H]:
//! - `embedding_fwd`: out[i,:] = table[ids[i],:]·scale           (writes out [N,H])
//! - `embedding_bwd`: dtable[ids[i],:] += scale·dout[i,:]        (adds into dtable [V,H])
//!
//! Gemma-2 multiplies by √H cast to the activation dtype; the caller passes that constant as `scale`.
//! The backward runs rows in order (repeated ids accumulate deterministically).

use rayon::prelude::*;

use crate::contract;
use crate::error::Result;

/// out [N,H] = table[ids]·scale.
pub fn embedding_fwd(
    ids: &[i32],
    table: &[f32],
    out: &mut [f32],
    v: usize,
    h: usize,
    scale: f32,
) -> Result<()> {
    contract::embedding_fwd(ids, table.len(), out.len(), v, h)?;
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
    contract::embedding_bwd(ids, dout.len(), dtable.len(), v, h)?;
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
