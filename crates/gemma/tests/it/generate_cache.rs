//! The backend-resident KV cache under failure: an op that fails in the middle of a decode step (after
//! some layers have already replaced their cache buffers) leaves the cache exactly as it was, and the
//! decoder continues bit-identically to one that never failed. The failures come from `Flaky`, the CPU
//! backend with one op made to fail on its n-th call. With feature `cuda`: decoding on the GPU follows
//! the CPU decoder step by step (skipped without a driver).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use afinar_gemma::generate::Decoder;
use afinar_gemma::{Gemma2Config, Gemma2Model, LoadOptions, LoraConfig, ParamId};
use afinar_kernels::{
    Accum, AdamMoments, AdamW, AttnShape, Backend, Cpu, KernelError, LoraGradRef, LoraRef,
    Nf4Tensor, Result, Weight,
};

/// The CPU backend, except that the `fail_at`-th call (0-based, counted from `arm`) of op `fail_op`
/// returns a `KernelError::Backend`.
#[derive(Default)]
struct Flaky {
    cpu: Cpu,
    fail_op: Mutex<Option<&'static str>>,
    calls_left: AtomicUsize,
}

impl Flaky {
    fn arm(&self, op: &'static str, fail_at: usize) {
        *self.fail_op.lock().unwrap() = Some(op);
        self.calls_left.store(fail_at, Ordering::SeqCst);
    }

    fn disarm(&self) {
        *self.fail_op.lock().unwrap() = None;
    }

    fn tick(&self, op: &'static str) -> Result<()> {
        let mut armed = self.fail_op.lock().unwrap();
        if *armed != Some(op) {
            return Ok(());
        }
        if self.calls_left.load(Ordering::SeqCst) == 0 {
            *armed = None;
            return Err(KernelError::Backend {
                backend: "flaky",
                msg: format!("injected failure of {op}"),
            });
        }
        self.calls_left.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

fn w<'a>(w: Weight<'a, Flaky>) -> Weight<'a, Cpu> {
    match w {
        Weight::Dense(d) => Weight::Dense(d),
        Weight::Nf4(q) => Weight::Nf4(q),
    }
}

impl Backend for Flaky {
    type Buf = Vec<f32>;
    type Ids = Vec<i32>;
    type Nf4 = Nf4Tensor;
    type AdamState = AdamMoments<Vec<f32>>;

