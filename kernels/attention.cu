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
// seg [B·TK] i32 (has_seg = 0: not read). f32/bf16/f16 by tag; D ≤ 256.
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

// ---------------------------------------------------------------------------------------------------
// Tensor-core forward (mma.sync m16n8k16, bf16 operands, f32 accumulate and softmax), for head dims
// D ∈ {16, 32, 64, 128, 256}; same semantics and outputs as attn_fwd_k (which stays the path for other
// D and the reference in the checks).
// Launch geometry (launch::plan_attention_mma): grid = (ceil(T/64), B·NH), 128 threads = 4 warps, warp w
// owns queries i0 + 16w … i0 + 16w + 15 of one (b, h). Key tiles of 16 keys are staged in shared
// memory, K then V through the same buffer: Q tile [64][D+8] + K/V tile [16][D+8] bf16 (42 KiB at
// D = 256; rows padded by 8 so fragment loads are bank-conflict free). Per key tile a warp computes
// S = Q·Kᵀ (16×16, two n8 tiles), applies scale, soft-cap and the masks, updates the online softmax
// (row max/sum reduced over the 4 lanes of a quad), and accumulates O += P·V with P reused straight
// from the S accumulators as the A operand. O lives in registers: D/8 n8 tiles × 4 f32 per thread.
// Key tiles outside the block's causal/window range are skipped.

#define FQ 64
#define FK 16

__device__ __forceinline__ void attn_mma(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
#ifdef AFINAR_EMU
    emu_mma_bf16_16816(c, a0, a1, a2, a3, b0, b1);
#elif __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    // bf16 mma.sync needs sm_80. Below (sm_75, fp16-only GPUs) the file still compiles so the rest of
    // its kernels load; the launch code never selects a tensor-core kernel there (Cuda::bf16_mma).
    asm volatile("trap;");
#endif
}

// Copies `rows` rows of D elements (row r at src + row_off(r)) into smem [rows][D+8] as bf16; rows at or
// beyond `valid` are zero. bf16 sources with D % 8 == 0 use 16-byte copies.
template <int D>
__device__ __forceinline__ void attn_stage(bf16_t* dst, const void* src, int sdt, i64 base, i64 row_stride, int rows, int valid) {
    constexpr int DP = D + 8;
    if (sdt == DT_BF16 && (D % 8) == 0) {
        for (int idx = threadIdx.x; idx < rows * (D / 8); idx += blockDim.x) {
            const int r = idx / (D / 8), c8 = (idx % (D / 8)) * 8;
            uint4 v = {0u, 0u, 0u, 0u};
            if (r < valid) v = *(const uint4*)(((const bf16_t*)src) + base + r * row_stride + c8);
            *(uint4*)(dst + r * DP + c8) = v;
        }
    } else {
        for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
            const int r = idx / D, c = idx % D;
            dst[r * DP + c] = f2bf(r < valid ? ld(src, sdt, base + r * row_stride + c) : 0.0f);
        }
    }
}

