//! `impl Backend for Cuda`: argument checks (the same `KernelError`s as the CPU backend), then
//! launches. Each op's contract is in backend.rs; each kernel's layout and geometry in its .cu file.

use super::gemm::{op, Nf4Dir};
use super::{be, Arg, Cuda, CudaAdamState, CudaBuf, CudaIds, CudaNf4, Data, Dtype, Nf4Scales};
use crate::backend::{
    Accum, AdamMoments, AdamW, AttnShape, Backend, LoraGradRef, LoraRef, Storage, Weight,
};
use crate::cpu::adamw::AdamScalars;
use crate::cpu::dropout::{check_p, keep_value, mask_key, threshold};
use crate::cpu::elementwise::check_range;
use crate::error::{check_len, ensure, KernelError, Result};
use crate::launch::{self, to_i32};
use crate::nf4::{Absmax, Nf4Tensor, BLOCK, NESTED_BLOCK};
use cudarc::driver::CudaSlice;

/// Bytes of f32 logits the fused LM head + cross-entropy keeps per row chunk.
const LM_HEAD_CHUNK_BYTES: usize = 256 << 20;

fn n64(n: usize) -> Arg<'static> {
    Arg::I64(n as i64)
}

impl Cuda {
    /// Index of the first id outside [0, v) (labels: −100 allowed), or None.
    fn first_bad_id(
        &self,
        ids: &CudaIds,
        off: usize,
        n: usize,
        v: usize,
        labels: bool,
    ) -> Result<Option<usize>> {
        if n == 0 {
            return Ok(None);
        }
        let bad: CudaSlice<i32> = self.stream.clone_htod(&[i32::MAX]).map_err(be("alloc"))?;
        let f = if labels {
            "labels_check_k"
        } else {
            "ids_check_k"
        };
        let vi = to_i32("ids", "v", v)?;
        self.launch(
            "embedding.cu",
            f,
            launch::elementwise(n),
            &[
                Arg::I32sAt(&ids.data, off),
                n64(n),
                Arg::I32(vi),
                Arg::I32s(&bad),
            ],
        )?;
        let host = self
            .stream
            .clone_dtoh(&bad)
            .map_err(be("device to host copy"))?;
        Ok((host[0] != i32::MAX).then_some(host[0] as usize))
    }

    /// Σ of a device reduction (mode 0: Σx², mode 1: Σx) in f64.
    fn reduce(&self, x: &CudaBuf, off: usize, n: usize, mode: i32) -> Result<f64> {
        if n == 0 {
            return Ok(0.0);
        }
        let l = launch::reduce(n);
        let parts = self
            .stream
            .alloc_zeros::<f64>(l.grid.0 as usize)
            .map_err(be("alloc"))?;
        let out = self.stream.alloc_zeros::<f64>(1).map_err(be("alloc"))?;
        self.launch(
            "reduce.cu",
            "reduce_partial_k",
            l,
            &[
                Arg::BufAt(x, off),
                n64(n),
                Arg::I32(mode),
                Arg::F64s(&parts),
            ],
        )?;
        let l2 = launch::Launch {
            grid: (1, 1, 1),
            block: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "reduce.cu",
            "reduce_final_k",
            l2,
            &[
                Arg::F64s(&parts),
                Arg::I32(l.grid.0 as i32),
                Arg::F64s(&out),
            ],
        )?;
        Ok(self
            .stream
            .clone_dtoh(&out)
            .map_err(be("device to host copy"))?[0])
    }

    /// The NF4 arguments every NF4 kernel takes: packed, codes, absmax, code8, offset, nested.
    fn nf4_args<'a>(w: &'a CudaNf4) -> [Arg<'a>; 6] {
        match &w.scales {
            Nf4Scales::Plain(a) => [
                Arg::U8s(&w.packed),
                Arg::Null,
                Arg::F32s(a),
                Arg::Null,
                Arg::F32(0.0),
                Arg::I32(0),
            ],
            Nf4Scales::Nested {
                codes,
                nested,
                offset,
                code8,
                ..
            } => [
                Arg::U8s(&w.packed),
                Arg::U8s(codes),
                Arg::F32s(nested),
                Arg::F32s(code8),
                Arg::F32(*offset),
                Arg::I32(1),
            ],
        }
    }

    /// The CPU backend's `check_nf4`: shape [N, K] (arg `w`), then the layout lengths.
    fn check_nf4_shape(&self, op: &'static str, w: &CudaNf4, n: usize, k: usize) -> Result<()> {
        ensure(
            op,
            "w",
            w.numel.is_some() && w.numel == n.checked_mul(k),
            || {
                format!(
                    "NF4 weight of shape {:?} does not hold [N={n}, K={k}]",
                    w.shape
                )
            },
        )?;
        ensure(op, "w", w.shape.len() != 2 || w.shape == [n, k], || {
            format!("NF4 weight of shape {:?} is not [N={n}, K={k}]", w.shape)
        })?;
        Self::check_nf4_layout(op, w, n * k)
    }

    fn check_nf4_layout(op: &'static str, w: &CudaNf4, numel: usize) -> Result<()> {
        let nb = numel.div_ceil(BLOCK);
        check_len(op, "w.packed", w.packed_len, numel.div_ceil(2), || {
            format!("{:?}", w.shape)
        })?;
        match &w.scales {
            Nf4Scales::Plain(_) => check_len(op, "w.absmax", w.absmax_len, nb, || {
                format!("[blocks={nb}]")
            }),
            Nf4Scales::Nested { .. } => {
                check_len(op, "w.absmax_code", w.absmax_len, nb, || {
                    format!("[blocks={nb}]")
                })?;
                check_len(
                    op,
                    "w.nested_absmax",
                    w.nested_len,
                    nb.div_ceil(NESTED_BLOCK),
                    || format!("[nested blocks={}]", nb.div_ceil(NESTED_BLOCK)),
                )
            }
        }
    }

    /// Y (= or +=) X·W̃ᵀ + s·XA·Bᵀ with an NF4 base (GEMV for M ≤ 8, mma GEMM otherwise). `lora` =
    /// (xa [M,R], B [N,R], R, s).
    #[allow(clippy::too_many_arguments)]
    fn nf4_forward(
        &self,
        x: &CudaBuf,
        w: &CudaNf4,
        y: &CudaBuf,
        acc: bool,
        lora: Option<(&CudaBuf, &CudaBuf, usize, f32)>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        if !self.mma_for(&[x]) && matches!(launch::nf4_path(m), launch::Nf4Path::Gemm) {
            // sm_75 or f16 activations: no bf16 tensor cores (see gemm.rs).
            return self.nf4_dense(Nf4Dir::Forward, x, w, y, acc, lora, m, k, n);
        }
        let (mi, ni, ki) = (
            to_i32("lora_fwd", "m", m)?,
            to_i32("lora_fwd", "n", n)?,
            to_i32("lora_fwd", "k", k)?,
        );
        let (xa, lb, r, s) = match lora {
            Some((xa, b, r, s)) => (Arg::Buf(xa), Arg::Buf(b), to_i32("lora_fwd", "r", r)?, s),
            None => (Arg::NullBuf, Arg::NullBuf, 0, 0.0),
        };
        let [p, c, a, c8, o, nest] = Self::nf4_args(w);
        let args = [
            Arg::Buf(x),
            p,
            c,
            a,
            c8,
            o,
            nest,
            Arg::Buf(y),
            Arg::I32(acc as i32),
            Arg::I32(mi),
            Arg::I32(ni),
            Arg::I32(ki),
            xa,
            lb,
            Arg::I32(r),
            Arg::F32(s),
        ];
        match launch::nf4_path(m) {
            launch::Nf4Path::Gemv => {
                self.launch("nf4_gemv.cu", "nf4_gemv_k", launch::nf4_gemv(m, n)?, &args)
            }
            launch::Nf4Path::Gemm => self.launch(
                "nf4_gemm.cu",
                "nf4_gemm_xwt_k",
                launch::nf4_gemm(m, n)?,
                &args,
            ),
        }
    }

    /// dX (= or +=) dY·W̃ + s·dYB·A with an NF4 base. `lora` = (dyb [M,R], A [R,K], R, s).
    #[allow(clippy::too_many_arguments)]
    fn nf4_backward(
        &self,
        dy: &CudaBuf,
        w: &CudaNf4,
        dx: &CudaBuf,
        acc: bool,
        lora: Option<(&CudaBuf, &CudaBuf, usize, f32)>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        if !self.mma_for(&[dy]) {
            // sm_75 or f16 activations: no bf16 tensor cores (see gemm.rs).
            return self.nf4_dense(Nf4Dir::Backward, dy, w, dx, acc, lora, m, k, n);
        }
        let (mi, ni, ki) = (
            to_i32("lora_bwd", "m", m)?,
            to_i32("lora_bwd", "n", n)?,
            to_i32("lora_bwd", "k", k)?,
        );
        let (dyb, la, r, s) = match lora {
            Some((dyb, a, r, s)) => (Arg::Buf(dyb), Arg::Buf(a), to_i32("lora_bwd", "r", r)?, s),
            None => (Arg::NullBuf, Arg::NullBuf, 0, 0.0),
        };
        let [p, c, a, c8, o, nest] = Self::nf4_args(w);
        let args = [
            Arg::Buf(dy),
            p,
            c,
            a,
            c8,
            o,
            nest,
            Arg::Buf(dx),
            Arg::I32(acc as i32),
            Arg::I32(mi),
            Arg::I32(ni),
            Arg::I32(ki),
            dyb,
            la,
            Arg::I32(r),
            Arg::F32(s),
        ];
        self.launch(
            "nf4_gemm.cu",
            "nf4_gemm_dyw_k",
            launch::nf4_gemm(m, k)?,
            &args,
        )
    }

    /// out[M,R] = (X ⊙ mask)·Wᵀ where W's element (j, k) is at w[j·sj + k·sk].
    #[allow(clippy::too_many_arguments)]
    fn lora_proj(
        &self,
        x: &CudaBuf,
        mask: Option<&CudaBuf>,
        w: &CudaBuf,
        sj: usize,
        sk: usize,
        out: &CudaBuf,
        m: usize,
        kdim: usize,
        r: usize,
    ) -> Result<()> {
        if m == 0 || r == 0 {
            return Ok(());
        }
        let (mask_arg, has) = match mask {
            Some(mk) => (Arg::Buf(mk), 1),
            None => (Arg::NullBuf, 0),
        };
        self.launch(
            "lora.cu",
            "lora_proj_k",
            launch::lora_proj(m, r)?,
            &[
                Arg::Buf(x),
                mask_arg,
                Arg::I32(has),
                Arg::Buf(w),
                n64(sj),
                n64(sk),
                Arg::Buf(out),
                Arg::I32(to_i32("lora", "k", kdim)?),
                Arg::I32(to_i32("lora", "r", r)?),
            ],
        )
    }

    fn dense_or_nf4_dims(
        &self,
        op: &'static str,
        w: &Weight<'_, Self>,
        n: usize,
        k: usize,
    ) -> Result<()> {
        match w {
            Weight::Dense(wb) => check_len(op, "w", wb.len, n * k, || format!("[N={n}, K={k}]")),
            Weight::Nf4(q) => self.check_nf4_shape(op, q, n, k),
        }
    }
}

