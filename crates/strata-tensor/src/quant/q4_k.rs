//! ggml `Q4_K`: super-blocks of 256 unsigned 4-bit values in 8 sub-blocks of 32, each sub-block
//! with a 6-bit scale `sc` and a 6-bit minimum `m`; `x = d * sc * q - dmin * m`.
//!
//! Layout (ggml's `block_q4_K`): `d` and `dmin` (f16), then 12 bytes packing the eight 6-bit
//! scales and eight 6-bit mins (ggml's `get_scale_min_k4`: sub-blocks 0..4 in the low 6 bits of
//! bytes 0..4 and 4..8; sub-blocks 4..8 in the nibbles of bytes 8..12 with their top 2 bits in
//! the top bits of bytes 0..8), then 128 bytes of nibbles. Byte `32 * c + l` of `qs` holds element
//! `64 * c + l` (sub-block `2c`) in its low nibble and element `64 * c + 32 + l` (sub-block `2c + 1`)
//! in its high nibble.
//!
//! Quantization follows ggml's approach without copying its code: each sub-block gets a scale and
//! minimum from a small search (a grid of candidate step sizes, each refined by a weighted least-
//! squares fit of `scale * q + offset`, weights `rms + |x|`), the 16 results are quantized to 6
//! bits against the super-block's largest scale and largest minimum, and the values are quantized
//! again with the scales as stored.

use bytemuck::{Pod, Zeroable};
use half::f16;

use super::{QK_K, nearest};

/// Elements per sub-block.
const SUB: usize = 32;

/// One `Q4_K` super-block (144 bytes), laid out as ggml's `block_q4_K`.
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ4K {
    /// The super-block scale of the 6-bit sub-block scales.
    pub d: f16,
    /// The super-block scale of the 6-bit sub-block minimums.
    pub dmin: f16,
    /// Eight 6-bit scales and eight 6-bit minimums, packed as ggml's `get_scale_min_k4` reads them.
    pub scales: [u8; 12],
    /// Nibbles: byte `32c + l` holds element `64c + l` (low) and element `64c + 32 + l` (high).
    pub qs: [u8; QK_K / 2],
}

const _: () = assert!(size_of::<BlockQ4K>() == 144);

/// The 6-bit scales and minimums of the eight sub-blocks, as ggml's `get_scale_min_k4`.
pub(crate) fn unpack_scales_mins(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0f) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, m)
}

/// The inverse of [`unpack_scales_mins`] for values below 64.
fn pack_scales_mins(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4);
    }
    s
}

/// Quantizes `src` (`dst.len()` super-blocks of 256 values).
pub(super) fn quantize(src: &[f32], dst: &mut [BlockQ4K]) {
    for (x, block) in src.chunks_exact(QK_K).zip(dst) {
        let mut scales = [0f32; 8];
        let mut mins = [0f32; 8];
        for (j, xs) in x.chunks_exact(SUB).enumerate() {
            (scales[j], mins[j]) = fit_sub_block(xs);
        }
        let max_scale = scales.iter().fold(0f32, |a, &b| a.max(b));
        let max_min = mins.iter().fold(0f32, |a, &b| a.max(b));
        let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
        let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
        let mut ls = [0u8; 8];
        let mut lm = [0u8; 8];
        for j in 0..8 {
            ls[j] = nearest(inv_scale * scales[j]).clamp(0, 63) as u8;
            lm[j] = nearest(inv_min * mins[j]).clamp(0, 63) as u8;
        }
        block.d = f16::from_f32(max_scale / 63.0);
        block.dmin = f16::from_f32(max_min / 63.0);
        block.scales = pack_scales_mins(&ls, &lm);

        // Quantize again with the scales and minimums exactly as they will be decoded.
        let mut q = [0u8; QK_K];
        let (d, dmin) = (block.d.to_f32(), block.dmin.to_f32());
        for j in 0..8 {
            let step = d * f32::from(ls[j]);
            if step == 0.0 {
                continue;
            }
            let offset = dmin * f32::from(lm[j]);
            for i in SUB * j..SUB * (j + 1) {
                q[i] = nearest((x[i] + offset) / step).clamp(0, 15) as u8;
            }
        }
        for c in 0..4 {
            for l in 0..32 {
                block.qs[32 * c + l] = q[64 * c + l] | (q[64 * c + 32 + l] << 4);
            }
        }
    }
}

