//! Reference matrix multiplication `y = x W^T`: every row of `W` is dequantized to f32 and
//! multiplied with every row of `x`, products summed in order.

use crate::cpu::matmul::check_matmul;
use crate::{Result, Tensor, quant};

/// Reference for [`crate::cpu::matmul`]: same signature, a plain triple loop over dequantized
/// rows of `w`.
pub fn matmul(x: &[f32], w: &Tensor, y: &mut [f32]) -> Result<()> {
    let (m, n, k) = check_matmul("reference::matmul", x, w, y)?;
    let mut row = vec![0f32; k];
    for j in 0..n {
        quant::dequantize_row(w.dtype(), w.row(j)?, &mut row)?;
        for i in 0..m {
            let mut sum = 0f32;
            for p in 0..k {
                sum += x[i * k + p] * row[p];
            }
            y[i * n + j] = sum;
        }
    }
    Ok(())
}
