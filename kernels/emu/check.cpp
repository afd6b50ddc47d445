// check.cpp — runs the real kernels/*.cu on the CPU through cuda_emu.h and compares them with plain
// double-precision loops. Built and run by `cargo xtask kernels-check --emu` (g++ ≥ 12, C++20):
//   g++ -std=c++20 -O1 -pthread -I kernels kernels/emu/check.cpp -o check && ./check
// Exit status 0 = every check passed. Shapes are tiny and ragged (not multiples of the tiles).
#include "cuda_emu.h"
#include "../common.cuh"
#include "../elementwise.cu"
#include "../reduce.cu"
#include "../rmsnorm.cu"
#include "../cross_entropy.cu"
#include "../nf4_dequant.cu"
#include "../nf4_gemv.cu"
#include "../nf4_gemm.cu"
#include "../lora.cu"
#include "../attention.cu"
#include "../gemm.cu"
#include "../rope.cu"
#include "../geglu.cu"
#include "../softcap.cu"
#include "../adamw.cu"
#include "../embedding.cu"
#include <cstdio>
#include <string>

static int failures = 0;

struct Rng {
    uint64_t s;
    uint64_t next() { s ^= s >> 12; s ^= s << 25; s ^= s >> 27; return s * 0x2545F4914F6CDD1DULL; }
    float uni(float a) { return ((next() >> 40) / float(1 << 24) * 2.0f - 1.0f) * a; }
    std::vector<float> vec(size_t n, float a) { std::vector<float> v(n); for (auto& x : v) x = uni(a); return v; }
};

