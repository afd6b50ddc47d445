// check_attention.cpp — causal attention: CUDA-core and tensor-core kernels, forward and backward.
#include "check.h"
#include "../attention.cu"
#include "../attention_flash.cu"

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


static void test_f16() {
    Rng g{1616};
    // Attention on CUDA cores (the path fp16-only GPUs take) with f16 q/k/v/out/dout/dq/dk/dv.
    {
        int B = 1, T = 9, NH = 2, NKV = 1, D = 40; float cap = 50.0f; int window = 5;
        size_t qn = (size_t)B * T * NH * D, kn = (size_t)B * T * NKV * D;
        auto q = round_hv(g.vec(qn, 1)), k = round_hv(g.vec(kn, 1)), v = round_hv(g.vec(kn, 1)), dout = round_hv(g.vec(qn, 1));
        std::vector<int> seg(T, 0);
        float scale = 1.0f / std::sqrt((float)D);
        auto ref = ref_attn(q, k, v, seg, false, dout, B, T, T, NH, NKV, D, scale, cap, window);
        auto q16 = to_h(q), k16 = to_h(k), v16 = to_h(v), d16 = to_h(dout);
        std::vector<unsigned short> out16(qn, 0xffff), dq16(qn, 0xffff), dk16(kn, 0xffff), dv16(kn, 0xffff);
        std::vector<float> lse((size_t)B * NH * T, NAN), delta((size_t)B * NH * T, NAN);
        unsigned rows = B * T * NH;
        emu_launch(attn_fwd_k, dim3{(rows + 3) / 4}, dim3{128}, (const void*)q16.data(), DT_F16, (const void*)k16.data(), DT_F16, (const void*)v16.data(), DT_F16,
                   (const int*)seg.data(), 0, (void*)out16.data(), DT_F16, (void*)lse.data(), DT_F32, B, T, T, NH, NKV, D, scale, cap, window);
        check("f16 attn_fwd out", from_h(out16), round_h(ref.out), 1e-4, 2 * HU);
        check("f16 attn_fwd lse", lse, ref.lse, 1e-5, 1e-5);
        emu_launch(attn_bwd_delta_k, dim3{(rows + 3) / 4}, dim3{128}, (const void*)out16.data(), DT_F16, (const void*)d16.data(), DT_F16, delta.data(), B, T, NH, D);
        emu_launch(attn_bwd_dq_k, dim3{(rows + 3) / 4}, dim3{128}, (const void*)q16.data(), DT_F16, (const void*)k16.data(), DT_F16, (const void*)v16.data(), DT_F16,
                   (const int*)seg.data(), 0, (const void*)lse.data(), DT_F32, (const float*)delta.data(), (const void*)d16.data(), DT_F16, (void*)dq16.data(), DT_F16,
                   B, T, NH, NKV, D, scale, cap, window);
        unsigned krows = B * T * NKV;
        emu_launch(attn_bwd_dkv_k, dim3{(krows + 3) / 4}, dim3{128}, (const void*)q16.data(), DT_F16, (const void*)k16.data(), DT_F16, (const void*)v16.data(), DT_F16,
                   (const int*)seg.data(), 0, (const void*)lse.data(), DT_F32, (const float*)delta.data(), (const void*)d16.data(), DT_F16, (void*)dk16.data(), DT_F16,
                   (void*)dv16.data(), DT_F16, B, T, NH, NKV, D, scale, cap, window);
        // delta comes from the f16-rounded out, so the gradients carry ~1 f16 ulp of out on top.
        check("f16 attn_bwd dq", from_h(dq16), ref.dq, 2e-3 * maxabs(ref.dq), 4 * HU);
        check("f16 attn_bwd dk", from_h(dk16), ref.dk, 2e-3 * maxabs(ref.dk), 4 * HU);
        check("f16 attn_bwd dv", from_h(dv16), ref.dv, 2e-3 * maxabs(ref.dv), 4 * HU);
    }
    // The tensor-core attention forward with f16 inputs: staged to bf16 through ld() (sm_80+ only).
    {
        constexpr int DIM = 32;
        int B = 1, T = 20, NH = 2, NKV = 1;
        size_t qn = (size_t)B * T * NH * DIM, kn = (size_t)B * T * NKV * DIM;
        auto q = round_hv(g.vec(qn, 1)), k = round_hv(g.vec(kn, 1)), v = round_hv(g.vec(kn, 1));
        std::vector<float> qb = q, kb = k, vb = v;
        for (auto* x : {&qb, &kb, &vb}) for (auto& e : *x) e = h_bf(e);
        std::vector<int> seg(T, 0);
        float scale = 1.0f / std::sqrt((float)DIM);
        auto ref = ref_attn(qb, kb, vb, seg, false, {}, B, T, T, NH, NKV, DIM, scale, 0.0f, 0);
        auto q16 = to_h(q), k16 = to_h(k), v16 = to_h(v);
        std::vector<float> out(qn, NAN), lse((size_t)B * NH * T, NAN);
        emu_launch(attn_fwd_mma_d32_k, dim3{1, (unsigned)(B * NH)}, dim3{128}, (const void*)q16.data(), DT_F16, (const void*)k16.data(), DT_F16, (const void*)v16.data(), DT_F16,
                   (const int*)seg.data(), 0, (void*)out.data(), DT_F32, (void*)lse.data(), DT_F32, B, T, T, NH, NKV, DIM, scale, 0.0f, 0);
        check("f16 in attn_fwd_mma (staged as bf16) out", out, ref.out, 1e-2, 1e-2);
        check("f16 in attn_fwd_mma (staged as bf16) lse", lse, ref.lse, 1e-4, 1e-4);
    }
}


