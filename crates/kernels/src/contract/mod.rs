//! Each op's argument contract, written once and checked by every backend before it computes: the
//! CPU op functions (`cpu/<family>.rs`) and the CUDA ones (`cuda/<family>.rs`) start with the same call
//! here, so both report the same `KernelError` (op, argument and message) for the same bad input.
//! `tests/it/ops_errors.rs` runs one body against both backends and compares their messages.
//!
//! The checks only see lengths, dims and scalars, never buffer contents, with one exception: token
//! ids, labels and positions must lie in range (an out-of-range id would index outside a table).
//! They are read through [`IdsView`]: a backend records an [`IdStats`] summary (min, max, the range
//! of the scored labels, their count) when the ids are built from host data (`ids_from_host`), so a
//! device backend checks ranges without reading device memory; only when the summary shows a bad
//! value does the cold error path fetch the values to name the first bad one. The ids of a backend
//! are immutable after upload (no op writes them), so the summary stays true.
//!
//! Order: every function checks in the order its op's arguments are listed in `Backend`, dims and
//! overflow first; the first failure is the error.

mod linear;

pub use linear::*;

use crate::backend::AttnShape;
use crate::error::{check_len, ensure, KernelError, Result};

/// The label value that marks a row without loss (torch's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

// ---- ids ----------------------------------------------------------------------------------------

/// A summary of an ids buffer, taken once from its host values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdStats {
    /// Smallest and largest value (`i32::MAX`, `i32::MIN` when empty).
    pub min: i32,
    pub max: i32,
    /// Smallest and largest value other than [`IGNORE_INDEX`] (same sentinels when there is none).
    pub label_min: i32,
    pub label_max: i32,
    /// Number of values other than [`IGNORE_INDEX`] (the scored rows of a label buffer).
    pub scored: usize,
}

impl IdStats {
    pub fn of(ids: &[i32]) -> IdStats {
        let mut s = IdStats {
            min: i32::MAX,
            max: i32::MIN,
            label_min: i32::MAX,
            label_max: i32::MIN,
            scored: 0,
        };
        for &x in ids {
            s.min = s.min.min(x);
            s.max = s.max.max(x);
            if x != IGNORE_INDEX {
                s.label_min = s.label_min.min(x);
                s.label_max = s.label_max.max(x);
                s.scored += 1;
            }
        }
        s
    }
}

/// What the contract reads of an ids argument.
pub trait IdsView {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn stats(&self) -> IdStats;
    /// The values on the host. Only called on the error path, to name the first bad value.
    fn host_values(&self) -> Result<Vec<i32>>;
}

impl IdsView for [i32] {
    fn len(&self) -> usize {
        <[i32]>::len(self)
    }
    fn stats(&self) -> IdStats {
        IdStats::of(self)
    }
    fn host_values(&self) -> Result<Vec<i32>> {
        Ok(self.to_vec())
    }
}

/// The first value failing `ok`, with its index (the cold path of the range checks).
fn first_bad(ids: &(impl IdsView + ?Sized), ok: impl Fn(i32) -> bool) -> Result<(usize, i32)> {
    let values = ids.host_values()?;
    values
        .iter()
        .copied()
        .enumerate()
        .find(|&(_, x)| !ok(x))
        .ok_or_else(|| KernelError::Backend {
            backend: "contract",
            msg: "internal: the ids summary disagrees with the ids".into(),
        })
}

fn in_vocab(x: i32, v: usize) -> bool {
    x >= 0 && (x as usize) < v
}

/// Token ids in [0, V) (embedding).
fn check_ids(op: &'static str, ids: &(impl IdsView + ?Sized), v: usize) -> Result<()> {
    let s = ids.stats();
    if ids.is_empty() || (in_vocab(s.min, v) && in_vocab(s.max, v)) {
        return Ok(());
    }
    let (i, t) = first_bad(ids, |x| in_vocab(x, v))?;
    Err(KernelError::Invalid {
        op,
        arg: "ids",
        msg: format!("token id {t} at row {i} is outside the vocabulary [0, {v})"),
    })
}

