//! Loss scaling and gradient clipping around one window's backward.
//!
//! With a dynamic scaler the backward runs on loss·S, the gradients are divided by S (exact for a power
//! of two) before the norm, so everything after [`GradScaling::unscale`] sees unscaled gradients. The
//! verdict on a window follows torch's GradScaler: non-finite gradients under a finite loss are an
//! overflow (the scale backs off) unless the scale is already at its floor, where they count as a
//! non-finite step like any other. Clipping is torch's `clip_grad_norm_`.

use afinar_gemma::Grads;
use afinar_kernels::{clip_coef, Backend};

use super::Result;
use crate::config::Config;
use crate::loss_scale::{DynamicLossScaler, LossScaleError, LossScalerState, ScaleUpdate};

/// What one window's loss and gradient norm allow.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Verdict {
    /// Both finite: clip and update. `scale`: what the scaler did (it may have grown).
    Update { scale: Option<ScaleUpdate> },
    /// The scaled gradients overflowed (the loss itself finite) above the scale's floor: the update
    /// is skipped and does not count toward the non-finite stop; the scale is now `to`.
    Overflow { to: f32 },
    /// Non-finite loss or gradient norm: the update is skipped and counts toward the stop.
    NonFinite,
}

/// The dynamic loss scaler (when `train.loss_scaling` resolves to dynamic) and the clipping norm.
pub(super) struct GradScaling {
    scaler: Option<DynamicLossScaler>,
    max_grad_norm: f64,
}

impl GradScaling {
    pub fn new(cfg: &Config) -> Self {
        GradScaling {
            scaler: cfg
                .train
                .loss_scaling
                .is_dynamic(cfg.model.dtype)
                .then(DynamicLossScaler::new),
            max_grad_norm: cfg.train.max_grad_norm,
        }
    }

    /// The factor the next backward multiplies the loss by (1 without scaling).
    pub fn scale(&self) -> f32 {
        self.scaler.as_ref().map_or(1.0, |s| s.scale())
    }

    /// What a checkpoint records.
    pub fn state(&self) -> Option<LossScalerState> {
        self.scaler.as_ref().map(|s| s.state())
    }

    /// Restores a checkpoint's scaler state. Returns a note when this run scales but the checkpoint
    /// holds no scaler state (the scale restarts). The saved state of a scaler this config no longer
    /// uses is dropped (the keys that decide it are resume-relevant, so this only happens when "auto"
    /// resolves the same way).
    pub fn restore(
        &mut self,
        saved: Option<LossScalerState>,
    ) -> std::result::Result<Option<String>, LossScaleError> {
        match (self.scaler.as_mut(), saved) {
            (Some(s), Some(st)) => s.restore(st).map(|()| None),
            (Some(s), None) => Ok(Some(format!(
                "resume: the checkpoint holds no loss-scaler state; the loss scale restarts at {}",
                s.scale()
            ))),
            (None, _) => Ok(None),
        }
    }

    /// Divides gradients computed at loss scale `ls` back to the true gradients.
    pub fn unscale<B: Backend>(&self, grads: &mut Grads<B>, ls: f32) -> Result<()> {
        if ls != 1.0 {
            grads.scale(1.0 / ls)?;
        }
        Ok(())
    }

    /// Judges a window by its loss and (unscaled) gradient norm and moves the scaler on.
    pub fn judge(&mut self, loss: f64, grad_norm: f64) -> Verdict {
        let finite = loss.is_finite() && grad_norm.is_finite();
        // An overflow of the scaled gradients (the loss itself finite) is the scaler's feedback, not a
        // data or model problem, unless the scale is already at its floor.
        let overflow =
            !finite && loss.is_finite() && self.scaler.as_ref().is_some_and(|s| !s.at_floor());
        let scale_update = self.scaler.as_mut().map(|s| s.update(!finite));
        if overflow {
            Verdict::Overflow { to: self.scale() }
        } else if finite {
            Verdict::Update {
                scale: scale_update,
            }
        } else {
            Verdict::NonFinite
        }
    }

    /// Clips to `train.max_grad_norm` (0 = off). Torch multiplies even when the coefficient is
    /// clamped to 1, and so does this.
    pub fn clip<B: Backend>(&self, grads: &mut Grads<B>, grad_norm: f64) -> Result<()> {
        if self.max_grad_norm > 0.0 {
            grads.scale(clip_coef(grad_norm, self.max_grad_norm) as f32)?;
        }
        Ok(())
    }
}