/// Fits one sub-block as `x ~ scale * q - min` with `q` in `0..=15`, `scale >= 0`, `min >= 0`,
/// minimising the squared error weighted by `rms(x) + |x_i|` (larger values matter more). Returns
/// `(scale, min)`.
fn fit_sub_block(x: &[f32]) -> (f32, f32) {
    let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
    let w: Vec<f32> = x.iter().map(|v| rms + v.abs()).collect();
    // The offset is at most 0 (a non-negative minimum), so the grid starts at min(x, 0).
    let lo = x.iter().fold(0f32, |a, &b| a.min(b));
    let hi = x.iter().fold(f32::MIN, |a, &b| a.max(b));
    if hi <= lo {
        return (0.0, -lo);
    }
    let error = |scale: f32, offset: f32, levels: &[u8]| -> f32 {
        levels.iter().zip(x).zip(&w).map(|((&l, &v), &wi)| wi * (scale * f32::from(l) + offset - v).powi(2)).sum()
    };
    let levels_for =
        |iscale: f32| -> Vec<u8> { x.iter().map(|&v| nearest(iscale * (v - lo)).clamp(0, 15) as u8).collect() };

    let mut best_scale = (hi - lo) / 15.0;
    let mut best_offset = lo;
    let mut best_error = error(best_scale, best_offset, &levels_for(1.0 / best_scale));
    let sum_w: f32 = w.iter().sum();
    let sum_wx: f32 = w.iter().zip(x).map(|(wi, v)| wi * v).sum();
    // Candidate grids put between 14 and 16 steps across the range, then least squares picks
    // the best scale and offset for the levels each grid produced.
    for step in 0..=20 {
        let iscale = (14.0 + 0.1 * step as f32) / (hi - lo);
        let levels = levels_for(iscale);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for ((&l, &v), &wi) in levels.iter().zip(x).zip(&w) {
            let l = f32::from(l);
            sum_l += wi * l;
            sum_l2 += wi * l * l;
            sum_xl += wi * l * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det <= 0.0 {
            continue;
        }
        let mut scale = (sum_w * sum_xl - sum_wx * sum_l) / det;
        let mut offset = (sum_l2 * sum_wx - sum_l * sum_xl) / det;
        if offset > 0.0 {
            offset = 0.0;
            scale = sum_xl / sum_l2;
        }
        let err = error(scale, offset, &levels);
        if err < best_error && scale > 0.0 {
            (best_scale, best_offset, best_error) = (scale, offset, err);
        }
    }
    (best_scale, -best_offset)
}

/// Decodes `src` into `dst` (`256 * src.len()` values) exactly as ggml's `dequantize_row_q4_K`.
pub(super) fn dequantize(src: &[BlockQ4K], dst: &mut [f32]) {
    for (block, y) in src.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (block.d.to_f32(), block.dmin.to_f32());
        let (sc, m) = unpack_scales_mins(&block.scales);
        for c in 0..4 {
            let (d1, m1) = (d * f32::from(sc[2 * c]), dmin * f32::from(m[2 * c]));
            let (d2, m2) = (d * f32::from(sc[2 * c + 1]), dmin * f32::from(m[2 * c + 1]));
            for l in 0..32 {
                let q = block.qs[32 * c + l];
                y[64 * c + l] = d1 * f32::from(q & 0x0f) - m1;
                y[64 * c + 32 + l] = d2 * f32::from(q >> 4) - m2;
            }
        }
    }
}

/// The nibble of a super-block's original `qs` that slot `slot` (0..256) of its repacked `qs`
/// holds, as `2 * byte + nibble`, for the repacked layout of `cpu::RepackedWeight`.
///
/// A repacked slot is nibble `j'` (`slot / 64 % 2`) of byte `b` (`slot % 64`) of half `h'`
/// (`slot / 128`), so that the AVX-512 decode kernel's four nibble registers (low and high nibbles
/// of each 64-byte half) can be summed lane by lane with no shuffles: 32-bit lane `m = b / 4` of
/// all four registers holds the 16 nibbles that the original layout's kernel sums into lane `m`
/// of its reduced dot product, namely nibble `p % 2` of the 16 bytes `64 * (p / 2) + 16 * L..` for
/// `m = 4L + p`. Within a lane, the nibbles go in the order `8h' + 4j' + t` (`t = b % 4`).
pub(crate) const fn packed_source(slot: usize) -> usize {
    let (h2, j2, b) = (slot / 128, slot / 64 % 2, slot % 64);
    let (m, t) = (b / 4, b % 4);
    let (l, p) = (m / 4, m % 4);
    let byte = 64 * (p / 2) + 16 * l + 8 * h2 + 4 * j2 + t;
    2 * byte + p % 2
}

/// The element (0..256) of a super-block that original nibble `2 * byte + nibble` holds.
pub(crate) const fn nibble_element(source: usize) -> usize {
    let (byte, nibble) = (source / 2, source % 2);
    SUB * (2 * (byte / SUB) + nibble) + byte % SUB
}

/// For each repacked slot, the element of the super-block whose nibble it holds
/// ([`nibble_element`] of [`packed_source`]), computed at compile time: the order in which the
/// decode kernel of repacked rows reads the activation.
pub(crate) static PACKED_ELEMENT: [u8; QK_K] = {
    let mut t = [0u8; QK_K];
    let mut slot = 0;
    while slot < QK_K {
        t[slot] = nibble_element(packed_source(slot)) as u8;
        slot += 1;
    }
    t
};

