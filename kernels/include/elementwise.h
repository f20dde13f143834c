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
