// check_gemm.cpp — the fallback SIMT GEMM, all transpose combinations.
#include "check.h"
#include "../gemm.cu"

static void test_transposes() {
    Rng g{5};
    // Fallback GEMM, all four transpose combinations: C[M,N] = 0.5·op(A)·op(B) + 2·C.
    for (int ta = 0; ta < 2; ++ta)
        for (int tb = 0; tb < 2; ++tb) {
            int M = 17, N = 21, K = 35;
            auto A = g.vec((size_t)M * K, 1), Bm = g.vec((size_t)K * N, 1), Cm = g.vec((size_t)M * N, 1);
            std::vector<float> c = Cm;
            emu_launch(gemm_fallback_k, dim3{(unsigned)((N + 15) / 16), (unsigned)((M + 15) / 16)}, dim3{16, 16}, (const void*)A.data(), DT_F32, (i64)(ta ? M : K), ta,
                       (const void*)Bm.data(), DT_F32, (i64)(tb ? K : N), tb, (void*)c.data(), DT_F32, M, N, K, 0.5f, 2.0f);
            std::vector<double> w((size_t)M * N);
            for (int i = 0; i < M; ++i) for (int j = 0; j < N; ++j) {
                double acc = 0;
                for (int q = 0; q < K; ++q) acc += (double)(ta ? A[q * M + i] : A[i * K + q]) * (tb ? Bm[j * K + q] : Bm[q * N + j]);
                w[i * N + j] = 0.5 * acc + 2.0 * Cm[i * N + j];
            }
            check("gemm_fallback ta=" + std::to_string(ta) + " tb=" + std::to_string(tb), c, w, 1e-5, 1e-5);
        }
}

static void test_f16() {
    Rng g{1616};
    // Fallback GEMM with f16 A, B and C: C = 0.5·A·Bᵀ + 2·C.
    {
        int M = 17, N = 21, K = 35;
        auto A = round_hv(g.vec((size_t)M * K, 1)), Bm = round_hv(g.vec((size_t)N * K, 1)), Cm = round_hv(g.vec((size_t)M * N, 1));
        auto A16 = to_h(A), B16 = to_h(Bm), C16 = to_h(Cm);
        emu_launch(gemm_fallback_k, dim3{(unsigned)((N + 15) / 16), (unsigned)((M + 15) / 16)}, dim3{16, 16}, (const void*)A16.data(), DT_F16, (i64)K, 0,
                   (const void*)B16.data(), DT_F16, (i64)K, 1, (void*)C16.data(), DT_F16, M, N, K, 0.5f, 2.0f);
        std::vector<double> wc((size_t)M * N);
        for (int i = 0; i < M; ++i) for (int j = 0; j < N; ++j) { double acc = 0; for (int q = 0; q < K; ++q) acc += (double)A[i * K + q] * Bm[j * K + q]; wc[i * N + j] = 0.5 * acc + 2.0 * Cm[i * N + j]; }
        check("f16 gemm_fallback A/B/C f16", from_h(C16), round_h(wc), 1e-5, HU);
    }
}

void check_gemm() {
    test_transposes();
    test_f16();
}
