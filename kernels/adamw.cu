// adamw.cu — one torch-AdamW step (decoupled weight decay), elementwise over p, g, m, v:
//   p ← p·(1 − lr·wd);  m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²;
//   p ← p − (lr/bc1)·m / (sqrt(v)/sqrt(bc2) + eps),  bc1 = 1 − β1^t, bc2 = 1 − β2^t (computed on the
//   host in f64 and passed as f32).
//
// Layouts: p, g, m, v flat [n]; f32 in the intended setup (LoRA weights and state), any dtype accepted.
// Launch geometry: 1-D grid-stride, 256 threads (launch::plan_elementwise).

// afinar:hot
extern "C" __global__ void adamw_k(void* p, int pdt, const void* g, int gdt, void* m, int mdt, void* v, int vdt, i64 n,
                                   float lr, float beta1, float beta2, float eps, float wd, float bc1, float sqrt_bc2) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float pi = ld(p, pdt, i) * (1.0f - lr * wd);
        float gi = ld(g, gdt, i);
        float mi = beta1 * ld(m, mdt, i) + (1.0f - beta1) * gi;
        float vi = beta2 * ld(v, vdt, i) + (1.0f - beta2) * gi * gi;
        pi -= (lr / bc1) * mi / (sqrtf(vi) / sqrt_bc2 + eps);
        st(m, mdt, i, mi);
        st(v, vdt, i, vi);
        st(p, pdt, i, pi);
    }
}
