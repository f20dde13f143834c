// Row-wise softmax (in place) and argmax, f32.
//
// softmax: x[r, :] = exp(x[r, :] - max) * (1 / sum(exp(x[r, :] - max))). One read pass keeps an
// online (running maximum, rescaled running sum) pair per thread, merged across the warp and
// the block; a second pass writes exp(x - max) times the reciprocal of the sum. The results
// follow strata_tensor::cpu::reference::softmax, special values included: the maximum ignores
// NaN, a row containing NaN or +inf becomes all NaN (the reference's sum is NaN there), a row of
// only -inf becomes all NaN, and -inf in an otherwise finite row gives 0. Only the order of the
// sum differs from the reference (a few ulp).
//
// argmax: out[r] = the index of the first maximum of x[r, :]; NaN counts as larger than every
// number, so the first NaN wins (strata_tensor::cpu::reference::argmax, torch.argmax). Each
// thread scans its elements in increasing index order, then (value, index) pairs are reduced
// over the warp and the block with a total order: NaN first, then larger value, then lower index.
//
// Launch, both: *_block kernels take a block per row (grid = rows; block a multiple of 32, up
// to 1024); *_warp kernels take a warp per row (grid = ceil(rows / (block / 32))), for short
// rows. Rows whose start is 16-byte aligned (x aligned and row_len % 4 == 0) are read as float4.
// Launchers: strata_kernels::cuda::ops::{softmax, argmax}.
#include <math_constants.h>

#include "strata_common.cuh"
#include "softmax.h"

// The row this thread works on, its rank within the row's threads and their number.
struct RowSlot {
    unsigned long long row;
    unsigned int tid, threads;
};

template <bool PER_WARP>
__device__ __forceinline__ RowSlot row_slot() {
    if (PER_WARP) {
        const unsigned long long row = (unsigned long long)blockIdx.x * (blockDim.x / STRATA_WARP) + threadIdx.x / STRATA_WARP;
        return {row, threadIdx.x % STRATA_WARP, STRATA_WARP};
    }
    return {blockIdx.x, threadIdx.x, blockDim.x};
}

__device__ __forceinline__ bool row_is_vec4(const float* x, unsigned int row_len) {
    return ((unsigned long long)x & 15) == 0 && row_len % 4 == 0;
}

// ---- softmax ----

// Adds v to the running (maximum m, sum s of exp(x - m)). m never becomes NaN; a NaN or +inf
// element makes s NaN, as it makes the reference's sum NaN.
__device__ __forceinline__ void online_add(float& m, float& s, float v) {
    if (v > m) {
        s = v == CUDART_INF_F ? CUDART_NAN_F : __fadd_rn(__fmul_rn(s, expf(m - v)), 1.0f);
        m = v;
    } else if (v != -CUDART_INF_F) {  // -inf adds exp(-inf) = 0 (and would give NaN against m = -inf)
        s += expf(v - m);
    }
}

// Merges the running pair (m2, s2) into (m, s). A side whose maximum is the merged one needs no
// rescaling (which also keeps two -inf maxima from making NaN).
__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    s = (m == mm ? s : __fmul_rn(s, expf(m - mm))) + (m2 == mm ? s2 : __fmul_rn(s2, expf(m2 - mm)));
    m = mm;
}

__device__ __forceinline__ void online_warp(float& m, float& s) {
#pragma unroll
    for (int o = STRATA_WARP / 2; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        online_merge(m, s, m2, s2);
    }
}

