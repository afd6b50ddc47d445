// check_dropout.cpp — counter-based dropout masks, bit-identical to the CPU backend.
#include "check.h"
#include "../dropout.cu"

// The CPU reference (crates/kernels/src/cpu/dropout.rs) transcribed: SplitMix64 with wrapping u64.
static unsigned long long h_splitmix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static unsigned long long fnv1a_bits(const std::vector<float>& x) {
    unsigned long long h = 0xcbf29ce484222325ull;
    for (float v : x) {
        unsigned u; std::memcpy(&u, &v, 4);
        for (int b = 0; b < 4; ++b) { h ^= (u >> (8 * b)) & 0xffu; h *= 0x00000100000001b3ull; }
    }
    return h;
}

static void test_dropout() {
    // Known answers shared with the Rust test cpu::dropout::tests::known_answers: they tie this
    // transcription and the kernel to the CPU backend's exact bits.
    unsigned long long key = h_splitmix64(42ull ^ h_splitmix64(7ull));
    bool ok_ref = h_splitmix64(1234567ull) == 6457827717110365317ull && key == 7974615062405353404ull;
    if (!ok_ref) { ++failures; std::printf("FAIL dropout: host splitmix64 / key differ from the Rust known answers\n"); }
    for (auto [n, p, grid] : {std::tuple{1000, 0.1, 2}, std::tuple{777, 0.5, 1}, std::tuple{300, 0.0, 3}, std::tuple{513, 0.93, 1}}) {
        unsigned long long thr = (unsigned long long)(p * 18446744073709551616.0);
        float keep = (float)(1.0 / (1.0 - p));
        std::vector<float> got(n, NAN), want(n);
        for (int i = 0; i < n; ++i) want[i] = h_splitmix64(key + (unsigned long long)i * 0x9E3779B97F4A7C15ull) < thr ? 0.0f : keep;
        emu_launch(dropout_mask_k, dim3{(unsigned)grid}, dim3{256}, (void*)got.data(), DT_F32, (i64)n, (i64)key, (i64)thr, keep);
        check_bits("dropout_mask n=" + std::to_string(n) + " p=" + std::to_string(p), got, want);
        if (n == 1000) {
            size_t zeros = 0; for (float v : got) zeros += v == 0.0f;
            if (zeros != 87 || fnv1a_bits(got) != 8281619623806533686ull) {
                ++failures;
                std::printf("FAIL dropout_mask known answer: %zu zeros, fnv %llu (Rust: 87, 8281619623806533686)\n", zeros, fnv1a_bits(got));
            } else {
                std::printf("ok   %-44s 87 zeros, fnv matches the CPU backend\n", "dropout_mask known answer (seed 42, stream 7)");
            }
        }
    }
}

void check_dropout() { test_dropout(); }
