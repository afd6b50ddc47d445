// common.cuh — shared device helpers, prepended (as text, not #include) to every kernels/*.cu before
// NVRTC compiles it, both at run time (crates/kernels/src/cuda/compile.rs) and in `cargo xtask
// kernels-check`. It needs no CUDA header: bf16 is handled as raw 16-bit storage with explicit
// conversions, and tensor-core instructions are written as inline PTX. That keeps run-time
// compilation independent of where (or whether) the toolkit headers are installed.
//
// Dtype convention (kernels/README.md): a buffer argument is a `const void*` / `void*` plus an `int`
// dtype tag (DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2). Memory-bound kernels branch on the tag per access; the branch
// is uniform across the grid, so it costs nothing measurable next to the memory traffic. All
// arithmetic is f32 (f64 for global reductions).

typedef unsigned short bf16_t;
typedef unsigned short f16_t;  // IEEE binary16 bits
typedef unsigned char u8;
typedef long long i64;

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#define DT_F32 0
#define DT_BF16 1
#define DT_F16 2

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

// IEEE f16 -> f32, exact (every f16 is an f32): normals rebias the exponent (15 -> 127), subnormals
// are m·2^-24 (exact in f32), inf/NaN keep their payload.
__device__ __forceinline__ float h2f(f16_t h) {
    unsigned sign = ((unsigned)h & 0x8000u) << 16, e = ((unsigned)h >> 10) & 0x1fu, m = (unsigned)h & 0x3ffu;
    if (e == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    if (e == 0u) {
        float v = (float)m * 5.9604644775390625e-8f;  // m·2^-24, exact
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

// f32 -> IEEE f16, round to nearest even (what cvt.rn.f16.f32, torch and half::f16::from_f32 do), as
// a bit routine so the CUDA emulator runs the same code the GPU does:
// |x| ≥ 65520 (halfway between 65504 = max f16 and 2^16, a tie that rounds to the even 2^16) -> ±inf;
// normal range (|x| ≥ 2^-14): rebias and round the 13 dropped mantissa bits (a carry into the exponent
// is correct rounding); below: subnormal m = round(|x|·2^24) by integer shift with ties to even
// (|x| ≤ 2^-25 -> ±0). NaN -> quiet NaN with the top payload bits, sign kept.
__device__ __forceinline__ f16_t f2h(float f) {
    unsigned x = __float_as_uint(f);
    unsigned sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (f16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    if (ax >= 0x477ff000u) return (f16_t)(sign | 0x7c00u);
    if (ax >= 0x38800000u) {
        unsigned r = ax - 0x38000000u;  // exponent bias 127 -> 15
        r += 0xfffu + ((r >> 13) & 1u);
        return (f16_t)(sign | (r >> 13));
    }
    if (ax < 0x33000000u) return (f16_t)sign;  // below 2^-25: rounds to zero
    unsigned e = ax >> 23, mant = (ax & 0x7fffffu) | 0x800000u, shift = 126u - e;  // shift in [14, 24]
    unsigned q = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    q += (rem > half || (rem == half && (q & 1u))) ? 1u : 0u;
    return (f16_t)(sign | q);  // q = 0x400 (rounded up to 2^-14) is the right normal encoding
}

// A 16-bit storage element (bf16 or f16 by tag) <-> f32.
__device__ __forceinline__ float h16_to_f(unsigned short v, int dt) { return dt == DT_BF16 ? bf2f(v) : h2f(v); }
__device__ __forceinline__ unsigned short f_to_h16(float v, int dt) { return dt == DT_BF16 ? f2bf(v) : f2h(v); }

// Two f32 -> one 32-bit register of two 16-bit values (low half = first), bf16 or f16 by tag.
__device__ __forceinline__ unsigned pack_h16x2(float lo, float hi, int dt) {
    return ((unsigned)f_to_h16(lo, dt)) | (((unsigned)f_to_h16(hi, dt)) << 16);
}

__device__ __forceinline__ float ld(const void* p, int dt, i64 i) {
    if (dt == DT_F32) return ((const float*)p)[i];
    return h16_to_f(((const unsigned short*)p)[i], dt);
}

__device__ __forceinline__ void st(void* p, int dt, i64 i, float v) {
    if (dt == DT_F32) ((float*)p)[i] = v;
    else ((unsigned short*)p)[i] = f_to_h16(v, dt);
}

// Writes or accumulates (acc != 0: p[i] += v) one element.
__device__ __forceinline__ void st_acc(void* p, int dt, i64 i, float v, int acc) {
    if (acc) v += ld(p, dt, i);
    st(p, dt, i, v);
}

// Atomic p[i] += v for f32, bf16 or f16 storage (16-bit: compare-and-swap on the aligned 32-bit word).
__device__ __forceinline__ void atomic_add_any(void* p, int dt, i64 i, float v) {
    if (dt == DT_F32) {
        atomicAdd(((float*)p) + i, v);
        return;
    }
    unsigned short* h = ((unsigned short*)p) + i;
    unsigned* word = (unsigned*)((size_t)h & ~(size_t)3);
    bool high = ((size_t)h & 2) != 0;
    unsigned old = *word, assumed;
    do {
        assumed = old;
        unsigned short cur = high ? (unsigned short)(assumed >> 16) : (unsigned short)(assumed & 0xffffu);
        unsigned short nxt = f_to_h16(h16_to_f(cur, dt) + v, dt);
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
// The nested decode is a rounded multiply, then a rounded add (__fmul_rn, __fadd_rn), exactly the
// host's `Nf4Tensor::block_absmax`: written as `a * b + c`, NVRTC contracts it into one FMA (a single
// rounding), which differs from the host by 1 ulp on about one block in ten. This is the only place a
// kernel decodes an absmax; every NF4 kernel calls it.
struct Nf4Args {
    const u8* packed;    // ceil(numel/2) bytes, element 2j in the HIGH nibble of byte j
    const u8* codes;     // [blocks] u8 (nested only)
    const float* absmax; // nested: [ceil(blocks/256)] f32 nested absmax; plain: [blocks] f32
    const float* code8;  // [256] signed dynamic map (nested only)
    float offset;        // nested only
    int nested;
};

__device__ __forceinline__ float nf4_absmax(const Nf4Args& w, i64 blk) {
    if (w.nested) return __fadd_rn(__fmul_rn(w.code8[w.codes[blk]], w.absmax[blk >> 8]), w.offset);
    return w.absmax[blk];
}