impl Backend for Cuda {
    type Buf = CudaBuf;
    type Ids = CudaIds;
    type Nf4 = CudaNf4;
    type AdamState = CudaAdamState;

    fn name(&self) -> &'static str {
        "cuda"
    }

    // ---- memory ---------------------------------------------------------------------------------
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
        let mut v: Vec<f32> = match &buf.data {
            Data::F32(s) => self
                .stream
                .clone_dtoh(s)
                .map_err(be("device to host copy"))?,
            Data::Bf16(s) => self
                .stream
                .clone_dtoh(s)
                .map_err(be("device to host copy"))?
                .into_iter()
                .map(|h| h.to_f32())
                .collect(),
            Data::F16(s) => self
                .stream
                .clone_dtoh(s)
                .map_err(be("device to host copy"))?
                .into_iter()
                .map(|h| h.to_f32())
                .collect(),
        };
        v.truncate(buf.len);
        Ok(v)
    }

    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }

    fn ids_from_host(&self, ids: &[i32]) -> Result<CudaIds> {
        let data = if ids.is_empty() {
            self.stream.alloc_zeros::<i32>(1).map_err(be("alloc"))?
        } else {
            self.stream
                .clone_htod(ids)
                .map_err(be("host to device copy"))?
        };
        Ok(CudaIds {
            data,
            len: ids.len(),
        })
    }

    fn ids_len(&self, ids: &CudaIds) -> usize {
        ids.len
    }

    fn nf4_from_host(&self, w: &Nf4Tensor) -> Result<CudaNf4> {
        // Uploaded as given (validated at use, as on the CPU); every array gets spare zero elements so
        // no allocation is empty.
        let numel = w.shape.iter().try_fold(1usize, |a, &x| a.checked_mul(x));
        let mut packed_h = w.packed.clone();
        packed_h.resize(w.packed.len() + 8, 0);
        let packed = self
            .stream
            .clone_htod(&packed_h)
            .map_err(be("host to device copy"))?;
        let (scales, absmax_len, nested_len) = match &w.absmax {
            Absmax::Plain(a) => {
                let mut a = a.clone();
                let len = a.len();
                a.push(0.0);
                (
                    Nf4Scales::Plain(
                        self.stream
                            .clone_htod(&a)
                            .map_err(be("host to device copy"))?,
                    ),
                    len,
                    0,
                )
            }
            Absmax::Nested {
                codes,
                nested_absmax,
                offset,
                code8,
            } => {
                let mut c = codes.clone();
                c.push(0);
                let mut na = nested_absmax.clone();
                na.push(0.0);
                (
                    Nf4Scales::Nested {
                        codes: self
                            .stream
                            .clone_htod(&c)
                            .map_err(be("host to device copy"))?,
                        nested: self
                            .stream
                            .clone_htod(&na)
                            .map_err(be("host to device copy"))?,
                        offset: *offset,
                        code8: self
                            .stream
                            .clone_htod(&code8[..])
                            .map_err(be("host to device copy"))?,
                        code8_host: code8.clone(),
                    },
                    codes.len(),
                    nested_absmax.len(),
                )
            }
        };
        Ok(CudaNf4 {
            shape: w.shape.clone(),
            numel,
            packed_len: w.packed.len(),
            absmax_len,
            nested_len,
            packed,
            scales,
        })
    }

    fn nf4_to_host(&self, w: &CudaNf4) -> Result<Nf4Tensor> {
        let mut packed = self
            .stream
            .clone_dtoh(&w.packed)
            .map_err(be("device to host copy"))?;
        packed.truncate(w.packed_len);
        let absmax = match &w.scales {
            Nf4Scales::Plain(a) => {
                let mut a = self
                    .stream
                    .clone_dtoh(a)
                    .map_err(be("device to host copy"))?;
                a.truncate(w.absmax_len);
                Absmax::Plain(a)
            }
            Nf4Scales::Nested {
                codes,
                nested,
                offset,
                code8_host,
                ..
            } => {
                let mut c = self
                    .stream
                    .clone_dtoh(codes)
                    .map_err(be("device to host copy"))?;
                c.truncate(w.absmax_len);
                let mut n = self
                    .stream
                    .clone_dtoh(nested)
                    .map_err(be("device to host copy"))?;
                n.truncate(w.nested_len);
                Absmax::Nested {
                    codes: c,
                    nested_absmax: n,
                    offset: *offset,
                    code8: code8_host.clone(),
                }
            }
        };
        Ok(Nf4Tensor {
            shape: w.shape.clone(),
            packed,
            absmax,
        })
    }

    fn copy(&self, src: &CudaBuf, dst: &mut CudaBuf) -> Result<()> {
        check_len("copy", "dst", dst.len, src.len, || format!("[{}]", src.len))?;
        self.launch(
            "elementwise.cu",
            "copy_k",
            launch::elementwise(src.len),
            &[Arg::Buf(src), Arg::Buf(dst), n64(src.len)],
        )
    }

    fn fill(&self, buf: &mut CudaBuf, value: f32) -> Result<()> {
        self.launch(
            "elementwise.cu",
            "fill_k",
            launch::elementwise(buf.len),
            &[Arg::Buf(buf), n64(buf.len), Arg::F32(value)],
        )
    }

    fn copy_range(
        &self,
        src: &CudaBuf,
        src_off: usize,
        dst: &mut CudaBuf,
        dst_off: usize,
        n: usize,
    ) -> Result<()> {
        check_range("copy_range", "src_off", src_off, n, src.len)?;
        check_range("copy_range", "dst_off", dst_off, n, dst.len)?;
        if n == 0 {
            return Ok(());
        }
        // copy_k on views that start at the offsets (device to device, converting dtypes as `copy`
        // does); both ranges were checked to lie inside the buffers' logical lengths, which never
        // exceed their allocations.
        let dst: &CudaBuf = dst;
        self.launch(
            "elementwise.cu",
            "copy_k",
            launch::elementwise(n),
            &[Arg::BufAt(src, src_off), Arg::BufAt(dst, dst_off), n64(n)],
        )
    }

    fn dropout_mask(&self, out: &mut CudaBuf, p: f64, seed: u64, stream: u64) -> Result<()> {
        check_p("dropout_mask", p)?;
        if out.len == 0 {
            return Ok(());
        }
        // key, threshold and keep value computed on the host by the CPU reference's functions; the
        // kernel only hashes indices (identical integer arithmetic), so the bits match the CPU's.
        let (key, thr, keep) = (mask_key(seed, stream), threshold(p), keep_value(p));
        let out: &CudaBuf = out;
        self.launch(
            "elementwise.cu",
            "dropout_mask_k",
            launch::elementwise(out.len),
            &[
                Arg::Buf(out),
                n64(out.len),
                Arg::I64(key as i64),
                Arg::I64(thr as i64),
                Arg::F32(keep),
            ],
        )
    }

    // ---- elementwise --------------------------------------------------------------------------
    fn axpy(&self, alpha: f32, x: &CudaBuf, y: &mut CudaBuf) -> Result<()> {
        check_len("axpy", "y", y.len, x.len, || format!("[{}]", x.len))?;
        self.launch(
            "elementwise.cu",
            "axpy_k",
            launch::elementwise(x.len),
            &[Arg::F32(alpha), Arg::Buf(x), Arg::Buf(y), n64(x.len)],
        )
    }

    fn scale(&self, x: &mut CudaBuf, alpha: f32) -> Result<()> {
        self.launch(
            "elementwise.cu",
            "scale_k",
            launch::elementwise(x.len),
            &[Arg::Buf(x), n64(x.len), Arg::F32(alpha)],
        )
    }

    fn mul(&self, x: &mut CudaBuf, m: &CudaBuf) -> Result<()> {
        check_len("mul", "m", m.len, x.len, || format!("[{}]", x.len))?;
        let x: &CudaBuf = x;
        self.launch(
            "elementwise.cu",
            "mul_k",
            launch::elementwise(x.len),
            &[Arg::Buf(x), Arg::Buf(m), Arg::Buf(x), n64(x.len)],
        )
    }

    fn sum_squares(&self, x: &CudaBuf) -> Result<f64> {
        self.reduce(x, 0, x.len, 0)
    }

    // ---- linear GEMMs ---------------------------------------------------------------------------
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
        check_len("matmul_xwt", "x", x.len, m * k, || {
            format!("[M={m}, K={k}]")
        })?;
        check_len("matmul_xwt", "w", w.len, n * k, || {
            format!("[N={n}, K={k}]")
        })?;
        check_len("matmul_xwt", "y", y.len, m * n, || {
            format!("[M={m}, N={n}]")
        })?;
        self.gemm(
            op(x, 0, false),
            op(w, 0, true),
            y,
            0,
            m,
            n,
            k,
            1.0,
            beta(acc),
        )
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
        check_len("matmul_dyw", "dy", dy.len, m * n, || {
            format!("[M={m}, N={n}]")
        })?;
        check_len("matmul_dyw", "w", w.len, n * k, || {
            format!("[N={n}, K={k}]")
        })?;
        check_len("matmul_dyw", "dx", dx.len, m * k, || {
            format!("[M={m}, K={k}]")
        })?;
        self.gemm(
            op(dy, 0, false),
            op(w, 0, false),
            dx,
            0,
            m,
            k,
            n,
            1.0,
            beta(acc),
        )
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
        check_len("matmul_dytx", "dy", dy.len, m * n, || {
            format!("[M={m}, N={n}]")
        })?;
        check_len("matmul_dytx", "x", x.len, m * k, || {
            format!("[M={m}, K={k}]")
        })?;
        check_len("matmul_dytx", "dw", dw.len, n * k, || {
            format!("[N={n}, K={k}]")
        })?;
        self.gemm(
            op(dy, 0, true),
            op(x, 0, false),
            dw,
            0,
            n,
            k,
            m,
            1.0,
            beta(acc),
        )
    }

    // ---- LoRA linear ----------------------------------------------------------------------------
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
        check_len("lora_fwd", "x", x.len, m * k, || format!("[M={m}, K={k}]"))?;
        check_len("lora_fwd", "y", y.len, m * n, || format!("[M={m}, N={n}]"))?;
        self.dense_or_nf4_dims("lora_fwd", &w, n, k)?;
        let y: &CudaBuf = y;
        // xa = drop(X)·Aᵀ first (the fused NF4 kernels consume it).
        let mut xa_tmp = None;
        let lora_parts = match &lora {
            Some(l) => {
                ensure("lora_fwd", "r", l.r > 0, || {
                    "LoRA rank R must be > 0".into()
                })?;
                ensure("lora_fwd", "scale", l.scale.is_finite(), || {
                    format!("LoRA scale must be finite, got {}", l.scale)
                })?;
                check_len("lora_fwd", "a", l.a.len, l.r * k, || {
                    format!("[R={}, K={k}]", l.r)
                })?;
                check_len("lora_fwd", "b", l.b.len, n * l.r, || {
                    format!("[N={n}, R={}]", l.r)
                })?;
                if let Some(mk) = l.mask {
                    check_len("lora_fwd", "mask", mk.len, m * k, || {
                        format!("[M={m}, K={k}]")
                    })?;
                }
                let xa_buf: &CudaBuf = match xa {
                    Some(b) => {
                        check_len("lora_fwd", "xa", b.len, m * l.r, || {
                            format!("[M={m}, R={}]", l.r)
                        })?;
                        b
                    }
                    None => xa_tmp.insert(self.zeros_as(m * l.r, Dtype::F32)?),
                };
                self.lora_proj(x, l.mask, l.a, k, 1, xa_buf, m, k, l.r)?;
                Some((xa_buf, l.b, l.r, l.scale))
            }
            None => None,
        };
        match w {
            Weight::Dense(wb) => {
                self.gemm(op(x, 0, false), op(wb, 0, true), y, 0, m, n, k, 1.0, 0.0)?;
                if let Some((xa, b, r, s)) = lora_parts {
                    // Dense base: a second pass over Y (cuBLAS owns the base GEMM's epilogue).
                    self.launch(
                        "lora.cu",
                        "lora_add_k",
                        launch::elementwise(m * n),
                        &[
                            Arg::Buf(y),
                            Arg::Buf(xa),
                            Arg::Buf(b),
                            n64(m),
                            Arg::I32(to_i32("lora_fwd", "n", n)?),
                            Arg::I32(to_i32("lora_fwd", "r", r)?),
                            Arg::F32(s),
                        ],
                    )?;
                }
                Ok(())
            }
            Weight::Nf4(q) => {
                if m == 0 || n == 0 {
                    return Ok(());
                }
                self.nf4_forward(x, q, y, false, lora_parts, m, k, n)
            }
        }
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
        check_len("lora_bwd", "dy", dy.len, m * n, || {
            format!("[M={m}, N={n}]")
        })?;
        check_len("lora_bwd", "x", x.len, m * k, || format!("[M={m}, K={k}]"))?;
        check_len("lora_bwd", "dx", dx.len, m * k, || {
            format!("[M={m}, K={k}]")
        })?;
        self.dense_or_nf4_dims("lora_bwd", &w, n, k)?;
        let dx: &CudaBuf = dx;
        let acc = dx_acc == Accum::Add;
        let mut dyb_tmp = None;
        let lora_parts = match lora {
            Some(l) => {
                ensure("lora_bwd", "r", l.r > 0, || {
                    "LoRA rank R must be > 0".into()
                })?;
                ensure("lora_bwd", "scale", l.scale.is_finite(), || {
                    format!("LoRA scale must be finite, got {}", l.scale)
                })?;
                let r = l.r;
                check_len("lora_bwd", "a", l.a.len, r * k, || {
                    format!("[R={r}, K={k}]")
                })?;
                check_len("lora_bwd", "b", l.b.len, n * r, || {
                    format!("[N={n}, R={r}]")
                })?;
                check_len("lora_bwd", "xa", l.xa.len, m * r, || {
                    format!("[M={m}, R={r}]")
                })?;
                check_len("lora_bwd", "da", l.da.len, r * k, || {
                    format!("[R={r}, K={k}]")
                })?;
                check_len("lora_bwd", "db", l.db.len, n * r, || {
                    format!("[N={n}, R={r}]")
                })?;
                if let Some(mk) = l.mask {
                    check_len("lora_bwd", "mask", mk.len, m * k, || {
                        format!("[M={m}, K={k}]")
                    })?;
                }
                // dYB = dY·B [M, R] (B [N, R]: element (j, n) at b[n·R + j]).
                let dyb: &CudaBuf = dyb_tmp.insert(self.zeros_as(m * r, Dtype::F32)?);
                self.lora_proj(dy, None, l.b, 1, r, dyb, m, n, r)?;
                let (ri, ki, ni) = (
                    to_i32("lora_bwd", "r", r)?,
                    to_i32("lora_bwd", "k", k)?,
                    to_i32("lora_bwd", "n", n)?,
                );
                let (mask_arg, has) = match l.mask {
                    Some(mk) => (Arg::Buf(mk), 1),
                    None => (Arg::NullBuf, 0),
                };
                // dA += s·dYBᵀ·drop(X);  dB += s·dYᵀ·XA.
                let da: &CudaBuf = l.da;
                let db: &CudaBuf = l.db;
                if m > 0 {
                    self.launch(
                        "lora.cu",
                        "lora_da_k",
                        launch::lora_cols(k, r)?,
                        &[
                            Arg::Buf(dyb),
                            Arg::Buf(x),
                            mask_arg,
                            Arg::I32(has),
                            Arg::Buf(da),
                            n64(m),
                            Arg::I32(ki),
                            Arg::I32(ri),
                            Arg::F32(l.scale),
                        ],
                    )?;
                    self.launch(
                        "lora.cu",
                        "lora_db_k",
                        launch::lora_cols(n, r)?,
                        &[
                            Arg::Buf(dy),
                            Arg::Buf(l.xa),
                            Arg::Buf(db),
                            n64(m),
                            Arg::I32(ni),
                            Arg::I32(ri),
                            Arg::F32(l.scale),
                        ],
                    )?;
                }
                Some((dyb, l.a, r, l.scale, l.mask))
            }
            None => None,
        };
        let add_lora_dx =
            |cuda: &Cuda,
             (dyb, a, r, s, mask): (&CudaBuf, &CudaBuf, usize, f32, Option<&CudaBuf>)|
             -> Result<()> {
                let (mask_arg, has) = match mask {
                    Some(mk) => (Arg::Buf(mk), 1),
                    None => (Arg::NullBuf, 0),
                };
                cuda.launch(
                    "lora.cu",
                    "lora_dx_k",
                    launch::elementwise(m * k),
                    &[
                        Arg::Buf(dx),
                        Arg::Buf(dyb),
                        Arg::Buf(a),
                        mask_arg,
                        Arg::I32(has),
                        n64(m),
                        Arg::I32(to_i32("lora_bwd", "k", k)?),
                        Arg::I32(to_i32("lora_bwd", "r", r)?),
                        Arg::F32(s),
                    ],
                )
            };
        match w {
            Weight::Dense(wb) => {
                self.gemm(
                    op(dy, 0, false),
                    op(wb, 0, false),
                    dx,
                    0,
                    m,
                    k,
                    n,
                    1.0,
                    if acc { 1.0 } else { 0.0 },
                )?;
                if let Some(p) = lora_parts {
                    add_lora_dx(self, p)?;
                }
                Ok(())
            }
            Weight::Nf4(q) => {
                if m == 0 || k == 0 {
                    return Ok(());
                }
                match lora_parts {
                    // Without dropout the LoRA term joins the NF4 GEMM as extra reduction steps.
                    Some((dyb, a, r, s, None)) => {
                        self.nf4_backward(dy, q, dx, acc, Some((dyb, a, r, s)), m, k, n)
                    }
                    Some(p) => {
                        self.nf4_backward(dy, q, dx, acc, None, m, k, n)?;
                        add_lora_dx(self, p)
                    }
                    None => self.nf4_backward(dy, q, dx, acc, None, m, k, n),
                }
            }
        }
    }

    fn nf4_dequantize(&self, w: &CudaNf4, out: &mut CudaBuf) -> Result<()> {
        let numel = w.numel.ok_or_else(|| KernelError::Invalid {
            op: "nf4_dequantize",
            arg: "w",
            msg: format!("shape {:?} overflows", w.shape),
        })?;
        Self::check_nf4_layout("nf4_dequantize", w, numel)?;
        check_len("nf4_dequantize", "out", out.len, numel, || {
            format!("{:?}", w.shape)
        })?;
        let [p, c, a, c8, o, nest] = Self::nf4_args(w);
        self.launch(
            "nf4_dequant.cu",
            "nf4_dequant_k",
            launch::nf4_dequant(numel),
            &[p, c, a, c8, o, nest, n64(numel), Arg::Buf(out)],
        )
    }

    // ---- norms and pointwise --------------------------------------------------------------------
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
        check_len("rmsnorm_fwd", "x", x.len, n * h, || {
            format!("[N={n}, H={h}]")
        })?;
        check_len("rmsnorm_fwd", "w", w.len, h, || format!("[H={h}]"))?;
        check_len("rmsnorm_fwd", "y", y.len, n * h, || {
            format!("[N={n}, H={h}]")
        })?;
        check_len("rmsnorm_fwd", "rstd", rstd.len, n, || format!("[N={n}]"))?;
        if n == 0 {
            return Ok(());
        }
        ensure("rmsnorm_fwd", "h", h > 0, || "H must be ≥ 1".into())?;
        let l = launch::rows("rmsnorm_fwd", n, h, 1024)?;
        self.launch(
            "rmsnorm.cu",
            "rmsnorm_fwd_k",
            l,
            &[
                Arg::Buf(x),
                Arg::Buf(w),
                Arg::Buf(y),
                Arg::Buf(rstd),
                Arg::I32(to_i32("rmsnorm_fwd", "h", h)?),
                Arg::F32(eps),
            ],
        )
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
        check_len("rmsnorm_bwd", "dy", dy.len, n * h, || {
            format!("[N={n}, H={h}]")
        })?;
        check_len("rmsnorm_bwd", "x", x.len, n * h, || {
            format!("[N={n}, H={h}]")
        })?;
        check_len("rmsnorm_bwd", "w", w.len, h, || format!("[H={h}]"))?;
        check_len("rmsnorm_bwd", "rstd", rstd.len, n, || format!("[N={n}]"))?;
        check_len("rmsnorm_bwd", "dx", dx.len, n * h, || {
            format!("[N={n}, H={h}]")
        })?;
        if n == 0 || h == 0 {
            return Ok(());
        }
        let hi = to_i32("rmsnorm_bwd", "h", h)?;
        let l = launch::rows("rmsnorm_bwd", n, h, 1024)?;
        self.launch(
            "rmsnorm.cu",
            "rmsnorm_bwd_k",
            l,
            &[
                Arg::Buf(dy),
                Arg::Buf(x),
                Arg::Buf(w),
                Arg::Buf(rstd),
                Arg::Buf(dx),
                Arg::I32(hi),
            ],
        )?;
        if let Some(dw) = dw {
            check_len("rmsnorm_bwd", "dw", dw.len, h, || format!("[H={h}]"))?;
            self.launch(
                "rmsnorm.cu",
                "rmsnorm_dw_k",
                launch::elementwise(h),
                &[
                    Arg::Buf(dy),
                    Arg::Buf(x),
                    Arg::Buf(rstd),
                    Arg::Buf(dw),
                    n64(n),
                    Arg::I32(hi),
                ],
            )?;
        }
        Ok(())
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
        // Same checks, in the same order, as the CPU backend.
        ensure("rope", "d", d > 0 && d.is_multiple_of(2), || {
            format!("head dim D must be even and > 0, got {d}")
        })?;
        ensure("rope", "heads", heads > 0, || {
            "heads must be > 0".to_string()
        })?;
        ensure("rope", "theta", theta.is_finite() && theta > 0.0, || {
            format!("theta must be finite and > 0, got {theta}")
        })?;
        let total = n.checked_mul(heads).and_then(|v| v.checked_mul(d));
        ensure("rope", "n", total.is_some(), || {
            format!("N·heads·D = {n}·{heads}·{d} overflows")
        })?;
        check_len("rope", "x", x.len, n * heads * d, || {
            format!("[N={n}, heads={heads}, D={d}]")
        })?;
        check_len("rope", "pos", pos.len, n, || {
            format!("[N={n}, heads={heads}, D={d}]")
        })?;
        if n == 0 {
            return Ok(());
        }
        // Negative positions are an error (one i32 read back: the flag of the check kernel).
        if let Some(i) = self.first_bad_id(pos, 0, n, i32::MAX as usize, false)? {
            let p = self
                .stream
                .clone_dtoh(&pos.data.slice(i..i + 1))
                .map_err(be("device to host copy"))?[0];
            return Err(KernelError::Invalid {
                op: "rope",
                arg: "pos",
                msg: format!("position {p} at token {i} is negative"),
            });
        }
        let l = launch::elementwise(n * heads * d / 2);
        self.launch(
            "rope.cu",
            "rope_k",
            l,
            &[
                Arg::Buf(x),
                Arg::I32s(&pos.data),
                n64(n),
                Arg::I32(to_i32("rope", "heads", heads)?),
                Arg::I32(to_i32("rope", "d", d)?),
                Arg::F32(theta),
                Arg::I32(inverse as i32),
            ],
        )
    }

    fn geglu_fwd(&self, gate: &CudaBuf, up: &CudaBuf, out: &mut CudaBuf) -> Result<()> {
        check_len("geglu_fwd", "up", up.len, gate.len, || {
            format!("[{}]", gate.len)
        })?;
        check_len("geglu_fwd", "out", out.len, gate.len, || {
            format!("[{}]", gate.len)
        })?;
        self.launch(
            "geglu.cu",
            "geglu_fwd_k",
            launch::elementwise(gate.len),
            &[Arg::Buf(gate), Arg::Buf(up), Arg::Buf(out), n64(gate.len)],
        )
    }

    fn geglu_bwd(
        &self,
        dout: &CudaBuf,
        gate: &CudaBuf,
        up: &CudaBuf,
        dgate: &mut CudaBuf,
        dup: &mut CudaBuf,
    ) -> Result<()> {
        let n = gate.len;
        check_len("geglu_bwd", "dout", dout.len, n, || format!("[{n}]"))?;
        check_len("geglu_bwd", "up", up.len, n, || format!("[{n}]"))?;
        check_len("geglu_bwd", "dgate", dgate.len, n, || format!("[{n}]"))?;
        check_len("geglu_bwd", "dup", dup.len, n, || format!("[{n}]"))?;
        self.launch(
            "geglu.cu",
            "geglu_bwd_k",
            launch::elementwise(n),
            &[
                Arg::Buf(dout),
                Arg::Buf(gate),
                Arg::Buf(up),
                Arg::Buf(dgate),
                Arg::Buf(dup),
                n64(n),
            ],
        )
    }

    fn softcap_fwd(&self, x: &mut CudaBuf, cap: f32) -> Result<()> {
        ensure("softcap_fwd", "cap", cap > 0.0 && cap.is_finite(), || {
            format!("cap = {cap} must be finite and > 0")
        })?;
        self.launch(
            "softcap.cu",
            "softcap_fwd_k",
            launch::elementwise(x.len),
            &[Arg::Buf(x), n64(x.len), Arg::F32(cap)],
        )
    }

    fn softcap_bwd(&self, y: &CudaBuf, dy: &mut CudaBuf, cap: f32) -> Result<()> {
        ensure("softcap_bwd", "cap", cap > 0.0 && cap.is_finite(), || {
            format!("cap = {cap} must be finite and > 0")
        })?;
        check_len("softcap_bwd", "dy", dy.len, y.len, || {
            format!("[{}]", y.len)
        })?;
        self.launch(
            "softcap.cu",
            "softcap_bwd_k",
            launch::elementwise(y.len),
            &[Arg::Buf(y), Arg::Buf(dy), n64(y.len), Arg::F32(cap)],
        )
    }

    // ---- attention ------------------------------------------------------------------------------
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
        check_attn("attn_fwd", s)?;
        let qn = s.b * s.t * s.nh * s.d;
        let kn = s.b * s.tk * s.nkv * s.d;
        check_len("attn_fwd", "q", q.len, qn, || attn_q_shape(s))?;
        check_len("attn_fwd", "k", k.len, kn, || attn_k_shape(s))?;
        check_len("attn_fwd", "v", v.len, kn, || attn_k_shape(s))?;
        check_len("attn_fwd", "out", out.len, qn, || attn_q_shape(s))?;
        check_len("attn_fwd", "lse", lse.len, s.b * s.nh * s.t, || {
            format!("[B={}, NH={}, T={}]", s.b, s.nh, s.t)
        })?;
        let seg_arg = seg_arg("attn_fwd", seg, s.b * s.tk)?;
        if qn == 0 {
            return Ok(());
        }
        // Tensor cores for D ∈ {16, 32, 64, 128, 256} (Gemma-2: 256), CUDA cores otherwise; both take
        // the same arguments.
        let (l, kernel) = match launch::attention_mma(s.b, s.t, s.nh, s.d)? {
            Some(plan) if !self.simt_attention && self.mma_for(&[q, k, v]) => plan,
            _ => (launch::attention(s.b * s.t * s.nh, s.d)?, "attn_fwd_k"),
        };
        let (seg_a, has) = seg_arg;
        self.launch(
            "attention.cu",
            kernel,
            l,
            &[
                Arg::Buf(q),
                Arg::Buf(k),
                Arg::Buf(v),
                seg_a,
                Arg::I32(has),
                Arg::Buf(out),
                Arg::Buf(lse),
                Arg::I32(to_i32("attn_fwd", "b", s.b)?),
                Arg::I32(to_i32("attn_fwd", "t", s.t)?),
                Arg::I32(to_i32("attn_fwd", "tk", s.tk)?),
                Arg::I32(to_i32("attn_fwd", "nh", s.nh)?),
                Arg::I32(to_i32("attn_fwd", "nkv", s.nkv)?),
                Arg::I32(to_i32("attn_fwd", "d", s.d)?),
                Arg::F32(s.scale),
                Arg::F32(s.softcap.unwrap_or(0.0)),
                Arg::I32(to_i32("attn_fwd", "window", s.window.unwrap_or(0))?),
            ],
        )
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
        check_attn("attn_bwd", s)?;
        ensure("attn_bwd", "tk", s.tk == s.t, || {
            format!("the backward needs TK = T (got TK = {}, T = {})", s.tk, s.t)
        })?;
        let qn = s.b * s.t * s.nh * s.d;
        let kn = s.b * s.t * s.nkv * s.d;
        for (name, buf, want) in [("q", q, qn), ("out", out, qn), ("dout", dout, qn)] {
            check_len("attn_bwd", name, buf.len, want, || attn_q_shape(s))?;
        }
        for (name, buf, want) in [("k", k, kn), ("v", v, kn)] {
            check_len("attn_bwd", name, buf.len, want, || attn_k_shape(s))?;
        }
        check_len("attn_bwd", "dq", dq.len, qn, || attn_q_shape(s))?;
        check_len("attn_bwd", "dk", dk.len, kn, || attn_k_shape(s))?;
        check_len("attn_bwd", "dv", dv.len, kn, || attn_k_shape(s))?;
        check_len("attn_bwd", "lse", lse.len, s.b * s.nh * s.t, || {
            format!("[B={}, NH={}, T={}]", s.b, s.nh, s.t)
        })?;
        let (seg_a, has) = seg_arg("attn_bwd", seg, s.b * s.t)?;
        if qn == 0 {
            return Ok(());
        }
        let dims = [
            Arg::I32(to_i32("attn_bwd", "b", s.b)?),
            Arg::I32(to_i32("attn_bwd", "t", s.t)?),
            Arg::I32(to_i32("attn_bwd", "nh", s.nh)?),
            Arg::I32(to_i32("attn_bwd", "nkv", s.nkv)?),
            Arg::I32(to_i32("attn_bwd", "d", s.d)?),
        ];
        let tail = [
            Arg::F32(s.scale),
            Arg::F32(s.softcap.unwrap_or(0.0)),
            Arg::I32(to_i32("attn_bwd", "window", s.window.unwrap_or(0))?),
        ];
        let delta = self.f32_scratch(s.b * s.nh * s.t)?;
        let (bi, ti, nhi, di) = (
            to_i32("attn_bwd", "b", s.b)?,
            to_i32("attn_bwd", "t", s.t)?,
            to_i32("attn_bwd", "nh", s.nh)?,
            to_i32("attn_bwd", "d", s.d)?,
        );
        self.launch(
            "attention.cu",
            "attn_bwd_delta_k",
            launch::attention(s.b * s.t * s.nh, s.d)?,
            &[
                Arg::Buf(out),
                Arg::Buf(dout),
                Arg::F32s(&delta),
                Arg::I32(bi),
                Arg::I32(ti),
                Arg::I32(nhi),
                Arg::I32(di),
            ],
        )?;
        // Tensor cores for D ∈ {16, 32, 64, 128, 256}: dq, dk, dv each in its own kernel.
        if let Some((ldq, ldkv, [kdq, kdk, kdv])) =
            launch::attention_mma_bwd(s.b, s.t, s.nh, s.nkv, s.d)?
        {
            if !self.simt_attention && self.mma_for(&[q, k, v, dout]) {
                let seg_c = || match seg {
                    Some(sg) => Arg::I32s(&sg.data),
                    None => Arg::Null,
                };
                for (kernel, l, out) in [(kdq, ldq, &*dq), (kdk, ldkv, &*dk), (kdv, ldkv, &*dv)] {
                    let mut args = vec![
                        Arg::Buf(q),
                        Arg::Buf(k),
                        Arg::Buf(v),
                        seg_c(),
                        Arg::I32(has),
                        Arg::Buf(lse),
                        Arg::F32s(&delta),
                        Arg::Buf(dout),
                        Arg::Buf(out),
                    ];
                    args.extend(dims.iter().map(clone_scalar));
                    args.extend(tail.iter().map(clone_scalar));
                    self.launch("attention.cu", kernel, l, &args)?;
                }
                return Ok(());
            }
        }
        let seg_b = match seg {
            Some(sg) => Arg::I32s(&sg.data),
            None => Arg::Null,
        };
        let mut args = vec![
            Arg::Buf(q),
            Arg::Buf(k),
            Arg::Buf(v),
            seg_a,
            Arg::I32(has),
            Arg::Buf(lse),
            Arg::F32s(&delta),
            Arg::Buf(dout),
            Arg::Buf(dq),
        ];
        args.extend(dims.iter().map(clone_scalar));
        args.extend(tail.iter().map(clone_scalar));
        self.launch(
            "attention.cu",
            "attn_bwd_dq_k",
            launch::attention(s.b * s.t * s.nh, s.d)?,
            &args,
        )?;
        let mut args = vec![
            Arg::Buf(q),
            Arg::Buf(k),
            Arg::Buf(v),
            seg_b,
            Arg::I32(has),
            Arg::Buf(lse),
            Arg::F32s(&delta),
            Arg::Buf(dout),
            Arg::Buf(dk),
            Arg::Buf(dv),
        ];
        args.extend(dims.iter().map(clone_scalar));
        args.extend(tail.iter().map(clone_scalar));
        self.launch(
            "attention.cu",
            "attn_bwd_dkv_k",
            launch::attention(s.b * s.t * s.nkv, s.d)?,
            &args,
        )
    }

    // ---- embedding and loss ---------------------------------------------------------------------
    fn embedding_fwd(
        &self,
        ids: &CudaIds,
        table: &CudaBuf,
        out: &mut CudaBuf,
        v: usize,
        h: usize,
        scale: f32,
    ) -> Result<()> {
        check_len("embedding_fwd", "table", table.len, v * h, || {
            format!("[V={v}, H={h}]")
        })?;
        ensure(
            "embedding_fwd",
            "out",
            h > 0 && out.len.is_multiple_of(h),
            || format!("out has {} elements, not a multiple of H = {h}", out.len),
        )?;
        let n = out.len / h;
        if n == 0 {
            return Ok(());
        }
        check_len("embedding_fwd", "ids", ids.len, n, || format!("[N={n}]"))?;
        if let Some(i) = self.first_bad_id(ids, 0, n, v, false)? {
            let id = self
                .stream
                .clone_dtoh(&ids.data.slice(i..i + 1))
                .map_err(be("device to host copy"))?[0];
            return Err(KernelError::Invalid {
                op: "embedding_fwd",
                arg: "ids",
                msg: format!("ids[{i}] = {id} is outside [0, V={v})"),
            });
        }
        if n == 0 {
            return Ok(());
        }
        let l = launch::rows("embedding_fwd", n, h, 256)?;
        self.launch(
            "embedding.cu",
            "embedding_fwd_k",
            l,
            &[
                Arg::I32s(&ids.data),
                Arg::Buf(table),
                Arg::Buf(out),
                Arg::I32(to_i32("embedding_fwd", "h", h)?),
                Arg::F32(scale),
            ],
        )
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
        check_len("embedding_bwd", "dtable", dtable.len, v * h, || {
            format!("[V={v}, H={h}]")
        })?;
        ensure(
            "embedding_bwd",
            "dout",
            h > 0 && dout.len.is_multiple_of(h),
            || format!("dout has {} elements, not a multiple of H = {h}", dout.len),
        )?;
        let n = dout.len / h;
        if n == 0 {
            return Ok(());
        }
        check_len("embedding_bwd", "ids", ids.len, n, || format!("[N={n}]"))?;
        if let Some(i) = self.first_bad_id(ids, 0, n, v, false)? {
            let id = self
                .stream
                .clone_dtoh(&ids.data.slice(i..i + 1))
                .map_err(be("device to host copy"))?[0];
            return Err(KernelError::Invalid {
                op: "embedding_bwd",
                arg: "ids",
                msg: format!("ids[{i}] = {id} is outside [0, V={v})"),
            });
        }
        if n == 0 {
            return Ok(());
        }
        let l = launch::rows("embedding_bwd", n, h, 256)?;
        self.launch(
            "embedding.cu",
            "embedding_bwd_k",
            l,
            &[
                Arg::I32s(&ids.data),
                Arg::Buf(dout),
                Arg::Buf(dtable),
                Arg::I32(to_i32("embedding_bwd", "h", h)?),
                Arg::F32(scale),
            ],
        )
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
        check_len("cross_entropy", "logits", logits.len, n * v, || {
            format!("[N={n}, V={v}]")
        })?;
        if let Some(d) = &dlogits {
            check_len("cross_entropy", "dlogits", d.len, n * v, || {
                format!("[N={n}, V={v}]")
            })?;
        }
        if n == 0 {
            return Ok((0.0, 0));
        }
        check_len("cross_entropy", "labels", labels.len, n, || {
            format!("[N={n}]")
        })?;
        let cap = check_cap("cross_entropy", softcap)?;
        let count = self.count_labels("cross_entropy", labels, 0, n, v)?;
        let row_loss = self.zeros_as(n, Dtype::F32)?;
        let l = launch::rows("cross_entropy", n, v, 1024)?;
        let (d_arg, want) = match dlogits {
            Some(d) => (Arg::Buf(&*d), 1),
            None => (Arg::NullBuf, 0),
        };
        self.launch(
            "cross_entropy.cu",
            "ce_row_k",
            l,
            &[
                Arg::Buf(logits),
                Arg::I32s(&labels.data),
                Arg::I32(to_i32("cross_entropy", "v", v)?),
                Arg::F32(cap),
                Arg::F32(grad_scale),
                d_arg,
                Arg::I32(want),
                Arg::F32s(f32_slice(&row_loss)?),
            ],
        )?;
        Ok((self.reduce(&row_loss, 0, n, 1)?, count))
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
        check_len("lm_head_ce", "hidden", hidden.len, n * h, || {
            format!("[N={n}, H={h}]")
        })?;
        check_len("lm_head_ce", "emb", emb.len, v * h, || {
            format!("[V={v}, H={h}]")
        })?;
        if let Some(d) = &dhidden {
            check_len("lm_head_ce", "dhidden", d.len, n * h, || {
                format!("[N={n}, H={h}]")
            })?;
        }
        if let Some(d) = &demb {
            check_len("lm_head_ce", "demb", d.len, v * h, || {
                format!("[V={v}, H={h}]")
            })?;
        }
        if n == 0 {
            return Ok((0.0, 0));
        }
        check_len("lm_head_ce", "labels", labels.len, n, || format!("[N={n}]"))?;
        let cap = check_cap("lm_head_ce", softcap)?;
        let count = self.count_labels("lm_head_ce", labels, 0, n, v)?;
        let dhidden: Option<&CudaBuf> = dhidden.map(|d| &*d);
        let demb: Option<&CudaBuf> = demb.map(|d| &*d);
        let want = dhidden.is_some() || demb.is_some();
        let rows = launch::lm_head_chunk_rows(n, v, LM_HEAD_CHUNK_BYTES);
        let logits = self.zeros_as(rows * v, Dtype::F32)?;
        let row_loss = self.zeros_as(rows, Dtype::F32)?;
        let vi = to_i32("lm_head_ce", "v", v)?;
        // A narrow hidden against an f32 embedding (a trained, Master-stored table in full
        // fine-tuning): cuBLAS has no mixed-input GEMM, so `gemm` would convert the whole [V,H] table
        // in every chunk, twice. Convert it once for the two GEMMs that read it.
        let emb_narrow;
        let emb: &CudaBuf = if matches!(self.gemm, super::GemmBackend::Cublas(_))
            && hidden.dtype() != Dtype::F32
            && emb.dtype() == Dtype::F32
        {
            emb_narrow = self.slice_copy(emb, 0, v * h, hidden.dtype())?;
            &emb_narrow
        } else {
            emb
        };
        let mut total = 0.0f64;
        let mut r0 = 0usize;
        while r0 < n {
            let c = rows.min(n - r0);
            // logits[c, V] = hidden[r0..r0+c] · embᵀ.
            self.gemm(
                op(hidden, r0 * h, false),
                op(emb, 0, true),
                &logits,
                0,
                c,
                v,
                h,
                1.0,
                0.0,
            )?;
            // Loss per row, and the gradient written over the logits in place.
            let l = launch::rows("lm_head_ce", c, v, 1024)?;
            self.launch(
                "cross_entropy.cu",
                "ce_row_k",
                l,
                &[
                    Arg::Buf(&logits),
                    Arg::I32sAt(&labels.data, r0),
                    Arg::I32(vi),
                    Arg::F32(cap),
                    Arg::F32(grad_scale),
                    Arg::Buf(&logits),
                    Arg::I32(want as i32),
                    Arg::F32s(f32_slice(&row_loss)?),
                ],
            )?;
            total += self.reduce(&row_loss, 0, c, 1)?;
            if let Some(dh) = dhidden {
                // dhidden[r0..r0+c] += dlogits · emb.
                self.gemm(
                    op(&logits, 0, false),
                    op(emb, 0, false),
                    dh,
                    r0 * h,
                    c,
                    h,
                    v,
                    1.0,
                    1.0,
                )?;
            }
            if let Some(de) = demb {
                // demb += dlogitsᵀ · hidden[r0..r0+c].
                self.gemm(
                    op(&logits, 0, true),
                    op(hidden, r0 * h, false),
                    de,
                    0,
                    v,
                    h,
                    c,
                    1.0,
                    1.0,
                )?;
            }
            r0 += c;
        }
        Ok((total, count))
    }

    // ---- optimizer ------------------------------------------------------------------------------
    fn adamw(
        &self,
        p: &mut CudaBuf,
        g: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        h: &AdamW,
    ) -> Result<()> {
        let n = p.len;
        check_len("adamw", "g", g.len, n, || format!("[{n}]"))?;
        check_len("adamw", "m", m.len, n, || format!("[{n}]"))?;
        check_len("adamw", "v", v.len, n, || format!("[{n}]"))?;
        let sc = AdamScalars::new("adamw", h)?;
        self.launch_adamw(Arg::Buf(p), Arg::Buf(g), Arg::Buf(m), Arg::Buf(v), n, &sc)
    }

    fn adam_state(&self, n: usize, paged: bool) -> Result<CudaAdamState> {
        Ok(if paged {
            CudaAdamState::Paged(self.paged_adam_state(n)?)
        } else {
            CudaAdamState::Device(AdamMoments {
                m: self.zeros_as(n, Dtype::F32)?,
                v: self.zeros_as(n, Dtype::F32)?,
            })
        })
    }

    fn adam_state_from_host(&self, m: &[f32], v: &[f32], paged: bool) -> Result<CudaAdamState> {
        check_len("adam_state_from_host", "v", v.len(), m.len(), || {
            format!("[len(m)={}]", m.len())
        })?;
        Ok(if paged {
            CudaAdamState::Paged(self.paged_adam_state_from_host(m, v)?)
        } else {
            CudaAdamState::Device(AdamMoments {
                m: self.from_host_as(m, Dtype::F32)?,
                v: self.from_host_as(v, Dtype::F32)?,
            })
        })
    }

    fn adam_state_to_host(&self, s: &CudaAdamState) -> Result<(Vec<f32>, Vec<f32>)> {
        match s {
            CudaAdamState::Device(d) => Ok((self.to_host(&d.m)?, self.to_host(&d.v)?)),
            CudaAdamState::Paged(p) => p.to_vecs(),
        }
    }

    fn adamw_step(
        &self,
        p: &mut CudaBuf,
        g: &CudaBuf,
        s: &mut CudaAdamState,
        h: &AdamW,
    ) -> Result<()> {
        match s {
            CudaAdamState::Device(d) => self.adamw(p, g, &mut d.m, &mut d.v, h),
            CudaAdamState::Paged(st) => self.adamw_paged(p, g, st, h),
        }
    }
}

