//! ggml `Q8_0`: blocks of 32 signed 8-bit values sharing one f16 scale, `x = d * q`.
//!
//! Quantization is ggml's reference `quantize_row_q8_0_ref`: `d = max|x| / 127` and
//! `q = round(x / d)` (half away from zero), so a GGUF file written by ggml and a row quantized
//! here hold the same bytes.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::QK;

/// One `Q8_0` block (34 bytes), laid out as ggml's `block_q8_0`.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ8_0 {
    /// The scale.
    pub d: f16,
    /// The quantized values, element `i` in `qs[i]`.
    pub qs: [i8; QK],
}

const _: () = assert!(size_of::<BlockQ8_0>() == 34);

/// Quantizes `src` (`dst.len()` blocks of 32 values) with ggml's reference rounding.
pub(super) fn quantize(src: &[f32], dst: &mut [BlockQ8_0]) {
    for (x, block) in src.chunks_exact(QK).zip(dst) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block.d = f16::from_f32(d);
        for (q, v) in block.qs.iter_mut().zip(x) {
            *q = (v * id).round() as i8;
        }
    }
}

/// Decodes `src` into `dst` (`32 * src.len()` values): `d * q`, as ggml's `dequantize_row_q8_0`.
pub(super) fn dequantize(src: &[BlockQ8_0], dst: &mut [f32]) {
    for (block, y) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = block.d.to_f32();
        for (out, q) in y.iter_mut().zip(block.qs) {
            *out = f32::from(q) * d;
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
        assert_eq!(std::mem::offset_of!(BlockQ8_0, d), 0);
        assert_eq!(std::mem::offset_of!(BlockQ8_0, qs), 2);
    }

    #[test]
    fn dequantizes_hand_made_block() {
        // d = 0.5 is f16 0x3800, stored little-endian; then qs[i] = i - 16.
        let mut bytes = vec![0x00, 0x38];
        bytes.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut out = [0f32; 32];
        dequantize_row(DType::Q8_0, &bytes, &mut out).unwrap();
        assert_eq!(out[0], -8.0);
        assert_eq!(out[15], -0.5);
        assert_eq!(out[16], 0.0);
        assert_eq!(out[31], 7.5);
    }

    #[test]
    fn quantizes_hand_chosen_row_to_exact_bytes() {
        // max|x| = 12.7, so d = 0.1 and x / d rounds half away from zero.
        let mut x = [0f32; 32];
        x[0] = 12.7;
        x[1] = -12.7;
        x[2] = 0.25; // 2.5 -> 3
        x[3] = -0.25; // -2.5 -> -3
        x[4] = 0.04; // 0.4 -> 0
        x[5] = 1.0; // 10
        let mut bytes = [0u8; 34];
        quantize_row(DType::Q8_0, &x, &mut bytes).unwrap();
        let d = f16::from_f32(12.7 / 127.0);
        assert_eq!(&bytes[..2], &d.to_le_bytes());
        let qs: Vec<i8> = bytes[2..].iter().map(|b| *b as i8).collect();
        assert_eq!(&qs[..6], &[127, -127, 3, -3, 0, 10]);
        assert!(qs[6..].iter().all(|q| *q == 0));
    }

    #[test]
    fn all_zero_block_has_zero_scale() {
        let mut bytes = [0xffu8; 34];
        quantize_row(DType::Q8_0, &[0.0; 32], &mut bytes).unwrap();
        assert!(bytes.iter().all(|b| *b == 0));
    }

    #[test]
    fn round_trip_error_is_within_half_a_step() {
        let x = test_util::random_row(1, 32 * 64);
        let mut bytes = vec![0u8; DType::Q8_0.bytes_for(x.len()).unwrap()];
        quantize_row(DType::Q8_0, &x, &mut bytes).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize_row(DType::Q8_0, &bytes, &mut y).unwrap();
        for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let step = amax / 127.0;
            // Half a step of rounding, plus the f16 rounding of d (relative 2^-11) times |q| <= 127.
            let bound = step * (0.5 + 127.0 / 2048.0) + 1e-7;
            for (a, b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= bound, "{a} vs {b}, bound {bound}");
            }
        }
    }
}
