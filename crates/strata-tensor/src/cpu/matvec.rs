//! Decode matrix-vector product `y = W x` for weights of every dtype.

use super::{matvec_float, matvec_quant};
use crate::{DType, Error, Result, Tensor};

/// `y = W x` for a weight `w` of shape `[n, k]` (any dtype), `x` of length `k` and `y` of
/// length `n`. Float weights are converted on the fly; block-quantized weights take `x`
/// quantized per block of 32 as two 8-bit digits (a 16-bit value) and integer dot products, both
/// digits multiplied from the same unpacked weights.
pub fn matvec(w: &Tensor, x: &[f32], y: &mut [f32]) -> Result<()> {
    let (n, k) = check_matvec("matvec", w, x, y)?;
    let bytes = w.cpu_bytes()?;
    match w.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => matvec_float::matvec_float(w.dtype(), bytes, n, k, x, y),
        _ => matvec_quant::matvec_quant(w.dtype(), bytes, n, k, x, y),
    }
    Ok(())
}

/// Checks the operands of a matrix-vector product and returns `(n, k)`.
pub(crate) fn check_matvec(op: &'static str, w: &Tensor, x: &[f32], y: &[f32]) -> Result<(usize, usize)> {
    let dims = w.shape().dims();
    if dims.len() != 2 {
        return Err(Error::InvalidArgument { op, msg: format!("weight must be 2-D [n, k], got shape {}", w.shape()) });
    }
    let (n, k) = (dims[0], dims[1]);
    if x.len() != k {
        return Err(Error::LengthMismatch { op, what: "x", expected: k, got: x.len() });
    }
    if y.len() != n {
        return Err(Error::LengthMismatch { op, what: "y", expected: n, got: y.len() });
    }
    Ok((n, k))
}
