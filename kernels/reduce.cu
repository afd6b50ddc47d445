// reduce.cu — Σ x² in f64 (a piece of the global gradient norm) and a plain Σ x over f32 partials.
//
// Layouts: x flat [n] f32/bf16/f16; partial [grid] f64; out [1] f64.
// Launch geometry (launch::plan_reduce): pass 1 = grid-stride, 256 threads, grid ≤ 1024 blocks, each
// block writes one f64 partial; pass 2 = one block of 256 threads sums the partials in a fixed order,
// so the result is deterministic for a given n and grid.

__device__ __forceinline__ double block_sum_d(double v, double* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0;
    return warp_sum_d(v);
}

// mode 0: Σ x²; mode 1: Σ x.
// afinar:hot
extern "C" __global__ void reduce_partial_k(const void* x, int xdt, i64 n, int mode, double* partial) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        double v = (double)ld(x, xdt, i);
        acc += mode == 0 ? v * v : v;
    }
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

extern "C" __global__ void reduce_final_k(const double* partial, int count, double* out) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
    acc = block_sum_d(acc, scratch);
    if (threadIdx.x == 0) out[0] = acc;
}
