// nf4_dequant.cu — NF4 (bitsandbytes layout, blocksize 64, optional double-quantized absmax) to dense
// f32/bf16/f16: w[e] = NF4[q(e)]·absmax[e/64], q(e) = high nibble of packed[e/2] for even e, low for odd.
// A fallback and the reference for the fused NF4 GEMM/GEMV; training never dequantizes a whole weight.
//
// Layouts: packed [ceil(numel/2)] u8; codes [blocks] u8 and absmax [ceil(blocks/256)] f32 (nested), or
// absmax [blocks] f32 (plain); code8 [256] f32; out [numel] f32/bf16/f16 (row-major [N, K] when 2-D).
// Launch geometry (launch::plan_nf4_dequant): each thread owns one 16-element chunk (8 packed bytes,
// one uint2 load; 16 | 64 so a chunk never straddles an absmax block) and writes it with 16-byte
// stores; 256 threads per block, 1-D grid-stride over ceil(numel/16) chunks. A ragged last chunk
// (numel % 16 != 0) falls back to per-element code.

// afinar:hot
extern "C" __global__ void nf4_dequant_k(const u8* packed, const u8* codes, const float* absmax, const float* code8,
                                         float offset, int nested, i64 numel, void* out, int odt) {
    __shared__ float lut[16];
    const float table[16] = NF4_TABLE;
    if (threadIdx.x < 16) lut[threadIdx.x] = table[threadIdx.x];
    __syncthreads();
    Nf4Args w = {packed, codes, absmax, code8, offset, nested};
    i64 chunks = (numel + 15) / 16;
    for (i64 c = blockIdx.x * (i64)blockDim.x + threadIdx.x; c < chunks; c += (i64)gridDim.x * blockDim.x) {
        i64 e0 = c * 16;
        float a = nf4_absmax(w, e0 >> 6);
        if (e0 + 16 <= numel) {
            uint2 q = *(const uint2*)(packed + (e0 >> 1));  // 8 bytes, 8-byte aligned (e0/2 % 8 == 0)
            unsigned words[2] = {q.x, q.y};
            float v[16];
#pragma unroll
            for (int b = 0; b < 8; ++b) {
                unsigned byte = (words[b >> 2] >> ((b & 3) * 8)) & 0xffu;
                v[2 * b] = lut[byte >> 4] * a;
                v[2 * b + 1] = lut[byte & 15u] * a;
            }
            if (odt != DT_F32) {  // bf16 or f16: 16 values = two 16-byte stores
                uint4 o0, o1;
                o0.x = pack_h16x2(v[0], v[1], odt);   o0.y = pack_h16x2(v[2], v[3], odt);
                o0.z = pack_h16x2(v[4], v[5], odt);   o0.w = pack_h16x2(v[6], v[7], odt);
                o1.x = pack_h16x2(v[8], v[9], odt);   o1.y = pack_h16x2(v[10], v[11], odt);
                o1.z = pack_h16x2(v[12], v[13], odt); o1.w = pack_h16x2(v[14], v[15], odt);
                uint4* dst = (uint4*)(((bf16_t*)out) + e0);  // 32-byte aligned
                dst[0] = o0;
                dst[1] = o1;
            } else {
                float4* dst = (float4*)(((float*)out) + e0);  // 64-byte aligned
#pragma unroll
                for (int k = 0; k < 4; ++k) dst[k] = make_float4(v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
            }
        } else {
            for (i64 e = e0; e < numel; ++e) {
                u8 byte = packed[e >> 1];
                unsigned qn = (e & 1) ? (byte & 15u) : (byte >> 4);
                st(out, odt, e, lut[qn] * a);
            }
        }
    }
}
