// dropout.cu — inverted-dropout masks from a counter-based hash, bit-identical to the CPU backend.
//
// Layout: out flat [n], f32 (or any dtype tag; the backend stores masks in f32 Master buffers).
// Launch geometry (launch::plan_elementwise): 1-D grid-stride loop, 256 threads per block.

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