impl Cuda {
    /// Launches `adamw_k` over n elements of (p, g, m, v) with the host-computed scalars `sc` (the
    /// CPU reference's, so both backends run the same f32 operations; see kernels/adamw.cu).
    pub(crate) fn launch_adamw(
        &self,
        p: Arg<'_>,
        g: Arg<'_>,
        m: Arg<'_>,
        v: Arg<'_>,
        n: usize,
        sc: &AdamScalars,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.launch(
            "adamw.cu",
            "adamw_k",
            launch::elementwise(n),
            &[
                p,
                g,
                m,
                v,
                n64(n),
                Arg::I32(sc.decay.is_some() as i32),
                Arg::F32(sc.decay.unwrap_or(1.0)),
                Arg::I32(sc.w1_small as i32),
                Arg::F32(sc.w1),
                Arg::F32(sc.w1_minus_1),
                Arg::F32(sc.b2),
                Arg::F32(sc.one_minus_b2),
                Arg::F32(sc.neg_step_size),
                Arg::F32(sc.bc2_sqrt),
                Arg::F32(sc.eps),
            ],
        )
    }
}

impl Cuda {
    /// Validates labels (−100 or in [0, V)) and counts the scored rows.
    fn count_labels(
        &self,
        op: &'static str,
        labels: &CudaIds,
        off: usize,
        n: usize,
        v: usize,
    ) -> Result<usize> {
        let host = self
            .stream
            .clone_dtoh(&labels.data.slice(off..off + n))
            .map_err(be("device to host copy"))?;
        if let Some((i, &l)) = host
            .iter()
            .enumerate()
            .find(|(_, &l)| l != -100 && (l < 0 || l as usize >= v))
        {
            return Err(KernelError::Invalid {
                op,
                arg: "labels",
                msg: format!("labels[{i}] = {l} is neither −100 nor in [0, V={v})"),
            });
        }
        Ok(host.iter().filter(|&&l| l != -100).count())
    }
}

