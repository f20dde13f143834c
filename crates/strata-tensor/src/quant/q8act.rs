//! 8-bit quantization of the activation vector for the quantized matrix-vector product.
//!
//! Like ggml, strata multiplies block-quantized weights with an activation quantized to 8 bits, so
//! the inner products are integer dot products. The format is internal: `x` is cut into blocks of
//! 32, each with an f32 scale `d = max|x| / 127`, values `q = round(x * 127 / max|x|)` (ties to
//! even) in `-127..=127` (never -128, so a sign flip cannot overflow), and the sum of the block's
//! values, which the kernels need to undo the weights' offsets and minimums. The reference and the
//! fast kernels call the same function, so they see identical integers and differ only in the
//! order of their float additions.

/// Elements per activation block.
pub(crate) const QK_ACT: usize = 32;

/// An activation vector quantized to 8-bit blocks of 32.
#[derive(Clone, Debug)]
pub(crate) struct ActQ8 {
    /// The quantized values, in the order of `x`.
    pub qs: Vec<i8>,
    /// The scale of each block.
    pub d: Vec<f32>,
    /// The sum of each block's quantized values.
    pub sum: Vec<i32>,
}

impl ActQ8 {
    /// Quantizes `x`, whose length must be a multiple of 32 (every quantized dtype's block length
    /// is, and the callers check it).
    pub fn quantize(x: &[f32]) -> ActQ8 {
        debug_assert_eq!(x.len() % QK_ACT, 0);
        let blocks = x.len() / QK_ACT;
        let mut act = ActQ8 { qs: vec![0; x.len()], d: vec![0.0; blocks], sum: vec![0; blocks] };
        for (b, (xs, qs)) in x.chunks_exact(QK_ACT).zip(act.qs.chunks_exact_mut(QK_ACT)).enumerate() {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qs.iter_mut().zip(xs) {
                let r = round_ties_even(v * id).clamp(-127.0, 127.0) as i8;
                *q = r;
                sum += i32::from(r);
            }
            act.d[b] = amax / 127.0;
            act.sum[b] = sum;
        }
        act
    }

    /// The dequantized activation `d * q`, for tests.
    #[cfg(test)]
    pub fn dequantized(&self) -> Vec<f32> {
        self.qs
            .chunks_exact(QK_ACT)
            .zip(&self.d)
            .flat_map(|(qs, &d)| qs.iter().map(move |&q| d * f32::from(q)))
            .collect()
    }
}

/// Rounds `v` (|v| <= 2^22) to the nearest integer, ties to even. Adding and removing 1.5 * 2^23
/// leaves no fraction bits, and the default rounding mode is to nearest even; unlike
/// `f32::round_ties_even` this needs no SSE4.1 and vectorizes.
fn round_ties_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantizes_hand_chosen_block() {
        // max|x| = 127, so the scale is exactly 1 and the values round directly.
        let mut x = [0f32; 64];
        x[0] = 127.0;
        x[1] = -63.5; // -64 (ties to even)
        x[2] = 1.5; // 2
        x[3] = 2.5; // 2
        x[4] = -127.0;
        x[5] = 0.49; // 0
        let act = ActQ8::quantize(&x);
        assert_eq!(&act.qs[..5], &[127, -64, 2, 2, -127]);
        assert!(act.qs[5..].iter().all(|q| *q == 0));
        assert_eq!(act.d, vec![1.0, 0.0]);
        assert_eq!(act.sum, vec![127 - 64 + 2 + 2 - 127, 0]);
    }

    #[test]
    fn rounding_matches_round_ties_even() {
        for i in -2540..=2540 {
            let v = i as f32 * 0.05;
            assert_eq!(round_ties_even(v), v.round_ties_even(), "{v}");
        }
    }

    #[test]
    fn dequantized_is_within_half_a_step() {
        let x = crate::quant::test_util::random_row(9, 32 * 16);
        let act = ActQ8::quantize(&x);
        for ((xs, ys), d) in x.chunks(32).zip(act.dequantized().chunks(32)).zip(&act.d) {
            for (a, b) in xs.iter().zip(ys) {
                assert!((a - b).abs() <= d * 0.5001 + 1e-12, "{a} vs {b}");
            }
        }
    }
}
