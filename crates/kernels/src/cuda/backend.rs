//! `impl Backend for Cuda`: each op delegates to its family's file (the same file names as cpu/), as
//! `impl Backend for Cpu` does in cpu/mod.rs. Each op's contract is in backend.rs; each kernel's
//! layout and geometry in its .cu file.

use super::{
    adamw, attention, cross_entropy, dropout, elementwise, embedding, geglu, gemm, lm_head, lora,
    memory, nf4, profile, rmsnorm, rope, softcap,
};
use super::{Cuda, CudaAdamState, CudaBuf, CudaIds, CudaNf4};
use crate::backend::{Accum, AdamW, AttnShape, Backend, LoraGradRef, LoraRef, Storage, Weight};
use crate::error::Result;
use crate::nf4::Nf4Tensor;

impl Backend for Cuda {
    type Buf = CudaBuf;
    type Ids = CudaIds;
    type Nf4 = CudaNf4;
    type AdamState = CudaAdamState;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn device_memory(&self) -> Option<crate::backend::DeviceMemory> {
        self.device_memory_now()
    }

    fn device_timer(&self) -> Result<Option<Box<dyn crate::profile::DeviceTimer>>> {
        Ok(Some(Box::new(profile::EventTimer::new(self))))
    }

    fn zeros(&self, n: usize) -> Result<CudaBuf> {
        self.zeros_as(n, self.alloc_dtype())
    }

    fn from_host(&self, data: &[f32]) -> Result<CudaBuf> {
        self.from_host_as(data, self.alloc_dtype())
    }

    fn round_activation(&self, x: f32) -> f32 {
        // Round to nearest even, as the kernels' f2bf / f2h and torch do.
        self.alloc_dtype().round(x)
    }

    fn zeros_for(&self, n: usize, storage: Storage) -> Result<CudaBuf> {
        self.zeros_as(n, self.dtype_for(storage))
    }

    fn from_host_for(&self, data: &[f32], storage: Storage) -> Result<CudaBuf> {
        self.from_host_as(data, self.dtype_for(storage))
    }

