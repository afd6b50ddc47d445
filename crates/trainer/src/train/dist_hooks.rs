//! Data parallelism inside a run: which rows of each global micro-batch a rank trains, the window's
//! accumulated gradient summed over the ranks, and the check that every rank starts from the same
//! state. The collectives themselves are `crate::dist`'s.
//!
//! Sharding: every rank builds the same *global* micro-batches (the loader's batch size is
//! world_size · micro_batch_size, so the order, the cursor and the fingerprint are those of one
//! process with that micro-batch) and trains rows [rank·b, rank·b + b) of each (fewer, or none, in a
//! short last batch). A rank's slice keeps the global batch's row length T and tells the model its
//! first row (`Batch::dropout_row_offset`), so every row gets the LoRA dropout mask it gets in the
//! single-process run. The trained-target count of the window is known on every rank (it sees the
//! global batches); the loss sums and each rank's own count are all-reduced, the counts checked
//! against it. Gradients are computed with grad_scale = S / (global count) and summed over ranks in
//! buckets (`dist::buckets`): the sum of the ranks' partial sums is the single process's gradient, up
//! to the order of f32 additions (the 2-rank test bounds the adapter difference at 1e-6 relative).

use afinar_gemma::{Gemma2Model, Grads};
use afinar_kernels::profile::{self, Role};
use afinar_kernels::Backend;
use rand::RngCore;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use super::steps::model_batch;
use super::Result;
use crate::checkpoint::TrainerState;
use crate::dist::{buckets, Collective, DistError, BUCKET_BYTES};

/// Rows [rank·b, rank·b + b) of `batch` (clamped to its B rows) and the first row's index.
pub fn shard(batch: &afinar_data::Batch, rank: usize, micro: usize) -> (afinar_data::Batch, usize) {
    let r0 = (rank * micro).min(batch.b);
    let r1 = (r0 + micro).min(batch.b);
    let t = batch.t;
    let rows = |v: &Vec<i32>| v[r0 * t..r1 * t].to_vec();
    let mut part = afinar_data::Batch {
        b: r1 - r0,
        t,
        input_ids: rows(&batch.input_ids),
        labels: rows(&batch.labels),
        position_ids: rows(&batch.position_ids),
        segment_ids: rows(&batch.segment_ids),
        sample_ids: batch.sample_ids[r0..r1].to_vec(),
        num_trained: 0,
    };
    part.num_trained = part
        .shifted_labels()
        .iter()
        .filter(|&&l| l != afinar_kernels::contract::IGNORE_INDEX)
        .count();
    (part, r0)
}

/// The data-parallel `accumulate_scaled`: zeroes `grads`, accumulates this rank's rows of every
/// micro-batch of `window` (the global micro-batches) at grad_scale = loss_scale / (trained targets
/// of the whole window), then sums loss and gradients over the ranks. One dropout seed is drawn per
/// micro-batch on every rank, as the single process draws it. Returns (Σ CE, count) of the whole
/// window, the same on every rank.
pub(super) fn accumulate_sharded<B: Backend>(
    model: &Gemma2Model<B>,
    grads: &mut Grads<B>,
    window: &[afinar_data::Batch],
    rng: &mut ChaCha8Rng,
    loss_scale: f32,
    micro: usize,
    comm: &dyn Collective<B>,
) -> Result<(f64, usize)> {
    let count: usize = window.iter().map(|b| b.num_trained).sum();
    {
        let _label = profile::role(Role::Grads);
        grads.zero()?;
    }
    let (mut loss_sum, mut mine) = (0.0f64, 0usize);
    for b in window {
        let seed = rng.next_u64();
        let (part, row0) = shard(b, comm.rank(), micro);
        mine += part.num_trained;
        if part.num_trained == 0 {
            continue;
        }
        let mut mb = model_batch(&part, seed);
        mb.dropout_row_offset = row0;
        let (s, _) = model.forward_backward(&mb, loss_scale / count.max(1) as f32, grads)?;
        loss_sum += s;
    }
    let _label = profile::role(Role::Grads);
    let mut sums = [loss_sum, mine as f64];
    comm.all_reduce_f64(&mut sums)?;
    if sums[1] != count as f64 {
        return Err(DistError::Mismatch(format!(
            "the ranks trained {} targets of a window that holds {count}: the ranks do not see the same data",
            sums[1]
        ))
        .into());
    }
    all_reduce_grads(&**model.backend(), grads, comm)?;
    Ok((sums[0], count))
}

