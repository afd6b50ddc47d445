// check_nf4.cpp — NF4 quantization on the device (bit for bit against a transcription of the host
// quantizer), dequantization, the GEMV (M ≤ 8) and the tensor-core GEMM, with fused LoRA.
#include "check.h"
#include "../nf4_dequant.cu"
#include "../nf4_gemv.cu"
#include "../nf4_gemm.cu"
#include "../nf4_quant.cu"

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

// ---- Quantization: nf4_quant.cu against the host quantizer ---------------------------------------
// A line-for-line C++ transcription of afinar_kernels::nf4 (quantize.rs: quantize_block, the
// thresholds, quantize_dynamic8, dynamic_map, double_quantize with a given offset). Plain float
// arithmetic: g++ at -O1 on x86-64 without -march emits no FMA, so each op is rounded once, as in Rust.
namespace hostq {
static float thr(int i) { return (NF4H[i] + NF4H[i + 1]) / 2.0f; }
static u8 code_of(float xn) { u8 q = 0; for (int i = 0; i < 15; ++i) q += thr(i) < xn; return q; }
// quantize_block: returns the stored absmax; writes ceil(n/2) bytes.
static float block(const float* x, int n, u8* out) {
    float amax = 0.0f;
    for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
    float floor38; unsigned fb = 0x006ce3eeu; std::memcpy(&floor38, &fb, 4);
    float clamped = std::max(amax, floor38);
    bool full = n == 64;
    float inv = 1.0f / clamped;
    auto code = [&](float v) { return code_of(full ? v * inv : v / clamped); };
    for (int j = 0; 2 * j < n; ++j) {
        u8 hi = code(x[2 * j]);
        u8 lo = 2 * j + 1 < n ? code(x[2 * j + 1]) : code_of(0.0f);
        out[j] = (u8)((hi << 4) | lo);
    }
    return full ? amax : clamped;
}
static void quantize(const std::vector<float>& x, std::vector<u8>& packed, std::vector<float>& absmax) {
    long long n = x.size(), nb = (n + 63) / 64;
    packed.assign((n + 1) / 2, 0);
    absmax.assign(nb, 0.0f);
    for (long long b = 0; b < nb; ++b) absmax[b] = block(x.data() + b * 64, (int)std::min<long long>(64, n - b * 64), packed.data() + b * 32);
}
static u8 dq8(const std::vector<float>& code, float x) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f, val = code[pivot];
    for (int i = 64; i > 0; i >>= 1) {
        if (x > val) { lower_pivot = pivot; lower = val; pivot += i; }
        else { upper_pivot = pivot; upper = val; pivot -= i; }
        val = code[pivot];
    }
    if (upper_pivot == 255) upper = code[upper_pivot];
    if (lower_pivot == 0) lower = code[lower_pivot];
    if (x > val) { float mid = (upper + val) * 0.5f; return (u8)(x > mid ? upper_pivot : pivot); }
    float mid = (lower + val) * 0.5f;
    return (u8)(x < mid ? lower_pivot : pivot);
}
static std::vector<float> dynamic_map() {
    const double scale[7] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0};
    std::vector<float> data;
    for (int i = 0; i < 7; ++i) {
        int steps = (1 << i) + 1, half = steps / 2;
        float start = 0.1f, end = 1.0f, step = (end - start) / (float)(steps - 1);
        std::vector<float> b(steps);
        for (int k = 0; k < steps; ++k) b[k] = k < half ? std::fma(step, (float)k, start) : std::fma(-step, (float)(steps - 1 - k), end);
        float s = (float)scale[i];
        std::vector<float> means;
        for (int k = 0; k + 1 < steps; ++k) means.push_back((b[k] + b[k + 1]) / 2.0f);
        for (float m : means) data.push_back(s * m);
        for (float m : means) data.push_back(-s * m);
    }
    data.push_back(0.0f);
    data.push_back(1.0f);
    std::sort(data.begin(), data.end());
    return data;
}
static void nested(const std::vector<float>& absmax, float offset, const std::vector<float>& code8, std::vector<u8>& codes, std::vector<float>& nest) {
    long long n = absmax.size();
    codes.assign(n, 0);
    nest.clear();
    for (long long g = 0; g < n; g += 256) {
        long long e = std::min(n, g + 256);
        float amax = 0.0f;
        for (long long i = g; i < e; ++i) amax = std::max(amax, std::fabs(absmax[i] - offset));
        float inv = 1.0f / amax;
        for (long long i = g; i < e; ++i) codes[i] = dq8(code8, (absmax[i] - offset) * inv);
        nest.push_back(amax);
    }
}
}  // namespace hostq

