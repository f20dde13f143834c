// Launch parameters of kernels/gating.cu.
#pragma once

/// The most experts a router may have (8 per lane of a warp).
#define STRATA_GATING_MAX_EXPERTS 256
/// The most experts a token may be routed to (one per lane).
#define STRATA_GATING_MAX_K 32

/// Top-k expert gating of `tokens` rows of `n_experts` router logits. Token t gets `max_k`
/// output slots; the count it uses is the first n whose running sum of descending
/// probabilities is >= `threshold`, clamped to `[min_k, max_k]` (fixed top-k: `min_k == max_k`).
typedef struct {
    /// Tokens (rows of logits).
    unsigned int tokens;
    /// Experts per token, 1 to STRATA_GATING_MAX_EXPERTS.
    unsigned int n_experts;
    /// The fewest experts a token is routed to, 1 to `max_k`.
    unsigned int min_k;
    /// The most experts a token is routed to (its output slots), up to `n_experts` and STRATA_GATING_MAX_K.
    unsigned int max_k;
    /// The running probability at which a token stops taking experts.
    float threshold;
    /// Nonzero: the chosen weights are divided by their sum.
    unsigned int renormalize;
} GatingParams;
