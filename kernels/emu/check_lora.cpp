// check_lora.cpp — the small-rank LoRA halves with fused dropout.
#include "check.h"
#include "../lora.cu"

static void test_lora() {
    int m = 7, k = 45, n = 19, r = 18;
    Rng g{5};
    auto x = g.vec((size_t)m * k, 1), a = g.vec((size_t)r * k, 1), b = g.vec((size_t)n * r, 1), dy = g.vec((size_t)m * n, 1);
    std::vector<float> mask((size_t)m * k);
    for (auto& v : mask) v = g.uni(1) < -0.5f ? 0.0f : 1.25f;
    float s = 0.5f;
    // xa = drop(X)·Aᵀ
    std::vector<float> xa((size_t)m * r, NAN);
    emu_launch(lora_proj_k, dim3{(unsigned)m, (unsigned)((r + 15) / 16)}, dim3{256}, (const void*)x.data(), DT_F32, (const void*)mask.data(), DT_F32, 1, (const void*)a.data(), DT_F32, (i64)k, (i64)1, (void*)xa.data(), DT_F32, k, r);
    std::vector<double> wxa((size_t)m * r);
    for (int i = 0; i < m; ++i) for (int j = 0; j < r; ++j) { double acc = 0; for (int q = 0; q < k; ++q) acc += (double)x[i * k + q] * mask[i * k + q] * a[j * k + q]; wxa[i * r + j] = acc; }
    check("lora_proj xa", xa, wxa, 1e-5, 1e-5);
    // dyb = dY·B (strided weight access)
    std::vector<float> dyb((size_t)m * r, NAN);
    emu_launch(lora_proj_k, dim3{(unsigned)m, (unsigned)((r + 15) / 16)}, dim3{256}, (const void*)dy.data(), DT_F32, (const void*)nullptr, DT_F32, 0, (const void*)b.data(), DT_F32, (i64)1, (i64)r, (void*)dyb.data(), DT_F32, n, r);
    std::vector<double> wdyb((size_t)m * r);
    for (int i = 0; i < m; ++i) for (int j = 0; j < r; ++j) { double acc = 0; for (int q = 0; q < n; ++q) acc += (double)dy[i * n + q] * b[q * r + j]; wdyb[i * r + j] = acc; }
    check("lora_proj dyb", dyb, wdyb, 1e-5, 1e-5);
    // da += s·dYBᵀ·drop(X); db += s·dYᵀ·XA; dx += s·(dYB·A)⊙mask; y += s·XA·Bᵀ
    std::vector<float> da((size_t)r * k, 1.0f), db((size_t)n * r, 1.0f), dx((size_t)m * k, 1.0f), y((size_t)m * n, 1.0f);
    emu_launch(lora_da_k, dim3{(unsigned)((k + 255) / 256), (unsigned)((r + 15) / 16)}, dim3{256}, (const void*)dyb.data(), DT_F32, (const void*)x.data(), DT_F32, (const void*)mask.data(), DT_F32, 1, (void*)da.data(), DT_F32, (i64)m, k, r, s);
    emu_launch(lora_db_k, dim3{(unsigned)((n + 255) / 256), (unsigned)((r + 15) / 16)}, dim3{256}, (const void*)dy.data(), DT_F32, (const void*)xa.data(), DT_F32, (void*)db.data(), DT_F32, (i64)m, n, r, s);
    emu_launch(lora_dx_k, dim3{1}, dim3{256}, (void*)dx.data(), DT_F32, (const void*)dyb.data(), DT_F32, (const void*)a.data(), DT_F32, (const void*)mask.data(), DT_F32, 1, (i64)m, k, r, s);
    emu_launch(lora_add_k, dim3{1}, dim3{256}, (void*)y.data(), DT_F32, (const void*)xa.data(), DT_F32, (const void*)b.data(), DT_F32, (i64)m, n, r, s);
    std::vector<double> wda((size_t)r * k, 1.0), wdb((size_t)n * r, 1.0), wdx((size_t)m * k, 1.0), wy((size_t)m * n, 1.0);
    for (int j = 0; j < r; ++j) for (int q = 0; q < k; ++q) for (int i = 0; i < m; ++i) wda[j * k + q] += s * (double)dyb[i * r + j] * x[i * k + q] * mask[i * k + q];
    for (int q = 0; q < n; ++q) for (int j = 0; j < r; ++j) for (int i = 0; i < m; ++i) wdb[q * r + j] += s * (double)dy[i * n + q] * xa[i * r + j];
    for (int i = 0; i < m; ++i) for (int q = 0; q < k; ++q) { double acc = 0; for (int j = 0; j < r; ++j) acc += (double)dyb[i * r + j] * a[j * k + q]; wdx[i * k + q] += s * acc * mask[i * k + q]; }
    for (int i = 0; i < m; ++i) for (int q = 0; q < n; ++q) { double acc = 0; for (int j = 0; j < r; ++j) acc += (double)xa[i * r + j] * b[q * r + j]; wy[i * n + q] += s * acc; }
    check("lora_da", da, wda, 1e-5, 1e-5);
    check("lora_db", db, wdb, 1e-5, 1e-5);
    check("lora_dx", dx, wdx, 1e-5, 1e-5);
    check("lora_add", y, wy, 1e-5, 1e-5);
}