/// [`packed_source`] of every slot, computed at compile time.
static PACKED_SOURCE: [u8; QK_K] = {
    let mut t = [0u8; QK_K];
    let mut slot = 0;
    while slot < QK_K {
        t[slot] = packed_source(slot) as u8;
        slot += 1;
    }
    t
};

/// Bytes of one `Q4_K` super-block, and where its nibbles start.
const BLOCK_BYTES: usize = size_of::<BlockQ4K>();
const QS_AT: usize = 16;

/// Rewrites one row of `Q4_K` super-blocks `src` into the repacked layout of
/// `cpu::RepackedWeight`, `dst` (the same length): each super-block keeps its 16 bytes of scales,
/// and its nibbles move as [`packed_source`] says. Super-blocks stay where they were, so a run of
/// whole super-blocks of a repacked row is itself a repacked row.
pub(crate) fn repack_row(src: &[u8], dst: &mut [u8]) {
    debug_assert!(src.len() == dst.len() && src.len().is_multiple_of(BLOCK_BYTES));
    for (s, d) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(BLOCK_BYTES)) {
        d[..QS_AT].copy_from_slice(&s[..QS_AT]);
        let nibble = |slot: usize| {
            let source = usize::from(PACKED_SOURCE[slot]);
            (s[QS_AT + source / 2] >> (4 * (source % 2))) & 0x0f
        };
        for (b, out) in d[QS_AT..].iter_mut().enumerate() {
            let (h2, b) = (b / 64, b % 64);
            *out = nibble(128 * h2 + b) | (nibble(128 * h2 + 64 + b) << 4);
        }
    }
}

