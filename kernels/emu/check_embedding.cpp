// check_embedding.cpp — embedding lookup and scatter-add (atomics into bf16/f16), and out-of-range ids.
#include "check.h"
#include "../embedding.cu"

static void test_bf16() {
    Rng g{77};
    // embedding fwd / bwd (repeated id → atomics into bf16) and the id checks.
    int V = 6, H = 5;
    auto table = g.vec((size_t)V * H, 1);
    std::vector<int> ids = {2, 0, 2, 5};
    std::vector<float> eo(ids.size() * H, NAN);
    emu_launch(embedding_fwd_k, dim3{(unsigned)ids.size()}, dim3{32}, (const int*)ids.data(), (const void*)table.data(), DT_F32, (void*)eo.data(), DT_F32, V, H, 2.0f);
    std::vector<double> we(eo.size());
    for (size_t i = 0; i < ids.size(); ++i) for (int j = 0; j < H; ++j) we[i * H + j] = 2.0 * table[ids[i] * H + j];
    check("embedding_fwd", eo, we, 0, 1e-7);
    std::vector<unsigned short> dt16((size_t)V * H, h_f2bf(1.0f));
    auto dout2 = g.vec(ids.size() * H, 1);
    emu_launch(embedding_bwd_k, dim3{(unsigned)ids.size()}, dim3{32}, (const int*)ids.data(), (const void*)dout2.data(), DT_F32, (void*)dt16.data(), DT_BF16, V, H, 0.5f);
    std::vector<double> wdt((size_t)V * H, 1.0);
    for (size_t i = 0; i < ids.size(); ++i) for (int j = 0; j < H; ++j) wdt[ids[i] * H + j] += 0.5 * dout2[i * H + j];
    check("embedding_bwd into bf16", unbf(dt16), wdt, 1e-2, 1e-2);
    // Out-of-range ids (refused by the backend before a launch) never touch the table: the row
    // reads as zeros, the backward skips it.
    std::vector<int> bad = {0, 6, -1, 5};
    std::vector<float> bo(bad.size() * H, NAN);
    emu_launch(embedding_fwd_k, dim3{(unsigned)bad.size()}, dim3{32}, (const int*)bad.data(), (const void*)table.data(), DT_F32, (void*)bo.data(), DT_F32, V, H, 2.0f);
    std::vector<double> wb(bo.size(), 0.0);
    for (size_t i = 0; i < bad.size(); ++i)
        if (bad[i] >= 0 && bad[i] < V) for (int j = 0; j < H; ++j) wb[i * H + j] = 2.0 * table[bad[i] * H + j];
    check("embedding_fwd with out-of-range ids", bo, wb, 0, 1e-7);
    std::vector<float> dtb((size_t)V * H, 1.0f);
    emu_launch(embedding_bwd_k, dim3{(unsigned)bad.size()}, dim3{32}, (const int*)bad.data(), (const void*)dout2.data(), DT_F32, (void*)dtb.data(), DT_F32, V, H, 0.5f);
    std::vector<double> wdb((size_t)V * H, 1.0);
    for (size_t i = 0; i < bad.size(); ++i)
        if (bad[i] >= 0 && bad[i] < V) for (int j = 0; j < H; ++j) wdb[bad[i] * H + j] += 0.5 * dout2[i * H + j];
    check("embedding_bwd with out-of-range ids", dtb, wdb, 1e-6, 1e-6);
}

static void test_f16() {
    Rng g{1616};
    // Embedding backward into an f16 table (16-bit atomic CAS path, repeated ids).
    int V = 5, H = 7;
    std::vector<int> ids = {1, 4, 1, 1, 0};
    auto dout = g.vec(ids.size() * H, 1);
    std::vector<unsigned short> dt16((size_t)V * H, ref_f2h(0.25f));
    emu_launch(embedding_bwd_k, dim3{(unsigned)ids.size()}, dim3{32}, (const int*)ids.data(), (const void*)dout.data(), DT_F32, (void*)dt16.data(), DT_F16, V, H, 0.5f);
    std::vector<double> wdt((size_t)V * H, 0.25);
    for (size_t i = 0; i < ids.size(); ++i) for (int j = 0; j < H; ++j) wdt[ids[i] * H + j] += 0.5 * dout[i * H + j];
    check("f16 embedding_bwd (atomic CAS)", from_h(dt16), wdt, 4e-3, 4 * HU);
}

void check_embedding() {
    test_bf16();
    test_f16();
}
