// check_softcap.cpp — soft-capping c·tanh(x/c), forward and backward.
#include "check.h"
#include "../softcap.cu"

static void test_f32() {
    Rng g{77};
    auto [n, a, b, a16, b16] = bf16_inputs(g, 1000);
    // softcap fwd/bwd in f32.
    std::vector<float> x = a, dy = b;
    emu_launch(softcap_fwd_k, dim3{1}, dim3{256}, (void*)x.data(), DT_F32, (i64)n, 2.0f);
    std::vector<double> wx(n), wdy(n);
    for (int i = 0; i < n; ++i) { wx[i] = 2.0 * std::tanh(a[i] / 2.0); double t = wx[i] / 2.0; wdy[i] = b[i] * (1 - t * t); }
    check("softcap_fwd", x, wx, 1e-6, 1e-6);
    emu_launch(softcap_bwd_k, dim3{1}, dim3{256}, (const void*)x.data(), DT_F32, (void*)dy.data(), DT_F32, (i64)n, 2.0f);
    check("softcap_bwd", dy, wdy, 1e-6, 1e-5);
}

static void test_f16() {
    Rng g{1616};
    auto [n, a, b, a16, b16] = f16_inputs(g, 777);
    std::vector<unsigned short> s16 = a16;
    emu_launch(softcap_fwd_k, dim3{1}, dim3{256}, (void*)s16.data(), DT_F16, (i64)n, 2.0f);
    std::vector<double> ws(n); for (int i = 0; i < n; ++i) ws[i] = 2.0 * std::tanh(a[i] / 2.0);
    check("f16 softcap_fwd in place", from_h(s16), round_h(ws), 1e-6, HU);
}

void check_softcap() {
    test_f32();
    test_f16();
}
