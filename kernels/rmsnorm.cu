// RMSNorm: out[r, c] = x[r, c] * rsqrt(mean_c(x[r, :]^2) + eps) * w[c], f32.
//
// Launch: one block per row (grid = rows), 256 threads (any multiple of 32 up to 1024). Each
// thread strides over the row; the sum of squares is a block reduction. x and out may alias
// (in-place). CPU reference: strata_tensor::cpu::reference::rms_norm. Launcher:
// strata_kernels::cuda::ops::rms_norm.
#include "strata_common.cuh"
#include "rmsnorm.h"

extern "C" __global__ void rmsnorm_f32(RmsNormParams p, const float* x, const float* w, float* out) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    if (row >= p.rows) return;
    const float* xr = x + row * p.cols;
    float* orow = out + row * p.cols;
    float ss = 0.0f;
    for (unsigned int c = threadIdx.x; c < p.cols; c += blockDim.x) ss += xr[c] * xr[c];
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)p.cols + p.eps);
    for (unsigned int c = threadIdx.x; c < p.cols; c += blockDim.x) orow[c] = xr[c] * inv * w[c];
}
