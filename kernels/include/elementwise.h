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
