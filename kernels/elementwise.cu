// Element-wise kernels: SwiGLU, residual add, bias add, and f32 -> f16/bf16 casts.
//
//   swiglu_f32:     out = gate / (1 + exp(-gate)) * up   (strata_tensor::cpu::reference::swiglu)
//   swiglu_pairs_f32: the same, gate and up from one product of paired rows (see the kernel)
//   copy_cols_f32:  dst[r, c] = src[r, col0 + c]
//   gather_rows_f32, scatter_add_rows_f32, add_sigmoid_scaled_f32: Mixture-of-Experts dispatch
//   moe_combine_f32: a Mixture-of-Experts block's output from its experts' on the device (below)
//   add_f32:        acc += x                             (strata_tensor::cpu::reference::add)
//   add_bias_f32:   y[r, c] += bias[c]
//   cast_f32_f16, cast_f32_bf16: out = x rounded to nearest even (what half::f16::from_f32 and
//                   half::bf16::from_f32 give), to feed cuBLAS's 16-bit GEMMs.
//
// Launch: the flat kernels take any 1-D grid and block and stride over the elements with
// grid * block threads; when every operand is 16-byte aligned (8 bytes for 16-bit outputs) they
// move four elements per access (float4), the last n % 4 one at a time. The alignment test is
// uniform across the grid. add_bias_f32: grid (ceil(cols / block), any y), each thread loads
// its bias element once and walks the rows blockIdx.y, blockIdx.y + gridDim.y, ...
//
// SwiGLU uses the accurate expf and IEEE division; nothing is fused, so it differs from the
// reference by expf's last-bit error only. Launchers: strata_kernels::cuda::ops::{swiglu,
// swiglu_pairs, copy_cols, gather_rows, scatter_add_rows, add_sigmoid_scaled, moe_combine, add,
// add_bias, cast_f32_to}.
#include <math_constants.h>

#include "strata_common.cuh"
#include "elementwise.h"

