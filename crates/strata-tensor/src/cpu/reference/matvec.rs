//! Reference matrix-vector product.

use super::{matvec_float, matvec_quant};
use crate::cpu::matvec::check_matvec;
use crate::{DType, Result, Tensor};

/// Reference for [`crate::cpu::matvec`]: same signature, same rounding model (two-digit activation
/// blocks for block-quantized weights), scalar arithmetic.
pub fn matvec(w: &Tensor, x: &[f32], y: &mut [f32]) -> Result<()> {
    let (n, k) = check_matvec("reference::matvec", w, x, y)?;
    let bytes = w.cpu_bytes()?;
    match w.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => matvec_float::matvec_float(w.dtype(), bytes, n, k, x, y),
        _ => matvec_quant::matvec_quant(w.dtype(), bytes, n, k, x, y),
    }
    Ok(())
}
