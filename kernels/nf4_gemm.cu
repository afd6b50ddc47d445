// nf4_gemm.cu — training-shape NF4 linear on tensor cores (mma.sync.m16n8k16, bf16 in, f32 accumulate),
// dequantizing the 4-bit weight tile by tile into shared memory (the dense weight never exists), with
// the LoRA term fused as extra reduction steps so the output is written exactly once.
//
//   xwt (forward):   Y[M, N]  (= or +=)  X[M, K]·W̃ᵀ    + s·XA[M, R]·B[N, R]ᵀ
//   dyw (backward):  dX[M, K] (= or +=)  dY[M, N]·W̃    + s·dYB[M, R]·A[R, K]
//
// W̃ [N, K] is NF4 in the bitsandbytes layout (see nf4_dequant.cu). In GEMM terms C[M, NC] = Aop·Bop with
// reduction length KR: xwt has NC = N, KR = K, Bop[kr, j] = W̃[j, kr] (row j of W̃ is contiguous in kr);
// dyw has NC = K, KR = N, Bop[kr, j] = W̃[kr, j] (contiguous in j). The LoRA pair is appended after the
// (32-padded) KR reduction: Aop' = xa (scaled by s), Bop'[r, j] = lb[j, r] (xwt) or la[r, j] (dyw).
// r == 0 disables it.
//
// Layouts: a (X or dY) [M, KR], c (Y or dX) [M, NC], xa [M, R], lora_b (B [N, R] for xwt, A [R, K] for
// dyw): f32/bf16/f16 by tag, row-major.
// Launch geometry (launch::plan_nf4_gemm): block tile 128×128 (M×NC), reduction step 32, 256 threads =
// 8 warps as 2 (M) × 4 (NC), warp tile 64×32 = 4×4 mma tiles (64 f32 accumulators per thread).
// grid = (ceil(NC/128), ceil(M/128)). Shared memory (static, 40 KiB): two stages of an A tile [128][40]
// bf16 (rows padded by 8 so fragment loads are bank-conflict free) and a B tile as [128 cols][40] (xwt,
// k contiguous) or [32][136] (dyw, cols contiguous).
// Pipeline: while the warps run the mma of step k, each thread's global loads for step k+1 (16 bf16 of
// A, 8 packed NF4 bytes and their absmax) are already in flight into registers; after the mma they are
// dequantized/converted into the other stage; one barrier per step.
// Fast paths: 16-element NF4 chunks with one uint2 load and one absmax decode when K % 16 == 0 (every
// Gemma-2 shape), bf16 A with 16-byte loads; other shapes use a per-element path with bounds checks.
// Next steps: ldmatrix fragment loads, cp.async, then wgmma on sm_90a.

#define BM 128
#define BN 128
#define BK 32
#define APAD 40
#define BPAD_T 136

