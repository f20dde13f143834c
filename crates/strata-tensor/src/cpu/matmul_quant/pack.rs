//! The AVX-512 decoder of the quantized GEMM's panels: the same bytes as the scalar `pack_panel`
//! (its reference, also used by the dtypes this file leaves out), built a register at a time.
//!
//! For each half of the panel (16 weight rows) and each 64 columns of the slice, one register per
//! row receives that row's 64 unsigned levels, decoded from its blocks with a few shifts and masks
//! (`Q4_0`, `Q4_1` and `Q4_K` nibbles, `Q8_0` bytes flipped to unsigned). Read as 16 four-byte
//! words each, the 16 registers are a 16 x 16 matrix of steps by rows; a transpose of 32-bit
//! elements (four rounds of shuffles) turns it into the panel's layout, one register per step
//! holding the four levels of each of the 16 rows, stored with no scattering. `Q4_K`'s scales
//! and minimums are decoded 16 rows at a time as well ([`q4k_scales`]); the other dtypes' (one
//! or two f16 values per 32 levels) by scalar code. The weights come from memory here, once per
//! prefill, so each row is prefetched [`PACK_AHEAD`] steps ahead of its loads.
//!
//! The 16-bit panels of `Q4_K` ([`pack_wide`], for `super::wide`) start from the same levels:
//! each register of the layout above is widened into two registers of two 16-bit values per row,
//! multiplied by the rows' integer scales.

use std::arch::x86_64::*;

use super::{Format, NR, decode_scales};
use crate::DType;
use crate::quant::q8act::QK_ACT;
use crate::quant::{BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ8_0, QK_K};

const _: () = assert!(NR == 32);

/// Whether [`pack_panel`] decodes `dtype`.
pub(super) fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q4K)
}

/// The same panel as the scalar `pack_panel` with the same arguments, for a dtype that
/// [`supports`] accepts; with `packed`, of `Q4_0` or `Q4_K` rows repacked by
/// `quant::q4_0::repack_row` or `quant::q4_k::repack_row` the panel of the original rows (for
/// `Q4_0`, the columns must lie within the row's whole groups of four blocks: [`packed_q4_0_fits`]).
///
/// # Safety
/// The CPU must support AVX-512 F and BW and F16C. (Every slice access is bounds-checked.)
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
pub(super) unsafe fn pack_panel(
    dtype: DType,
    packed: bool,
    w: &[u8],
    row_bytes: usize,
    j0: usize,
    rows: usize,
    p0: usize,
    kc: usize,
    levels: &mut [u8],
    scales: &mut [f32],
    mins: &mut [f32],
) {
    debug_assert!(supports(dtype) && rows <= NR);
    debug_assert!(!packed || dtype == DType::Q4K || (dtype == DType::Q4_0 && packed_q4_0_fits(row_bytes, p0, kc)));
    let format = Format::of(dtype);
    let groups = kc / format.group;
    assert!(levels.len() == kc * NR && scales.len() == groups * NR);
    assert!(!format.min || mins.len() == kc / QK_ACT * NR);
    let (off, len) = (dtype.bytes_for(p0).expect("whole blocks"), dtype.bytes_for(kc).expect("whole blocks"));
    let src = |r: usize| &w[(j0 + r) * row_bytes + off..][..len];
    if packed && dtype == DType::Q4_0 {
        // SAFETY: forwarded from the caller, with the columns within the whole groups.
        unsafe { pack_q4_0_packed(w, row_bytes, j0, rows, p0, kc, levels, scales) };
        return;
    }
    // SAFETY: the caller vouches for AVX-512 F/BW, all that `levels_by` needs.
    unsafe {
        match dtype {
            DType::Q8_0 => levels_by::<Q8>(&src, rows, kc, levels),
            DType::Q4_0 => levels_by::<Q4<{ size_of::<BlockQ4_0>() }, 2>>(&src, rows, kc, levels),
            DType::Q4_1 => levels_by::<Q4<{ size_of::<BlockQ4_1>() }, 4>>(&src, rows, kc, levels),
            DType::Q4K if packed => levels_by::<Q4KPacked>(&src, rows, kc, levels),
            DType::Q4K => levels_by::<Q4K>(&src, rows, kc, levels),
            _ => unreachable!("{dtype} has no vectorised decoder"),
        }
    }
    if dtype == DType::Q4K {
        // SAFETY: the caller vouches for AVX-512 F/BW.
        unsafe { q4k_scales(w, row_bytes, j0, rows, off, kc, Q4kScales::Float { scales, mins }) };
        return;
    }
    let mut sc = [0f32; super::KC / 16];
    let mut mn = [0f32; super::KC / QK_ACT];
    let (sc, mn) = (&mut sc[..groups], &mut mn[..kc / QK_ACT]);
    for r in 0..NR {
        if r < rows {
            // SAFETY: the caller vouches for F16C with AVX-512 F/BW (`Isa::Avx512` includes it).
            decode_scales(dtype, src(r), sc, mn, |h| unsafe { f32_of(h) });
        } else {
            sc.fill(0.0);
            mn.fill(0.0);
        }
        for (g, &v) in sc.iter().enumerate() {
            scales[g * NR + r] = v;
        }
        if format.min {
            for (b, &v) in mn.iter().enumerate() {
                mins[b * NR + r] = v;
            }
        }
    }
}