template <int D>
__device__ __forceinline__ void attn_fwd_mma_body(const void* q, int qdt, const void* k, int kdt, const void* v, int vdt,
                                                  const int* seg, int has_seg, void* out, int odt, void* lse, int ldt, int t,
                                                  int tk, int nh, int nkv, float scale, float cap, int window) {
    constexpr int DP = D + 8;
    constexpr int NT = D / 8;
    __shared__ __align__(16) bf16_t Qs[FQ * DP];
    __shared__ __align__(16) bf16_t KVs[FK * DP];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
    const int bh = blockIdx.y, h = bh % nh, bi = bh / nh, kvh = h / (nh / nkv);
    const int i0 = blockIdx.x * FQ;
    const int off = tk - t;  // query i sits at absolute key position off + i
    const i64 qrow_stride = (i64)nh * D, krow_stride = (i64)nkv * D;
    attn_stage<D>(Qs, q, qdt, (((i64)bi * t + i0) * nh + h) * D, qrow_stride, FQ, t - i0);

    int qi[2], qa[2], segq[2];
    bool qvalid[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        qi[r] = i0 + warp * 16 + g + 8 * r;
        qvalid[r] = qi[r] < t;
        qa[r] = off + qi[r];
        segq[r] = (has_seg && qvalid[r]) ? seg[(i64)bi * tk + qa[r]] : 0;
    }
    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f};

    const int qmin = off + i0, qmax = off + min(t, i0 + FQ) - 1;
    int jlo = window > 0 ? max(0, qmin - window + 1) : 0;
    jlo = (jlo / FK) * FK;
    for (int j0 = jlo; j0 <= qmax; j0 += FK) {
        __syncthreads();  // the previous tile's V reads are done (and, first time, Q is staged)
        attn_stage<D>(KVs, k, kdt, (((i64)bi * tk + j0) * nkv + kvh) * D, krow_stride, FK, tk - j0);
        __syncthreads();
        float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
        for (int kk = 0; kk < D; kk += 16) {
            const bf16_t* pa = Qs + (warp * 16 + g) * DP + kk + 2 * t4;
            const unsigned a0 = *(const unsigned*)pa, a1 = *(const unsigned*)(pa + 8 * DP);
            const unsigned a2 = *(const unsigned*)(pa + 8), a3 = *(const unsigned*)(pa + 8 * DP + 8);
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                const bf16_t* pb = KVs + (nt * 8 + g) * DP + kk + 2 * t4;
                attn_mma(s[nt], a0, a1, a2, a3, *(const unsigned*)pb, *(const unsigned*)(pb + 8));
            }
        }
        // Scores → probabilities with the online softmax; c index q = 2·r + e: row g + 8r, key 2·t4 + e.
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mloc = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int j = j0 + nt * 8 + 2 * t4 + e;
                    float z = s[nt][2 * r + e] * scale;
                    z = cap > 0.0f ? cap * tanhf(z / cap) : z;
                    const bool vis = qvalid[r] && j < tk && j <= qa[r] && (window <= 0 || qa[r] - j < window) &&
                                     (!has_seg || seg[(i64)bi * tk + j] == segq[r]);
                    s[nt][2 * r + e] = vis ? z : -INFINITY;
                    mloc = fmaxf(mloc, s[nt][2 * r + e]);
                }
            mloc = fmaxf(mloc, __shfl_xor_sync(0xffffffffu, mloc, 1));
            mloc = fmaxf(mloc, __shfl_xor_sync(0xffffffffu, mloc, 2));
            const float mnew = fmaxf(mrow[r], mloc);
            const float mu = mnew == -INFINITY ? 0.0f : mnew;  // nothing visible yet: keep everything 0
            corr[r] = expf(mrow[r] - mu);
            float lsum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float p = expf(s[nt][2 * r + e] - mu);
                    s[nt][2 * r + e] = p;
                    lsum += p;
                }
            lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
            lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
            lrow[r] = lrow[r] * corr[r] + lsum;
            mrow[r] = mnew;
        }
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            o[n][0] *= corr[0];
            o[n][1] *= corr[0];
            o[n][2] *= corr[1];
            o[n][3] *= corr[1];
        }
        // P (16 queries × 16 keys) as the A operand: the S accumulators are already in A's layout.
        const unsigned pa0 = pack_bf16x2(s[0][0], s[0][1]), pa1 = pack_bf16x2(s[0][2], s[0][3]);
        const unsigned pa2 = pack_bf16x2(s[1][0], s[1][1]), pa3 = pack_bf16x2(s[1][2], s[1][3]);
        __syncthreads();  // K reads done: the buffer takes V
        attn_stage<D>(KVs, v, vdt, (((i64)bi * tk + j0) * nkv + kvh) * D, krow_stride, FK, tk - j0);
        __syncthreads();
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            const bf16_t* pv = KVs + (2 * t4) * DP + n * 8 + g;
            const unsigned b0 = (unsigned)pv[0] | ((unsigned)pv[DP] << 16);
            const unsigned b1 = (unsigned)pv[8 * DP] | ((unsigned)pv[9 * DP] << 16);
            attn_mma(o[n], pa0, pa1, pa2, pa3, b0, b1);
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (!qvalid[r]) continue;
        const float inv = 1.0f / lrow[r];
        const i64 orow = (((i64)bi * t + qi[r]) * nh + h) * D;
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) st(out, odt, orow + n * 8 + 2 * t4 + e, o[n][2 * r + e] * inv);
        if (t4 == 0) st(lse, ldt, ((i64)bi * nh + h) * t + qi[r], mrow[r] + logf(lrow[r]));
    }
}

