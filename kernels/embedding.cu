// embedding.cu — token embedding lookup and its backward, plus the id range check.
//   fwd: out[i, :] = table[ids[i], :]·scale           (writes)
//   bwd: dtable[ids[i], :] += scale·dout[i, :]         (adds; atomics, since ids repeat)
//   check: bad[0] = min{i : ids[i] ∉ [0, v)} (bad[0] starts at INT_MAX; the host turns it into an error
//   before the lookup runs).
//
// Layouts: ids [N] i32; table, dtable [V, H]; out, dout [N, H]; f32/bf16/f16.
// Launch geometry: fwd/bwd one block per token row (grid.x = N), 256 threads striding over H;
// check: 1-D grid-stride over N, 256 threads.

extern "C" __global__ void ids_check_k(const int* ids, i64 n, int v, int* bad) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        int id = ids[i];
        if (id < 0 || id >= v) atomicMin(bad, (int)(i < 0x7fffffff ? i : 0x7ffffffe));
    }
}

// Labels: like ids_check_k but −100 (ignore) is allowed.
extern "C" __global__ void labels_check_k(const int* labels, i64 n, int v, int* bad) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        int id = labels[i];
        if (id != -100 && (id < 0 || id >= v)) atomicMin(bad, (int)(i < 0x7fffffff ? i : 0x7ffffffe));
    }
}

// afinar:hot
extern "C" __global__ void embedding_fwd_k(const int* ids, const void* table, int tdt, void* out, int odt, int h, float scale) {
    i64 row = blockIdx.x;
    i64 src = (i64)ids[row] * h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) st(out, odt, row * h + j, ld(table, tdt, src + j) * scale);
}

extern "C" __global__ void embedding_bwd_k(const int* ids, const void* dout, int ddt, void* dtable, int tdt, int h, float scale) {
    i64 row = blockIdx.x;
    i64 dst = (i64)ids[row] * h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) atomic_add_any(dtable, tdt, dst + j, scale * ld(dout, ddt, row * h + j));
}
