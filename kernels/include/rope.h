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

/// RoPE of q in place and of k into a paged KV cache, v copied beside it (kernels/rope.cu's
/// rope_qk_append_f32): rope_qk_f32 then attention.cu's kv_append_f32 in one launch. Token t
/// goes to cache position start + t: block (start + t) / block_len of the table (key block at
/// 2b, value block at 2b + 1), row (start + t) % block_len of n_kv_heads * head_dim floats.
typedef struct {
    /// As for rope_qk, except `chunk`, which counts this kernel's items: per token
    /// n_heads * n_pairs rotations of q, then n_kv_heads * head_dim / 2 of k (a rotation for
    /// pairs below n_pairs, else a copy of two unrotated dimensions), then as many copies of two
    /// dimensions of v.
    RopeParams rope;
    /// The cache position of the first token (the layer's length before the append).
    unsigned int start;
    /// Tokens per cache block.
    unsigned int block_len;
} RopeAppendParams;
