//! ggml `Q6_K`: super-blocks of 256 6-bit values in 16 sub-blocks of 16, each sub-block with a
//! signed 8-bit scale; `x = d * scale * (q - 32)`.
//!
//! Layout (ggml's `block_q6_K`): 128 bytes `ql` of low nibbles, 64 bytes `qh` of high bit pairs,
//! 16 scales, then `d` (f16). Each half `h` of the super-block (elements `128h..128h + 128`) uses
//! `ql[64h..64h + 64]` and `qh[32h..32h + 32]`; for `l` in `0..32`, with `a = ql[64h + l]`,
//! `b = ql[64h + 32 + l]` and `c = qh[32h + l]`, the half's elements are
//! `l`: low(a) | (c bits 0..2) << 4, `l + 32`: low(b) | (c bits 2..4) << 4,
//! `l + 64`: high(a) | (c bits 4..6) << 4, `l + 96`: high(b) | (c bits 6..8) << 4.
//! Element `i` uses `scales[i / 16]`.
//!
//! Quantization follows ggml's approach without copying its code: each sub-block's scale maps its
//! value of largest magnitude to -32 (the end of `-32..=31` with more room), refined by a search
//! over nearby scales weighted by `x^2`; the 16 scales are quantized to 8 bits so that the largest
//! maps to -128, and the values are quantized again with the scales as stored.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::{QK_K, nearest};

/// Elements per sub-block.
const SUB: usize = 16;

/// One `Q6_K` super-block (210 bytes), laid out as ggml's `block_q6_K`.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ6K {
    /// Low 4 bits of the values (see the module documentation for the order).
    pub ql: [u8; QK_K / 2],
    /// High 2 bits of the values, four per byte.
    pub qh: [u8; QK_K / 4],
    /// The scale of each sub-block of 16.
    pub scales: [i8; QK_K / SUB],
    /// The super-block scale.
    pub d: f16,
}

const _: () = assert!(size_of::<BlockQ6K>() == 210);

/// Quantizes `src` (`dst.len()` super-blocks of 256 values).
pub(super) fn quantize(src: &[f32], dst: &mut [BlockQ6K]) {
    for (x, block) in src.chunks_exact(QK_K).zip(dst) {
        let mut scales = [0f32; QK_K / SUB];
        for (j, xs) in x.chunks_exact(SUB).enumerate() {
            scales[j] = fit_sub_block(xs);
        }
        // The scale of largest magnitude, with its sign.
        let max_scale = scales.iter().fold(0f32, |a, &b| if b.abs() > a.abs() { b } else { a });
        *block = BlockQ6K::zeroed();
        if max_scale.abs() < 1e-15 {
            continue;
        }
        let iscale = -128.0 / max_scale;
        block.d = f16::from_f32(1.0 / iscale);
        for (s, &scale) in block.scales.iter_mut().zip(&scales) {
            *s = nearest(iscale * scale).clamp(-128, 127) as i8;
        }

        // Quantize again with the scales exactly as they will be decoded; levels are q - 32.
        let mut q = [32u8; QK_K];
        let d = block.d.to_f32();
        for (j, &s) in block.scales.iter().enumerate() {
            let step = d * f32::from(s);
            if step == 0.0 {
                continue;
            }
            for i in SUB * j..SUB * (j + 1) {
                q[i] = (nearest(x[i] / step).clamp(-32, 31) + 32) as u8;
            }
        }
        for h in 0..2 {
            let (q, ql, qh) = (&q[128 * h..], &mut block.ql[64 * h..], &mut block.qh[32 * h..]);
            for l in 0..32 {
                ql[l] = (q[l] & 0x0f) | ((q[l + 64] & 0x0f) << 4);
                ql[l + 32] = (q[l + 32] & 0x0f) | ((q[l + 96] & 0x0f) << 4);
                qh[l] = (q[l] >> 4) | ((q[l + 32] >> 4) << 2) | ((q[l + 64] >> 4) << 4) | ((q[l + 96] >> 4) << 6);
            }
        }
    }
}

/// Fits one sub-block as `x ~ scale * l` with `l` in `-32..=31`, minimising the squared error
/// weighted by `x^2`. Returns the (signed) scale.
fn fit_sub_block(x: &[f32]) -> f32 {
    let max = x.iter().fold(0f32, |a, &b| if b.abs() > a.abs() { b } else { a });
    if max.abs() < 1e-15 {
        return 0.0;
    }
    let mut best_scale = -max / 32.0;
    let mut best_score = f32::MIN;
    // Each candidate grid maps max to about -32; least squares then picks the scale for the levels
    // it produced, and the candidate explaining most of the weighted energy wins.
    for t in -9..=9 {
        let iscale = -(32.0 + 0.1 * t as f32) / max;
        let (mut sum_xl, mut sum_l2) = (0f32, 0f32);
        for &v in x {
            let l = nearest(iscale * v).clamp(-32, 31) as f32;
            let w = v * v;
            sum_xl += w * v * l;
            sum_l2 += w * l * l;
        }
        if sum_l2 > 0.0 && sum_xl * sum_xl / sum_l2 > best_score {
            best_score = sum_xl * sum_xl / sum_l2;
            best_scale = sum_xl / sum_l2;
        }
    }
    best_scale
}