#define ATTN_FWD_MMA(DIM)                                                                                         \
    extern "C" __global__ void __launch_bounds__(128) attn_fwd_mma_d##DIM##_k(                                     \
        const void* q, int qdt, const void* k, int kdt, const void* v, int vdt, const int* seg, int has_seg,       \
        void* out, int odt, void* lse, int ldt, int b, int t, int tk, int nh, int nkv, int d, float scale, float cap, \
        int window) {                                                                                              \
        attn_fwd_mma_body<DIM>(q, qdt, k, kdt, v, vdt, seg, has_seg, out, odt, lse, ldt, t, tk, nh, nkv, scale, cap, \
                               window);                                                                            \
    }

// afinar:hot attn_fwd_mma_d16_k
ATTN_FWD_MMA(16)
// afinar:hot attn_fwd_mma_d32_k
ATTN_FWD_MMA(32)
// afinar:hot attn_fwd_mma_d64_k
ATTN_FWD_MMA(64)
// afinar:hot attn_fwd_mma_d128_k
ATTN_FWD_MMA(128)
// afinar:hot attn_fwd_mma_d256_k
ATTN_FWD_MMA(256)

// ---------------------------------------------------------------------------------------------------
// Tensor-core backward (TK == T), three kernels so that no output needs atomics (deterministic):
//   dq:  warp owns 16 queries; per key tile: S = Q·Kᵀ, dP = dO·Vᵀ, dS = P⊙(dP − Δ)⊙cap', dQ += dS·K
//   dk:  warp owns 16 keys (of one kv head); per query head of its group and query tile:
//        Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ, dSᵀ = Pᵀ⊙(dPᵀ − Δ)⊙cap', dK += dSᵀ·Q
//   dv:  same loop, Sᵀ only: dV += Pᵀ·dO
// (P = exp(s − lse) from the saved lse, Δ = Σ dO⊙O from attn_bwd_delta_k, cap' = 1 − (s/cap)²; dq and
// dk are multiplied by the score scale at the end.) The S/dP products are recomputed per kernel: 8
// tile products instead of FlashAttention-2's 5, traded for no atomics and a simple register budget.
// Launch geometry (launch::plan_attention_mma_bwd): W warps per block (W = 1 for D = 256, else 4), each
// owning 16 rows; grid = (ceil(T/16W), B·NH) for dq, (ceil(T/16W), B·NKV) for dk/dv. Shared memory
// (static): two [16W][D+8] tiles of the warp-owned rows and two [16][D+8] tiles of the streamed rows,
// bf16 (34 KiB at D = 256). Accumulators: D/8 n8 tiles × 4 f32 per thread.

#define BWD_DQ 0
#define BWD_DK 1
#define BWD_DV 2

template <int D>
struct BwdWarps {
    static constexpr int W = D >= 256 ? 1 : 4;
};