/// Sums every gradient over the ranks, bucket by bucket (`dist::BUCKET_BYTES`).
pub(super) fn all_reduce_grads<B: Backend>(
    backend: &B,
    grads: &mut Grads<B>,
    comm: &dyn Collective<B>,
) -> Result<()> {
    let bufs = grads.buffers_mut();
    let sizes: Vec<usize> = bufs.iter().map(|b| backend.len(b)).collect();
    for range in buckets(&sizes, BUCKET_BYTES) {
        let mut bucket: Vec<&mut B::Buf> = bufs[range].iter_mut().collect();
        comm.all_reduce_bufs(backend, &mut bucket)?;
    }
    Ok(())
}

/// SHA-256 of what must be equal on every rank before the first step: the counters, the data
/// cursor, the dropout RNG, the world size the run was planned for and every trainable tensor's bits.
pub(super) fn state_digest<B: Backend>(
    model: &Gemma2Model<B>,
    state: &TrainerState,
    names: &[String],
) -> Result<Vec<u8>> {
    let mut h = Sha256::new();
    for x in [
        state.step,
        state.adam_t,
        state.total_steps,
        state.warmup_steps,
        state.cursor.epoch,
        state.cursor.position,
        state.cursor.fingerprint,
    ] {
        h.update(x.to_le_bytes());
    }
    h.update(serde_json::to_vec(&state.rng).expect("the RNG state serializes"));
    for n in names {
        h.update(n.as_bytes());
        for x in model.get_tensor(n)? {
            h.update(x.to_bits().to_le_bytes());
        }
    }
    Ok(h.finalize().to_vec())
}

/// Fails unless every rank's [`state_digest`] equals rank 0's.
pub(super) fn check_same_state<B: Backend>(
    digest: Vec<u8>,
    comm: &dyn Collective<B>,
) -> Result<()> {
    let mut root = digest.clone();
    comm.broadcast_bytes(0, &mut root)?;
    let differs = (root != digest) as u64 as f64;
    let mut n = [differs];
    comm.all_reduce_f64(&mut n)?;
    if n[0] > 0.0 {
        return Err(DistError::Mismatch(format!(
            "{} rank(s) start from a different state than rank 0 (trainable tensors, counters or data \
             cursor): a resumed run needs the run directory on a filesystem every node sees",
            n[0]
        ))
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(b: usize, t: usize) -> afinar_data::Batch {
        let n = b * t;
        afinar_data::Batch {
            b,
            t,
            input_ids: (0..n as i32).collect(),
            labels: (0..n as i32).collect(),
            position_ids: (0..n).map(|i| (i % t) as i32).collect(),
            segment_ids: vec![0; n],
            sample_ids: (0..b).map(|r| vec![r]).collect(),
            num_trained: b * (t - 1),
        }
    }

    #[test]
    fn shards_are_consecutive_rows_and_cover_the_batch() {
        let g = batch(3, 4);
        let (a, ra) = shard(&g, 0, 2);
        let (b, rb) = shard(&g, 1, 2);
        let (c, rc) = shard(&g, 2, 2);
        assert_eq!((ra, rb, rc), (0, 2, 3));
        assert_eq!((a.b, b.b, c.b), (2, 1, 0));
        assert_eq!(b.input_ids, (8..12).collect::<Vec<i32>>());
        assert_eq!(b.sample_ids, vec![vec![2]]);
        assert_eq!(a.num_trained + b.num_trained + c.num_trained, g.num_trained);
        assert_eq!(b.t, 4);
    }
}