static unsigned short h_f2bf(float f) {
    unsigned u; std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
static float h_bf(float f) { unsigned u = ((unsigned)h_f2bf(f)) << 16; float r; std::memcpy(&r, &u, 4); return r; }

static void check(const std::string& what, const std::vector<float>& got, const std::vector<double>& want, double atol, double rtol) {
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

static double maxabs(const std::vector<double>& v) { double m = 0; for (double x : v) m = std::max(m, std::fabs(x)); return m; }

// ---- NF4 host side -------------------------------------------------------------------------------
static const float NF4H[16] = NF4_TABLE;
struct Nf4 {
    int n, k; bool nested;
    std::vector<u8> packed, codes; std::vector<float> absmax, code8; float offset = 0.3f;
    float amax(long long blk) const { return nested ? code8[codes[blk]] * absmax[blk >> 8] + offset : absmax[blk]; }
    float at(long long e) const { u8 b = packed[e >> 1]; return NF4H[(e & 1) ? (b & 15) : (b >> 4)] * amax(e >> 6); }
};
static Nf4 make_nf4(uint64_t seed, int n, int k, bool nested) {
    Rng g{seed * 2654435761ULL + 1};
    Nf4 w{n, k, nested};
    long long numel = (long long)n * k, blocks = (numel + 63) / 64;
    w.packed.resize((numel + 1) / 2 + 8);
    for (auto& b : w.packed) b = (u8)g.next();
    if (nested) {
        w.codes.resize(blocks + 1); for (auto& c : w.codes) c = (u8)g.next();
        w.absmax.resize((blocks + 255) / 256 + 1); for (auto& a : w.absmax) a = 0.05f + std::fabs(g.uni(0.1f));
        w.code8.resize(256); for (int i = 0; i < 256; ++i) w.code8[i] = (i - 127.5f) / 128.0f;
    } else {
        w.absmax.resize(blocks + 1); for (auto& a : w.absmax) a = 0.01f + std::fabs(g.uni(0.5f));
        w.code8.resize(1); w.codes.resize(1);
    }
    return w;
}

static void test_dequant() {
    for (auto [n, k, nested] : {std::tuple{64, 64, true}, std::tuple{3, 37, false}, std::tuple{5, 200, true}}) {
        Nf4 w = make_nf4(n + k, n, k, nested);
        long long numel = (long long)n * k;
        std::vector<float> out(numel, NAN);
        std::vector<unsigned short> out16(numel, 0xffff);
        std::vector<double> want(numel), want16(numel);
        for (long long e = 0; e < numel; ++e) { want[e] = w.at(e); want16[e] = h_bf(w.at(e)); }
        emu_launch(nf4_dequant_k, dim3{2}, dim3{256}, w.packed.data(), w.codes.data(), w.absmax.data(), w.code8.data(), w.offset, (int)nested, numel, (void*)out.data(), DT_F32);
        emu_launch(nf4_dequant_k, dim3{2}, dim3{256}, w.packed.data(), w.codes.data(), w.absmax.data(), w.code8.data(), w.offset, (int)nested, numel, (void*)out16.data(), DT_BF16);
        std::vector<float> o16(numel); for (long long e = 0; e < numel; ++e) o16[e] = emu_bf(out16[e]);
        check("nf4_dequant f32 " + std::to_string(n) + "x" + std::to_string(k), out, want, 0, 0);
        check("nf4_dequant bf16 " + std::to_string(n) + "x" + std::to_string(k), o16, want16, 0, 0);
    }
}

// Y = X·W̃ᵀ + s·XA·Bᵀ in double; `bf` rounds the operands to bf16 first (the mma path).
static std::vector<double> ref_xwt(const std::vector<float>& x, const Nf4& w, const std::vector<float>& xa, const std::vector<float>& lb, int m, int k, int n, int r, float s, bool bf) {
    auto R = [&](float v) { return bf ? (double)h_bf(v) : (double)v; };
    std::vector<double> y((size_t)m * n);
    for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j) {
            double acc = 0;
            for (int kk = 0; kk < k; ++kk) acc += R(x[(size_t)i * k + kk]) * R(w.at((long long)j * k + kk));
            for (int q = 0; q < r; ++q) acc += (bf ? (double)h_bf(s * xa[(size_t)i * r + q]) * R(lb[(size_t)j * r + q]) : (double)s * xa[(size_t)i * r + q] * lb[(size_t)j * r + q]);
            y[(size_t)i * n + j] = acc;
        }
    return y;
}

static void test_gemv_gemm() {
    // GEMV: f32 throughout.
    for (auto [m, k, n, r, nested] : {std::tuple{3, 128, 40, 4, true}, std::tuple{5, 45, 7, 0, false}, std::tuple{8, 64, 9, 2, false}}) {
        Nf4 w = make_nf4(7 + m, n, k, nested);
        Rng g{11u + m};
        auto x = g.vec((size_t)m * k, 1), xa = g.vec((size_t)m * std::max(r, 1), 1), lb = g.vec((size_t)n * std::max(r, 1), 0.5);
        std::vector<float> y((size_t)m * n, NAN);
        int blocks = (n + 7) / 8;
        emu_launch(nf4_gemv_k, dim3{(unsigned)blocks}, dim3{256}, (const void*)x.data(), DT_F32, w.packed.data(), w.codes.data(), w.absmax.data(), w.code8.data(), w.offset, (int)nested, (void*)y.data(), DT_F32, 0, m, n, k, (const void*)xa.data(), DT_F32, (const void*)lb.data(), DT_F32, r, 0.7f);
        auto want = ref_xwt(x, w, xa, lb, m, k, n, r, 0.7f, false);
        check("nf4_gemv M=" + std::to_string(m) + " K=" + std::to_string(k) + " N=" + std::to_string(n) + " R=" + std::to_string(r), y, want, 1e-4 * maxabs(want), 1e-5);
        // Same with X in bf16 (the 16-byte load path when K % 16 == 0).
        std::vector<unsigned short> x16(x.size());
        std::vector<float> xr(x.size());
        for (size_t i = 0; i < x.size(); ++i) { x16[i] = h_f2bf(x[i]); xr[i] = emu_bf(x16[i]); }
        std::vector<float> y16((size_t)m * n, NAN);
        emu_launch(nf4_gemv_k, dim3{(unsigned)blocks}, dim3{256}, (const void*)x16.data(), DT_BF16, w.packed.data(), w.codes.data(), w.absmax.data(), w.code8.data(), w.offset, (int)nested, (void*)y16.data(), DT_F32, 0, m, n, k, (const void*)xa.data(), DT_F32, (const void*)lb.data(), DT_F32, r, 0.7f);
        auto want16 = ref_xwt(xr, w, xa, lb, m, k, n, r, 0.7f, false);
        check("nf4_gemv bf16 X M=" + std::to_string(m) + " K=" + std::to_string(k), y16, want16, 1e-4 * maxabs(want16), 1e-5);
    }
    // GEMM xwt: bf16 operands, f32 accumulate; bf16 X to exercise the vector load path too.
    for (auto [m, k, n, r, nested, xbf] : {std::tuple{130, 256, 136, 5, true, true}, std::tuple{20, 40, 20, 33, false, false}, std::tuple{9, 48, 129, 0, true, false}}) {
        Nf4 w = make_nf4(3 + m, n, k, nested);
        Rng g{5u + m};
        auto x = g.vec((size_t)m * k, 1), xa = g.vec((size_t)m * std::max(r, 1), 1), lb = g.vec((size_t)n * std::max(r, 1), 0.5);
        std::vector<unsigned short> x16(x.size()); for (size_t i = 0; i < x.size(); ++i) x16[i] = h_f2bf(x[i]);
        std::vector<float> y((size_t)m * n, 1.0f);
        dim3 grid{(unsigned)((n + 127) / 128), (unsigned)((m + 127) / 128)};
        const void* xp = xbf ? (const void*)x16.data() : (const void*)x.data();
        // acc_out = 1 over an all-ones Y checks the accumulate epilogue too.
        emu_launch(nf4_gemm_xwt_k, grid, dim3{256}, xp, xbf ? DT_BF16 : DT_F32, w.packed.data(), w.codes.data(), w.absmax.data(), w.code8.data(), w.offset, (int)nested, (void*)y.data(), DT_F32, 1, m, n, k, (const void*)xa.data(), DT_F32, (const void*)lb.data(), DT_F32, r, 0.7f);
        auto want = ref_xwt(x, w, xa, lb, m, k, n, r, 0.7f, true);
        for (auto& v : want) v += 1.0;
        check("nf4_gemm xwt M=" + std::to_string(m) + " K=" + std::to_string(k) + " N=" + std::to_string(n) + " R=" + std::to_string(r), y, want, 1e-5 * maxabs(want), 1e-5);
    }
    // GEMM dyw: dX[M,K] = dY[M,N]·W̃[N,K] + s·dYB[M,R]·A[R,K].
    for (auto [m, n, k, r, nested] : {std::tuple{130, 136, 256, 5, true}, std::tuple{20, 40, 20, 33, false}, std::tuple{7, 33, 144, 0, true}}) {
        Nf4 w = make_nf4(9 + m, n, k, nested);
        Rng g{17u + m};
        auto dy = g.vec((size_t)m * n, 1), dyb = g.vec((size_t)m * std::max(r, 1), 1), la = g.vec((size_t)std::max(r, 1) * k, 0.5);
        std::vector<float> dx((size_t)m * k, NAN);
        dim3 grid{(unsigned)((k + 127) / 128), (unsigned)((m + 127) / 128)};
        emu_launch(nf4_gemm_dyw_k, grid, dim3{256}, (const void*)dy.data(), DT_F32, w.packed.data(), w.codes.data(), w.absmax.data(), w.code8.data(), w.offset, (int)nested, (void*)dx.data(), DT_F32, 0, m, n, k, (const void*)dyb.data(), DT_F32, (const void*)la.data(), DT_F32, r, 0.7f);
        std::vector<double> want((size_t)m * k);
        for (int i = 0; i < m; ++i)
            for (int j = 0; j < k; ++j) {
                double acc = 0;
                for (int q = 0; q < n; ++q) acc += (double)h_bf(dy[(size_t)i * n + q]) * h_bf(w.at((long long)q * k + j));
                for (int q = 0; q < r; ++q) acc += (double)h_bf(0.7f * dyb[(size_t)i * r + q]) * h_bf(la[(size_t)q * k + j]);
                want[(size_t)i * k + j] = acc;
            }
        check("nf4_gemm dyw M=" + std::to_string(m) + " N=" + std::to_string(n) + " K=" + std::to_string(k) + " R=" + std::to_string(r), dx, want, 1e-5 * maxabs(want), 1e-5);
    }
}

// ---- attention -------------------------------------------------------------------------------------
struct AttnRef { std::vector<double> out, lse, dq, dk, dv; };
static AttnRef ref_attn(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v, const std::vector<int>& seg, bool has_seg,
                        const std::vector<float>& dout, int B, int T, int TK, int NH, int NKV, int D, float scale, float cap, int window) {
    AttnRef r{std::vector<double>((size_t)B * T * NH * D), std::vector<double>((size_t)B * NH * T), std::vector<double>((size_t)B * T * NH * D),
              std::vector<double>((size_t)B * TK * NKV * D), std::vector<double>((size_t)B * TK * NKV * D)};
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < NH; ++h)
            for (int i = 0; i < T; ++i) {
                int kvh = h / (NH / NKV), qpos = TK - T + i;
                std::vector<double> s(TK, -INFINITY), z(TK, 0);
                double mx = -INFINITY;
                for (int j = 0; j < TK; ++j) {
                    bool vis = j <= qpos && (window <= 0 || qpos - j < window) && (!has_seg || seg[b * TK + j] == seg[b * TK + qpos]);
                    if (!vis) continue;
                    double dot = 0;
                    for (int d = 0; d < D; ++d) dot += (double)q[(((size_t)b * T + i) * NH + h) * D + d] * k[(((size_t)b * TK + j) * NKV + kvh) * D + d];
                    z[j] = dot * scale;
                    s[j] = cap > 0 ? cap * std::tanh(z[j] / cap) : z[j];
                    mx = std::max(mx, s[j]);
                }
                double sum = 0;
                for (int j = 0; j < TK; ++j) if (s[j] > -INFINITY) sum += std::exp(s[j] - mx);
                double lse = mx + std::log(sum);
                r.lse[((size_t)b * NH + h) * T + i] = lse;
                std::vector<double> p(TK, 0);
                for (int j = 0; j < TK; ++j) if (s[j] > -INFINITY) p[j] = std::exp(s[j] - lse);
                size_t qo = (((size_t)b * T + i) * NH + h) * D;
                for (int d = 0; d < D; ++d) {
                    double o = 0;
                    for (int j = 0; j < TK; ++j) o += p[j] * v[(((size_t)b * TK + j) * NKV + kvh) * D + d];
                    r.out[qo + d] = o;
                }
                if (dout.empty()) continue;
                double delta = 0;
                for (int d = 0; d < D; ++d) delta += (double)dout[qo + d] * r.out[qo + d];
                for (int j = 0; j < TK; ++j) {
                    if (p[j] == 0) continue;
                    size_t ko = (((size_t)b * TK + j) * NKV + kvh) * D;
                    double dp = 0;
                    for (int d = 0; d < D; ++d) dp += (double)dout[qo + d] * v[ko + d];
                    double dz = p[j] * (dp - delta);
                    if (cap > 0) { double t = s[j] / cap; dz *= 1 - t * t; }
                    for (int d = 0; d < D; ++d) {
                        r.dq[qo + d] += dz * scale * k[ko + d];
                        r.dk[ko + d] += dz * scale * q[qo + d];
                        r.dv[ko + d] += p[j] * dout[qo + d];
                    }
                }
            }
    return r;
}

