//! Matrix-vector product for block-quantized weights (placeholder: dequantize then dot).

use crate::DType;

/// `y = W x` for block-quantized weights `w` (`n` rows of `k` elements of `dtype`).
pub(crate) fn matvec_quant(dtype: DType, w: &[u8], n: usize, k: usize, x: &[f32], y: &mut [f32]) {
    let row_bytes = dtype.bytes_for(k).expect("checked by caller");
    let mut row = vec![0f32; k];
    for (i, out) in y.iter_mut().enumerate().take(n) {
        crate::quant::dequantize_row(dtype, &w[i * row_bytes..(i + 1) * row_bytes], &mut row)
            .expect("checked by caller");
        *out = row.iter().zip(x).map(|(a, b)| a * b).sum();
    }
}