static void test_f16() {
    Rng g{1616};
    // LoRA halves with f16 activations (X, dY, Y, dX in f16; A, B, xa, dyb, dA, dB in f32).
    {
        int m = 6, k = 45, nn = 19, r = 5;
        auto x = round_hv(g.vec((size_t)m * k, 1)), la = g.vec((size_t)r * k, 1), lb = g.vec((size_t)nn * r, 1), dy = round_hv(g.vec((size_t)m * nn, 1));
        auto x16 = to_h(x), dy16 = to_h(dy);
        std::vector<float> xa((size_t)m * r, NAN), da((size_t)r * k, 0.0f);
        emu_launch(lora_proj_k, dim3{(unsigned)m, 1}, dim3{256}, (const void*)x16.data(), DT_F16, (const void*)nullptr, DT_F32, 0, (const void*)la.data(), DT_F32, (i64)k, (i64)1, (void*)xa.data(), DT_F32, k, r);
        std::vector<double> wxa((size_t)m * r);
        for (int i = 0; i < m; ++i) for (int j = 0; j < r; ++j) { double acc = 0; for (int q = 0; q < k; ++q) acc += (double)x[i * k + q] * la[j * k + q]; wxa[i * r + j] = acc; }
        check("f16 lora_proj xa (X f16)", xa, wxa, 1e-5, 1e-5);
        std::vector<unsigned short> y16((size_t)m * nn, ref_f2h(1.0f));
        emu_launch(lora_add_k, dim3{1}, dim3{256}, (void*)y16.data(), DT_F16, (const void*)xa.data(), DT_F32, (const void*)lb.data(), DT_F32, (i64)m, nn, r, 0.5f);
        std::vector<double> wy2((size_t)m * nn);
        for (int i = 0; i < m; ++i) for (int q = 0; q < nn; ++q) { double acc = 0; for (int j = 0; j < r; ++j) acc += (double)xa[i * r + j] * lb[q * r + j]; wy2[i * nn + q] = hr(1.0f + (float)(0.5 * acc)); }
        check("f16 lora_add into f16 Y", from_h(y16), wy2, 1e-5, HU);
        emu_launch(lora_da_k, dim3{1, 1}, dim3{256}, (const void*)xa.data(), DT_F32, (const void*)x16.data(), DT_F16, (const void*)nullptr, DT_F32, 0, (void*)da.data(), DT_F32, (i64)m, k, r, 0.5f);
        std::vector<double> wda((size_t)r * k, 0.0);
        for (int j = 0; j < r; ++j) for (int q = 0; q < k; ++q) for (int i = 0; i < m; ++i) wda[j * k + q] += 0.5 * (double)xa[i * r + j] * x[i * k + q];
        check("f16 lora_da (X f16)", da, wda, 1e-5, 1e-5);
    }
}

void check_lora() {
    test_lora();
    test_f16();
}
