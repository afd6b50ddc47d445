// check.h — shared by the emulated kernel checks: kernels/emu/check_<family>.cpp, one per kernel family
// (each includes only its own .cu files), run in order by main.cpp. Built and run by
// `cargo xtask kernels-check` (g++ ≥ 12, C++20):
//   g++ -std=c++20 -O1 -pthread -I kernels kernels/emu/*.cpp -o check && ./check
// Exit status 0 = every check passed. Shapes are tiny and ragged (not multiples of the tiles).
#pragma once
#include "cuda_emu.h"
#include "../common.cuh"
#include <cstdio>
#include <string>
#include <tuple>

// Failed checks across all families.
inline int failures = 0;

struct Rng {
    uint64_t s;
    uint64_t next() { s ^= s >> 12; s ^= s << 25; s ^= s >> 27; return s * 0x2545F4914F6CDD1DULL; }
    float uni(float a) { return ((next() >> 40) / float(1 << 24) * 2.0f - 1.0f) * a; }
    std::vector<float> vec(size_t n, float a) { std::vector<float> v(n); for (auto& x : v) x = uni(a); return v; }
};

inline unsigned short h_f2bf(float f) {
    unsigned u; std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
inline float h_bf(float f) { unsigned u = ((unsigned)h_f2bf(f)) << 16; float r; std::memcpy(&r, &u, 4); return r; }

inline void check(const std::string& what, const std::vector<float>& got, const std::vector<double>& want, double atol, double rtol) {
    size_t bad = 0, first = 0; double worst = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        double d = std::fabs((double)got[i] - want[i]);
        bool ok = std::isfinite(got[i]) && d <= atol + rtol * std::fabs(want[i]);
        if (!ok) { if (!bad) first = i; ++bad; }
        worst = std::max(worst, std::isfinite(got[i]) ? d : INFINITY);
    }
    if (bad) {
        ++failures;
        std::printf("FAIL %-44s %zu/%zu bad; first [%zu] got %.6g want %.6g; max|d| %.3g\n", what.c_str(), bad, want.size(), first, got[first], want[first], worst);
    } else {
        std::printf("ok   %-44s n=%zu max|d| %.3g\n", what.c_str(), want.size(), worst);
    }
}

inline double maxabs(const std::vector<double>& v) { double m = 0; for (double x : v) m = std::max(m, std::fabs(x)); return m; }

inline void check_bits(const std::string& what, const std::vector<float>& got, const std::vector<float>& want) {
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < want.size(); ++i)
        if (std::memcmp(&got[i], &want[i], 4) != 0) { if (!bad) first = i; ++bad; }
    if (bad) {
        ++failures;
        std::printf("FAIL %-44s %zu/%zu not bit-identical; first [%zu] got %.9g want %.9g\n", what.c_str(), bad, want.size(), first, got[first], want[first]);
    } else {
        std::printf("ok   %-44s n=%zu bit-identical\n", what.c_str(), want.size());
    }
}

// ---- f16 storage (DT_F16) ------------------------------------------------------------------------
// Reference conversions written independently of common.cuh's bit routines: arithmetic in double with
// nearbyint (ties to even under the default rounding mode).
inline unsigned short ref_f2h(float f) {
    unsigned u; std::memcpy(&u, &f, 4);
    unsigned short sign = (unsigned short)((u >> 16) & 0x8000u);
    if (std::isnan(f)) return (unsigned short)(sign | 0x7e00u | ((u >> 13) & 0x3ffu));
    double a = std::fabs((double)f);
    if (a >= 65520.0) return (unsigned short)(sign | 0x7c00u);
    if (a < std::ldexp(1.0, -14)) return (unsigned short)(sign | (unsigned)std::nearbyint(std::ldexp(a, 24)));  // 1024 = 2^-14
    int e; double m = std::frexp(a, &e);  // a = m·2^e, m in [0.5, 1)
    double q = std::nearbyint(std::ldexp(m, 11));  // in [1024, 2048]
    int ex = e - 1;
    if (q == 2048.0) { q = 1024.0; ++ex; }
    if (ex + 15 >= 31) return (unsigned short)(sign | 0x7c00u);
    return (unsigned short)(sign | ((unsigned)(ex + 15) << 10) | ((unsigned)q - 1024u));
}
inline double ref_h2f(unsigned short h) {
    int e = (h >> 10) & 31, m = h & 1023;
    double s = (h & 0x8000) ? -1.0 : 1.0;
    if (e == 31) return m ? NAN : s * INFINITY;
    return e == 0 ? s * std::ldexp((double)m, -24) : s * std::ldexp(1024.0 + m, e - 25);
}
inline float hr(float x) { return (float)ref_h2f(ref_f2h(x)); }  // round to f16 and back
inline std::vector<unsigned short> to_h(const std::vector<float>& v) { std::vector<unsigned short> r(v.size()); for (size_t i = 0; i < v.size(); ++i) r[i] = ref_f2h(v[i]); return r; }
inline std::vector<float> from_h(const std::vector<unsigned short>& v) { std::vector<float> r(v.size()); for (size_t i = 0; i < v.size(); ++i) r[i] = (float)ref_h2f(v[i]); return r; }
inline std::vector<double> round_h(std::vector<double> v) { for (auto& x : v) x = hr((float)x); return v; }
inline std::vector<float> round_hv(std::vector<float> v) { for (auto& x : v) x = hr(x); return v; }

// bf16 storage read back as f32, and a double reference rounded as bf16 storage would round it.
inline std::vector<float> unbf(const std::vector<unsigned short>& v) { std::vector<float> r(v.size()); for (size_t i = 0; i < v.size(); ++i) r[i] = emu_bf(v[i]); return r; }
inline std::vector<double> rbf(std::vector<double> v) { for (auto& x : v) x = h_bf((float)x); return v; }

// f16's relative ulp (10 stored bits).
inline constexpr double HU = 1.0 / 1024;

// n pointwise inputs a (in ±3) and b (in ±1) from g, stored as 16-bit values a16, b16; a and b hold
// exactly the stored values.
struct Inputs16 {
    int n;
    std::vector<float> a, b;
    std::vector<unsigned short> a16, b16;
};
inline Inputs16 bf16_inputs(Rng& g, int n) {
    Inputs16 in{n, g.vec(n, 3), g.vec(n, 1), std::vector<unsigned short>(n), std::vector<unsigned short>(n)};
    for (int i = 0; i < n; ++i) {
        in.a16[i] = h_f2bf(in.a[i]);
        in.b16[i] = h_f2bf(in.b[i]);
        in.a[i] = emu_bf(in.a16[i]);
        in.b[i] = emu_bf(in.b16[i]);
    }
    return in;
}
inline Inputs16 f16_inputs(Rng& g, int n) {
    auto a = round_hv(g.vec(n, 3));
    auto b = round_hv(g.vec(n, 1));
    return Inputs16{n, a, b, to_h(a), to_h(b)};
}

// One entry per family (check_<family>.cpp).
void check_common();
void check_elementwise();
void check_geglu();
void check_softcap();
void check_embedding();
void check_rmsnorm();
void check_rope();
void check_cross_entropy();
void check_nf4();
void check_attention();
void check_lora();
void check_gemm();
void check_reduce();
void check_adamw();
void check_dropout();
