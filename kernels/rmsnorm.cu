// rmsnorm.cu — Gemma RMSNorm over rows: y = x·r·(1 + w), r = rsqrt(mean(x²) + eps), in f32.
// Backward (g = dy⊙(1 + w)):  dx = r·g − r³·x·(Σ_j g_j·x_j)/H;   dw_j += Σ_rows dy_j·x_j·r.
//
// Layouts: x, y, dy, dx [N, H]; w, dw [H]; rstd [N] (saved by the forward). f32/bf16/f16 each.
// Launch geometry (launch::plan_rows): fwd/bwd one block per row (grid.x = N, ≤ 2^31−1), block =
// min(1024, round_up(H, 32)) threads striding over the row; dw: one thread per column j
// (grid = ceil(H/256), 256 threads) looping over the N rows, so no atomics and a deterministic sum.

// afinar:hot
extern "C" __global__ void rmsnorm_fwd_k(const void* x, int xdt, const void* w, int wdt, void* y, int ydt, void* rstd,
                                         int rdt, int h, float eps) {
    __shared__ float scratch[32];
    i64 row = blockIdx.x;
    i64 base = row * h;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float v = ld(x, xdt, base + j);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    float r = rsqrtf(ss / (float)h + eps);
    for (int j = threadIdx.x; j < h; j += blockDim.x)
        st(y, ydt, base + j, ld(x, xdt, base + j) * r * (1.0f + ld(w, wdt, j)));
    if (threadIdx.x == 0) st(rstd, rdt, row, r);
}

// afinar:hot
extern "C" __global__ void rmsnorm_bwd_k(const void* dy, int dydt, const void* x, int xdt, const void* w, int wdt,
                                         const void* rstd, int rdt, void* dx, int dxdt, int h) {
    __shared__ float scratch[32];
    i64 row = blockIdx.x;
    i64 base = row * h;
    float r = ld(rstd, rdt, row);
    float dot = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x)
        dot += ld(dy, dydt, base + j) * (1.0f + ld(w, wdt, j)) * ld(x, xdt, base + j);
    dot = block_sum(dot, scratch);
    float c = r * r * r * dot / (float)h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float g = ld(dy, dydt, base + j) * (1.0f + ld(w, wdt, j));
        st(dx, dxdt, base + j, r * g - c * ld(x, xdt, base + j));
    }
}

// dw[j] += Σ_rows dy[row, j]·x[row, j]·rstd[row]
extern "C" __global__ void rmsnorm_dw_k(const void* dy, int dydt, const void* x, int xdt, const void* rstd, int rdt,
                                        void* dw, int dwdt, i64 n, int h) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= h) return;
    float acc = 0.0f;
    for (i64 row = 0; row < n; ++row) acc += ld(dy, dydt, row * h + j) * ld(x, xdt, row * h + j) * ld(rstd, rdt, row);
    st(dw, dwdt, j, ld(dw, dwdt, j) + acc);
}
