// common.cuh — shared device helpers, prepended (as text, not #include) to every kernels/*.cu before
// NVRTC compiles it, both at run time (crates/kernels/src/cuda/compile.rs) and in `cargo xtask
// kernels-check`. It needs no CUDA header: bf16 is handled as raw 16-bit storage with explicit
// conversions, and tensor-core instructions are written as inline PTX. That keeps run-time
// compilation independent of where (or whether) the toolkit headers are installed.
//
// Dtype convention (kernels/README.md): a buffer argument is a `const void*` / `void*` plus an `int`
// dtype tag (DT_F32 = 0, DT_BF16 = 1). Memory-bound kernels branch on the tag per access; the branch
// is uniform across the grid, so it costs nothing measurable next to the memory traffic. All
// arithmetic is f32 (f64 for global reductions).

typedef unsigned short bf16_t;
typedef unsigned char u8;
typedef long long i64;

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#define DT_F32 0
#define DT_BF16 1

// bf16 -> f32 is exact: the bf16 bits are the high half of the f32.
__device__ __forceinline__ float bf2f(bf16_t h) { return __uint_as_float(((unsigned)h) << 16); }

// f32 -> bf16, round to nearest even (as torch and half::bf16::from_f32); NaN stays a quiet NaN.
__device__ __forceinline__ bf16_t f2bf(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// Two f32 -> one 32-bit register of two bf16 (low half = first), the operand format of mma.sync.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    return ((unsigned)f2bf(lo)) | (((unsigned)f2bf(hi)) << 16);
}

__device__ __forceinline__ float ld(const void* p, int dt, i64 i) {
    return dt == DT_F32 ? ((const float*)p)[i] : bf2f(((const bf16_t*)p)[i]);
}

__device__ __forceinline__ void st(void* p, int dt, i64 i, float v) {
    if (dt == DT_F32) ((float*)p)[i] = v;
    else ((bf16_t*)p)[i] = f2bf(v);
}

// Writes or accumulates (acc != 0: p[i] += v) one element.
__device__ __forceinline__ void st_acc(void* p, int dt, i64 i, float v, int acc) {
    if (acc) v += ld(p, dt, i);
    st(p, dt, i, v);
}

// Atomic p[i] += v for f32 or bf16 storage (bf16: compare-and-swap on the aligned 32-bit word).
__device__ __forceinline__ void atomic_add_any(void* p, int dt, i64 i, float v) {
    if (dt == DT_F32) {
        atomicAdd(((float*)p) + i, v);
        return;
    }
    bf16_t* h = ((bf16_t*)p) + i;
    unsigned* word = (unsigned*)((size_t)h & ~(size_t)3);
    bool high = ((size_t)h & 2) != 0;
    unsigned old = *word, assumed;
    do {
        assumed = old;
        bf16_t cur = high ? (bf16_t)(assumed >> 16) : (bf16_t)(assumed & 0xffffu);
        bf16_t nxt = f2bf(bf2f(cur) + v);
        unsigned upd = high ? ((assumed & 0x0000ffffu) | ((unsigned)nxt << 16))
                            : ((assumed & 0xffff0000u) | (unsigned)nxt);
        old = atomicCAS(word, assumed, upd);
    } while (old != assumed);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). `scratch` holds 32 floats.
// Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// The 16 NF4 code values (bitsandbytes get_4bit_type("nf4")), index = 4-bit code. Must equal
// afinar_kernels::nf4::NF4_CODE (a Rust test compares the two texts).
#define NF4_TABLE                                                                                  \
    {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,                   \
     -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,                   \
     0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,       \
     0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f}

// The f32 absmax of 64-element block `blk` of an NF4 tensor. nested != 0: double quantization,
// absmax = code8[codes[blk]]·nested_absmax[blk/256] + offset; otherwise plain f32 absmax[blk].
struct Nf4Args {
    const u8* packed;    // ceil(numel/2) bytes, element 2j in the HIGH nibble of byte j
    const u8* codes;     // [blocks] u8 (nested only)
    const float* absmax; // nested: [ceil(blocks/256)] f32 nested absmax; plain: [blocks] f32
    const float* code8;  // [256] signed dynamic map (nested only)
    float offset;        // nested only
    int nested;
};

__device__ __forceinline__ float nf4_absmax(const Nf4Args& w, i64 blk) {
    if (w.nested) return w.code8[w.codes[blk]] * w.absmax[blk >> 8] + w.offset;
    return w.absmax[blk];
}
