// Device helpers shared by the kernel files: warp and block reductions, and loads that turn
// f16/bf16 into f32. Included by kernels/*.cu only (bindgen reads the *.h headers).
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define STRATA_WARP 32

// Shared memory, named through macros so that the CPU emulation (kernels/emu/cuda_emu.h, which
// defines them first) can give a block's threads one copy: STRATA_SHARED before a static
// __shared__ array, STRATA_DYNAMIC_SMEM(T, name) for the launch's dynamic shared memory as T[].
#ifndef STRATA_SHARED
#define STRATA_SHARED __shared__
#define STRATA_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = STRATA_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = STRATA_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % STRATA_WARP, warp = threadIdx.x / STRATA_WARP;
    const int warps = (blockDim.x + STRATA_WARP - 1) / STRATA_WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Max over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % STRATA_WARP, warp = threadIdx.x / STRATA_WARP;
    const int warps = (blockDim.x + STRATA_WARP - 1) / STRATA_WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// SwiGLU's product silu(g) * u = g / (1 + exp(-g)) * u, as strata_tensor::cpu::reference::swiglu
// computes it: the accurate expf, IEEE division, nothing fused (the reference's last-bit expf
// error apart, the same f32). The SwiGLU kernels and the matvec's fused SwiGLU share it.
__device__ __forceinline__ float silu_mul(float g, float u) {
    return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

__device__ __forceinline__ float load_f32(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_f32(const __half* p, long long i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p, long long i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store_f32(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f32(__half* p, long long i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void store_f32(__nv_bfloat16* p, long long i, float v) { p[i] = __float2bfloat16_rn(v); }
