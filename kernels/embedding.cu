// embedding.cu — token embedding lookup and its backward.
//   fwd: out[i, :] = table[ids[i], :]·scale           (writes)
//   bwd: dtable[ids[i], :] += scale·dout[i, :]         (adds; atomics, since ids repeat)
// The backend checks the ids against [0, v) before launching (from the range it recorded when the
// ids were uploaded); the kernels still never touch the table at an id outside [0, v): such a row
// reads as zeros (fwd) or is skipped (bwd), so a bad id can never read or write out of bounds.
//
// Layouts: ids [N] i32; table, dtable [V, H]; out, dout [N, H]; f32/bf16/f16.
// Launch geometry: one block per token row (grid.x = N), 256 threads striding over H.

// afinar:hot
extern "C" __global__ void embedding_fwd_k(const int* ids, const void* table, int tdt, void* out, int odt, int v, int h,
                                           float scale) {
    i64 row = blockIdx.x;
    int id = ids[row];
    bool ok = id >= 0 && id < v;
    i64 src = ok ? (i64)id * h : 0;
    for (int j = threadIdx.x; j < h; j += blockDim.x) st(out, odt, row * h + j, ok ? ld(table, tdt, src + j) * scale : 0.0f);
}

extern "C" __global__ void embedding_bwd_k(const int* ids, const void* dout, int ddt, void* dtable, int tdt, int v, int h,
                                           float scale) {
    i64 row = blockIdx.x;
    int id = ids[row];
    if (id < 0 || id >= v) return;
    i64 dst = (i64)id * h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) atomic_add_any(dtable, tdt, dst + j, scale * ld(dout, ddt, row * h + j));
}