template <int D, int MODE>
__device__ __forceinline__ void attn_bwd_mma_body(const void* q, int qdt, const void* k, int kdt, const void* v, int vdt,
                                                  const int* seg, int has_seg, const void* lse, int ldt,
                                                  const float* delta, const void* dout, int ddt, void* grad, int gdt,
                                                  int t, int nh, int nkv, float scale, float cap, int window) {
    constexpr int DP = D + 8, NT = D / 8, W = BwdWarps<D>::W, ROWS = 16 * W;
    // Own rows (queries for dq, keys for dk/dv) and streamed rows (keys for dq, queries for dk/dv).
    __shared__ __align__(16) bf16_t Own1[ROWS * DP];
    __shared__ __align__(16) bf16_t Own2[ROWS * DP];
    __shared__ __align__(16) bf16_t Str1[16 * DP];
    __shared__ __align__(16) bf16_t Str2[16 * DP];
    __shared__ float str_lse[16], str_delta[16];
    __shared__ int str_seg[16];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
    const int heads_here = MODE == BWD_DQ ? nh : nkv;
    const int bh = blockIdx.y, hh = bh % heads_here, bi = bh / heads_here;
    const int group = nh / nkv;
    const int r0 = blockIdx.x * ROWS;  // first own row (a query for dq, a key for dk/dv)
    const i64 qstride = (i64)nh * D, kstride = (i64)nkv * D;

    // Own rows of this thread: r0 + 16·warp + g (+8).
    int own[2], own_seg[2];
    bool own_ok[2];
    float own_lse[2] = {0.0f, 0.0f}, own_delta[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        own[r] = r0 + warp * 16 + g + 8 * r;
        own_ok[r] = own[r] < t;
        own_seg[r] = (has_seg && own_ok[r]) ? seg[(i64)bi * t + own[r]] : 0;
        if (MODE == BWD_DQ && own_ok[r]) {
            const i64 li = ((i64)bi * nh + hh) * t + own[r];
            own_lse[r] = ld(lse, ldt, li);
            own_delta[r] = delta[li];
        }
    }
    if (MODE == BWD_DQ) {
        attn_stage<D>(Own1, q, qdt, (((i64)bi * t + r0) * nh + hh) * D, qstride, ROWS, t - r0);
        attn_stage<D>(Own2, dout, ddt, (((i64)bi * t + r0) * nh + hh) * D, qstride, ROWS, t - r0);
    } else {
        attn_stage<D>(Own1, k, kdt, (((i64)bi * t + r0) * nkv + hh) * D, kstride, ROWS, t - r0);
        if (MODE == BWD_DK) attn_stage<D>(Own2, v, vdt, (((i64)bi * t + r0) * nkv + hh) * D, kstride, ROWS, t - r0);
    }
    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

    const int rmax = min(t, r0 + ROWS) - 1;
    // Streamed range: dq sees keys [r0 − W + 1, rmax]; dk/dv are seen by queries [r0, rmax + W − 1].
    int lo, hi;
    if (MODE == BWD_DQ) {
        lo = window > 0 ? max(0, r0 - window + 1) : 0;
        hi = rmax;
    } else {
        lo = r0;
        hi = window > 0 ? min(t - 1, rmax + window - 1) : t - 1;
    }
    lo = (lo / 16) * 16;
    const int h_first = MODE == BWD_DQ ? hh : hh * group;
    const int h_count = MODE == BWD_DQ ? 1 : group;
    for (int hq = h_first; hq < h_first + h_count; ++hq) {
        for (int s0 = lo; s0 <= hi; s0 += 16) {
            __syncthreads();  // previous tile reads done (and own tiles staged)
            if (MODE == BWD_DQ) {
                attn_stage<D>(Str1, k, kdt, (((i64)bi * t + s0) * nkv + hh / group) * D, kstride, 16, t - s0);
                attn_stage<D>(Str2, v, vdt, (((i64)bi * t + s0) * nkv + hh / group) * D, kstride, 16, t - s0);
            } else {
                attn_stage<D>(Str1, q, qdt, (((i64)bi * t + s0) * nh + hq) * D, qstride, 16, t - s0);
                attn_stage<D>(Str2, dout, ddt, (((i64)bi * t + s0) * nh + hq) * D, qstride, 16, t - s0);
                if (tid < 16) {
                    const int i = s0 + tid;
                    const i64 li = ((i64)bi * nh + hq) * t + i;
                    str_lse[tid] = i < t ? ld(lse, ldt, li) : 0.0f;
                    str_delta[tid] = i < t ? delta[li] : 0.0f;
                    str_seg[tid] = (has_seg && i < t) ? seg[(i64)bi * t + i] : 0;
                }
            }
            __syncthreads();
            // First product: S (dq) or Sᵀ (dk, dv); own rows as A, streamed rows as B (k-contiguous).
            float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
            float dp[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
            for (int kk = 0; kk < D; kk += 16) {
                const bf16_t* pa = Own1 + (warp * 16 + g) * DP + kk + 2 * t4;
                const unsigned a0 = *(const unsigned*)pa, a1 = *(const unsigned*)(pa + 8 * DP);
                const unsigned a2 = *(const unsigned*)(pa + 8), a3 = *(const unsigned*)(pa + 8 * DP + 8);
#pragma unroll
                for (int nt = 0; nt < 2; ++nt) {
                    const bf16_t* pb = Str1 + (nt * 8 + g) * DP + kk + 2 * t4;
                    attn_mma(s[nt], a0, a1, a2, a3, *(const unsigned*)pb, *(const unsigned*)(pb + 8));
                }
                if (MODE != BWD_DV) {
                    // dP = dO·Vᵀ (dq: own dO × streamed V) or dPᵀ = V·dOᵀ (dk: own V × streamed dO).
                    const bf16_t* pa2 = Own2 + (warp * 16 + g) * DP + kk + 2 * t4;
                    const unsigned c0 = *(const unsigned*)pa2, c1 = *(const unsigned*)(pa2 + 8 * DP);
                    const unsigned c2 = *(const unsigned*)(pa2 + 8), c3 = *(const unsigned*)(pa2 + 8 * DP + 8);
#pragma unroll
                    for (int nt = 0; nt < 2; ++nt) {
                        const bf16_t* pb = Str2 + (nt * 8 + g) * DP + kk + 2 * t4;
                        attn_mma(dp[nt], c0, c1, c2, c3, *(const unsigned*)pb, *(const unsigned*)(pb + 8));
                    }
                }
            }
            // Elementwise: c index 2r + e ↔ own row g + 8r, streamed column 2·t4 + e (+ 8·nt).
#pragma unroll
            for (int nt = 0; nt < 2; ++nt)
#pragma unroll
                for (int r = 0; r < 2; ++r)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int c = 2 * r + e, col = s0 + nt * 8 + 2 * t4 + e, sc = nt * 8 + 2 * t4 + e;
                        const int qi = MODE == BWD_DQ ? own[r] : col;   // query
                        const int kj = MODE == BWD_DQ ? col : own[r];   // key
                        bool vis = own_ok[r] && col < t && kj <= qi && (window <= 0 || qi - kj < window);
                        if (has_seg) vis = vis && (MODE == BWD_DQ ? seg[(i64)bi * t + kj] == own_seg[r] : str_seg[sc] == own_seg[r]);
                        float z = s[nt][c] * scale;
                        z = cap > 0.0f ? cap * tanhf(z / cap) : z;
                        const float l_i = MODE == BWD_DQ ? own_lse[r] : str_lse[sc];
                        const float p = vis ? expf(z - l_i) : 0.0f;
                        float out = p;
                        if (MODE != BWD_DV) {
                            const float d_i = MODE == BWD_DQ ? own_delta[r] : str_delta[sc];
                            out = p * (dp[nt][c] - d_i);
                            if (cap > 0.0f) {
                                const float tt = z / cap;
                                out *= 1.0f - tt * tt;
                            }
                        }
                        s[nt][c] = out;
                    }
            // Second product: (dS or Pᵀ or dSᵀ as A) · (streamed rows as B, row-major: 16-bit loads).
            const unsigned pa0 = pack_bf16x2(s[0][0], s[0][1]), pa1 = pack_bf16x2(s[0][2], s[0][3]);
            const unsigned pa2 = pack_bf16x2(s[1][0], s[1][1]), pa3 = pack_bf16x2(s[1][2], s[1][3]);
            const bf16_t* B2 = MODE == BWD_DQ ? Str1 /* K */ : (MODE == BWD_DK ? Str1 /* Q */ : Str2 /* dO */);
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const bf16_t* pv = B2 + (2 * t4) * DP + n * 8 + g;
                const unsigned b0 = (unsigned)pv[0] | ((unsigned)pv[DP] << 16);
                const unsigned b1 = (unsigned)pv[8 * DP] | ((unsigned)pv[9 * DP] << 16);
                attn_mma(acc[n], pa0, pa1, pa2, pa3, b0, b1);
            }
        }
    }
    const float mul = MODE == BWD_DV ? 1.0f : scale;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (!own_ok[r]) continue;
        const i64 row = MODE == BWD_DQ ? (((i64)bi * t + own[r]) * nh + hh) * D : (((i64)bi * t + own[r]) * nkv + hh) * D;
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 2; ++e) st(grad, gdt, row + n * 8 + 2 * t4 + e, acc[n][2 * r + e] * mul);
    }
}