/// The scales (`d * sc`) and minimums (`-(dmin * m)`) of a `Q4_K` panel, rows `j0..j0 + rows` of
/// `w` (`row_bytes` each) from byte `off` (a super-block boundary), `kc / 256` super-blocks, the
/// same values as `decode_scales` (the same f32 operations on the same exact conversions) for
/// plain and repacked rows alike (repacking moves only the nibbles). Sixteen rows at a time: one
/// gather per word of each super-block's header (`d` and `dmin`, then the 12 bytes of packed
/// 6-bit scales and minimums) puts a row in each lane, so each of the eight groups' values comes
/// out as the 16 contiguous floats of its row of the panel. Lanes past `rows` are zero.
///
/// # Safety
/// AVX-512 F. (The rows read are checked to lie inside `w`.)
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn q4k_scales(
    w: &[u8],
    row_bytes: usize,
    j0: usize,
    rows: usize,
    off: usize,
    kc: usize,
    mut out: Q4kScales<'_>,
) {
    const B: usize = size_of::<BlockQ4K>();
    let supers = kc / QK_K;
    match &out {
        Q4kScales::Float { scales, mins } => assert!(scales.len() == supers * 8 * NR && mins.len() == supers * 8 * NR),
        Q4kScales::Wide { scw, d, mins } => {
            assert!(scw.len() == supers * 8 * NR && d.len() == supers * NR && mins.len() == supers * 8 * NR)
        }
    }
    if rows > 0 {
        assert!((j0 + rows - 1) * row_bytes + off + supers * B <= w.len() && 16 * row_bytes <= i32::MAX as usize);
    }
    for half in 0..NR / 16 {
        let r0 = 16 * half;
        let n = rows.saturating_sub(r0).min(16);
        // SAFETY: AVX-512 F from the caller. The gathers read, for the `n` lanes of `mask`, the
        // four words at `(j0 + r0 + lane) * row_bytes + off + sb * B + 0..16`, inside `w` by the
        // assertion above; masked-out lanes read nothing, and `base` is only formed when `n > 0`.
        // Each store writes 16 floats at `(sb * 8 + j) * NR + r0 + 0..16 <= scales.len()`.
        unsafe {
            let mask: __mmask16 = if n == 16 { 0xffff } else { ((1u32 << n) - 1) as u16 };
            let lanes = _mm512_mullo_epi32(
                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                _mm512_set1_epi32(row_bytes as i32),
            );
            let base = if n > 0 { w.as_ptr().add((j0 + r0) * row_bytes + off) } else { w.as_ptr() };
            for sb in 0..supers {
                let zero = _mm512_setzero_si512();
                let word = |at: usize| {
                    if n == 0 {
                        zero
                    } else {
                        _mm512_mask_i32gather_epi32::<1>(zero, mask, lanes, base.add(sb * B + at).cast())
                    }
                };
                let (hdr, a, b, c) = (word(0), word(4), word(8), word(12));
                let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(hdr));
                let dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(hdr)));
                if let Q4kScales::Wide { d: dd, .. } = &mut out {
                    _mm512_storeu_ps(dd[sb * NR + r0..][..16].as_mut_ptr(), d);
                }
                let byte = |v: __m512i, j: u32| {
                    _mm512_and_si512(_mm512_srlv_epi32(v, _mm512_set1_epi32(8 * j as i32)), _mm512_set1_epi32(0xff))
                };
                let low6 = _mm512_set1_epi32(63);
                let low4 = _mm512_set1_epi32(15);
                for j in 0..4u32 {
                    let (aj, bj, cj) = (byte(a, j), byte(b, j), byte(c, j));
                    let sc = [
                        _mm512_and_si512(aj, low6),
                        _mm512_or_si512(_mm512_and_si512(cj, low4), _mm512_slli_epi32::<4>(_mm512_srli_epi32::<6>(aj))),
                    ];
                    let m = [
                        _mm512_and_si512(bj, low6),
                        _mm512_or_si512(_mm512_srli_epi32::<4>(cj), _mm512_slli_epi32::<4>(_mm512_srli_epi32::<6>(bj))),
                    ];
                    for (h, (sc, m)) in sc.into_iter().zip(m).enumerate() {
                        let g = sb * 8 + j as usize + 4 * h;
                        let at = g * NR + r0;
                        // `-(dmin * m)`, the sign flipped exactly, in the lanes of rows (the
                        // others stay +0, as the scalar decoder's fill).
                        let prod = _mm512_castps_si512(_mm512_mul_ps(dmin, _mm512_cvtepi32_ps(m)));
                        let min =
                            _mm512_castsi512_ps(_mm512_mask_xor_epi32(prod, mask, prod, _mm512_set1_epi32(i32::MIN)));
                        match &mut out {
                            Q4kScales::Float { scales, mins } => {
                                let scale = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc));
                                _mm512_storeu_ps(scales[at..at + 16].as_mut_ptr(), scale);
                                _mm512_storeu_ps(mins[at..at + 16].as_mut_ptr(), min);
                            }
                            Q4kScales::Wide { scw, mins, .. } => {
                                // The scale in both 16-bit halves of the row's word.
                                let both = _mm512_or_si512(sc, _mm512_slli_epi32::<16>(sc));
                                _mm512_storeu_si512(scw[at..at + 16].as_mut_ptr().cast(), both);
                                _mm512_storeu_ps(mins[at..at + 16].as_mut_ptr(), min);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Where [`q4k_scales`] writes: the float scales `d * sc` and minimums of the 8-bit panel, or for
/// the 16-bit panel ([`pack_wide`]) the integer scales `sc` (in both halves of a 32-bit word,
/// `[kc / 32][NR]`), each super-block's `d` (`[kc / 256][NR]`) and the same minimums.
enum Q4kScales<'a> {
    Float { scales: &'a mut [f32], mins: &'a mut [f32] },
    Wide { scw: &'a mut [u32], d: &'a mut [f32], mins: &'a mut [f32] },
}

/// The 16-bit panel of `Q4_K` rows (plain, or repacked with `packed`) for the 16-bit GEMM
/// (`super::wide`): `wide` `[kc / 2][NR][2]`, the products `sc * q` of each pair of columns of
/// each row (at most 63 * 15), each super-block's `d` per row and the minimums `-(dmin * m)` per
/// block of 32 and row, as [`pack_panel`] has them. The levels are decoded as for the 8-bit
/// panel, and each register of four levels of 16 rows is widened into two registers of two
/// 16-bit values of 16 rows, multiplied by the rows' integer scales ([`widen`]).
///
/// # Safety
/// As [`pack_panel`] (AVX-512 F/BW, F16C).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
pub(super) unsafe fn pack_wide(
    packed: bool,
    w: &[u8],
    row_bytes: usize,
    j0: usize,
    rows: usize,
    p0: usize,
    kc: usize,
    wide: &mut [i16],
    scw: &mut [u32],
    d: &mut [f32],
    mins: &mut [f32],
) {
    debug_assert!(rows <= NR && kc.is_multiple_of(QK_K));
    assert!(wide.len() == kc * NR);
    let dtype = DType::Q4K;
    let (off, len) = (dtype.bytes_for(p0).expect("whole blocks"), dtype.bytes_for(kc).expect("whole blocks"));
    let src = |r: usize| &w[(j0 + r) * row_bytes + off..][..len];
    // SAFETY: AVX-512 F/BW and F16C from the caller.
    unsafe {
        q4k_scales(w, row_bytes, j0, rows, off, kc, Q4kScales::Wide { scw, d, mins });
        let scw: &[u32] = scw;
        let idx = [_mm512_loadu_si512(EVEN_ODD[0].as_ptr().cast()), _mm512_loadu_si512(EVEN_ODD[1].as_ptr().cast())];
        let sink = |t, half, four| widen(four, t, half, &idx, scw, wide);
        if packed {
            steps_by::<Q4KPacked>(&src, rows, kc, sink);
        } else {
            steps_by::<Q4K>(&src, rows, kc, sink);
        }
    }
}

/// `vpermt2d` indices taking the even (first four columns' first pair) or odd 32-bit words of two
/// registers.
static EVEN_ODD: [[u32; 16]; 2] = {
    let mut t = [[0u32; 16]; 2];
    let mut i = 0;
    while i < 16 {
        t[0][i] = 2 * i as u32;
        t[1][i] = 2 * i as u32 + 1;
        i += 1;
    }
    t
};

/// Writes steps `2t` and `2t + 1` of the 16-bit panel for the 16 rows of `half` from `four`, step
/// `t` of the 8-bit layout (row `r`'s four levels at bytes `4r..4r + 4`): zero-extended to 16 bits
/// in two registers (rows 0..8 and 8..16 of the half, each row's two pairs of columns in adjacent
/// words), whose even and odd words (`idx`) are the rows' first and second pairs, times the scale
/// of the block of 32 holding the four columns.
///
/// # Safety
/// AVX-512 F/BW. (Slices are bounds-checked.)
#[inline(always)]
unsafe fn widen(four: __m512i, t: usize, half: usize, idx: &[__m512i; 2], scw: &[u32], wide: &mut [i16]) {
    // SAFETY: AVX-512 F/BW from the caller; the loads and stores are of bounds-checked slices of
    // 64 bytes.
    unsafe {
        let lo = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(four));
        let hi = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64::<1>(four));
        let s = (4 * t / QK_ACT) * NR + 16 * half;
        let sc = _mm512_loadu_si512(scw[s..s + 16].as_ptr().cast());
        for (pair, idx) in idx.iter().enumerate() {
            let v = _mm512_mullo_epi16(_mm512_permutex2var_epi32(lo, *idx, hi), sc);
            let o = ((2 * t + pair) * NR + 16 * half) * 2;
            _mm512_storeu_si512(wide[o..o + 32].as_mut_ptr().cast(), v);
        }
    }
}

/// Whether columns `p0..p0 + kc` of a repacked `Q4_0` row of `row_bytes` lie within its whole
/// groups of four blocks, where [`pack_panel`] reads the repacked row directly.
pub(super) fn packed_q4_0_fits(row_bytes: usize, p0: usize, kc: usize) -> bool {
    let blocks = row_bytes / size_of::<BlockQ4_0>();
    (p0 + kc) / 32 <= blocks - blocks % 4
}

/// [`pack_panel`] of repacked `Q4_0` rows, columns within the whole groups: block `b`'s nibbles
/// are the 16 bytes at `16 b` (so those of consecutive blocks are contiguous, read as by [`Q4`]
/// with no header), its scale the f16 at `64 G + 2 b` for `G` groups.
///
/// # Safety
/// As [`pack_panel`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn pack_q4_0_packed(
    w: &[u8],
    row_bytes: usize,
    j0: usize,
    rows: usize,
    p0: usize,
    kc: usize,
    levels: &mut [u8],
    scales: &mut [f32],
) {
    let (b0, blocks) = (p0 / 32, kc / 32);
    let scales_at = 64 * (row_bytes / size_of::<BlockQ4_0>() / 4);
    let row = |r: usize| &w[(j0 + r) * row_bytes..][..row_bytes];
    let nibbles = |r: usize| &row(r)[16 * b0..16 * (b0 + blocks)];
    // SAFETY: the caller vouches for AVX-512 F/BW, all that `levels_by` needs.
    unsafe { levels_by::<Q4<16, 0>>(&nibbles, rows, kc, levels) };
    for r in 0..NR {
        for g in 0..blocks {
            scales[g * NR + r] = if r < rows {
                let at = scales_at + 2 * (b0 + g);
                let h = half::f16::from_le_bytes([row(r)[at], row(r)[at + 1]]);
                // SAFETY: F16C from the caller.
                unsafe { f32_of(h) }
            } else {
                0.0
            };
        }
    }
}

