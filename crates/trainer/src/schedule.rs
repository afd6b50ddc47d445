//! Learning-rate schedules, exactly transformers' `optimization.py` lambdas (LambdaLR multiplies the
//! base lr by them). `step` is the number of optimizer steps already taken, so the first update uses
//! lambda(0), which is 0 when there is warmup — as in transformers, where `scheduler.step()` runs after
//! each `optimizer.step()`.

use crate::config::ScheduleKind;

/// A resolved schedule: kind, warmup W and total T in optimizer steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup: u64,
    pub total: u64,
}

/// transformers `get_warmup_steps`: warmup_steps if > 0, else ceil(total · ratio).
pub fn warmup_steps(total: u64, warmup_steps: u64, warmup_ratio: f64) -> u64 {
    if warmup_steps > 0 {
        warmup_steps
    } else {
        (total as f64 * warmup_ratio).ceil() as u64
    }
}

impl Schedule {
    /// The multiplier lambda(step) (f64, as Python computes it).
    pub fn lambda(&self, step: u64) -> f64 {
        let (s, w, t) = (step as f64, self.warmup as f64, self.total as f64);
        let warm = |s: f64| s / w.max(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::ConstantWithWarmup => {
                if s < w {
                    warm(s)
                } else {
                    1.0
                }
            }
            ScheduleKind::Linear => {
                if s < w {
                    warm(s)
                } else {
                    ((t - s) / (t - w).max(1.0)).max(0.0)
                }
            }
            ScheduleKind::Cosine => {
                if s < w {
                    warm(s)
                } else {
                    // num_cycles = 0.5: half a cosine from 1 down to 0.
                    let progress = (s - w) / (t - w).max(1.0);
                    (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
                }
            }
        }
    }

    /// The learning rate of the update made after `step` updates.
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.lambda(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use afinar_kernels::Tolerance;

    // Values printed by transformers 5.x in Python (repr of `scheduler.lr_lambdas[0](s)` for s in 0..12)
    // for get_{linear,cosine,constant}_schedule_with_warmup(opt, num_warmup_steps=3,
    // num_training_steps=10); the linear ones are also written as fractions.
    #[test]
    fn matches_transformers_formulas() {
        let mk = |kind| Schedule {
            kind,
            base_lr: 1.0,
            warmup: 3,
            total: 10,
        };
        let lin: Vec<f64> = (0..12)
            .map(|s| mk(ScheduleKind::Linear).lambda(s))
            .collect();
        let lin_ref = [
            0.0,
            1.0 / 3.0,
            2.0 / 3.0,
            1.0,
            6.0 / 7.0,
            5.0 / 7.0,
            4.0 / 7.0,
            3.0 / 7.0,
            2.0 / 7.0,
            1.0 / 7.0,
            0.0,
            0.0,
        ];
        Tolerance::new(1e-15, 1e-12)
            .compare("linear", lin, lin_ref)
            .unwrap();
        let cos: Vec<f64> = (0..12)
            .map(|s| mk(ScheduleKind::Cosine).lambda(s))
            .collect();
        let cos_ref = [
            0.0,
            0.3333333333333333,
            0.6666666666666666,
            1.0,
            0.9504844339512095,
            0.8117449009293668,
            0.6112604669781572,
            0.38873953302184283,
            0.18825509907063326,
            0.04951556604879048,
            0.0,
            // Past the end the HF cosine rises again (no clamp on progress); the loop never gets here.
            0.04951556604879043,
        ];
        Tolerance::new(1e-15, 1e-12)
            .compare("cosine", cos, cos_ref)
            .unwrap();
        let cww: Vec<f64> = (0..6)
            .map(|s| mk(ScheduleKind::ConstantWithWarmup).lambda(s))
            .collect();
        Tolerance::EXACT
            .compare("cww", cww, [0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0, 1.0, 1.0])
            .unwrap();
        assert_eq!(mk(ScheduleKind::Constant).lambda(0), 1.0);
        // No warmup: the first update uses the full lr.
        let nw = Schedule {
            kind: ScheduleKind::Cosine,
            base_lr: 2e-4,
            warmup: 0,
            total: 4,
        };
        assert_eq!(nw.lr(0), 2e-4);
    }

    #[test]
    fn warmup_from_ratio_is_ceil() {
        assert_eq!(warmup_steps(100, 0, 0.03), 3);
        assert_eq!(warmup_steps(101, 0, 0.03), 4); // ceil(3.03)
        assert_eq!(warmup_steps(100, 7, 0.5), 7);
        assert_eq!(warmup_steps(100, 0, 0.0), 0);
    }
}