#define ATTN_BWD_MMA(DIM, MODE, NAME)                                                                                \
    extern "C" __global__ void __launch_bounds__(32 * BwdWarps<DIM>::W) attn_bwd_##NAME##_mma_d##DIM##_k(             \
        const void* q, int qdt, const void* k, int kdt, const void* v, int vdt, const int* seg, int has_seg,          \
        const void* lse, int ldt, const float* delta, const void* dout, int ddt, void* grad, int gdt, int b, int t,   \
        int nh, int nkv, int d, float scale, float cap, int window) {                                                 \
        attn_bwd_mma_body<DIM, MODE>(q, qdt, k, kdt, v, vdt, seg, has_seg, lse, ldt, delta, dout, ddt, grad, gdt, t, \
                                     nh, nkv, scale, cap, window);                                                    \
    }

// D ≤ 64 (not a Gemma-2 head dim) is not marked hot: ptxas spills a few bytes there on some archs.
ATTN_BWD_MMA(64, BWD_DQ, dq)
ATTN_BWD_MMA(64, BWD_DK, dk)
ATTN_BWD_MMA(64, BWD_DV, dv)
// afinar:hot attn_bwd_dq_mma_d128_k
ATTN_BWD_MMA(128, BWD_DQ, dq)
// afinar:hot attn_bwd_dk_mma_d128_k
ATTN_BWD_MMA(128, BWD_DK, dk)
// afinar:hot attn_bwd_dv_mma_d128_k
ATTN_BWD_MMA(128, BWD_DV, dv)
// afinar:hot attn_bwd_dq_mma_d256_k
ATTN_BWD_MMA(256, BWD_DQ, dq)
// afinar:hot attn_bwd_dk_mma_d256_k
ATTN_BWD_MMA(256, BWD_DK, dk)
// afinar:hot attn_bwd_dv_mma_d256_k
ATTN_BWD_MMA(256, BWD_DV, dv)
ATTN_BWD_MMA(16, BWD_DQ, dq)
ATTN_BWD_MMA(16, BWD_DK, dk)
ATTN_BWD_MMA(16, BWD_DV, dv)
ATTN_BWD_MMA(32, BWD_DQ, dq)
ATTN_BWD_MMA(32, BWD_DK, dk)
ATTN_BWD_MMA(32, BWD_DV, dv)
