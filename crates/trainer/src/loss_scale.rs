//! Dynamic loss scaling for fp16 training (torch.amp.GradScaler semantics).
//!
//! Why: f16 has 5 exponent bits (largest finite 65504, smallest normal 2⁻¹⁴ ≈ 6.1e-5). Gradients of a
//! token-averaged loss are small, so in f16 activations many of them underflow to zero. Scaling the
//! loss by S (a power of two) before the backward shifts every gradient up by S; the trainer divides
//! the gradients by S again (in f32, exact for a power of two) before the norm, the clipping and the
//! AdamW update, so the update is the unscaled one. When S is too large, some gradient overflows to
//! ±inf (or a NaN appears): the step is skipped and S is halved. After `growth_interval` consecutive
//! finite steps S is doubled, probing for the largest scale that does not overflow.
//!
//! Semantics (torch 2.x `GradScaler` with its defaults, `_amp_update_scale_`):
//! - init_scale 2¹⁶, growth_factor 2, backoff_factor 0.5, growth_interval 2000;
//! - after each step: non-finite gradients → scale ·= backoff_factor, growth tracker = 0; finite →
//!   tracker += 1, and when it reaches growth_interval the scale ·= growth_factor (only if the result
//!   is finite) and the tracker restarts at 0.
//!
//! One deliberate difference: the scale never backs off below [`MIN_SCALE`] (1.0); torch has no floor.
//! At scale 1 the loss is not scaled at all, so an overflow there is not caused by the scaling and is
//! treated by the trainer like any other non-finite step (it counts toward the
//! "MAX_NONFINITE_IN_ROW in a row" stop). Above the floor an overflow is the expected feedback of the
//! scaling and does not count.
//!
//! The scale and the growth tracker are part of the checkpoint ([`LossScalerState`]), so a resumed run
//! continues with the same scale.

use serde::{Deserialize, Serialize};

/// `train.loss_scaling`: whether the loss is scaled before the backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LossScaling {
    /// Dynamic scaling iff `model.dtype = "f16"` (f16 needs it; bf16 and f32 have f32's exponent range).
    #[default]
    Auto,
    /// Always dynamic (also useful to test the machinery in f32: power-of-two scaling is exact there).
    Dynamic,
    /// Never scale.
    None,
}

impl LossScaling {
    /// Whether this setting scales the loss for a model stored in `dtype`.
    pub fn is_dynamic(self, dtype: crate::config::Dtype) -> bool {
        match self {
            LossScaling::Auto => dtype == crate::config::Dtype::F16,
            LossScaling::Dynamic => true,
            LossScaling::None => false,
        }
    }
}

/// torch GradScaler's default initial scale, 2¹⁶.
pub const INIT_SCALE: f32 = 65536.0;
/// torch GradScaler's default growth factor.
pub const GROWTH_FACTOR: f32 = 2.0;
/// torch GradScaler's default backoff factor.
pub const BACKOFF_FACTOR: f32 = 0.5;
/// torch GradScaler's default growth interval (consecutive finite steps before the scale grows).
pub const GROWTH_INTERVAL: u32 = 2000;
/// The scale never backs off below this (see the module docs).
pub const MIN_SCALE: f32 = 1.0;

/// The checkpointed part of a [`DynamicLossScaler`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScalerState {
    /// The current loss scale S (a power of two under the default factors).
    pub scale: f32,
    /// Consecutive finite steps since the last growth or backoff (< growth interval).
    pub growth_tracker: u32,
}

/// A refused scaler parameter or saved state.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LossScaleError {
    #[error("loss scaler: {what} = {value} is invalid: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// What [`DynamicLossScaler::update`] did to the scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScaleUpdate {
    /// Finite step, the tracker moved on; the scale stays.
    Unchanged,
    /// Finite step that completed a growth interval: the scale grew.
    Grew { from: f32, to: f32 },
    /// Overflow: the scale backed off.
    BackedOff { from: f32, to: f32 },
    /// Overflow at the floor: the scale stays at [`MIN_SCALE`].
    AtFloor,
}

/// Dynamic loss scale (see the module docs for the rules).
#[derive(Clone, Debug, PartialEq)]
pub struct DynamicLossScaler {
    scale: f32,
    growth_tracker: u32,
    growth_factor: f32,
    backoff_factor: f32,
    growth_interval: u32,
    min_scale: f32,
}

impl Default for DynamicLossScaler {
    fn default() -> Self {
        Self {
            scale: INIT_SCALE,
            growth_tracker: 0,
            growth_factor: GROWTH_FACTOR,
            backoff_factor: BACKOFF_FACTOR,
            growth_interval: GROWTH_INTERVAL,
            min_scale: MIN_SCALE,
        }
    }
}

fn invalid(what: &'static str, value: impl ToString, reason: &'static str) -> LossScaleError {
    LossScaleError::Invalid {
        what,
        value: value.to_string(),
        reason,
    }
}

