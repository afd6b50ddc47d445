//! The CPU reference backend: f32 compute, rayon parallelism, dense GEMMs through the `gemm` crate.
//!
//! Every op lives in its own file as free functions on slices (so model code and tests can call them
//! without going through the trait), each starting with its op's contract check (`crate::contract`,
//! shared with the CUDA backend); `impl Backend for Cpu` below only unwraps buffers and delegates.
//! Buffers are host vectors: `Buf = Vec<f32>`, `Ids = Vec<i32>`, `Nf4 = Nf4Tensor`.
//!
//! Files: gemm (the three linear GEMMs + a strided `gemm`), lora (dense/NF4 LoRA linear, tiled NF4),
//! nf4 (NF4 tile dequantization), rmsnorm, rope, geglu, softcap, attention, cross_entropy, lm_head
//! (chunked tied head + CE), embedding, elementwise (incl. `copy_range`), dropout (counter-based
//! dropout masks), adamw; fastmath (the vectorized exp/tanh and lane sums, CPU only). cuda/ has a file
//! of the same name for each family.
//!
//! Determinism: every reduction across threads goes through fixed-size pieces summed in order, so a
//! result does not depend on the number of rayon threads (the `gemm` crate's own blocking aside).

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod dropout;
pub mod elementwise;
pub mod embedding;
pub mod fastmath;
pub mod geglu;
pub mod gemm;
pub mod lm_head;
pub mod lora;
pub mod nf4;
pub mod rmsnorm;
pub mod rope;
pub mod softcap;

pub use lora::{LoraFactors, LoraGrads, WeightRef};

use crate::backend::{
    Accum, AdamMoments, AdamW, AttnShape, Backend, LoraGradRef, LoraRef, Storage, Weight,
};
use crate::contract;
use crate::error::Result;
use crate::nf4::Nf4Tensor;

/// The CPU backend. Stateless: the rayon global pool provides the threads (set `RAYON_NUM_THREADS`
/// or build a pool and call ops inside `pool.install`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Cpu {
    pub fn new() -> Self {
        Cpu
    }
}

fn weight<'a>(w: Weight<'a, Cpu>) -> WeightRef<'a> {
    match w {
        Weight::Dense(w) => WeightRef::Dense(w),
        Weight::Nf4(w) => WeightRef::Nf4(w),
    }
}

impl Backend for Cpu {
    type Buf = Vec<f32>;
    type Ids = Vec<i32>;
    type Nf4 = Nf4Tensor;
    /// Moments in ordinary host memory: a paged optimizer has nothing to page.
    type AdamState = AdamMoments<Vec<f32>>;