template <bool PER_WARP>
__device__ __forceinline__ void softmax_rows(const SoftmaxParams& p, float* x) {
    STRATA_SHARED float scratch_m[STRATA_WARP], scratch_s[STRATA_WARP];
    const RowSlot slot = row_slot<PER_WARP>();
    if (slot.row >= p.rows) return;  // whole warps only (PER_WARP), or never (a block per row)
    float* xr = x + slot.row * p.row_len;
    const bool vec = row_is_vec4(x, p.row_len);
    float m = -CUDART_INF_F, s = 0.0f;
    if (vec) {
        const float4* x4 = reinterpret_cast<const float4*>(xr);
        for (unsigned int i = slot.tid; i < p.row_len / 4; i += slot.threads) {
            const float4 v = x4[i];
            online_add(m, s, v.x);
            online_add(m, s, v.y);
            online_add(m, s, v.z);
            online_add(m, s, v.w);
        }
    } else {
        for (unsigned int i = slot.tid; i < p.row_len; i += slot.threads) online_add(m, s, xr[i]);
    }
    online_warp(m, s);
    if (!PER_WARP) {
        const unsigned int lane = threadIdx.x % STRATA_WARP, warp = threadIdx.x / STRATA_WARP;
        const unsigned int warps = blockDim.x / STRATA_WARP;
        if (lane == 0) {
            scratch_m[warp] = m;
            scratch_s[warp] = s;
        }
        __syncthreads();
        m = lane < warps ? scratch_m[lane] : -CUDART_INF_F;
        s = lane < warps ? scratch_s[lane] : 0.0f;
        online_warp(m, s);
    }
    const float inv = __fdiv_rn(1.0f, s);
    if (vec) {
        float4* x4 = reinterpret_cast<float4*>(xr);
        for (unsigned int i = slot.tid; i < p.row_len / 4; i += slot.threads) {
            float4 v = x4[i];
            v.x = __fmul_rn(expf(v.x - m), inv);
            v.y = __fmul_rn(expf(v.y - m), inv);
            v.z = __fmul_rn(expf(v.z - m), inv);
            v.w = __fmul_rn(expf(v.w - m), inv);
            x4[i] = v;
        }
    } else {
        for (unsigned int i = slot.tid; i < p.row_len; i += slot.threads) xr[i] = __fmul_rn(expf(xr[i] - m), inv);
    }
}

extern "C" __global__ void softmax_block_f32(SoftmaxParams p, float* x) { softmax_rows<false>(p, x); }

extern "C" __global__ void softmax_warp_f32(SoftmaxParams p, float* x) { softmax_rows<true>(p, x); }

// ---- argmax ----

// Whether (v, i) comes before (w, j): NaN first (the lower index among NaNs), then the larger
// value, then the lower index.
__device__ __forceinline__ bool beats(float v, unsigned int i, float w, unsigned int j) {
    const bool vn = v != v, wn = w != w;
    if (vn || wn) return vn && (!wn || i < j);
    return v > w || (v == w && i < j);
}

__device__ __forceinline__ void argmax_add(float& best, unsigned int& at, float v, unsigned int i) {
    if (beats(v, i, best, at)) {
        best = v;
        at = i;
    }
}

__device__ __forceinline__ void argmax_warp(float& best, unsigned int& at) {
#pragma unroll
    for (int o = STRATA_WARP / 2; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, best, o);
        const unsigned int i = __shfl_xor_sync(0xffffffffu, at, o);
        argmax_add(best, at, v, i);
    }
}

template <bool PER_WARP>
__device__ __forceinline__ void argmax_rows(const SoftmaxParams& p, const float* x, unsigned int* out) {
    STRATA_SHARED float scratch_v[STRATA_WARP];
    STRATA_SHARED unsigned int scratch_i[STRATA_WARP];
    const RowSlot slot = row_slot<PER_WARP>();
    if (slot.row >= p.rows) return;
    const float* xr = x + slot.row * p.row_len;
    // (-inf, UINT_MAX) loses to every element: -inf elements win it by their lower index.
    float best = -CUDART_INF_F;
    unsigned int at = 0xffffffffu;
    if (row_is_vec4(x, p.row_len)) {
        const float4* x4 = reinterpret_cast<const float4*>(xr);
        for (unsigned int i = slot.tid; i < p.row_len / 4; i += slot.threads) {
            const float4 v = x4[i];
            argmax_add(best, at, v.x, 4 * i);
            argmax_add(best, at, v.y, 4 * i + 1);
            argmax_add(best, at, v.z, 4 * i + 2);
            argmax_add(best, at, v.w, 4 * i + 3);
        }
    } else {
        for (unsigned int i = slot.tid; i < p.row_len; i += slot.threads) argmax_add(best, at, xr[i], i);
    }
    argmax_warp(best, at);
    if (!PER_WARP) {
        const unsigned int lane = threadIdx.x % STRATA_WARP, warp = threadIdx.x / STRATA_WARP;
        const unsigned int warps = blockDim.x / STRATA_WARP;
        if (lane == 0) {
            scratch_v[warp] = best;
            scratch_i[warp] = at;
        }
        __syncthreads();
        best = lane < warps ? scratch_v[lane] : -CUDART_INF_F;
        at = lane < warps ? scratch_i[lane] : 0xffffffffu;
        argmax_warp(best, at);
    }
    if (slot.tid == 0) out[slot.row] = at;
}

extern "C" __global__ void argmax_block_f32(SoftmaxParams p, const float* x, unsigned int* out) {
    argmax_rows<false>(p, x, out);
}

extern "C" __global__ void argmax_warp_f32(SoftmaxParams p, const float* x, unsigned int* out) {
    argmax_rows<true>(p, x, out);
}
