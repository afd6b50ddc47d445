// check_cross_entropy.cpp — per-row soft-capped cross-entropy and its gradient.
#include "check.h"
#include "../cross_entropy.cu"

static void test_cross_entropy() {
    int n = 5, v = 300;
    Rng g{99};
    auto logits = g.vec((size_t)n * v, 8);
    std::vector<int> labels = {3, -100, 299, 0, 150};
    for (float cap : {0.0f, 30.0f}) {
        std::vector<float> dl((size_t)n * v, NAN), loss(n, NAN);
        emu_launch(ce_row_k, dim3{(unsigned)n}, dim3{256}, (const void*)logits.data(), DT_F32, (const int*)labels.data(), v, cap, 0.5f, (void*)dl.data(), DT_F32, 1, loss.data());
        std::vector<double> wl(n), wd((size_t)n * v);
        for (int i = 0; i < n; ++i) {
            if (labels[i] == -100) continue;
            std::vector<double> z(v); double mx = -INFINITY;
            for (int j = 0; j < v; ++j) { double x = logits[(size_t)i * v + j]; z[j] = cap > 0 ? cap * std::tanh(x / cap) : x; mx = std::max(mx, z[j]); }
            double sum = 0; for (int j = 0; j < v; ++j) sum += std::exp(z[j] - mx);
            double lse = mx + std::log(sum);
            wl[i] = lse - z[labels[i]];
            for (int j = 0; j < v; ++j) {
                double gr = std::exp(z[j] - lse) - (j == labels[i]);
                if (cap > 0) { double t = z[j] / cap; gr *= 1 - t * t; }
                wd[(size_t)i * v + j] = 0.5 * gr;
            }
        }
        check("ce_row loss cap=" + std::to_string((int)cap), loss, wl, 1e-5, 1e-5);
        check("ce_row dlogits cap=" + std::to_string((int)cap), dl, wd, 1e-6, 1e-4);
    }
}


static void test_f16() {
    Rng g{1616};
    // Cross-entropy: f16 logits, f16 dlogits written in place over the logits (aliasing allowed).
    {
        int rows = 4, v = 300;
        auto logits = round_hv(g.vec((size_t)rows * v, 8));
        auto l16 = to_h(logits);
        std::vector<int> labels = {3, -100, 299, 0};
        std::vector<float> loss(rows, NAN);
        emu_launch(ce_row_k, dim3{(unsigned)rows}, dim3{256}, (const void*)l16.data(), DT_F16, (const int*)labels.data(), v, 30.0f, 0.5f, (void*)l16.data(), DT_F16, 1, loss.data());
        std::vector<double> wl(rows), wd((size_t)rows * v);
        for (int i = 0; i < rows; ++i) {
            if (labels[i] == -100) continue;
            std::vector<double> z(v); double mx = -INFINITY;
            for (int j = 0; j < v; ++j) { z[j] = 30.0 * std::tanh(logits[(size_t)i * v + j] / 30.0); mx = std::max(mx, z[j]); }
            double sum = 0; for (int j = 0; j < v; ++j) sum += std::exp(z[j] - mx);
            double lse = mx + std::log(sum);
            wl[i] = lse - z[labels[i]];
            for (int j = 0; j < v; ++j) { double t = z[j] / 30.0; wd[(size_t)i * v + j] = 0.5 * (std::exp(z[j] - lse) - (j == labels[i])) * (1 - t * t); }
        }
        check("f16 ce_row loss", loss, wl, 1e-5, 1e-5);
        // Rows with label -100 are not written (their logits stay): compare only trained rows.
        std::vector<float> got; std::vector<double> want;
        for (int i = 0; i < rows; ++i) if (labels[i] != -100) for (int j = 0; j < v; ++j) { got.push_back((float)ref_h2f(l16[(size_t)i * v + j])); want.push_back(hr((float)wd[(size_t)i * v + j])); }
        check("f16 ce_row dlogits (in place)", got, want, 1e-7, HU);
    }
}

void check_cross_entropy() {
    test_cross_entropy();
    test_f16();
}
