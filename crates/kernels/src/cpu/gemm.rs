//! Dense f32 GEMMs through the `gemm` crate (AVX-512 / AVX2 / NEON picked at run time, rayon inside).
//!
//! Contract (the three GEMMs of a linear layer), X [M,K], W [N,K], Y [M,N], all row-major:
//! - `matmul_xwt`:  Y  (= or +=) X·Wᵀ      (forward)
//! - `matmul_dyw`:  dX (= or +=) dY·W      (input gradient)
//! - `matmul_dytx`: dW (= or +=) dYᵀ·X     (weight gradient, full fine-tuning only)
//!
//! `Accum::Overwrite` ignores whatever the output held before (NaN included); `Accum::Add` accumulates.
//! The general [`gemm`] takes strided views, which is how the NF4 tiles write a column block of Y and
//! how transposes are expressed without copies.

use crate::backend::Accum;
use crate::contract;
use crate::cpu::fastmath::{self, simd_fn};
use crate::error::{ensure, Result};
use rayon::prelude::*;

/// A product X·Wᵀ with 2 ≤ M ≤ SMALL_M rows (a short prompt's prefill, a few sequences) skips the `gemm`
/// crate, which packs the whole [N, K] weight on every call: measured ~30 ms fixed on an 8-layer H = 512
/// model, 54 % of it in packing, against ~5 ms to stream the weights once. Here each W row is read once
/// and dotted with the M rows of X while it is in cache. (M = 1 is left to the crate, whose GEMV path
/// does not pack; larger M amortizes the packing.)
const SMALL_M: usize = 16;
/// Rows of W (columns of Y) per rayon task in the small-M path.
const SMALL_M_BLOCK: usize = 32;

/// Dot product with LANES independent accumulators summed in a fixed tree (vectorizes without
/// reassociation; the result does not depend on threads).
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = fastmath::LANES;
    let mut acc = [0.0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = fastmath::lane_sum(acc);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

simd_fn! {
    /// y [M] = x [M, K] · w [K]: one W row against every row of X while it is in cache.
    fn small_m_row(level: Simd, x: &[f32], w: &[f32], y: &mut [f32], k: usize) {
        for (xr, y) in x.chunks_exact(k).zip(y.iter_mut()) {
            *y = dot_lanes(xr, w);
        }
    }
}

/// dst (= or +=) beta · a·b for 2 ≤ M ≤ SMALL_M and K ≥ 1, where a has contiguous rows (cs = 1) and b
/// is the transpose of a matrix with contiguous rows (rs = 1: b's column j is W's row j). Views were
/// bounds-checked by the caller.
fn gemm_small_m(dst: MatMut<'_>, a: MatRef<'_>, b: MatRef<'_>, beta: f32, acc: Accum) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    // X packed to [M, K] (M·K floats) so the block kernel sees plain rows.
    let mut x = Vec::with_capacity(m * k);
    for i in 0..m {
        x.extend_from_slice(&a.data[i * a.rs..i * a.rs + k]);
    }
    let level = fastmath::detected();
    let mut yt = vec![0.0f32; m * n];
    yt.par_chunks_mut(SMALL_M_BLOCK * m)
        .enumerate()
        .for_each(|(blk, yb)| {
            let j0 = blk * SMALL_M_BLOCK;
            for (jj, yr) in yb.chunks_exact_mut(m).enumerate() {
                let j = j0 + jj;
                let wr = &b.data[j * b.cs..j * b.cs + k];
                small_m_row(level, &x, wr, yr, k);
            }
        });
    for (j, col) in yt.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            let d = &mut dst.data[i * dst.rs + j];
            *d = match acc {
                Accum::Overwrite => beta * v,
                Accum::Add => *d + beta * v,
            };
        }
    }
}

/// A read-only strided matrix view: element (i, j) is `data[i·rs + j·cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major [rows, cols] matrix stored contiguously.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// A row-major [rows, cols] matrix whose rows are `row_stride` elements apart.
    pub fn with_row_stride(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: row_stride,
            cs: 1,
        }
    }
    /// The transpose, as a view (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Whether every element the view addresses lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1)
                .checked_mul(self.rs)
                .and_then(|a| {
                    (self.cols - 1)
                        .checked_mul(self.cs)
                        .and_then(|b| a.checked_add(b))
                })
                .is_some_and(|last| last < self.data.len())
    }
}

/// A mutable row-major view with a row stride (columns contiguous).
#[derive(Debug)]
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
}

impl<'a> MatMut<'a> {
    /// A row-major [rows, cols] matrix stored contiguously.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
        }
    }
    /// A row-major [rows, cols] block whose rows are `row_stride` elements apart (e.g. columns
    /// n0..n0+cols of a wider matrix, with `data` starting at element n0).
    pub fn with_row_stride(
        data: &'a mut [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: row_stride,
        }
    }
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1)
                .checked_mul(self.rs)
                .and_then(|a| a.checked_add(self.cols - 1))
                .is_some_and(|last| last < self.data.len())
    }
}