__device__ __forceinline__ unsigned long long thread_index() {
    return (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ unsigned long long thread_count() {
    return (unsigned long long)gridDim.x * blockDim.x;
}

__device__ __forceinline__ bool aligned(const void* p, unsigned long long bytes) {
    return ((unsigned long long)p & (bytes - 1)) == 0;
}

extern "C" __global__ void swiglu_f32(ElementwiseParams p, const float* gate, const float* up, float* out) {
    const unsigned long long i0 = thread_index(), stride = thread_count();
    unsigned long long tail = 0;
    if (aligned(gate, 16) && aligned(up, 16) && aligned(out, 16)) {
        const unsigned long long n4 = p.n / 4;
        for (unsigned long long i = i0; i < n4; i += stride) {
            const float4 g = reinterpret_cast<const float4*>(gate)[i];
            const float4 u = reinterpret_cast<const float4*>(up)[i];
            reinterpret_cast<float4*>(out)[i] =
                make_float4(silu_mul(g.x, u.x), silu_mul(g.y, u.y), silu_mul(g.z, u.z), silu_mul(g.w, u.w));
        }
        tail = n4 * 4;
    }
    for (unsigned long long i = tail + i0; i < p.n; i += stride) out[i] = silu_mul(gate[i], up[i]);
}

// SwiGLU over a product with paired rows (ops::pair_rows: gate rows 2j, 2j + 1, then up rows
// 2j, 2j + 1, per group of four): y [tokens, 2 width] to out [tokens, width], width even, so
// output i (token i / width, column c = i % width, c and i of the same parity) takes gate
// y[2i - i % 2] and up two after it.
extern "C" __global__ void swiglu_pairs_f32(ElementwiseParams p, const float* y, float* out) {
    const unsigned long long i0 = thread_index(), stride = thread_count();
    for (unsigned long long i = i0; i < p.n; i += stride) {
        const unsigned long long g = 2 * i - (i & 1);
        out[i] = silu_mul(y[g], y[g + 2]);
    }
}

// Columns col0 .. col0 + cols of each row of src, packed into dst (a fused projection's output
// taken apart: q, k and v from q|k|v rows). One thread per element of dst, grid-stride.
extern "C" __global__ void copy_cols_f32(CopyColsParams p, const float* src, float* dst) {
    const unsigned long long n = (unsigned long long)p.rows * p.cols;
    for (unsigned long long i = thread_index(); i < n; i += thread_count()) {
        const unsigned long long r = i / p.cols, c = i - r * p.cols;
        dst[i] = src[r * p.src_cols + p.col0 + c];
    }
}

// Mixture-of-Experts dispatch, as strata_models::moe::MoeLayer::forward does it on the CPU:
// gather_rows_f32 takes the rows of the tokens an expert serves, dst[i, c] = src[idx[i], c];
// scatter_add_rows_f32 adds the expert's outputs back, out[idx[i], c] += y[i, c] * w[i] (the
// product rounded, then the sum: the CPU's `o += y * w`; the idx of one launch are distinct, so
// no two threads write one element); add_sigmoid_scaled_f32 adds a shared expert's output,
// out[r, c] += s_r * y[r, c] with s_r = 1 / (1 + exp(-g[r])) (the accurate expf and IEEE
// division, as the CPU's f32 arithmetic). One thread per element, grid-stride.
extern "C" __global__ void gather_rows_f32(RowsParams p, const float* src, const unsigned int* idx, float* dst) {
    const unsigned long long n = (unsigned long long)p.rows * p.cols;
    for (unsigned long long i = thread_index(); i < n; i += thread_count()) {
        const unsigned long long r = i / p.cols, c = i - r * p.cols;
        dst[i] = src[(unsigned long long)idx[r] * p.cols + c];
    }
}

extern "C" __global__ void scatter_add_rows_f32(RowsParams p, const float* y, const unsigned int* idx, const float* w,
                                                float* out) {
    const unsigned long long n = (unsigned long long)p.rows * p.cols;
    for (unsigned long long i = thread_index(); i < n; i += thread_count()) {
        const unsigned long long r = i / p.cols, c = i - r * p.cols;
        float* o = out + (unsigned long long)idx[r] * p.cols + c;
        *o = __fadd_rn(*o, __fmul_rn(y[i], w[r]));
    }
}

extern "C" __global__ void add_sigmoid_scaled_f32(RowsParams p, const float* y, const float* g, float* out) {
    const unsigned long long n = (unsigned long long)p.rows * p.cols;
    for (unsigned long long i = thread_index(); i < n; i += thread_count()) {
        const unsigned long long r = i / p.cols;
        const float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-g[r])));
        out[i] = __fadd_rn(out[i], __fmul_rn(s, y[i]));
    }
}

// moe_combine_f32: token t's slots s hold expert ids[t, s] (top-k gating's output) and its
// outputs ys[t, s, :] (the experts' products of one launch, matvec_experts); the token's block
// output is o = 0, then o += ys[t, s, c] * w[t, s] (the product rounded, then the sum) over its
// used slots in ascending order of expert index: what zeroing out and scatter_add_rows_f32 expert
// by expert compute, bit for bit. With a shared expert (shared_y not null: its outputs [t, :],
// its gate's logit shared_gate[t]), o += sigmoid(gate) * shared_y[t, c] as add_sigmoid_scaled_f32
// adds it. out[t, c] is o, or with p.residual out[t, c] + o (add_f32's rounding). A token with no
// used slot, which gating gives a token whose router probabilities are NaN, gets NaN outputs: the
// device cannot raise the host path's error, and NaN logits show it.
// Launch: grid (ceil(cols / block), tokens), any block; thread 0 orders the token's slots and
// computes the shared expert's sigmoid in shared memory, then one thread per column.
extern "C" __global__ void moe_combine_f32(MoeCombineParams p, const float* ys, const unsigned int* ids,
                                           const float* w, const float* shared_y, const float* shared_gate,
                                           float* out) {
    STRATA_SHARED unsigned int order[STRATA_MOE_COMBINE_MAX_SLOTS];
    STRATA_SHARED unsigned int used;
    STRATA_SHARED float gate;
    const unsigned long long t = blockIdx.y;
    const unsigned int* tid = ids + t * p.slots;
    if (threadIdx.x == 0) {
        // Insertion sort of the used slots by expert index (at most 32).
        unsigned int n = 0;
        for (unsigned int s = 0; s < p.slots; ++s) {
            const unsigned int id = tid[s];
            if (id >= p.experts) continue;
            unsigned int j = n++;
            for (; j > 0 && tid[order[j - 1]] > id; --j) order[j] = order[j - 1];
            order[j] = s;
        }
        used = n;
        if (shared_y != nullptr) gate = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-shared_gate[t])));
    }
    __syncthreads();
    const unsigned int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= p.cols) return;
    float o = used == 0 ? CUDART_NAN_F : 0.0f;
    for (unsigned int j = 0; j < used; ++j) {
        const unsigned long long s = t * p.slots + order[j];
        o = __fadd_rn(o, __fmul_rn(ys[s * p.cols + c], w[s]));
    }
    if (shared_y != nullptr) o = __fadd_rn(o, __fmul_rn(gate, shared_y[t * p.cols + c]));
    float* dst = out + t * p.cols + c;
    *dst = p.residual ? __fadd_rn(*dst, o) : o;
}

