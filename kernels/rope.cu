// Rotary position embedding of queries and keys, fused: q and k rotated in place in one launch.
//
// For token t at position pos = positions[t] and pair i < n_pairs: angle = (float)pos *
// inv_freq[i] in f32, c = cos(angle) * attention_factor, s = sin(angle) * attention_factor, and
// the pair (a, b) of every head, (i, i + n_pairs) for rotate-half or (2i, 2i + 1) for
// interleaved, becomes (a*c - b*s, b*c + a*s). Every product and sum is rounded separately (no
// fused multiply-add, __fmul_rn/__fadd_rn stop nvcc from contracting them), as the CPU
// reference does. Dimensions past 2 * n_pairs are left alone. Sines and cosines come from the
// accurate sincosf: angles reach tens of thousands of radians, where __sinf/__cosf are useless.
//
// Launch: grid (tokens, ceil(items / chunk)) with items = (n_heads + n_kv_heads) * n_pairs, any
// block size that is a multiple of 32, dynamic shared memory 2 * n_pairs floats. Each block first
// computes its token's cos/sin table into shared memory (one sincosf per pair, not per head),
// then walks its chunk of (head, pair) items, ROPE_BATCH per thread loaded before any is stored
// (the first batch before the table is made, so the two latencies overlap); consecutive threads
// take consecutive pairs of a head, so loads and stores are coalesced.
// Elements are f32, f16 or bf16 (computed in f32, stored rounded to nearest even).
//
// rope_qk_f16x2 and rope_qk_bf16x2 take two consecutive pairs (i, i + 1; i even) per item, so
// every access moves two 16-bit elements (32 bits) rather than one: (head, pair-of-pairs) items,
// (n_heads + n_kv_heads) * n_pairs / 2 per token, the same grid and table. For n_pairs even,
// head_dim even and q, k 4-byte aligned (every access is then aligned); the same arithmetic per
// element, so bit for bit the one-pair kernels.
//
// CPU reference: strata_tensor::cpu::reference::rope (applied to q and to k). Launcher:
// strata_kernels::cuda::ops::rope_qk.
//
// rope_qk_append_f32 is rope_qk_f32 followed by attention.cu's kv_append_f32 in one launch (a
// decode step's layer one launch shorter): q rotated in place, k rotated into its KV cache
// blocks (through the block table, as kv_append_f32 addresses them) with any unrotated
// dimensions copied, v copied; the k buffer itself is left as it was. The same grid and table
// of cos/sin; each thread takes one item at a time (rope.h's RopeAppendParams). Bit for bit the
// two launches. Launcher: strata_kernels::cuda::kv::DeviceKvCache::append_rotated.
#include "strata_common.cuh"
#include "rope.h"

// Items a thread loads before it stores any (see rope_qk).
#define ROPE_BATCH 4

// The cos/sin table of the block's token (blockIdx.x) in shared memory: cos[0..n_pairs), then
// sin[0..n_pairs), each times the attention factor. Ends with a barrier.
__device__ __forceinline__ float* rope_table(const RopeParams& p, const unsigned int* positions, const float* inv_freq) {
    STRATA_DYNAMIC_SMEM(float, table);
    const unsigned int n = p.n_pairs;
    const float pos = __uint2float_rn(positions[blockIdx.x]);
    for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) {
        float s, c;
        sincosf(__fmul_rn(pos, inv_freq[i]), &s, &c);
        table[i] = __fmul_rn(c, p.attention_factor);
        table[n + i] = __fmul_rn(s, p.attention_factor);
    }
    __syncthreads();
    return table;
}

template <typename T>
__device__ __forceinline__ void rope_qk(const RopeParams& p, T* q, T* k, const unsigned int* positions,
                                        const float* inv_freq) {
    const unsigned int t = blockIdx.x;
    const unsigned int n = p.n_pairs;
    const unsigned int items = (p.n_heads + p.n_kv_heads) * n;
    const unsigned int begin = blockIdx.y * p.chunk;
    const unsigned int end = min(items, begin + p.chunk);
    const unsigned int stride = blockDim.x;
    // ROPE_BATCH items per thread at a time, all loaded before any is stored: the items are
    // distinct elements, so the loads need not wait for the stores, and a thread keeps
    // 2 * ROPE_BATCH loads in flight rather than two. The first batch's loads go out before the
    // cos/sin table is made, so that their latency and the table's overlap.
    T* v[ROPE_BATCH];
    unsigned int a[ROPE_BATCH], b[ROPE_BATCH], pair[ROPE_BATCH];
    float x0[ROPE_BATCH], x1[ROPE_BATCH];
    auto load = [&](unsigned int w0) {
#pragma unroll
        for (int j = 0; j < ROPE_BATCH; ++j) {
            const unsigned int w = w0 + j * stride;
            if (w < end) {
                const unsigned int h = w / n;
                const unsigned int i = w - h * n;
                v[j] = h < p.n_heads ? q + ((long long)t * p.n_heads + h) * p.head_dim
                                     : k + ((long long)t * p.n_kv_heads + (h - p.n_heads)) * p.head_dim;
                a[j] = p.layout == STRATA_ROPE_INTERLEAVED ? 2 * i : i;
                b[j] = p.layout == STRATA_ROPE_INTERLEAVED ? 2 * i + 1 : i + n;
                pair[j] = i;
                x0[j] = load_f32(v[j], a[j]);
                x1[j] = load_f32(v[j], b[j]);
            }
        }
    };
    unsigned int w0 = begin + threadIdx.x;
    load(w0);
    const float* table = rope_table(p, positions, inv_freq);
    for (; w0 < end; w0 += ROPE_BATCH * stride) {
#pragma unroll
        for (int j = 0; j < ROPE_BATCH; ++j) {
            if (w0 + j * stride < end) {
                const float c = table[pair[j]], s = table[n + pair[j]];
                store_f32(v[j], a[j], __fsub_rn(__fmul_rn(x0[j], c), __fmul_rn(x1[j], s)));
                store_f32(v[j], b[j], __fadd_rn(__fmul_rn(x1[j], c), __fmul_rn(x0[j], s)));
            }
        }
        load(w0 + ROPE_BATCH * stride);
    }
}

