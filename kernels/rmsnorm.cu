// RMSNorm: out[r, c] = x[r, c] * rsqrt(mean_c(x[r, :]^2) + eps) * w[c], f32.
//
// Launch: one block per row (grid = rows), any multiple of 32 threads up to 1024 (the launcher: a
// float4 per thread, at most 1024; the sum of squares is reduced in an order that depends on the
// count, so both kernels get the same one and normalise a row to the same bits). When the
// row is a whole number of 16-byte float4 (cols % 4 == 0, x, w and out 16-byte aligned) and fits
// in RMSNORM_VECS float4 per thread, each thread loads its float4 once, keeps them in registers
// for the scaling pass, and the row is read from memory once; otherwise each thread strides over
// the row one float at a time and reads it twice. The sum of squares is a block reduction either
// way. x and out may alias (in-place): every element is read and written by the same thread. CPU
// reference: strata_tensor::cpu::reference::rms_norm. Launcher: strata_kernels::cuda::ops::rms_norm.
//
// rmsnorm_f32_actq also quantizes each output row to two digits for the integer matvec kernels
// (actq.cuh's record per row; cols a multiple of 32): after a barrier, each warp re-reads blocks
// of 32 outputs the block wrote and quantizes them with the matvec's own quantize_block, so the
// records are bit for bit what matvec_quantize_x makes of the outputs. Launcher:
// strata_kernels::cuda::ops::rms_norm_actq.
#include "strata_common.cuh"
#include "actq.cuh"
#include "rmsnorm.h"

// float4 per thread the register path holds: 8 x 4 x 256 threads covers rows of 8192 floats.
#define RMSNORM_VECS 8

// Row blockIdx.x (< p.rows) of out.
__device__ __forceinline__ void rmsnorm_row(const RmsNormParams& p, const float* x, const float* w, float* out) {
    STRATA_SHARED float scratch[32];
    const long long row = blockIdx.x;
    const float* xr = x + row * p.cols;
    float* orow = out + row * p.cols;
    const unsigned long long addresses =
        (unsigned long long)xr | (unsigned long long)w | (unsigned long long)orow;
    const unsigned int n4 = p.cols / 4;
    // The same for every thread of the block, so both paths reach block_sum together.
    if (p.cols % 4 == 0 && addresses % 16 == 0 && n4 <= RMSNORM_VECS * blockDim.x) {
        const float4* x4 = reinterpret_cast<const float4*>(xr);
        const float4* w4 = reinterpret_cast<const float4*>(w);
        float4* o4 = reinterpret_cast<float4*>(orow);
        float4 v[RMSNORM_VECS];
        float ss = 0.0f;
#pragma unroll
        for (int i = 0; i < RMSNORM_VECS; ++i) {
            const unsigned int c = threadIdx.x + i * blockDim.x;
            if (c < n4) {
                v[i] = x4[c];
                ss += v[i].x * v[i].x + v[i].y * v[i].y + v[i].z * v[i].z + v[i].w * v[i].w;
            }
        }
        ss = block_sum(ss, scratch);
        const float inv = rsqrtf(ss / (float)p.cols + p.eps);
#pragma unroll
        for (int i = 0; i < RMSNORM_VECS; ++i) {
            const unsigned int c = threadIdx.x + i * blockDim.x;
            if (c < n4) {
                const float4 g = w4[c];
                o4[c] = make_float4(v[i].x * inv * g.x, v[i].y * inv * g.y, v[i].z * inv * g.z, v[i].w * inv * g.w);
            }
        }
        return;
    }
    float ss = 0.0f;
    for (unsigned int c = threadIdx.x; c < p.cols; c += blockDim.x) ss += xr[c] * xr[c];
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)p.cols + p.eps);
    for (unsigned int c = threadIdx.x; c < p.cols; c += blockDim.x) orow[c] = xr[c] * inv * w[c];
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
