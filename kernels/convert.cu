// Dequantization to f32: out[i, :] = decode(row src(i) of w), src(i) = i (dequantize) or ids[i]
// (embedding gather), for every weight dtype, bit-identical to the CPU.
//
// Launch: 1-D grid-stride over groups of V output elements (V = 4 when the row length is a
// multiple of 4, which every block-quantized row is; V = 1 otherwise, float dtypes only), 256
// threads a block. Consecutive threads write consecutive 16-byte groups, so the stores coalesce
// (as float4 where the output is 16-byte aligned, as four floats where a view of it is not);
// the weight bytes are read with loads no wider than their alignment (quant.cuh). An id outside
// the table writes a row of NaNs and reads nothing: the host validates ids before upload, this
// only keeps a bad id from reading out of bounds and makes it loud downstream.
//
// CPU reference: strata_tensor::quant::dequantize_row (Tensor::to_f32_vec) and
// strata_tensor::cpu::reference::embedding. Launchers: strata_kernels::cuda::ops::{dequantize,
// embedding}.
#include "quant.cuh"
#include "convert.h"

template <int DT, int V>
__device__ __forceinline__ void decode(const unsigned char* row, unsigned int e, float* out) {
    if constexpr (DT == STRATA_DTYPE_F32) decode_f32<V>(row, e, out);
    else if constexpr (DT == STRATA_DTYPE_F16) decode_f16<V>(row, e, out);
    else if constexpr (DT == STRATA_DTYPE_BF16) decode_bf16<V>(row, e, out);
    else if constexpr (DT == STRATA_DTYPE_Q8_0) decode_q8_0(row, e, out);
    else if constexpr (DT == STRATA_DTYPE_Q4_0) decode_q4_0(row, e, out);
    else if constexpr (DT == STRATA_DTYPE_Q4_1) decode_q4_1(row, e, out);
    else if constexpr (DT == STRATA_DTYPE_Q4_K) decode_q4_k(row, e, out);
    else decode_q6_k(row, e, out);
}

template <int DT, int V>
__device__ __forceinline__ void convert_rows(const ConvertParams& p, const unsigned char* w, const unsigned int* ids,
                                             float* out) {
    const unsigned long long per_row = p.cols / V;
    const unsigned long long total = p.rows * per_row;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long g = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; g < total; g += stride) {
        const unsigned long long r = g / per_row;
        const unsigned int e = (unsigned int)(g - r * per_row) * V;
        const unsigned long long src = p.gather ? (unsigned long long)ids[r] : r;
        float v[V];
        if (src < p.vocab) {
            decode<DT, V>(w + src * p.row_bytes, e, v);
        } else {
#pragma unroll
            for (int i = 0; i < V; ++i) v[i] = __int_as_float(0x7fc00000);
        }
        float* o = out + r * p.cols + e;
        bool stored = false;
        if constexpr (V == 4) {
            if ((reinterpret_cast<size_t>(o) & 15) == 0) {
                *reinterpret_cast<float4*>(o) = make_float4(v[0], v[1], v[2], v[3]);
                stored = true;
            }
        }
        if (!stored) {
#pragma unroll
            for (int i = 0; i < V; ++i) o[i] = v[i];
        }
    }
}

#define CONVERT(name, DT)                                                                                          \
    extern "C" __global__ void convert_##name(ConvertParams p, const unsigned char* w, const unsigned int* ids,   \
                                              float* out) {                                                      \
        convert_rows<DT, 4>(p, w, ids, out);                                                                     \
    }

CONVERT(f32, STRATA_DTYPE_F32)
CONVERT(f16, STRATA_DTYPE_F16)
CONVERT(bf16, STRATA_DTYPE_BF16)
CONVERT(q8_0, STRATA_DTYPE_Q8_0)
CONVERT(q4_0, STRATA_DTYPE_Q4_0)
CONVERT(q4_1, STRATA_DTYPE_Q4_1)
CONVERT(q4_k, STRATA_DTYPE_Q4_K)
CONVERT(q6_k, STRATA_DTYPE_Q6_K)

// Float rows whose length is not a multiple of 4: one element per thread.
#define CONVERT_SCALAR(name, DT)                                                                                   \
    extern "C" __global__ void convert_##name##_scalar(ConvertParams p, const unsigned char* w,                  \
                                                       const unsigned int* ids, float* out) {                    \
        convert_rows<DT, 1>(p, w, ids, out);                                                                     \
    }

CONVERT_SCALAR(f32, STRATA_DTYPE_F32)
CONVERT_SCALAR(f16, STRATA_DTYPE_F16)
CONVERT_SCALAR(bf16, STRATA_DTYPE_BF16)