/// `h` in f32, with `vcvtph2ps` (exact, as `half::f16::to_f32`).
///
/// # Safety
/// F16C.
#[inline(always)]
unsafe fn f32_of(h: half::f16) -> f32 {
    // SAFETY: register conversion only; F16C from the caller.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h.to_bits())))) }
}

/// How a dtype's levels come out of its blocks, 64 columns at a time.
trait Levels {
    /// The levels of columns `c..c + 64` of the row `src` (whole blocks, starting at column 0), or
    /// of `c..c + 32` in the low half when `full` is false (the high half is then unspecified).
    /// `c` is a multiple of 64.
    ///
    /// # Safety
    /// AVX-512 F/BW. (Reads are bounds-checked.)
    unsafe fn load(src: &[u8], c: usize, full: bool) -> __m512i;

    /// The bytes of a row that hold 64 columns.
    const BYTES_PER_64: usize;
}

/// `Q8_0`: two blocks of 32 signed bytes, flipped to unsigned.
struct Q8;

impl Levels for Q8 {
    const BYTES_PER_64: usize = 2 * size_of::<BlockQ8_0>();

    #[inline(always)]
    unsafe fn load(src: &[u8], c: usize, full: bool) -> __m512i {
        const B: usize = size_of::<BlockQ8_0>();
        let at = c / 32 * B + 2;
        let first = &src[at..at + 32];
        // SAFETY: each load reads the 32 bytes of a slice of that length; AVX-512 F/BW from the
        // caller.
        unsafe {
            let lo = _mm256_loadu_si256(first.as_ptr().cast());
            let hi = if full {
                let second = &src[at + B..at + B + 32];
                _mm256_loadu_si256(second.as_ptr().cast())
            } else {
                _mm256_setzero_si256()
            };
            let v = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
            _mm512_xor_si512(v, _mm512_set1_epi8(0x80u8 as i8))
        }
    }
}

