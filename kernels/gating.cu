// Top-k expert gating for Mixture-of-Experts routers, fixed or dynamic k; outputs stay on the
// device.
//
// Per token: softmax over the n_experts router logits in f32 (maximum ignoring NaN, expf,
// reciprocal of the sum), then experts taken one at a time in descending order of probability,
// ties to the lower index. The probabilities taken are added in that order in f32 from 0; the
// token stops after n experts when n >= min_k and the running sum is >= threshold, or when
// n == max_k. Slots r < n get the expert and its probability (divided by that running sum, the
// sum of the chosen ones in descending order, when renormalize); slots n..max_k get id
// 0xffffffff and weight 0; counts[t] = n when counts is not null. Fixed top-k is min_k == max_k.
// A token whose probabilities contain NaN (a NaN or +inf logit, or all -inf) cannot raise an
// error from the device: its slots all get id 0xffffffff and weight NaN, and its count 0.
//
// Launch: one warp per token, any number of warps per block (grid = ceil(tokens / warps)).
// Lane l holds experts l, l + 32, .., l + 224 in registers (n_experts <= 256); each of the up
// to max_k <= 32 selection rounds is a warp reduction of (probability, index) pairs, and lane r
// keeps the r-th choice for the final write.
//
// CPU references: strata_tensor::cpu::reference::topk_gating (min_k == max_k == k) and
// strata_tensor::cpu::reference::topk_gating_dynamic. Only the order of the softmax sum differs
// (a few ulp in the weights). Launchers: strata_kernels::cuda::ops::{topk_gating,
// topk_gating_dynamic}.
#include <math_constants.h>

#include "strata_common.cuh"
#include "gating.h"

#define SLOTS (STRATA_GATING_MAX_EXPERTS / STRATA_WARP)

// Whether (v, i) ranks before (w, j): larger probability, then lower index.
__device__ __forceinline__ bool ranks_before(float v, unsigned int i, float w, unsigned int j) {
    return v > w || (v == w && i < j);
}

extern "C" __global__ void topk_gating_f32(GatingParams p, const float* logits, unsigned int* ids, float* weights,
                                           unsigned int* counts) {
    const unsigned int lane = threadIdx.x % STRATA_WARP;
    const unsigned long long t = (unsigned long long)blockIdx.x * (blockDim.x / STRATA_WARP) + threadIdx.x / STRATA_WARP;
    if (t >= p.tokens) return;  // whole warps
    const float* row = logits + t * p.n_experts;

    // Softmax, expert lane + 32 j in v[j]; slots past n_experts hold -1 (below every probability).
    float v[SLOTS];
    float m = -CUDART_INF_F;
#pragma unroll
    for (int j = 0; j < SLOTS; ++j) {
        const unsigned int e = lane + STRATA_WARP * j;
        v[j] = e < p.n_experts ? row[e] : -CUDART_INF_F;
        m = fmaxf(m, v[j]);
    }
    m = warp_max(m);
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < SLOTS; ++j) {
        if (lane + STRATA_WARP * j < p.n_experts) {
            v[j] = expf(v[j] - m);
            s += v[j];
        }
    }
    s = warp_sum(s);
    const float inv = __fdiv_rn(1.0f, s);
    bool nan = false;
#pragma unroll
    for (int j = 0; j < SLOTS; ++j) {
        if (lane + STRATA_WARP * j < p.n_experts) {
            v[j] = __fmul_rn(v[j], inv);
            nan |= v[j] != v[j];
        } else {
            v[j] = -1.0f;
        }
    }
    unsigned int* tid = ids + t * p.max_k;
    float* tw = weights + t * p.max_k;
    if (__any_sync(0xffffffffu, nan)) {
        if (lane < p.max_k) {
            tid[lane] = 0xffffffffu;
            tw[lane] = CUDART_NAN_F;
        }
        if (counts != nullptr && lane == 0) counts[t] = 0;
        return;
    }

    // Selection: every round, the best remaining (probability, index) of the warp; every lane
    // ends the butterfly with the same winner, so the loop's control flow is warp-uniform.
    unsigned int my_id = 0xffffffffu;
    float my_w = 0.0f;
    float cumulative = 0.0f;
    unsigned int n = p.max_k;
    for (unsigned int r = 0; r < p.max_k; ++r) {
        float best = -2.0f;
        unsigned int at = 0xffffffffu;
#pragma unroll
        for (int j = 0; j < SLOTS; ++j) {
            const unsigned int e = lane + STRATA_WARP * j;
            if (ranks_before(v[j], e, best, at)) {
                best = v[j];
                at = e;
            }
        }
#pragma unroll
        for (int o = STRATA_WARP / 2; o > 0; o >>= 1) {
            const float w = __shfl_xor_sync(0xffffffffu, best, o);
            const unsigned int i = __shfl_xor_sync(0xffffffffu, at, o);
            if (ranks_before(w, i, best, at)) {
                best = w;
                at = i;
            }
        }
#pragma unroll
        for (int j = 0; j < SLOTS; ++j) {
            if (lane + STRATA_WARP * j == at) v[j] = -1.0f;
        }
        if (lane == r) {
            my_id = at;
            my_w = best;
        }
        cumulative = __fadd_rn(cumulative, best);
        if (r + 1 >= p.min_k && cumulative >= p.threshold) {
            n = r + 1;
            break;
        }
    }
    if (lane < p.max_k) {
        const bool used = lane < n;
        tid[lane] = used ? my_id : 0xffffffffu;
        tw[lane] = !used ? 0.0f : p.renormalize ? __fdiv_rn(my_w, cumulative) : my_w;
    }
    if (counts != nullptr && lane == 0) counts[t] = n;
}