extern "C" __global__ void add_f32(ElementwiseParams p, float* acc, const float* x) {
    const unsigned long long i0 = thread_index(), stride = thread_count();
    unsigned long long tail = 0;
    if (aligned(acc, 16) && aligned(x, 16)) {
        const unsigned long long n4 = p.n / 4;
        for (unsigned long long i = i0; i < n4; i += stride) {
            float4 a = reinterpret_cast<float4*>(acc)[i];
            const float4 v = reinterpret_cast<const float4*>(x)[i];
            a.x += v.x;
            a.y += v.y;
            a.z += v.z;
            a.w += v.w;
            reinterpret_cast<float4*>(acc)[i] = a;
        }
        tail = n4 * 4;
    }
    for (unsigned long long i = tail + i0; i < p.n; i += stride) acc[i] += x[i];
}

extern "C" __global__ void add_bias_f32(AddBiasParams p, float* y, const float* bias) {
    const unsigned int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= p.cols) return;
    const float b = bias[c];
    for (unsigned int r = blockIdx.y; r < p.rows; r += gridDim.y) y[(unsigned long long)r * p.cols + c] += b;
}

// The bits of x rounded to nearest even, as a 16-bit float.
__device__ __forceinline__ unsigned int bits16(float x, const __half*) { return __half_as_ushort(__float2half_rn(x)); }
__device__ __forceinline__ unsigned int bits16(float x, const __nv_bfloat16*) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

// Four f32 -> four 16-bit floats, stored as one 8-byte word (element 0 in the low bits).
template <typename H>
__device__ __forceinline__ void cast4(float4 v, H* out, unsigned long long i) {
    const H* tag = out;
    const uint2 w = make_uint2(bits16(v.x, tag) | bits16(v.y, tag) << 16, bits16(v.z, tag) | bits16(v.w, tag) << 16);
    reinterpret_cast<uint2*>(out)[i] = w;
}

template <typename H>
__device__ __forceinline__ void cast_f32(const ElementwiseParams& p, const float* x, H* out) {
    const unsigned long long i0 = thread_index(), stride = thread_count();
    unsigned long long tail = 0;
    if (aligned(x, 16) && aligned(out, 8)) {
        const unsigned long long n4 = p.n / 4;
        for (unsigned long long i = i0; i < n4; i += stride) cast4(reinterpret_cast<const float4*>(x)[i], out, i);
        tail = n4 * 4;
    }
    for (unsigned long long i = tail + i0; i < p.n; i += stride) store_f32(out, i, x[i]);
}

extern "C" __global__ void cast_f32_f16(ElementwiseParams p, const float* x, __half* out) { cast_f32(p, x, out); }

extern "C" __global__ void cast_f32_bf16(ElementwiseParams p, const float* x, __nv_bfloat16* out) {
    cast_f32(p, x, out);
}
