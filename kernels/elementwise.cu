// elementwise.cu — fill, copy/cast, axpy, scale, mul: one pass over flat buffers of n
// elements. copy_k also serves Backend::copy_range: the launcher passes both pointers already offset.
//
// Layouts: every buffer is flat [n], f32 or bf16 (dtype tag next to the pointer; see common.cuh).
// Launch geometry (launch::plan_elementwise): 1-D grid-stride loop, 256 threads per block,
// grid = min(ceil(n/256), 65535·4); n may exceed 2^31 (64-bit indices).

// afinar:hot
extern "C" __global__ void fill_k(void* x, int xdt, i64 n, float v) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st(x, xdt, i, v);
}

// dst[i] = src[i], converting between dtypes when they differ.
// afinar:hot
extern "C" __global__ void copy_k(const void* src, int sdt, void* dst, int ddt, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st(dst, ddt, i, ld(src, sdt, i));
}

// y[i] += alpha·x[i]
// afinar:hot
extern "C" __global__ void axpy_k(float alpha, const void* x, int xdt, void* y, int ydt, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st(y, ydt, i, ld(y, ydt, i) + alpha * ld(x, xdt, i));
}

// x[i] *= alpha
extern "C" __global__ void scale_k(void* x, int xdt, i64 n, float alpha) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st(x, xdt, i, ld(x, xdt, i) * alpha);
}

// out[i] = x[i]·m[i] (out may alias x: each element is read before it is written by one thread).
extern "C" __global__ void mul_k(const void* x, int xdt, const void* m, int mdt, void* out, int odt, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        st(out, odt, i, ld(x, xdt, i) * ld(m, mdt, i));
}
