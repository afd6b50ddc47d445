// elementwise.cu — fill, copy/cast, axpy, scale, mul, dropout masks: one pass over flat buffers of n
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

// Inverted-dropout mask from a counter-based hash (the CPU reference is crates/kernels/src/cpu/
// dropout.rs; the two must give identical bits): out[i] = 0 if splitmix64(key + i·γ) < thr, else keep.
// key = splitmix64(seed ^ splitmix64(stream)), thr = floor(p·2^64) and keep = f32(1/(1−p)) come from
// the host, so the decision is pure u64 integer arithmetic (wrapping, as Rust's wrapping_*) and the
// stored value is one host-rounded float. key and thr travel as i64 bit patterns.
__device__ __forceinline__ unsigned long long splitmix64_dev(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

extern "C" __global__ void dropout_mask_k(void* out, int odt, i64 n, i64 key, i64 thr, float keep) {
    const unsigned long long k = (unsigned long long)key, t = (unsigned long long)thr;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        unsigned long long bits = splitmix64_dev(k + (unsigned long long)i * 0x9E3779B97F4A7C15ull);
        st(out, odt, i, bits < t ? 0.0f : keep);
    }
}
