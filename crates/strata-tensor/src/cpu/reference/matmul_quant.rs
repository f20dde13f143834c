//! Reference quantized matrix multiplication: the reference two-digit matrix-vector product, one
//! row of `x` at a time.

use super::matvec_quant::matvec_quant;
use crate::cpu::matmul::check_matmul;
use crate::{Error, Result, Tensor};

/// Reference for [`crate::cpu::matmul_quantized`]: same signature; each row of `y` is the
/// reference `matvec` of the same row of `x` (quantized to two-digit blocks, scalar integer dot
/// products).
pub fn matmul_quantized(x: &[f32], w: &Tensor, y: &mut [f32]) -> Result<()> {
    let op = "reference::matmul_quantized";
    let (m, n, k) = check_matmul(op, x, w, y)?;
    if !w.dtype().is_quantized() {
        return Err(Error::UnsupportedDType { op, dtype: w.dtype() });
    }
    let bytes = w.cpu_bytes()?;
    for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)).take(m) {
        matvec_quant(w.dtype(), bytes, n, k, xr, yr);
    }
    Ok(())
}