/// Decodes `src` into `dst` (`256 * src.len()` values) exactly as ggml's `dequantize_row_q6_K`.
pub(super) fn dequantize(src: &[BlockQ6K], dst: &mut [f32]) {
    for (block, y) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = block.d.to_f32();
        for h in 0..2 {
            let (ql, qh, sc) = (&block.ql[64 * h..], &block.qh[32 * h..], &block.scales[8 * h..]);
            let y = &mut y[128 * h..];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = d * f32::from(sc[is]) * q1 as f32;
                y[l + 32] = d * f32::from(sc[is + 2]) * q2 as f32;
                y[l + 64] = d * f32::from(sc[is + 4]) * q3 as f32;
                y[l + 96] = d * f32::from(sc[is + 6]) * q4 as f32;
            }
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
        assert_eq!(std::mem::offset_of!(BlockQ6K, ql), 0);
        assert_eq!(std::mem::offset_of!(BlockQ6K, qh), 128);
        assert_eq!(std::mem::offset_of!(BlockQ6K, scales), 192);
        assert_eq!(std::mem::offset_of!(BlockQ6K, d), 208);
    }

    #[test]
    fn dequantizes_hand_made_block() {
        // ql = 0 and qh = 0 everywhere give q = 0, the value -32 * d * scale; a few bytes differ.
        let mut bytes = vec![0u8; 210];
        // Scales: sub-block j gets j + 1, except sub-block 9 which gets -2.
        for j in 0..16 {
            bytes[192 + j] = (j as i8 + 1) as u8;
        }
        bytes[192 + 9] = (-2i8) as u8;
        bytes[208..].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        // First half, l = 3: ql[3] = 0x5a, ql[35] = 0x1f, qh[3] = 0b10_01_11_00.
        //   element 3   = 0xa | (0b00 << 4) = 10,       sub-block 0 (scale 1)
        //   element 35  = 0xf | (0b11 << 4) = 63,       sub-block 2 (scale 3)
        //   element 67  = 0x5 | (0b01 << 4) = 21,       sub-block 4 (scale 5)
        //   element 99  = 0x1 | (0b10 << 4) = 33,       sub-block 6 (scale 7)
        bytes[3] = 0x5a;
        bytes[35] = 0x1f;
        bytes[128 + 3] = 0b1001_1100;
        // Second half, l = 20: ql[64 + 20] = 0x03, qh[32 + 20] = 0b00_00_00_10.
        //   element 148 = 0x3 | (0b10 << 4) = 35,       sub-block 9 (scale -2)
        //   element 212 = 0x0 | 0 = 0,                  sub-block 13 (scale 14)
        bytes[64 + 20] = 0x03;
        bytes[128 + 32 + 20] = 0b10;
        let mut out = [0f32; 256];
        dequantize_row(DType::Q6K, &bytes, &mut out).unwrap();
        assert_eq!(out[3], 0.5 * 1.0 * (10.0 - 32.0));
        assert_eq!(out[35], 0.5 * 3.0 * (63.0 - 32.0));
        assert_eq!(out[67], 0.5 * 5.0 * (21.0 - 32.0));
        assert_eq!(out[99], 0.5 * 7.0 * (33.0 - 32.0));
        assert_eq!(out[148], 0.5 * -2.0 * (35.0 - 32.0));
        assert_eq!(out[212], 0.5 * 14.0 * -32.0);
        assert_eq!(out[0], 0.5 * 1.0 * -32.0);
        assert_eq!(out[255], 0.5 * 16.0 * -32.0);
    }

    #[test]
    fn all_zero_super_block_is_all_zero_bytes() {
        let mut bytes = [0xffu8; 210];
        quantize_row(DType::Q6K, &[0.0; 256], &mut bytes).unwrap();
        assert!(bytes.iter().all(|b| *b == 0));
    }

    #[test]
    fn round_trip_error_is_bounded() {
        let x = test_util::random_row(5, 256 * 32);
        let mut bytes = vec![0u8; DType::Q6K.bytes_for(x.len()).unwrap()];
        quantize_row(DType::Q6K, &x, &mut bytes).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize_row(DType::Q6K, &bytes, &mut y).unwrap();
        let (mut err2, mut step2) = (0f64, 0f64);
        for (xs, ys) in x.chunks(256).zip(y.chunks(256)) {
            let sb_amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (xb, yb) in xs.chunks(16).zip(ys.chunks(16)) {
                let step = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 32.0;
                // Half a step of rounding, but a full step at the end opposite the maximum (the
                // levels stop at +31), and the search may widen the step to max / 31.1. The 8-bit
                // scale moves the step by at most half of d = sb_amax / 32 / 128, which shifts
                // the 32 levels at the end of the range by sb_amax / 256.
                let bound = step * 32.0 / 31.1 + sb_amax / 256.0 + 1e-6;
                for (a, b) in xb.iter().zip(yb) {
                    assert!((a - b).abs() <= bound, "{a} vs {b}, bound {bound}");
                    err2 += f64::from(a - b).powi(2);
                    step2 += f64::from(step).powi(2);
                }
            }
        }
        let rel_rms = (err2 / step2).sqrt();
        assert!(rel_rms < 0.32, "RMS error {rel_rms} steps");
    }
}
