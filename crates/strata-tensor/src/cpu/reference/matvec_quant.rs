//! Reference matrix-vector product for block-quantized weights: ggml's integer method with a
//! two-digit activation.
//!
//! `x` is quantized once to blocks of 32 values of two 8-bit digits each ([`ActQ8`]: within one
//! unit `max|x| / 32512` of `x`), then each weight row is combined with it by integer dot products
//! scaled in f32 (`quant::vec_dot` states the formula per dtype). The fast kernels in
//! [`crate::cpu`] compute the same integers and differ only in the order of their float
//! operations.

use crate::DType;
use crate::quant::q8act::ActQ8;
use crate::quant::vec_dot::row_dot;

/// `y = W x` for block-quantized weights `w` (`n` rows of `k` elements of `dtype`).
pub(crate) fn matvec_quant(dtype: DType, w: &[u8], n: usize, k: usize, x: &[f32], y: &mut [f32]) {
    let row_bytes = dtype.bytes_for(k).expect("checked by caller");
    if row_bytes == 0 {
        y.fill(0.0);
        return;
    }
    let act = ActQ8::quantize(x);
    for (row, out) in w.chunks_exact(row_bytes).zip(y.iter_mut()).take(n) {
        *out = row_dot(dtype, row, &act);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::quant::q8act::QK_ACT;
    use crate::quant::test_util::{self, random_weights};

    const QUANT: [DType; 5] = [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4K, DType::Q6K];

    #[test]
    fn hand_computed_q4_0_dot() {
        // One Q4_0 block with d = 0.5: element 0 has q = 10 (value 1.0), element 16 has q = 0
        // (value -4.0), the rest q = 8 (value 0).
        let mut bytes = vec![0x00, 0x38];
        bytes.extend([0x88u8; 16]);
        bytes[2] = 0x0a;
        // x: element 0 = 127 and element 16 = -63.75 give activation values 127 * 256 and
        // -64 * 256 + 64 with unit exactly 1/256, so y = 1.0 * 127 + (-4.0) * (-63.75) = 382
        // exactly.
        let mut x = [0f32; 32];
        x[0] = 127.0;
        x[16] = -63.75;
        let mut y = [0f32];
        matvec_quant(DType::Q4_0, &bytes, 1, 32, &x, &mut y);
        assert_eq!(y[0], 382.0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// The reference equals the float product of the dequantized weights with x, up to the
        /// activation rounding: each activation is off by at most one unit `da` of its block
        /// (`q8act` derives it: half a unit, or one where the low digit was clamped), plus a
        /// relative 1e-4 of a unit from the rounded inverse steps and one f32 rounding of `|x|`
        /// from the residual, so the error is at most the sum over blocks of
        /// `da * (1 + 1e-4) * sum |w|`, plus a relative 1e-5 of `sum |w x|` that also covers the
        /// f32 rounding of the two sums. The 8-bit activation needed `da8 / 2 = 128 * da` here.
        #[test]
        fn reference_is_close_to_float_product(
            dtype in prop::sample::select(QUANT.to_vec()),
            n in 1usize..5,
            blocks in 1usize..5,
            seed in any::<u64>(),
        ) {
            let k = blocks * dtype.block_len();
            let (w, deq) = random_weights(dtype, n, k, seed);
            let x = test_util::random_row(seed ^ 0x5eed, k);
            let act = ActQ8::quantize(&x);
            let mut y = vec![0f32; n];
            matvec_quant(dtype, &w, n, k, &x, &mut y);
            for (r, wr) in deq.chunks(k).enumerate() {
                let exact: f64 = wr.iter().zip(&x).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                let magnitude: f64 = wr.iter().zip(&x).map(|(&a, &b)| f64::from((a * b).abs())).sum();
                let rounding: f64 = wr
                    .chunks(QK_ACT)
                    .zip(&act.d)
                    .map(|(ws, &da)| f64::from(da) * ws.iter().map(|w| f64::from(w.abs())).sum::<f64>())
                    .sum();
                let bound = rounding * (1.0 + 1e-4) + 1e-5 * magnitude + 1e-6;
                prop_assert!(
                    (f64::from(y[r]) - exact).abs() <= bound,
                    "{dtype} row {r}: {} vs {exact}, bound {bound}", y[r]
                );
            }
        }
    }
}