    fn name(&self) -> &'static str {
        "flaky"
    }
    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        self.tick("zeros")?;
        self.cpu.zeros(n)
    }
    fn from_host(&self, data: &[f32]) -> Result<Vec<f32>> {
        self.cpu.from_host(data)
    }
    fn to_host(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        self.cpu.to_host(buf)
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn ids_from_host(&self, ids: &[i32]) -> Result<Vec<i32>> {
        self.cpu.ids_from_host(ids)
    }
    fn ids_len(&self, ids: &Vec<i32>) -> usize {
        ids.len()
    }
    fn nf4_from_host(&self, q: &Nf4Tensor) -> Result<Nf4Tensor> {
        self.cpu.nf4_from_host(q)
    }
    fn nf4_to_host(&self, q: &Nf4Tensor) -> Result<Nf4Tensor> {
        self.cpu.nf4_to_host(q)
    }
    fn copy(&self, src: &Vec<f32>, dst: &mut Vec<f32>) -> Result<()> {
        self.cpu.copy(src, dst)
    }
    fn fill(&self, buf: &mut Vec<f32>, value: f32) -> Result<()> {
        self.cpu.fill(buf, value)
    }
    fn copy_range(
        &self,
        src: &Vec<f32>,
        so: usize,
        dst: &mut Vec<f32>,
        dof: usize,
        n: usize,
    ) -> Result<()> {
        self.tick("copy_range")?;
        self.cpu.copy_range(src, so, dst, dof, n)
    }
    fn dropout_mask(&self, out: &mut Vec<f32>, p: f64, seed: u64, stream: u64) -> Result<()> {
        self.cpu.dropout_mask(out, p, seed, stream)
    }
    fn axpy(&self, alpha: f32, x: &Vec<f32>, y: &mut Vec<f32>) -> Result<()> {
        self.cpu.axpy(alpha, x, y)
    }
    fn scale(&self, x: &mut Vec<f32>, alpha: f32) -> Result<()> {
        self.cpu.scale(x, alpha)
    }
    fn mul(&self, x: &mut Vec<f32>, m: &Vec<f32>) -> Result<()> {
        self.cpu.mul(x, m)
    }
    fn sum_squares(&self, x: &Vec<f32>) -> Result<f64> {
        self.cpu.sum_squares(x)
    }
    fn matmul_xwt(
        &self,
        x: &Vec<f32>,
        wt: &Vec<f32>,
        y: &mut Vec<f32>,
        m: usize,
        k: usize,
        n: usize,
        acc: Accum,
    ) -> Result<()> {
        self.tick("matmul_xwt")?;
        self.cpu.matmul_xwt(x, wt, y, m, k, n, acc)
    }
    fn matmul_dyw(
        &self,
        dy: &Vec<f32>,
        wt: &Vec<f32>,
        dx: &mut Vec<f32>,
        m: usize,
        k: usize,
        n: usize,
        acc: Accum,
    ) -> Result<()> {
        self.cpu.matmul_dyw(dy, wt, dx, m, k, n, acc)
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
        self.cpu.matmul_dytx(dy, x, dw, m, k, n, acc)
    }
    fn lora_fwd(
        &self,
        x: &Vec<f32>,
        wt: Weight<'_, Self>,
        lora: Option<LoraRef<'_, Self>>,
        y: &mut Vec<f32>,
        xa: Option<&mut Vec<f32>>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.tick("lora_fwd")?;
        let lora = lora.map(|l| LoraRef {
            a: l.a,
            b: l.b,
            r: l.r,
            scale: l.scale,
            mask: l.mask,
        });
        self.cpu.lora_fwd(x, w(wt), lora, y, xa, m, k, n)
    }
    fn lora_bwd(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        wt: Weight<'_, Self>,
        lora: Option<LoraGradRef<'_, Self>>,
        dx: &mut Vec<f32>,
        dx_acc: Accum,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let lora = lora.map(|l| LoraGradRef {
            a: l.a,
            b: l.b,
            r: l.r,
            scale: l.scale,
            mask: l.mask,
            xa: l.xa,
            da: l.da,
            db: l.db,
        });
        self.cpu.lora_bwd(dy, x, w(wt), lora, dx, dx_acc, m, k, n)
    }
    fn nf4_dequantize(&self, q: &Nf4Tensor, out: &mut Vec<f32>) -> Result<()> {
        self.cpu.nf4_dequantize(q, out)
    }
    fn rmsnorm_fwd(
        &self,
        x: &Vec<f32>,
        wt: &Vec<f32>,
        y: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        n: usize,
        h: usize,
        eps: f32,
    ) -> Result<()> {
        self.cpu.rmsnorm_fwd(x, wt, y, rstd, n, h, eps)
    }
    fn rmsnorm_bwd(
        &self,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        wt: &Vec<f32>,
        rstd: &Vec<f32>,
        dx: &mut Vec<f32>,
        dw: Option<&mut Vec<f32>>,
        n: usize,
        h: usize,
    ) -> Result<()> {
        self.cpu.rmsnorm_bwd(dy, x, wt, rstd, dx, dw, n, h)
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
        self.cpu.rope(x, pos, n, heads, d, theta, inverse)
    }
    fn geglu_fwd(&self, gate: &Vec<f32>, up: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        self.cpu.geglu_fwd(gate, up, out)
    }
    fn geglu_bwd(
        &self,
        dout: &Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        dgate: &mut Vec<f32>,
        dup: &mut Vec<f32>,
    ) -> Result<()> {
        self.cpu.geglu_bwd(dout, gate, up, dgate, dup)
    }
    fn softcap_fwd(&self, x: &mut Vec<f32>, cap: f32) -> Result<()> {
        self.cpu.softcap_fwd(x, cap)
    }
    fn softcap_bwd(&self, y: &Vec<f32>, dy: &mut Vec<f32>, cap: f32) -> Result<()> {
        self.cpu.softcap_bwd(y, dy, cap)
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
        self.tick("attn_fwd")?;
        self.cpu.attn_fwd(q, k, v, seg, out, lse, s)
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
        self.cpu
            .attn_bwd(q, k, v, seg, out, lse, dout, dq, dk, dv, s)
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
        self.cpu.embedding_fwd(ids, table, out, v, h, scale)
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
        self.cpu.embedding_bwd(ids, dout, dtable, v, h, scale)
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
        self.cpu
            .cross_entropy(logits, labels, n, v, softcap, grad_scale, dlogits)
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
        self.cpu.lm_head_ce(
            hidden, emb, labels, n, h, v, softcap, grad_scale, dhidden, demb,
        )
    }
    fn adam_state(&self, n: usize, paged: bool) -> Result<AdamMoments<Vec<f32>>> {
        self.cpu.adam_state(n, paged)
    }
    fn adam_state_from_host(
        &self,
        m: &[f32],
        v: &[f32],
        paged: bool,
    ) -> Result<AdamMoments<Vec<f32>>> {
        self.cpu.adam_state_from_host(m, v, paged)
    }
    fn adam_state_to_host(&self, s: &AdamMoments<Vec<f32>>) -> Result<(Vec<f32>, Vec<f32>)> {
        self.cpu.adam_state_to_host(s)
    }
    fn adamw_step(
        &self,
        p: &mut Vec<f32>,
        g: &Vec<f32>,
        s: &mut AdamMoments<Vec<f32>>,
        h: &AdamW,
    ) -> Result<()> {
        self.cpu.adamw_step(p, g, s, h)
    }
    fn adamw(
        &self,
        p: &mut Vec<f32>,
        g: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        h: &AdamW,
    ) -> Result<()> {
        self.cpu.adamw(p, g, m, v, h)
    }
}