static void test_attention() {
    struct C { int B, T, TK, NH, NKV, D; float cap; int window; bool seg; };
    for (C c : {C{2, 9, 9, 4, 2, 40, 5.0f, 4, true}, C{1, 5, 12, 2, 1, 256, 0.0f, 0, false}, C{1, 11, 11, 2, 2, 64, 50.0f, 0, true}}) {
        Rng g{(uint64_t)(c.T * 31 + c.D)};
        size_t qn = (size_t)c.B * c.T * c.NH * c.D, kn = (size_t)c.B * c.TK * c.NKV * c.D;
        auto q = g.vec(qn, 1), k = g.vec(kn, 1), v = g.vec(kn, 1), dout = g.vec(qn, 1);
        std::vector<int> seg(c.B * c.TK);
        for (int i = 0; i < c.B * c.TK; ++i) seg[i] = (i % c.TK) < c.TK / 2 ? 3 : 7;
        float scale = 1.0f / std::sqrt((float)c.D);
        bool bwd = c.T == c.TK;
        auto ref = ref_attn(q, k, v, seg, c.seg, bwd ? dout : std::vector<float>{}, c.B, c.T, c.TK, c.NH, c.NKV, c.D, scale, c.cap, c.window);
        std::vector<float> out(qn, NAN), lse((size_t)c.B * c.NH * c.T, NAN);
        unsigned rows = c.B * c.T * c.NH;
        emu_launch(attn_fwd_k, dim3{(rows + 3) / 4}, dim3{128}, (const void*)q.data(), DT_F32, (const void*)k.data(), DT_F32, (const void*)v.data(), DT_F32,
                   (const int*)seg.data(), (int)c.seg, (void*)out.data(), DT_F32, (void*)lse.data(), DT_F32, c.B, c.T, c.TK, c.NH, c.NKV, c.D, scale, c.cap, c.window);
        std::string tag = " T=" + std::to_string(c.T) + " TK=" + std::to_string(c.TK) + " D=" + std::to_string(c.D);
        check("attn_fwd out" + tag, out, ref.out, 1e-5, 1e-4);
        check("attn_fwd lse" + tag, lse, ref.lse, 1e-5, 1e-5);
        if (!bwd) continue;
        std::vector<float> delta((size_t)c.B * c.NH * c.T, NAN), dq(qn, NAN), dk(kn, NAN), dv(kn, NAN);
        std::vector<float> outr(qn), lser(lse.size());
        for (size_t i = 0; i < qn; ++i) outr[i] = (float)ref.out[i];
        for (size_t i = 0; i < lse.size(); ++i) lser[i] = (float)ref.lse[i];
        emu_launch(attn_bwd_delta_k, dim3{(rows + 3) / 4}, dim3{128}, (const void*)outr.data(), DT_F32, (const void*)dout.data(), DT_F32, delta.data(), c.B, c.T, c.NH, c.D);
        emu_launch(attn_bwd_dq_k, dim3{(rows + 3) / 4}, dim3{128}, (const void*)q.data(), DT_F32, (const void*)k.data(), DT_F32, (const void*)v.data(), DT_F32,
                   (const int*)seg.data(), (int)c.seg, (const void*)lser.data(), DT_F32, (const float*)delta.data(), (const void*)dout.data(), DT_F32, (void*)dq.data(), DT_F32,
                   c.B, c.T, c.NH, c.NKV, c.D, scale, c.cap, c.window);
        unsigned krows = c.B * c.T * c.NKV;
        emu_launch(attn_bwd_dkv_k, dim3{(krows + 3) / 4}, dim3{128}, (const void*)q.data(), DT_F32, (const void*)k.data(), DT_F32, (const void*)v.data(), DT_F32,
                   (const int*)seg.data(), (int)c.seg, (const void*)lser.data(), DT_F32, (const float*)delta.data(), (const void*)dout.data(), DT_F32, (void*)dk.data(), DT_F32,
                   (void*)dv.data(), DT_F32, c.B, c.T, c.NH, c.NKV, c.D, scale, c.cap, c.window);
        check("attn_bwd dq" + tag, dq, ref.dq, 1e-4, 1e-3);
        check("attn_bwd dk" + tag, dk, ref.dk, 1e-4, 1e-3);
        check("attn_bwd dv" + tag, dv, ref.dv, 1e-4, 1e-3);
    }
}

