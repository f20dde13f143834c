// Launch parameters of kernels/attention.cu: the paged KV cache's append, split-K decode
// attention with its combine step, and tiled prefill attention.
#pragma once

/// The most elements per head the attention kernels take (head_dim must also be a multiple of 4).
#define STRATA_ATTN_MAX_HEAD_DIM 256
/// Threads per block of the decode kernel.
#define STRATA_ATTN_DECODE_THREADS 128
/// Decode blocks the compiler keeps resident per SM (__launch_bounds__'s minimum: at most 85
/// registers a thread). Left to itself it aimed at 64 and spilled; the launcher aims at 4 blocks
/// per SM and shared memory allows 5-6 at head_dim 128.
#define STRATA_ATTN_DECODE_MIN_BLOCKS 6
/// The most query heads one decode block serves (a larger group is split over blocks).
#define STRATA_ATTN_DECODE_MAX_HEADS 8
/// Threads per block of the decode combine kernel (at least 4 x head_dim / 4).
#define STRATA_ATTN_COMBINE_THREADS 256
/// The most chunks the decode kernel merges itself (the last block of each group, a lane per
/// chunk); above it attention_decode_combine_f32 merges them.
#define STRATA_ATTN_FOLD_MAX_CHUNKS 32
/// Threads per block of the prefill kernels.
#define STRATA_ATTN_PREFILL_THREADS 256
/// Query tokens per block of the prefill kernels.
#define STRATA_ATTN_PREFILL_QUERIES 64

/// Copies `tokens` rows of keys and values into a paged cache through its block table.
typedef struct {
    /// Token rows to copy.
    unsigned int tokens;
    /// The position of the first row in the sequence (the layer's length before the append).
    unsigned int start;
    /// Tokens per cache block.
    unsigned int block_len;
    /// Floats per token row (n_kv_heads x head_dim).
    unsigned int row;
} KvAppendParams;

/// One query token (position `seq_len - 1`) against the keys `first..seq_len` of a paged cache,
/// split into `n_chunks` chunks of `chunk_len` keys.
typedef struct {
    /// Query heads.
    unsigned int n_heads;
    /// Key/value heads (n_heads is a multiple of it).
    unsigned int n_kv_heads;
    /// Elements per head: a multiple of 4, at most STRATA_ATTN_MAX_HEAD_DIM.
    unsigned int head_dim;
    /// Tokens per cache block.
    unsigned int block_len;
    /// The first visible key position (after the sliding window).
    unsigned int first;
    /// Keys in the cache; the query sits at seq_len - 1.
    unsigned int seq_len;
    /// Keys per chunk (a multiple of key_tile).
    unsigned int chunk_len;
    /// Chunks (blockIdx.x); 1 means the decode kernel writes the output itself, and so does its
    /// last block per group when it is given counters (at most STRATA_ATTN_FOLD_MAX_CHUNKS).
    unsigned int n_chunks;
    /// Query heads per block: min(group, STRATA_ATTN_DECODE_MAX_HEADS).
    unsigned int heads_per_block;
    /// Keys staged in shared memory at a time (at most 32).
    unsigned int key_tile;
    /// Factor on the query-key dot products.
    float scale;
} AttnDecodeParams;

/// `tokens` query tokens at positions `q_pos0..q_pos0 + tokens` against the keys
/// `0..q_pos0 + tokens` of a paged cache, causal, with an optional sliding window.
typedef struct {
    /// Query heads.
    unsigned int n_heads;
    /// Key/value heads (n_heads is a multiple of it).
    unsigned int n_kv_heads;
    /// Elements per head: a multiple of 4, at most the kernel's limit.
    unsigned int head_dim;
    /// Tokens per cache block.
    unsigned int block_len;
    /// Query tokens.
    unsigned int tokens;
    /// The position of the first query (keys before it were cached earlier).
    unsigned int q_pos0;
    /// Sliding window W (a query at i sees keys j with i - j < W); 0 for none.
    unsigned int window;
    /// Factor on the query-key dot products.
    float scale;
} AttnPrefillParams;
