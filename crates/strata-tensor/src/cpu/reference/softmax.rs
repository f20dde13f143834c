//! Reference softmax over rows and argmax, plus the scalar helpers other references share
//! (a pairwise f32 sum and a one-row softmax).

use crate::Result;
use crate::cpu::softmax::check_softmax;

/// Reference for [`crate::cpu::softmax`]: per row, subtract the maximum, exponentiate, divide by
/// the sum (as a multiplication by its reciprocal, like torch's CPU kernel).
pub fn softmax(x: &mut [f32], row_len: usize) -> Result<()> {
    check_softmax("reference::softmax", x.len(), row_len)?;
    if row_len == 0 {
        return Ok(());
    }
    for row in x.chunks_exact_mut(row_len) {
        softmax_row(row);
    }
    Ok(())
}

/// Reference for [`crate::cpu::argmax`]: the first index of the maximum, `None` for an empty
/// slice. NaN counts as larger than every number, as in `torch.argmax`: if any element is NaN,
/// the index of the first NaN is returned.
pub fn argmax(x: &[f32]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &v) in x.iter().enumerate() {
        if v.is_nan() {
            return Some(i);
        }
        match best {
            Some(b) if v <= x[b] => {}
            _ => best = Some(i),
        }
    }
    best
}

/// Softmax of one row in place, in f32: maximum (NaNs ignored), `exp(x - max)`, pairwise sum,
/// multiplication by the reciprocal of the sum. A row containing NaN becomes all NaN; so does a
/// row whose elements are all `-inf`.
pub(crate) fn softmax_row(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for v in row.iter_mut() {
        *v = (*v - max).exp();
    }
    let inv = 1.0 / pairwise_sum(row);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// The sum of `x` in f32 by recursive halving: the rounding error grows with `log2(len)` rather
/// than `len`, close to torch's cascaded reductions.
pub(crate) fn pairwise_sum(x: &[f32]) -> f32 {
    if x.len() <= 8 {
        x.iter().sum()
    } else {
        let (a, b) = x.split_at(x.len() / 2);
        pairwise_sum(a) + pairwise_sum(b)
    }
}
