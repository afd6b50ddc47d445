//! The KV cache of one sequence: per layer, the keys (after RoPE, at their absolute positions) and
//! values of every token fed so far, on the model's backend.
//!
//! Attention checks that k and v hold exactly [TK, NKV·D] (no views in the backend trait), so a decode
//! step builds, per layer, one buffer of the TK = L + T rows it attends to with two device-side
//! `copy_range`s, the L cached rows then the T new ones, and that buffer becomes the layer's cache
//! ([`LayerCache::extend`], called by the layer forward). The copy moves as many bytes as the attention
//! then reads, on the device; the host sees only the final logits.
//!
//! A layer's cache is a buffer plus a logical row range [start, start + len). Sliding-window layers
//! (a query sees at most W keys, itself included) trim by moving `start` (no copy): after a step they
//! keep their last W rows, since a query at the next position needs the W − 1 before it. So the next
//! step attends to L ≤ W cached rows + T new ones, and the buffer holds at most W + T rows (W + 1 when
//! decoding) whatever the generation length. Dropping older keys does not change the result: the
//! attention op places the T queries at relative key indices TK − T .. TK − 1 and measures the window
//! in relative indices over contiguous keys, while RoPE already encoded each key's absolute position
//! when it was cached.
//!
//! Failure: `extend` replaces a layer's buffers only once both new ones are built, and their first L
//! rows are the old cache; so a step that fails anywhere is undone by cutting every extended layer back
//! to its first L rows ([`LayerCache::rewind`], a range change that cannot fail).

use afinar_kernels::Backend;

use crate::config::Gemma2Config;
use crate::error::{GemmaError, Result};

/// One layer's cache: keys (after RoPE) and values, the rows [start, start + len) of two [rows, NKV·D]
/// row-major backend buffers (None while empty).
pub(crate) struct LayerCache<B: Backend> {
    k: Option<B::Buf>,
    v: Option<B::Buf>,
    /// First cached row of the buffers.
    start: usize,
    /// Cached rows (≤ W on sliding layers between steps).
    len: usize,
    /// Entries kept at most (Some(W) on sliding layers).
    keep: Option<usize>,
}

impl<B: Backend> LayerCache<B> {
    fn new(keep: Option<usize>) -> Self {
        LayerCache {
            k: None,
            v: None,
            start: 0,
            len: 0,
            keep,
        }
    }

    /// Replaces the cache by its L rows followed by the T new rows of `k` and `v` ([T, KD] each) and
    /// returns the two [TK, KD] buffers attention reads, with TK = L + T. On error the cache is unchanged.
    pub(crate) fn extend(
        &mut self,
        be: &B,
        k: &B::Buf,
        v: &B::Buf,
        t: usize,
        kd: usize,
    ) -> Result<(&B::Buf, &B::Buf, usize)> {
        let tk = self.len + t;
        let (start, len) = (self.start, self.len);
        let append = |old: Option<&B::Buf>, new: &B::Buf| -> Result<B::Buf> {
            let mut buf = be.zeros(tk * kd)?;
            if let Some(old) = old {
                be.copy_range(old, start * kd, &mut buf, 0, len * kd)?;
            }
            be.copy_range(new, 0, &mut buf, len * kd, t * kd)?;
            Ok(buf)
        };
        let kbuf = append(self.k.as_ref(), k)?;
        let vbuf = append(self.v.as_ref(), v)?;
        // The old rows are rows [0, len) of the new buffers: they replace the old ones (freed here).
        (self.k, self.v, self.start, self.len) = (Some(kbuf), Some(vbuf), 0, tk);
        match (&self.k, &self.v) {
            (Some(k), Some(v)) => Ok((k, v, tk)),
            _ => Err(GemmaError::Invalid(
                "internal: KV cache buffers missing right after extend".into(),
            )),
        }
    }

    /// Sliding layers keep their last W entries (a range change, no copy).
    fn trim(&mut self) {
        if let Some(w) = self.keep {
            if self.len > w {
                self.start += self.len - w;
                self.len = w;
            }
        }
    }

    /// Undoes an `extend` of a step that failed: a layer that now holds more than the `len` rows it held
    /// before the step is cut back to its first `len` rows (= its old contents). Cannot fail.
    fn rewind(&mut self, len: usize) {
        if self.len != len {
            (self.start, self.len) = (0, len);
        }
    }
}

/// The KV cache of one sequence, held on the model's backend.
pub struct KvCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    /// Absolute position of the next token (= tokens fed so far).
    pos: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache (position 0) for a model with this config.
    pub(crate) fn new(cfg: &Gemma2Config) -> Self {
        KvCache {
            layers: (0..cfg.num_hidden_layers)
                .map(|l| LayerCache::new(cfg.window(l)))
                .collect(),
            pos: 0,
        }
    }

    /// Tokens fed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Entries held by layer `layer` (≤ W on sliding layers).
    pub fn layer_len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |c| c.len)
    }

    /// Runs one step that feeds `t` tokens: `step` extends the layers' caches (and may fail anywhere).
    /// On success the sliding layers are trimmed to their window and the position advances by `t`; on
    /// error every layer is rewound, so the cache is exactly as before the call.
    pub(crate) fn step<T>(
        &mut self,
        t: usize,
        step: impl FnOnce(&mut [LayerCache<B>]) -> Result<T>,
    ) -> Result<T> {
        let before: Vec<usize> = self.layers.iter().map(|c| c.len).collect();
        match step(&mut self.layers) {
            Ok(out) => {
                self.layers.iter_mut().for_each(LayerCache::trim);
                self.pos += t;
                Ok(out)
            }
            Err(e) => {
                for (c, &len) in self.layers.iter_mut().zip(&before) {
                    c.rewind(len);
                }
                Err(e)
            }
        }
    }

    /// Forgets everything (position 0) and frees the buffers.
    pub(crate) fn clear(&mut self) {
        for c in &mut self.layers {
            (c.k, c.v, c.start, c.len) = (None, None, 0, 0);
        }
        self.pos = 0;
    }
}

impl<B: Backend> std::fmt::Debug for KvCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("pos", &self.pos)
            .field(
                "layer_lens",
                &self.layers.iter().map(|c| c.len).collect::<Vec<_>>(),
            )
            .finish()
    }
}