__device__ __forceinline__ void mma_bf16_16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                               unsigned b1) {
#ifdef AFINAR_EMU
    emu_mma_bf16_16816(c, a0, a1, a2, a3, b0, b1);  // kernels/emu: CPU emulation for the checks
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

// Decodes NF4 elements [e0, e0 + 16) of the flattened weight into v (e0 % 16 == 0, all in range).
__device__ __forceinline__ void nf4_chunk16(const Nf4Args& w, const float* lut, i64 e0, float* v) {
    float a = nf4_absmax(w, e0 >> 6);
    uint2 q = *(const uint2*)(w.packed + (e0 >> 1));
    unsigned words[2] = {q.x, q.y};
#pragma unroll
    for (int b = 0; b < 8; ++b) {
        unsigned byte = (words[b >> 2] >> ((b & 3) * 8)) & 0xffu;
        v[2 * b] = lut[byte >> 4] * a;
        v[2 * b + 1] = lut[byte & 15u] * a;
    }
}

__device__ __forceinline__ float nf4_elem(const Nf4Args& w, const float* lut, i64 e) {
    u8 byte = w.packed[e >> 1];
    return lut[(e & 1) ? (byte & 15u) : (byte >> 4)] * nf4_absmax(w, e >> 6);
}

__device__ __forceinline__ void store16_bf16(bf16_t* dst, const float* v) {
    uint4 o0, o1;
    o0.x = pack_bf16x2(v[0], v[1]);   o0.y = pack_bf16x2(v[2], v[3]);
    o0.z = pack_bf16x2(v[4], v[5]);   o0.w = pack_bf16x2(v[6], v[7]);
    o1.x = pack_bf16x2(v[8], v[9]);   o1.y = pack_bf16x2(v[10], v[11]);
    o1.z = pack_bf16x2(v[12], v[13]); o1.w = pack_bf16x2(v[14], v[15]);
    ((uint4*)dst)[0] = o0;
    ((uint4*)dst)[1] = o1;
}

// Global → register part of one reduction step's tile loads (the fast paths only), issued before the
// tensor-core work on the previous step so the loads are in flight meanwhile; `commit` converts and
// stores them (or runs the generic per-element path) into a shared-memory stage.
struct Nf4GemmPrefetch {
    uint4 a0, a1;  // 16 bf16 of X / dY (fast A path)
    uint2 q;       // 16 NF4 codes (fast B path)
    float amax;    // their block's absmax
    bool a_fast, b_fast;
};

template <int DYW>
__device__ __forceinline__ void nf4_gemm_issue(Nf4GemmPrefetch& pf, const void* a, int adt, const Nf4Args& w, int m, int nc,
                                               int kr, i64 m0, i64 n0, i64 k0, bool lora) {
    const int tid = threadIdx.x;
    {
        const int row = tid >> 1, kc = (tid & 1) * 16;
        const i64 gm = m0 + row;
        pf.a_fast = !lora && adt == DT_BF16 && (kr & 7) == 0 && gm < m && k0 + kc + 16 <= kr;
        if (pf.a_fast) {
            const uint4* p = (const uint4*)(((const bf16_t*)a) + gm * kr + k0 + kc);
            pf.a0 = p[0];
            pf.a1 = p[1];
        }
    }
    i64 e0 = 0;
    if (!DYW) {
        const int j = tid >> 1, kc = (tid & 1) * 16;
        const i64 gj = n0 + j;
        pf.b_fast = !lora && (kr & 15) == 0 && gj < nc && k0 + kc + 16 <= kr;
        e0 = gj * kr + k0 + kc;
    } else {
        const int i = tid >> 3, jc = (tid & 7) * 16;
        const i64 gi = k0 + i, gj = n0 + jc;
        pf.b_fast = !lora && (nc & 15) == 0 && gi < kr && gj + 16 <= nc;
        e0 = gi * nc + gj;
    }
    if (pf.b_fast) {
        pf.q = *(const uint2*)(w.packed + (e0 >> 1));
        pf.amax = nf4_absmax(w, e0 >> 6);
    }
}

template <int DYW>
__device__ __forceinline__ void nf4_gemm_commit(const Nf4GemmPrefetch& pf, bf16_t* As, bf16_t* Bs, const float* lut, const void* a,
                                                int adt, const Nf4Args& w, int m, int nc, int kr, i64 m0, i64 n0, i64 k0,
                                                bool lora, const void* xa, int xadt, const void* lora_b, int lbdt, int r,
                                                float lscale) {
    const int tid = threadIdx.x;
    const i64 klim = lora ? r : kr;
    const i64 wk = DYW ? nc : kr;
    // ---- A tile: rows m0..m0+127, reduction k0..k0+31; thread = (row tid/2, 16 elements).
    {
        const int row = tid >> 1, kc = (tid & 1) * 16;
        const i64 gm = m0 + row;
        if (pf.a_fast) {
            uint4* dst = (uint4*)(As + row * APAD + kc);
            dst[0] = pf.a0;
            dst[1] = pf.a1;
        } else {
            const void* src = lora ? xa : a;
            const int sdt = lora ? xadt : adt;
            const i64 lds = lora ? r : kr;
            const float sc = lora ? lscale : 1.0f;
            float v[16];
#pragma unroll
            for (int u = 0; u < 16; ++u) {
                const i64 kk = k0 + kc + u;
                v[u] = (gm < m && kk < klim) ? sc * ld(src, sdt, gm * lds + kk) : 0.0f;
            }
            store16_bf16(As + row * APAD + kc, v);
        }
    }
    // ---- B tile.
    float v[16];
    if (pf.b_fast) {
        const unsigned words[2] = {pf.q.x, pf.q.y};
#pragma unroll
        for (int b = 0; b < 8; ++b) {
            const unsigned byte = (words[b >> 2] >> ((b & 3) * 8)) & 0xffu;
            v[2 * b] = lut[byte >> 4] * pf.amax;
            v[2 * b + 1] = lut[byte & 15u] * pf.amax;
        }
    }
    if (!DYW) {
        // Bs[j][k] = Bop[k0 + k, n0 + j]: xwt row j of W̃ (or of lora B [N, R]), 16 k per thread.
        const int j = tid >> 1, kc = (tid & 1) * 16;
        const i64 gj = n0 + j;
        if (!pf.b_fast) {
#pragma unroll
            for (int u = 0; u < 16; ++u) {
                const i64 kk = k0 + kc + u;
                float x = 0.0f;
                if (gj < nc && kk < klim) x = lora ? ld(lora_b, lbdt, gj * r + kk) : nf4_elem(w, lut, gj * wk + kk);
                v[u] = x;
            }
        }
        store16_bf16(Bs + j * APAD + kc, v);
    } else {
        // Bs[i][j] = Bop[k0 + i, n0 + j]: dyw row (k0 + i) of W̃ (or of lora A [R, K]), 16 j per thread.
        const int i = tid >> 3, jc = (tid & 7) * 16;
        const i64 gi = k0 + i, gj = n0 + jc;
        if (!pf.b_fast) {
#pragma unroll
            for (int u = 0; u < 16; ++u) {
                float x = 0.0f;
                if (gi < klim && gj + u < nc) x = lora ? ld(lora_b, lbdt, gi * nc + gj + u) : nf4_elem(w, lut, gi * wk + gj + u);
                v[u] = x;
            }
        }
        store16_bf16(Bs + i * BPAD_T + jc, v);
    }
}

template <int DYW>
__device__ __forceinline__ void nf4_gemm_body(const void* a, int adt, const Nf4Args& w, void* c, int cdt, int acc_out,
                                              int m, int nc, int kr, const void* xa, int xadt, const void* lora_b,
                                              int lbdt, int r, float lscale) {
    constexpr int BSZ = BN * APAD > BK * BPAD_T ? BN * APAD : BK * BPAD_T;
    __shared__ __align__(16) bf16_t As[2][BM * APAD];
    __shared__ __align__(16) bf16_t Bs[2][BSZ];
    __shared__ float lut[16];
    const float table[16] = NF4_TABLE;
    if (threadIdx.x < 16) lut[threadIdx.x] = table[threadIdx.x];
    __syncthreads();

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3;  // warp tile origin: rows wm*64, cols wn*32
    const int g = lane >> 2, t4 = lane & 3;
    const i64 m0 = (i64)blockIdx.y * BM, n0 = (i64)blockIdx.x * BN;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

    const int base_tiles = (kr + BK - 1) / BK;
    const int lora_tiles = r > 0 ? (r + BK - 1) / BK : 0;
    const int total = base_tiles + lora_tiles;
    // Step kt reduces over k0 = kt·32 of the base product, then over the LoRA rank.
    auto k0_of = [&](int kt) -> i64 { return kt >= base_tiles ? (i64)(kt - base_tiles) * BK : (i64)kt * BK; };
    Nf4GemmPrefetch pf;
    if (total > 0) {
        nf4_gemm_issue<DYW>(pf, a, adt, w, m, nc, kr, m0, n0, k0_of(0), 0 >= base_tiles);
        nf4_gemm_commit<DYW>(pf, As[0], Bs[0], lut, a, adt, w, m, nc, kr, m0, n0, k0_of(0), 0 >= base_tiles, xa, xadt, lora_b, lbdt,
                             r, lscale);
    }
    __syncthreads();
    for (int kt = 0; kt < total; ++kt) {
        const int cur = kt & 1;
        const bool more = kt + 1 < total;
        if (more) nf4_gemm_issue<DYW>(pf, a, adt, w, m, nc, kr, m0, n0, k0_of(kt + 1), kt + 1 >= base_tiles);
        const bf16_t* A = As[cur];
        const bf16_t* B = Bs[cur];
        // ---- Two k16 steps of 4×4 mma tiles per warp.
#pragma unroll
        for (int ks = 0; ks < BK; ks += 16) {
            unsigned af[4][4];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                const bf16_t* p = A + (wm * 64 + mi * 16 + g) * APAD + ks + 2 * t4;
                af[mi][0] = *(const unsigned*)(p);
                af[mi][1] = *(const unsigned*)(p + 8 * APAD);
                af[mi][2] = *(const unsigned*)(p + 8);
                af[mi][3] = *(const unsigned*)(p + 8 * APAD + 8);
            }
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int col = wn * 32 + ni * 8 + g;
                unsigned b0, b1;
                if (!DYW) {
                    const bf16_t* p = B + col * APAD + ks + 2 * t4;
                    b0 = *(const unsigned*)(p);
                    b1 = *(const unsigned*)(p + 8);
                } else {
                    const bf16_t* p = B + (ks + 2 * t4) * BPAD_T + col;
                    b0 = (unsigned)p[0] | ((unsigned)p[BPAD_T] << 16);
                    b1 = (unsigned)p[8 * BPAD_T] | ((unsigned)p[9 * BPAD_T] << 16);
                }
#pragma unroll
                for (int mi = 0; mi < 4; ++mi) mma_bf16_16816(acc[mi][ni], af[mi][0], af[mi][1], af[mi][2], af[mi][3], b0, b1);
            }
        }
        // The other stage was last read in step kt − 1, which every thread finished before the
        // barrier that ended it; write step kt + 1 into it now.
        if (more)
            nf4_gemm_commit<DYW>(pf, As[cur ^ 1], Bs[cur ^ 1], lut, a, adt, w, m, nc, kr, m0, n0, k0_of(kt + 1), kt + 1 >= base_tiles, xa,
                                 xadt, lora_b, lbdt, r, lscale);
        __syncthreads();
    }

    // ---- Epilogue: c0,c1 at (row g, cols 2t, 2t+1); c2,c3 at (row g+8, same cols).
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const i64 row = m0 + wm * 64 + mi * 16 + g + (q >> 1) * 8;
                const i64 col = n0 + wn * 32 + ni * 8 + 2 * t4 + (q & 1);
                if (row < m && col < nc) st_acc(c, cdt, row * nc + col, acc[mi][ni][q], acc_out);
            }
}

