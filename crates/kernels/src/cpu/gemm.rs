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
use crate::error::{check_len, ensure, KernelError, Result};

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

fn dims(m: usize, k: usize, n: usize) -> impl Fn() -> String {
    move || format!("[M={m}, K={k}, N={n}]")
}

fn prod(op: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| KernelError::Invalid {
        op,
        arg: "dims",
        msg: format!("{a}·{b} overflows usize"),
    })
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
    check_len(OP, "x", x.len(), prod(OP, m, k)?, dims(m, k, n))?;
    check_len(OP, "w", w.len(), prod(OP, n, k)?, dims(m, k, n))?;
    check_len(OP, "y", y.len(), prod(OP, m, n)?, dims(m, k, n))?;
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
    check_len(OP, "dy", dy.len(), prod(OP, m, n)?, dims(m, k, n))?;
    check_len(OP, "w", w.len(), prod(OP, n, k)?, dims(m, k, n))?;
    check_len(OP, "dx", dx.len(), prod(OP, m, k)?, dims(m, k, n))?;
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
    check_len(OP, "dy", dy.len(), prod(OP, m, n)?, dims(m, k, n))?;
    check_len(OP, "x", x.len(), prod(OP, m, k)?, dims(m, k, n))?;
    check_len(OP, "dw", dw.len(), prod(OP, n, k)?, dims(m, k, n))?;
    gemm(
        OP,
        MatMut::new(dw, n, k),
        MatRef::new(dy, m, n).t(),
        MatRef::new(x, m, k),
        1.0,
        acc,
    )
}
