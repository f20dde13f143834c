// Launch parameters and launch-shape constants of kernels/matvec.cu. The launcher
// (strata_kernels::cuda::ops::matvec) sizes the grid and the dynamic shared memory from the same
// constants, and every kernel checks on entry that it was given enough shared memory.
#pragma once

/// Tokens one launch handles: each weight byte is read once per this many tokens.
#define STRATA_MATVEC_MAX_TOKENS 8
/// Warps per thread block.
#define STRATA_MATVEC_WARPS 4
/// Weight rows per warp: each activation value read from shared memory serves this many rows.
#define STRATA_MATVEC_ROWS_PER_WARP 4
/// Depth of each warp's cp.async pipeline of weight chunks (block-quantized dtypes).
#define STRATA_MATVEC_STAGES 3
/// Activation floats staged in shared memory per tile, over all tokens of the launch (a tile is
/// this divided by the kernel's token count, but at least STRATA_MATVEC_XTILE_MIN columns).
#define STRATA_MATVEC_XTILE 4096
/// The smallest activation tile, in columns: a multiple of every chunk below.
#define STRATA_MATVEC_XTILE_MIN 1024
/// Columns of one row a warp streams per pipeline step (block-quantized dtypes), except q8_0.
#define STRATA_MATVEC_CHUNK 1024
/// Columns per pipeline step for q8_0 (two lanes per block).
#define STRATA_MATVEC_CHUNK_Q8_0 512

/// `y[t, r] = sum_c W[r, c] * x[t, c]` for `r < rows`, `t < tokens`.
typedef struct {
    /// Weight rows n (outputs per token).
    unsigned int rows;
    /// Weight columns k (inputs per token).
    unsigned int cols;
    /// Bytes per weight row.
    unsigned long long row_bytes;
    /// Bytes of the whole weight tensor: no read goes past it.
    unsigned long long total_bytes;
    /// Tokens in this launch, at most the kernel's own count (rows of x beyond count as zeros).
    unsigned int tokens;
} MatvecParams;