// The tensor-core forward against the same reference, on bf16-rounded inputs (P is rounded to bf16
// inside the kernel, hence the looser output tolerance).
template <int DIM>
static void run_attn_mma(int B, int T, int TK, int NH, int NKV, float cap, int window, bool has_seg, bool bf16_in) {
    Rng g{(uint64_t)(T * 131 + DIM)};
    size_t qn = (size_t)B * T * NH * DIM, kn = (size_t)B * TK * NKV * DIM;
    auto q = g.vec(qn, 1), k = g.vec(kn, 1), v = g.vec(kn, 1);
    for (auto* x : {&q, &k, &v}) for (auto& e : *x) e = h_bf(e);
    std::vector<int> seg(B * TK);
    for (int i = 0; i < B * TK; ++i) seg[i] = (i % TK) < (2 * TK) / 3 ? 1 : 2;
    float scale = 1.0f / std::sqrt((float)DIM);
    auto ref = ref_attn(q, k, v, seg, has_seg, {}, B, T, TK, NH, NKV, DIM, scale, cap, window);
    std::vector<unsigned short> q16(qn), k16(kn), v16(kn);
    for (size_t i = 0; i < qn; ++i) q16[i] = h_f2bf(q[i]);
    for (size_t i = 0; i < kn; ++i) { k16[i] = h_f2bf(k[i]); v16[i] = h_f2bf(v[i]); }
    std::vector<float> out(qn, NAN), lse((size_t)B * NH * T, NAN);
    dim3 grid{(unsigned)((T + 63) / 64), (unsigned)(B * NH)};
    const void *qp = bf16_in ? (const void*)q16.data() : (const void*)q.data(), *kp = bf16_in ? (const void*)k16.data() : (const void*)k.data(),
               *vp = bf16_in ? (const void*)v16.data() : (const void*)v.data();
    int dt = bf16_in ? DT_BF16 : DT_F32;
    void (*kern)(const void*, int, const void*, int, const void*, int, const int*, int, void*, int, void*, int, int, int, int, int, int, int, float, float, int) =
        DIM == 16 ? attn_fwd_mma_d16_k : DIM == 32 ? attn_fwd_mma_d32_k : DIM == 64 ? attn_fwd_mma_d64_k : DIM == 128 ? attn_fwd_mma_d128_k : attn_fwd_mma_d256_k;
    emu_launch(kern, grid, dim3{128}, qp, dt, kp, dt, vp, dt, (const int*)seg.data(), (int)has_seg, (void*)out.data(), DT_F32, (void*)lse.data(), DT_F32,
               B, T, TK, NH, NKV, DIM, scale, cap, window);
    std::string tag = " D=" + std::to_string(DIM) + " T=" + std::to_string(T) + " TK=" + std::to_string(TK) + (bf16_in ? " bf16" : " f32");
    check("attn_fwd_mma out" + tag, out, ref.out, 1e-2, 1e-2);
    check("attn_fwd_mma lse" + tag, lse, ref.lse, 1e-4, 1e-4);
}