// afinar:hot
extern "C" __global__ void __launch_bounds__(256) nf4_gemm_xwt_k(const void* x, int xdt, const u8* packed, const u8* codes,
                                                                 const float* absmax, const float* code8, float offset,
                                                                 int nested, void* y, int ydt, int acc_out, int m, int n,
                                                                 int k, const void* xa, int xadt, const void* lb, int lbdt,
                                                                 int r, float lscale) {
    Nf4Args w = {packed, codes, absmax, code8, offset, nested};
    nf4_gemm_body<0>(x, xdt, w, y, ydt, acc_out, m, n, k, xa, xadt, lb, lbdt, r, lscale);
}

// Here n and k are W̃'s dims: the output dX is [M, K] and the reduction runs over N.
// afinar:hot
extern "C" __global__ void __launch_bounds__(256) nf4_gemm_dyw_k(const void* dy, int dydt, const u8* packed, const u8* codes,
                                                                 const float* absmax, const float* code8, float offset,
                                                                 int nested, void* dx, int dxdt, int acc_out, int m, int n,
                                                                 int k, const void* dyb, int dybdt, const void* la,
                                                                 int ladt, int r, float lscale) {
    Nf4Args w = {packed, codes, absmax, code8, offset, nested};
    nf4_gemm_body<1>(dy, dydt, w, dx, dxdt, acc_out, m, k, n, dyb, dybdt, la, ladt, r, lscale);
}
