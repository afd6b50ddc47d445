// cuda_emu.h — a tiny CPU emulator for the subset of CUDA that kernels/*.cu use, so the real kernel
// source runs on a machine without a GPU (kernels/emu/check_<family>.cpp, `cargo xtask kernels-check`).
//
// Model: a launch runs its blocks one after another; within a block every CUDA thread is a ucontext
// fiber on one OS thread. __syncthreads is a block-wide barrier, warp shuffles and the mma.sync
// emulation use a warp-wide barrier and scratch. A thread that returns early no longer counts for
// either barrier (as an exited CUDA thread). __shared__ variables become function-level statics: shared by the threads of the one block
// that runs at a time. This checks indexing, synchronization structure and arithmetic; it says nothing
// about performance, and the mma.sync emulation encodes the PTX ISA fragment layout of
// m16n8k16.row.col (A: a0,a1 = (g, 2t..2t+1), a2,a3 = (g+8, ·), a4..a7 = same with +8 columns;
// B: b0,b1 = (k = 2t..2t+1, n = g), b2,b3 = k + 8; C: c0,c1 = (g, 2t..), c2,c3 = (g+8, ·)).
// Also emulated (attention_flash.cu): ldmatrix.m8n8.{x1,x2,x4}[.trans] with the PTX ISA fragment layout
// (lane ℓ addresses row ℓ mod 8 of matrix ℓ div 8 and receives row ℓ div 4, elements 2·(ℓ mod 4) and +1
// of each matrix, or of its transpose), rows must be 16-byte aligned; cp.async is *deferred*: a copy
// snapshots its source when issued and lands in shared memory only when cp.async.wait_group retires its
// group, so a kernel that reads a tile before waiting for it reads stale data and fails its check;
// copies never waited for abort the run. Dynamic shared memory (emu_launch_smem) is filled with 0xff
// bytes (bf16 NaN) before every block, so a read of an unwritten element shows up as NaN.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <ucontext.h>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define AFINAR_EMU 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __restrict__

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }

inline dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

// One emulated CUDA thread: a ucontext fiber. All threads of a block run cooperatively on one OS
// thread; a fiber runs until it reaches a barrier (block or warp) or returns.
enum EmuWait { EMU_RUN = 0, EMU_BLOCK = 1, EMU_WARP = 2 };
struct EmuCp {
    void* dst;
    unsigned char data[16];
};
struct EmuFiber {
    std::vector<std::vector<EmuCp>> cp_groups;  // committed cp.async groups, oldest first
    std::vector<EmuCp> cp_open;                 // issued, not yet committed
    ucontext_t ctx;
    std::vector<char> stack;
    dim3 idx;
    int tid = 0;
    bool done = false;
    EmuWait wait = EMU_RUN;
};
struct EmuWarp {
    double buf[32];
    unsigned a[32][4], b[32][2];
    const unsigned short* ptr[32];
};
inline ucontext_t emu_sched;
inline EmuFiber* emu_cur = nullptr;
inline std::vector<EmuWarp> emu_warps;
inline std::function<void()> emu_body;

inline std::vector<unsigned char> emu_smem;  // dynamic shared memory of the running block

inline int emu_tid() { return emu_cur->tid; }
inline unsigned char* emu_dyn_smem() { return emu_smem.data(); }
inline EmuWarp& emu_warp() { return emu_warps[emu_tid() / 32]; }
inline void emu_yield(EmuWait w) {
    emu_cur->wait = w;
    swapcontext(&emu_cur->ctx, &emu_sched);
}
inline void __syncthreads() { emu_yield(EMU_BLOCK); }
inline void emu_warp_sync() { emu_yield(EMU_WARP); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
    EmuWarp& w = emu_warp();
    int lane = emu_tid() & 31;
    w.buf[lane] = (double)v;
    emu_warp_sync();
    T r = (T)w.buf[lane ^ o];
    emu_warp_sync();
    return r;
}

inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// Explicitly rounded f32 intrinsics (round to nearest even): one IEEE operation each on the host.
// The emulator is built in ISO C++ mode (-std=c++20: no floating-point contraction), so plain `a * b + c`
// in kernel code is also a rounded multiply then a rounded add here, while NVRTC may contract it into
// one FMA on the GPU. The emulator therefore cannot show where a kernel's result depends on
// contraction; kernels whose result must be bit-exact with the host (the NF4 absmax decode) use these
// intrinsics, and a CPU test pins that source (launch::tests::nf4_absmax_decode_is_explicitly_rounded).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline void sincosf(float a, float* s, float* c) { *s = std::sin(a); *c = std::cos(a); }
using std::max;
using std::min;

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned val) {
    std::atomic_ref<unsigned>(*p).compare_exchange_strong(cmp, val);
    return cmp;
}
inline int atomicMin(int* p, int v) {
    std::atomic_ref<int> a(*p);
    int old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}

inline float emu_bf(unsigned short h) { return __uint_as_float(((unsigned)h) << 16); }

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, warp-collective: c += A·B.
inline void emu_mma_bf16_16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    EmuWarp& w = emu_warp();
    int lane = emu_tid() & 31;
    w.a[lane][0] = a0; w.a[lane][1] = a1; w.a[lane][2] = a2; w.a[lane][3] = a3;
    w.b[lane][0] = b0; w.b[lane][1] = b1;
    emu_warp_sync();
    auto A = [&](int r, int k) {
        int g = r & 7, t = (k & 7) >> 1, reg = (r >> 3) + 2 * (k >> 3);
        unsigned v = w.a[g * 4 + t][reg];
        return emu_bf((k & 1) ? (unsigned short)(v >> 16) : (unsigned short)(v & 0xffffu));
    };
    auto B = [&](int k, int n) {
        int t = (k & 7) >> 1, reg = k >> 3;
        unsigned v = w.b[n * 4 + t][reg];
        return emu_bf((k & 1) ? (unsigned short)(v >> 16) : (unsigned short)(v & 0xffffu));
    };
    int g = lane >> 2, t = lane & 3;
    float d[4];
    for (int q = 0; q < 4; ++q) {
        int row = g + (q >> 1) * 8, col = 2 * t + (q & 1);
        float s = c[q];
        for (int k = 0; k < 16; ++k) s += A(row, k) * B(k, col);
        d[q] = s;
    }
    emu_warp_sync();
    for (int q = 0; q < 4; ++q) c[q] = d[q];
}

// ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16, warp-collective.
inline void emu_ldmatrix(unsigned* r, int n, const unsigned short* p, bool trans) {
    EmuWarp& w = emu_warp();
    int lane = emu_tid() & 31;
    w.ptr[lane] = p;
    emu_warp_sync();
    for (int i = 0; i < 8 * n; ++i) {
        const unsigned char* a = (const unsigned char*)w.ptr[i];
        if (((uintptr_t)a & 15) != 0 || a < emu_smem.data() || a + 16 > emu_smem.data() + emu_smem.size()) {
            std::fprintf(stderr, "cuda_emu: ldmatrix row address %d is not a 16-byte aligned shared-memory row\n", i);
            std::abort();
        }
    }
    for (int i = 0; i < n; ++i) {
        unsigned lo, hi;
        if (!trans) {
            const unsigned short* row = w.ptr[i * 8 + lane / 4];
            lo = row[2 * (lane % 4)];
            hi = row[2 * (lane % 4) + 1];
        } else {
            lo = w.ptr[i * 8 + 2 * (lane % 4)][lane / 4];
            hi = w.ptr[i * 8 + 2 * (lane % 4) + 1][lane / 4];
        }
        r[i] = lo | (hi << 16);
    }
    emu_warp_sync();
}

