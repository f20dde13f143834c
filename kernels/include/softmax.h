// Launch parameters of kernels/softmax.cu.
#pragma once

/// Row-wise softmax or argmax over `rows` rows of `row_len` contiguous f32.
typedef struct {
    /// Rows.
    unsigned int rows;
    /// Elements per row (> 0).
    unsigned int row_len;
} SoftmaxParams;