/// The inverse of [`repack_row`]: the `Q4_K` super-blocks of a repacked row.
pub(crate) fn unpack_row(src: &[u8], dst: &mut [u8]) {
    debug_assert!(src.len() == dst.len() && src.len().is_multiple_of(BLOCK_BYTES));
    for (s, d) in src.chunks_exact(BLOCK_BYTES).zip(dst.chunks_exact_mut(BLOCK_BYTES)) {
        d[..QS_AT].copy_from_slice(&s[..QS_AT]);
        d[QS_AT..].fill(0);
        for (slot, &source) in PACKED_SOURCE.iter().enumerate() {
            let (h2, j2, b) = (slot / 128, slot / 64 % 2, slot % 64);
            let value = (s[QS_AT + 64 * h2 + b] >> (4 * j2)) & 0x0f;
            let source = usize::from(source);
            d[QS_AT + source / 2] |= value << (4 * (source % 2));
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
        assert_eq!(std::mem::offset_of!(BlockQ4K, d), 0);
        assert_eq!(std::mem::offset_of!(BlockQ4K, dmin), 2);
        assert_eq!(std::mem::offset_of!(BlockQ4K, scales), 4);
        assert_eq!(std::mem::offset_of!(BlockQ4K, qs), 16);
    }

    #[test]
    fn scale_packing_round_trips_every_value() {
        for v in 0..64u8 {
            let sc = [v, 1, 2, 3, v, 63 - v, 5, v / 2];
            let m = [63 - v, v, 7, 0, 63, v, v / 3, 1];
            assert_eq!(unpack_scales_mins(&pack_scales_mins(&sc, &m)), (sc, m));
        }
    }

    #[test]
    fn dequantizes_hand_made_block() {
        // d = 1.0 (f16 0x3c00), dmin = 0.5 (f16 0x3800).
        // Scale bytes, decoded by get_scale_min_k4 by hand:
        //   bytes 0..4 = 0x45, 0x02, 0x03, 0x04: sc0 = 0x45 & 63 = 5, sc1 = 2, sc2 = 3, sc3 = 4,
        //     and byte 0's top bits (01) are bits 4..5 of sc4.
        //   bytes 4..8 = 0xc1, 0x00, 0x00, 0x00: m0 = 1, m1..m3 = 0; byte 4's top bits (11) are
        //     bits 4..5 of m4.
        //   bytes 8..12 = 0x72, 0x00, 0x00, 0x00: sc4 = 2 | (1 << 4) = 18, m4 = 7 | (3 << 4) = 55;
        //     sc5..sc7 = m5..m7 = 0.
        let mut bytes = vec![0x00, 0x3c, 0x00, 0x38];
        bytes.extend([0x45, 0x02, 0x03, 0x04, 0xc1, 0x00, 0x00, 0x00, 0x72, 0x00, 0x00, 0x00]);
        let mut qs = [0u8; 128];
        qs[0] = 0x73; // Element 0 (sub-block 0): q = 3; element 32 (sub-block 1): q = 7.
        qs[31] = 0xf0; // Element 31: q = 0; element 63: q = 15.
        qs[64] = 0x09; // Element 128 (sub-block 4): q = 9; element 160 (sub-block 5): q = 0.
        qs[33] = 0x20; // Element 65 (sub-block 2): q = 0; element 97 (sub-block 3): q = 2.
        bytes.extend(qs);
        let mut out = [0f32; 256];
        dequantize_row(DType::Q4K, &bytes, &mut out).unwrap();
        assert_eq!(out[0], 1.0 * 5.0 * 3.0 - 0.5 * 1.0);
        assert_eq!(out[1], -0.5); // q = 0 in sub-block 0: -dmin * m0.
        assert_eq!(out[31], -0.5);
        assert_eq!(out[32], 2.0 * 7.0);
        assert_eq!(out[63], 2.0 * 15.0);
        assert_eq!(out[65], 0.0);
        assert_eq!(out[97], 4.0 * 2.0);
        assert_eq!(out[128], 18.0 * 9.0 - 0.5 * 55.0);
        assert_eq!(out[129], -0.5 * 55.0);
        assert_eq!(out[160], 0.0);
        assert_eq!(out[255], 0.0);
    }

    #[test]
    fn round_trip_error_is_bounded() {
        let x = test_util::random_row(4, 256 * 32);
        let mut bytes = vec![0u8; DType::Q4K.bytes_for(x.len()).unwrap()];
        quantize_row(DType::Q4K, &x, &mut bytes).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize_row(DType::Q4K, &bytes, &mut y).unwrap();
        let (mut err2, mut step2) = (0f64, 0f64);
        for (xs, ys) in x.chunks(256).zip(y.chunks(256)) {
            let ranges: Vec<(f32, f32)> = xs
                .chunks(32)
                .map(|b| (b.iter().fold(0f32, |m, v| m.min(*v)), b.iter().fold(f32::MIN, |m, v| m.max(*v))))
                .collect();
            // The super-block's 6-bit grids: d for scales, dmin for minimums.
            let d = ranges.iter().map(|(lo, hi)| (hi - lo) / 15.0).fold(0f32, f32::max) / 63.0;
            let dmin = ranges.iter().map(|(lo, _)| -lo).fold(0f32, f32::max) / 63.0;
            for ((xb, yb), (lo, hi)) in xs.chunks(32).zip(ys.chunks(32)).zip(&ranges) {
                let step = (hi - lo) / 15.0;
                // Rounding costs half a step, but the weighted fit favours large magnitudes and
                // may clip the values nearest zero by up to another half step. The stored
                // minimum is off by up to dmin / 2 and the stored scale by up to d / 2, which
                // moves the top of the 15-step grid by 7.5 d.
                let bound = step + 0.5 * dmin + 7.5 * d + 1e-6;
                for (a, b) in xb.iter().zip(yb) {
                    assert!((a - b).abs() <= bound, "{a} vs {b}, bound {bound}");
                    err2 += f64::from(a - b).powi(2);
                    step2 += f64::from(step).powi(2);
                }
            }
        }
        // Uniform rounding error has an RMS of step / sqrt(12) = 0.29 step.
        let rel_rms = (err2 / step2).sqrt();
        assert!(rel_rms < 0.32, "RMS error {rel_rms} steps");
    }

    #[test]
    fn repacked_slots_are_a_permutation_and_round_trip() {
        let mut seen = [false; QK_K];
        for slot in 0..QK_K {
            let source = super::packed_source(slot);
            assert!(!seen[source], "slot {slot} repeats nibble {source}");
            seen[source] = true;
            // Both nibbles of a repacked byte come from the same sub-block half that the original
            // kernel sums into the same lane.
            let (b, m) = (slot % 64, slot % 64 / 4);
            let (l, p) = (m / 4, m % 4);
            assert_eq!(source % 2, p % 2, "slot {slot}");
            assert_eq!(source / 2 / 16 % 4, l, "slot {slot} byte {b}");
            assert_eq!(source / 2 / 64, p / 2, "slot {slot}");
        }
        // Element numbering: byte 32c + l holds elements 64c + l (low) and 64c + 32 + l (high).
        assert_eq!(super::nibble_element(2 * 33), 65);
        assert_eq!(super::nibble_element(2 * 33 + 1), 97);
        let src: Vec<u8> = (0..3 * 144).map(|i| (i * 37 + 11) as u8).collect();
        let mut packed = vec![0u8; src.len()];
        super::repack_row(&src, &mut packed);
        assert_eq!(&packed[..16], &src[..16]);
        assert_ne!(packed, src);
        let mut back = vec![0u8; src.len()];
        super::unpack_row(&packed, &mut back);
        assert_eq!(back, src);
    }
}
