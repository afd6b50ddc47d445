// rope.cu — rotary position embedding in place, split-halves (NeoX / Hugging Face) convention:
//   for i < D/2, angle = pos·theta^(−2i/D) (negated when inverse != 0, the backward):
//   x[i]       ← x[i]·cos − x[i + D/2]·sin
//   x[i + D/2] ← x[i + D/2]·cos + x[i]·sin
//
// Layouts: x [N, heads, D] f32/bf16/f16; pos [N] i32 (per token; packing restarts positions).
// Launch geometry (launch::plan_elementwise over N·heads·D/2 pairs): 1-D grid-stride, 256 threads.
// The angle is computed in f64-free f32 as pos·exp2(−(2i/D)·log2(theta)), like the CPU reference's
// inverse frequencies (f32), then sincosf with full precision (no fast math).

// afinar:hot
extern "C" __global__ void rope_k(void* x, int xdt, const int* pos, i64 n, int heads, int d, float theta, int inverse) {
    int half = d / 2;
    i64 pairs = n * heads * half;
    for (i64 p = blockIdx.x * (i64)blockDim.x + threadIdx.x; p < pairs; p += (i64)gridDim.x * blockDim.x) {
        int i = (int)(p % half);
        i64 th = p / half;          // token·heads + head
        i64 tok = th / heads;
        float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)d);
        float ang = (float)pos[tok] * inv_freq;
        float s, c;
        sincosf(ang, &s, &c);
        if (inverse) s = -s;
        i64 base = th * d;
        float a = ld(x, xdt, base + i), b = ld(x, xdt, base + i + half);
        st(x, xdt, base + i, a * c - b * s);
        st(x, xdt, base + i + half, b * c + a * s);
    }
}
