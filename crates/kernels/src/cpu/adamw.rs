//! One AdamW step with torch semantics (`torch.optim.AdamW(foreach=False)`, i.e. `_single_tensor_adam`
//! with `decoupled_weight_decay=True`), reproducing torch's float32 operation order.
//!
//! Contract: `p`, `g`, `m`, `v` all have the same length (any length, 0 included); `p`, `m`, `v` are
//! updated in place, `g` is read. `h.step` is the 1-based t of this update (torch increments its step
//! counter before using it). Per element, in torch's order, each line one torch kernel (one f32 rounding
//! per line unless noted):
//! ```text
//! p ← p · f32(1 − lr·wd)                               (param.mul_; skipped when wd == 0)
//! m ← fma(w, g − m, m),  w = f32(1 − β1)                (exp_avg.lerp_(g, 1 − β1); torch's CPU lerp is
//!                                                        an FMA; for w ≥ 0.5 it is fma(w − 1, g − m, g))
//! v ← fma(f32(1 − β2)·g, g, v · f32(β2))                (exp_avg_sq.mul_(β2).addcmul_(g, g, 1 − β2);
//!                                                        the compiler fuses the last multiply-add)
//! d ← sqrt(v) / f32(√(1 − β2^t)) + f32(eps)             (denom; two kernels)
//! p ← p + (f32(−lr/(1 − β1^t)) · m) / d                 (param.addcdiv_(m, d, value=−step_size))
//! ```
//! The scalars (`1 − lr·wd`, `1 − β1^t`, `lr/(1 − β1^t)`, `(1 − β2^t)^0.5`) are Python doubles in torch,
//! computed here in f64 the same way (`powf` like Python's `**`) and rounded to f32 where torch's kernels
//! do. The hyper-parameters arrive as f32; each is widened through its shortest decimal form (f32 0.001 →
//! f64 0.001, not 0.0010000000474974513) so that a value written as a decimal in a config gives exactly
//! the double torch would have used.
//!
//! Agreement with torch 2.15 on x86-64 (tests/golden/fixtures/adamw.json): `m` and `v` bit for bit; `p`
//! within a few ulps, because torch's vectorized f32 `sqrt` on AVX-512 is not correctly rounded (1 ulp
//! off on ~17% of inputs) while `f32::sqrt` is.

use rayon::prelude::*;

use crate::contract;
use crate::error::{ensure, Result};

/// Elements per rayon task: large enough to amortize scheduling, small enough to spread a LoRA
/// parameter set over the cores.
const CHUNK: usize = 1 << 14;

/// The f64 a decimal-written hyper-parameter had before it was stored as f32 (see the module doc).
fn as_decimal_f64(x: f32) -> f64 {
    // `{}` on f32 prints the shortest decimal that round-trips to x; parsing it as f64 cannot fail.
    format!("{x}").parse::<f64>().unwrap_or(x as f64)
}

/// The per-step f32 scalars of the update (see the module doc), computed once on the host in torch's
/// f64 order. Shared with the CUDA backend, whose `adamw_k` runs the same per-element f32 operations on
/// these same scalars, so the two backends agree bit for bit wherever `sqrt` and division are correctly
/// rounded (they are on both).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamScalars {
    /// f32(1 − lr·wd); None when wd == 0 (torch skips the multiply).
    pub decay: Option<f32>,
    /// f32(1 − β1), the lerp weight.
    pub w1: f32,
    /// |w1| < 0.5: torch's lerp takes the `fma(w, g − m, m)` branch, else `fma(w − 1, g − m, g)`.
    pub w1_small: bool,
    /// w1 − 1 in f32 (the weight of the second lerp branch).
    pub w1_minus_1: f32,
    /// f32(β2).
    pub b2: f32,
    /// f32(1 − β2).
    pub one_minus_b2: f32,
    /// f32(−lr/(1 − β1^t)).
    pub neg_step_size: f32,
    /// f32((1 − β2^t)^0.5).
    pub bc2_sqrt: f32,
    /// f32(eps).
    pub eps: f32,
}

impl AdamScalars {
    /// Validates the hyper-parameters (typed errors naming `op` and the argument) and computes the
    /// scalars.
    pub fn new(op: &'static str, h: &crate::AdamW) -> Result<AdamScalars> {
        ensure(op, "step", h.step >= 1, || {
            "step is 1-based; got 0".to_string()
        })?;
        let finite_nonneg = |x: f32| x.is_finite() && x >= 0.0;
        ensure(op, "lr", finite_nonneg(h.lr), || {
            format!("lr must be finite and >= 0, got {}", h.lr)
        })?;
        ensure(op, "eps", finite_nonneg(h.eps), || {
            format!("eps must be finite and >= 0, got {}", h.eps)
        })?;
        ensure(op, "weight_decay", finite_nonneg(h.weight_decay), || {
            format!(
                "weight_decay must be finite and >= 0, got {}",
                h.weight_decay
            )
        })?;
        for (name, b) in [("beta1", h.beta1), ("beta2", h.beta2)] {
            ensure(op, name, (0.0..1.0).contains(&b), || {
                format!("{name} must be in [0, 1), got {b}")
            })?;
        }
        let lr = as_decimal_f64(h.lr);
        let b1 = as_decimal_f64(h.beta1);
        let b2 = as_decimal_f64(h.beta2);
        let wd = as_decimal_f64(h.weight_decay);
        // torch keeps `step` in an f32 tensor and reads it back with .item(): exact for t < 2^24.
        let t = h.step as f32 as f64;
        let w1 = (1.0 - b1) as f32;
        Ok(AdamScalars {
            decay: (wd != 0.0).then_some((1.0 - lr * wd) as f32),
            w1,
            w1_small: w1.abs() < 0.5,
            w1_minus_1: w1 - 1.0,
            b2: b2 as f32,
            one_minus_b2: (1.0 - b2) as f32,
            neg_step_size: (-(lr / (1.0 - b1.powf(t)))) as f32,
            bc2_sqrt: (1.0 - b2.powf(t)).powf(0.5) as f32,
            eps: as_decimal_f64(h.eps) as f32,
        })
    }