static void check_bytes(const std::string& what, const u8* got, const std::vector<u8>& want) {
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < want.size(); ++i)
        if (got[i] != want[i]) { if (!bad) first = i; ++bad; }
    if (bad) {
        ++failures;
        std::printf("FAIL %-44s %zu/%zu bytes differ; first [%zu] got %02x want %02x\n", what.c_str(), bad, want.size(), first, got[first], want[first]);
    } else {
        std::printf("ok   %-44s n=%zu bit-identical\n", what.c_str(), want.size());
    }
}

// Values of one test tensor: random, plus an all-zero block, a block of exact threshold ties (absmax 1:
// xn = x), a block of subnormals (absmax below the 1e-38 floor), -0.0, and when the tail is partial,
// ties there too (the true-division path).
static std::vector<float> quant_input(uint64_t seed, long long n) {
    Rng g{seed * 7919 + 3};
    std::vector<float> x(n);
    for (auto& v : x) v = g.uni(1.0f) * (1.0f + 3.0f * std::fabs(g.uni(1.0f)));
    long long nb = (n + 63) / 64;
    auto blk = [&](long long b, auto f) { for (long long i = b * 64; i < std::min(n, b * 64 + 64); ++i) f(i, i - b * 64); };
    if (nb > 2) blk(1, [&](long long i, long long) { x[i] = 0.0f; });
    if (nb > 3) blk(2, [&](long long i, long long j) { x[i] = j == 0 ? 1.0f : (j % 2 ? -1.0f : 1.0f) * std::fabs(hostq::thr((int)(j % 15))); if (j > 0 && j % 15 < 7) x[i] = hostq::thr((int)(j % 15)); });
    if (nb > 4) blk(3, [&](long long i, long long j) { x[i] = (float)(j + 1) * 1e-41f; });
    if (n > 5) x[5] = -0.0f;
    // Partial tail: absmax c = 0.7, and values v near thr·c for which the true division v/c and the
    // reciprocal product v·(1/c) fall on different sides of a threshold (found by a small search), so
    // a kernel that multiplied by the reciprocal here would give other codes.
    if (n % 64) blk(nb - 1, [&](long long i, long long j) {
        const float c = 0.7f;
        if (j == 0) { x[i] = -c; return; }
        float t = hostq::thr((int)(j % 15)), v = t * c;
        for (int k = 0; k < 64; ++k) {
            float w = v;
            for (int s = 0; s < k / 2; ++s) w = std::nextafter(w, k % 2 ? 1.0f : -1.0f);
            if (hostq::code_of(w / c) != hostq::code_of(w * (1.0f / c))) { v = w; break; }
        }
        x[i] = v;
    });
    return x;
}

