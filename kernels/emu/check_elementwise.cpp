// check_elementwise.cpp — fill, copy (with dtype conversion, and on offset pointers as copy_range), axpy, scale, mul.
#include "check.h"
#include "../elementwise.cu"

// bf16 storage where noted (checks the dtype-tagged access too).
static void test_pointwise() {
    Rng g{77};
    auto [n, a, b, a16, b16] = bf16_inputs(g, 1000);
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
}

static void test_f16() {
    Rng g{1616};
    auto [n, a, b, a16, b16] = f16_inputs(g, 777);
    std::vector<unsigned short> y16 = b16;
    emu_launch(axpy_k, dim3{3}, dim3{256}, 0.5f, (const void*)a.data(), DT_F32, (void*)y16.data(), DT_F16, (i64)n);
    std::vector<double> wy(n); for (int i = 0; i < n; ++i) wy[i] = hr(b[i] + 0.5f * a[i]);
    check("f16 axpy f32 into f16 (exact rounding)", from_h(y16), wy, 0, 0);
    std::vector<float> big = g.vec(n, 70000.0f);  // beyond 65504: overflow to inf must be kept
    std::vector<unsigned short> c16(n, 0);
    emu_launch(copy_k, dim3{1}, dim3{256}, (const void*)big.data(), DT_F32, (void*)c16.data(), DT_F16, (i64)n);
    size_t cbad = 0;
    for (int i = 0; i < n; ++i) cbad += c16[i] != ref_f2h(big[i]);
    if (cbad) { ++failures; std::printf("FAIL %-44s %zu/%d differ from ref_f2h\n", "f16 copy f32 -> f16 (incl. overflow)", cbad, n); }
    else std::printf("ok   %-44s n=%d bit-exact\n", "f16 copy f32 -> f16 (incl. overflow)", n);
    std::vector<float> cf(n, NAN);
    emu_launch(copy_k, dim3{1}, dim3{256}, (const void*)a16.data(), DT_F16, (void*)cf.data(), DT_F32, (i64)n);
    check("f16 copy f16 -> f32", cf, std::vector<double>(a.begin(), a.end()), 0, 0);
    std::vector<unsigned short> bb16(n);  // bf16 <- f16 conversion through the tags
    emu_launch(copy_k, dim3{1}, dim3{256}, (const void*)a16.data(), DT_F16, (void*)bb16.data(), DT_BF16, (i64)n);
    std::vector<float> bbf(n); std::vector<double> wbb(n);
    for (int i = 0; i < n; ++i) { bbf[i] = emu_bf(bb16[i]); wbb[i] = h_bf(a[i]); }
    check("f16 copy f16 -> bf16", bbf, wbb, 0, 0);
}

static void test_copy_range() {
    // copy_range = copy_k on offset pointers: dst[5..16] <- src[3..14]; the rest of dst stays poisoned.
    Rng g{0xC0};
    auto src = g.vec(20, 2);
    std::vector<unsigned short> src16(20);
    for (int i = 0; i < 20; ++i) { src16[i] = h_f2bf(src[i]); }
    for (int bf = 0; bf < 2; ++bf) {
        std::vector<float> dst(20, NAN), want(20, NAN);
        const void* sp = bf ? (const void*)(src16.data() + 3) : (const void*)(src.data() + 3);
        emu_launch(copy_k, dim3{1}, dim3{256}, sp, bf ? DT_BF16 : DT_F32, (void*)(dst.data() + 5), DT_F32, (i64)11);
        for (int i = 0; i < 11; ++i) want[5 + i] = bf ? emu_bf(src16[3 + i]) : src[3 + i];
        check_bits(bf ? "copy_range bf16 -> f32 (offsets 3 -> 5)" : "copy_range f32 (offsets 3 -> 5)", dst, want);
    }
}

void check_elementwise() {
    test_pointwise();
    test_f16();
    test_copy_range();
}
