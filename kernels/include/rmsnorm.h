// Launch parameters of kernels/rmsnorm.cu.
#pragma once

/// Columns an RMSNorm row may have (norm.cuh keeps one float of shared memory per 128).
#define STRATA_NORM_MAX_COLS 65536

/// `out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w[:]` over `rows` rows of `cols`.
typedef struct {
    /// Rows (tokens, or tokens x heads for per-head norms).
    unsigned int rows;
    /// Elements per row (the weight's length).
    unsigned int cols;
    /// Added to the mean square.
    float eps;
} RmsNormParams;
