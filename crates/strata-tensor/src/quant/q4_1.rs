//! ggml `Q4_1`: blocks of 32 unsigned 4-bit values with an f16 scale and an f16 minimum,
//! `x = q * d + m`.
//!
//! Byte `j` of `qs` holds element `j` in its low nibble and element `j + 16` in its high nibble.
//! Quantization is ggml's reference `quantize_row_q4_1_ref`: `m = min`, `d = (max - min) / 15`,
//! `q = min(15, trunc((x - min) / d + 0.5))`.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::QK;

/// One `Q4_1` block (20 bytes), laid out as ggml's `block_q4_1`.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ4_1 {
    /// The scale.
    pub d: f16,
    /// The minimum, added to every element.
    pub m: f16,
    /// Nibbles: element `j` in the low half of `qs[j]`, element `j + 16` in the high half.
    pub qs: [u8; QK / 2],
}

const _: () = assert!(size_of::<BlockQ4_1>() == 20);

/// Quantizes `src` (`dst.len()` blocks of 32 values) with ggml's reference rounding.
pub(super) fn quantize(src: &[f32], dst: &mut [BlockQ4_1]) {
    for (x, block) in src.chunks_exact(QK).zip(dst) {
        let (mut min, mut max) = (f32::MAX, -f32::MAX);
        for &v in x {
            if v < min {
                min = v;
            }
            if v > max {
                max = v;
            }
        }
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block.d = f16::from_f32(d);
        block.m = f16::from_f32(min);
        let quant = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
        for j in 0..QK / 2 {
            block.qs[j] = quant(x[j]) | (quant(x[j + QK / 2]) << 4);
        }
    }
}

/// Decodes `src` into `dst` (`32 * src.len()` values) exactly as ggml's `dequantize_row_q4_1`.
pub(super) fn dequantize(src: &[BlockQ4_1], dst: &mut [f32]) {
    for (block, y) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let (d, m) = (block.d.to_f32(), block.m.to_f32());
        for (j, &q) in block.qs.iter().enumerate() {
            y[j] = (q & 0x0f) as f32 * d + m;
            y[j + QK / 2] = (q >> 4) as f32 * d + m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;
    use crate::quant::{dequantize_row, quantize_row, test_util};

    #[test]
    fn layout_matches_ggml() {
        assert_eq!(std::mem::offset_of!(BlockQ4_1, d), 0);
        assert_eq!(std::mem::offset_of!(BlockQ4_1, m), 2);
        assert_eq!(std::mem::offset_of!(BlockQ4_1, qs), 4);
    }

    #[test]
    fn dequantizes_hand_made_block() {
        // d = 0.25 (f16 0x3400), m = -1.0 (f16 0xbc00). Byte 3 = 0xf2: element 3 = 2 * 0.25 - 1
        // = -0.5, element 19 = 15 * 0.25 - 1 = 2.75. Other bytes zero: -1.0.
        let mut bytes = vec![0x00, 0x34, 0x00, 0xbc];
        bytes.extend([0u8; 16]);
        bytes[4 + 3] = 0xf2;
        let mut out = [0f32; 32];
        dequantize_row(DType::Q4_1, &bytes, &mut out).unwrap();
        let mut expected = [-1.0f32; 32];
        expected[3] = -0.5;
        expected[19] = 2.75;
        assert_eq!(out, expected);
    }

    #[test]
    fn quantizes_hand_chosen_row_to_exact_bytes() {
        // min = -1, max = 2, so d = 0.2 and q = trunc((x + 1) * 5 + 0.5).
        let mut x = [0.0f32; 32];
        x[0] = -1.0; // 0
        x[1] = 2.0; // 15
        x[2] = 0.25; // 6.25 + 0.5 -> 6
        x[16] = 0.35; // 6.75 + 0.5 -> 7
        x[17] = -0.95; // 0.25 + 0.5 -> 0
        // Every other element is 0.0: 5 + 0.5 -> 5.
        let mut bytes = [0u8; 20];
        quantize_row(DType::Q4_1, &x, &mut bytes).unwrap();
        assert_eq!(&bytes[..2], &f16::from_f32(0.2).to_le_bytes());
        assert_eq!(&bytes[2..4], &f16::from_f32(-1.0).to_le_bytes());
        let mut expected = [0x55u8; 16];
        expected[0] = 7 << 4; // Elements 0 and 16.
        expected[1] = 15; // Elements 1 and 17.
        expected[2] = 6 | (5 << 4);
        assert_eq!(&bytes[4..], &expected);
    }

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let x = test_util::random_row(3, 32 * 64);
        let mut bytes = vec![0u8; DType::Q4_1.bytes_for(x.len()).unwrap()];
        quantize_row(DType::Q4_1, &x, &mut bytes).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize_row(DType::Q4_1, &bytes, &mut y).unwrap();
        for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
            let min = xb.iter().fold(f32::MAX, |m, v| m.min(*v));
            let max = xb.iter().fold(f32::MIN, |m, v| m.max(*v));
            let step = (max - min) / 15.0;
            // Half a step, plus the f16 rounding (relative 2^-11) of d times q <= 15 and of m.
            let bound = step * (0.5 + 15.0 / 2048.0) + min.abs() / 2048.0 + 1e-6;
            for (a, b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= bound, "{a} vs {b}, bound {bound}");
            }
        }
    }
}
