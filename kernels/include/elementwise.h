// Launch parameters of kernels/elementwise.cu.
#pragma once

/// An element-wise op over `n` elements (every operand has `n`).
typedef struct {
    /// Elements.
    unsigned long long n;
} ElementwiseParams;

/// `y[r, c] += bias[c]` over `rows` rows of `cols`.
typedef struct {
    /// Rows of y.
    unsigned int rows;
    /// Elements per row (the bias's length).
    unsigned int cols;
} AddBiasParams;

/// `dst[r, c] = src[r, col0 + c]` for `r < rows`, `c < cols`: columns col0 .. col0 + cols of a
/// row-major `src` of `src_cols` columns, packed.
typedef struct {
    /// Rows of both.
    unsigned int rows;
    /// Columns of src.
    unsigned int src_cols;
    /// The first column taken.
    unsigned int col0;
    /// Columns taken (dst's).
    unsigned int cols;
} CopyColsParams;

/// A row-wise op over `rows` rows of `cols` floats (gather_rows_f32, scatter_add_rows_f32,
/// add_sigmoid_scaled_f32).
typedef struct {
    /// Rows (of the gathered or scattered side).
    unsigned int rows;
    /// Floats per row.
    unsigned int cols;
} RowsParams;

/// The most slots (experts per token) moe_combine_f32 takes: top-k gating's STRATA_GATING_MAX_K.
#define STRATA_MOE_COMBINE_MAX_SLOTS 32

/// A Mixture-of-Experts block's output from its experts' (moe_combine_f32): per token, the
/// outputs of `slots` slots, each of the expert `ids` names, weighted and added in the order of
/// the experts' indices.
typedef struct {
    /// Tokens (rows of out).
    unsigned int tokens;
    /// Floats per row.
    unsigned int cols;
    /// Slots per token, 1 to STRATA_MOE_COMBINE_MAX_SLOTS.
    unsigned int slots;
    /// The experts: a slot whose id is this or more is unused.
    unsigned int experts;
    /// Nonzero: the sum is added to out (the residual stream); zero: out is the sum.
    unsigned int residual;
} MoeCombineParams;