/// `Q4_0` and `Q4_1`: blocks of `B` bytes whose 16 bytes of nibbles start at `QS`; element `j` is
/// the low nibble of byte `j`, element `j + 16` its high nibble.
struct Q4<const B: usize, const QS: usize>;

impl<const B: usize, const QS: usize> Levels for Q4<B, QS> {
    const BYTES_PER_64: usize = 2 * B;

    #[inline(always)]
    unsafe fn load(src: &[u8], c: usize, full: bool) -> __m512i {
        let at = c / 32 * B + QS;
        let first = &src[at..at + 16];
        // SAFETY: each load reads the 16 bytes of a slice of that length; AVX-512 F/BW from the
        // caller.
        unsafe {
            let q0 = _mm_loadu_si128(first.as_ptr().cast());
            let q1 = if full {
                let second = &src[at + B..at + B + 16];
                _mm_loadu_si128(second.as_ptr().cast())
            } else {
                _mm_setzero_si128()
            };
            // Lanes `[q0, q0, q1, q1]`, the second copy of each shifted to its high nibbles.
            let both = _mm512_castsi256_si512(_mm256_set_m128i(q1, q0));
            let v = _mm512_shuffle_i64x2::<0b01_01_00_00>(both, both);
            nibbles(v, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0))
        }
    }
}