// ---- attention_flash.cu ----------------------------------------------------------------------------
// The FlashAttention-2-style kernels against the same f64 reference on bf16-rounded inputs: ragged T
// (not a multiple of any tile), TK > T, GQA, windows that skip whole tiles and leave unmasked interior
// tiles, segments, soft-cap on and off. The emulator defers cp.async copies to their wait and fills
// shared memory with NaN bytes, so a missing wait or an unwritten tile row fails here.
// small: the backward's ≤ 99 KiB variant (`_s` kernels, FaBwd<D, true>) instead of the default tiling.
template <int DIM>
static void run_attn_flash(int B, int T, int TK, int NH, int NKV, float cap, int window, bool has_seg, bool small = false) {
    Rng g{(uint64_t)(T * 7919 + TK * 13 + DIM + window)};
    size_t qn = (size_t)B * T * NH * DIM, kn = (size_t)B * TK * NKV * DIM;
    auto q = g.vec(qn, 1), k = g.vec(kn, 1), v = g.vec(kn, 1), dout = g.vec(qn, 1);
    for (auto* x : {&q, &k, &v, &dout}) for (auto& e : *x) e = h_bf(e);
    std::vector<int> seg(B * TK);
    for (int i = 0; i < B * TK; ++i) seg[i] = (i % TK) < (3 * TK) / 5 ? 2 : 5;
    float scale = 1.0f / std::sqrt((float)DIM);
    const bool bwd = T == TK;
    auto ref = ref_attn(q, k, v, seg, has_seg, bwd ? dout : std::vector<float>{}, B, T, TK, NH, NKV, DIM, scale, cap, window);
    std::vector<unsigned short> q16(qn), k16(kn), v16(kn), d16(qn), out16(qn, 0xffff);
    for (size_t i = 0; i < qn; ++i) { q16[i] = h_f2bf(q[i]); d16[i] = h_f2bf(dout[i]); }
    for (size_t i = 0; i < kn; ++i) { k16[i] = h_f2bf(k[i]); v16[i] = h_f2bf(v[i]); }
    std::vector<float> out(qn, NAN), lse((size_t)B * NH * T, NAN);
    auto fwd = DIM == 128 ? attn_fwd_flash_d128_k : attn_fwd_flash_d256_k;
    dim3 grid{(unsigned)((T + FA_BQ - 1) / FA_BQ), (unsigned)(B * NH)};
    std::string tag = " D=" + std::to_string(DIM) + " B=" + std::to_string(B) + " T=" + std::to_string(T) + " TK=" + std::to_string(TK) +
                      " NH/NKV=" + std::to_string(NH) + "/" + std::to_string(NKV) + " cap=" + std::to_string((int)cap) + " W=" + std::to_string(window) +
                      (has_seg ? " seg" : "") + (small ? " small" : "");
    // f32 output (to see the kernel's own error) and bf16 output (the production store path).
    emu_launch_smem(fwd, grid, dim3{128}, (size_t)fa_fwd_smem<DIM>(), (const void*)q16.data(), DT_BF16, (const void*)k16.data(), DT_BF16, (const void*)v16.data(),
                    DT_BF16, (const int*)seg.data(), (int)has_seg, (void*)out.data(), DT_F32, (void*)lse.data(), DT_F32, B, T, TK, NH, NKV, DIM, scale, cap, window);
    check("attn_fwd_flash out" + tag, out, ref.out, 1e-2, 1e-2);
    check("attn_fwd_flash lse" + tag, lse, ref.lse, 1e-4, 1e-4);
    std::vector<float> lse2((size_t)B * NH * T, NAN);
    emu_launch_smem(fwd, grid, dim3{128}, (size_t)fa_fwd_smem<DIM>(), (const void*)q16.data(), DT_BF16, (const void*)k16.data(), DT_BF16, (const void*)v16.data(),
                    DT_BF16, (const int*)seg.data(), (int)has_seg, (void*)out16.data(), DT_BF16, (void*)lse2.data(), DT_F32, B, T, TK, NH, NKV, DIM, scale, cap, window);
    std::vector<float> outb(qn);
    for (size_t i = 0; i < qn; ++i) outb[i] = emu_bf(out16[i]);
    check("attn_fwd_flash bf16 out" + tag, outb, ref.out, 1.5e-2, 1.5e-2);
    if (!bwd) return;
    std::vector<float> lser(ref.lse.begin(), ref.lse.end()), delta((size_t)B * NH * T);
    for (int b = 0; b < B; ++b) for (int i = 0; i < T; ++i) for (int h = 0; h < NH; ++h) {
        double d = 0; size_t o = (((size_t)b * T + i) * NH + h) * DIM;
        for (int c = 0; c < DIM; ++c) d += (double)dout[o + c] * ref.out[o + c];
        delta[((size_t)b * NH + h) * T + i] = (float)d;
    }
    std::vector<float> dq(qn, NAN), dk(kn, NAN), dv(kn, NAN);
    auto kdq = small ? (DIM == 128 ? attn_bwd_dq_flash_s_d128_k : attn_bwd_dq_flash_s_d256_k)
                     : (DIM == 128 ? attn_bwd_dq_flash_d128_k : attn_bwd_dq_flash_d256_k);
    auto kdkv = small ? (DIM == 128 ? attn_bwd_dkv_flash_s_d128_k : attn_bwd_dkv_flash_s_d256_k)
                      : (DIM == 128 ? attn_bwd_dkv_flash_d128_k : attn_bwd_dkv_flash_d256_k);
    const size_t dq_smem = small ? fa_dq_smem<DIM, true>() : fa_dq_smem<DIM, false>();
    const size_t dkv_smem = small ? fa_dkv_smem<DIM, true>() : fa_dkv_smem<DIM, false>();
    emu_launch_smem(kdq, grid, dim3{128}, dq_smem, (const void*)q16.data(), DT_BF16, (const void*)k16.data(), DT_BF16, (const void*)v16.data(),
                    DT_BF16, (const int*)seg.data(), (int)has_seg, (const void*)lser.data(), DT_F32, (const float*)delta.data(), (const void*)d16.data(), DT_BF16,
                    (void*)dq.data(), DT_F32, B, T, NH, NKV, DIM, scale, cap, window);
    emu_launch_smem(kdkv, dim3{(unsigned)((T + FA_BKV - 1) / FA_BKV), (unsigned)(B * NKV)}, dim3{256}, dkv_smem, (const void*)q16.data(),
                    DT_BF16, (const void*)k16.data(), DT_BF16, (const void*)v16.data(), DT_BF16, (const int*)seg.data(), (int)has_seg,
                    (const void*)lser.data(), DT_F32, (const float*)delta.data(), (const void*)d16.data(), DT_BF16, (void*)dk.data(), DT_F32, (void*)dv.data(),
                    DT_F32, B, T, NH, NKV, DIM, scale, cap, window);
    check("attn_bwd_flash dq" + tag, dq, ref.dq, 1e-2 * maxabs(ref.dq), 1e-2);
    check("attn_bwd_flash dk" + tag, dk, ref.dk, 1e-2 * maxabs(ref.dk), 1e-2);
    check("attn_bwd_flash dv" + tag, dv, ref.dv, 1e-2 * maxabs(ref.dv), 1e-2);
}

