// attention_flash.cu — FlashAttention-2-style tensor-core attention for Gemma-2's head dims (D = 256, and
// 128): same semantics, arguments and outputs as attention.cu's kernels (see the top of that file: causal
// with the KV-cache offset TK − T, sliding window, packed-segment ids, GQA, soft-cap, lse saved), on
// bf16 storage with f32 accumulation and f32 softmax. sm_80+ (mma.sync m16n8k16, ldmatrix, cp.async);
// the launch code never selects these kernels below sm_80 (launch::attention_path), where the file still
// compiles with the tensor-core instructions replaced by traps. attention.cu's CUDA-core kernels stay the
// reference and the sm_75 path; its first tensor-core kernels (`*_mma_*`) stay for comparison
// (AFINAR_ATTN_PATH=mma) and for the head dims this file does not serve.
//
// Common structure. Tiles of rows live in dynamic shared memory as bf16 [rows][D + 8] (a row pitch of
// D + 8 elements = 16·odd bytes puts the 8 row addresses of one ldmatrix phase in 8 different 16-byte
// bank groups: conflict-free). Streamed tiles are double-buffered: the tile after the current one is
// copied with cp.async (16 B per thread per copy, rows past the end zero-filled by a src-size of 0)
// while the current one is multiplied. Fragments come from shared memory with ldmatrix.x4 (.trans for
// operands stored [k][n], i.e. V, dO, Q, K as the right factor of a P·V-like product). A warp owns 16
// rows; the accumulator fragment of mma.m16n8k16 (c0,c1: row g, cols 2·t4, 2·t4 + 1; c2,c3: row g + 8)
// is exactly the A-operand layout for the next product, so P and dS never leave registers.
// Tiles entirely outside the causal / window range are not visited; only tiles that cross the diagonal,
// the window edge or the end of the sequence (or any tile when segment ids are given) are masked element
// by element.
//
// Kernels (launch::attention_flash / attention_flash_bwd compute the launches and shared memory):
// - attn_fwd_flash_d{128,256}_k: grid (ceil(T/64), B·NH), 4 warps; 64 queries per block (query blocks
//   taken latest first: they have the most key tiles), key tiles of FaKeys<D>::BK keys (32 at D = 256,
//   64 at D = 128). Online softmax per row over the 4 lanes of a quad; O (16 × D per warp) in registers.
// - attn_bwd_dq_flash_d*_k (TK = T): same grid and tiling; per key tile S = Q·Kᵀ, dP = dO·Vᵀ,
//   dS = P⊙(dP − Δ)⊙cap', dQ += dS·K (3 products), dQ in registers, written once.
// - attn_bwd_dkv_flash_d*_k (TK = T): grid (ceil(T/64), B·NKV), 8 warps; 64 keys of one kv head per block,
//   streaming 32-query tiles of every query head of its GQA group (K and V loaded once for the group).
//   Warp w owns keys 16·(w mod 4) … and the D-half (w div 4) of dK and dV (accumulators 2 × 16 × D/2 in
//   registers). Per query tile the two warps of a key group split the first two products: the first
//   computes Sᵀ = K·Qᵀ, the second dPᵀ = V·dOᵀ, each over all of D, and they swap results through shared
//   memory; then each forms Pᵀ, dSᵀ and accumulates its D-half of dV += Pᵀ·dO and dK += dSᵀ·Q.
//   4 products per tile, as FlashAttention-2's dK/dV loop; dQ is the separate kernel above (3 more
//   products, recomputing S and dP) so that no output needs atomics: results are bit-deterministic.
// - attn_bwd_{dq,dkv}_flash_s_d*_k: the same backward with smaller tiles (FaBwd<D, true>) for GPUs with
//   99 KiB of shared memory per block (sm_86/sm_89).
// Δ = Σ dO⊙O comes from attention.cu's attn_bwd_delta_k.

#define FA_BQ 64   // queries per block: forward and dq (4 warps × 16)
#define FA_BKV 64  // keys per block: dk/dv (4 key groups × 16)
#define FA_BQB 32  // queries per streamed tile: dk/dv

// Key tile of the forward and dq kernels: 32 keys at D = 256 (shared memory), 64 below.
template <int D>
struct FaKeys {
    static constexpr int BK = D >= 256 ? 32 : 64;
};