/// dst (= or +=) beta · a·b, with a [M,K], b [K,N], dst [M,N] (any strides).
///
/// Errors (`Invalid`, naming `op`) when the inner dimensions disagree or a view reaches outside its
/// slice; both are caller bugs, never undefined behaviour.
pub fn gemm(
    op: &'static str,
    dst: MatMut<'_>,
    a: MatRef<'_>,
    b: MatRef<'_>,
    beta: f32,
    acc: Accum,
) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    ensure(
        op,
        "gemm",
        b.rows == k && dst.rows == m && dst.cols == n,
        || {
            format!(
                "inner dims disagree: a [{}x{}], b [{}x{}], dst [{}x{}]",
                a.rows, a.cols, b.rows, b.cols, dst.rows, dst.cols
            )
        },
    )?;
    ensure(
        op,
        "gemm",
        a.in_bounds() && b.in_bounds() && dst.in_bounds(),
        || "a strided view reaches outside its buffer".to_string(),
    )?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if (2..=SMALL_M).contains(&m) && k > 0 && a.cs == 1 && b.rs == 1 {
        gemm_small_m(dst, a, b, beta, acc);
        return Ok(());
    }
    let read_dst = acc == Accum::Add;
    // SAFETY: every element addressed through (ptr, row stride, col stride) for the given m, n, k was
    // checked to lie inside its slice just above (`in_bounds`). `dst` is a unique borrow, so it cannot
    // alias `a` or `b`. Strides fit in isize because they index existing slices. With
    // read_dst = false the crate never reads dst (alpha is forced to zero and dst is not loaded).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst.rs as isize,
            read_dst,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
    Ok(())
}

/// Y [M,N] (= or +=) X [M,K] · Wᵀ (W [N,K]).
pub fn matmul_xwt(
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    acc: Accum,
) -> Result<()> {
    const OP: &str = "matmul_xwt";
    contract::matmul_xwt(x.len(), w.len(), y.len(), m, k, n)?;
    gemm(
        OP,
        MatMut::new(y, m, n),
        MatRef::new(x, m, k),
        MatRef::new(w, n, k).t(),
        1.0,
        acc,
    )
}

/// dX [M,K] (= or +=) dY [M,N] · W [N,K].
pub fn matmul_dyw(
    dy: &[f32],
    w: &[f32],
    dx: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    acc: Accum,
) -> Result<()> {
    const OP: &str = "matmul_dyw";
    contract::matmul_dyw(dy.len(), w.len(), dx.len(), m, k, n)?;
    gemm(
        OP,
        MatMut::new(dx, m, k),
        MatRef::new(dy, m, n),
        MatRef::new(w, n, k),
        1.0,
        acc,
    )
}

/// dW [N,K] (= or +=) dYᵀ (dY [M,N]) · X [M,K].
pub fn matmul_dytx(
    dy: &[f32],
    x: &[f32],
    dw: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    acc: Accum,
) -> Result<()> {
    const OP: &str = "matmul_dytx";
    contract::matmul_dytx(dy.len(), x.len(), dw.len(), m, k, n)?;
    gemm(
        OP,
        MatMut::new(dw, n, k),
        MatRef::new(dy, m, n).t(),
        MatRef::new(x, m, k),
        1.0,
        acc,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tolerance;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// The small-M path (2 ≤ M ≤ 16) against f64 loops on both sides of its bounds, with K not a
    /// multiple of the lanes and N not a multiple of the block; overwrite ignores NaN, add accumulates;
    /// the result is the same under 1 and 2 threads.
    #[test]
    fn small_m_path_matches_f64_and_threads() {
        for &(m, k, n) in &[
            (1, 37, 70),
            (2, 37, 70),
            (7, 16, 33),
            (16, 100, 65),
            (17, 37, 70),
        ] {
            let (x, w, prior) = (values(m * k, 1), values(n * k, 2), values(m * n, 3));
            let reference: Vec<f64> = (0..m * n)
                .map(|idx| {
                    let (i, j) = (idx / n, idx % n);
                    (0..k)
                        .map(|l| f64::from(x[i * k + l]) * f64::from(w[j * k + l]))
                        .sum()
                })
                .collect();
            let mut y = vec![f32::NAN; m * n];
            matmul_xwt(&x, &w, &mut y, m, k, n, Accum::Overwrite).unwrap();
            Tolerance::new(1e-5, 1e-5).assert_close(
                &format!("y m={m}"),
                y.clone(),
                reference.iter().copied(),
            );
            let mut ya = prior.clone();
            matmul_xwt(&x, &w, &mut ya, m, k, n, Accum::Add).unwrap();
            Tolerance::new(1e-5, 1e-5).assert_close(
                &format!("y add m={m}"),
                ya,
                reference.iter().zip(&prior).map(|(r, &p)| r + f64::from(p)),
            );
            let one = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let mut y1 = vec![f32::NAN; m * n];
            one.install(|| matmul_xwt(&x, &w, &mut y1, m, k, n, Accum::Overwrite).unwrap());
            // Strided views (X rows k+2 apart, Y rows n+3 apart, beta = 0.5), as the NF4 tiles use.
            let (xs, ys) = (k + 2, n + 3);
            let mut xp = vec![9.0f32; m * xs];
            for i in 0..m {
                xp[i * xs..i * xs + k].copy_from_slice(&x[i * k..(i + 1) * k]);
            }
            let mut yp = vec![7.0f32; m * ys];
            gemm(
                "t",
                MatMut::with_row_stride(&mut yp, m, n, ys),
                MatRef::with_row_stride(&xp, m, k, xs),
                MatRef::new(&w, n, k).t(),
                0.5,
                Accum::Add,
            )
            .unwrap();
            for i in 0..m {
                Tolerance::new(1e-5, 1e-5).assert_close(
                    &format!("strided row {i} m={m}"),
                    yp[i * ys..i * ys + n].to_vec(),
                    reference[i * n..(i + 1) * n].iter().map(|r| 7.0 + 0.5 * r),
                );
                assert!(
                    yp[i * ys + n..(i + 1) * ys].iter().all(|&v| v == 7.0),
                    "padding written"
                );
            }
            if (2..=SMALL_M).contains(&m) {
                assert_eq!(
                    y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    y1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "m={m}: thread count changed the result"
                );
            }
        }
    }
}