static void test_attention_flash() {
    // The shared-memory figures launch.rs computes (launch::tests::attention_flash_plans pins the same).
    if (fa_fwd_smem<256>() != 101376 || fa_dq_smem<256, false>() != 135168 || fa_dkv_smem<256, false>() != 152064 ||
        fa_fwd_smem<128>() != 87040 || fa_dq_smem<128, false>() != 104448 || fa_dkv_smem<128, false>() != 86528 ||
        fa_dq_smem<256, true>() != 101376 || fa_dkv_smem<256, true>() != 92800 || fa_dq_smem<128, true>() != 52224 ||
        fa_dkv_smem<128, true>() != 51840) {
        std::fprintf(stderr, "FAIL attention_flash: shared-memory sizes changed; update launch.rs and this check\n");
        std::exit(1);
    }
    run_attn_flash<256>(1, 70, 70, 2, 1, 50.0f, 0, true);     // ragged, GQA 2:1, soft-cap, segments
    run_attn_flash<256>(1, 37, 100, 2, 2, 0.0f, 0, false);    // KV-cache offset TK > T, no cap
    run_attn_flash<256>(1, 200, 200, 2, 1, 50.0f, 100, false); // window: skipped, edge and interior tiles
    run_attn_flash<128>(2, 130, 130, 4, 2, 30.0f, 40, true);  // B = 2, window skips tiles, segments
    run_attn_flash<128>(1, 45, 90, 2, 1, 50.0f, 20, true);    // TK > T with a window and segments
    // The ≤ 99 KiB backward (16-key dq tiles, single-buffered 16-query dk/dv tiles).
    run_attn_flash<256>(1, 70, 70, 2, 1, 50.0f, 0, true, true);
    run_attn_flash<128>(2, 130, 130, 4, 2, 30.0f, 40, true, true);
}

void check_attention() {
    test_f16();
    test_attention();
    test_attention_mma();
    test_attention_bwd_mma();
    test_attention_flash();
}