static void test_attention_mma() {
    run_attn_mma<256>(1, 5, 12, 2, 1, 0.0f, 0, false, true);
    run_attn_mma<64>(2, 11, 11, 4, 2, 50.0f, 4, true, false);
    run_attn_mma<32>(1, 70, 70, 2, 2, 5.0f, 20, true, true);  // two query blocks, a window, segments
    run_attn_mma<16>(1, 130, 150, 1, 1, 0.0f, 0, false, false); // three query blocks, TK > T
    run_attn_mma<128>(1, 17, 17, 2, 1, 30.0f, 0, false, true);
}

template <int DIM>
static void run_attn_bwd_mma(int B, int T, int NH, int NKV, float cap, int window, bool has_seg, bool bf16_in) {
    Rng g{(uint64_t)(T * 977 + DIM)};
    size_t qn = (size_t)B * T * NH * DIM, kn = (size_t)B * T * NKV * DIM;
    auto q = g.vec(qn, 1), k = g.vec(kn, 1), v = g.vec(kn, 1), dout = g.vec(qn, 1);
    for (auto* x : {&q, &k, &v, &dout}) for (auto& e : *x) e = h_bf(e);
    std::vector<int> seg(B * T);
    for (int i = 0; i < B * T; ++i) seg[i] = (i % T) < T / 2 ? 4 : 9;
    float scale = 1.0f / std::sqrt((float)DIM);
    auto ref = ref_attn(q, k, v, seg, has_seg, dout, B, T, T, NH, NKV, DIM, scale, cap, window);
    std::vector<float> lse(ref.lse.begin(), ref.lse.end()), delta((size_t)B * NH * T);
    for (int b = 0; b < B; ++b) for (int i = 0; i < T; ++i) for (int h = 0; h < NH; ++h) {
        double d = 0; size_t o = (((size_t)b * T + i) * NH + h) * DIM;
        for (int c = 0; c < DIM; ++c) d += (double)dout[o + c] * ref.out[o + c];
        delta[((size_t)b * NH + h) * T + i] = (float)d;
    }
    std::vector<unsigned short> q16(qn), k16(kn), v16(kn), d16(qn);
    for (size_t i = 0; i < qn; ++i) { q16[i] = h_f2bf(q[i]); d16[i] = h_f2bf(dout[i]); }
    for (size_t i = 0; i < kn; ++i) { k16[i] = h_f2bf(k[i]); v16[i] = h_f2bf(v[i]); }
    int dt = bf16_in ? DT_BF16 : DT_F32;
    const void *qp = bf16_in ? (const void*)q16.data() : (const void*)q.data(), *kp = bf16_in ? (const void*)k16.data() : (const void*)k.data(),
               *vp = bf16_in ? (const void*)v16.data() : (const void*)v.data(), *dp = bf16_in ? (const void*)d16.data() : (const void*)dout.data();
    using K = void (*)(const void*, int, const void*, int, const void*, int, const int*, int, const void*, int, const float*, const void*, int, void*, int, int, int, int, int, int, float, float, int);
    K kq, kk, kv;
    if constexpr (DIM == 16) { kq = attn_bwd_dq_mma_d16_k; kk = attn_bwd_dk_mma_d16_k; kv = attn_bwd_dv_mma_d16_k; }
    else if constexpr (DIM == 32) { kq = attn_bwd_dq_mma_d32_k; kk = attn_bwd_dk_mma_d32_k; kv = attn_bwd_dv_mma_d32_k; }
    else if constexpr (DIM == 64) { kq = attn_bwd_dq_mma_d64_k; kk = attn_bwd_dk_mma_d64_k; kv = attn_bwd_dv_mma_d64_k; }
    else if constexpr (DIM == 128) { kq = attn_bwd_dq_mma_d128_k; kk = attn_bwd_dk_mma_d128_k; kv = attn_bwd_dv_mma_d128_k; }
    else { kq = attn_bwd_dq_mma_d256_k; kk = attn_bwd_dk_mma_d256_k; kv = attn_bwd_dv_mma_d256_k; }
    constexpr int W = BwdWarps<DIM>::W;
    unsigned gx = (unsigned)((T + 16 * W - 1) / (16 * W));
    std::vector<float> dq(qn, NAN), dk(kn, NAN), dv(kn, NAN);
    emu_launch(kq, dim3{gx, (unsigned)(B * NH)}, dim3{32u * W}, qp, dt, kp, dt, vp, dt, (const int*)seg.data(), (int)has_seg, (const void*)lse.data(), DT_F32,
               (const float*)delta.data(), dp, dt, (void*)dq.data(), DT_F32, B, T, NH, NKV, DIM, scale, cap, window);
    emu_launch(kk, dim3{gx, (unsigned)(B * NKV)}, dim3{32u * W}, qp, dt, kp, dt, vp, dt, (const int*)seg.data(), (int)has_seg, (const void*)lse.data(), DT_F32,
               (const float*)delta.data(), dp, dt, (void*)dk.data(), DT_F32, B, T, NH, NKV, DIM, scale, cap, window);
    emu_launch(kv, dim3{gx, (unsigned)(B * NKV)}, dim3{32u * W}, qp, dt, kp, dt, vp, dt, (const int*)seg.data(), (int)has_seg, (const void*)lse.data(), DT_F32,
               (const float*)delta.data(), dp, dt, (void*)dv.data(), DT_F32, B, T, NH, NKV, DIM, scale, cap, window);
    std::string tag = " D=" + std::to_string(DIM) + " T=" + std::to_string(T) + " NH/NKV=" + std::to_string(NH) + "/" + std::to_string(NKV);
    check("attn_bwd_mma dq" + tag, dq, ref.dq, 1e-2 * maxabs(ref.dq), 1e-2);
    check("attn_bwd_mma dk" + tag, dk, ref.dk, 1e-2 * maxabs(ref.dk), 1e-2);
    check("attn_bwd_mma dv" + tag, dv, ref.dv, 1e-2 * maxabs(ref.dv), 1e-2);
}

