// check_adamw.cpp — AdamW, bit-exact against a transcription of the CPU reference.
#include "check.h"
#include "../adamw.cu"

// ---- AdamW: bit-exact against a C++ transcription of the CPU reference ----------------------------
// The CPU op (crates/kernels/src/cpu/adamw.rs, AdamScalars::update), line by line with explicit f32
// roundings: std::fma for Rust's f32::mul_add, one f32 operation per expression (the checks are built
// with -std=c++20, so GCC does not contract a*b+c into an FMA).
struct AdamSc { bool has_decay; float decay; bool w1_small; float w1, w1m1, b2, omb2, neg_step, bc2_sqrt, eps; };

static AdamSc adam_scalars(double lr, double b1, double b2, double eps, double wd, double t) {
    AdamSc s;
    s.has_decay = wd != 0.0;
    s.decay = (float)(1.0 - lr * wd);
    s.w1 = (float)(1.0 - b1);
    s.w1_small = std::fabs(s.w1) < 0.5f;
    s.w1m1 = s.w1 - 1.0f;
    s.b2 = (float)b2;
    s.omb2 = (float)(1.0 - b2);
    s.neg_step = (float)(-(lr / (1.0 - std::pow(b1, t))));
    s.bc2_sqrt = (float)std::pow(1.0 - std::pow(b2, t), 0.5);
    s.eps = (float)eps;
    return s;
}

static void cpu_adam_update(const AdamSc& s, float& p, float g, float& m, float& v) {
    if (s.has_decay) p = p * s.decay;
    float diff = g - m;
    m = s.w1_small ? std::fma(s.w1, diff, m) : std::fma(s.w1m1, diff, g);
    float og = s.omb2 * g;
    float vb = v * s.b2;
    v = std::fma(og, g, vb);
    float sq = std::sqrt(v);
    float q = sq / s.bc2_sqrt;
    float denom = q + s.eps;
    float num = s.neg_step * m;
    p = p + num / denom;
}


static void test_adamw() {
    Rng g{0xADA3};
    const int n = 1000;  // ragged against the 256-thread block
    // (lr, beta1, beta2, eps, wd): torch defaults with decay; no decay; beta1 < 0.5 (the other lerp
    // branch); a large eps and tiny lr.
    const double hps[4][5] = {{1e-3, 0.9, 0.999, 1e-8, 0.01}, {2e-4, 0.9, 0.95, 1e-8, 0.0}, {1e-2, 0.3, 0.99, 1e-6, 0.1}, {1e-6, 0.99, 0.9999, 1e-3, 0.0}};
    for (int hi = 0; hi < 4; ++hi) {
        const double* h = hps[hi];
        auto p = g.vec(n, 1);
        // Include magnitudes the moments really see: tiny and large gradients, exact zeros, subnormals.
        std::vector<float> m(n, 0.0f), v(n, 0.0f);
        auto pc = p; auto mc = m; auto vc = v;
        for (int step = 1; step <= 3; ++step) {
            auto gr = g.vec(n, 1);
            for (int i = 0; i < n; i += 7) gr[i] *= 1e-20f;
            for (int i = 3; i < n; i += 11) gr[i] = 0.0f;
            for (int i = 5; i < n; i += 13) gr[i] *= 1e4f;
            gr[1] = 1e-40f;  // subnormal
            AdamSc s = adam_scalars(h[0], h[1], h[2], h[3], h[4], step);
            for (int i = 0; i < n; ++i) cpu_adam_update(s, pc[i], gr[i], mc[i], vc[i]);
            emu_launch(adamw_k, dim3{2}, dim3{256}, (void*)p.data(), DT_F32, (const void*)gr.data(), DT_F32, (void*)m.data(), DT_F32,
                       (void*)v.data(), DT_F32, (i64)n, (int)s.has_decay, s.decay, (int)s.w1_small, s.w1, s.w1m1, s.b2, s.omb2, s.neg_step,
                       s.bc2_sqrt, s.eps);
        }
        std::string tag = "adamw hp" + std::to_string(hi) + " ";
        check_bits(tag + "p (3 steps)", p, pc);
        check_bits(tag + "m (3 steps)", m, mc);
        check_bits(tag + "v (3 steps)", v, vc);
    }
    // Against a plain double loop as well (the transcription itself must be AdamW).
    auto p = g.vec(n, 1), gr = g.vec(n, 1);
    std::vector<float> m(n, 0.1f), v(n, 0.2f);
    std::vector<double> wp(n), wm(n), wv(n);
    double lr = 1e-2, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.01;
    double bc1 = 1 - std::pow(b1, 3), bc2 = 1 - std::pow(b2, 3);
    for (int i = 0; i < n; ++i) {
        double pp = p[i] * (1 - lr * wd);
        double mi = b1 * 0.1f + (1 - b1) * (double)gr[i], vi = b2 * 0.2f + (1 - b2) * (double)gr[i] * gr[i];
        wp[i] = pp - lr / bc1 * mi / (std::sqrt(vi) / std::sqrt(bc2) + eps);
        wm[i] = mi; wv[i] = vi;
    }
    AdamSc s = adam_scalars(lr, b1, b2, eps, wd, 3);
    emu_launch(adamw_k, dim3{1}, dim3{256}, (void*)p.data(), DT_F32, (const void*)gr.data(), DT_F32, (void*)m.data(), DT_F32, (void*)v.data(), DT_F32,
               (i64)n, (int)s.has_decay, s.decay, (int)s.w1_small, s.w1, s.w1m1, s.b2, s.omb2, s.neg_step, s.bc2_sqrt, s.eps);
    check("adamw p vs f64", p, wp, 1e-6, 1e-5);
    check("adamw m vs f64", m, wm, 1e-7, 1e-5);
    check("adamw v vs f64", v, wv, 1e-7, 1e-5);
}

void check_adamw() { test_adamw(); }
