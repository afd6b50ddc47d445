//! Exhaustive accuracy check of the CPU backend's vectorized exp / tanh (`cpu::fastmath`) over all 2³²
//! f32 inputs against f64, in ulps of the f32 result. The fast sweep of the same bounds runs in
//! `cargo test` (tests/it/ops_fastmath.rs); this one takes about a minute in release:
//!
//!     cargo run --release -p afinar-kernels --example fastmath_exhaustive

use afinar_kernels::cpu::fastmath;

#[path = "../tests/it/support/ulp.rs"]
mod ulp;
use ulp::{ulp_err, EXP_ULP, TANH_ULP};

/// Every f32 input (2³² of them); prints the worst errors. About a minute in release on 2 cores.
fn main() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let we = AtomicU64::new(0);
    let wt = AtomicU64::new(0);
    let at = |w: &AtomicU64, e: f64, x: f32| {
        // Pack (error in 1e-6 ulp, bits of x) so fetch_max keeps the worst.
        let key = ((e * 1e6).min(4e9) as u64) << 32 | u64::from(x.to_bits());
        w.fetch_max(key, Ordering::Relaxed);
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for t in 0..threads {
            let (we, wt, at) = (&we, &wt, &at);
            s.spawn(move || {
                let mut buf_e = vec![0.0f32; 1 << 16];
                let mut buf_t = vec![0.0f32; 1 << 16];
                let mut hi = t as u64;
                while hi < 1 << 16 {
                    for (i, (a, b)) in buf_e.iter_mut().zip(buf_t.iter_mut()).enumerate() {
                        let x = f32::from_bits(((hi << 16) | i as u64) as u32);
                        *a = x;
                        *b = x;
                    }
                    fastmath::exp_slice(&mut buf_e);
                    fastmath::tanh_slice(&mut buf_t);
                    let (mut me, mut mt) = ((0.0, 0.0), (0.0, 0.0));
                    for i in 0..1 << 16 {
                        let x = f32::from_bits(((hi << 16) | i as u64) as u32);
                        let e = ulp_err(buf_e[i], f64::from(x).exp());
                        let tt = ulp_err(buf_t[i], f64::from(x).tanh());
                        if e > me.0 {
                            me = (e, x);
                        }
                        if tt > mt.0 {
                            mt = (tt, x);
                        }
                    }
                    at(we, me.0, me.1);
                    at(wt, mt.0, mt.1);
                    hi += threads as u64;
                }
            });
        }
    });
    let show = |name: &str, w: u64| {
        let (e, x) = ((w >> 32) as f64 * 1e-6, f32::from_bits(w as u32));
        eprintln!(
            "{name}: max {e:.3} ulp at x = {x:e} ({:#010x})",
            x.to_bits()
        );
        e
    };
    let e = show("exp", we.into_inner());
    let t = show("tanh", wt.into_inner());
    if e > EXP_ULP || t > TANH_ULP {
        eprintln!("FAIL: bound exceeded (exp ≤ {EXP_ULP} ulp, tanh ≤ {TANH_ULP} ulp)");
        std::process::exit(1);
    }
    eprintln!("ok: exp ≤ {EXP_ULP} ulp, tanh ≤ {TANH_ULP} ulp over every f32 input");
}
