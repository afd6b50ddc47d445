// softcap.cu — Gemma-2 logit soft-capping, y = c·tanh(x/c), and its backward dy ← dy·(1 − (y/c)²).
//
// Layouts: flat [n] f32/bf16/f16, in place. Launch geometry: 1-D grid-stride, 256 threads
// (launch::plan_elementwise).

extern "C" __global__ void softcap_fwd_k(void* x, int xdt, i64 n, float cap) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st(x, xdt, i, cap * tanhf(ld(x, xdt, i) / cap));
}

extern "C" __global__ void softcap_bwd_k(const void* y, int ydt, void* dy, int dydt, i64 n, float cap) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float t = ld(y, ydt, i) / cap;
        st(dy, dydt, i, ld(dy, dydt, i) * (1.0f - t * t));
    }
}
