// Launch parameters of kernels/convert.cu.
#pragma once

/// Decodes whole rows of a weight tensor to f32: `out[i, :] = row src(i)` for `i < rows`, where
/// `src(i)` is `i` (dequantize) or `ids[i]` (embedding gather).
typedef struct {
    /// Output rows.
    unsigned long long rows;
    /// Elements per row.
    unsigned int cols;
    /// Bytes per source row (a whole number of blocks).
    unsigned long long row_bytes;
    /// Rows of the source tensor: an id at or above it gives a row of NaNs instead of a read.
    unsigned long long vocab;
    /// 1 when `ids` gives the source rows, 0 for the identity (`ids` unused).
    unsigned int gather;
} ConvertParams;
