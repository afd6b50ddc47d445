// gemm.cu — a plain tiled SIMT GEMM, the fallback for dense matmuls when cuBLAS cannot be loaded
// (the backend prefers cuBLAS: bf16 tensor cores, f32 accumulate) and an independent reference for it.
//   C[M, N] = alpha·op(A)·op(B) + beta·C,  op(A) [M, K], op(B) [K, N], row-major storage:
//   op(A)[m, k] = ta ? a[k·lda + m] : a[m·lda + k];  op(B)[k, n] = tb ? b[n·ldb + k] : b[k·ldb + n].
// beta == 0 overwrites (C is not read, so poisoned/NaN contents do not leak in).
//
// Layouts: a, b, c f32/bf16/f16 by tag. Launch geometry (launch::plan_gemm_fallback): 16×16 threads, one
// output each, grid = (ceil(N/16), ceil(M/16)); shared tiles 16×17 f32 (padded against bank conflicts).

extern "C" __global__ void gemm_fallback_k(const void* a, int adt, i64 lda, int ta, const void* b, int bdt, i64 ldb, int tb,
                                           void* c, int cdt, int m, int n, int k, float alpha, float beta) {
    __shared__ float As[16][17];
    __shared__ float Bs[16][17];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const i64 row = (i64)blockIdx.y * 16 + ty, col = (i64)blockIdx.x * 16 + tx;
    float acc = 0.0f;
    for (int k0 = 0; k0 < k; k0 += 16) {
        i64 ka = k0 + tx, kb = k0 + ty;
        As[ty][tx] = (row < m && ka < k) ? ld(a, adt, ta ? ka * lda + row : row * lda + ka) : 0.0f;
        Bs[ty][tx] = (col < n && kb < k) ? ld(b, bdt, tb ? col * ldb + kb : kb * ldb + col) : 0.0f;
        __syncthreads();
#pragma unroll
        for (int u = 0; u < 16; ++u) acc += As[ty][u] * Bs[u][tx];
        __syncthreads();
    }
    if (row < m && col < n) {
        float v = alpha * acc;
        if (beta != 0.0f) v += beta * ld(c, cdt, row * n + col);
        st(c, cdt, row * n + col, v);
    }
}
