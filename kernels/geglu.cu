// geglu.cu — GeGLU with the tanh GELU (Gemma-2's gelu_pytorch_tanh):
//   out = gelu(gate)·up,  gelu(g) = 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))).
// Backward: dgate = dout·up·gelu'(g), dup = dout·gelu(g), with
//   gelu'(g) = 0.5·(1 + t) + 0.5·g·(1 − t²)·√(2/π)·(1 + 3·0.044715·g²),  t = tanh(…).
//
// Layouts: gate, up, out, dout, dgate, dup flat [n] (any shape), f32/bf16/f16; outputs overwritten.
// Launch geometry: 1-D grid-stride, 256 threads (launch::plan_elementwise).

#define GELU_K0 0.7978845608028654f
#define GELU_K1 0.044715f

// afinar:hot
extern "C" __global__ void geglu_fwd_k(const void* gate, int gdt, const void* up, int udt, void* out, int odt, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float g = ld(gate, gdt, i);
        float t = tanhf(GELU_K0 * (g + GELU_K1 * g * g * g));
        st(out, odt, i, 0.5f * g * (1.0f + t) * ld(up, udt, i));
    }
}

// afinar:hot
extern "C" __global__ void geglu_bwd_k(const void* dout, int ddt, const void* gate, int gdt, const void* up, int udt,
                                       void* dgate, int dgdt, void* dup, int dudt, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float g = ld(gate, gdt, i), u = ld(up, udt, i), d = ld(dout, ddt, i);
        float t = tanhf(GELU_K0 * (g + GELU_K1 * g * g * g));
        float gelu = 0.5f * g * (1.0f + t);
        float dgelu = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * GELU_K0 * (1.0f + 3.0f * GELU_K1 * g * g);
        st(dgate, dgdt, i, d * u * dgelu);
        st(dup, dudt, i, d * gelu);
    }
}