/// Labels that are −100 or in [0, V); returns the count of scored rows.
fn check_labels(op: &'static str, labels: &(impl IdsView + ?Sized), v: usize) -> Result<usize> {
    let s = labels.stats();
    if s.scored == 0 || (in_vocab(s.label_min, v) && in_vocab(s.label_max, v)) {
        return Ok(s.scored);
    }
    let (i, y) = first_bad(labels, |x| x == IGNORE_INDEX || in_vocab(x, v))?;
    Err(KernelError::Invalid {
        op,
        arg: "labels",
        msg: format!("label {y} at row {i} is neither -100 nor inside the vocabulary [0, {v})"),
    })
}

// ---- memory and elementwise ---------------------------------------------------------------------

pub fn copy(src: usize, dst: usize) -> Result<()> {
    check_len("copy", "dst", dst, src, || format!("[len={src}]"))
}

/// [off, off + n) inside a buffer of `len` elements, without overflow; `arg` names the offset.
pub fn check_range(
    op: &'static str,
    arg: &'static str,
    off: usize,
    n: usize,
    len: usize,
) -> Result<()> {
    match off.checked_add(n) {
        Some(end) if end <= len => Ok(()),
        _ => Err(KernelError::Invalid {
            op,
            arg,
            msg: format!("range [{off}, {off} + {n}) is outside a buffer of {len} elements"),
        }),
    }
}

pub fn copy_range(src: usize, src_off: usize, dst: usize, dst_off: usize, n: usize) -> Result<()> {
    check_range("copy_range", "src_off", src_off, n, src)?;
    check_range("copy_range", "dst_off", dst_off, n, dst)
}

/// A drop probability in [0, 1).
pub fn check_p(op: &'static str, p: f64) -> Result<()> {
    ensure(op, "p", p.is_finite() && (0.0..1.0).contains(&p), || {
        format!("drop probability {p} is not in [0, 1)")
    })
}

pub fn axpy(x: usize, y: usize) -> Result<()> {
    check_len("axpy", "y", y, x, || format!("[len={x}]"))
}

pub fn mul(x: usize, m: usize) -> Result<()> {
    check_len("mul", "m", m, x, || format!("[len={x}]"))
}

// ---- norms and pointwise ------------------------------------------------------------------------

fn rmsnorm_dims(op: &'static str, n: usize, h: usize) -> Result<()> {
    ensure(op, "h", h > 0 || n == 0, || "H must be > 0".to_string())?;
    ensure(op, "n", n.checked_mul(h).is_some(), || {
        format!("N·H = {n}·{h} overflows")
    })
}

/// x `[N,H]`, w `[H]`, y `[N,H]`, rstd `[N]`; eps finite and ≥ 0.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_fwd(
    x: usize,
    w: usize,
    y: usize,
    rstd: usize,
    n: usize,
    h: usize,
    eps: f32,
) -> Result<()> {
    const OP: &str = "rmsnorm_fwd";
    rmsnorm_dims(OP, n, h)?;
    let shape = || format!("[N={n}, H={h}]");
    check_len(OP, "x", x, n * h, shape)?;
    check_len(OP, "w", w, h, shape)?;
    check_len(OP, "y", y, n * h, shape)?;
    check_len(OP, "rstd", rstd, n, shape)?;
    ensure(OP, "eps", eps.is_finite() && eps >= 0.0, || {
        format!("eps must be finite and ≥ 0, got {eps}")
    })
}

/// dy, x `[N,H]`, w `[H]`, rstd `[N]`, dx `[N,H]`, dw `[H]`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_bwd(
    dy: usize,
    x: usize,
    w: usize,
    rstd: usize,
    dx: usize,
    dw: Option<usize>,
    n: usize,
    h: usize,
) -> Result<()> {
    const OP: &str = "rmsnorm_bwd";
    rmsnorm_dims(OP, n, h)?;
    let shape = || format!("[N={n}, H={h}]");
    check_len(OP, "dy", dy, n * h, shape)?;
    check_len(OP, "x", x, n * h, shape)?;
    check_len(OP, "w", w, h, shape)?;
    check_len(OP, "rstd", rstd, n, shape)?;
    check_len(OP, "dx", dx, n * h, shape)?;
    if let Some(dw) = dw {
        check_len(OP, "dw", dw, h, shape)?;
    }
    Ok(())
}

