//! Gradients of the trainable parameters, and the (parameter, gradient) pairs the optimizer walks.

use std::sync::Arc;

use afinar_kernels::{Backend, Storage};

use crate::error::{GemmaError, Result};
use crate::params::ParamId;

/// Gradients of every trainable parameter, in `Gemma2Model::trainable_ids()` order. They ACCUMULATE across
/// `forward_backward` calls (gradient accumulation); call `zero` after each optimizer step.
pub struct Grads<B: Backend> {
    backend: Arc<B>,
    ids: Vec<ParamId>,
    bufs: Vec<B::Buf>,
}

impl<B: Backend> Grads<B> {
    /// Zeroed gradients in `Storage::Master` (f32) for `ids`, each of `shape(id)` elements. The public
    /// constructor is `Grads::zeros(&model)` (in `model/mod.rs`, beside `trainable_ids`).
    pub(crate) fn zeros_for_ids(
        backend: Arc<B>,
        ids: Vec<ParamId>,
        numel: impl Fn(&ParamId) -> usize,
    ) -> Result<Self> {
        let bufs = ids
            .iter()
            .map(|id| backend.zeros_for(numel(id), Storage::Master))
            .collect::<afinar_kernels::Result<Vec<_>>>()?;
        Ok(Grads { backend, ids, bufs })
    }

    /// Sets every gradient to 0.
    pub fn zero(&mut self) -> Result<()> {
        for b in &mut self.bufs {
            self.backend.fill(b, 0.0)?;
        }
        Ok(())
    }

    /// Σ g² over all tensors, in f64 (the squared global norm for clipping).
    pub fn sum_squares(&self) -> Result<f64> {
        let mut s = 0.0;
        for b in &self.bufs {
            s += self.backend.sum_squares(b)?;
        }
        Ok(s)
    }

    /// g ← alpha·g for every tensor (clipping, loss normalisation).
    pub fn scale(&mut self, alpha: f32) -> Result<()> {
        for b in &mut self.bufs {
            self.backend.scale(b, alpha)?;
        }
        Ok(())
    }

    /// The parameter ids, in order.
    pub fn ids(&self) -> &[ParamId] {
        &self.ids
    }

    /// (id, gradient) pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &B::Buf)> {
        self.ids.iter().copied().zip(self.bufs.iter())
    }

    /// The gradient of one parameter.
    pub fn get(&self, id: ParamId) -> Option<&B::Buf> {
        self.ids
            .iter()
            .position(|&i| i == id)
            .map(|i| &self.bufs[i])
    }

    /// The gradient of a parameter by file name (`ParamId::name`).
    pub fn get_by_name(&self, name: &str) -> Option<&B::Buf> {
        ParamId::parse(name).and_then(|id| self.get(id))
    }

    pub(crate) fn get_mut(&mut self, id: ParamId) -> Option<&mut B::Buf> {
        self.ids
            .iter()
            .position(|&i| i == id)
            .map(move |i| &mut self.bufs[i])
    }

    pub(crate) fn position(&self, id: ParamId) -> Option<usize> {
        self.ids.iter().position(|&i| i == id)
    }

    /// Every gradient buffer, in `ids()` order (data-parallel training sums them across ranks).
    pub fn buffers_mut(&mut self) -> &mut [B::Buf] {
        &mut self.bufs
    }

    pub(crate) fn bufs_mut(&mut self) -> &mut [B::Buf] {
        &mut self.bufs
    }

    pub(crate) fn bufs(&self) -> &[B::Buf] {
        &self.bufs
    }

    /// Copies one gradient to the host.
    pub fn to_host(&self, id: ParamId) -> Result<Vec<f32>> {
        let b = self
            .get(id)
            .ok_or_else(|| GemmaError::Invalid(format!("no gradient for `{}`", id.name())))?;
        Ok(self.backend.to_host(b)?)
    }
}

/// A trainable parameter with its gradient, for the optimizer.
pub struct TrainableParam<'a, B: Backend> {
    pub id: ParamId,
    pub param: &'a mut B::Buf,
    pub grad: &'a B::Buf,
}