// cp.async.cg.shared.global [dst], [src], 16, valid ? 16 : 0 — deferred until its group is waited for.
inline void emu_cp_async16(void* dst, const void* src, bool valid) {
    const unsigned char* d8 = (const unsigned char*)dst;
    if (d8 < emu_smem.data() || d8 + 16 > emu_smem.data() + emu_smem.size()) {
        std::fprintf(stderr, "cuda_emu: cp.async destination outside the dynamic shared memory\n");
        std::abort();
    }
    if (((uintptr_t)dst & 15) != 0 || (valid && ((uintptr_t)src & 15) != 0)) {
        std::fprintf(stderr, "cuda_emu: cp.async with a misaligned 16-byte address\n");
        std::abort();
    }
    EmuCp c;
    c.dst = dst;
    if (valid) std::memcpy(c.data, src, 16);
    else std::memset(c.data, 0, 16);
    emu_cur->cp_open.push_back(c);
}
inline void emu_cp_async_commit() {
    emu_cur->cp_groups.push_back(std::move(emu_cur->cp_open));
    emu_cur->cp_open.clear();
}
// cp.async.wait_group n: every committed group but the newest n has landed.
inline void emu_cp_async_wait(int n) {
    auto& gs = emu_cur->cp_groups;
    while ((int)gs.size() > n) {
        for (auto& c : gs.front()) std::memcpy(c.dst, c.data, 16);
        gs.erase(gs.begin());
    }
}

inline void emu_fiber_entry() {
    emu_body();
    bool pending = !emu_cur->cp_open.empty();
    for (auto& grp : emu_cur->cp_groups) pending |= !grp.empty();
    if (pending) {
        std::fprintf(stderr, "cuda_emu: a thread exited with cp.async copies it never waited for\n");
        std::abort();
    }
    emu_cur->done = true;
    swapcontext(&emu_cur->ctx, &emu_sched);
}

// Runs `kernel(args...)` over grid × block: blocks one after another, the threads of a block as
// fibers scheduled until each reaches a barrier; a barrier opens when every live thread of its scope
// (the warp, or the block) waits on it. Mixed waits that can never open abort (a kernel bug).
template <class F, class... Args>
void emu_launch_smem(F kernel, dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
    emu_smem.assign(smem_bytes, 0xff);
    gridDim = grid;
    blockDim = block;
    int nthreads = block.x * block.y * block.z;
    int nwarps = (nthreads + 31) / 32;
    std::vector<EmuFiber> fibers(nthreads);
    for (auto& f : fibers) f.stack.resize(256 * 1024);
    emu_warps.assign(nwarps, EmuWarp{});
    emu_body = [&] { kernel(args...); };
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = dim3{bx, by, bz};
                std::fill(emu_smem.begin(), emu_smem.end(), (unsigned char)0xff);
                for (int i = 0; i < nthreads; ++i) {
                    EmuFiber& f = fibers[i];
                    f.tid = i;
                    f.idx = dim3{(unsigned)(i % block.x), (unsigned)((i / block.x) % block.y), (unsigned)(i / (block.x * block.y))};
                    f.done = false;
                    f.wait = EMU_RUN;
                    f.cp_groups.clear();
                    f.cp_open.clear();
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.data();
                    f.ctx.uc_stack.ss_size = f.stack.size();
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, emu_fiber_entry, 0);
                }
                for (;;) {
                    for (auto& f : fibers) {
                        if (f.done || f.wait != EMU_RUN) continue;
                        emu_cur = &f;
                        threadIdx = f.idx;
                        swapcontext(&emu_sched, &f.ctx);
                    }
                    bool any_live = false, released = false, all_block = true;
                    for (int w = 0; w < nwarps; ++w) {
                        bool live = false, all_warp = true;
                        for (int i = w * 32; i < std::min(nthreads, w * 32 + 32); ++i) {
                            if (fibers[i].done) continue;
                            live = true;
                            if (fibers[i].wait != EMU_WARP) all_warp = false;
                            if (fibers[i].wait != EMU_BLOCK) all_block = false;
                        }
                        any_live |= live;
                        if (live && all_warp) {
                            for (int i = w * 32; i < std::min(nthreads, w * 32 + 32); ++i)
                                if (!fibers[i].done) fibers[i].wait = EMU_RUN;
                            released = true;
                        }
                    }
                    if (!any_live) break;
                    if (released) continue;
                    if (all_block) {
                        for (auto& f : fibers)
                            if (!f.done) f.wait = EMU_RUN;
                        continue;
                    }
                    std::fprintf(stderr, "cuda_emu: deadlock (threads wait on different barriers) in block (%u,%u,%u)\n", bx, by, bz);
                    std::abort();
                }
            }
}

template <class F, class... Args>
void emu_launch(F kernel, dim3 grid, dim3 block, Args... args) {
    emu_launch_smem(kernel, grid, block, 0, args...);
}
