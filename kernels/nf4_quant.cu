// nf4_quant.cu — NF4 quantization on the device (bitsandbytes layout, blocksize 64, optional double
// quantization), bit-identical with the host quantizer afinar_kernels::nf4::quantize (itself bit-exact
// with bitsandbytes: crates/kernels/src/nf4/mod.rs states the rules). The loader uploads a checkpoint
// tensor's stored bytes (f32, bf16 or f16: the `x` tag) and quantizes it here.
//
// Two kernels, because the double-quant offset is torch's f32 mean of ALL absmax values, summed in
// torch's CPU cascade order (nf4/torch_sum.rs): a sequential order no parallel reduction reproduces.
// So pass 1 writes the f32 absmax, the host reads it back (1/32 of the bf16 weight's bytes) and sums it
// in that order (nf4::torch_mean_f32), and pass 2 quantizes `absmax − offset` on the device.
//
// nf4_quant_k — one warp per 64-element block (lane l owns elements 2l, 2l+1 = packed byte l), a
// grid-stride loop over blocks with 256-thread blocks (launch::nf4_quant). Per block:
//   full block:    amax = max|x| (stored as is, 0 for an all-zero block), inv = 1/max(amax, 1e-38),
//                  xn = x·inv;
//   partial last:  clamped = max(max|x|, 1e-38) is stored, xn = x / clamped (a true division);
//   code(xn) = number of the 15 thresholds f32((NF4[i] + NF4[i+1]) / 2) strictly below xn (an exact tie
//   goes to the LOWER code, as bitsandbytes); an odd numel pads the missing last element with 0.0
//   (code 7). Every operation is a correctly rounded IEEE op (__fdiv_rn, __fmul_rn: no contraction,
//   no approximate reciprocal), so the bits are the host's. A NaN or ±inf element sets *bad = 1 (the
//   host then names the first one, as the host quantizer does) and the output is discarded.
// Layouts: x [numel] (tag xdt); packed [ceil(numel/2)] u8, element 2j in the HIGH nibble of byte j;
// absmax [ceil(numel/64)] f32.
//
// nf4_quant_nested_k — the double quantization of `blocks` absmax values: one 256-thread block per
// group of 256 (thread t owns absmax g·256 + t; launch::nf4_quant_nested, blockDim MUST be 256),
// grid-stride over groups. c = absmax − offset; nested = max|c| over the group (max is exact, so the
// order does not matter); inv = 1/nested (no clamp: an all-equal group gives 0·inf = NaN → code 0, as
// bitsandbytes' CUDA kernel and the host); code = the bitsandbytes dQuantize<0> search over the sorted
// 256-entry signed dynamic map map8 (the `code8` of the tensor; nf4q_dq8 below, a transcription of
// nf4::quantize_dynamic8). Layouts: absmax [blocks] f32; map8 [256] f32; codes [blocks] u8; nested [ceil(blocks/256)] f32.

#define NF4Q_FLOOR __uint_as_float(0x006ce3eeu)  // f32(1e-38) = 9.99999935e-39, torch's clamp(min=1e-38)

__device__ __forceinline__ bool nf4q_finite(float v) { return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u; }

// Number of thresholds strictly below xn (NaN: none, code 0).
__device__ __forceinline__ unsigned nf4q_code(float xn, const float* thr) {
    unsigned q = 0;
#pragma unroll
    for (int t = 0; t < 15; ++t) q += thr[t] < xn ? 1u : 0u;
    return q;
}

// afinar:hot
extern "C" __global__ void nf4_quant_k(const void* x, int xdt, i64 numel, u8* packed, float* absmax, int* bad) {
    const float table[16] = NF4_TABLE;
    float thr[15];
#pragma unroll
    for (int t = 0; t < 15; ++t) thr[t] = __fdiv_rn(__fadd_rn(table[t], table[t + 1]), 2.0f);
    int lane = threadIdx.x & 31;
    i64 warps = (i64)gridDim.x * (blockDim.x >> 5);
    i64 nblk = (numel + 63) / 64;
    // b is the same for the 32 lanes of a warp, so the shuffles in warp_max see the whole warp.
    for (i64 b = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); b < nblk; b += warps) {
        i64 e0 = b * 64 + 2 * lane;
        float v0 = e0 < numel ? ld(x, xdt, e0) : 0.0f;
        float v1 = e0 + 1 < numel ? ld(x, xdt, e0 + 1) : 0.0f;
        if (!nf4q_finite(v0) || !nf4q_finite(v1)) *bad = 1;
        float amax = warp_max(fmaxf(fabsf(v0), fabsf(v1)));
        bool full = (b + 1) * 64 <= numel;
        float clamped = fmaxf(amax, NF4Q_FLOOR);
        float inv = __fdiv_rn(1.0f, clamped);
        if (e0 < numel) {
            float x0 = full ? __fmul_rn(v0, inv) : __fdiv_rn(v0, clamped);
            float x1 = full ? __fmul_rn(v1, inv) : __fdiv_rn(v1, clamped);  // v1 = 0 pads an odd tail: code 7
            packed[e0 >> 1] = (u8)((nf4q_code(x0, thr) << 4) | nf4q_code(x1, thr));
        }
        if (lane == 0) absmax[b] = full ? amax : clamped;
    }
}

// bitsandbytes' CUDA dQuantize<0> (General8bit, not stochastic) over a sorted 256-entry map: a 7-step
// binary search from pivot 127, then the nearer of the pivot and its neighbour on x's side by the f32
// midpoint (neighbour + val)·0.5, an exact tie staying on the pivot. NaN gives code 0.
__device__ __forceinline__ u8 nf4q_dq8(const float* code, float x) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f, val = code[pivot];
    for (int i = 64; i > 0; i >>= 1) {
        if (x > val) {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
    }
    if (upper_pivot == 255) upper = code[upper_pivot];
    if (lower_pivot == 0) lower = code[lower_pivot];
    if (x > val) {
        float mid = __fmul_rn(__fadd_rn(upper, val), 0.5f);
        return (u8)(x > mid ? upper_pivot : pivot);
    }
    float mid = __fmul_rn(__fadd_rn(lower, val), 0.5f);
    return (u8)(x < mid ? lower_pivot : pivot);
}

extern "C" __global__ void nf4_quant_nested_k(const float* absmax, i64 blocks, float offset, const float* map8,
                                              u8* codes, float* nested) {
    __shared__ float map[256];
    __shared__ float scratch[32];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) map[i] = map8[i];
    __syncthreads();
    i64 groups = (blocks + 255) / 256;
    for (i64 g = blockIdx.x; g < groups; g += gridDim.x) {
        i64 i = g * 256 + threadIdx.x;
        float c = i < blocks ? __fsub_rn(absmax[i], offset) : 0.0f;  // |0| never raises the max
        float amax = block_max(fabsf(c), scratch);
        float inv = __fdiv_rn(1.0f, amax);
        if (i < blocks) codes[i] = nf4q_dq8(map, __fmul_rn(c, inv));
        if (threadIdx.x == 0) nested[g] = amax;
    }
}
