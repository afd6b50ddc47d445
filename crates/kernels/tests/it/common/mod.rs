//! Shared helpers of the kernels op tests: the per-backend test macro, seeded random data, host/device
//! transfers and central finite differences in f64.
#![allow(dead_code)]

use afinar_kernels::nf4::{Absmax, Nf4Tensor, NESTED_BLOCK};
use afinar_kernels::{Backend, Tolerance};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Generates, for each `name => body`, a module `name` with a CPU `#[test]` calling
/// `body(&Cpu, Tolerance::F32)` and, with feature `cuda`, a CUDA `#[test]` calling
/// `body(&cuda, Tolerance::BF16)` that prints `skipped: no CUDA driver` and passes where there is none.
/// Test bodies are written once, generic over `B: Backend`, and receive the backend's tolerance for
/// a plain forward comparison (they may widen it for long reductions or finite differences).
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident => $body:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn cpu() {
                super::$body(&afinar_kernels::Cpu, afinar_kernels::Tolerance::F32);
            }

            #[cfg(feature = "cuda")]
            #[test]
            fn cuda() {
                match afinar_kernels::cuda::Cuda::try_new() {
                    Ok(Some(backend)) => super::$body(&backend, afinar_kernels::Tolerance::BF16),
                    Ok(None) => eprintln!("skipped: no CUDA driver"),
                    Err(e) => panic!("the CUDA backend failed to start: {e}"),
                }
            }
        }
    )*};
}

/// A seeded generator (ChaCha8: same stream on every platform).
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// n values uniform in [−scale, scale).
pub fn uniform(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// A dropout mask of n values: 0 with probability p, else 1/(1−p).
pub fn dropout_mask(rng: &mut ChaCha8Rng, n: usize, p: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            if rng.random::<f32>() < p {
                0.0
            } else {
                1.0 / (1.0 - p)
            }
        })
        .collect()
}

pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

/// Uploads host data (panics with the backend's error: tests only).
pub fn up<B: Backend>(b: &B, x: &[f32]) -> B::Buf {
    b.from_host(x).expect("from_host")
}

pub fn up_ids<B: Backend>(b: &B, x: &[i32]) -> B::Ids {
    b.ids_from_host(x).expect("ids_from_host")
}

pub fn down<B: Backend>(b: &B, x: &B::Buf) -> Vec<f32> {
    b.to_host(x).expect("to_host")
}

/// A buffer of n NaNs: an `Overwrite` output must not read it.
pub fn nans<B: Backend>(b: &B, n: usize) -> B::Buf {
    up(b, &vec![f32::NAN; n])
}

/// Central finite differences of a scalar f64 function at x (step h·max(1, |x_i|)).
pub fn fd_grad(x: &[f64], h: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = x[i];
            let step = h * orig.abs().max(1.0);
            x[i] = orig + step;
            let fp = f(&x);
            x[i] = orig - step;
            let fm = f(&x);
            x[i] = orig;
            (fp - fm) / (2.0 * step)
        })
        .collect()
}

/// Σ r⊙y in f64: the scalar loss whose gradient w.r.t. y is r.
pub fn dot64(r: &[f64], y: &[f64]) -> f64 {
    r.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// `tol` widened by `factor` (for gradients: long sums in f32 against an f64 finite difference).
pub fn widen(tol: Tolerance, factor: f64) -> Tolerance {
    Tolerance::new(tol.atol * factor, tol.rtol * factor)
}

/// A random NF4 tensor [n,k] built by hand: random codes, and either plain absmax or a nested
/// (double-quantized) absmax with a random 8-bit map. `numel` need not be a multiple of 64 or even.
pub fn random_nf4(seed: u64, n: usize, k: usize, nested: bool) -> Nf4Tensor {
    let mut g = rng(seed);
    let numel = n * k;
    let blocks = numel.div_ceil(64);
    let packed: Vec<u8> = (0..numel.div_ceil(2)).map(|_| g.random()).collect();
    let absmax = if nested {
        let mut code8 = Box::new([0.0f32; 256]);
        for (i, c) in code8.iter_mut().enumerate() {
            *c = (i as f32 - 127.5) / 128.0;
        }
        Absmax::Nested {
            codes: (0..blocks).map(|_| g.random()).collect(),
            nested_absmax: (0..blocks.div_ceil(NESTED_BLOCK))
                .map(|_| g.random_range(0.05..0.2))
                .collect(),
            offset: 0.3,
            code8,
        }
    } else {
        Absmax::Plain((0..blocks).map(|_| g.random_range(0.01..1.0)).collect())
    };
    Nf4Tensor {
        shape: vec![n, k],
        packed,
        absmax,
    }
}
