//! Typed errors for every op. A message always names the op and the argument at fault.

/// What can go wrong when calling an op.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A buffer has the wrong number of elements for the dimensions given.
    #[error("{op}: argument `{arg}` has {found} elements but the shape {shape} needs {expected}")]
    Shape {
        op: &'static str,
        arg: &'static str,
        /// The expected shape in dimension letters with values, e.g. `[M=4, K=8]`.
        shape: String,
        expected: usize,
        found: usize,
    },
    /// Dimensions that are inconsistent with each other (e.g. NH not a multiple of NKV).
    #[error("{op}: invalid argument `{arg}`: {msg}")]
    Invalid {
        op: &'static str,
        arg: &'static str,
        msg: String,
    },
    /// The backend itself failed (driver error, out of device memory, NVRTC failure...).
    #[error("{backend} backend: {msg}")]
    Backend { backend: &'static str, msg: String },
}

pub type Result<T> = std::result::Result<T, KernelError>;

/// Checks that `found == expected`, naming the op, the argument and the shape.
pub fn check_len(
    op: &'static str,
    arg: &'static str,
    found: usize,
    expected: usize,
    shape: impl FnOnce() -> String,
) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(KernelError::Shape {
            op,
            arg,
            shape: shape(),
            expected,
            found,
        })
    }
}

/// Returns an `Invalid` error unless `cond` holds.
pub fn ensure(
    op: &'static str,
    arg: &'static str,
    cond: bool,
    msg: impl FnOnce() -> String,
) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(KernelError::Invalid {
            op,
            arg,
            msg: msg(),
        })
    }
}