/// `Q4_K`: super-blocks of 256 whose 128 bytes of nibbles start at byte 16; byte `32 * j + l`
/// holds element `64 * j + l` (low nibble) and `64 * j + 32 + l` (high nibble).
struct Q4K;

impl Levels for Q4K {
    const BYTES_PER_64: usize = size_of::<BlockQ4K>() / 4;

    #[inline(always)]
    unsafe fn load(src: &[u8], c: usize, _full: bool) -> __m512i {
        const B: usize = size_of::<BlockQ4K>();
        let at = c / QK_K * B + 16 + (c % QK_K) / 2;
        let q = &src[at..at + 32];
        // SAFETY: the load reads the 32 bytes of a slice of that length; AVX-512 F/BW from the
        // caller.
        unsafe {
            let v = _mm512_broadcast_i64x4(_mm256_loadu_si256(q.as_ptr().cast()));
            nibbles(v, _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0))
        }
    }
}

/// `Q4_K` rows repacked by `quant::q4_k::repack_row` (`cpu::RepackedWeight`): the same levels as
/// [`Q4K`] from the permuted nibbles. Read as 32-bit words, the original layout's low (high)
/// nibbles of 64 bytes `h` are, in each 128-bit lane `L`, a 4 x 4 transpose of the repacked
/// nibbles: word `4L + p'` of original register `p = 2h + j` is word `4L + p` of repacked
/// register `p'` (the low or high nibbles of repacked half `p' / 2`). One `vpermt2d` gathers the
/// 16 words of 64 levels from the two repacked halves and a shift per word selects the nibble.
struct Q4KPacked;

