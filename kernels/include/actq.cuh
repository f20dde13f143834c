// Two-digit activations in global memory: the layout of the quantized activations that
// kernels/matvec.cu's matvec_quantize_x and kernels/rmsnorm.cu write and the integer matvec
// kernels read (MatvecParams::acts == STRATA_MATVEC_ACTS_Q16), and the quantization of a block of
// 32 values that all of them share. Included by kernels/*.cu only.
//
// Token t's record for k columns (k a multiple of 32) starts t * STRATA_ACTQ_RECORD(k) bytes in:
// the high digits (k signed bytes), the low digits (k), per block of 32 columns the unit (f32),
// then per block the sum of its values 256 h + l (i32), then per 8 columns the sum of their
// values (i32); padded to 16 bytes. The digit arrays are 16-byte aligned when the buffer is, the
// sums 4-byte aligned. (strata_kernels::cuda::ops::matvec::actq_bytes is the same size.)
#pragma once
#include "strata_common.cuh"

#define STRATA_ACTQ_RECORD(k) (((unsigned long long)(k) * 11 / 4 + 15) / 16 * 16)

// The arrays of one token's record.
struct ActqRecord {
    signed char* hi;
    signed char* lo;
    float* d;
    int* s;
    int* s8;
};

__device__ __forceinline__ ActqRecord actq_record(unsigned char* base, unsigned int cols, unsigned int t) {
    unsigned char* r = base + t * STRATA_ACTQ_RECORD(cols);
    signed char* hi = reinterpret_cast<signed char*>(r);
    float* d = reinterpret_cast<float*>(r + 2ull * cols);
    int* s = reinterpret_cast<int*>(d + cols / 32);
    return ActqRecord{hi, hi + cols, d, s, s + cols / 32};
}

// Quantizes one block of 32 activations, a value per lane of the warp (v), bit for bit as
// strata_tensor's ActQ8::quantize with two digits: with amax = max|x| (the largest bit pattern of
// |x|, so a NaN wins) and u = amax / 127, the high digit h = round(clamp(x * 127 / amax)), the
// low digit l = round(clamp((x - u h) * 32512 / amax)) (ties to even, clamps to -127..127), the
// unit u / 256 and the sum of 256 h + l; a block with amax < 2^-100 is all zeros. The _rn
// intrinsics keep nvcc from fusing a multiply and an add, so every rounding is the CPU's. Writes
// the lane's digits at hi[at] and lo[at], from lane 0 the unit and the sum, and the sums of each
// 8 values to s8[0..4] unless s8 is null (only q6_k's matvec reads them). Not inlined: the callers' loops
// would otherwise carry one copy of the divisions per block they unroll.
__device__ __noinline__ void quantize_block(float v, int lane, signed char* hi, signed char* lo, int at, float* d,
                                            int* s, int* s8) {
    const float amax = __uint_as_float(__reduce_max_sync(0xffffffffu, __float_as_uint(v) & 0x7fffffffu));
    const float u = __fdiv_rn(amax, 127.0f);
    const bool negligible = amax < 0x1p-100f;
    // 32512 / amax is exactly 256 (127 / amax): the scaling by 2^8 commutes with rounding.
    const float ih = negligible ? 0.0f : __fdiv_rn(127.0f, amax);
    const float il = __fmul_rn(ih, 256.0f);
    const int h = __float2int_rn(fminf(fmaxf(__fmul_rn(v, ih), -127.0f), 127.0f));
    const float r = __fmul_rn(__fsub_rn(v, __fmul_rn(u, (float)h)), il);
    const int l = __float2int_rn(fminf(fmaxf(r, -127.0f), 127.0f));
    hi[at] = (signed char)h;
    lo[at] = (signed char)l;
    if (s8) {  // the same for every lane of the warp
        int v8 = 256 * h + l;
        v8 += __shfl_xor_sync(0xffffffffu, v8, 1);
        v8 += __shfl_xor_sync(0xffffffffu, v8, 2);
        v8 += __shfl_xor_sync(0xffffffffu, v8, 4);
        if ((lane & 7) == 0) s8[lane >> 3] = v8;
    }
    const int sum = __reduce_add_sync(0xffffffffu, 256 * h + l);
    if (lane == 0) {
        *d = negligible ? 0.0f : __fdiv_rn(u, 256.0f);
        *s = sum;
    }
}