    fn name(&self) -> &'static str {
        "cpu"
    }

    /// Everything is f32 on the CPU: the storage intent is accepted and ignored.
    fn from_vec_for(&self, data: Vec<f32>, _storage: Storage) -> Result<Vec<f32>> {
        Ok(data)
    }

    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    fn from_host(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }
    fn to_host(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn ids_from_host(&self, ids: &[i32]) -> Result<Vec<i32>> {
        Ok(ids.to_vec())
    }
    fn ids_len(&self, ids: &Vec<i32>) -> usize {
        ids.len()
    }
    fn nf4_from_host(&self, w: &Nf4Tensor) -> Result<Nf4Tensor> {
        Ok(w.clone())
    }
    fn nf4_to_host(&self, w: &Nf4Tensor) -> Result<Nf4Tensor> {
        Ok(w.clone())
    }
    fn nf4_quantize(
        &self,
        raw: &[u8],
        dtype: crate::nf4::RawDtype,
        shape: &[usize],
        double_quant: bool,
    ) -> Result<Nf4Tensor> {
        // The host quantizer is the reference; its result is this backend's NF4 tensor (no copy).
        crate::nf4::quantize_raw(raw, dtype, shape, double_quant)
    }
    fn copy(&self, src: &Vec<f32>, dst: &mut Vec<f32>) -> Result<()> {
        elementwise::copy(src, dst)
    }
    fn fill(&self, buf: &mut Vec<f32>, value: f32) -> Result<()> {
        elementwise::fill(buf, value)
    }
    fn copy_range(
        &self,
        src: &Vec<f32>,
        src_off: usize,
        dst: &mut Vec<f32>,
        dst_off: usize,
        n: usize,
    ) -> Result<()> {
        elementwise::copy_range(src, src_off, dst, dst_off, n)
    }
    fn dropout_mask(&self, out: &mut Vec<f32>, p: f64, seed: u64, stream: u64) -> Result<()> {
        dropout::dropout_mask(out, p, seed, stream)
    }

    fn axpy(&self, alpha: f32, x: &Vec<f32>, y: &mut Vec<f32>) -> Result<()> {
        elementwise::axpy(alpha, x, y)
    }
    fn scale(&self, x: &mut Vec<f32>, alpha: f32) -> Result<()> {
        elementwise::scale(x, alpha)
    }
    fn mul(&self, x: &mut Vec<f32>, m: &Vec<f32>) -> Result<()> {
        elementwise::mul(x, m)
    }
    fn sum_squares(&self, x: &Vec<f32>) -> Result<f64> {
        elementwise::sum_squares(x)
    }

    fn matmul_xwt(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        y: &mut Vec<f32>,
        m: usize,
        k: usize,
        n: usize,
        acc: Accum,
    ) -> Result<()> {
        gemm::matmul_xwt(x, w, y, m, k, n, acc)
    }
    fn matmul_dyw(
        &self,
        dy: &Vec<f32>,
        w: &Vec<f32>,
        dx: &mut Vec<f32>,
        m: usize,
        k: usize,
        n: usize,
        acc: Accum,
    ) -> Result<()> {
        gemm::matmul_dyw(dy, w, dx, m, k, n, acc)
    }
    fn matmul_dytx(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        dw: &mut Vec<f32>,
        m: usize,
        k: usize,
        n: usize,
        acc: Accum,
    ) -> Result<()> {
        gemm::matmul_dytx(dy, x, dw, m, k, n, acc)
    }

    fn lora_fwd(
        &self,
        x: &Vec<f32>,
        w: Weight<'_, Self>,
        lora: Option<LoraRef<'_, Self>>,
        y: &mut Vec<f32>,
        xa: Option<&mut Vec<f32>>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let lora = lora.map(|l| LoraFactors {
            a: l.a,
            b: l.b,
            r: l.r,
            scale: l.scale,
            mask: l.mask.map(|m| m.as_slice()),
        });
        lora::lora_fwd(x, weight(w), lora, y, xa.map(|v| v.as_mut_slice()), m, k, n)
    }
    fn lora_bwd(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: Weight<'_, Self>,
        lora: Option<LoraGradRef<'_, Self>>,
        dx: &mut Vec<f32>,
        dx_acc: Accum,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let lora = lora.map(|l| {
            (
                LoraFactors {
                    a: l.a,
                    b: l.b,
                    r: l.r,
                    scale: l.scale,
                    mask: l.mask.map(|m| m.as_slice()),
                },
                LoraGrads {
                    xa: l.xa,
                    da: l.da.as_mut_slice(),
                    db: l.db.as_mut_slice(),
                },
            )
        });
        lora::lora_bwd(dy, x, weight(w), lora, dx, dx_acc, m, k, n)
    }
    fn nf4_dequantize(&self, w: &Nf4Tensor, out: &mut Vec<f32>) -> Result<()> {
        nf4::nf4_dequantize(w, out)
    }

    fn rmsnorm_fwd(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        y: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        n: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        rmsnorm::rmsnorm_fwd(x, w, y, rstd, n, h, eps)
    }
    fn rmsnorm_bwd(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rstd: &Vec<f32>,
        dx: &mut Vec<f32>,
        dw: Option<&mut Vec<f32>>,
        n: usize,
        h: usize,
    ) -> Result<()> {
        rmsnorm::rmsnorm_bwd(dy, x, w, rstd, dx, dw.map(|d| d.as_mut_slice()), n, h)
    }
    fn rope(
        &self,
        x: &mut Vec<f32>,
        pos: &Vec<i32>,
        n: usize,
        heads: usize,
        d: usize,
        theta: f32,
        inverse: bool,
    ) -> Result<()> {
        rope::rope(x, pos, n, heads, d, theta, inverse)
    }
    fn geglu_fwd(&self, gate: &Vec<f32>, up: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        geglu::geglu_fwd(gate, up, out)
    }
    fn geglu_bwd(
        &self,
        dout: &Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        dgate: &mut Vec<f32>,
        dup: &mut Vec<f32>,
    ) -> Result<()> {
        geglu::geglu_bwd(dout, gate, up, dgate, dup)
    }
    fn softcap_fwd(&self, x: &mut Vec<f32>, cap: f32) -> Result<()> {
        softcap::softcap_fwd(x, cap)
    }
    fn softcap_bwd(&self, y: &Vec<f32>, dy: &mut Vec<f32>, cap: f32) -> Result<()> {
        softcap::softcap_bwd(y, dy, cap)
    }

    fn attn_fwd(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        seg: Option<&Vec<i32>>,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        s: &AttnShape,
    ) -> Result<()> {
        attention::attn_fwd(q, k, v, seg.map(|s| s.as_slice()), out, lse, s)
    }
    fn attn_bwd(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        seg: Option<&Vec<i32>>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        dout: &Vec<f32>,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
        s: &AttnShape,
    ) -> Result<()> {
        attention::attn_bwd(
            q,
            k,
            v,
            seg.map(|s| s.as_slice()),
            out,
            lse,
            dout,
            dq,
            dk,
            dv,
            s,
        )
    }

    fn embedding_fwd(
        &self,
        ids: &Vec<i32>,
        table: &Vec<f32>,
        out: &mut Vec<f32>,
        v: usize,
        h: usize,
        scale: f32,
    ) -> Result<()> {
        embedding::embedding_fwd(ids, table, out, v, h, scale)
    }
    fn embedding_bwd(
        &self,
        ids: &Vec<i32>,
        dout: &Vec<f32>,
        dtable: &mut Vec<f32>,
        v: usize,
        h: usize,
        scale: f32,
    ) -> Result<()> {
        embedding::embedding_bwd(ids, dout, dtable, v, h, scale)
    }
    fn cross_entropy(
        &self,
        logits: &Vec<f32>,
        labels: &Vec<i32>,
        n: usize,
        v: usize,
        softcap: Option<f32>,
        grad_scale: f32,
        dlogits: Option<&mut Vec<f32>>,
    ) -> Result<(f64, usize)> {
        cross_entropy::cross_entropy(
            logits,
            labels,
            n,
            v,
            softcap,
            grad_scale,
            dlogits.map(|d| d.as_mut_slice()),
        )
    }
    fn lm_head_ce(
        &self,
        hidden: &Vec<f32>,
        emb: &Vec<f32>,
        labels: &Vec<i32>,
        n: usize,
        h: usize,
        v: usize,
        softcap: Option<f32>,
        grad_scale: f32,
        dhidden: Option<&mut Vec<f32>>,
        demb: Option<&mut Vec<f32>>,
    ) -> Result<(f64, usize)> {
        lm_head::lm_head_ce(
            hidden,
            emb,
            labels,
            n,
            h,
            v,
            softcap,
            grad_scale,
            dhidden.map(|d| d.as_mut_slice()),
            demb.map(|d| d.as_mut_slice()),
        )
    }

    fn adamw(
        &self,
        p: &mut Vec<f32>,
        g: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        h: &AdamW,
    ) -> Result<()> {
        adamw::adamw_step(p, g, m, v, h)
    }

    fn adam_state(&self, n: usize, _paged: bool) -> Result<AdamMoments<Vec<f32>>> {
        Ok(AdamMoments {
            m: vec![0.0; n],
            v: vec![0.0; n],
        })
    }

    fn adam_state_from_host(
        &self,
        m: &[f32],
        v: &[f32],
        _paged: bool,
    ) -> Result<AdamMoments<Vec<f32>>> {
        contract::adam_state_from_host(m.len(), v.len())?;
        Ok(AdamMoments {
            m: m.to_vec(),
            v: v.to_vec(),
        })
    }

    fn adam_state_to_host(&self, s: &AdamMoments<Vec<f32>>) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((s.m.clone(), s.v.clone()))
    }

    fn adamw_step(
        &self,
        p: &mut Vec<f32>,
        g: &Vec<f32>,
        s: &mut AdamMoments<Vec<f32>>,
        h: &AdamW,
    ) -> Result<()> {
        adamw::adamw_step(p, g, &mut s.m, &mut s.v, h)
    }
}
