// check_nf4.cpp — NF4 dequantization, the GEMV (M ≤ 8) and the tensor-core GEMM, with fused LoRA.
#include "check.h"
#include "../nf4_dequant.cu"
#include "../nf4_gemv.cu"
#include "../nf4_gemm.cu"

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


static void test_f16() {
    Rng g{1616};
    // NF4 dequant to f16: the 16-byte vector path and the ragged tail.
    for (auto [nr, k, nested] : {std::tuple{5, 200, true}, std::tuple{3, 37, false}}) {
        Nf4 wq = make_nf4(nr * 7 + k, nr, k, nested);
        long long numel = (long long)nr * k;
        std::vector<unsigned short> out16(numel, 0xffff);
        emu_launch(nf4_dequant_k, dim3{2}, dim3{256}, wq.packed.data(), wq.codes.data(), wq.absmax.data(), wq.code8.data(), wq.offset, (int)nested, numel, (void*)out16.data(), DT_F16);
        std::vector<double> want(numel); for (long long e = 0; e < numel; ++e) want[e] = hr(wq.at(e));
        check("f16 nf4_dequant " + std::to_string(nr) + "x" + std::to_string(k), from_h(out16), want, 0, 0);
    }
    // NF4 GEMV with f16 X (16-byte load path, K % 16 == 0) and f16 Y.
    {
        int m = 3, k = 128, nn = 40, r = 4;
        Nf4 wq = make_nf4(77, nn, k, true);
        auto x = round_hv(g.vec((size_t)m * k, 1)), xa = g.vec((size_t)m * r, 1), lb = g.vec((size_t)nn * r, 0.5);
        auto x16 = to_h(x);
        std::vector<unsigned short> y16((size_t)m * nn, 0xffff);
        emu_launch(nf4_gemv_k, dim3{(unsigned)((nn + 7) / 8)}, dim3{256}, (const void*)x16.data(), DT_F16, wq.packed.data(), wq.codes.data(), wq.absmax.data(), wq.code8.data(), wq.offset, 1, (void*)y16.data(), DT_F16, 0, m, nn, k, (const void*)xa.data(), DT_F32, (const void*)lb.data(), DT_F32, r, 0.7f);
        auto want = ref_xwt(x, wq, xa, lb, m, k, nn, r, 0.7f, false);
        check("f16 nf4_gemv X/Y f16", from_h(y16), round_h(want), 1e-4 * maxabs(want), HU);
    }
    // NF4 GEMM (tensor-core kernel) with f16 X: converted to bf16 fragments through ld() — the kernel
    // never reinterprets f16 bits as bf16. Reference: bf16(f16 value) operands.
    {
        int m = 20, k = 64, nn = 24, r = 3;
        Nf4 wq = make_nf4(91, nn, k, false);
        auto x = round_hv(g.vec((size_t)m * k, 1)), xa = g.vec((size_t)m * r, 1), lb = g.vec((size_t)nn * r, 0.5);
        auto x16 = to_h(x);
        std::vector<float> y((size_t)m * nn, NAN);
        emu_launch(nf4_gemm_xwt_k, dim3{1, 1}, dim3{256}, (const void*)x16.data(), DT_F16, wq.packed.data(), wq.codes.data(), wq.absmax.data(), wq.code8.data(), wq.offset, 0, (void*)y.data(), DT_F32, 0, m, nn, k, (const void*)xa.data(), DT_F32, (const void*)lb.data(), DT_F32, r, 0.7f);
        auto want = ref_xwt(x, wq, xa, lb, m, k, nn, r, 0.7f, true);
        check("f16 X into nf4_gemm_xwt (bf16 mma)", y, want, 1e-5 * maxabs(want), 1e-5);
    }
}

void check_nf4() {
    test_f16();
    test_dequant();
    test_gemv_gemm();
}