impl DynamicLossScaler {
    /// torch's defaults (2¹⁶, ×2 every 2000 finite steps, ×0.5 on overflow) with a floor of 1.
    pub fn new() -> Self {
        Self::default()
    }

    /// Explicit parameters. `init_scale` ≥ `min_scale` > 0, `growth_factor` > 1,
    /// 0 < `backoff_factor` < 1, `growth_interval` ≥ 1, all finite.
    pub fn with_params(
        init_scale: f32,
        growth_factor: f32,
        backoff_factor: f32,
        growth_interval: u32,
        min_scale: f32,
    ) -> Result<Self, LossScaleError> {
        if !(min_scale.is_finite() && min_scale > 0.0) {
            return Err(invalid("min_scale", min_scale, "must be finite and > 0"));
        }
        if !(init_scale.is_finite() && init_scale >= min_scale) {
            return Err(invalid(
                "init_scale",
                init_scale,
                "must be finite and ≥ min_scale",
            ));
        }
        if !(growth_factor.is_finite() && growth_factor > 1.0) {
            return Err(invalid(
                "growth_factor",
                growth_factor,
                "must be finite and > 1",
            ));
        }
        if !(backoff_factor > 0.0 && backoff_factor < 1.0) {
            return Err(invalid(
                "backoff_factor",
                backoff_factor,
                "must be in (0, 1)",
            ));
        }
        if growth_interval == 0 {
            return Err(invalid("growth_interval", 0, "must be ≥ 1"));
        }
        Ok(Self {
            scale: init_scale,
            growth_tracker: 0,
            growth_factor,
            backoff_factor,
            growth_interval,
            min_scale,
        })
    }

    /// The current scale S: the loss (in practice the gradient seed, `grad_scale`) is multiplied by it.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Consecutive finite steps since the last change.
    pub fn growth_tracker(&self) -> u32 {
        self.growth_tracker
    }

    /// Whether the scale sits at its floor (an overflow now is not the scaling's doing).
    pub fn at_floor(&self) -> bool {
        self.scale <= self.min_scale
    }

    /// Records one optimizer step: `found_inf` = the unscaled gradients (or the loss) were not finite.
    pub fn update(&mut self, found_inf: bool) -> ScaleUpdate {
        let from = self.scale;
        if found_inf {
            self.growth_tracker = 0;
            if self.at_floor() {
                return ScaleUpdate::AtFloor;
            }
            self.scale = (from * self.backoff_factor).max(self.min_scale);
            return ScaleUpdate::BackedOff {
                from,
                to: self.scale,
            };
        }
        let successful = self.growth_tracker + 1;
        if successful >= self.growth_interval {
            self.growth_tracker = 0;
            let to = from * self.growth_factor;
            // torch keeps the old scale when growing would overflow f32.
            if to.is_finite() {
                self.scale = to;
                return ScaleUpdate::Grew { from, to };
            }
            return ScaleUpdate::Unchanged;
        }
        self.growth_tracker = successful;
        ScaleUpdate::Unchanged
    }

    /// The part a checkpoint keeps.
    pub fn state(&self) -> LossScalerState {
        LossScalerState {
            scale: self.scale,
            growth_tracker: self.growth_tracker,
        }
    }