// Backward tiling: the default (SMALL = false) for sm_80/sm_90's 163/227 KiB of shared memory per block;
// SMALL = true fits the 99 KiB of sm_86/sm_89 (the 24 GB consumer GPUs): 16-key tiles for dq, 16-query
// tiles single-buffered for dk/dv.
template <int D, bool SMALL>
struct FaBwd {
    static constexpr int BK = SMALL ? 16 : FaKeys<D>::BK;  // dq: keys per streamed tile
    static constexpr int BQB = SMALL ? 16 : FA_BQB;       // dk/dv: queries per streamed tile
    static constexpr int STAGES = SMALL ? 1 : 2;          // dk/dv: Q/dO tile buffers
};

// Dynamic shared memory per block in bytes (launch::attention_flash* compute the same figures; the
// emulated check pins them): tiles of bf16 rows with pitch D + 8, plus the dk/dv exchange and lse/Δ.
template <int D>
__device__ constexpr int fa_fwd_smem() { return (FA_BQ + 4 * FaKeys<D>::BK) * (D + 8) * 2; }
template <int D, bool SMALL>
__device__ constexpr int fa_dq_smem() { return (2 * FA_BQ + 4 * FaBwd<D, SMALL>::BK) * (D + 8) * 2; }
template <int D, bool SMALL>
__device__ constexpr int fa_dkv_smem() {
    using C = FaBwd<D, SMALL>;
    return (2 * FA_BKV + 2 * C::STAGES * C::BQB) * (D + 8) * 2 + 8 * (C::BQB / 8) * 4 * 32 * 4 + 2 * C::STAGES * C::BQB * 4;
}

// Dynamic shared memory (the host sets the opt-in attribute when a launch needs more than 48 KiB).
#ifdef AFINAR_EMU
#define FA_DYN_SMEM(name) unsigned char* name = emu_dyn_smem()
#else
#define FA_DYN_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// ---- PTX wrappers ----------------------------------------------------------------------------------

__device__ __forceinline__ unsigned fa_smem_addr(const void* p) {
#ifdef AFINAR_EMU
    (void)p;
    return 0u;
#else
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
#endif
}

// c += A·B, m16n8k16, bf16 operands, f32 accumulators.
__device__ __forceinline__ void fa_mma(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#ifdef AFINAR_EMU
    emu_mma_bf16_16816(c, a[0], a[1], a[2], a[3], b0, b1);
#elif __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    asm volatile("trap;");
#endif
}

// Four 8×8 b16 matrices; lane ℓ gives the address of row ℓ mod 8 of matrix ℓ div 8 (16-byte aligned) and
// receives in r[i] row ℓ div 4, elements 2·(ℓ mod 4) and +1 of matrix i (.trans: of its transpose).
__device__ __forceinline__ void fa_ldsm_x4(unsigned* r, const bf16_t* p) {
#ifdef AFINAR_EMU
    emu_ldmatrix(r, 4, p, false);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fa_smem_addr(p)));
#endif
}

__device__ __forceinline__ void fa_ldsm_x4_t(unsigned* r, const bf16_t* p) {
#ifdef AFINAR_EMU
    emu_ldmatrix(r, 4, p, true);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fa_smem_addr(p)));
#endif
}

// 16-byte asynchronous copy global → shared; `valid` false writes 16 zero bytes (src-size 0; `src` is
// then not read but must still be a valid address).
__device__ __forceinline__ void fa_cp16(void* dst, const void* src, bool valid) {
#ifdef AFINAR_EMU
    emu_cp_async16(dst, src, valid);
#elif __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(fa_smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
#else
    asm volatile("trap;");
#endif
}