/// x `[N, heads, D]` with D even, positions `[N]` ≥ 0, theta finite and > 0.
pub fn rope(
    x: usize,
    pos: &(impl IdsView + ?Sized),
    n: usize,
    heads: usize,
    d: usize,
    theta: f32,
) -> Result<()> {
    const OP: &str = "rope";
    ensure(OP, "d", d > 0 && d.is_multiple_of(2), || {
        format!("head dim D must be even and > 0, got {d}")
    })?;
    ensure(OP, "heads", heads > 0, || "heads must be > 0".to_string())?;
    ensure(OP, "theta", theta.is_finite() && theta > 0.0, || {
        format!("theta must be finite and > 0, got {theta}")
    })?;
    let row = heads.checked_mul(d).filter(|r| r.checked_mul(n).is_some());
    ensure(OP, "n", row.is_some(), || {
        format!("N·heads·D = {n}·{heads}·{d} overflows")
    })?;
    let shape = || format!("[N={n}, heads={heads}, D={d}]");
    check_len(OP, "x", x, n * heads * d, shape)?;
    check_len(OP, "pos", pos.len(), n, shape)?;
    if n == 0 || pos.stats().min >= 0 {
        return Ok(());
    }
    let (i, p) = first_bad(pos, |p| p >= 0)?;
    Err(KernelError::Invalid {
        op: OP,
        arg: "pos",
        msg: format!("position {p} at token {i} is negative"),
    })
}

pub fn geglu_fwd(gate: usize, up: usize, out: usize) -> Result<()> {
    let shape = || format!("[len={gate}]");
    check_len("geglu_fwd", "up", up, gate, shape)?;
    check_len("geglu_fwd", "out", out, gate, shape)
}

pub fn geglu_bwd(dout: usize, gate: usize, up: usize, dgate: usize, dup: usize) -> Result<()> {
    let shape = || format!("[len={gate}]");
    check_len("geglu_bwd", "dout", dout, gate, shape)?;
    check_len("geglu_bwd", "up", up, gate, shape)?;
    check_len("geglu_bwd", "dgate", dgate, gate, shape)?;
    check_len("geglu_bwd", "dup", dup, gate, shape)
}

/// A soft-cap c: finite and > 0.
pub fn check_cap(op: &'static str, cap: f32) -> Result<()> {
    ensure(op, "cap", cap.is_finite() && cap > 0.0, || {
        format!("soft-cap must be finite and > 0, got {cap}")
    })
}

pub fn softcap_fwd(cap: f32) -> Result<()> {
    check_cap("softcap_fwd", cap)
}

pub fn softcap_bwd(y: usize, dy: usize, cap: f32) -> Result<()> {
    check_cap("softcap_bwd", cap)?;
    check_len("softcap_bwd", "dy", dy, y, || format!("[len={y}]"))
}

// ---- attention ----------------------------------------------------------------------------------

fn attn_q_shape(s: &AttnShape) -> String {
    format!("[B={}, T={}, NH={}, D={}]", s.b, s.t, s.nh, s.d)
}

fn attn_k_shape(s: &AttnShape) -> String {
    format!("[B={}, TK={}, NKV={}, D={}]", s.b, s.tk, s.nkv, s.d)
}

/// The geometry, then q `[B,T,NH,D]`, k and v `[B,TK,NKV,D]`, seg `[B·TK]`.
fn attn_common(
    op: &'static str,
    s: &AttnShape,
    q: usize,
    k: usize,
    v: usize,
    seg: Option<usize>,
) -> Result<()> {
    ensure(
        op,
        "nkv",
        s.nkv > 0 && s.nh > 0 && s.nh.is_multiple_of(s.nkv),
        || format!("NH={} must be a positive multiple of NKV={}", s.nh, s.nkv),
    )?;
    ensure(op, "d", s.d > 0, || "head dim D must be > 0".to_string())?;
    ensure(op, "tk", s.tk >= s.t, || {
        format!(
            "TK={} must be ≥ T={} (queries are the last T keys)",
            s.tk, s.t
        )
    })?;
    ensure(op, "window", s.window != Some(0), || {
        "a sliding window of 0 keys hides every key".to_string()
    })?;
    ensure(op, "scale", s.scale.is_finite(), || {
        format!("scale must be finite, got {}", s.scale)
    })?;
    if let Some(c) = s.softcap {
        ensure(op, "softcap", c.is_finite() && c > 0.0, || {
            format!("soft-cap must be finite and > 0, got {c}")
        })?;
    }
    let size = |dims: [usize; 4]| dims.iter().try_fold(1usize, |a, &x| a.checked_mul(x));
    let (Some(qn), Some(kn)) = (size([s.b, s.t, s.nh, s.d]), size([s.b, s.tk, s.nkv, s.d])) else {
        return Err(KernelError::Invalid {
            op,
            arg: "shape",
            msg: format!("{s:?} overflows usize"),
        });
    };
    check_len(op, "q", q, qn, || attn_q_shape(s))?;
    check_len(op, "k", k, kn, || attn_k_shape(s))?;
    check_len(op, "v", v, kn, || attn_k_shape(s))?;
    if let Some(seg) = seg {
        check_len(op, "seg", seg, s.b * s.tk, || {
            format!("[B={}, TK={}]", s.b, s.tk)
        })?;
    }
    Ok(())
}