const V: usize = 61;
const WINDOW: usize = 3;

/// 3 layers (sliding, full, sliding; window 3), GQA 2, LoRA on every linear with non-zero B.
fn model<B: Backend>(be: Arc<B>) -> Gemma2Model<B> {
    let cfg = Gemma2Config::tiny(V, 24, 40, 3, 2, 1, 8, WINDOW).unwrap();
    let opts = LoadOptions {
        lora: Some(LoraConfig::new(2, 4.0, 0.0, false, &["all-linear"]).unwrap()),
        seed: 9,
        ..Default::default()
    };
    let mut m = Gemma2Model::random(be, cfg, &opts).unwrap();
    for id in m.lora_ids() {
        if let ParamId::LoraB { .. } = id {
            let name = id.name();
            let n = m.get_tensor(&name).unwrap().len();
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.02)
                .collect();
            m.set_tensor(&name, &v).unwrap();
        }
    }
    m
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn lens<B: Backend>(d: &Decoder<'_, B>) -> Vec<usize> {
    (0..3).map(|l| d.cache().layer_len(l)).collect()
}

/// A failure at any point of a step (the cache copy or the attention of a middle layer, after the
/// first layer already replaced its buffers; the head, after every layer did) leaves the cache as it
/// was: same lengths, same position, and the following steps give bit-identical logits to a decoder
/// that never failed. Covers a prefill chunk that crosses the window and single-token decode steps.
#[test]
fn a_failed_step_leaves_the_cache_unchanged() {
    let be = Arc::new(Flaky::default());
    let m = model(be.clone());
    let prompt = [2, 17, 5, 33, 8];
    let steps = [vec![40, 3, 11], vec![7], vec![21], vec![9, 9]];

    // Reference: no failures.
    let mut good = Decoder::new(&m);
    let mut want = vec![good.feed(&prompt).unwrap()];
    for s in &steps {
        want.push(good.feed(s).unwrap());
    }

    // Per layer: 2 copy_range (k: cached rows, new rows) + 2 (v) when the cache is non-empty.
    // (op, n-th call of the step that fails): layer 1's first copy, layer 1's attention, layer 2's
    // last copy, the head, and the first layer's very first allocation.
    let failures: [(&str, usize); 5] = [
        ("copy_range", 4),
        ("attn_fwd", 1),
        ("copy_range", 11),
        ("matmul_xwt", 0),
        ("zeros", 0),
    ];
    for (op, at) in failures {
        let mut dec = Decoder::new(&m);
        let got0 = dec.feed(&prompt).unwrap();
        assert_eq!(bits(&got0), bits(&want[0]));
        for (i, s) in steps.iter().enumerate() {
            let (pos, before) = (dec.position(), lens(&dec));
            be.arm(op, at);
            let err = dec.feed(s).unwrap_err().to_string();
            be.disarm();
            assert!(err.contains("injected failure"), "{op}#{at}: {err}");
            assert_eq!(dec.position(), pos, "{op}#{at} step {i}: position");
            assert_eq!(lens(&dec), before, "{op}#{at} step {i}: layer lengths");
            let got = dec.feed(s).unwrap();
            assert_eq!(bits(&got), bits(&want[i + 1]), "{op}#{at} step {i}: logits");
        }
        // Sliding layers hold the last W entries, the full layer everything.
        let total = prompt.len() + steps.iter().map(Vec::len).sum::<usize>();
        assert_eq!(lens(&dec), vec![WINDOW, total, WINDOW]);
    }
}

