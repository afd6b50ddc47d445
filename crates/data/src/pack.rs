//! Packing samples into rows of `capacity` tokens: first-fit decreasing.
//!
//! Samples are taken longest first (ties: lower index first) and each goes into the first row
//! (lowest index) with room for it, a new row being opened only when none has room. A max
//! segment tree over the rows' free space finds that row in O(log n), so packing 50k samples
//! costs milliseconds. A sample is never split across rows. The result is deterministic.

use crate::error::{DataError, Result};

/// Rows of sample indices; within a row, samples appear in placement order.
pub fn pack_ffd(lengths: &[usize], capacity: usize) -> Result<Vec<Vec<usize>>> {
    if capacity == 0 {
        return Err(DataError::Option {
            option: "max_seq_len".into(),
            problem: "packing needs a capacity > 0".into(),
        });
    }
    if let Some((i, &l)) = lengths
        .iter()
        .enumerate()
        .find(|(_, &l)| l > capacity || l == 0)
    {
        return Err(DataError::Option {
            option: "max_seq_len".into(),
            problem: format!("sample {i} has {l} tokens; packing needs 1..={capacity}"),
        });
    }
    let n = lengths.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    // Segment tree over n potential rows: leaves hold free space (unopened rows: `capacity`),
    // inner nodes the max of their children.
    let size = n.max(1).next_power_of_two();
    let mut tree = vec![0usize; 2 * size];
    for leaf in 0..n {
        tree[size + leaf] = capacity;
    }
    for node in (1..size).rev() {
        tree[node] = tree[2 * node].max(tree[2 * node + 1]);
    }
    let mut rows: Vec<Vec<usize>> = Vec::new();
    for &s in &order {
        let need = lengths[s];
        // Leftmost leaf with free ≥ need (exists: an unopened row has `capacity` ≥ need).
        let mut node = 1;
        while node < size {
            node = if tree[2 * node] >= need {
                2 * node
            } else {
                2 * node + 1
            };
        }
        let row = node - size;
        if row == rows.len() {
            rows.push(Vec::new());
        }
        rows[row].push(s);
        tree[node] -= need;
        let mut p = node / 2;
        while p >= 1 {
            tree[p] = tree[2 * p].max(tree[2 * p + 1]);
            p /= 2;
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::pack_ffd;

    #[test]
    fn ffd_matches_a_linear_scan() {
        // Pseudo-random lengths; compare against the obvious O(n·rows) first-fit decreasing.
        let mut x = 12345u64;
        let lengths: Vec<usize> = (0..500)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                1 + (x >> 33) as usize % 64
            })
            .collect();
        let rows = pack_ffd(&lengths, 100).unwrap();
        let mut order: Vec<usize> = (0..lengths.len()).collect();
        order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
        let mut naive: Vec<(usize, Vec<usize>)> = Vec::new();
        for s in order {
            match naive.iter_mut().find(|(used, _)| used + lengths[s] <= 100) {
                Some((used, r)) => {
                    *used += lengths[s];
                    r.push(s);
                }
                None => naive.push((lengths[s], vec![s])),
            }
        }
        let naive: Vec<Vec<usize>> = naive.into_iter().map(|(_, r)| r).collect();
        assert_eq!(rows, naive);
    }

    #[test]
    fn rejects_too_long_and_empty() {
        assert!(pack_ffd(&[3, 11], 10).is_err());
        assert!(pack_ffd(&[3, 0], 10).is_err());
        assert_eq!(pack_ffd(&[], 10).unwrap(), Vec::<Vec<usize>>::new());
    }
}