    /// Restores a checkpointed state, refusing one this scaler could not have reached (a scale that is
    /// not finite or below the floor, a tracker at or beyond the growth interval).
    pub fn restore(&mut self, st: LossScalerState) -> Result<(), LossScaleError> {
        if !(st.scale.is_finite() && st.scale >= self.min_scale) {
            return Err(invalid(
                "loss_scale.scale",
                st.scale,
                "must be finite and ≥ the minimum scale 1",
            ));
        }
        if st.growth_tracker >= self.growth_interval {
            return Err(invalid(
                "loss_scale.growth_tracker",
                st.growth_tracker,
                "must be below the growth interval",
            ));
        }
        self.scale = st.scale;
        self.growth_tracker = st.growth_tracker;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dtype;

    #[test]
    fn torch_defaults() {
        let s = DynamicLossScaler::new();
        assert_eq!(s.scale(), 65536.0);
        assert_eq!(s.growth_tracker(), 0);
        assert_eq!(s.growth_interval, 2000);
        assert_eq!(s.growth_factor, 2.0);
        assert_eq!(s.backoff_factor, 0.5);
    }

    #[test]
    fn grows_after_growth_interval_finite_steps() {
        let mut s = DynamicLossScaler::with_params(8.0, 2.0, 0.5, 3, 1.0).unwrap();
        assert_eq!(s.update(false), ScaleUpdate::Unchanged);
        assert_eq!(s.update(false), ScaleUpdate::Unchanged);
        assert_eq!(s.growth_tracker(), 2);
        assert_eq!(
            s.update(false),
            ScaleUpdate::Grew {
                from: 8.0,
                to: 16.0
            }
        );
        assert_eq!((s.scale(), s.growth_tracker()), (16.0, 0));
        // The default interval: 1999 finite steps keep the scale, the 2000th doubles it.
        let mut d = DynamicLossScaler::new();
        for _ in 0..1999 {
            assert_eq!(d.update(false), ScaleUpdate::Unchanged);
        }
        assert_eq!(d.scale(), 65536.0);
        d.update(false);
        assert_eq!((d.scale(), d.growth_tracker()), (131072.0, 0));
    }

    #[test]
    fn overflow_backs_off_and_resets_the_tracker() {
        let mut s = DynamicLossScaler::with_params(8.0, 2.0, 0.5, 3, 1.0).unwrap();
        s.update(false);
        s.update(false);
        assert_eq!(
            s.update(true),
            ScaleUpdate::BackedOff { from: 8.0, to: 4.0 }
        );
        assert_eq!((s.scale(), s.growth_tracker()), (4.0, 0));
        // The tracker restarted: three more finite steps are needed to grow.
        s.update(false);
        s.update(false);
        assert_eq!(s.scale(), 4.0);
        s.update(false);
        assert_eq!(s.scale(), 8.0);
    }

    #[test]
    fn the_floor_holds() {
        let mut s = DynamicLossScaler::with_params(4.0, 2.0, 0.5, 10, 1.0).unwrap();
        assert!(!s.at_floor());
        s.update(true);
        s.update(true);
        assert_eq!(s.scale(), 1.0);
        assert!(s.at_floor());
        assert_eq!(s.update(true), ScaleUpdate::AtFloor);
        assert_eq!(s.scale(), 1.0);
        // A backoff that would cross the floor stops at it.
        let mut t = DynamicLossScaler::with_params(3.0, 2.0, 0.25, 10, 1.0).unwrap();
        assert_eq!(
            t.update(true),
            ScaleUpdate::BackedOff { from: 3.0, to: 1.0 }
        );
    }

    #[test]
    fn growth_that_would_overflow_f32_keeps_the_scale() {
        let big = 2.0f32.powi(127);
        let mut s = DynamicLossScaler::with_params(big, 2.0, 0.5, 1, 1.0).unwrap();
        assert_eq!(s.update(false), ScaleUpdate::Unchanged);
        assert_eq!((s.scale(), s.growth_tracker()), (big, 0));
    }

    #[test]
    fn state_round_trip_and_refusals() {
        let mut s = DynamicLossScaler::new();
        for _ in 0..5 {
            s.update(false);
        }
        s.update(true);
        s.update(false);
        let st = s.state();
        assert_eq!(
            st,
            LossScalerState {
                scale: 32768.0,
                growth_tracker: 1
            }
        );
        let json = serde_json::to_string(&st).unwrap();
        let back: LossScalerState = serde_json::from_str(&json).unwrap();
        let mut r = DynamicLossScaler::new();
        r.restore(back).unwrap();
        assert_eq!(r, s);
        for bad in [
            LossScalerState {
                scale: f32::INFINITY,
                growth_tracker: 0,
            },
            LossScalerState {
                scale: 0.5,
                growth_tracker: 0,
            },
            LossScalerState {
                scale: f32::NAN,
                growth_tracker: 0,
            },
            LossScalerState {
                scale: 2.0,
                growth_tracker: 2000,
            },
        ] {
            let e = DynamicLossScaler::new()
                .restore(bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains("loss_scale."), "{e}");
        }
    }

    #[test]
    fn bad_params_are_refused_by_name() {
        for (args, what) in [
            ((0.5f32, 2.0f32, 0.5f32, 10u32, 1.0f32), "init_scale"),
            ((8.0, 1.0, 0.5, 10, 1.0), "growth_factor"),
            ((8.0, 2.0, 1.0, 10, 1.0), "backoff_factor"),
            ((8.0, 2.0, 0.5, 0, 1.0), "growth_interval"),
            ((8.0, 2.0, 0.5, 10, 0.0), "min_scale"),
            ((f32::INFINITY, 2.0, 0.5, 10, 1.0), "init_scale"),
        ] {
            let e = DynamicLossScaler::with_params(args.0, args.1, args.2, args.3, args.4)
                .unwrap_err()
                .to_string();
            assert!(e.contains(what), "{what}: {e}");
        }
    }

    #[test]
    fn auto_means_dynamic_only_for_f16() {
        assert!(LossScaling::Auto.is_dynamic(Dtype::F16));
        assert!(!LossScaling::Auto.is_dynamic(Dtype::Bf16));
        assert!(!LossScaling::Auto.is_dynamic(Dtype::F32));
        assert!(LossScaling::Dynamic.is_dynamic(Dtype::F32));
        assert!(!LossScaling::None.is_dynamic(Dtype::F16));
    }
}
