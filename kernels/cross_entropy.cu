// cross_entropy.cu — softmax cross-entropy over rows of logits with an optional final soft-cap,
// never materializing a probability matrix: each block streams its own row of V logits twice
// (max/sum, then gradient). The caller (lm_head_ce) feeds it row chunks of the [N, V] logits, so the
// full matrix never exists either.
//
//   z_j = cap·tanh(x_j/cap) (or x_j when cap == 0),  lse = log Σ_j exp(z_j),
//   loss_row = lse − z_label   (0 and not counted when label == −100),
//   dlogits_j = grad_scale·(softmax(z)_j − [j == label])·(1 − (z_j/cap)²)   (0 on ignored rows).
//
// Layouts: logits, dlogits [N, V] f32/bf16/f16 (dlogits may alias logits: each element is read before it
// is overwritten by the same thread); labels [N] i32; row_loss [N] f32 (written for every row).
// Launch geometry (launch::plan_rows): one block per row (grid.x = N), 256…1024 threads striding over V.

__device__ __forceinline__ float capz(float x, float cap) { return cap > 0.0f ? cap * tanhf(x / cap) : x; }

// afinar:hot
extern "C" __global__ void ce_row_k(const void* logits, int ldt, const int* labels, int v, float cap, float grad_scale,
                                    void* dlogits, int ddt, int want_grad, float* row_loss) {
    __shared__ float scratch[32];
    i64 row = blockIdx.x;
    i64 base = row * (i64)v;
    int label = labels[row];
    // −100 is the ignored row; any other label outside [0, v) was refused by the backend before the
    // launch, and is treated as ignored here so that it can never index outside the row.
    if (label < 0 || label >= v) {
        if (want_grad)
            for (int j = threadIdx.x; j < v; j += blockDim.x) st(dlogits, ddt, base + j, 0.0f);
        if (threadIdx.x == 0) row_loss[row] = 0.0f;
        return;
    }
    // Online max/sum per thread, then merged across the block.
    float m = -INFINITY, s = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float z = capz(ld(logits, ldt, base + j), cap);
        if (z > m) {
            s = s * expf(m - z) + 1.0f;
            m = z;
        } else {
            s += expf(z - m);
        }
    }
    float gm = block_max(m, scratch);
    float part = m == -INFINITY ? 0.0f : s * expf(m - gm);
    float tot = block_sum(part, scratch);
    float lse = gm + logf(tot);
    if (threadIdx.x == 0) row_loss[row] = lse - capz(ld(logits, ldt, base + label), cap);
    __syncthreads();  // every thread has read logits[label] before any gradient overwrites it
    if (want_grad) {
        for (int j = threadIdx.x; j < v; j += blockDim.x) {
            float z = capz(ld(logits, ldt, base + j), cap);
            float g = expf(z - lse) - (j == label ? 1.0f : 0.0f);
            if (cap > 0.0f) {
                float t = z / cap;
                g *= 1.0f - t * t;
            }
            st(dlogits, ddt, base + j, grad_scale * g);
        }
    }
}