fn beta(acc: Accum) -> f32 {
    match acc {
        Accum::Overwrite => 0.0,
        Accum::Add => 1.0,
    }
}

fn clone_scalar<'a>(a: &Arg<'a>) -> Arg<'a> {
    match a {
        Arg::I32(v) => Arg::I32(*v),
        Arg::I64(v) => Arg::I64(*v),
        Arg::F32(v) => Arg::F32(*v),
        _ => Arg::Null,
    }
}

fn f32_slice(b: &CudaBuf) -> Result<&CudaSlice<f32>> {
    match &b.data {
        Data::F32(s) => Ok(s),
        Data::Bf16(_) | Data::F16(_) => Err(KernelError::Backend {
            backend: "cuda",
            msg: "internal: expected an f32 scratch buffer".into(),
        }),
    }
}

fn check_cap(op: &'static str, cap: Option<f32>) -> Result<f32> {
    match cap {
        None => Ok(0.0),
        Some(c) => {
            ensure(op, "softcap", c > 0.0 && c.is_finite(), || {
                format!("soft-cap {c} must be finite and > 0")
            })?;
            Ok(c)
        }
    }
}

fn check_attn(op: &'static str, s: &AttnShape) -> Result<()> {
    ensure(op, "nkv", s.nkv > 0 && s.nh.is_multiple_of(s.nkv), || {
        format!("NH = {} is not a multiple of NKV = {}", s.nh, s.nkv)
    })?;
    ensure(op, "tk", s.tk >= s.t, || {
        format!("TK = {} < T = {}", s.tk, s.t)
    })?;
    ensure(op, "d", s.d > 0 && s.d <= launch::ATTN_MAX_D, || {
        format!("head dim D = {} outside 1..={}", s.d, launch::ATTN_MAX_D)
    })?;
    if let Some(w) = s.window {
        ensure(op, "window", w >= 1, || {
            "a sliding window must hold at least 1 key".into()
        })?;
    }
    if let Some(c) = s.softcap {
        ensure(op, "softcap", c > 0.0 && c.is_finite(), || {
            format!("soft-cap {c} must be finite and > 0")
        })?;
    }
    Ok(())
}

fn attn_q_shape(s: &AttnShape) -> String {
    format!("[B={}, T={}, NH={}, D={}]", s.b, s.t, s.nh, s.d)
}

fn attn_k_shape(s: &AttnShape) -> String {
    format!("[B={}, TK={}, NKV={}, D={}]", s.b, s.tk, s.nkv, s.d)
}

fn seg_arg<'a>(op: &'static str, seg: Option<&'a CudaIds>, want: usize) -> Result<(Arg<'a>, i32)> {
    match seg {
        Some(sg) => {
            check_len(op, "seg", sg.len, want, || format!("[B·TK={want}]"))?;
            Ok((Arg::I32s(&sg.data), 1))
        }
        None => Ok((Arg::Null, 0)),
    }
}
