// check_reduce.cpp — the two-pass deterministic f64 sum (shared by sum_squares and the losses).
#include "check.h"
#include "../reduce.cu"

static void test_sum_squares() {
    int n = 3, h = 70;
    Rng g{8};
    auto x = g.vec((size_t)n * h, 2);
    // Two-pass Σx² in f64.
    std::vector<double> parts(3, NAN), out(1, NAN);
    emu_launch(reduce_partial_k, dim3{3}, dim3{256}, (const void*)x.data(), DT_F32, (i64)(n * h), 0, parts.data());
    emu_launch(reduce_final_k, dim3{1}, dim3{256}, (const double*)parts.data(), 3, out.data());
    double want = 0; for (float v : x) want += (double)v * v;
    check("reduce sum_squares", std::vector<float>{(float)out[0]}, {want}, 1e-4, 1e-6);
}

void check_reduce() { test_sum_squares(); }
