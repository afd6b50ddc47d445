//! AdamW with its state: the moments m, v of every trainable tensor (f32; in pinned host memory with
//! `train.paged_optimizer` on CUDA), the update, and the checkpoint that records tensors and moments.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use afinar_gemma::{Gemma2Model, Grads};
use afinar_kernels::{AdamW, Backend};

use super::Result;
use crate::checkpoint::{self, Checkpoint, TensorState, TrainerState};
use crate::config::{Config, TrainSection};

/// The AdamW state of a model's trainable tensors, in the model's trainable order.
pub(super) struct Optimizer<B: Backend> {
    /// Trainable tensor names and shapes (what a checkpoint stores them under).
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    moments: Vec<B::AdamState>,
    paged: bool,
}

impl<B: Backend> Optimizer<B> {
    /// Zero moments for every trainable tensor of `model`.
    pub fn new(model: &Gemma2Model<B>, paged: bool) -> Result<Self> {
        let names = model.trainable_names();
        let r = model.lora.as_ref().map_or(0, |l| l.r);
        let shapes: Vec<Vec<usize>> = model
            .trainable_ids()
            .iter()
            .map(|id| id.shape(&model.config, r))
            .collect();
        let mut moments = Vec::with_capacity(names.len());
        for s in &shapes {
            moments.push(model.backend().adam_state(s.iter().product(), paged)?);
        }
        Ok(Optimizer {
            names,
            shapes,
            moments,
            paged,
        })
    }

    /// Replaces tensor `i`'s moments with a checkpoint's.
    pub fn restore_moments(
        &mut self,
        model: &Gemma2Model<B>,
        i: usize,
        saved: &TensorState,
    ) -> Result<()> {
        self.moments[i] = model
            .backend()
            .adam_state_from_host(&saved.m, &saved.v, self.paged)?;
        Ok(())
    }

    /// One AdamW update of every trainable tensor with its gradient. `t` is AdamW's step (1-based:
    /// updates applied, for the bias correction).
    pub fn step(
        &mut self,
        model: &mut Gemma2Model<B>,
        grads: &Grads<B>,
        train: &TrainSection,
        lr: f64,
        t: u64,
    ) -> Result<()> {
        let hp = AdamW {
            lr: lr as f32,
            beta1: train.betas[0] as f32,
            beta2: train.betas[1] as f32,
            eps: train.eps as f32,
            weight_decay: train.weight_decay as f32,
            step: t,
        };
        let be = model.backend().clone();
        for (p, st) in model
            .params_and_grads(grads)?
            .into_iter()
            .zip(self.moments.iter_mut())
        {
            be.adamw_step(p.param, p.grad, st, &hp)?;
        }
        Ok(())
    }

    /// Writes a checkpoint of the trainable tensors, their moments, `state` and the resolved config
    /// into `run_dir/checkpoints`, keeping the newest `train.keep_checkpoints`.
    pub fn save_checkpoint(
        &self,
        model: &Gemma2Model<B>,
        state: &TrainerState,
        cfg: &Config,
        run_dir: &Path,
    ) -> Result<PathBuf> {
        let be = model.backend();
        let mut tensors = BTreeMap::new();
        for (i, name) in self.names.iter().enumerate() {
            // Paged or resident, the moments come back as the same f32 values.
            let (m, v) = be.adam_state_to_host(&self.moments[i])?;
            tensors.insert(
                name.clone(),
                TensorState {
                    shape: self.shapes[i].clone(),
                    param: model.get_tensor(name)?,
                    m,
                    v,
                },
            );
        }
        let ck = Checkpoint {
            state: state.clone(),
            tensors,
            config_toml: cfg.to_toml(),
        };
        Ok(checkpoint::save(
            &run_dir.join("checkpoints"),
            &ck,
            cfg.train.keep_checkpoints,
        )?)
    }
}
