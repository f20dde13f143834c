// ggml block formats on the device: scale conversions, the magic-number byte-to-float trick, and
// the exact per-element decoding of every weight dtype that kernels/convert.cu uses (and
// kernels/matvec.cu mirrors with its own, faster, inexact arithmetic).
//
// The block layouts are strata_tensor::quant's (bit-identical to ggml's):
//   q8_0  34 bytes: f16 d, 32 x int8 q;                       x = q * d
//   q4_0  18 bytes: f16 d, 16 bytes of nibbles;               x = (q - 8) * d
//   q4_1  20 bytes: f16 d, f16 m, 16 bytes of nibbles;        x = q * d + m
//         (byte j holds element j in its low nibble and element j + 16 in its high nibble)
//   q4_k 144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles;
//         byte 32c + l holds element 64c + l (sub-block 2c) low and 64c + 32 + l (2c + 1) high;
//         x = d * sc * q - dmin * m
//   q6_k 210 bytes: 128 bytes ql, 64 bytes qh, 16 int8 scales, f16 d; x = d * sc * (q - 32)
// Only q4_1 and q4_k blocks are 4-byte aligned in memory (q4_k even 16-byte); the others are
// 2-byte aligned, so every load here is at most as wide as the alignment it can rely on.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "dtype.h"

// 2^23 as a float: for an integer 0 <= v < 2^23, the float with bits 0x4B000000 | v is 2^23 + v.
#define STRATA_MAGIC 8388608.0f

__device__ __forceinline__ float f16_bits(unsigned int bits) {
    return __half2float(__ushort_as_half((unsigned short)(bits & 0xffffu)));
}

__device__ __forceinline__ float bf16_bits(unsigned int bits) { return __uint_as_float((bits & 0xffffu) << 16); }

// 2^23 + (byte J of w), exactly: subtracting 2^23 (+ an offset) gives the byte as a float in two
// instructions, where an int-to-float conversion runs at a quarter of the rate.
template <int J>
__device__ __forceinline__ float magic_byte(unsigned int w) {
    return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440u | J));
}

// The 16-bit word at a 2-byte aligned address.
__device__ __forceinline__ unsigned int load_u16(const unsigned char* p) {
    return *reinterpret_cast<const unsigned short*>(p);
}

// The 4 bytes at a 2-byte aligned address, as two 16-bit loads.
__device__ __forceinline__ unsigned int load_u32_a2(const unsigned char* p) {
    return load_u16(p) | (load_u16(p + 2) << 16);
}

// The 6-bit scales (sc) and mins (m) of q4_k sub-blocks 0..3 and 4..7, one per byte, from the
// three words A, B, C of the 12 packed bytes (ggml's get_scale_min_k4, four at a time).
__device__ __forceinline__ unsigned int q4k_scales_lo(unsigned int a) { return a & 0x3F3F3F3Fu; }
__device__ __forceinline__ unsigned int q4k_mins_lo(unsigned int b) { return b & 0x3F3F3F3Fu; }
__device__ __forceinline__ unsigned int q4k_scales_hi(unsigned int a, unsigned int c) {
    return (c & 0x0F0F0F0Fu) | ((a >> 2) & 0x30303030u);
}
__device__ __forceinline__ unsigned int q4k_mins_hi(unsigned int b, unsigned int c) {
    return ((c >> 4) & 0x0F0F0F0Fu) | ((b >> 2) & 0x30303030u);
}

// ---- Exact decoding, element by element, as strata_tensor::quant::dequantize_row -------------
//
// Each function writes elements e .. e + V - 1 of a row starting at `row` (V = 4 with e a multiple
// of 4, or V = 1 for the float types). The arithmetic is the CPU's, operation by operation, with
// the _rn intrinsics so that nvcc cannot contract a multiply and an add into an FMA: the results
// are bit-identical to Tensor::to_f32_vec.

template <int V>
__device__ __forceinline__ void decode_f32(const unsigned char* row, unsigned int e, float* out) {
    if constexpr (V == 4) {
        const float4 v = *reinterpret_cast<const float4*>(row + 4ull * e);
        out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
    } else {
        out[0] = *reinterpret_cast<const float*>(row + 4ull * e);
    }
}

template <int V>
__device__ __forceinline__ void decode_f16(const unsigned char* row, unsigned int e, float* out) {
    if constexpr (V == 4) {
        const uint2 v = *reinterpret_cast<const uint2*>(row + 2ull * e);
        out[0] = f16_bits(v.x), out[1] = f16_bits(v.x >> 16), out[2] = f16_bits(v.y), out[3] = f16_bits(v.y >> 16);
    } else {
        out[0] = f16_bits(load_u16(row + 2ull * e));
    }
}