/// reset() forgets the sequence: the next feed is a fresh start.
#[test]
fn reset_starts_over() {
    let m = model(Arc::new(Cpu));
    let mut dec = Decoder::new(&m);
    let first = dec.feed(&[2, 17, 5]).unwrap();
    dec.feed(&[4]).unwrap();
    dec.reset();
    assert_eq!((dec.position(), lens(&dec)), (0, vec![0, 0, 0]));
    assert_eq!(bits(&dec.feed(&[2, 17, 5]).unwrap()), bits(&first));
}

/// Generation on the CUDA backend follows the CPU decoder: the same greedy tokens and, step by step,
/// logits within f32 kernel differences (f32 activations), with the same cache lengths.
#[cfg(feature = "cuda")]
#[test]
fn cuda_decoder_follows_the_cpu() {
    use afinar_gemma::generate::{generate, GenerateOptions};
    use afinar_kernels::cuda::Cuda;
    use afinar_kernels::Tolerance;
    let cuda = match Cuda::try_new() {
        Ok(Some(c)) => c,
        Ok(None) => {
            eprintln!("skipped: no CUDA driver");
            return;
        }
        Err(e) => panic!("the CUDA backend failed to start: {e}"),
    };
    let (mc, mg) = (model(Arc::new(Cpu)), model(Arc::new(cuda)));
    let (mut dc, mut dg) = (Decoder::new(&mc), Decoder::new(&mg));
    let mut seq = vec![2, 17, 5, 33, 8];
    let (mut lc, mut lg) = (dc.feed(&seq).unwrap(), dg.feed(&seq).unwrap());
    for step in 0..12 {
        let max = lc.iter().fold(0.0f64, |a, &x| a.max(f64::from(x).abs()));
        Tolerance::new(1e-3 * max + 1e-5, 1e-3).assert_close(
            &format!("step {step}"),
            lg.iter().copied(),
            lc.iter().map(|&x| f64::from(x)),
        );
        assert_eq!(lens(&dg), lens(&dc), "step {step}");
        let next = lc
            .iter()
            .enumerate()
            .fold(0, |b, (i, &x)| if x > lc[b] { i } else { b }) as i32;
        seq.push(next);
        (lc, lg) = (dc.feed(&[next]).unwrap(), dg.feed(&[next]).unwrap());
    }
    let opts = GenerateOptions::greedy(10);
    assert_eq!(
        generate(&mg, &[2, 17, 5], &opts).unwrap().tokens,
        generate(&mc, &[2, 17, 5], &opts).unwrap().tokens
    );
}