static void test_attention_bwd_mma() {
    run_attn_bwd_mma<64>(2, 70, 4, 2, 50.0f, 9, true, true);  // several blocks, GQA, window, segments
    run_attn_bwd_mma<256>(1, 20, 2, 1, 0.0f, 0, false, false);
    run_attn_bwd_mma<16>(1, 40, 2, 2, 5.0f, 0, true, false);
    run_attn_bwd_mma<128>(1, 33, 2, 1, 30.0f, 7, false, true);
    run_attn_bwd_mma<32>(1, 17, 3, 1, 0.0f, 0, false, true);
}

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

static void test_lora_and_gemm() {
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

static void test_rmsnorm_reduce() {
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
    // Two-pass Σx² in f64.
    std::vector<double> parts(3, NAN), out(1, NAN);
    emu_launch(reduce_partial_k, dim3{3}, dim3{256}, (const void*)x.data(), DT_F32, (i64)(n * h), 0, parts.data());
    emu_launch(reduce_final_k, dim3{1}, dim3{256}, (const double*)parts.data(), 3, out.data());
    double want = 0; for (float v : x) want += (double)v * v;
    check("reduce sum_squares", std::vector<float>{(float)out[0]}, {want}, 1e-4, 1e-6);
}

// Pointwise kernels, read and written in bf16 where noted (checks the dtype-tagged access too).
static void test_pointwise() {
    Rng g{77};
    int n = 1000;
    auto a = g.vec(n, 3), b = g.vec(n, 1);
    std::vector<unsigned short> a16(n), b16(n);
    for (int i = 0; i < n; ++i) { a16[i] = h_f2bf(a[i]); b16[i] = h_f2bf(b[i]); a[i] = emu_bf(a16[i]); b[i] = emu_bf(b16[i]); }
    auto unbf = [](const std::vector<unsigned short>& v) { std::vector<float> r(v.size()); for (size_t i = 0; i < v.size(); ++i) r[i] = emu_bf(v[i]); return r; };
    auto rbf = [](std::vector<double> v) { for (auto& x : v) x = h_bf((float)x); return v; };
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
    // softcap fwd/bwd in f32.
    std::vector<float> x = a, dy = b;
    emu_launch(softcap_fwd_k, dim3{1}, dim3{256}, (void*)x.data(), DT_F32, (i64)n, 2.0f);
    std::vector<double> wx(n), wdy(n);
    for (int i = 0; i < n; ++i) { wx[i] = 2.0 * std::tanh(a[i] / 2.0); double t = wx[i] / 2.0; wdy[i] = b[i] * (1 - t * t); }
    check("softcap_fwd", x, wx, 1e-6, 1e-6);
    emu_launch(softcap_bwd_k, dim3{1}, dim3{256}, (const void*)x.data(), DT_F32, (void*)dy.data(), DT_F32, (i64)n, 2.0f);
    check("softcap_bwd", dy, wdy, 1e-6, 1e-5);
    // axpy into bf16, mul, fill, copy with conversion.
    std::vector<unsigned short> y16 = b16;
    emu_launch(axpy_k, dim3{3}, dim3{256}, 0.5f, (const void*)a.data(), DT_F32, (void*)y16.data(), DT_BF16, (i64)n);
    std::vector<double> wy(n); for (int i = 0; i < n; ++i) wy[i] = h_bf(b[i] + 0.5f * a[i]);
    check("axpy f32 into bf16", unbf(y16), wy, 0, 0);
    std::vector<float> cp(n, NAN);
    emu_launch(copy_k, dim3{1}, dim3{256}, (const void*)a16.data(), DT_BF16, (void*)cp.data(), DT_F32, (i64)n);
    check("copy bf16 to f32", cp, std::vector<double>(a.begin(), a.end()), 0, 0);
    std::vector<float> mm = a;
    emu_launch(mul_k, dim3{1}, dim3{256}, (const void*)mm.data(), DT_F32, (const void*)b.data(), DT_F32, (void*)mm.data(), DT_F32, (i64)n);
    std::vector<double> wm(n); for (int i = 0; i < n; ++i) wm[i] = (double)a[i] * b[i];
    check("mul in place", mm, wm, 1e-7, 1e-6);
    emu_launch(fill_k, dim3{1}, dim3{256}, (void*)mm.data(), DT_F32, (i64)n, 3.5f);
    check("fill", mm, std::vector<double>(n, 3.5), 0, 0);
    // adamw, two steps.
    auto p = g.vec(n, 1), gr = g.vec(n, 1);
    std::vector<float> m(n, 0.1f), v(n, 0.2f);
    std::vector<double> wp(n), wmm(n), wv(n);
    float lr = 1e-2f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, wd = 0.01f;
    double bc1 = 1 - std::pow((double)b1, 3), bc2 = 1 - std::pow((double)b2, 3);
    for (int i = 0; i < n; ++i) {
        double pp = p[i] * (1 - (double)lr * wd);
        double mi = b1 * 0.1 + (1 - b1) * (double)gr[i], vi = b2 * 0.2 + (1 - b2) * (double)gr[i] * gr[i];
        wp[i] = pp - lr / bc1 * mi / (std::sqrt(vi) / std::sqrt(bc2) + eps);
        wmm[i] = mi; wv[i] = vi;
    }
    emu_launch(adamw_k, dim3{1}, dim3{256}, (void*)p.data(), DT_F32, (const void*)gr.data(), DT_F32, (void*)m.data(), DT_F32, (void*)v.data(), DT_F32, (i64)n,
               lr, b1, b2, eps, wd, (float)bc1, (float)std::sqrt(bc2));
    check("adamw p", p, wp, 1e-6, 1e-5);
    check("adamw m", m, wmm, 1e-7, 1e-5);
    check("adamw v", v, wv, 1e-7, 1e-5);
    // rope forward then inverse (= identity), against the formula.
    int tokens = 3, heads = 2, d = 8;
    auto xr = g.vec((size_t)tokens * heads * d, 1);
    std::vector<int> pos = {0, 5, 17};
    std::vector<float> xo = xr;
    emu_launch(rope_k, dim3{1}, dim3{256}, (void*)xo.data(), DT_F32, (const int*)pos.data(), (i64)tokens, heads, d, 10000.0f, 0);
    std::vector<double> wr(xr.size());
    for (int t = 0; t < tokens; ++t) for (int h = 0; h < heads; ++h) for (int i = 0; i < d / 2; ++i) {
        double ang = pos[t] / std::pow(10000.0, 2.0 * i / d);
        size_t base = ((size_t)t * heads + h) * d;
        wr[base + i] = xr[base + i] * std::cos(ang) - xr[base + i + d / 2] * std::sin(ang);
        wr[base + i + d / 2] = xr[base + i + d / 2] * std::cos(ang) + xr[base + i] * std::sin(ang);
    }
    check("rope", xo, wr, 1e-5, 1e-5);
    emu_launch(rope_k, dim3{1}, dim3{256}, (void*)xo.data(), DT_F32, (const int*)pos.data(), (i64)tokens, heads, d, 10000.0f, 1);
    check("rope inverse", xo, std::vector<double>(xr.begin(), xr.end()), 1e-5, 1e-5);
    // embedding fwd / bwd (repeated id → atomics into bf16) and the id checks.
    int V = 6, H = 5;
    auto table = g.vec((size_t)V * H, 1);
    std::vector<int> ids = {2, 0, 2, 5};
    std::vector<float> eo(ids.size() * H, NAN);
    emu_launch(embedding_fwd_k, dim3{(unsigned)ids.size()}, dim3{32}, (const int*)ids.data(), (const void*)table.data(), DT_F32, (void*)eo.data(), DT_F32, H, 2.0f);
    std::vector<double> we(eo.size());
    for (size_t i = 0; i < ids.size(); ++i) for (int j = 0; j < H; ++j) we[i * H + j] = 2.0 * table[ids[i] * H + j];
    check("embedding_fwd", eo, we, 0, 1e-7);
    std::vector<unsigned short> dt16((size_t)V * H, h_f2bf(1.0f));
    auto dout2 = g.vec(ids.size() * H, 1);
    emu_launch(embedding_bwd_k, dim3{(unsigned)ids.size()}, dim3{32}, (const int*)ids.data(), (const void*)dout2.data(), DT_F32, (void*)dt16.data(), DT_BF16, H, 0.5f);
    std::vector<double> wdt((size_t)V * H, 1.0);
    for (size_t i = 0; i < ids.size(); ++i) for (int j = 0; j < H; ++j) wdt[ids[i] * H + j] += 0.5 * dout2[i * H + j];
    check("embedding_bwd into bf16", unbf(dt16), wdt, 1e-2, 1e-2);
    std::vector<int> bad = {0, 1, 6, -1};
    int flag = 0x7fffffff;
    emu_launch(ids_check_k, dim3{1}, dim3{32}, (const int*)bad.data(), (i64)4, V, &flag);
    check("ids_check first bad index", std::vector<float>{(float)flag}, {2.0}, 0, 0);
    std::vector<int> lab = {-100, 3, 7};
    flag = 0x7fffffff;
    emu_launch(labels_check_k, dim3{1}, dim3{32}, (const int*)lab.data(), (i64)3, V, &flag);
    check("labels_check first bad index", std::vector<float>{(float)flag}, {2.0}, 0, 0);
}

int main() {
    test_pointwise();
    test_dequant();
    test_gemv_gemm();
    test_attention();
    test_attention_mma();
    test_attention_bwd_mma();
    test_cross_entropy();
    test_lora_and_gemm();
    test_rmsnorm_reduce();
    if (failures) { std::printf("%d check(s) FAILED\n", failures); return 1; }
    std::printf("all emulated kernel checks passed\n");
    return 0;
}
