// check_rope.cpp — rotary embedding forward and inverse against the formula.
#include "check.h"
#include "../rope.cu"

// x [tokens, heads, d] rotated by pos·10000^(−2i/d), split halves, in double.
static std::vector<double> ref_rope(const std::vector<float>& xr, const std::vector<int>& pos, int tokens, int heads, int d) {
    std::vector<double> wr(xr.size());
    for (int t = 0; t < tokens; ++t) for (int h = 0; h < heads; ++h) for (int i = 0; i < d / 2; ++i) {
        double ang = pos[t] / std::pow(10000.0, 2.0 * i / d);
        size_t base = ((size_t)t * heads + h) * d;
        wr[base + i] = xr[base + i] * std::cos(ang) - xr[base + i + d / 2] * std::sin(ang);
        wr[base + i + d / 2] = xr[base + i + d / 2] * std::cos(ang) + xr[base + i] * std::sin(ang);
    }
    return wr;
}

static void test_f32() {
    Rng g{77};
    // rope forward then inverse (= identity), against the formula.
    int tokens = 3, heads = 2, d = 8;
    auto xr = g.vec((size_t)tokens * heads * d, 1);
    std::vector<int> pos = {0, 5, 17};
    std::vector<float> xo = xr;
    emu_launch(rope_k, dim3{1}, dim3{256}, (void*)xo.data(), DT_F32, (const int*)pos.data(), (i64)tokens, heads, d, 10000.0f, 0);
    auto wr = ref_rope(xr, pos, tokens, heads, d);
    check("rope", xo, wr, 1e-5, 1e-5);
    emu_launch(rope_k, dim3{1}, dim3{256}, (void*)xo.data(), DT_F32, (const int*)pos.data(), (i64)tokens, heads, d, 10000.0f, 1);
    check("rope inverse", xo, std::vector<double>(xr.begin(), xr.end()), 1e-5, 1e-5);
}

static void test_f16() {
    Rng g{1616};
    // Rope in place on f16.
    {
        int tokens = 3, heads = 2, d = 8;
        auto xr = round_hv(g.vec((size_t)tokens * heads * d, 1));
        auto x16 = to_h(xr);
        std::vector<int> pos = {0, 5, 17};
        emu_launch(rope_k, dim3{1}, dim3{256}, (void*)x16.data(), DT_F16, (const int*)pos.data(), (i64)tokens, heads, d, 10000.0f, 0);
        auto wr = ref_rope(xr, pos, tokens, heads, d);
        check("f16 rope", from_h(x16), round_h(wr), 1e-5, HU);
    }
}

void check_rope() {
    test_f32();
    test_f16();
}