/// `vpermt2d` indices of [`Q4KPacked`] for each quarter `q` of a super-block (levels `64q..`):
/// word `d` reads word `4L + p` of repacked half `p' / 2`, with `p' = d % 4`,
/// `L = 2 (q % 2) + d % 8 / 4` and `p = 2 (q / 2) + d / 8`.
static Q4K_PACKED_IDX: [[u32; 16]; 4] = {
    let mut t = [[0u32; 16]; 4];
    let mut q = 0;
    while q < 4 {
        let mut d = 0;
        while d < 16 {
            let (p2, l, p) = (d % 4, 2 * (q % 2) + d % 8 / 4, 2 * (q / 2) + d / 8);
            t[q][d] = (16 * (p2 / 2) + 4 * l + p) as u32;
            d += 1;
        }
        q += 1;
    }
    t
};

impl Levels for Q4KPacked {
    const BYTES_PER_64: usize = size_of::<BlockQ4K>() / 4;

    #[inline(always)]
    unsafe fn load(src: &[u8], c: usize, _full: bool) -> __m512i {
        const B: usize = size_of::<BlockQ4K>();
        let at = c / QK_K * B + 16;
        let q = &src[at..at + 128];
        // SAFETY: the loads read the 128 bytes of a slice of that length and a static table of 16
        // words; AVX-512 F/BW from the caller.
        unsafe {
            let idx = _mm512_loadu_si512(Q4K_PACKED_IDX[(c % QK_K) / 64].as_ptr().cast());
            let halves = (_mm512_loadu_si512(q.as_ptr().cast()), _mm512_loadu_si512(q.as_ptr().add(64).cast()));
            let words = _mm512_permutex2var_epi32(halves.0, idx, halves.1);
            let shift = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
            _mm512_and_si512(_mm512_srlv_epi32(words, shift), _mm512_set1_epi8(0x0f))
        }
    }
}

/// The low nibble of each byte of `v` after shifting each 64-bit lane right by `shift`'s lane.
///
/// # Safety
/// AVX-512 F/BW.
#[inline(always)]
unsafe fn nibbles(v: __m512i, shift: __m512i) -> __m512i {
    // SAFETY: register arithmetic only; AVX-512 F/BW from the caller.
    unsafe { _mm512_and_si512(_mm512_srlv_epi64(v, shift), _mm512_set1_epi8(0x0f)) }
}

/// How many steps of 64 columns ahead [`levels_by`] prefetches each row: the panel's rows are 16
/// streams read a few dozen bytes at a time, which the hardware prefetcher follows late.
const PACK_AHEAD: usize = 4;

/// Writes the panel's levels (`[kc / 4][NR][4]`) of rows `src(0..rows)`, zero for the others.
///
/// # Safety
/// AVX-512 F/BW. `kc` is a multiple of 32 (of 256 for `Q4_K`) and `levels.len() == kc * NR`.
#[inline(always)]
unsafe fn levels_by<'a, L: Levels>(src: &impl Fn(usize) -> &'a [u8], rows: usize, kc: usize, levels: &mut [u8]) {
    debug_assert!(levels.len() == kc * NR);
    // SAFETY: AVX-512 F/BW from the caller; the store is of a bounds-checked slice of 64 bytes.
    unsafe {
        steps_by::<L>(src, rows, kc, |t, half, v| {
            let at = (t * NR + 16 * half) * 4;
            _mm512_storeu_si512(levels[at..at + 64].as_mut_ptr().cast(), v);
        })
    }
}