// Elements i and i + 1 of p (i even, p + i 4-byte aligned) as floats, in one 32-bit load; element
// i is the low half (little-endian).
__device__ __forceinline__ float2 load2_f32(const __half* p, long long i) {
    const unsigned int u = *reinterpret_cast<const unsigned int*>(p + i);
    return make_float2(__half2float(__ushort_as_half((unsigned short)(u & 0xffffu))),
                       __half2float(__ushort_as_half((unsigned short)(u >> 16))));
}
__device__ __forceinline__ float2 load2_f32(const __nv_bfloat16* p, long long i) {
    const unsigned int u = *reinterpret_cast<const unsigned int*>(p + i);
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));  // bf16 -> f32 is exact
}

// Stores v.x, v.y rounded to nearest even into elements i, i + 1 of p, in one 32-bit store.
__device__ __forceinline__ void store2_f32(__half* p, long long i, float2 v) {
    *reinterpret_cast<unsigned int*>(p + i) = (unsigned int)__half_as_ushort(__float2half_rn(v.x)) |
                                              ((unsigned int)__half_as_ushort(__float2half_rn(v.y)) << 16);
}
__device__ __forceinline__ void store2_f32(__nv_bfloat16* p, long long i, float2 v) {
    *reinterpret_cast<unsigned int*>(p + i) = (unsigned int)__bfloat16_as_ushort(__float2bfloat16_rn(v.x)) |
                                              ((unsigned int)__bfloat16_as_ushort(__float2bfloat16_rn(v.y)) << 16);
}

// (a*c - b*s, b*c + a*s), every operation rounded: one pair turned.
__device__ __forceinline__ float2 rope_turn(float a, float b, float c, float s) {
    return make_float2(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)), __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
}

// rope_qk over pairs of pairs (see the header): item w of a token is head w / (n_pairs / 2), pairs
// i and i + 1 with i = 2 (w % (n_pairs / 2)).
template <typename T>
__device__ __forceinline__ void rope_qk_x2(const RopeParams& p, T* q, T* k, const unsigned int* positions,
                                           const float* inv_freq) {
    const unsigned int t = blockIdx.x;
    const unsigned int n = p.n_pairs, m = p.n_pairs / 2;
    const unsigned int items = (p.n_heads + p.n_kv_heads) * m;
    const unsigned int begin = blockIdx.y * p.chunk;
    const unsigned int end = min(items, begin + p.chunk);
    const unsigned int stride = blockDim.x;
    const bool interleaved = p.layout == STRATA_ROPE_INTERLEAVED;
    // As rope_qk: batches of loads, the first before the table.
    T* v[ROPE_BATCH];
    unsigned int pair[ROPE_BATCH];
    float2 x0[ROPE_BATCH], x1[ROPE_BATCH];
    auto load = [&](unsigned int w0) {
#pragma unroll
        for (int j = 0; j < ROPE_BATCH; ++j) {
            const unsigned int w = w0 + j * stride;
            if (w < end) {
                const unsigned int h = w / m;
                const unsigned int i = 2 * (w - h * m);
                v[j] = h < p.n_heads ? q + ((long long)t * p.n_heads + h) * p.head_dim
                                     : k + ((long long)t * p.n_kv_heads + (h - p.n_heads)) * p.head_dim;
                pair[j] = i;
                // Interleaved: (a, b) of pair i, then of pair i + 1. Rotate-half: a of both pairs,
                // then b of both.
                x0[j] = load2_f32(v[j], interleaved ? 2 * i : i);
                x1[j] = load2_f32(v[j], interleaved ? 2 * i + 2 : i + n);
            }
        }
    };
    unsigned int w0 = begin + threadIdx.x;
    load(w0);
    const float* table = rope_table(p, positions, inv_freq);
    for (; w0 < end; w0 += ROPE_BATCH * stride) {
#pragma unroll
        for (int j = 0; j < ROPE_BATCH; ++j) {
            if (w0 + j * stride < end) {
                const unsigned int i = pair[j];
                const float c0 = table[i], s0 = table[n + i], c1 = table[i + 1], s1 = table[n + i + 1];
                if (interleaved) {
                    store2_f32(v[j], 2 * i, rope_turn(x0[j].x, x0[j].y, c0, s0));
                    store2_f32(v[j], 2 * i + 2, rope_turn(x1[j].x, x1[j].y, c1, s1));
                } else {
                    const float2 r0 = rope_turn(x0[j].x, x1[j].x, c0, s0), r1 = rope_turn(x0[j].y, x1[j].y, c1, s1);
                    store2_f32(v[j], i, make_float2(r0.x, r1.x));
                    store2_f32(v[j], i + n, make_float2(r0.y, r1.y));
                }
            }
        }
        load(w0 + ROPE_BATCH * stride);
    }
}

