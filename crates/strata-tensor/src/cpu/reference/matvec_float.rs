//! Reference matrix-vector product for f32, f16 and bf16 weights: each row is converted to f32
//! and its dot product with `x` summed in order, one element at a time.

use crate::DType;

/// `y = W x` for float weights `w` (`n` rows of `k` elements of `dtype`).
pub(crate) fn matvec_float(dtype: DType, w: &[u8], n: usize, k: usize, x: &[f32], y: &mut [f32]) {
    let row_bytes = k * dtype.block_bytes();
    let mut row = vec![0f32; k];
    for (i, out) in y.iter_mut().enumerate().take(n) {
        crate::quant::dequantize_row(dtype, &w[i * row_bytes..(i + 1) * row_bytes], &mut row)
            .expect("the caller checked the dtype and the lengths");
        let mut sum = 0f32;
        for (a, b) in row.iter().zip(x) {
            sum += a * b;
        }
        *out = sum;
    }
}