static void test_quant() {
    const std::vector<float> code8 = hostq::dynamic_map();
    const char* names[3] = {"f32", "bf16", "f16"};
    for (int dt : {DT_F32, DT_BF16, DT_F16}) {
        for (long long n : {1LL, 2LL, 63LL, 64LL, 65LL, 127LL, 64LL * 256, 64LL * 257 + 5, 64LL * 520 + 33}) {
            std::vector<float> x = quant_input(n + dt, n);
            // The values as the dtype stores them (what the kernel reads), and their bytes.
            std::vector<unsigned short> x16(n);
            for (long long i = 0; i < n; ++i) {
                if (dt == DT_BF16) { x16[i] = h_f2bf(x[i]); x[i] = emu_bf(x16[i]); }
                if (dt == DT_F16) { x16[i] = ref_f2h(x[i]); x[i] = (float)ref_h2f(x16[i]); }
            }
            const void* src = dt == DT_F32 ? (const void*)x.data() : (const void*)x16.data();
            std::vector<u8> want_p; std::vector<float> want_a;
            hostq::quantize(x, want_p, want_a);
            long long nb = want_a.size();
            std::vector<u8> packed(want_p.size() + 8, 0xee);
            std::vector<float> absmax(nb, NAN);
            int bad = 0;
            // 2 blocks of 256 threads = 16 warps: the grid-stride loop runs several rounds.
            emu_launch(nf4_quant_k, dim3{2}, dim3{256}, src, dt, n, packed.data(), absmax.data(), &bad);
            std::string tag = std::string("nf4_quant ") + names[dt] + " n=" + std::to_string(n);
            check_bytes(tag + " packed", packed.data(), want_p);
            check_bits(tag + " absmax", absmax, want_a);
            if (bad) { ++failures; std::printf("FAIL %s flagged a non-finite element\n", tag.c_str()); }
            // Double quantization of this absmax, offset = its mean (any f32 does: the host passes
            // torch's mean, computed in torch's order, to the same kernel).
            double sum = 0; for (float a : want_a) sum += a;
            float offset = (float)(sum / nb);
            std::vector<u8> want_c; std::vector<float> want_n;
            hostq::nested(want_a, offset, code8, want_c, want_n);
            std::vector<u8> codes(nb + 1, 0xee);
            std::vector<float> nest(want_n.size(), NAN);
            emu_launch(nf4_quant_nested_k, dim3{2}, dim3{256}, (const float*)want_a.data(), nb, offset, code8.data(), codes.data(), nest.data());
            check_bytes(tag + " nested codes", codes.data(), want_c);
            check_bits(tag + " nested absmax", nest, want_n);
        }
    }
    // The nested kernel on crafted groups (offset 0): group 0 holds 1.0 and every midpoint of
    // adjacent code8 values (exact dQuantize ties) and every code value; group 1 is constant
    // (nested absmax 0, 0·inf = NaN: code 0); group 2 is a ragged 37.
    {
        std::vector<float> a;
        a.push_back(1.0f);
        for (int i = 0; i + 1 < 256 && a.size() < 256; i += 2) a.push_back((code8[i] + code8[i + 1]) * 0.5f);
        for (int i = 1; a.size() < 256; i += 2) a.push_back(code8[i]);
        for (int i = 0; i < 256; ++i) a.push_back(0.0f);
        Rng g{99};
        for (int i = 0; i < 37; ++i) a.push_back(g.uni(2.0f));
        long long nb = a.size();
        std::vector<u8> want_c; std::vector<float> want_n;
        hostq::nested(a, 0.0f, code8, want_c, want_n);
        std::vector<u8> codes(nb, 0xee);
        std::vector<float> nest(want_n.size(), NAN);
        emu_launch(nf4_quant_nested_k, dim3{1}, dim3{256}, (const float*)a.data(), nb, 0.0f, code8.data(), codes.data(), nest.data());
        check_bytes("nf4_quant_nested ties/constant/ragged codes", codes.data(), want_c);
        check_bits("nf4_quant_nested ties/constant/ragged absmax", nest, want_n);
        if (want_c[256] != 0) { ++failures; std::printf("FAIL constant nested group: host code %d, expected 0\n", want_c[256]); }
    }
    // A non-finite element sets the flag (the host then names it).
    for (float badv : {NAN, INFINITY}) {
        std::vector<float> x = quant_input(5, 200);
        x[131] = badv;
        std::vector<u8> packed(108, 0);
        std::vector<float> absmax(4, 0);
        int bad = 0;
        emu_launch(nf4_quant_k, dim3{1}, dim3{256}, (const void*)x.data(), DT_F32, 200LL, packed.data(), absmax.data(), &bad);
        if (bad != 1) { ++failures; std::printf("FAIL nf4_quant_k did not flag %g\n", badv); }
        else std::printf("ok   %-44s\n", (std::string("nf4_quant flags ") + (std::isnan(badv) ? "NaN" : "inf")).c_str());
    }
}

void check_nf4() {
    test_quant();
    test_f16();
    test_dequant();
    test_gemv_gemm();
}
