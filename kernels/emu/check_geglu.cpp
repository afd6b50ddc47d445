// check_geglu.cpp — tanh-GELU gate × up, forward and backward.
#include "check.h"
#include "../geglu.cu"

static void test_bf16() {
    Rng g{77};
    auto [n, a, b, a16, b16] = bf16_inputs(g, 1000);
    // geglu fwd (bf16 in, bf16 out) and bwd (f32 out).
    std::vector<unsigned short> o16(n, 0xffff);
    emu_launch(geglu_fwd_k, dim3{2}, dim3{256}, (const void*)a16.data(), DT_BF16, (const void*)b16.data(), DT_BF16, (void*)o16.data(), DT_BF16, (i64)n);
    std::vector<double> w(n), wdg(n), wdu(n);
    auto dout = g.vec(n, 1);
    for (int i = 0; i < n; ++i) {
        double x = a[i], t = std::tanh(0.7978845608028654 * (x + 0.044715 * x * x * x));
        double gelu = 0.5 * x * (1 + t);
        double dgelu = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * 0.7978845608028654 * (1 + 3 * 0.044715 * x * x);
        w[i] = gelu * b[i];
        wdg[i] = dout[i] * b[i] * dgelu;
        wdu[i] = dout[i] * gelu;
    }
    check("geglu_fwd bf16", unbf(o16), rbf(w), 1e-6, 1e-6);
    std::vector<float> dg(n, NAN), du(n, NAN);
    emu_launch(geglu_bwd_k, dim3{2}, dim3{256}, (const void*)dout.data(), DT_F32, (const void*)a16.data(), DT_BF16, (const void*)b16.data(), DT_BF16, (void*)dg.data(), DT_F32, (void*)du.data(), DT_F32, (i64)n);
    check("geglu_bwd dgate", dg, wdg, 1e-5, 1e-4);
    check("geglu_bwd dup", du, wdu, 1e-5, 1e-4);
}

static void test_f16() {
    Rng g{1616};
    auto [n, a, b, a16, b16] = f16_inputs(g, 777);
    std::vector<unsigned short> o16(n, 0xffff);
    emu_launch(geglu_fwd_k, dim3{2}, dim3{256}, (const void*)a16.data(), DT_F16, (const void*)b16.data(), DT_F16, (void*)o16.data(), DT_F16, (i64)n);
    std::vector<double> w(n);
    for (int i = 0; i < n; ++i) { double x = a[i], t = std::tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)); w[i] = 0.5 * x * (1 + t) * b[i]; }
    check("f16 geglu_fwd", from_h(o16), round_h(w), 1e-6, HU);
}

void check_geglu() {
    test_bf16();
    test_f16();
}
