// lora.cu — the small-rank halves of a LoRA linear (rank R ≪ K, N), SIMT, dropout fused:
//   xa  = drop(X)·Aᵀ        [M, R]   (lora_proj_k, with mask; also dYB = dY·B with strided access)
//   Y  += s·XA·Bᵀ           [M, N]   (lora_add_k: only for a dense base; the NF4 base fuses it into
//                                     nf4_gemm/nf4_gemv so Y is written once)
//   dX += s·((dYB·A)⊙mask)  [M, K]   (lora_dx_k: used when a dropout mask forbids fusing it into the
//                                     NF4 dyw GEMM, and for a dense base)
//   dA += s·dYBᵀ·drop(X)    [R, K]   (lora_da_k)
//   dB += s·dYᵀ·XA          [N, R]   (lora_db_k)
//
// Layouts: row-major, f32/bf16/f16 by tag. A [R, K], B [N, R], mask [M, K] (0 or 1/(1−p); has_mask = 0
// means no dropout and the mask pointer is not read). lora_proj_k reads its weight as
// w[j·sj + k·sk] so the same kernel computes X·Aᵀ (sj = K, sk = 1) and dY·B (sj = 1, sk = R).
// Launch geometry (launch::plan_lora): proj: one 256-thread block per row m, grid = (M, ceil(R/16)),
// 16 outputs per pass reduced across the block; add/dx: 1-D grid-stride over M·N or M·K, 256 threads;
// da: thread per k with 16 rank accumulators, grid = (ceil(K/256), ceil(R/16)); db: thread per n,
// grid = (ceil(N/256), ceil(R/16)). Every reduction over M runs in a fixed order (deterministic).

#define RCH 16

extern "C" __global__ void lora_proj_k(const void* x, int xdt, const void* mask, int mdt, int has_mask, const void* w,
                                       int wdt, i64 sj, i64 sk, void* out, int odt, int kdim, int r) {
    __shared__ float red[RCH][8];
    const i64 row = blockIdx.x;
    const int j0 = blockIdx.y * RCH;
    float acc[RCH];
#pragma unroll
    for (int u = 0; u < RCH; ++u) acc[u] = 0.0f;
    for (int k = threadIdx.x; k < kdim; k += blockDim.x) {
        float xv = ld(x, xdt, row * kdim + k);
        if (has_mask) xv *= ld(mask, mdt, row * kdim + k);
#pragma unroll
        for (int u = 0; u < RCH; ++u)
            if (j0 + u < r) acc[u] += xv * ld(w, wdt, (i64)(j0 + u) * sj + (i64)k * sk);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int u = 0; u < RCH; ++u) {
        float v = warp_sum(acc[u]);
        if (lane == 0) red[u][warp] = v;
    }
    __syncthreads();
    if (threadIdx.x < RCH && j0 + threadIdx.x < r) {
        float v = 0.0f;
        for (int q = 0; q < (int)(blockDim.x >> 5); ++q) v += red[threadIdx.x][q];
        st(out, odt, row * r + j0 + threadIdx.x, v);
    }
}

extern "C" __global__ void lora_add_k(void* y, int ydt, const void* xa, int xadt, const void* b, int bdt, i64 m, int n,
                                      int r, float s) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < m * n; i += (i64)gridDim.x * blockDim.x) {
        i64 row = i / n, col = i % n;
        float acc = 0.0f;
        for (int j = 0; j < r; ++j) acc += ld(xa, xadt, row * r + j) * ld(b, bdt, col * r + j);
        st(y, ydt, i, ld(y, ydt, i) + s * acc);
    }
}

extern "C" __global__ void lora_dx_k(void* dx, int dxdt, const void* dyb, int dybdt, const void* a, int adt,
                                     const void* mask, int mdt, int has_mask, i64 m, int k, int r, float s) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < m * k; i += (i64)gridDim.x * blockDim.x) {
        i64 row = i / k, col = i % k;
        float acc = 0.0f;
        for (int j = 0; j < r; ++j) acc += ld(dyb, dybdt, row * r + j) * ld(a, adt, (i64)j * k + col);
        if (has_mask) acc *= ld(mask, mdt, i);
        st(dx, dxdt, i, ld(dx, dxdt, i) + s * acc);
    }
}

extern "C" __global__ void lora_da_k(const void* dyb, int dybdt, const void* x, int xdt, const void* mask, int mdt,
                                     int has_mask, void* da, int dadt, i64 m, int k, int r, float s) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    const int j0 = blockIdx.y * RCH;
    if (col >= k) return;
    float acc[RCH];
#pragma unroll
    for (int u = 0; u < RCH; ++u) acc[u] = 0.0f;
    for (i64 row = 0; row < m; ++row) {
        float xv = ld(x, xdt, row * k + col);
        if (has_mask) xv *= ld(mask, mdt, row * k + col);
#pragma unroll
        for (int u = 0; u < RCH; ++u)
            if (j0 + u < r) acc[u] += ld(dyb, dybdt, row * r + j0 + u) * xv;
    }
#pragma unroll
    for (int u = 0; u < RCH; ++u)
        if (j0 + u < r) {
            i64 o = (i64)(j0 + u) * k + col;
            st(da, dadt, o, ld(da, dadt, o) + s * acc[u]);
        }
}

extern "C" __global__ void lora_db_k(const void* dy, int dydt, const void* xa, int xadt, void* db, int dbdt, i64 m, int n,
                                     int r, float s) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    const int j0 = blockIdx.y * RCH;
    if (col >= n) return;
    float acc[RCH];
#pragma unroll
    for (int u = 0; u < RCH; ++u) acc[u] = 0.0f;
    for (i64 row = 0; row < m; ++row) {
        float d = ld(dy, dydt, row * n + col);
#pragma unroll
        for (int u = 0; u < RCH; ++u)
            if (j0 + u < r) acc[u] += d * ld(xa, xadt, row * r + j0 + u);
    }
#pragma unroll
    for (int u = 0; u < RCH; ++u)
        if (j0 + u < r) {
            i64 o = (i64)col * r + j0 + u;
            st(db, dbdt, o, ld(db, dbdt, o) + s * acc[u]);
        }
}
