// check_common.cpp — the dtype conversions of common.cuh (f16 ⇄ f32) against an independent reference.
#include "check.h"

static void test_f16_convert() {
    // f16 -> f32: all 65536 patterns (NaNs by class), and f32 -> f16 -> f32 gives every non-NaN back.
    size_t bad = 0;
    for (unsigned h = 0; h < 65536; ++h) {
        float got = h2f((f16_t)h);
        double want = ref_h2f((unsigned short)h);
        bool ok = std::isnan(want) ? std::isnan(got) : (double)got == want && std::signbit(got) == std::signbit(want);
        if (std::isnan(want)) ok = ok && f2h(got) == (h | 0x200u);  // quiet NaN, payload kept
        else ok = ok && f2h(got) == h;
        if (!ok && bad++ < 5) std::printf("  h2f/f2h 0x%04x: got %.9g (back 0x%04x) want %.9g\n", h, got, f2h(got), want);
    }
    if (bad) { ++failures; std::printf("FAIL %-44s %zu/65536 bad\n", "f16 -> f32 exhaustive (+ round trip)", bad); }
    else std::printf("ok   %-44s n=65536 exact\n", "f16 -> f32 exhaustive (+ round trip)");
    // f32 -> f16: every sign/exponent/top-7-mantissa prefix × 60 low-16-bit patterns (ties and their
    // neighbours at every rounding position: normal (13 dropped bits) and subnormal (14..24)), plus
    // 8M random patterns. Covers ±0, subnormal outputs, 65504/65520/inf, NaN.
    std::vector<unsigned> lows = {0u, 1u, 0xffffu, 0x8000u, 0x7fffu, 0x8001u};
    for (int k = 0; k < 16; ++k) for (unsigned d : {0u, 1u, 0xffffffffu}) lows.push_back(((1u << k) + d) & 0xffffu);
    std::sort(lows.begin(), lows.end()); lows.erase(std::unique(lows.begin(), lows.end()), lows.end());
    size_t n = 0; bad = 0;
    auto one = [&](unsigned u) {
        float f; std::memcpy(&f, &u, 4);
        unsigned short got = f2h(f), want = ref_f2h(f);
        ++n;
        if (got != want && bad++ < 5) std::printf("  f2h 0x%08x (%.9g): got 0x%04x want 0x%04x\n", u, f, got, want);
    };
    for (unsigned hi = 0; hi < 65536; ++hi) for (unsigned lo : lows) one((hi << 16) | lo);
    Rng g{0xf16};
    for (int i = 0; i < (1 << 23); ++i) one((unsigned)(g.next() >> 32));
    for (float f : {65504.0f, 65519.99f, 65520.0f, 65536.0f, 1e30f, 5.9604645e-8f, 2.9802322e-8f, 2.9802326e-8f, 6.1035156e-5f, 6.1035152e-5f, 0.0f, -0.0f, INFINITY, -INFINITY})
        { unsigned u; std::memcpy(&u, &f, 4); one(u); }
    if (bad) { ++failures; std::printf("FAIL %-44s %zu/%zu bad\n", "f32 -> f16 dense (RNE, subnormals, inf)", bad, n); }
    else std::printf("ok   %-44s n=%zu exact\n", "f32 -> f16 dense (RNE, subnormals, inf)", n);
    // Spot values that must hold whatever the reference says.
    bool spot = f2h(65504.0f) == 0x7bff && f2h(65520.0f) == 0x7c00 && f2h(65519.0f) == 0x7bff && f2h(-1e9f) == 0xfc00 &&
                f2h(5.9604645e-8f) == 0x0001 && f2h(2.9802322e-8f) == 0x0000 && f2h(2.9802326e-8f) == 0x0001 && f2h(1.0f + 1.0f / 2048) == 0x3c00 &&
                f2h(1.0f + 3.0f / 2048) == 0x3c02 && f2h(-0.0f) == 0x8000 && f2h(6.1035156e-5f) == 0x0400;
    if (!spot) { ++failures; std::printf("FAIL f16 spot values (65504, 65520 -> inf, 2^-24, ties to even)\n"); }
    else std::printf("ok   %-44s\n", "f16 spot values");
}

// Kernels reading and writing f16 storage against double loops on f16-rounded inputs, outputs rounded to
// f16 (atol/rtol ≈ one f16 ulp plus the f32 arithmetic).
void check_common() { test_f16_convert(); }
