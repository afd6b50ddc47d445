// attention.cu — causal softmax attention, flash-style in memory (online softmax; the T×TK score matrix
// never exists), with Gemma-2's soft-cap, sliding window, GQA and packed-sample segment ids.
//
// Semantics (crates/kernels/src/backend.rs, AttnShape): query i of T sits at absolute position
// qpos = TK − T + i; it sees key j iff j ≤ qpos, qpos − j < W (when a window is set) and
// seg[b, j] == seg[b, qpos] (when segment ids are given). Query head h reads kv head h / (NH/NKV).
//   z = scale·(q·k);  s = cap·tanh(z/cap) (cap > 0) else z;  P = softmax_j(s);  out = P·V;
//   lse = log Σ_j exp(s_j) (saved for the backward).
// Backward (TK == T): Δ_i = Σ_d dO_i·O_i; p = exp(s − lse_i); dv_j += p·dO_i; dp = dO_i·v_j;
//   ds = p·(dp − Δ_i); dz = ds·(1 − (s/cap)²) (cap > 0); dq_i += dz·scale·k_j; dk_j += dz·scale·q_i.
//
// Layouts: q, out, dout, dq [B, T, NH, D]; k, v, dk, dv [B, TK, NKV, D]; lse, delta [B, NH, T];
// seg [B·TK] i32 (has_seg = 0: not read). f32/bf16 by tag; D ≤ 256.
// Launch geometry (launch::plan_attention): one warp per (b, query, head) row — or per (b, key, kv head)
// for dk/dv — 4 warps per block, grid.x = ceil(rows/4). Lane ℓ owns dims ℓ, ℓ+32, … (≤ 8 registers);
// each q·k is a 5-step shuffle reduction. Outputs are written once, no atomics, deterministic.
// This is the correctness-first version on CUDA cores; the tensor-core (mma.sync) tiled version with
// K/V tiles in shared memory is the next step (see kernels/README.md).

#define MAXD 8  // 256 / 32 dims per lane

struct AttnDims {
    int b, t, tk, nh, nkv, d;
};

__device__ __forceinline__ float cap_score(float z, float cap) { return cap > 0.0f ? cap * tanhf(z / cap) : z; }

__device__ __forceinline__ bool visible(int qpos, int j, int window, const int* seg, int has_seg, i64 segbase, int segq) {
    if (j > qpos) return false;
    if (window > 0 && qpos - j >= window) return false;
    if (has_seg && seg[segbase + j] != segq) return false;
    return true;
}

// afinar:hot
extern "C" __global__ void attn_fwd_k(const void* q, int qdt, const void* k, int kdt, const void* v, int vdt,
                                      const int* seg, int has_seg, void* out, int odt, void* lse, int ldt, int b, int t,
                                      int tk, int nh, int nkv, int d, float scale, float cap, int window) {
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);  // ((bi·T + i)·NH + h)
    if (row >= (i64)b * t * nh) return;
    const int h = (int)(row % nh);
    const int i = (int)((row / nh) % t);
    const int bi = (int)(row / ((i64)nh * t));
    const int kvh = h / (nh / nkv);
    const int qpos = tk - t + i;
    const i64 segbase = (i64)bi * tk;
    const int segq = has_seg ? seg[segbase + qpos] : 0;
    float qr[MAXD], o[MAXD];
#pragma unroll
    for (int u = 0; u < MAXD; ++u) {
        const int dd = lane + 32 * u;
        qr[u] = dd < d ? ld(q, qdt, row * d + dd) : 0.0f;
        o[u] = 0.0f;
    }
    float mx = -INFINITY, l = 0.0f;
    const int lo = window > 0 ? max(0, qpos - window + 1) : 0;
    for (int j = lo; j <= qpos; ++j) {
        if (!visible(qpos, j, window, seg, has_seg, segbase, segq)) continue;
        const i64 kb = (((i64)bi * tk + j) * nkv + kvh) * d;
        float part = 0.0f;
#pragma unroll
        for (int u = 0; u < MAXD; ++u) {
            const int dd = lane + 32 * u;
            if (dd < d) part += qr[u] * ld(k, kdt, kb + dd);
        }
        const float s = cap_score(warp_sum(part) * scale, cap);
        const float mn = fmaxf(mx, s);
        const float corr = expf(mx - mn);  // exp(−inf) = 0 on the first visible key
        const float p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int u = 0; u < MAXD; ++u) {
            const int dd = lane + 32 * u;
            if (dd < d) o[u] = o[u] * corr + p * ld(v, vdt, kb + dd);
        }
        mx = mn;
    }
    // Key qpos itself is always visible, so l ≥ 1 here.
    const float inv = 1.0f / l;
#pragma unroll
    for (int u = 0; u < MAXD; ++u) {
        const int dd = lane + 32 * u;
        if (dd < d) st(out, odt, row * d + dd, o[u] * inv);
    }
    if (lane == 0) st(lse, ldt, ((i64)bi * nh + h) * t + i, mx + logf(l));
}

// delta[bi, h, i] = Σ_d dout·out (f32 scratch).
extern "C" __global__ void attn_bwd_delta_k(const void* out, int odt, const void* dout, int ddt, float* delta, int b, int t,
                                            int nh, int d) {
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (i64)b * t * nh) return;
    const int h = (int)(row % nh);
    const int i = (int)((row / nh) % t);
    const int bi = (int)(row / ((i64)nh * t));
    float part = 0.0f;
    for (int dd = lane; dd < d; dd += 32) part += ld(out, odt, row * d + dd) * ld(dout, ddt, row * d + dd);
    part = warp_sum(part);
    if (lane == 0) delta[((i64)bi * nh + h) * t + i] = part;
}

