//! ulp error helpers shared by tests/it/ops_fastmath.rs and examples/fastmath_exhaustive.rs.

/// Asserted bounds, in ulps of the exact result (see fastmath.rs for the measured maxima).
pub const EXP_ULP: f64 = 1.0;
pub const TANH_ULP: f64 = 2.0;

/// The spacing of f32 values at |y| (y exact, in f64): 2^(e−23) for a normal binade, 2⁻¹⁴⁹ for
/// subnormals, the spacing at f32::MAX above it.
pub fn ulp(y: f64) -> f64 {
    let a = y.abs().min(f64::from(f32::MAX));
    if a < f64::from(f32::MIN_POSITIVE) {
        return 2f64.powi(-149);
    }
    2f64.powi(a.log2().floor() as i32 - 23)
}

/// Error of `got` against the exact `want` in ulps; 0 when both are the same infinity or NaN, ∞ when
/// exactly one is non-finite in a way rounding cannot explain.
pub fn ulp_err(got: f32, want: f64) -> f64 {
    let rounded = want as f32; // the correctly rounded result (overflow → ±∞)
    if want.is_nan() || got.is_nan() {
        return if want.is_nan() && got.is_nan() {
            0.0
        } else {
            f64::INFINITY
        };
    }
    if rounded.is_infinite() || got.is_infinite() {
        if got == rounded {
            return 0.0;
        }
        // One of them overflowed: measure from f32::MAX's next step (2^128).
        let g = if got.is_infinite() {
            2f64.powi(128).copysign(f64::from(got))
        } else {
            f64::from(got)
        };
        return (g - want).abs() / ulp(want);
    }
    (f64::from(got) - want).abs() / ulp(want)
}
