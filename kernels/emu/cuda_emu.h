// A CPU emulation of the CUDA device environment that kernels/matvec.cu uses, so that its
// kernels can run unchanged on machines without a GPU (strata-kernels' tests/emu.rs). Each thread
// of a block is a host thread; __syncthreads and the warp collectives are barriers; shared memory
// is one host array, blocks run one after the other. The cp.async copies happen at once
// (kernels/emu/ptx.cuh), so the emulation checks the kernels' arithmetic, indexing and bounds,
// not the timing of their asynchronous copies.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __noinline__
#define __shared__
#define __launch_bounds__(...)

using std::max;
using std::min;

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct dim3 { unsigned int x = 1, y = 1, z = 1; };

// The running thread's place, and its block's and warp's meeting points.
struct EmuWarp {
    std::barrier<> bar{32};
    unsigned int slot[32];
};
struct EmuThread {
    dim3 thread, block;
    EmuWarp* warp;
    std::barrier<>* block_bar;
    unsigned int dynamic_smem;
};
inline thread_local EmuThread emu;
inline dim3 gridDim, blockDim;
#define threadIdx (emu.thread)
#define blockIdx (emu.block)

// The dynamic shared memory of the running block (blocks run one at a time), and the kernels'
// shared arrays: a static local is one copy for all the threads of the running block.
alignas(16) inline float4 emu_smem[227 * 1024 / 16];
#define STRATA_SHARED static
#define STRATA_DYNAMIC_SMEM(T, name) T* const name = reinterpret_cast<T*>(emu_smem)

inline void __syncthreads() { emu.block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned int = 0xffffffffu) { emu.warp->bar.arrive_and_wait(); }
[[noreturn]] inline void __trap() { std::abort(); }

// Every lane's value of the warp, in slot order, to `f`; every lane gets the result.
template <class F>
inline unsigned int emu_warp_collective(unsigned int v, F f) {
    EmuWarp& w = *emu.warp;
    w.slot[emu.thread.x % 32] = v;
    w.bar.arrive_and_wait();
    const unsigned int r = f(w.slot);
    w.bar.arrive_and_wait();
    return r;
}

inline unsigned int __reduce_max_sync(unsigned int, unsigned int v) {
    return emu_warp_collective(v, [](const unsigned int* s) { return *std::max_element(s, s + 32); });
}
inline int __reduce_add_sync(unsigned int, int v) {
    return (int)emu_warp_collective((unsigned int)v, [](const unsigned int* s) {
        unsigned int t = 0;
        for (int i = 0; i < 32; ++i) t += s[i];
        return t;
    });
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i) { return __uint_as_float((unsigned int)i); }
inline int __float_as_int(float f) { return (int)__float_as_uint(f); }
inline int __any_sync(unsigned int, int p) {
    return (int)emu_warp_collective((unsigned int)(p != 0), [](const unsigned int* s) {
        return (unsigned int)std::any_of(s, s + 32, [](unsigned int v) { return v != 0; });
    });
}
inline unsigned int __shfl_xor_sync(unsigned int, unsigned int v, int o) {
    const unsigned int lane = emu.thread.x % 32;
    return emu_warp_collective(v, [&](const unsigned int* s) { return s[lane ^ o]; });
}
inline int __shfl_xor_sync(unsigned int mask, int v, int o) {
    return (int)__shfl_xor_sync(mask, (unsigned int)v, o);
}
inline float __shfl_xor_sync(unsigned int, float v, int o) {
    const unsigned int lane = emu.thread.x % 32;
    return __uint_as_float(emu_warp_collective(__float_as_uint(v), [&](const unsigned int* s) { return s[lane ^ o]; }));
}

// Loads and float arithmetic: the host's IEEE operations, rounded to nearest even.
template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline T __ldcs(const T* p) { return *p; }
template <class T>
inline T __ldcg(const T* p) { return *p; }

// Atomics and fences: the host's, sequentially consistent (blocks run one after the other, so a
// kernel's last-block-merges pattern sees every earlier block's writes).
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline int __float2int_rn(float v) { return (int)std::nearbyint(v); }
inline float __uint2float_rn(unsigned int v) { return (float)v; }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }

// Integer intrinsics, as PTX defines them.
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
    const uint64_t v = ((uint64_t)y << 32) | x;
    unsigned int r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned int)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}
inline unsigned int __funnelshift_rc(unsigned int lo, unsigned int hi, unsigned int shift) {
    shift = std::min(shift, 32u);
    return (unsigned int)((((uint64_t)hi << 32) | lo) >> shift);
}
inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; ++i) c += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
    return c;
}

// f16 and bf16, converted as the device converts them.
struct __half { unsigned short bits; };
struct __half2 { __half x, y; };
struct __nv_bfloat16 { unsigned short bits; };
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline float __half2float(__half h) {
    const unsigned int sign = (h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1f, m = h.bits & 0x3ffu;
    if (e == 0x1f) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    if (e == 0) return (sign ? -1.0f : 1.0f) * std::ldexp((float)m, -24);
    return __uint_as_float(sign | ((e + 112) << 23) | (m << 13));
}
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((unsigned int)b.bits << 16); }
// Round to nearest even, as the device converts.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(unsigned short)((u >> 16) | 0x40)};  // quiet NaN
    return __nv_bfloat16{(unsigned short)((u + 0x7fffu + ((u >> 16) & 1)) >> 16)};
}
inline __half __float2half_rn(float f) {
    const unsigned int u = __float_as_uint(f), sign = (u >> 16) & 0x8000u;
    const unsigned int a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return __half{(unsigned short)(sign | 0x7e00u)};
    if (a >= 0x477ff000u) return __half{(unsigned short)(sign | 0x7c00u)};  // rounds to infinity
    if (a < 0x38800000u) {  // below 2^-14: subnormal (or zero): round a * 2^24 to an integer
        const float m = __uint_as_float(a) * 16777216.0f;
        return __half{(unsigned short)(sign | (unsigned int)std::nearbyint(m))};
    }
    const unsigned int r = a + 0xfffu + ((a >> 13) & 1);  // round the 13 dropped bits to even
    return __half{(unsigned short)(sign | ((r - 0x38000000u) >> 13))};
}
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }

// Runs `kernel` (a call of one kernel, made by every thread) on a grid of `grid` blocks of
// `threads` threads (a multiple of 32) with `smem_bytes` of dynamic shared memory, the blocks one
// after the other, each block's threads at once; shared memory is filled with 0xA5 before each
// block, so that a read of what no thread wrote shows.
template <class K>
void emu_launch(dim3 grid, unsigned int threads, unsigned int smem_bytes, const K& kernel) {
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    for (unsigned int z = 0; z < grid.z; ++z)
        for (unsigned int y = 0; y < grid.y; ++y)
            for (unsigned int x = 0; x < grid.x; ++x) {
                std::memset(emu_smem, 0xA5, smem_bytes);
                std::barrier<> block_bar(threads);
                std::vector<EmuWarp> warps(threads / 32);
                std::vector<std::thread> pool;
                pool.reserve(threads);
                for (unsigned int t = 0; t < threads; ++t) {
                    pool.emplace_back([&, t] {
                        emu = EmuThread{dim3{t, 1, 1}, dim3{x, y, z}, &warps[t / 32], &block_bar, smem_bytes};
                        kernel();
                        // A thread that returns early leaves the barriers it would have met.
                        emu.warp->bar.arrive_and_drop();
                        block_bar.arrive_and_drop();
                    });
                }
                for (auto& th : pool) th.join();
            }
}