    fn to_host(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        memory::to_host(self, buf)
    }

    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }

    fn ids_from_host(&self, ids: &[i32]) -> Result<CudaIds> {
        memory::ids_from_host(self, ids)
    }

    fn ids_len(&self, ids: &CudaIds) -> usize {
        ids.len
    }

    fn nf4_from_host(&self, w: &Nf4Tensor) -> Result<CudaNf4> {
        nf4::nf4_from_host(self, w)
    }

    fn nf4_to_host(&self, w: &CudaNf4) -> Result<Nf4Tensor> {
        nf4::nf4_to_host(self, w)
    }

    fn nf4_quantize(
        &self,
        raw: &[u8],
        dtype: crate::nf4::RawDtype,
        shape: &[usize],
        double_quant: bool,
    ) -> Result<CudaNf4> {
        nf4::nf4_quantize(self, raw, dtype, shape, double_quant)
    }

    fn from_raw_for(
        &self,
        raw: &[u8],
        dtype: crate::nf4::RawDtype,
        storage: Storage,
    ) -> Result<CudaBuf> {
        nf4::from_raw_for(self, raw, dtype, storage)
    }

    fn copy(&self, src: &CudaBuf, dst: &mut CudaBuf) -> Result<()> {
        elementwise::copy(self, src, dst)
    }

    fn fill(&self, buf: &mut CudaBuf, value: f32) -> Result<()> {
        elementwise::fill(self, buf, value)
    }

    fn copy_range(
        &self,
        src: &CudaBuf,
        src_off: usize,
        dst: &mut CudaBuf,
        dst_off: usize,
        n: usize,
    ) -> Result<()> {
        elementwise::copy_range(self, src, src_off, dst, dst_off, n)
    }

    fn dropout_mask(&self, out: &mut CudaBuf, p: f64, seed: u64, stream: u64) -> Result<()> {
        dropout::dropout_mask(self, out, p, seed, stream)
    }

    fn axpy(&self, alpha: f32, x: &CudaBuf, y: &mut CudaBuf) -> Result<()> {
        elementwise::axpy(self, alpha, x, y)
    }

    fn scale(&self, x: &mut CudaBuf, alpha: f32) -> Result<()> {
        elementwise::scale(self, x, alpha)
    }

    fn mul(&self, x: &mut CudaBuf, m: &CudaBuf) -> Result<()> {
        elementwise::mul(self, x, m)
    }

    fn sum_squares(&self, x: &CudaBuf) -> Result<f64> {
        elementwise::sum_squares(self, x)
    }

    fn matmul_xwt(
        &self,
        x: &CudaBuf,
        w: &CudaBuf,
        y: &mut CudaBuf,
        m: usize,
        k: usize,
        n: usize,
        acc: Accum,
    ) -> Result<()> {
        gemm::matmul_xwt(self, x, w, y, m, k, n, acc)
    }

    fn matmul_dyw(
        &self,
        dy: &CudaBuf,
        w: &CudaBuf,
        dx: &mut CudaBuf,
        m: usize,
        k: usize,
        n: usize,
        acc: Accum,
    ) -> Result<()> {
        gemm::matmul_dyw(self, dy, w, dx, m, k, n, acc)
    }

    fn matmul_dytx(
        &self,
        dy: &CudaBuf,
        x: &CudaBuf,
        dw: &mut CudaBuf,
        m: usize,
        k: usize,
        n: usize,
        acc: Accum,
    ) -> Result<()> {
        gemm::matmul_dytx(self, dy, x, dw, m, k, n, acc)
    }

    fn lora_fwd(
        &self,
        x: &CudaBuf,
        w: Weight<'_, Self>,
        lora: Option<LoraRef<'_, Self>>,
        y: &mut CudaBuf,
        xa: Option<&mut CudaBuf>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        lora::lora_fwd(self, x, w, lora, y, xa, m, k, n)
    }

    fn lora_bwd(
        &self,
        dy: &CudaBuf,
        x: &CudaBuf,
        w: Weight<'_, Self>,
        lora: Option<LoraGradRef<'_, Self>>,
        dx: &mut CudaBuf,
        dx_acc: Accum,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        lora::lora_bwd(self, dy, x, w, lora, dx, dx_acc, m, k, n)
    }

    fn nf4_dequantize(&self, w: &CudaNf4, out: &mut CudaBuf) -> Result<()> {
        nf4::nf4_dequantize(self, w, out)
    }

    fn rmsnorm_fwd(
        &self,
        x: &CudaBuf,
        w: &CudaBuf,
        y: &mut CudaBuf,
        rstd: &mut CudaBuf,
        n: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        rmsnorm::rmsnorm_fwd(self, x, w, y, rstd, n, h, eps)
    }

    fn rmsnorm_bwd(
        &self,
        dy: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        rstd: &CudaBuf,
        dx: &mut CudaBuf,
        dw: Option<&mut CudaBuf>,
        n: usize,
        h: usize,
    ) -> Result<()> {
        rmsnorm::rmsnorm_bwd(self, dy, x, w, rstd, dx, dw, n, h)
    }

    fn rope(
        &self,
        x: &mut CudaBuf,
        pos: &CudaIds,
        n: usize,
        heads: usize,
        d: usize,
        theta: f32,
        inverse: bool,
    ) -> Result<()> {
        rope::rope(self, x, pos, n, heads, d, theta, inverse)
    }

    fn geglu_fwd(&self, gate: &CudaBuf, up: &CudaBuf, out: &mut CudaBuf) -> Result<()> {
        geglu::geglu_fwd(self, gate, up, out)
    }

    fn geglu_bwd(
        &self,
        dout: &CudaBuf,
        gate: &CudaBuf,
        up: &CudaBuf,
        dgate: &mut CudaBuf,
        dup: &mut CudaBuf,
    ) -> Result<()> {
        geglu::geglu_bwd(self, dout, gate, up, dgate, dup)
    }

    fn softcap_fwd(&self, x: &mut CudaBuf, cap: f32) -> Result<()> {
        softcap::softcap_fwd(self, x, cap)
    }

    fn softcap_bwd(&self, y: &CudaBuf, dy: &mut CudaBuf, cap: f32) -> Result<()> {
        softcap::softcap_bwd(self, y, dy, cap)
    }

    fn attn_fwd(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        seg: Option<&CudaIds>,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        s: &AttnShape,
    ) -> Result<()> {
        attention::attn_fwd(self, q, k, v, seg, out, lse, s)
    }

    fn attn_bwd(
        &self,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        seg: Option<&CudaIds>,
        out: &CudaBuf,
        lse: &CudaBuf,
        dout: &CudaBuf,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        s: &AttnShape,
    ) -> Result<()> {
        attention::attn_bwd(self, q, k, v, seg, out, lse, dout, dq, dk, dv, s)
    }

    fn embedding_fwd(
        &self,
        ids: &CudaIds,
        table: &CudaBuf,
        out: &mut CudaBuf,
        v: usize,
        h: usize,
        scale: f32,
    ) -> Result<()> {
        embedding::embedding_fwd(self, ids, table, out, v, h, scale)
    }

    fn embedding_bwd(
        &self,
        ids: &CudaIds,
        dout: &CudaBuf,
        dtable: &mut CudaBuf,
        v: usize,
        h: usize,
        scale: f32,
    ) -> Result<()> {
        embedding::embedding_bwd(self, ids, dout, dtable, v, h, scale)
    }

    fn cross_entropy(
        &self,
        logits: &CudaBuf,
        labels: &CudaIds,
        n: usize,
        v: usize,
        softcap: Option<f32>,
        grad_scale: f32,
        dlogits: Option<&mut CudaBuf>,
    ) -> Result<(f64, usize)> {
        cross_entropy::cross_entropy(self, logits, labels, n, v, softcap, grad_scale, dlogits)
    }

    fn lm_head_ce(
        &self,
        hidden: &CudaBuf,
        emb: &CudaBuf,
        labels: &CudaIds,
        n: usize,
        h: usize,
        v: usize,
        softcap: Option<f32>,
        grad_scale: f32,
        dhidden: Option<&mut CudaBuf>,
        demb: Option<&mut CudaBuf>,
    ) -> Result<(f64, usize)> {
        lm_head::lm_head_ce(
            self, hidden, emb, labels, n, h, v, softcap, grad_scale, dhidden, demb,
        )
    }

    fn adamw(
        &self,
        p: &mut CudaBuf,
        g: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        h: &AdamW,
    ) -> Result<()> {
        adamw::adamw(self, p, g, m, v, h)
    }

    fn adam_state(&self, n: usize, paged: bool) -> Result<CudaAdamState> {
        adamw::adam_state(self, n, paged)
    }

    fn adam_state_from_host(&self, m: &[f32], v: &[f32], paged: bool) -> Result<CudaAdamState> {
        adamw::adam_state_from_host(self, m, v, paged)
    }

    fn adam_state_to_host(&self, s: &CudaAdamState) -> Result<(Vec<f32>, Vec<f32>)> {
        adamw::adam_state_to_host(self, s)
    }

    fn adamw_step(
        &self,
        p: &mut CudaBuf,
        g: &CudaBuf,
        s: &mut CudaAdamState,
        h: &AdamW,
    ) -> Result<()> {
        adamw::adamw_step(self, p, g, s, h)
    }
}