/// q, k, v, seg, out `[B,T,NH,D]`, lse `[B,NH,T]`.
pub fn attn_fwd(
    q: usize,
    k: usize,
    v: usize,
    seg: Option<usize>,
    out: usize,
    lse: usize,
    s: &AttnShape,
) -> Result<()> {
    const OP: &str = "attn_fwd";
    attn_common(OP, s, q, k, v, seg)?;
    check_len(OP, "out", out, q, || attn_q_shape(s))?;
    check_len(OP, "lse", lse, s.b * s.nh * s.t, || {
        format!("[B={}, NH={}, T={}]", s.b, s.nh, s.t)
    })
}

/// The forward's arguments, dout like out, dq like q, dk and dv like k; TK = T.
#[allow(clippy::too_many_arguments)]
pub fn attn_bwd(
    q: usize,
    k: usize,
    v: usize,
    seg: Option<usize>,
    out: usize,
    lse: usize,
    dout: usize,
    dq: usize,
    dk: usize,
    dv: usize,
    s: &AttnShape,
) -> Result<()> {
    const OP: &str = "attn_bwd";
    attn_common(OP, s, q, k, v, seg)?;
    ensure(OP, "tk", s.tk == s.t, || {
        format!("the backward needs TK = T, got TK={} T={}", s.tk, s.t)
    })?;
    check_len(OP, "out", out, q, || attn_q_shape(s))?;
    check_len(OP, "dout", dout, q, || attn_q_shape(s))?;
    check_len(OP, "lse", lse, s.b * s.nh * s.t, || {
        format!("[B={}, NH={}, T={}]", s.b, s.nh, s.t)
    })?;
    check_len(OP, "dq", dq, q, || attn_q_shape(s))?;
    check_len(OP, "dk", dk, k, || attn_k_shape(s))?;
    check_len(OP, "dv", dv, v, || attn_k_shape(s))
}

// ---- embedding and loss -------------------------------------------------------------------------

