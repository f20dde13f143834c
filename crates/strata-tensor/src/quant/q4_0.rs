//! ggml `Q4_0`: blocks of 32 unsigned 4-bit values with offset 8 and one f16 scale,
//! `x = (q - 8) * d`.
//!
//! Byte `j` of `qs` holds element `j` in its low nibble and element `j + 16` in its high nibble.
//! Quantization is ggml's reference `quantize_row_q4_0_ref`: the value of largest magnitude
//! (with its sign) maps to -8, `d = max / -8`, and `q = min(15, trunc(x / d + 8.5))`.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::QK;

/// One `Q4_0` block (18 bytes), laid out as ggml's `block_q4_0`.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ4_0 {
    /// The scale.
    pub d: f16,
    /// Nibbles: element `j` in the low half of `qs[j]`, element `j + 16` in the high half.
    pub qs: [u8; QK / 2],
}

const _: () = assert!(size_of::<BlockQ4_0>() == 18);

/// Quantizes `src` (`dst.len()` blocks of 32 values) with ggml's reference rounding.
pub(super) fn quantize(src: &[f32], dst: &mut [BlockQ4_0]) {
    for (x, block) in src.chunks_exact(QK).zip(dst) {
        // The signed value of largest magnitude; the first one wins ties, as in ggml.
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in x {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block.d = f16::from_f32(d);
        let quant = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
        for j in 0..QK / 2 {
            block.qs[j] = quant(x[j]) | (quant(x[j + QK / 2]) << 4);
        }
    }
}

/// Decodes `src` into `dst` (`32 * src.len()` values) exactly as ggml's `dequantize_row_q4_0`.
pub(super) fn dequantize(src: &[BlockQ4_0], dst: &mut [f32]) {
    for (block, y) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = block.d.to_f32();
        for (j, &q) in block.qs.iter().enumerate() {
            y[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
            y[j + QK / 2] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Bytes of one `Q4_0` block.
const BLOCK_BYTES: usize = size_of::<BlockQ4_0>();

/// Rewrites one row of `Q4_0` blocks `src` into the interleaved row layout of
/// `cpu::RepackedWeight`, `dst` (the same length): with `G` whole groups of four blocks, first the
/// `16 * 4` nibble bytes of each group (block `4g + b`'s 16 bytes at `64 * g + 16 * b`), then the
/// `4 * G` f16 scales in block order (at `64 * G`), then the remaining blocks unchanged (at
/// `72 * G`, which is their offset in `src`).
pub(crate) fn repack_row(src: &[u8], dst: &mut [u8]) {
    debug_assert!(src.len() == dst.len() && src.len().is_multiple_of(BLOCK_BYTES));
    let groups = src.len() / BLOCK_BYTES / 4;
    let scales_at = 64 * groups;
    for (b, block) in src[..72 * groups].chunks_exact(BLOCK_BYTES).enumerate() {
        dst[scales_at + 2 * b..scales_at + 2 * b + 2].copy_from_slice(&block[..2]);
        dst[16 * b..16 * b + 16].copy_from_slice(&block[2..]);
    }
    dst[72 * groups..].copy_from_slice(&src[72 * groups..]);
}

/// Writes blocks `first..first + dst.len() / 18` of the repacked row `row` (a whole row, as
/// [`repack_row`] wrote it) into `dst` as `Q4_0` blocks.
pub(crate) fn unpack_blocks(row: &[u8], first: usize, dst: &mut [u8]) {
    debug_assert!(row.len().is_multiple_of(BLOCK_BYTES) && dst.len().is_multiple_of(BLOCK_BYTES));
    let groups = row.len() / BLOCK_BYTES / 4;
    let scales_at = 64 * groups;
    for (b, block) in (first..).zip(dst.chunks_exact_mut(BLOCK_BYTES)) {
        if b < 4 * groups {
            block[..2].copy_from_slice(&row[scales_at + 2 * b..scales_at + 2 * b + 2]);
            block[2..].copy_from_slice(&row[16 * b..16 * b + 16]);
        } else {
            block.copy_from_slice(&row[BLOCK_BYTES * b..BLOCK_BYTES * (b + 1)]);
        }
    }
}

/// The inverse of [`repack_row`]: the `Q4_0` blocks of a repacked row.
pub(crate) fn unpack_row(src: &[u8], dst: &mut [u8]) {
    debug_assert!(src.len() == dst.len() && src.len().is_multiple_of(BLOCK_BYTES));
    let groups = src.len() / BLOCK_BYTES / 4;
    let scales_at = 64 * groups;
    for (b, block) in dst[..72 * groups].chunks_exact_mut(BLOCK_BYTES).enumerate() {
        block[..2].copy_from_slice(&src[scales_at + 2 * b..scales_at + 2 * b + 2]);
        block[2..].copy_from_slice(&src[16 * b..16 * b + 16]);
    }
    dst[72 * groups..].copy_from_slice(&src[72 * groups..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;
    use crate::quant::{dequantize_row, quantize_row, test_util};

    #[test]
    fn layout_matches_ggml() {
        assert_eq!(std::mem::offset_of!(BlockQ4_0, d), 0);
        assert_eq!(std::mem::offset_of!(BlockQ4_0, qs), 2);
    }

    #[test]
    fn dequantizes_hand_made_block() {
        // d = 2.0 (f16 0x4000). Byte 0 = 0x9f: element 0 = 15 - 8 = 7, element 16 = 9 - 8 = 1.
        // Byte 5 = 0x08: element 5 = 0, element 21 = -8. Other bytes 0x88: zeros.
        let mut bytes = vec![0x00, 0x40];
        bytes.extend([0x88u8; 16]);
        bytes[2] = 0x9f;
        bytes[2 + 5] = 0x08;
        let mut out = [0f32; 32];
        dequantize_row(DType::Q4_0, &bytes, &mut out).unwrap();
        let mut expected = [0f32; 32];
        expected[0] = 14.0;
        expected[16] = 2.0;
        expected[21] = -16.0;
        assert_eq!(out, expected);
    }

    #[test]
    fn quantizes_hand_chosen_row_to_exact_bytes() {
        // The largest magnitude is -4.0 (negative), so d = 0.5 and q = trunc(x / 0.5 + 8.5).
        let mut x = [0f32; 32];
        x[0] = -4.0; // -8 + 8.5 = 0.5 -> 0
        x[1] = 3.5; // 7 + 8.5 = 15.5 -> 15
        x[2] = 0.74; // 1.48 + 8.5 = 9.98 -> 9
        x[16] = 4.0; // 16.5 -> 16, clamped to 15
        x[17] = -0.3; // -0.6 + 8.5 = 7.9 -> 7
        let mut bytes = [0u8; 18];
        quantize_row(DType::Q4_0, &x, &mut bytes).unwrap();
        assert_eq!(&bytes[..2], &f16::from_f32(0.5).to_le_bytes());
        let mut expected = [0x88u8; 16];
        expected[0] = 15 << 4; // Elements 0 and 16.
        expected[1] = 15 | (7 << 4);
        expected[2] = 9 | (8 << 4);
        assert_eq!(&bytes[2..], &expected);
    }

    #[test]
    fn round_trip_error_is_within_one_step() {
        let x = test_util::random_row(2, 32 * 64);
        let mut bytes = vec![0u8; DType::Q4_0.bytes_for(x.len()).unwrap()];
        quantize_row(DType::Q4_0, &x, &mut bytes).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize_row(DType::Q4_0, &bytes, &mut y).unwrap();
        for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
            let step = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 8.0;
            // Half a step of rounding, except at the end opposite the maximum, where 8 steps are
            // clamped to 7: a full step. Plus the f16 rounding of d times |q - 8| <= 8.
            let bound = step * (1.0 + 8.0 / 2048.0) + 1e-7;
            for (a, b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= bound, "{a} vs {b}, bound {bound}");
            }
        }
    }

    #[test]
    fn repacked_row_layout_and_round_trip() {
        // Nine blocks: two whole groups of four and a tail block, with every byte distinct enough
        // to locate it.
        let src: Vec<u8> = (0..9 * 18).map(|i| (i * 7 + 3) as u8).collect();
        let mut packed = vec![0u8; src.len()];
        repack_row(&src, &mut packed);
        for b in 0..8 {
            assert_eq!(&packed[16 * b..16 * b + 16], &src[18 * b + 2..18 * b + 18], "nibbles of block {b}");
            assert_eq!(&packed[128 + 2 * b..128 + 2 * b + 2], &src[18 * b..18 * b + 2], "scale of block {b}");
        }
        assert_eq!(&packed[144..], &src[144..], "the tail block");
        let mut back = vec![0u8; src.len()];
        unpack_row(&packed, &mut back);
        assert_eq!(back, src);
        // Any run of blocks, inside the groups, across their end, and in the tail.
        for (first, count) in [(0, 9), (1, 3), (6, 3), (8, 1), (3, 2)] {
            let mut part = vec![0u8; 18 * count];
            unpack_blocks(&packed, first, &mut part);
            assert_eq!(part, &src[18 * first..18 * (first + count)], "blocks {first}..+{count}");
        }
        // A row shorter than a group is unchanged.
        let mut short = vec![0u8; 54];
        repack_row(&src[..54], &mut short);
        assert_eq!(short, &src[..54]);
    }
}
