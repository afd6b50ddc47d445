//! The one comparison rule of the workspace: |got − ref| ≤ atol + rtol·|ref|.
//!
//! Used by every numerical test (CPU vs f64 reference, CUDA vs CPU, Rust vs golden fixture). A failure
//! names the tensor, the flat index, both values and the worst offender, so a red test says where to look.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

/// The result of a failed comparison.
#[derive(Debug, Clone)]
pub struct Mismatch {
    pub tensor: String,
    /// First failing flat index.
    pub index: usize,
    pub got: f64,
    pub expected: f64,
    /// Number of failing elements.
    pub failures: usize,
    pub len: usize,
    /// Worst |Δ| − (atol + rtol·|ref|) and where it is.
    pub worst_index: usize,
    pub worst_got: f64,
    pub worst_expected: f64,
    pub tol: Tolerance,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tensor `{}`: {} of {} elements outside |Δ| ≤ {:e} + {:e}·|ref|; first at [{}]: got {:e}, expected {:e}; worst at [{}]: got {:e}, expected {:e}",
            self.tensor,
            self.failures,
            self.len,
            self.tol.atol,
            self.tol.rtol,
            self.index,
            self.got,
            self.expected,
            self.worst_index,
            self.worst_got,
            self.worst_expected
        )
    }
}

impl std::error::Error for Mismatch {}

impl Tolerance {
    pub const fn new(atol: f64, rtol: f64) -> Self {
        Self { atol, rtol }
    }
    /// Bit-for-bit equality (NaNs compare equal to NaNs).
    pub const EXACT: Tolerance = Tolerance {
        atol: 0.0,
        rtol: 0.0,
    };
    /// f32 op against an f64 loop.
    pub const F32: Tolerance = Tolerance {
        atol: 1e-5,
        rtol: 1e-4,
    };
    /// bf16 storage against an f32 reference.
    pub const BF16: Tolerance = Tolerance {
        atol: 1e-2,
        rtol: 2e-2,
    };

    /// Whether one pair of values is within tolerance. NaN matches only NaN; ±inf matches the same inf.
    pub fn accepts(&self, got: f64, expected: f64) -> bool {
        if got.is_nan() || expected.is_nan() {
            return got.is_nan() && expected.is_nan();
        }
        if got.is_infinite() || expected.is_infinite() {
            return got == expected;
        }
        (got - expected).abs() <= self.atol + self.rtol * expected.abs()
    }

    /// Compares two sequences element by element. Lengths must match (a length mismatch is reported
    /// as index = min(len) with NaN values).
    pub fn compare<G, E>(&self, tensor: &str, got: G, expected: E) -> Result<(), Mismatch>
    where
        G: IntoIterator,
        G::Item: Into<f64>,
        E: IntoIterator,
        E::Item: Into<f64>,
    {
        let got: Vec<f64> = got.into_iter().map(Into::into).collect();
        let exp: Vec<f64> = expected.into_iter().map(Into::into).collect();
        if got.len() != exp.len() {
            return Err(Mismatch {
                tensor: format!("{tensor} (length {} vs expected {})", got.len(), exp.len()),
                index: got.len().min(exp.len()),
                got: f64::NAN,
                expected: f64::NAN,
                failures: 1,
                len: exp.len(),
                worst_index: 0,
                worst_got: f64::NAN,
                worst_expected: f64::NAN,
                tol: *self,
            });
        }
        let mut first: Option<usize> = None;
        let mut failures = 0usize;
        let mut worst = (0usize, f64::NEG_INFINITY);
        for (i, (&g, &e)) in got.iter().zip(&exp).enumerate() {
            if !self.accepts(g, e) {
                failures += 1;
                first.get_or_insert(i);
                let excess = if g.is_finite() && e.is_finite() {
                    (g - e).abs() - (self.atol + self.rtol * e.abs())
                } else {
                    f64::INFINITY
                };
                if excess > worst.1 {
                    worst = (i, excess);
                }
            }
        }
        match first {
            None => Ok(()),
            Some(i) => Err(Mismatch {
                tensor: tensor.to_string(),
                index: i,
                got: got[i],
                expected: exp[i],
                failures,
                len: exp.len(),
                worst_index: worst.0,
                worst_got: got[worst.0],
                worst_expected: exp[worst.0],
                tol: *self,
            }),
        }
    }

    /// `compare`, panicking with the mismatch message: for tests.
    #[track_caller]
    pub fn assert_close<G, E>(&self, tensor: &str, got: G, expected: E)
    where
        G: IntoIterator,
        G::Item: Into<f64>,
        E: IntoIterator,
        E::Item: Into<f64>,
    {
        if let Err(m) = self.compare(tensor, got, expected) {
            panic!("{m}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_tensor_index_and_values() {
        let err = Tolerance::new(1e-6, 1e-6)
            .compare("dq", [1.0f32, 2.0, 3.0], [1.0f32, 2.5, 3.0])
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("`dq`")
                && msg.contains("[1]")
                && msg.contains("2.5e0")
                && msg.contains("2e0"),
            "{msg}"
        );
        assert_eq!(err.failures, 1);
    }

    #[test]
    fn nan_and_inf_rules() {
        let t = Tolerance::new(1.0, 1.0);
        assert!(t.accepts(f64::NAN, f64::NAN));
        assert!(!t.accepts(0.0, f64::NAN));
        assert!(!t.accepts(f64::INFINITY, 1e300));
        assert!(t.accepts(f64::NEG_INFINITY, f64::NEG_INFINITY));
        assert!(Tolerance::EXACT
            .compare("x", [1.0f32], [1.0f32, 2.0])
            .is_err());
    }
}