/// The dims, then two buffers in the op's argument order, each (name, length, rows: V or N), then
/// the ids.
fn embedding(
    op: &'static str,
    ids: &(impl IdsView + ?Sized),
    v: usize,
    h: usize,
    bufs: [(&'static str, usize, usize); 2],
) -> Result<()> {
    let n = ids.len();
    ensure(
        op,
        "h",
        n.checked_mul(h).is_some() && v.checked_mul(h).is_some(),
        || format!("N={n}, V={v}, H={h} overflow"),
    )?;
    for (arg, len, rows) in bufs {
        check_len(op, arg, len, rows * h, || format!("[N={n}, V={v}, H={h}]"))?;
    }
    check_ids(op, ids, v)
}

/// ids `[N]` in [0, V), table `[V,H]`, out `[N,H]` (N = the number of ids).
pub fn embedding_fwd(
    ids: &(impl IdsView + ?Sized),
    table: usize,
    out: usize,
    v: usize,
    h: usize,
) -> Result<()> {
    let n = ids.len();
    embedding(
        "embedding_fwd",
        ids,
        v,
        h,
        [("table", table, v), ("out", out, n)],
    )
}

/// ids `[N]` in [0, V), dout `[N,H]`, dtable `[V,H]`.
pub fn embedding_bwd(
    ids: &(impl IdsView + ?Sized),
    dout: usize,
    dtable: usize,
    v: usize,
    h: usize,
) -> Result<()> {
    let n = ids.len();
    embedding(
        "embedding_bwd",
        ids,
        v,
        h,
        [("dout", dout, n), ("dtable", dtable, v)],
    )
}

/// logits `[N,V]`, labels `[N]`, soft-cap, dlogits `[N,V]`. Returns the count of scored rows.
pub fn cross_entropy(
    logits: usize,
    labels: &(impl IdsView + ?Sized),
    n: usize,
    v: usize,
    softcap: Option<f32>,
    dlogits: Option<usize>,
) -> Result<usize> {
    const OP: &str = "cross_entropy";
    ensure(OP, "v", v > 0 && n.checked_mul(v).is_some(), || {
        format!("V={v} must be > 0 and N·V must fit")
    })?;
    let shape = || format!("[N={n}, V={v}]");
    check_len(OP, "logits", logits, n * v, shape)?;
    check_len(OP, "labels", labels.len(), n, shape)?;
    if let Some(c) = softcap {
        check_cap(OP, c)?;
    }
    let scored = check_labels(OP, labels, v)?;
    if let Some(d) = dlogits {
        check_len(OP, "dlogits", d, n * v, shape)?;
    }
    Ok(scored)
}

/// hidden `[N,H]`, emb `[V,H]`, labels `[N]`, soft-cap, dhidden `[N,H]`, demb `[V,H]`. Returns the count of
/// scored rows.
#[allow(clippy::too_many_arguments)]
pub fn lm_head_ce(
    hidden: usize,
    emb: usize,
    labels: &(impl IdsView + ?Sized),
    n: usize,
    h: usize,
    v: usize,
    softcap: Option<f32>,
    dhidden: Option<usize>,
    demb: Option<usize>,
) -> Result<usize> {
    const OP: &str = "lm_head_ce";
    ensure(OP, "h", h > 0, || "H must be > 0".to_string())?;
    ensure(
        OP,
        "v",
        v > 0 && n.checked_mul(h).is_some() && v.checked_mul(h).is_some(),
        || format!("V={v} must be > 0 and N·H, V·H must fit (N={n}, H={h})"),
    )?;
    let shape = || format!("[N={n}, H={h}, V={v}]");
    check_len(OP, "hidden", hidden, n * h, shape)?;
    check_len(OP, "emb", emb, v * h, shape)?;
    check_len(OP, "labels", labels.len(), n, shape)?;
    if let Some(d) = dhidden {
        check_len(OP, "dhidden", d, n * h, shape)?;
    }
    if let Some(d) = demb {
        check_len(OP, "demb", d, v * h, shape)?;
    }
    if let Some(c) = softcap {
        check_cap(OP, c)?;
    }
    check_labels(OP, labels, v)
}

// ---- optimizer ----------------------------------------------------------------------------------

/// p, g, m, v of one length (the hyper-parameters are checked by `AdamScalars::new`).
pub fn adamw(p: usize, g: usize, m: usize, v: usize) -> Result<()> {
    const OP: &str = "adamw";
    let shape = || format!("[len={p}]");
    check_len(OP, "g", g, p, shape)?;
    check_len(OP, "m", m, p, shape)?;
    check_len(OP, "v", v, p, shape)
}

pub fn adam_state_from_host(m: usize, v: usize) -> Result<()> {
    check_len("adam_state_from_host", "v", v, m, || {
        format!("[len(m)={m}]")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_stats_record_range_and_scored_labels() {
        let s = IdStats::of(&[3, -100, 7, 0, -100]);
        assert_eq!((s.min, s.max), (-100, 7));
        assert_eq!((s.label_min, s.label_max, s.scored), (0, 7, 3));
        let e = IdStats::of(&[]);
        assert_eq!((e.min, e.max, e.scored), (i32::MAX, i32::MIN, 0));
        let ignored = IdStats::of(&[-100, -100]);
        assert_eq!((ignored.label_min, ignored.scored), (i32::MAX, 0));
    }

    #[test]
    fn range_errors_name_the_first_bad_value() {
        let e = embedding_fwd(&[1, 5, 9][..], 15, 9, 5, 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("token id 5 at row 1"), "{e}");
        let n = cross_entropy(8, &[-100, 4][..], 2, 4, None, None)
            .unwrap_err()
            .to_string();
        assert!(n.contains("label 4 at row 1"), "{n}");
        assert_eq!(
            cross_entropy(8, &[-100, 3][..], 2, 4, None, None).unwrap(),
            1
        );
        let p = rope(4, &[0, -2][..], 2, 1, 2, 1e4).unwrap_err().to_string();
        assert!(p.contains("position -2 at token 1"), "{p}");
    }
}