__device__ __forceinline__ void fa_cp_commit() {
#ifdef AFINAR_EMU
    emu_cp_async_commit();
#elif __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void fa_cp_wait() {
#ifdef AFINAR_EMU
    emu_cp_async_wait(N);
#elif __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Issues the copies of `rows` rows of D bf16 (row r at src + base + r·stride) into dst [rows][D + 8];
// rows ≥ valid are zero-filled. Every thread of the block takes part (nthreads of them).
template <int D>
__device__ __forceinline__ void fa_load_rows(bf16_t* dst, const bf16_t* src, i64 base, i64 stride, int rows, int valid,
                                             int nthreads) {
    constexpr int DP = D + 8, C = D / 8;
    for (int idx = threadIdx.x; idx < rows * C; idx += nthreads) {
        const int r = idx / C, c8 = (idx % C) * 8;
        const bool ok = r < valid;
        fa_cp16(dst + r * DP + c8, ok ? (const void*)(src + base + r * stride + c8) : (const void*)src, ok);
    }
}

// Scores of one 16-row × (8·NS)-column block: acc[n] += A(16 rows of `a`, all D) · B(8·NS rows of `b`)ᵀ.
// `a` points at the warp's first row, `b` at the first streamed row; both [·][D + 8].
template <int D, int NS>
__device__ __forceinline__ void fa_scores(float (*acc)[4], const bf16_t* a, const bf16_t* b, int lane) {
    constexpr int DP = D + 8;
#pragma unroll
    for (int n = 0; n < NS; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    // A: lanes 0–15 address rows 0–15 at column kk, lanes 16–31 the same rows at kk + 8 (→ a0..a3).
    // B: matrix m = ℓ div 8 covers streamed rows 8·(m div 2) … at column kk + 8·(m mod 2) (→ b0, b1 of
    // n-tile 2·np, then of 2·np + 1).
    const bf16_t* pa = a + (lane & 15) * DP + (lane >> 4) * 8;
    const bf16_t* pb = b + ((lane >> 4) * 8 + (lane & 7)) * DP + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < D; kk += 16) {
        unsigned af[4];
        fa_ldsm_x4(af, pa + kk);
#pragma unroll
        for (int np = 0; np < NS / 2; ++np) {
            unsigned bf[4];
            fa_ldsm_x4(bf, pb + np * 16 * DP + kk);
            fa_mma(acc[2 * np], af, bf[0], bf[1]);
            fa_mma(acc[2 * np + 1], af, bf[2], bf[3]);
        }
    }
}

// acc[n] (16 rows × 8·NN columns) += P · B, P the 16 × (16·KS) block held in `p` (accumulator layout,
// n-tile j = columns 8j …), B = rows 0 … 16·KS − 1 of `b` ([k][D + 8], columns col0 … col0 + 8·NN − 1).
template <int D, int KS, int NN>
__device__ __forceinline__ void fa_pv(float (*acc)[4], float (*p)[4], const bf16_t* b, int col0, int lane) {
    constexpr int DP = D + 8;
    // .trans: matrix m covers k rows 8·(m mod 2) … at columns 8·(m div 2) … (→ b0, b1 of n-tile 2·np,
    // then of 2·np + 1).
    const bf16_t* pb = b + (((lane >> 3) & 1) * 8 + (lane & 7)) * DP + col0 + (lane >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        const unsigned pa[4] = {pack_bf16x2(p[2 * kk][0], p[2 * kk][1]), pack_bf16x2(p[2 * kk][2], p[2 * kk][3]),
                                pack_bf16x2(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                                pack_bf16x2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int np = 0; np < NN / 2; ++np) {
            unsigned bf[4];
            fa_ldsm_x4_t(bf, pb + kk * 16 * DP + np * 16);
            fa_mma(acc[2 * np], pa, bf[0], bf[1]);
            fa_mma(acc[2 * np + 1], pa, bf[2], bf[3]);
        }
    }
}

// Stores one row's 2 adjacent columns (c, c + 1) of a result: one 32-bit store for bf16.
__device__ __forceinline__ void fa_store2(void* p, int dt, i64 i, float a, float b) {
    if (dt == DT_BF16) *(unsigned*)(((bf16_t*)p) + i) = pack_bf16x2(a, b);
    else {
        st(p, dt, i, a);
        st(p, dt, i + 1, b);
    }
}

__device__ __forceinline__ float fa_cap(float z, float cap) { return cap > 0.0f ? cap * tanhf(z / cap) : z; }

// ---- forward -----------------------------------------------------------------------------------------

template <int D>
__device__ __forceinline__ void fa_fwd_body(const void* q, const void* k, const void* v, const int* seg, int has_seg,
                                            void* out, int odt, void* lse, int ldt, int t, int tk, int nh, int nkv,
                                            float scale, float cap, int window) {
    constexpr int DP = D + 8, BK = FaKeys<D>::BK, NT = D / 8, NS = BK / 8;
    FA_DYN_SMEM(smem);
    bf16_t* Qs = (bf16_t*)smem;         // [FA_BQ][DP]
    bf16_t* Ks = Qs + FA_BQ * DP;       // [2][BK][DP]
    bf16_t* Vs = Ks + 2 * BK * DP;      // [2][BK][DP]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
    const int i0 = (gridDim.x - 1 - blockIdx.x) * FA_BQ;  // latest query blocks first: most key tiles
    const int bh = blockIdx.y, h = bh % nh, bi = bh / nh, kvh = h / (nh / nkv);
    const int off = tk - t;  // query i sits at absolute key position off + i
    const bf16_t *Q = (const bf16_t*)q, *K = (const bf16_t*)k, *V = (const bf16_t*)v;
    const i64 qstride = (i64)nh * D, kstride = (i64)nkv * D;
    const i64 kv0 = (((i64)bi * tk) * nkv + kvh) * D;  // key 0 of this (b, kv head)
    const int qmin = off + i0, qmax = off + min(t, i0 + FA_BQ) - 1;
    int jlo = window > 0 ? max(0, qmin - window + 1) : 0;
    jlo = (jlo / BK) * BK;
    const int ntiles = (qmax - jlo) / BK + 1;

    fa_load_rows<D>(Qs, Q, (((i64)bi * t + i0) * nh + h) * D, qstride, FA_BQ, t - i0, 128);
    fa_load_rows<D>(Ks, K, kv0 + (i64)jlo * kstride, kstride, BK, tk - jlo, 128);
    fa_load_rows<D>(Vs, V, kv0 + (i64)jlo * kstride, kstride, BK, tk - jlo, 128);
    fa_cp_commit();

    int qa[2], segq[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int qi = i0 + warp * 16 + g + 8 * r;
        qa[r] = off + qi;
        segq[r] = (has_seg && qi < t) ? seg[(i64)bi * tk + qa[r]] : 0;
    }
    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f};

    for (int it = 0; it < ntiles; ++it) {
        const int j0 = jlo + it * BK, stg = it & 1;
        if (it + 1 < ntiles) {  // prefetch the next tile into the other stage (freed by the last barrier)
            const int j1 = j0 + BK;
            fa_load_rows<D>(Ks + (stg ^ 1) * BK * DP, K, kv0 + (i64)j1 * kstride, kstride, BK, tk - j1, 128);
            fa_load_rows<D>(Vs + (stg ^ 1) * BK * DP, V, kv0 + (i64)j1 * kstride, kstride, BK, tk - j1, 128);
        }
        fa_cp_commit();  // possibly empty: keeps "all but the newest group" meaning "this tile"
        fa_cp_wait<1>();
        __syncthreads();
        float s[NS][4];
        fa_scores<D, NS>(s, Qs + warp * 16 * DP, Ks + stg * BK * DP, lane);
        // Masks are needed only on tiles crossing the diagonal, the window edge or the end of the keys.
        const bool edge = j0 + BK - 1 > qmin || (window > 0 && qmax - j0 >= window) || j0 + BK > tk || has_seg;
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mloc = -INFINITY;
#pragma unroll
            for (int n = 0; n < NS; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float z = fa_cap(s[n][2 * r + e] * scale, cap);
                    if (edge) {
                        const int j = j0 + n * 8 + 2 * t4 + e;
                        const bool vis = j < tk && j <= qa[r] && (window <= 0 || qa[r] - j < window) &&
                                         (!has_seg || seg[(i64)bi * tk + j] == segq[r]);
                        z = vis ? z : -INFINITY;
                    }
                    s[n][2 * r + e] = z;
                    mloc = fmaxf(mloc, z);
                }
            mloc = fmaxf(mloc, __shfl_xor_sync(0xffffffffu, mloc, 1));
            mloc = fmaxf(mloc, __shfl_xor_sync(0xffffffffu, mloc, 2));
            const float mnew = fmaxf(mrow[r], mloc);
            const float mu = mnew == -INFINITY ? 0.0f : mnew;  // nothing visible yet: keep everything 0
            corr[r] = expf(mrow[r] - mu);
            float lsum = 0.0f;
#pragma unroll
            for (int n = 0; n < NS; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float p = expf(s[n][2 * r + e] - mu);
                    s[n][2 * r + e] = p;
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
        fa_pv<D, BK / 16, NT>(o, s, Vs + stg * BK * DP, 0, lane);
        __syncthreads();  // every warp is done with stage `stg` before the next prefetch overwrites it
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int qi = i0 + warp * 16 + g + 8 * r;
        if (qi >= t) continue;
        // Key qpos itself is always visible, so l ≥ 1 here.
        const float inv = 1.0f / lrow[r];
        const i64 orow = (((i64)bi * t + qi) * nh + h) * D;
#pragma unroll
        for (int n = 0; n < NT; ++n) fa_store2(out, odt, orow + n * 8 + 2 * t4, o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
        if (t4 == 0) st(lse, ldt, ((i64)bi * nh + h) * t + qi, mrow[r] + logf(lrow[r]));
    }
}

#define ATTN_FWD_FLASH(DIM)                                                                                        \
    extern "C" __global__ void __launch_bounds__(128) attn_fwd_flash_d##DIM##_k(                                   \
        const void* q, int qdt, const void* k, int kdt, const void* v, int vdt, const int* seg, int has_seg,       \
        void* out, int odt, void* lse, int ldt, int b, int t, int tk, int nh, int nkv, int d, float scale, float cap, \
        int window) {                                                                                              \
        fa_fwd_body<DIM>(q, k, v, seg, has_seg, out, odt, lse, ldt, t, tk, nh, nkv, scale, cap, window);          \
    }

// afinar:hot attn_fwd_flash_d128_k
ATTN_FWD_FLASH(128)
// afinar:hot attn_fwd_flash_d256_k
ATTN_FWD_FLASH(256)

// ---- backward: dQ ------------------------------------------------------------------------------------

template <int D, bool SMALL>
__device__ __forceinline__ void fa_bwd_dq_body(const void* q, const void* k, const void* v, const int* seg, int has_seg,
                                               const void* lse, int ldt, const float* delta, const void* dout, void* dq,
                                               int dqdt, int t, int nh, int nkv, float scale, float cap, int window) {
    constexpr int DP = D + 8, BK = FaBwd<D, SMALL>::BK, NT = D / 8, NS = BK / 8;
    FA_DYN_SMEM(smem);
    bf16_t* Qs = (bf16_t*)smem;     // [FA_BQ][DP]
    bf16_t* Ds = Qs + FA_BQ * DP;   // dO [FA_BQ][DP]
    bf16_t* Ks = Ds + FA_BQ * DP;   // [2][BK][DP]
    bf16_t* Vs = Ks + 2 * BK * DP;  // [2][BK][DP]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
    const int i0 = (gridDim.x - 1 - blockIdx.x) * FA_BQ;
    const int bh = blockIdx.y, h = bh % nh, bi = bh / nh, kvh = h / (nh / nkv);
    const bf16_t *Q = (const bf16_t*)q, *K = (const bf16_t*)k, *V = (const bf16_t*)v, *DO = (const bf16_t*)dout;
    const i64 qstride = (i64)nh * D, kstride = (i64)nkv * D;
    const i64 kv0 = (((i64)bi * t) * nkv + kvh) * D;
    const int qmin = i0, qmax = min(t, i0 + FA_BQ) - 1;
    int jlo = window > 0 ? max(0, qmin - window + 1) : 0;
    jlo = (jlo / BK) * BK;
    const int ntiles = (qmax - jlo) / BK + 1;

    const i64 qb = (((i64)bi * t + i0) * nh + h) * D;
    fa_load_rows<D>(Qs, Q, qb, qstride, FA_BQ, t - i0, 128);
    fa_load_rows<D>(Ds, DO, qb, qstride, FA_BQ, t - i0, 128);
    fa_load_rows<D>(Ks, K, kv0 + (i64)jlo * kstride, kstride, BK, t - jlo, 128);
    fa_load_rows<D>(Vs, V, kv0 + (i64)jlo * kstride, kstride, BK, t - jlo, 128);
    fa_cp_commit();

    int qi[2], segq[2];
    float lse_r[2], dlt_r[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        qi[r] = i0 + warp * 16 + g + 8 * r;
        const bool ok = qi[r] < t;
        segq[r] = (has_seg && ok) ? seg[(i64)bi * t + qi[r]] : 0;
        const i64 li = ((i64)bi * nh + h) * t + qi[r];
        lse_r[r] = ok ? ld(lse, ldt, li) : 0.0f;
        dlt_r[r] = ok ? delta[li] : 0.0f;
    }
    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

    for (int it = 0; it < ntiles; ++it) {
        const int j0 = jlo + it * BK, stg = it & 1;
        if (it + 1 < ntiles) {
            const int j1 = j0 + BK;
            fa_load_rows<D>(Ks + (stg ^ 1) * BK * DP, K, kv0 + (i64)j1 * kstride, kstride, BK, t - j1, 128);
            fa_load_rows<D>(Vs + (stg ^ 1) * BK * DP, V, kv0 + (i64)j1 * kstride, kstride, BK, t - j1, 128);
        }
        fa_cp_commit();
        fa_cp_wait<1>();
        __syncthreads();
        float s[NS][4], dp[NS][4];
        fa_scores<D, NS>(s, Qs + warp * 16 * DP, Ks + stg * BK * DP, lane);
        fa_scores<D, NS>(dp, Ds + warp * 16 * DP, Vs + stg * BK * DP, lane);
        const bool edge = j0 + BK - 1 > qmin || (window > 0 && qmax - j0 >= window) || j0 + BK > t || has_seg;
#pragma unroll
        for (int n = 0; n < NS; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int r = c >> 1, j = j0 + n * 8 + 2 * t4 + (c & 1);
                bool vis = true;
                if (edge)
                    vis = qi[r] < t && j < t && j <= qi[r] && (window <= 0 || qi[r] - j < window) &&
                          (!has_seg || seg[(i64)bi * t + j] == segq[r]);
                const float z = fa_cap(s[n][c] * scale, cap);
                const float p = vis ? expf(z - lse_r[r]) : 0.0f;
                float ds = p * (dp[n][c] - dlt_r[r]);
                if (cap > 0.0f) {
                    const float tt = z / cap;
                    ds *= 1.0f - tt * tt;
                }
                s[n][c] = ds;
            }
        fa_pv<D, BK / 16, NT>(acc, s, Ks + stg * BK * DP, 0, lane);  // dQ += dS·K
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (qi[r] >= t) continue;
        const i64 row = (((i64)bi * t + qi[r]) * nh + h) * D;
#pragma unroll
        for (int n = 0; n < NT; ++n)
            fa_store2(dq, dqdt, row + n * 8 + 2 * t4, acc[n][2 * r] * scale, acc[n][2 * r + 1] * scale);
    }
}

// ---- backward: dK, dV --------------------------------------------------------------------------------

template <int D, bool SMALL>
__device__ __forceinline__ void fa_bwd_dkv_body(const void* q, const void* k, const void* v, const int* seg, int has_seg,
                                                const void* lse, int ldt, const float* delta, const void* dout, void* dk,
                                                int dkdt, void* dv, int dvdt, int t, int nh, int nkv, float scale,
                                                float cap, int window) {
    constexpr int BQB = FaBwd<D, SMALL>::BQB, STAGES = FaBwd<D, SMALL>::STAGES;
    constexpr int DP = D + 8, NS = BQB / 8, NH2 = D / 16;  // NH2: n-tiles of one D-half
    FA_DYN_SMEM(smem);
    bf16_t* Ks = (bf16_t*)smem;            // [FA_BKV][DP]
    bf16_t* Vs = Ks + FA_BKV * DP;         // [FA_BKV][DP]
    bf16_t* Qs = Vs + FA_BKV * DP;              // [STAGES][BQB][DP]
    bf16_t* Ds = Qs + STAGES * BQB * DP;        // dO [STAGES][BQB][DP]
    float* xch = (float*)(Ds + STAGES * BQB * DP);  // [8 warps][NS·4][32 lanes]: Sᵀ or dPᵀ of each warp
    float* lse_s = xch + 8 * NS * 4 * 32;       // [STAGES][BQB]
    float* dlt_s = lse_s + STAGES * BQB;        // [STAGES][BQB]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
    const int kg = warp & 3, half = warp >> 2;  // key group (16 keys) and D-half of this warp
    const int k0 = blockIdx.x * FA_BKV;
    const int bh = blockIdx.y, kvh = bh % nkv, bi = bh / nkv, group = nh / nkv;
    const bf16_t *Q = (const bf16_t*)q, *K = (const bf16_t*)k, *V = (const bf16_t*)v, *DO = (const bf16_t*)dout;
    const i64 qstride = (i64)nh * D, kstride = (i64)nkv * D;
    const int kmax = min(t, k0 + FA_BKV) - 1;
    const int qlo = (k0 / BQB) * BQB;
    const int qhi = window > 0 ? min(t - 1, kmax + window - 1) : t - 1;
    const int nqt = (qhi - qlo) / BQB + 1, ntiles = nqt * group;

    fa_load_rows<D>(Ks, K, (((i64)bi * t + k0) * nkv + kvh) * D, kstride, FA_BKV, t - k0, 256);
    fa_load_rows<D>(Vs, V, (((i64)bi * t + k0) * nkv + kvh) * D, kstride, FA_BKV, t - k0, 256);
    // Tile `it`: query head kvh·group + it / nqt, queries qlo + (it mod nqt)·BQB …
    auto load_tile = [&](int it, int stg) {
        const int hq = kvh * group + it / nqt, i0 = qlo + (it % nqt) * BQB;
        const i64 qb = (((i64)bi * t + i0) * nh + hq) * D;
        fa_load_rows<D>(Qs + stg * BQB * DP, Q, qb, qstride, BQB, t - i0, 256);
        fa_load_rows<D>(Ds + stg * BQB * DP, DO, qb, qstride, BQB, t - i0, 256);
        if (tid < BQB) {  // lse and Δ of the tile's queries: plain loads, read after the barrier
            const int i = i0 + tid;
            const i64 li = ((i64)bi * nh + hq) * t + i;
            lse_s[stg * BQB + tid] = i < t ? ld(lse, ldt, li) : 0.0f;
            dlt_s[stg * BQB + tid] = i < t ? delta[li] : 0.0f;
        }
    };
    load_tile(0, 0);
    fa_cp_commit();

    int kj[2], segk[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        kj[r] = k0 + kg * 16 + g + 8 * r;
        segk[r] = (has_seg && kj[r] < t) ? seg[(i64)bi * t + kj[r]] : 0;
    }
    float dka[NH2][4], dva[NH2][4];
#pragma unroll
    for (int n = 0; n < NH2; ++n) dka[n][0] = dka[n][1] = dka[n][2] = dka[n][3] = dva[n][0] = dva[n][1] = dva[n][2] = dva[n][3] = 0.0f;

    for (int it = 0; it < ntiles; ++it) {
        const int stg = STAGES == 2 ? (it & 1) : 0, i0 = qlo + (it % nqt) * BQB;
        if (STAGES == 2) {  // prefetch the next tile into the other stage (freed by the last barrier)
            if (it + 1 < ntiles) load_tile(it + 1, stg ^ 1);
            fa_cp_commit();
            fa_cp_wait<1>();
        } else {  // one stage: tile `it` was issued before the loop or after the previous tile's barrier
            fa_cp_wait<0>();
        }
        __syncthreads();
        const bf16_t* Qt = Qs + stg * BQB * DP;
        const bf16_t* Dt = Ds + stg * BQB * DP;
        // The first half-warp-pair member computes Sᵀ = K·Qᵀ, the second dPᵀ = V·dOᵀ (16 keys × 32
        // queries, over all of D); they swap through `xch` (same fragment position ↔ same lane).
        float mine[NS][4], other[NS][4];
        if (half == 0) fa_scores<D, NS>(mine, Ks + kg * 16 * DP, Qt, lane);
        else fa_scores<D, NS>(mine, Vs + kg * 16 * DP, Dt, lane);
#pragma unroll
        for (int n = 0; n < NS; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) xch[(warp * NS * 4 + n * 4 + c) * 32 + lane] = mine[n][c];
        __syncthreads();
#pragma unroll
        for (int n = 0; n < NS; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) other[n][c] = xch[((warp ^ 4) * NS * 4 + n * 4 + c) * 32 + lane];
        const bool edge = i0 < kmax || (window > 0 && i0 + BQB - 1 - k0 >= window) || i0 + BQB > t ||
                          k0 + FA_BKV > t || has_seg;
        // c index: row = key kj[c / 2], column = query i0 + 8n + 2·t4 + c mod 2. `mine` becomes Pᵀ and
        // `other` dSᵀ (selects on values, not on array pointers, so everything stays in registers).
#pragma unroll
        for (int n = 0; n < NS; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int r = c >> 1, col = n * 8 + 2 * t4 + (c & 1), i = i0 + col;
                const float sv = half == 0 ? mine[n][c] : other[n][c];
                const float dpv = half == 0 ? other[n][c] : mine[n][c];
                bool vis = true;
                if (edge)
                    vis = i < t && kj[r] < t && kj[r] <= i && (window <= 0 || i - kj[r] < window) &&
                          (!has_seg || seg[(i64)bi * t + i] == segk[r]);
                const float z = fa_cap(sv * scale, cap);
                const float p = vis ? expf(z - lse_s[stg * BQB + col]) : 0.0f;
                float ds = p * (dpv - dlt_s[stg * BQB + col]);
                if (cap > 0.0f) {
                    const float tt = z / cap;
                    ds *= 1.0f - tt * tt;
                }
                mine[n][c] = p;
                other[n][c] = ds;
            }
        fa_pv<D, BQB / 16, NH2>(dva, mine, Dt, half * (D / 2), lane);   // dV += Pᵀ·dO (this D-half)
        fa_pv<D, BQB / 16, NH2>(dka, other, Qt, half * (D / 2), lane);  // dK += dSᵀ·Q
        __syncthreads();  // stage `stg` and `xch` are free for the next tile
        if (STAGES == 1 && it + 1 < ntiles) {
            load_tile(it + 1, 0);
            fa_cp_commit();
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (kj[r] >= t) continue;
        const i64 row = (((i64)bi * t + kj[r]) * nkv + kvh) * D + half * (D / 2);
#pragma unroll
        for (int n = 0; n < NH2; ++n) {
            fa_store2(dk, dkdt, row + n * 8 + 2 * t4, dka[n][2 * r] * scale, dka[n][2 * r + 1] * scale);
            fa_store2(dv, dvdt, row + n * 8 + 2 * t4, dva[n][2 * r], dva[n][2 * r + 1]);
        }
    }
}

#define ATTN_BWD_FLASH(DIM, SMALL, DQ, DKV)                                                                                          \
    extern "C" __global__ void __launch_bounds__(128) DQ(                                  \
        const void* q, int qdt, const void* k, int kdt, const void* v, int vdt, const int* seg, int has_seg,          \
        const void* lse, int ldt, const float* delta, const void* dout, int ddt, void* dq, int dqdt, int b, int t,    \
        int nh, int nkv, int d, float scale, float cap, int window) {                                                 \
        fa_bwd_dq_body<DIM, SMALL>(q, k, v, seg, has_seg, lse, ldt, delta, dout, dq, dqdt, t, nh, nkv, scale, cap, window); \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) DKV(                                 \
        const void* q, int qdt, const void* k, int kdt, const void* v, int vdt, const int* seg, int has_seg,          \
        const void* lse, int ldt, const float* delta, const void* dout, int ddt, void* dk, int dkdt, void* dv,        \
        int dvdt, int b, int t, int nh, int nkv, int d, float scale, float cap, int window) {                         \
        fa_bwd_dkv_body<DIM, SMALL>(q, k, v, seg, has_seg, lse, ldt, delta, dout, dk, dkdt, dv, dvdt, t, nh, nkv, scale, cap, \
                             window);                                                                                \
    }

// afinar:hot attn_bwd_dq_flash_d128_k
// afinar:hot attn_bwd_dkv_flash_d128_k
ATTN_BWD_FLASH(128, false, attn_bwd_dq_flash_d128_k, attn_bwd_dkv_flash_d128_k)
// afinar:hot attn_bwd_dq_flash_d256_k
// afinar:hot attn_bwd_dkv_flash_d256_k
ATTN_BWD_FLASH(256, false, attn_bwd_dq_flash_d256_k, attn_bwd_dkv_flash_d256_k)
// The ≤ 99 KiB variants (sm_86/sm_89).
// afinar:hot attn_bwd_dq_flash_s_d128_k
// afinar:hot attn_bwd_dkv_flash_s_d128_k
ATTN_BWD_FLASH(128, true, attn_bwd_dq_flash_s_d128_k, attn_bwd_dkv_flash_s_d128_k)
// afinar:hot attn_bwd_dq_flash_s_d256_k
// afinar:hot attn_bwd_dkv_flash_s_d256_k
ATTN_BWD_FLASH(256, true, attn_bwd_dq_flash_s_d256_k, attn_bwd_dkv_flash_s_d256_k)