/// Decodes the levels of rows `src(0..rows)` (zero for the others) and hands each register of the
/// panel's layout to `sink(t, half, v)`: `v` holds the four levels of step `t` (columns `4t..4t +
/// 4`) of each of the 16 rows of `half`.
///
/// # Safety
/// AVX-512 F/BW. `kc` is a multiple of 32 (of 256 for `Q4_K`).
#[inline(always)]
unsafe fn steps_by<'a, L: Levels>(
    src: &impl Fn(usize) -> &'a [u8],
    rows: usize,
    kc: usize,
    mut sink: impl FnMut(usize, usize, __m512i),
) {
    debug_assert!(kc.is_multiple_of(32));
    for half in 0..NR / 16 {
        for c in (0..kc).step_by(64) {
            let full = kc - c >= 64;
            // SAFETY: AVX-512 F/BW from the caller; the loads are of bounds-checked slices.
            unsafe {
                let mut a = [_mm512_setzero_si512(); 16];
                for (i, v) in a.iter_mut().enumerate() {
                    let r = 16 * half + i;
                    if r < rows {
                        let row = src(r);
                        // The same row `PACK_AHEAD` steps on: a hint, never dereferenced here
                        // (past the slice, `wrapping_add` keeps the pointer arithmetic defined).
                        let ahead = row.as_ptr().wrapping_add((c / 64 + PACK_AHEAD) * L::BYTES_PER_64);
                        _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                        *v = L::load(row, c, full);
                    }
                }
                let t = transpose(a);
                let steps = if full { 16 } else { 8 };
                for (j, v) in t.iter().take(steps).enumerate() {
                    sink(c / 4 + j, half, *v);
                }
            }
        }
    }
}

/// The transpose of 16 registers read as a 16 x 16 matrix of 32-bit elements: element `j` of
/// output `i` is element `i` of input `j`.
///
/// # Safety
/// AVX-512 F.
#[inline(always)]
unsafe fn transpose(a: [__m512i; 16]) -> [__m512i; 16] {
    // SAFETY: register shuffles only; AVX-512 F from the caller.
    unsafe {
        // Per 128-bit lane `L`: pairs of rows interleaved, elements `4L, 4L + 1` (lo) and
        // `4L + 2, 4L + 3` (hi).
        let mut b = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            b[2 * i] = _mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]);
            b[2 * i + 1] = _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]);
        }
        // `c[4i + j]`, lane `L`: element `4L + j` of rows `4i..4i + 4`.
        let mut c = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            c[4 * i] = _mm512_unpacklo_epi64(b[4 * i], b[4 * i + 2]);
            c[4 * i + 1] = _mm512_unpackhi_epi64(b[4 * i], b[4 * i + 2]);
            c[4 * i + 2] = _mm512_unpacklo_epi64(b[4 * i + 1], b[4 * i + 3]);
            c[4 * i + 3] = _mm512_unpackhi_epi64(b[4 * i + 1], b[4 * i + 3]);
        }
        // Output `4L + j` gathers lane `L` of `c[j]`, `c[4 + j]`, `c[8 + j]` and `c[12 + j]`.
        let mut out = [_mm512_setzero_si512(); 16];
        for j in 0..4 {
            let d0 = _mm512_shuffle_i32x4::<0x44>(c[j], c[4 + j]);
            let d1 = _mm512_shuffle_i32x4::<0xee>(c[j], c[4 + j]);
            let e0 = _mm512_shuffle_i32x4::<0x44>(c[8 + j], c[12 + j]);
            let e1 = _mm512_shuffle_i32x4::<0xee>(c[8 + j], c[12 + j]);
            out[j] = _mm512_shuffle_i32x4::<0x88>(d0, e0);
            out[4 + j] = _mm512_shuffle_i32x4::<0xdd>(d0, e0);
            out[8 + j] = _mm512_shuffle_i32x4::<0x88>(d1, e1);
            out[12 + j] = _mm512_shuffle_i32x4::<0xdd>(d1, e1);
        }
        out
    }
}