    /// The update of one element, in torch's f32 operation order (the CUDA kernel transcribes this).
    #[inline(always)]
    pub fn update(&self, p: &mut f32, g: f32, m: &mut f32, v: &mut f32) {
        if let Some(d) = self.decay {
            *p *= d;
        }
        *m = if self.w1_small {
            self.w1.mul_add(g - *m, *m)
        } else {
            self.w1_minus_1.mul_add(g - *m, g)
        };
        *v = (self.one_minus_b2 * g).mul_add(g, *v * self.b2);
        let denom = v.sqrt() / self.bc2_sqrt + self.eps;
        *p += (self.neg_step_size * *m) / denom;
    }
}

/// One torch-AdamW step on `p` with gradient `g` and moment buffers `m`, `v` (see the module doc).
///
/// Errors: length mismatch (naming the buffer), `step == 0`, or hyper-parameters torch would refuse
/// (lr < 0, eps < 0, β outside [0, 1), wd < 0, or any of them not finite).
pub fn adamw_step(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    h: &crate::AdamW,
) -> Result<()> {
    contract::adamw(p.len(), g.len(), m.len(), v.len())?;
    let sc = AdamScalars::new("adamw", h)?;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                sc.update(p, g, m, v);
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tolerance;

    fn hp(step: u64) -> crate::AdamW {
        crate::AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            step,
        }
    }

    #[test]
    fn decimal_widening_recovers_the_written_value() {
        assert_eq!(as_decimal_f64(1e-3), 1e-3);
        assert_eq!(as_decimal_f64(0.999), 0.999);
        assert_eq!(as_decimal_f64(2e-4), 2e-4);
    }

    /// The same step written naively in f64 (no FMA, no intermediate f32 roundings): the f32 kernel must
    /// agree to f32 precision over several steps.
    #[test]
    fn matches_an_f64_reference() {
        let n = 1000;
        let mut p: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let mut m = vec![0.0f32; n];
        let mut v = vec![0.0f32; n];
        let (mut p64, mut m64, mut v64): (Vec<f64>, Vec<f64>, Vec<f64>) = (
            p.iter().map(|&x| x as f64).collect(),
            vec![0.0; n],
            vec![0.0; n],
        );
        for step in 1..=5u64 {
            let g: Vec<f32> = (0..n)
                .map(|i| (((i * 13 + step as usize * 7) % 29) as f32 - 14.0) / 10.0)
                .collect();
            adamw_step(&mut p, &g, &mut m, &mut v, &hp(step)).unwrap();
            let (lr, b1, b2, eps, wd) = (1e-3, 0.9, 0.999, 1e-8, 0.01);
            for i in 0..n {
                let gi = g[i] as f64;
                p64[i] *= 1.0 - lr * wd;
                m64[i] = b1 * m64[i] + (1.0 - b1) * gi;
                v64[i] = b2 * v64[i] + (1.0 - b2) * gi * gi;
                let denom = v64[i].sqrt() / (1.0 - b2.powi(step as i32)).sqrt() + eps;
                p64[i] -= lr / (1.0 - b1.powi(step as i32)) * m64[i] / denom;
            }
        }
        Tolerance::new(1e-6, 1e-5).assert_close("p", p.iter().copied(), p64.iter().copied());
        Tolerance::new(1e-7, 1e-5).assert_close("m", m.iter().copied(), m64.iter().copied());
        Tolerance::new(1e-9, 1e-5).assert_close("v", v.iter().copied(), v64.iter().copied());
    }

    #[test]
    fn bad_arguments_are_typed_errors() {
        let mut p = vec![0.0f32; 4];
        let (mut m, mut v) = (vec![0.0f32; 4], vec![0.0f32; 4]);
        let e = adamw_step(&mut p, &[0.0; 3], &mut m, &mut v, &hp(1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("adamw") && e.contains("`g`") && e.contains('3') && e.contains('4'),
            "{e}"
        );
        let e = adamw_step(&mut p, &[0.0; 4], &mut m, &mut v, &hp(0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("step"), "{e}");
        let mut bad = hp(1);
        bad.beta2 = 1.0;
        let e = adamw_step(&mut p, &[0.0; 4], &mut m, &mut v, &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("beta2"), "{e}");
        let mut bad = hp(1);
        bad.lr = f32::NAN;
        assert!(adamw_step(&mut p, &[0.0; 4], &mut m, &mut v, &bad).is_err());
        // Empty buffers are a valid no-op.
        assert!(adamw_step(&mut [], &[], &mut [], &mut [], &hp(1)).is_ok());
    }
}
