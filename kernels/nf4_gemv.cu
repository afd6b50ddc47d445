// nf4_gemv.cu — decode-shape NF4 linear (M ≤ 8 rows of X), fused dequantization and optional LoRA:
//   Y[m, n] (= or +=) Σ_k X[m, k]·W̃[n, k] + s·Σ_r XA[m, r]·B[n, r]
// where W̃ is the NF4 weight [N, K] (bitsandbytes layout, see nf4_dequant.cu), XA = drop(X)·Aᵀ [M, R]
// is computed beforehand (lora.cu) and B [N, R] is the LoRA up-projection. The LoRA term is added in
// the same pass, so Y is written exactly once.
//
// Layouts: x [M, K], y [M, N], xa [M, R], lb [N, R]: f32/bf16/f16 (dtype tags); NF4 arrays as in
// nf4_dequant.cu. r == 0 means no LoRA (xa/lb are then not read).
// Launch geometry (launch::plan_nf4_gemv): one warp per output column n, 8 warps (256 threads) per
// block, grid.x = ceil(N/8). Fast path (K % 16 == 0): lane ℓ handles 16-element chunks ℓ, ℓ+32, …
// of row n (one uint2 load of 8 packed bytes and one absmax decode per chunk, X read with 16-byte
// loads); each lane keeps M
// partial sums in registers, reduced across the warp with shuffles. Other K: per-element path.

// afinar:hot
extern "C" __global__ void nf4_gemv_k(const void* x, int xdt, const u8* packed, const u8* codes, const float* absmax,
                                      const float* code8, float offset, int nested, void* y, int ydt, int acc_out,
                                      int m, int n, int k, const void* xa, int xadt, const void* lb, int lbdt, int r,
                                      float lscale) {
    __shared__ float lut[16];
    const float table[16] = NF4_TABLE;
    if (threadIdx.x < 16) lut[threadIdx.x] = table[threadIdx.x];
    __syncthreads();
    Nf4Args w = {packed, codes, absmax, code8, offset, nested};
    int lane = threadIdx.x & 31;
    i64 col = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (col >= n) return;
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
    i64 row0 = col * (i64)k;  // flattened index of W̃[col, 0]
    if ((k & 15) == 0) {
        int chunks = k >> 4;
        for (int c = lane; c < chunks; c += 32) {
            i64 e0 = row0 + (i64)c * 16;
            float a = nf4_absmax(w, e0 >> 6);
            uint2 q = *(const uint2*)(packed + (e0 >> 1));
            unsigned words[2] = {q.x, q.y};
            float wv[16];
#pragma unroll
            for (int b = 0; b < 8; ++b) {
                unsigned byte = (words[b >> 2] >> ((b & 3) * 8)) & 0xffu;
                wv[2 * b] = lut[byte >> 4] * a;
                wv[2 * b + 1] = lut[byte & 15u] * a;
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                if (i < m) {
                    // 16 consecutive X values of row i: two 16-byte loads (bf16/f16) or four (f32);
                    // k % 16 == 0 keeps them aligned.
                    const i64 xb = (i64)i * k + (i64)c * 16;
                    float xv[16];
                    if (xdt != DT_F32) {  // bf16 or f16
                        const uint4* p = (const uint4*)(((const unsigned short*)x) + xb);
                        const uint4 u0 = p[0], u1 = p[1];
                        const unsigned words[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
#pragma unroll
                        for (int j = 0; j < 8; ++j) {
                            xv[2 * j] = h16_to_f((unsigned short)(words[j] & 0xffffu), xdt);
                            xv[2 * j + 1] = h16_to_f((unsigned short)(words[j] >> 16), xdt);
                        }
                    } else {
                        const float4* p = (const float4*)(((const float*)x) + xb);
#pragma unroll
                        for (int j = 0; j < 4; ++j) {
                            const float4 f = p[j];
                            xv[4 * j] = f.x;
                            xv[4 * j + 1] = f.y;
                            xv[4 * j + 2] = f.z;
                            xv[4 * j + 3] = f.w;
                        }
                    }
                    float s = 0.0f;
#pragma unroll
                    for (int j = 0; j < 16; ++j) s += xv[j] * wv[j];
                    acc[i] += s;
                }
            }
        }
    } else {
        for (int kk = lane; kk < k; kk += 32) {
            i64 e = row0 + kk;
            u8 byte = packed[e >> 1];
            float wv = lut[(e & 1) ? (byte & 15u) : (byte >> 4)] * nf4_absmax(w, e >> 6);
#pragma unroll
            for (int i = 0; i < 8; ++i)
                if (i < m) acc[i] += ld(x, xdt, (i64)i * k + kk) * wv;
        }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = warp_sum(acc[i]);
    if (lane < m) {
        float out = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i)
            if (i == lane) out = acc[i];
        float lora = 0.0f;
        for (int j = 0; j < r; ++j) lora += ld(xa, xadt, (i64)lane * r + j) * ld(lb, lbdt, col * r + j);
        st_acc(y, ydt, (i64)lane * n + col, out + lscale * lora, acc_out);
    }
}
