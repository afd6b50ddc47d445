//! `impl Backend for Profiled<B>`: every op is timed by the [`Profiler`] and delegated to `B`. The
//! buffer types are `B`'s, so a profiled run computes exactly what an unprofiled one does.
//! Accessors that do no work (`name`, `len`, `ids_len`, `round_activation`) are not timed.

use super::Profiler;
use crate::backend::{Accum, AdamW, AttnShape, Backend, LoraGradRef, LoraRef, Storage, Weight};
use crate::error::Result;
use crate::nf4::Nf4Tensor;

/// A backend that times every op of `B` (see the module docs of `crate::profile`).
pub struct Profiled<B: Backend> {
    inner: B,
    prof: Profiler,
}

impl<B: Backend> Profiled<B> {
    /// Wraps `inner`, with its device timer when it has one (else wall time).
    pub fn new(inner: B) -> Result<Self> {
        let timer = inner.device_timer()?;
        let prof = Profiler::new(inner.name(), timer);
        Ok(Profiled { inner, prof })
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }
}

fn weight<B: Backend>(w: Weight<'_, Profiled<B>>) -> Weight<'_, B> {
    match w {
        Weight::Dense(b) => Weight::Dense(b),
        Weight::Nf4(q) => Weight::Nf4(q),
    }
}

fn lora_ref<B: Backend>(l: LoraRef<'_, Profiled<B>>) -> LoraRef<'_, B> {
    LoraRef {
        a: l.a,
        b: l.b,
        r: l.r,
        scale: l.scale,
        mask: l.mask,
    }
}

fn lora_grad_ref<B: Backend>(l: LoraGradRef<'_, Profiled<B>>) -> LoraGradRef<'_, B> {
    LoraGradRef {
        a: l.a,
        b: l.b,
        r: l.r,
        scale: l.scale,
        mask: l.mask,
        xa: l.xa,
        da: l.da,
        db: l.db,
    }
}

#[allow(clippy::too_many_arguments)]
impl<B: Backend> Backend for Profiled<B> {
    type Buf = B::Buf;
    type Ids = B::Ids;
    type Nf4 = B::Nf4;
    type AdamState = B::AdamState;

    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn profiler(&self) -> Option<&Profiler> {
        Some(&self.prof)
    }
    fn device_memory(&self) -> Option<crate::backend::DeviceMemory> {
        self.inner.device_memory()
    }

    fn zeros(&self, n: usize) -> Result<B::Buf> {
        self.prof.timed("zeros", || self.inner.zeros(n))
    }
    fn from_host(&self, data: &[f32]) -> Result<B::Buf> {
        self.prof.timed("from_host", || self.inner.from_host(data))
    }
    fn zeros_for(&self, n: usize, storage: Storage) -> Result<B::Buf> {
        self.prof
            .timed("zeros", || self.inner.zeros_for(n, storage))
    }
    fn from_host_for(&self, data: &[f32], storage: Storage) -> Result<B::Buf> {
        self.prof
            .timed("from_host", || self.inner.from_host_for(data, storage))
    }
    fn round_activation(&self, x: f32) -> f32 {
        self.inner.round_activation(x)
    }
    fn from_vec_for(&self, data: Vec<f32>, storage: Storage) -> Result<B::Buf> {
        self.prof
            .timed("from_host", || self.inner.from_vec_for(data, storage))
    }
    fn to_host(&self, buf: &B::Buf) -> Result<Vec<f32>> {
        self.prof.timed("to_host", || self.inner.to_host(buf))
    }
    fn len(&self, buf: &B::Buf) -> usize {
        self.inner.len(buf)
    }
    fn ids_from_host(&self, ids: &[i32]) -> Result<B::Ids> {
        self.prof
            .timed("ids_from_host", || self.inner.ids_from_host(ids))
    }
    fn ids_len(&self, ids: &B::Ids) -> usize {
        self.inner.ids_len(ids)
    }
    fn nf4_from_host(&self, w: &Nf4Tensor) -> Result<B::Nf4> {
        self.prof
            .timed("nf4_from_host", || self.inner.nf4_from_host(w))
    }
    fn nf4_to_host(&self, w: &B::Nf4) -> Result<Nf4Tensor> {
        self.prof.timed("nf4_to_host", || self.inner.nf4_to_host(w))
    }
    fn nf4_quantize(
        &self,
        raw: &[u8],
        dtype: crate::nf4::RawDtype,
        shape: &[usize],
        double_quant: bool,
    ) -> Result<B::Nf4> {
        self.prof.timed("nf4_quantize", || {
            self.inner.nf4_quantize(raw, dtype, shape, double_quant)
        })
    }
    fn from_raw_for(
        &self,
        raw: &[u8],
        dtype: crate::nf4::RawDtype,
        storage: Storage,
    ) -> Result<B::Buf> {
        self.prof
            .timed("from_raw", || self.inner.from_raw_for(raw, dtype, storage))
    }
    fn copy(&self, src: &B::Buf, dst: &mut B::Buf) -> Result<()> {
        self.prof.timed("copy", || self.inner.copy(src, dst))
    }
    fn fill(&self, buf: &mut B::Buf, value: f32) -> Result<()> {
        self.prof.timed("fill", || self.inner.fill(buf, value))
    }
    fn copy_range(
        &self,
        src: &B::Buf,
        src_off: usize,
        dst: &mut B::Buf,
        dst_off: usize,
        n: usize,
    ) -> Result<()> {
        self.prof.timed("copy_range", || {
            self.inner.copy_range(src, src_off, dst, dst_off, n)
        })
    }
    fn dropout_mask(&self, out: &mut B::Buf, p: f64, seed: u64, stream: u64) -> Result<()> {
        self.prof.timed("dropout_mask", || {
            self.inner.dropout_mask(out, p, seed, stream)
        })
    }

    fn axpy(&self, alpha: f32, x: &B::Buf, y: &mut B::Buf) -> Result<()> {
        self.prof.timed("axpy", || self.inner.axpy(alpha, x, y))
    }
    fn scale(&self, x: &mut B::Buf, alpha: f32) -> Result<()> {
        self.prof.timed("scale", || self.inner.scale(x, alpha))
    }
    fn mul(&self, x: &mut B::Buf, m: &B::Buf) -> Result<()> {
        self.prof.timed("mul", || self.inner.mul(x, m))
    }
    fn sum_squares(&self, x: &B::Buf) -> Result<f64> {
        self.prof.timed("sum_squares", || self.inner.sum_squares(x))
    }

    fn matmul_xwt(
        &self,
        x: &B::Buf,
        w: &B::Buf,
        y: &mut B::Buf,
        m: usize,
        k: usize,
        n: usize,
        acc: Accum,
    ) -> Result<()> {
        self.prof.timed("matmul_xwt", || {
            self.inner.matmul_xwt(x, w, y, m, k, n, acc)
        })
    }
    fn matmul_dyw(
        &self,
        dy: &B::Buf,
        w: &B::Buf,
        dx: &mut B::Buf,
        m: usize,
        k: usize,
        n: usize,
        acc: Accum,
    ) -> Result<()> {
        self.prof.timed("matmul_dyw", || {
            self.inner.matmul_dyw(dy, w, dx, m, k, n, acc)
        })
    }
    fn matmul_dytx(
        &self,
        dy: &B::Buf,
        x: &B::Buf,
        dw: &mut B::Buf,
        m: usize,
        k: usize,
        n: usize,
        acc: Accum,
    ) -> Result<()> {
        self.prof.timed("matmul_dytx", || {
            self.inner.matmul_dytx(dy, x, dw, m, k, n, acc)
        })
    }

    fn lora_fwd(
        &self,
        x: &B::Buf,
        w: Weight<'_, Self>,
        lora: Option<LoraRef<'_, Self>>,
        y: &mut B::Buf,
        xa: Option<&mut B::Buf>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.prof.timed("lora_fwd", || {
            self.inner
                .lora_fwd(x, weight(w), lora.map(lora_ref), y, xa, m, k, n)
        })
    }
    fn lora_bwd(
        &self,
        dy: &B::Buf,
        x: &B::Buf,
        w: Weight<'_, Self>,
        lora: Option<LoraGradRef<'_, Self>>,
        dx: &mut B::Buf,
        dx_acc: Accum,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.prof.timed("lora_bwd", || {
            self.inner.lora_bwd(
                dy,
                x,
                weight(w),
                lora.map(lora_grad_ref),
                dx,
                dx_acc,
                m,
                k,
                n,
            )
        })
    }
    fn nf4_dequantize(&self, w: &B::Nf4, out: &mut B::Buf) -> Result<()> {
        self.prof
            .timed("nf4_dequantize", || self.inner.nf4_dequantize(w, out))
    }

    fn rmsnorm_fwd(
        &self,
        x: &B::Buf,
        w: &B::Buf,
        y: &mut B::Buf,
        rstd: &mut B::Buf,
        n: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        self.prof.timed("rmsnorm_fwd", || {
            self.inner.rmsnorm_fwd(x, w, y, rstd, n, h, eps)
        })
    }
    fn rmsnorm_bwd(
        &self,
        dy: &B::Buf,
        x: &B::Buf,
        w: &B::Buf,
        rstd: &B::Buf,
        dx: &mut B::Buf,
        dw: Option<&mut B::Buf>,
        n: usize,
        h: usize,
    ) -> Result<()> {
        self.prof.timed("rmsnorm_bwd", || {
            self.inner.rmsnorm_bwd(dy, x, w, rstd, dx, dw, n, h)
        })
    }
    fn rope(
        &self,
        x: &mut B::Buf,
        pos: &B::Ids,
        n: usize,
        heads: usize,
        d: usize,
        theta: f32,
        inverse: bool,
    ) -> Result<()> {
        self.prof.timed("rope", || {
            self.inner.rope(x, pos, n, heads, d, theta, inverse)
        })
    }
    fn geglu_fwd(&self, gate: &B::Buf, up: &B::Buf, out: &mut B::Buf) -> Result<()> {
        self.prof
            .timed("geglu_fwd", || self.inner.geglu_fwd(gate, up, out))
    }
    fn geglu_bwd(
        &self,
        dout: &B::Buf,
        gate: &B::Buf,
        up: &B::Buf,
        dgate: &mut B::Buf,
        dup: &mut B::Buf,
    ) -> Result<()> {
        self.prof.timed("geglu_bwd", || {
            self.inner.geglu_bwd(dout, gate, up, dgate, dup)
        })
    }
    fn softcap_fwd(&self, x: &mut B::Buf, cap: f32) -> Result<()> {
        self.prof
            .timed("softcap_fwd", || self.inner.softcap_fwd(x, cap))
    }
    fn softcap_bwd(&self, y: &B::Buf, dy: &mut B::Buf, cap: f32) -> Result<()> {
        self.prof
            .timed("softcap_bwd", || self.inner.softcap_bwd(y, dy, cap))
    }

    fn attn_fwd(
        &self,
        q: &B::Buf,
        k: &B::Buf,
        v: &B::Buf,
        seg: Option<&B::Ids>,
        out: &mut B::Buf,
        lse: &mut B::Buf,
        s: &AttnShape,
    ) -> Result<()> {
        self.prof.timed("attn_fwd", || {
            self.inner.attn_fwd(q, k, v, seg, out, lse, s)
        })
    }
    fn attn_bwd(
        &self,
        q: &B::Buf,
        k: &B::Buf,
        v: &B::Buf,
        seg: Option<&B::Ids>,
        out: &B::Buf,
        lse: &B::Buf,
        dout: &B::Buf,
        dq: &mut B::Buf,
        dk: &mut B::Buf,
        dv: &mut B::Buf,
        s: &AttnShape,
    ) -> Result<()> {
        self.prof.timed("attn_bwd", || {
            self.inner
                .attn_bwd(q, k, v, seg, out, lse, dout, dq, dk, dv, s)
        })
    }

    fn embedding_fwd(
        &self,
        ids: &B::Ids,
        table: &B::Buf,
        out: &mut B::Buf,
        v: usize,
        h: usize,
        scale: f32,
    ) -> Result<()> {
        self.prof.timed("embedding_fwd", || {
            self.inner.embedding_fwd(ids, table, out, v, h, scale)
        })
    }
    fn embedding_bwd(
        &self,
        ids: &B::Ids,
        dout: &B::Buf,
        dtable: &mut B::Buf,
        v: usize,
        h: usize,
        scale: f32,
    ) -> Result<()> {
        self.prof.timed("embedding_bwd", || {
            self.inner.embedding_bwd(ids, dout, dtable, v, h, scale)
        })
    }
    fn cross_entropy(
        &self,
        logits: &B::Buf,
        labels: &B::Ids,
        n: usize,
        v: usize,
        softcap: Option<f32>,
        grad_scale: f32,
        dlogits: Option<&mut B::Buf>,
    ) -> Result<(f64, usize)> {
        self.prof.timed("cross_entropy", || {
            self.inner
                .cross_entropy(logits, labels, n, v, softcap, grad_scale, dlogits)
        })
    }
    fn lm_head_ce(
        &self,
        hidden: &B::Buf,
        emb: &B::Buf,
        labels: &B::Ids,
        n: usize,
        h: usize,
        v: usize,
        softcap: Option<f32>,
        grad_scale: f32,
        dhidden: Option<&mut B::Buf>,
        demb: Option<&mut B::Buf>,
    ) -> Result<(f64, usize)> {
        self.prof.timed("lm_head_ce", || {
            self.inner.lm_head_ce(
                hidden, emb, labels, n, h, v, softcap, grad_scale, dhidden, demb,
            )
        })
    }

    fn adam_state(&self, n: usize, paged: bool) -> Result<B::AdamState> {
        self.prof
            .timed("adam_state", || self.inner.adam_state(n, paged))
    }
    fn adam_state_from_host(&self, m: &[f32], v: &[f32], paged: bool) -> Result<B::AdamState> {
        self.prof.timed("adam_state_from_host", || {
            self.inner.adam_state_from_host(m, v, paged)
        })
    }
    fn adam_state_to_host(&self, s: &B::AdamState) -> Result<(Vec<f32>, Vec<f32>)> {
        self.prof
            .timed("adam_state_to_host", || self.inner.adam_state_to_host(s))
    }
    fn adamw_step(
        &self,
        p: &mut B::Buf,
        g: &B::Buf,
        s: &mut B::AdamState,
        h: &AdamW,
    ) -> Result<()> {
        self.prof
            .timed("adamw_step", || self.inner.adamw_step(p, g, s, h))
    }
    fn adamw(
        &self,
        p: &mut B::Buf,
        g: &B::Buf,
        m: &mut B::Buf,
        v: &mut B::Buf,
        h: &AdamW,
    ) -> Result<()> {
        self.prof.timed("adamw", || self.inner.adamw(p, g, m, v, h))
    }
}