template <int V>
__device__ __forceinline__ void decode_bf16(const unsigned char* row, unsigned int e, float* out) {
    if constexpr (V == 4) {
        const uint2 v = *reinterpret_cast<const uint2*>(row + 2ull * e);
        out[0] = bf16_bits(v.x), out[1] = bf16_bits(v.x >> 16), out[2] = bf16_bits(v.y), out[3] = bf16_bits(v.y >> 16);
    } else {
        out[0] = bf16_bits(load_u16(row + 2ull * e));
    }
}

// q8_0: x = q * d.
__device__ __forceinline__ void decode_q8_0(const unsigned char* row, unsigned int e, float* out) {
    const unsigned char* blk = row + 34ull * (e / 32);
    const float d = f16_bits(load_u16(blk));
    const unsigned int q = load_u32_a2(blk + 2 + e % 32);
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = __fmul_rn((float)(signed char)(q >> (8 * i)), d);
}

// q4_0: x = (q - 8) * d; elements 0..15 are low nibbles, 16..31 high nibbles of the same bytes.
__device__ __forceinline__ void decode_q4_0(const unsigned char* row, unsigned int e, float* out) {
    const unsigned char* blk = row + 18ull * (e / 32);
    const unsigned int j = e % 32;
    const float d = f16_bits(load_u16(blk));
    const unsigned int q = load_u32_a2(blk + 2 + j % 16) >> (j >= 16 ? 4 : 0);
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = __fmul_rn((float)((int)((q >> (8 * i)) & 15u) - 8), d);
}

// q4_1: x = q * d + m.
__device__ __forceinline__ void decode_q4_1(const unsigned char* row, unsigned int e, float* out) {
    const unsigned char* blk = row + 20ull * (e / 32);
    const unsigned int j = e % 32;
    const unsigned int dm = *reinterpret_cast<const unsigned int*>(blk);
    const float d = f16_bits(dm), m = f16_bits(dm >> 16);
    const unsigned int q = *reinterpret_cast<const unsigned int*>(blk + 4 + j % 16) >> (j >= 16 ? 4 : 0);
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = __fadd_rn(__fmul_rn((float)((q >> (8 * i)) & 15u), d), m);
}

// q4_k: x = (d * sc) * q - dmin * m, with the sub-block's 6-bit sc and m.
__device__ __forceinline__ void decode_q4_k(const unsigned char* row, unsigned int e, float* out) {
    const unsigned char* blk = row + 144ull * (e / 256);
    const unsigned int within = e % 256, c = within / 64, hi = (within % 64) / 32, l = within % 32;
    const uint4 h = *reinterpret_cast<const uint4*>(blk);
    const float d = f16_bits(h.x), dmin = f16_bits(h.x >> 16);
    const unsigned int sub = 2 * c + hi;
    const unsigned int scw = sub < 4 ? q4k_scales_lo(h.y) : q4k_scales_hi(h.y, h.w);
    const unsigned int mw = sub < 4 ? q4k_mins_lo(h.z) : q4k_mins_hi(h.z, h.w);
    const float sc = (float)((scw >> (8 * (sub % 4))) & 0xffu), m = (float)((mw >> (8 * (sub % 4))) & 0xffu);
    const float d1 = __fmul_rn(d, sc), m1 = __fmul_rn(dmin, m);
    const unsigned int q = *reinterpret_cast<const unsigned int*>(blk + 16 + 32 * c + l) >> (4 * hi);
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = __fsub_rn(__fmul_rn(d1, (float)((q >> (8 * i)) & 15u)), m1);
}

// q6_k: x = (d * sc) * (q - 32). In half h of the super-block, element 32i + l (l < 32) takes its
// low 4 bits from ql[64h + l + 32 (i & 1)] (low nibble for i < 2, high for i >= 2), its high 2 bits
// from bits 2i..2i+1 of qh[32h + l], and the scale scales[8h + l / 16 + 2i].
__device__ __forceinline__ void decode_q6_k(const unsigned char* row, unsigned int e, float* out) {
    const unsigned char* blk = row + 210ull * (e / 256);
    const unsigned int within = e % 256, h = within / 128, i = (within % 128) / 32, l = within % 32;
    const float d = f16_bits(load_u16(blk + 208));
    const float sc = (float)(signed char)blk[192 + 8 * h + l / 16 + 2 * i];
    const float ds = __fmul_rn(d, sc);
    const unsigned int lo = load_u32_a2(blk + 64 * h + l + 32 * (i & 1)) >> (4 * (i >> 1));
    const unsigned int hi = load_u32_a2(blk + 128 + 32 * h + l) >> (2 * i);
#pragma unroll
    for (int b = 0; b < 4; ++b) {
        const int q = (int)(((lo >> (8 * b)) & 15u) | (((hi >> (8 * b)) & 3u) << 4)) - 32;
        out[b] = __fmul_rn(ds, (float)q);
    }
}
