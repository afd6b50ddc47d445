//! One micro-batch: host side ([`Batch`], validated once on the host) and uploaded (`DeviceBatch`).

use afinar_kernels::Backend;

use crate::error::{GemmaError, Result};

/// One micro-batch of B rows × T tokens, host side, row-major ([B·T] each).
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// B.
    pub b: usize,
    /// T.
    pub t: usize,
    /// Token ids [B·T], each in [0, V).
    pub input_ids: Vec<i32>,
    /// RoPE positions [B·T]; they restart at 0 at every packed sample.
    pub positions: Vec<i32>,
    /// Packed-sample ids [B·T] (None = one sample per row). Tokens attend only within their segment.
    pub segment_ids: Option<Vec<i32>>,
    /// ALREADY SHIFTED targets [B·T]: target t is the token that follows position t, or −100 (not scored).
    pub targets: Vec<i32>,
    /// Seed of the LoRA dropout masks of this micro-batch; set it from (run seed, step, micro-step) so a
    /// resumed run draws the same masks. Unused when dropout is 0.
    pub dropout_seed: u64,
    /// Row of a larger batch that row 0 of this one is (data-parallel training: a rank's slice of the
    /// global micro-batch starts at row rank·b). The dropout masks of these rows are those rows of the
    /// whole batch's masks (`lora::dropout_seed_at`), so a row's mask does not depend on which rank
    /// trains it. 0 for a batch that is not a slice.
    pub dropout_row_offset: usize,
}

impl Batch {
    /// B rows of T tokens with positions 0..T per row, no packing. `targets` already shifted.
    pub fn new(b: usize, t: usize, input_ids: Vec<i32>, targets: Vec<i32>) -> Self {
        let positions = (0..b).flat_map(|_| 0..t as i32).collect();
        Batch {
            b,
            t,
            input_ids,
            positions,
            segment_ids: None,
            targets,
            dropout_seed: 0,
            dropout_row_offset: 0,
        }
    }

    /// Shifts HF-style labels (`labels[t]` scores the logits at t−1) into targets (`targets[t] = labels[t+1]`,
    /// −100 at the end of each row): what transformers' `ForCausalLMLoss` does.
    /// `labels` must hold B·T entries; missing entries (a short slice) are treated as −100.
    pub fn shift_labels(b: usize, t: usize, labels: &[i32]) -> Vec<i32> {
        let mut out = vec![-100; b * t];
        for r in 0..b {
            for i in 0..t.saturating_sub(1) {
                out[r * t + i] = labels.get(r * t + i + 1).copied().unwrap_or(-100);
            }
        }
        out
    }

    /// Number of tokens (B·T).
    pub fn tokens(&self) -> usize {
        self.b * self.t
    }

    /// Checks lengths and value ranges against a vocabulary size: ids in [0, V), targets in [0, V) or
    /// −100, positions ≥ 0. Errors name the flat index and its (row, position).
    pub fn validate(&self, vocab: usize) -> Result<()> {
        let n = self
            .b
            .checked_mul(self.t)
            .ok_or_else(|| GemmaError::Batch(format!("B·T = {}·{} overflows", self.b, self.t)))?;
        if n == 0 {
            return Err(GemmaError::Batch(format!(
                "empty batch (B = {}, T = {})",
                self.b, self.t
            )));
        }
        for (name, len) in [
            ("input_ids", self.input_ids.len()),
            ("positions", self.positions.len()),
            ("targets", self.targets.len()),
        ] {
            if len != n {
                return Err(GemmaError::Batch(format!(
                    "{name} has {len} entries, B·T = {}·{} = {n}",
                    self.b, self.t
                )));
            }
        }
        if let Some(s) = &self.segment_ids {
            if s.len() != n {
                return Err(GemmaError::Batch(format!(
                    "segment_ids has {} entries, B·T = {n}",
                    s.len()
                )));
            }
        }
        // Every range the ops rely on is checked here, once, on the host: the embedding, RoPE and
        // cross-entropy ops do not read ids back from the device.
        let t = self.t;
        let at = |i: usize| format!("(row {}, position {})", i / t, i % t);
        if let Some((i, &id)) = self
            .input_ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id < 0 || id as usize >= vocab)
        {
            return Err(GemmaError::Batch(format!(
                "input_ids[{i}] {} = {id} is outside the vocabulary [0, {vocab})",
                at(i)
            )));
        }
        if let Some((i, &id)) = self
            .targets
            .iter()
            .enumerate()
            .find(|(_, &id)| id != -100 && (id < 0 || id as usize >= vocab))
        {
            return Err(GemmaError::Batch(format!(
                "targets[{i}] {} = {id} is neither −100 nor in [0, {vocab})",
                at(i)
            )));
        }
        if let Some((i, &p)) = self.positions.iter().enumerate().find(|(_, &p)| p < 0) {
            return Err(GemmaError::Batch(format!(
                "positions[{i}] {} = {p} is negative",
                at(i)
            )));
        }
        Ok(())
    }
}

/// A validated batch uploaded to the backend.
pub(crate) struct DeviceBatch<B: Backend> {
    pub ids: B::Ids,
    pub pos: B::Ids,
    pub seg: Option<B::Ids>,
    pub targets: B::Ids,
}

impl<B: Backend> DeviceBatch<B> {
    /// Validates `batch` against the vocabulary size on the host, then uploads it.
    pub fn upload(be: &B, batch: &Batch, vocab: usize) -> Result<Self> {
        batch.validate(vocab)?;
        Ok(DeviceBatch {
            ids: be.ids_from_host(&batch.input_ids)?,
            pos: be.ids_from_host(&batch.positions)?,
            seg: batch
                .segment_ids
                .as_ref()
                .map(|s| be.ids_from_host(s))
                .transpose()?,
            targets: be.ids_from_host(&batch.targets)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(b: &Batch) -> String {
        match b.validate(10) {
            Err(GemmaError::Batch(s)) => s,
            other => panic!("expected a batch error, got {other:?}"),
        }
    }

    /// Out-of-range ids, targets and positions are refused on the host, naming the row and position.
    #[test]
    fn range_errors_name_row_and_position() {
        let ok = Batch::new(2, 3, vec![0, 1, 9, 2, 3, 4], vec![1, -100, 9, 3, 4, -100]);
        ok.validate(10).unwrap();

        let mut b = ok.clone();
        b.input_ids[4] = 10;
        let e = err(&b);
        assert!(e.contains("input_ids[4] (row 1, position 1) = 10"), "{e}");
        b.input_ids[4] = -1;
        assert!(err(&b).contains("input_ids[4] (row 1, position 1) = -1"));

        let mut b = ok.clone();
        b.targets[2] = 10;
        let e = err(&b);
        assert!(e.contains("targets[2] (row 0, position 2) = 10"), "{e}");
        b.targets[2] = -5;
        assert!(err(&b).contains("targets[2] (row 0, position 2) = -5"));

        let mut b = ok.clone();
        b.positions[3] = -1;
        let e = err(&b);
        assert!(e.contains("positions[3] (row 1, position 0) = -1"), "{e}");

        let mut b = ok;
        b.segment_ids = Some(vec![0; 5]);
        assert!(err(&b).contains("segment_ids has 5 entries"));
    }
}
