// RMSNorm: out[r, c] = (x[r, c] * rsqrt(mean_c(x[r, :]^2) + eps)) * w[c], f32.
//
// Launch: one block per row (grid = rows), any multiple of 32 threads up to 1024 (the launcher: a
// float4 per thread for a few rows; from 64 rows, RMSNORM_VECS float4s per thread, so that several
// blocks share an SM's registers; at most 1024). The sum of squares goes in norm.cuh's order, which does not
// depend on the block's size: every kernel that normalises a row, at any launch shape, gets the
// same bits. Then each thread scales its float4s: when x, w and out are 16-byte aligned and the
// row is whole float4s, those it kept in registers from the sum (rows up to RMSNORM_VECS float4s
// per thread are read once) with 16-byte accesses; else element by element. x and out may alias
// (in place): every element is read and written by the same thread after the sum. CPU reference:
// strata_tensor::cpu::reference::rms_norm. Launcher: strata_kernels::cuda::ops::rms_norm.
//
// rmsnorm_f32_actq also quantizes each output row to two digits for the integer matvec kernels
// (actq.cuh's record per row; cols a multiple of 32): after a barrier, each warp re-reads blocks
// of 32 outputs the block wrote and quantizes them with the matvec's own quantize_block, so the
// records are bit for bit what matvec_quantize_x makes of the outputs. Launcher:
// strata_kernels::cuda::ops::rms_norm_actq.
#include "strata_common.cuh"
#include "actq.cuh"
#include "norm.cuh"
#include "rmsnorm.h"

// float4s per thread kept in registers between the sum of squares and the scaling: 8 x 4 x 1024
// threads covers rows of 32768 floats.
#define RMSNORM_VECS 8

// (x * inv) * g of a float4.
__device__ __forceinline__ float4 rmsnorm_scale4(float4 v, float inv, float4 g) {
    return make_float4(__fmul_rn(__fmul_rn(v.x, inv), g.x), __fmul_rn(__fmul_rn(v.y, inv), g.y),
                       __fmul_rn(__fmul_rn(v.z, inv), g.z), __fmul_rn(__fmul_rn(v.w, inv), g.w));
}

// Row blockIdx.x (< p.rows) of out.
__device__ __forceinline__ void rmsnorm_row(const RmsNormParams& p, const float* x, const float* w, float* out) {
    STRATA_SHARED float runs[NORM_RUNS + 1];
    const long long row = blockIdx.x;
    const float* xr = x + row * p.cols;
    float* orow = out + row * p.cols;
    float4 v[RMSNORM_VECS];
    const float inv = norm_scale(norm_sumsq_kept<RMSNORM_VECS>(xr, p.cols, runs, v), p.cols, p.eps);
    const unsigned long long addresses =
        (unsigned long long)xr | (unsigned long long)w | (unsigned long long)orow;
    const unsigned int n4 = p.cols / 4, warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    // The same for every thread of the block. Rows of whole float4s, all aligned: each thread
    // scales the float4s it kept (norm_sumsq_kept's mapping), so the row is read once when it
    // fits in them; any float4 past them is read again.
    if (p.cols % 4 == 0 && addresses % 16 == 0) {
        const float4* x4 = reinterpret_cast<const float4*>(xr);
        const float4* w4 = reinterpret_cast<const float4*>(w);
        float4* o4 = reinterpret_cast<float4*>(orow);
#pragma unroll
        for (int i = 0; i < RMSNORM_VECS; ++i) {
            const unsigned int j = 32 * (warp + i * warps) + lane;
            if (j < n4) o4[j] = rmsnorm_scale4(v[i], inv, w4[j]);
        }
        for (unsigned int j = 32 * RMSNORM_VECS * warps + threadIdx.x; j < n4; j += blockDim.x)
            o4[j] = rmsnorm_scale4(x4[j], inv, w4[j]);
        return;
    }
    for (unsigned int c = threadIdx.x; c < p.cols; c += blockDim.x) orow[c] = __fmul_rn(__fmul_rn(xr[c], inv), w[c]);
}

extern "C" __global__ void __launch_bounds__(1024) rmsnorm_f32(RmsNormParams p, const float* x, const float* w,
                                                                float* out) {
    if (blockIdx.x >= p.rows) return;
    rmsnorm_row(p, x, w, out);
}

extern "C" __global__ void __launch_bounds__(1024)
    rmsnorm_f32_actq(RmsNormParams p, const float* x, const float* w, float* out, unsigned char* xq) {
    if (blockIdx.x >= p.rows) return;
    rmsnorm_row(p, x, w, out);
    __syncthreads();  // every thread's outputs of the row, visible to the whole block
    const float* orow = out + (size_t)blockIdx.x * p.cols;
    const ActqRecord r = actq_record(xq, p.cols, blockIdx.x);
    const int lane = threadIdx.x % 32;
    for (unsigned int b = threadIdx.x / 32; b < p.cols / 32; b += blockDim.x / 32)
        quantize_block(orow[32 * b + lane], lane, r.hi, r.lo, (int)(32 * b + lane), r.d + b, r.s + b, r.s8 + 4 * b);
}
