// adamw.cu — one torch-AdamW step (decoupled weight decay), elementwise over p, g, m, v, in EXACTLY the
// f32 operation order of the CPU reference (crates/kernels/src/cpu/adamw.rs, `AdamScalars::update`),
// which reproduces torch's `_single_tensor_adam`:
//   p ← p·decay                                   (only when has_decay; decay = f32(1 − lr·wd))
//   m ← fma(w1, g − m, m)        if w1_small      (torch's lerp_ with weight w1 = f32(1 − β1))
//   m ← fma(w1 − 1, g − m, g)    otherwise
//   v ← fma(f32(1 − β2)·g, g, v·f32(β2))
//   d ← sqrt(v)/bc2_sqrt + eps
//   p ← p + (neg_step·m)/d                        (neg_step = f32(−lr/(1 − β1^t)))
// The scalars are computed once on the host (`AdamScalars::new`, f64 as torch's Python doubles) and
// passed in. Every operation is an explicitly rounded intrinsic (__fmul_rn, __fadd_rn, __fsub_rn,
// __fdiv_rn, __fsqrt_rn, __fmaf_rn): no FMA contraction, no approximate division or square root,
// whatever the NVRTC flags, so the result is bit-identical to the CPU's for f32 storage (the emulator
// check in kernels/emu/check_adamw.cpp requires that). Subnormals are kept (no --ftz), as on the CPU.
//
// Layouts: p, g, m, v flat [n]; f32 in the intended setup (Storage::Master), any dtype accepted
// (a bf16 p or state is rounded on store, which the CPU does not model).
// Launch geometry: 1-D grid-stride, 256 threads (launch::elementwise).

// afinar:hot
extern "C" __global__ void adamw_k(void* p, int pdt, const void* g, int gdt, void* m, int mdt, void* v, int vdt, i64 n,
                                   int has_decay, float decay, int w1_small, float w1, float w1m1, float b2,
                                   float one_minus_b2, float neg_step, float bc2_sqrt, float eps) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float pi = ld(p, pdt, i);
        float gi = ld(g, gdt, i);
        float mi = ld(m, mdt, i);
        float vi = ld(v, vdt, i);
        if (has_decay) pi = __fmul_rn(pi, decay);
        float diff = __fsub_rn(gi, mi);
        mi = w1_small ? __fmaf_rn(w1, diff, mi) : __fmaf_rn(w1m1, diff, gi);
        vi = __fmaf_rn(__fmul_rn(one_minus_b2, gi), gi, __fmul_rn(vi, b2));
        float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
        pi = __fadd_rn(pi, __fdiv_rn(__fmul_rn(neg_step, mi), denom));
        st(m, mdt, i, mi);
        st(v, vdt, i, vi);
        st(p, pdt, i, pi);
    }
}