extern "C" __global__ void rope_qk_f32(RopeParams p, float* q, float* k, const unsigned int* positions,
                                       const float* inv_freq) {
    rope_qk(p, q, k, positions, inv_freq);
}

extern "C" __global__ void rope_qk_f16(RopeParams p, __half* q, __half* k, const unsigned int* positions,
                                       const float* inv_freq) {
    rope_qk(p, q, k, positions, inv_freq);
}

extern "C" __global__ void rope_qk_bf16(RopeParams p, __nv_bfloat16* q, __nv_bfloat16* k,
                                        const unsigned int* positions, const float* inv_freq) {
    rope_qk(p, q, k, positions, inv_freq);
}

extern "C" __global__ void rope_qk_f16x2(RopeParams p, __half* q, __half* k, const unsigned int* positions,
                                         const float* inv_freq) {
    rope_qk_x2(p, q, k, positions, inv_freq);
}

extern "C" __global__ void rope_qk_bf16x2(RopeParams p, __nv_bfloat16* q, __nv_bfloat16* k,
                                          const unsigned int* positions, const float* inv_freq) {
    rope_qk_x2(p, q, k, positions, inv_freq);
}

extern "C" __global__ void rope_qk_append_f32(RopeAppendParams pa, float* q, const float* k, const float* v,
                                              const unsigned int* positions, const float* inv_freq,
                                              const unsigned long long* table) {
    const RopeParams& p = pa.rope;
    const float* cs = rope_table(p, positions, inv_freq);  // cos[0..n_pairs), then sin[0..n_pairs)
    const unsigned int t = blockIdx.x;
    const unsigned int n = p.n_pairs, hd = p.head_dim, half = p.head_dim / 2;
    const unsigned int nq = p.n_heads * n, nkv = p.n_kv_heads * half;
    const unsigned int items = nq + 2 * nkv;
    const unsigned int begin = blockIdx.y * p.chunk, end = min(items, begin + p.chunk);
    // This token's row in the cache.
    const unsigned int cpos = pa.start + t;
    const size_t row = (size_t)p.n_kv_heads * hd;
    const size_t at = (size_t)(cpos % pa.block_len) * row;
    float* kc = reinterpret_cast<float*>(table[2 * (size_t)(cpos / pa.block_len)]) + at;
    float* vc = reinterpret_cast<float*>(table[2 * (size_t)(cpos / pa.block_len) + 1]) + at;
    for (unsigned int w = begin + threadIdx.x; w < end; w += blockDim.x) {
        if (w < nq + nkv) {
            // A pair of q (in place) or of k (into the cache), or two unrotated dimensions of k.
            const bool is_q = w < nq;
            const unsigned int u = is_q ? w : w - nq;
            const unsigned int h = is_q ? u / n : u / half, i = is_q ? u - h * n : u - h * half;
            const float* src = is_q ? q + ((size_t)t * p.n_heads + h) * hd : k + ((size_t)t * p.n_kv_heads + h) * hd;
            float* dst = is_q ? q + ((size_t)t * p.n_heads + h) * hd : kc + (size_t)h * hd;
            if (i < n) {
                const unsigned int a = p.layout == STRATA_ROPE_INTERLEAVED ? 2 * i : i;
                const unsigned int b = p.layout == STRATA_ROPE_INTERLEAVED ? 2 * i + 1 : i + n;
                const float x0 = src[a], x1 = src[b], c = cs[i], s = cs[n + i];
                dst[a] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
                dst[b] = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
            } else {
                // Dimensions 2i and 2i + 1 >= 2 n_pairs: past the rotated ones in either layout.
                dst[2 * i] = src[2 * i], dst[2 * i + 1] = src[2 * i + 1];
            }
        } else {
            const unsigned int u = w - nq - nkv, h = u / half, d = 2 * (u - h * half);
            const float* src = v + ((size_t)t * p.n_kv_heads + h) * hd;
            vc[(size_t)h * hd + d] = src[d], vc[(size_t)h * hd + d + 1] = src[d + 1];
        }
    }
}
