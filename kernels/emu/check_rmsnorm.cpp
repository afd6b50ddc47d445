// check_rmsnorm.cpp — Gemma RMSNorm forward, backward and dw.
#include "check.h"
#include "../rmsnorm.cu"

static void test_f32() {
    int n = 3, h = 70;
    Rng g{8};
    auto x = g.vec((size_t)n * h, 2), w = g.vec(h, 0.5), dy = g.vec((size_t)n * h, 1);
    std::vector<float> y((size_t)n * h, NAN), rstd(n, NAN), dx((size_t)n * h, NAN), dw(h, 1.0f);
    emu_launch(rmsnorm_fwd_k, dim3{(unsigned)n}, dim3{96}, (const void*)x.data(), DT_F32, (const void*)w.data(), DT_F32, (void*)y.data(), DT_F32, (void*)rstd.data(), DT_F32, h, 1e-6f);
    emu_launch(rmsnorm_bwd_k, dim3{(unsigned)n}, dim3{96}, (const void*)dy.data(), DT_F32, (const void*)x.data(), DT_F32, (const void*)w.data(), DT_F32, (const void*)rstd.data(), DT_F32, (void*)dx.data(), DT_F32, h);
    emu_launch(rmsnorm_dw_k, dim3{1}, dim3{256}, (const void*)dy.data(), DT_F32, (const void*)x.data(), DT_F32, (const void*)rstd.data(), DT_F32, (void*)dw.data(), DT_F32, (i64)n, h);
    std::vector<double> wy((size_t)n * h), wr(n), wdx((size_t)n * h), wdw(h, 1.0);
    for (int i = 0; i < n; ++i) {
        double ss = 0; for (int j = 0; j < h; ++j) ss += (double)x[i * h + j] * x[i * h + j];
        double r = 1.0 / std::sqrt(ss / h + 1e-6); wr[i] = r;
        double dot = 0; for (int j = 0; j < h; ++j) dot += (double)dy[i * h + j] * (1 + w[j]) * x[i * h + j];
        for (int j = 0; j < h; ++j) {
            wy[i * h + j] = x[i * h + j] * r * (1 + w[j]);
            wdx[i * h + j] = r * dy[i * h + j] * (1 + w[j]) - r * r * r * x[i * h + j] * dot / h;
            wdw[j] += (double)dy[i * h + j] * x[i * h + j] * r;
        }
    }
    check("rmsnorm y", y, wy, 1e-5, 1e-5);
    check("rmsnorm rstd", rstd, wr, 1e-6, 1e-5);
    check("rmsnorm dx", dx, wdx, 1e-5, 1e-4);
    check("rmsnorm dw", dw, wdw, 1e-5, 1e-5);
}

static void test_f16() {
    Rng g{1616};
    // RMSNorm forward f16 in / f16 out, rstd f32; backward dx into f16.
    {
        int rows = 3, h = 70;
        auto x = round_hv(g.vec((size_t)rows * h, 2)), wn = g.vec(h, 0.5), dy = round_hv(g.vec((size_t)rows * h, 1));
        auto x16 = to_h(x), dy16 = to_h(dy);
        std::vector<unsigned short> y16((size_t)rows * h, 0xffff), dx16((size_t)rows * h, 0xffff);
        std::vector<float> rstd(rows, NAN);
        emu_launch(rmsnorm_fwd_k, dim3{(unsigned)rows}, dim3{96}, (const void*)x16.data(), DT_F16, (const void*)wn.data(), DT_F32, (void*)y16.data(), DT_F16, (void*)rstd.data(), DT_F32, h, 1e-6f);
        emu_launch(rmsnorm_bwd_k, dim3{(unsigned)rows}, dim3{96}, (const void*)dy16.data(), DT_F16, (const void*)x16.data(), DT_F16, (const void*)wn.data(), DT_F32, (const void*)rstd.data(), DT_F32, (void*)dx16.data(), DT_F16, h);
        std::vector<double> wyv((size_t)rows * h), wdx((size_t)rows * h);
        for (int i = 0; i < rows; ++i) {
            double ss = 0; for (int j = 0; j < h; ++j) ss += (double)x[i * h + j] * x[i * h + j];
            double r = 1.0 / std::sqrt(ss / h + 1e-6), dot = 0;
            for (int j = 0; j < h; ++j) dot += (double)dy[i * h + j] * (1 + wn[j]) * x[i * h + j];
            for (int j = 0; j < h; ++j) {
                wyv[i * h + j] = x[i * h + j] * r * (1 + wn[j]);
                wdx[i * h + j] = r * dy[i * h + j] * (1 + wn[j]) - r * r * r * x[i * h + j] * dot / h;
            }
        }
        check("f16 rmsnorm y", from_h(y16), round_h(wyv), 1e-5, HU);
        check("f16 rmsnorm dx", from_h(dx16), round_h(wdx), 1e-4, 2 * HU);
    }
}

void check_rmsnorm() {
    test_f32();
    test_f16();
}