// afinar:hot
extern "C" __global__ void attn_bwd_dq_k(const void* q, int qdt, const void* k, int kdt, const void* v, int vdt,
                                         const int* seg, int has_seg, const void* lse, int ldt, const float* delta,
                                         const void* dout, int ddt, void* dq, int dqdt, int b, int t, int nh, int nkv, int d,
                                         float scale, float cap, int window) {
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (i64)b * t * nh) return;
    const int h = (int)(row % nh);
    const int i = (int)((row / nh) % t);
    const int bi = (int)(row / ((i64)nh * t));
    const int kvh = h / (nh / nkv);
    const i64 segbase = (i64)bi * t;
    const int segq = has_seg ? seg[segbase + i] : 0;
    const i64 lrow = ((i64)bi * nh + h) * t + i;
    const float lse_i = ld(lse, ldt, lrow), delta_i = delta[lrow];
    float qr[MAXD], dor[MAXD], acc[MAXD];
#pragma unroll
    for (int u = 0; u < MAXD; ++u) {
        const int dd = lane + 32 * u;
        qr[u] = dd < d ? ld(q, qdt, row * d + dd) : 0.0f;
        dor[u] = dd < d ? ld(dout, ddt, row * d + dd) : 0.0f;
        acc[u] = 0.0f;
    }
    const int lo = window > 0 ? max(0, i - window + 1) : 0;
    for (int j = lo; j <= i; ++j) {
        if (!visible(i, j, window, seg, has_seg, segbase, segq)) continue;
        const i64 kb = (((i64)bi * t + j) * nkv + kvh) * d;
        float pq = 0.0f, pd = 0.0f;
#pragma unroll
        for (int u = 0; u < MAXD; ++u) {
            const int dd = lane + 32 * u;
            if (dd < d) {
                pq += qr[u] * ld(k, kdt, kb + dd);
                pd += dor[u] * ld(v, vdt, kb + dd);
            }
        }
        const float s = cap_score(warp_sum(pq) * scale, cap);
        const float dp = warp_sum(pd);
        const float p = expf(s - lse_i);
        float dz = p * (dp - delta_i);
        if (cap > 0.0f) {
            const float tt = s / cap;
            dz *= 1.0f - tt * tt;
        }
#pragma unroll
        for (int u = 0; u < MAXD; ++u) {
            const int dd = lane + 32 * u;
            if (dd < d) acc[u] += dz * scale * ld(k, kdt, kb + dd);
        }
    }
#pragma unroll
    for (int u = 0; u < MAXD; ++u) {
        const int dd = lane + 32 * u;
        if (dd < d) st(dq, dqdt, row * d + dd, acc[u]);
    }
}

// One warp per (bi, key j, kv head): sums over the NH/NKV query heads of its group and every query that
// sees key j. Writes dk, dv.
// afinar:hot
extern "C" __global__ void attn_bwd_dkv_k(const void* q, int qdt, const void* k, int kdt, const void* v, int vdt,
                                          const int* seg, int has_seg, const void* lse, int ldt, const float* delta,
                                          const void* dout, int ddt, void* dk, int dkdt, void* dv, int dvdt, int b, int t,
                                          int nh, int nkv, int d, float scale, float cap, int window) {
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);  // ((bi·T + j)·NKV + kvh)
    if (row >= (i64)b * t * nkv) return;
    const int kvh = (int)(row % nkv);
    const int j = (int)((row / nkv) % t);
    const int bi = (int)(row / ((i64)nkv * t));
    const int group = nh / nkv;
    const i64 segbase = (i64)bi * t;
    const int segk = has_seg ? seg[segbase + j] : 0;
    float kr[MAXD], vr[MAXD], dkacc[MAXD], dvacc[MAXD];
#pragma unroll
    for (int u = 0; u < MAXD; ++u) {
        const int dd = lane + 32 * u;
        kr[u] = dd < d ? ld(k, kdt, row * d + dd) : 0.0f;
        vr[u] = dd < d ? ld(v, vdt, row * d + dd) : 0.0f;
        dkacc[u] = 0.0f;
        dvacc[u] = 0.0f;
    }
    const int hi = window > 0 ? min(t - 1, j + window - 1) : t - 1;
    for (int i = j; i <= hi; ++i) {
        if (has_seg && seg[segbase + i] != segk) continue;
        for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
            const i64 qrow = ((i64)bi * t + i) * nh + h;
            const i64 lrow = ((i64)bi * nh + h) * t + i;
            float pq = 0.0f, pd = 0.0f;
#pragma unroll
            for (int u = 0; u < MAXD; ++u) {
                const int dd = lane + 32 * u;
                if (dd < d) {
                    pq += ld(q, qdt, qrow * d + dd) * kr[u];
                    pd += ld(dout, ddt, qrow * d + dd) * vr[u];
                }
            }
            const float s = cap_score(warp_sum(pq) * scale, cap);
            const float dp = warp_sum(pd);
            const float p = expf(s - ld(lse, ldt, lrow));
            float dz = p * (dp - delta[lrow]);
            if (cap > 0.0f) {
                const float tt = s / cap;
                dz *= 1.0f - tt * tt;
            }
#pragma unroll
            for (int u = 0; u < MAXD; ++u) {
                const int dd = lane + 32 * u;
                if (dd < d) {
                    dvacc[u] += p * ld(dout, ddt, qrow * d + dd);
                    dkacc[u] += dz * scale * ld(q, qdt, qrow * d + dd);
                }
            }
        }
    }
#pragma unroll
    for (int u = 0; u < MAXD; ++u) {
        const int dd = lane + 32 * u;
        if (dd < d) {
            st(dk, dkdt, row * d + dd, dkacc[u]);
            st(dv, dvdt, row * d + dd, dvacc[u]);
        }
    }
}
