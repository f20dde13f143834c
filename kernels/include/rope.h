// Launch parameters of kernels/rope.cu.
#pragma once

/// Rotary pairing: dimension `i` with `i + n_pairs` (Hugging Face `rotate_half`).
#define STRATA_ROPE_ROTATE_HALF 0
/// Rotary pairing: dimension `2i` with `2i + 1` (GPT-J, ggml's normal mode).
#define STRATA_ROPE_INTERLEAVED 1

/// Rotates q (`[tokens, n_heads, head_dim]`) and k (`[tokens, n_kv_heads, head_dim]`) in place:
/// pair `i < n_pairs` of every head of token `t` turns by `positions[t] * inv_freq[i]`.
typedef struct {
    /// Tokens (the grid's x dimension: one block row per token).
    unsigned int tokens;
    /// Query heads per token.
    unsigned int n_heads;
    /// Key heads per token.
    unsigned int n_kv_heads;
    /// Elements per head.
    unsigned int head_dim;
    /// Rotary pairs per head (`inv_freq`'s length); `2 * n_pairs <= head_dim`.
    unsigned int n_pairs;
    /// `STRATA_ROPE_ROTATE_HALF` or `STRATA_ROPE_INTERLEAVED`.
    unsigned int layout;
    /// (head, pair) items per block: block `y` of a token handles items `[y * chunk, (y + 1) * chunk)`
    /// of the token's `(n_heads + n_kv_heads) * n_pairs`.
    unsigned int chunk;
    /// Multiplies the cosines and sines (1 unless the RoPE scaling says otherwise, e.g. YaRN).
    float attention_factor;
} RopeParams;
