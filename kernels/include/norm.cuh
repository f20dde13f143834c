// The sum of squares of an RMSNorm row, in one order whatever the block's size: RMSNorm
// (rmsnorm.cu) and the products that normalise their activations themselves share it, so a row
// normalises to the same bits in every kernel and at every launch shape.
//
// The order: the row as float4s (the last one padded with zeros), each one's squares added as
// ((x0^2 + x1^2) + x2^2) + x3^2; runs of 32 float4s (128 columns) reduced by the xor butterfly
// (offsets 16, 8, 4, 2, 1; every lane ends with the same sum, float addition being
// commutative); the runs' sums, in sets of 32 (zero-padded), by the same butterfly; the sets'
// sums added in order from zero. Every operation is written rounded (__fmul_rn, __fadd_rn), so
// no compiler contracts it into an FMA. Zeros added are exact, so the padding changes nothing.
#pragma once
#include "strata_common.cuh"
#include "rmsnorm.h"

// Runs of 128 columns a row may have (STRATA_NORM_MAX_COLS), one float each in shared memory.
#define NORM_RUNS (STRATA_NORM_MAX_COLS / 128)

// The butterfly of the order above over the 32 lanes of a warp.
__device__ __forceinline__ float norm_butterfly(float v) {
#pragma unroll
    for (int o = STRATA_WARP / 2; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ((a^2 + b^2) + c^2) + d^2, rounded at every step.
__device__ __forceinline__ float norm_sq4(float a, float b, float c, float d) {
    return __fadd_rn(__fadd_rn(__fadd_rn(__fmul_rn(a, a), __fmul_rn(b, b)), __fmul_rn(c, c)), __fmul_rn(d, d));
}

// Float4 j of row x (cols floats): a 16-byte load when the row is 16-byte aligned and whole
// float4s, else element by element with zeros past the end.
__device__ __forceinline__ float4 norm_load4(const float* __restrict__ x, unsigned int cols, unsigned int j,
                                             bool vector) {
    if (vector) return reinterpret_cast<const float4*>(x)[j];
    const unsigned int c = 4 * j;
    return make_float4(x[c], c + 1 < cols ? x[c + 1] : 0.0f, c + 2 < cols ? x[c + 2] : 0.0f,
                       c + 3 < cols ? x[c + 3] : 0.0f);
}

// The sum of squares of row x (cols <= STRATA_NORM_MAX_COLS floats) in the order above, to every
// thread of the block; called by all of them (any multiple of 32 threads), with `runs`
// NORM_RUNS + 1 floats of shared memory. Warp w takes runs w, w + warps, ..; the first VECS of
// its runs' float4s stay in `kept` (kept[i]: float4 32 (w + i warps) + lane, when below the
// row's), so a caller can scale them without reading the row again. Ends with a barrier, after
// which `runs` may be reused.
template <int VECS>
__device__ __forceinline__ float norm_sumsq_kept(const float* __restrict__ x, unsigned int cols, float* runs,
                                                 float4* kept) {
    const unsigned int lane = threadIdx.x % STRATA_WARP, warp = threadIdx.x / STRATA_WARP;
    const unsigned int warps = blockDim.x / STRATA_WARP;
    const unsigned int n4 = (cols + 3) / 4, nruns = (n4 + 31) / 32;
    const bool vector = cols % 4 == 0 && reinterpret_cast<unsigned long long>(x) % 16 == 0;
    // Run r's sum, to lane 0's slot; the float4 read, to `q`.
    auto run = [&](unsigned int r, float4& q) {
        const unsigned int j = 32 * r + lane;
        float s = 0.0f;
        if (j < n4) {
            q = norm_load4(x, cols, j, vector);
            s = norm_sq4(q.x, q.y, q.z, q.w);
        }
        s = norm_butterfly(s);
        if (lane == 0) runs[r] = s;
    };
#pragma unroll
    for (int i = 0; i < VECS; ++i) {
        const unsigned int r = warp + i * warps;
        if (r < nruns) run(r, kept[i]);
    }
    for (unsigned int r = warp + VECS * warps; r < nruns; r += warps) {
        float4 q;
        run(r, q);
    }
    __syncthreads();
    if (warp == 0) {
        float total = 0.0f;
        for (unsigned int set = 0; set < nruns; set += 32) {
            const float s = set + lane < nruns ? runs[set + lane] : 0.0f;
            total = __fadd_rn(total, norm_butterfly(s));
        }
        if (lane == 0) runs[NORM_RUNS] = total;
    }
    __syncthreads();
    const float total = runs[NORM_RUNS];
    __syncthreads();
    return total;
}

// norm_sumsq_kept keeping nothing.
__device__ __forceinline__ float norm_sumsq(const float* __restrict__ x, unsigned int cols, float* runs) {
    return norm_sumsq_kept<0>(x, cols, runs, nullptr);
}

// The scale of a row whose sum of squares is `sumsq`: rsqrt(mean square + eps), as RMSNorm
// computes it; an output is then (x * scale) * w.
__device__ __forceinline__ float norm_scale(float sumsq, unsigned int cols, float eps) {
    return rsqrtf(__fadd_rn(__fdiv_rn(sumsq, (float)cols), eps));
}
