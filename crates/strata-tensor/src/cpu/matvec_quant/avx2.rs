//! AVX2 (with FMA and F16C) kernels of the quantized matrix-vector product: 32 weights per 256-bit
//! register (a `Q8_0` block, the low or high nibbles of two `Q4_0`/`Q4_1` blocks matched by a
//! permuted activation, a `Q4_K` sub-block, two `Q6_K` sub-blocks), integer dot products with
//! both digits of the activation by `vpmaddubsw` (unsigned weight levels times signed digits,
//! pairs summed to i16) and `vpmaddwd` with 256 for the high digit and 1 for the low one (i16
//! pairs summed to i32 lanes of four elements each), then f32 scaling per lane, or per sub-block
//! after a tree of `vphaddd` for the k-quants.
//!
//! Only [`rows`] carries `#[target_feature]`; every helper is `#[inline(always)]` and ends up
//! inside it (or inside the AVX-512 entry points, which reuse some), where the intrinsics are
//! compiled for AVX2 or better. No sums saturate: weight levels are at most 63 (or |q| <= 128 with
//! the sign trick) and digits at most 127 in magnitude, so an i16 pair is at most
//! 2 * 128 * 127 = 32512, and a lane at most 4 * 128 * 32639 < 2^24.

use std::arch::x86_64::*;

use super::{Digits, Prepared, RowKernel, drive, prefetch_ahead};
use crate::DType;
use crate::quant::QK_K;

/// Computes `ys.len()` rows of `dtype` held in `w` against the prepared activation.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` must hold `ys.len()` rows of `row_bytes` bytes and
/// `prep` must have been built for `Isa::Avx2` and `dtype` from an activation of the row length.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows(dtype: DType, w: &[u8], row_bytes: usize, prep: &Prepared, ys: &mut [f32]) {
    const ROWS: usize = 2;
    let nb = row_bytes / dtype.block_bytes();
    // Each kernel prefetches the rows it will compute after the current group of ROWS.
    let ahead = (2 * ROWS * row_bytes).max(12 * 1024);
    // SAFETY: the caller guarantees the CPU features, the row layout and the preparation.
    unsafe {
        match dtype {
            DType::Q8_0 => drive::<ROWS, _>(&Q8_0 { nb, prep, ahead }, w, row_bytes, ys),
            DType::Q4_0 => drive::<ROWS, _>(&Q4_0 { nb, prep, ahead }, w, row_bytes, ys),
            DType::Q4_1 => drive::<ROWS, _>(&Q4_1 { nb, prep, ahead }, w, row_bytes, ys),
            DType::Q4K => drive::<ROWS, _>(&Q4K { nb, prep, ahead }, w, row_bytes, ys),
            DType::Q6K => drive::<ROWS, _>(&Q6K { nb, prep, ahead }, w, row_bytes, ys),
            DType::F32 | DType::F16 | DType::BF16 => unreachable!("not a block-quantized dtype"),
        }
    }
}

// Every function below is only ever inlined into `rows`, which enables AVX2, FMA and F16C, or into
// the AVX-512 entry points, which enable more; the
// SAFETY comments on their intrinsic calls rely on that and say what else they need.

/// The two digit registers of the activation values at offset `at` of `prep`'s arrays.
#[inline(always)]
pub(super) unsafe fn digits256(prep: &Prepared, at: usize) -> Digits<__m256i> {
    // SAFETY: the caller guarantees 32 values at `at`; AVX (see above).
    unsafe {
        Digits {
            hi: _mm256_loadu_si256(prep.hi.as_ptr().add(at).cast()),
            lo: _mm256_loadu_si256(prep.lo.as_ptr().add(at).cast()),
        }
    }
}

/// The i32 lanes `256 * hi + lo` of the i16 pair sums of the two digits' products.
#[inline(always)]
pub(super) unsafe fn combine256(hi: __m256i, lo: __m256i) -> __m256i {
    // SAFETY: AVX2 (see above); no memory access.
    unsafe {
        _mm256_add_epi32(_mm256_madd_epi16(hi, _mm256_set1_epi16(256)), _mm256_madd_epi16(lo, _mm256_set1_epi16(1)))
    }
}

/// Sums of four adjacent products of unsigned `u` and the activation values `256 * hi + lo`, in
/// 8 i32 lanes.
#[inline(always)]
unsafe fn dot4(u: __m256i, a: Digits<__m256i>) -> __m256i {
    // SAFETY: AVX2 (see above); no memory access.
    unsafe { combine256(_mm256_maddubs_epi16(u, a.hi), _mm256_maddubs_epi16(u, a.lo)) }
}

/// An f16 read from unaligned memory, converted to f32.
#[inline(always)]
pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes at `p`; F16C (see above).
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(p.cast::<u16>().read_unaligned())))) }
}

/// Two adjacent f16 values read from unaligned memory, converted to f32 in lanes 0 and 1.
#[inline(always)]
unsafe fn f16x2_at(p: *const u8) -> __m128 {
    // SAFETY: the caller guarantees four readable bytes at `p`; F16C (see above).
    unsafe { _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned())) }
}

/// The sum of the 8 lanes.
#[inline(always)]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: AVX (see above); no memory access.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

/// The 32 nibbles of a `Q4_0`/`Q4_1` block's 16 bytes at `p`, in element order: the low nibbles
/// (elements 0..16), then the high ones (16..32).
#[inline(always)]
pub(super) unsafe fn nibbles32(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes at `p`; AVX2 (see above).
    unsafe {
        let bytes = _mm_loadu_si128(p.cast());
        _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(bytes), bytes), _mm256_set1_epi8(0x0f))
    }
}

/// The eight 6-bit scales and eight 6-bit minimums of a `Q4_K` super-block from its 12 packed
/// bytes at `p` (16 bytes are read), as bytes `[sc0..8, m0..8]` (ggml's `get_scale_min_k4`).
#[inline(always)]
pub(super) unsafe fn q4k_scales_mins(p: *const u8) -> __m128i {
    // SAFETY: the caller guarantees 16 readable bytes at `p`; AVX2 (see above).
    unsafe {
        // As u32 lanes: w0 = bytes 0..4, w1 = bytes 4..8, w2 = bytes 8..12.
        let w = _mm_loadu_si128(p.cast());
        // sc0..4 = w0 & 63 and m0..4 = w1 & 63, per byte.
        let low = _mm_and_si128(w, _mm_set1_epi8(0x3f));
        // sc4..8 = (w2 & 0x0f) | ((w0 >> 6) << 4) and m4..8 = (w2 >> 4) | ((w1 >> 6) << 4), per byte;
        // (v >> 6) << 4 of a byte is (u32 >> 2) & 0x30.
        let w2 = _mm_shuffle_epi32::<0b10_10_10_10>(w);
        let nib = _mm_and_si128(_mm_srlv_epi32(w2, _mm_set_epi32(0, 0, 4, 0)), _mm_set1_epi8(0x0f));
        let top = _mm_and_si128(_mm_srli_epi32::<2>(w), _mm_set1_epi8(0x30));
        _mm_unpacklo_epi32(low, _mm_or_si128(nib, top))
    }
}

/// [`q4k_scales_mins`] of two super-blocks at once, in the two 128-bit halves.
#[inline(always)]
pub(super) unsafe fn q4k_scales_mins_x2(p0: *const u8, p1: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 16 readable bytes at `p0` and at `p1`; AVX2 (see above).
    unsafe {
        let w = _mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(p0.cast())),
            _mm_loadu_si128(p1.cast()),
        );
        let low = _mm256_and_si256(w, _mm256_set1_epi8(0x3f));
        let w2 = _mm256_shuffle_epi32::<0b10_10_10_10>(w);
        let nib =
            _mm256_and_si256(_mm256_srlv_epi32(w2, _mm256_set_epi32(0, 0, 4, 0, 0, 0, 4, 0)), _mm256_set1_epi8(0x0f));
        let top = _mm256_and_si256(_mm256_srli_epi32::<2>(w), _mm256_set1_epi8(0x30));
        _mm256_unpacklo_epi32(low, _mm256_or_si256(nib, top))
    }
}

/// `Q8_0`: signed weights, so `|w|` times the activation with `w`'s sign (`vpsignb`).
struct Q8_0<'a> {
    nb: usize,
    prep: &'a Prepared,
    ahead: usize,
}

impl RowKernel for Q8_0<'_> {
    #[inline(always)]
    unsafe fn dot<const R: usize>(&self, rows: [*const u8; R]) -> [f32; R] {
        // SAFETY: each row holds `nb` blocks of 34 bytes (d, then 32 values); the activation
        // holds `nb` blocks of 32. AVX2, FMA and F16C (see above).
        unsafe {
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..self.nb {
                let a = digits256(self.prep, 32 * b);
                let da = self.prep.act.d[b];
                for r in 0..R {
                    let block = rows[r].add(34 * b);
                    prefetch_ahead::<34>(block, self.ahead);
                    let w = _mm256_loadu_si256(block.add(2).cast());
                    let signed = Digits { hi: _mm256_sign_epi8(a.hi, w), lo: _mm256_sign_epi8(a.lo, w) };
                    let dot = dot4(_mm256_sign_epi8(w, w), signed);
                    let scale = _mm256_set1_ps(f16_at(block) * da);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r]);
                }
            }
            let mut out = [0f32; R];
            for r in 0..R {
                out[r] = hsum(acc[r]);
            }
            out
        }
    }
}

/// The f16 values at `p + i * stride` for i in 0..4 (unaligned), converted to f32. The halves
/// are combined in a general-purpose register, which keeps the vector shuffle units free.
#[inline(always)]
unsafe fn f16x4(p: *const u8, stride: usize) -> __m128 {
    // SAFETY: the caller guarantees two readable bytes at each address; F16C (see above).
    unsafe {
        let h = |i: usize| u64::from(p.add(i * stride).cast::<u16>().read_unaligned()) << (16 * i);
        _mm_cvtph_ps(_mm_cvtsi64_si128((h(0) | h(1) | h(2) | h(3)) as i64))
    }
}

/// The f16 pairs at `p + i * stride` for i in 0..4 (unaligned), converted to 8 f32.
#[inline(always)]
unsafe fn f16x2x4(p: *const u8, stride: usize) -> __m256 {
    // SAFETY: the caller guarantees four readable bytes at each address; F16C (see above).
    unsafe {
        let w = |i: usize| u64::from(p.add(i * stride).cast::<u32>().read_unaligned());
        _mm256_cvtph_ps(_mm_set_epi64x((w(2) | (w(3) << 32)) as i64, (w(0) | (w(1) << 32)) as i64))
    }
}

/// The nibbles of two consecutive `Q4_0`/`Q4_1` blocks whose 16 bytes of nibbles start at `p`
/// and `p + stride`: the low nibbles (elements 0..16 of each block) in the first register, the
/// high ones (16..32) in the second, block `i` in 128-bit lane `i`. Pairs of blocks of the
/// activation's `Order::Groups4` match.
#[inline(always)]
unsafe fn nibbles2x32(p: *const u8, stride: usize) -> (__m256i, __m256i) {
    // SAFETY: the caller guarantees 16 readable bytes at `p` and at `p + stride`; AVX2.
    unsafe {
        let y = _mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(p.cast())),
            _mm_loadu_si128(p.add(stride).cast()),
        );
        let mask = _mm256_set1_epi8(0x0f);
        (_mm256_and_si256(y, mask), _mm256_and_si256(_mm256_srli_epi16::<4>(y), mask))
    }
}

/// Lanes of four products of 4-bit weights with activations, for two halves of the same blocks:
/// `lo` times `a_lo` plus `hi` times `a_hi`. The i16 pair sums (at most 2 * 15 * 127 each) are
/// added before widening, which saves a `vpmaddwd` per digit.
#[inline(always)]
unsafe fn dot4_halves(lo: __m256i, a_lo: Digits<__m256i>, hi: __m256i, a_hi: Digits<__m256i>) -> __m256i {
    // SAFETY: AVX2 (see above); no memory access.
    unsafe {
        let pairs_hi = _mm256_add_epi16(_mm256_maddubs_epi16(lo, a_lo.hi), _mm256_maddubs_epi16(hi, a_hi.hi));
        let pairs_lo = _mm256_add_epi16(_mm256_maddubs_epi16(lo, a_lo.lo), _mm256_maddubs_epi16(hi, a_hi.lo));
        combine256(pairs_hi, pairs_lo)
    }
}

/// `vpermps` indices putting lane 0 of a vector in lanes 0..4 and lane 1 in lanes 4..8.
const SPREAD01: [i32; 8] = [0, 0, 0, 0, 1, 1, 1, 1];

/// `Q4_0`, four blocks per step (activation in `Order::Groups4`, tail blocks natural): nibbles
/// carry an offset of 8, removed by the prepared bias lanes.
struct Q4_0<'a> {
    nb: usize,
    prep: &'a Prepared,
    ahead: usize,
}

impl RowKernel for Q4_0<'_> {
    #[inline(always)]
    unsafe fn dot<const R: usize>(&self, rows: [*const u8; R]) -> [f32; R] {
        // SAFETY: each row holds `nb` blocks of 18 bytes (d, then 16 bytes of nibbles); the
        // activation holds `nb` blocks of 32, and the bias 16 lanes per group of four blocks,
        // then 8 per tail block.
        unsafe {
            let (act, bias) = (&self.prep.act, self.prep.bias.as_ptr());
            let spread = [
                _mm256_loadu_si256(SPREAD01.as_ptr().cast()),
                _mm256_add_epi32(_mm256_loadu_si256(SPREAD01.as_ptr().cast()), _mm256_set1_epi32(2)),
            ];
            let groups = self.nb / 4;
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for g in 0..groups {
                let da = _mm_loadu_ps(act.d.as_ptr().add(4 * g));
                for r in 0..R {
                    let block = rows[r].add(18 * 4 * g);
                    prefetch_ahead::<72>(block, self.ahead);
                    let scales = _mm256_castps128_ps256(_mm_mul_ps(f16x4(block, 18), da));
                    for h in 0..2 {
                        // Blocks 2h and 2h + 1 of the group.
                        let (lo, hi) = nibbles2x32(block.add(2 + 36 * h), 18);
                        let a_lo = digits256(self.prep, 128 * g + 32 * h);
                        let a_hi = digits256(self.prep, 128 * g + 64 + 32 * h);
                        let b = _mm256_loadu_si256(bias.add(16 * g + 8 * h).cast());
                        let dot = _mm256_add_epi32(dot4_halves(lo, a_lo, hi, a_hi), b);
                        let s = _mm256_permutevar8x32_ps(scales, spread[h]);
                        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[r][h]);
                    }
                }
            }
            for b in 4 * groups..self.nb {
                let a = digits256(self.prep, 32 * b);
                let bias = _mm256_loadu_si256(bias.add(16 * groups + 8 * (b - 4 * groups)).cast());
                let da = act.d[b];
                for r in 0..R {
                    let block = rows[r].add(18 * b);
                    let dot = _mm256_add_epi32(dot4(nibbles32(block.add(2)), a), bias);
                    let scale = _mm256_set1_ps(f16_at(block) * da);
                    acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r][0]);
                }
            }
            let mut out = [0f32; R];
            for r in 0..R {
                out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
            }
            out
        }
    }
}

/// `Q4_1`, four blocks per step (activation in `Order::Groups4`, tail blocks natural):
/// `(d * da) * dot + (m * da) * S` with `[da, da * S]` prepared per block.
struct Q4_1<'a> {
    nb: usize,
    prep: &'a Prepared,
    ahead: usize,
}

impl RowKernel for Q4_1<'_> {
    #[inline(always)]
    unsafe fn dot<const R: usize>(&self, rows: [*const u8; R]) -> [f32; R] {
        // SAFETY: each row holds `nb` blocks of 20 bytes (d, m, then 16 bytes of nibbles); the
        // activation holds `nb` blocks of 32 and `aux` two floats per block.
        unsafe {
            let aux = self.prep.aux.as_ptr();
            // Even lanes of [d0 * da0, m0 * da0 * S0, ...]: lanes 0 and 2, then 4 and 6.
            let spread = [_mm256_set_epi32(2, 2, 2, 2, 0, 0, 0, 0), _mm256_set_epi32(6, 6, 6, 6, 4, 4, 4, 4)];
            let groups = self.nb / 4;
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            // The odd lanes accumulate the minimum terms m * da * S.
            let mut acc_min = [_mm256_setzero_ps(); R];
            for g in 0..groups {
                let factors = _mm256_loadu_ps(aux.add(8 * g));
                for r in 0..R {
                    let block = rows[r].add(20 * 4 * g);
                    prefetch_ahead::<80>(block, self.ahead);
                    let prod = _mm256_mul_ps(f16x2x4(block, 20), factors);
                    acc_min[r] = _mm256_add_ps(acc_min[r], prod);
                    for h in 0..2 {
                        let (lo, hi) = nibbles2x32(block.add(4 + 40 * h), 20);
                        let a_lo = digits256(self.prep, 128 * g + 32 * h);
                        let a_hi = digits256(self.prep, 128 * g + 64 + 32 * h);
                        let dot = dot4_halves(lo, a_lo, hi, a_hi);
                        let s = _mm256_permutevar8x32_ps(prod, spread[h]);
                        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[r][h]);
                    }
                }
            }
            for b in 4 * groups..self.nb {
                let a = digits256(self.prep, 32 * b);
                let factors = _mm_castpd_ps(_mm_load_sd(aux.add(2 * b).cast()));
                for r in 0..R {
                    let block = rows[r].add(20 * b);
                    let dot = dot4(nibbles32(block.add(4)), a);
                    let prod = _mm_mul_ps(f16x2_at(block), factors);
                    acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcastss_ps(prod), acc[r][0]);
                    acc_min[r] = _mm256_add_ps(acc_min[r], _mm256_castps128_ps256(prod));
                }
            }
            let mut out = [0f32; R];
            for r in 0..R {
                out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) + odd_lane_sum(acc_min[r]);
            }
            out
        }
    }
}

/// The sum of lanes 1, 3, 5 and 7.
#[inline(always)]
pub(super) unsafe fn odd_lane_sum(v: __m256) -> f32 {
    // SAFETY: AVX2 (see above); no memory access.
    unsafe {
        let odd = _mm256_castps256_ps128(_mm256_permutevar8x32_ps(v, _mm256_set_epi32(7, 5, 3, 1, 7, 5, 3, 1)));
        let s = _mm_add_ps(odd, _mm_movehl_ps(odd, odd));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

/// Lane `j` of the result is the sum of the 8 lanes of `v[j]`.
#[inline(always)]
unsafe fn lane_sums8(v: [__m256i; 8]) -> __m256i {
    // SAFETY: AVX2 (see above); no memory access.
    unsafe {
        // Per 128-bit half: [v0, v1, v2, v3] partial sums, then [v4..v8].
        let a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        let b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
        _mm256_add_epi32(_mm256_permute2x128_si256::<0x20>(a, b), _mm256_permute2x128_si256::<0x31>(a, b))
    }
}

/// `Q4_K`: per sub-block `(d * sc) * da * dot - (dmin * m) * da * S`, with the `da` and
/// `da * S` of each super-block prepared as 16 floats.
struct Q4K<'a> {
    nb: usize,
    prep: &'a Prepared,
    ahead: usize,
}

impl RowKernel for Q4K<'_> {
    #[inline(always)]
    unsafe fn dot<const R: usize>(&self, rows: [*const u8; R]) -> [f32; R] {
        // SAFETY: each row holds `nb` super-blocks of 144 bytes (d, dmin, 12 scale bytes, 128
        // bytes of nibbles; reading 16 bytes at the scales stays inside); the activation holds
        // 256 values and `aux` 16 floats per super-block.
        unsafe {
            let mask = _mm256_set1_epi8(0x0f);
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            let mut acc_min = [_mm256_setzero_ps(); R];
            for i in 0..self.nb {
                let a = QK_K * i;
                let da = _mm256_loadu_ps(self.prep.aux.as_ptr().add(16 * i));
                let das = _mm256_loadu_ps(self.prep.aux.as_ptr().add(16 * i + 8));
                for r in 0..R {
                    let block = rows[r].add(144 * i);
                    prefetch_ahead::<144>(block, self.ahead);
                    let dd = f16x2_at(block);
                    let scm = q4k_scales_mins(block.add(4));
                    let sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(scm));
                    let m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(scm)));
                    // Per sub-block j: d * sc_j * da_j, and dmin * m_j * da_j * S_j.
                    let scale = _mm256_mul_ps(_mm256_mul_ps(sc, _mm256_broadcastss_ps(dd)), da);
                    let dmin = _mm256_broadcastss_ps(_mm_movehdup_ps(dd));
                    acc_min[r] = _mm256_fmadd_ps(_mm256_mul_ps(m, dmin), das, acc_min[r]);
                    // The eight sub-block dot products, each in 8 lanes, then summed to one
                    // lane per sub-block so a single conversion and FMA scale them all.
                    let mut dots = [_mm256_setzero_si256(); 8];
                    for c in 0..4 {
                        let bytes = _mm256_loadu_si256(block.add(16 + 32 * c).cast());
                        let lo = _mm256_and_si256(bytes, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), mask);
                        dots[2 * c] = dot4(lo, digits256(self.prep, a + 64 * c));
                        dots[2 * c + 1] = dot4(hi, digits256(self.prep, a + 64 * c + 32));
                    }
                    let sums = lane_sums8(dots);
                    acc[r][i % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[r][i % 2]);
                }
            }
            let mut out = [0f32; R];
            for r in 0..R {
                out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1])) - hsum(acc_min[r]);
            }
            out
        }
    }
}

/// `Q6_K`: levels carry an offset of 32, removed by the prepared bias lanes; each lane's f32
/// scale is `d * sc * da` of its sub-block of 16.
struct Q6K<'a> {
    nb: usize,
    prep: &'a Prepared,
    ahead: usize,
}

impl RowKernel for Q6K<'_> {
    #[inline(always)]
    unsafe fn dot<const R: usize>(&self, rows: [*const u8; R]) -> [f32; R] {
        // SAFETY: each row holds `nb` super-blocks of 210 bytes (ql 128, qh 64, scales 16, d);
        // the activation holds 256 values, the bias 64 lanes and `aux` 16 floats per super-block.
        unsafe {
            let m0f = _mm256_set1_epi8(0x0f);
            let m30 = _mm256_set1_epi8(0x30);
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for i in 0..self.nb {
                let bias = self.prep.bias.as_ptr().add(64 * i);
                let da = [
                    _mm256_loadu_ps(self.prep.aux.as_ptr().add(16 * i)),
                    _mm256_loadu_ps(self.prep.aux.as_ptr().add(16 * i + 8)),
                ];
                for r in 0..R {
                    let block = rows[r].add(210 * i);
                    prefetch_ahead::<210>(block, self.ahead);
                    let d = _mm256_set1_ps(f16_at(block.add(208)));
                    let sc = _mm_loadu_si128(block.add(192).cast());
                    let sc = [_mm256_cvtepi8_epi32(sc), _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(sc))];
                    for h in 0..2 {
                        let scale = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sc[h]), d), da[h]);
                        let l0 = _mm256_loadu_si256(block.add(64 * h).cast());
                        let l1 = _mm256_loadu_si256(block.add(64 * h + 32).cast());
                        let qh = _mm256_loadu_si256(block.add(128 + 32 * h).cast());
                        // The four quarters of the half, elements 32q..32q + 32 of it (module
                        // `quant::q6_k` gives the bit layout).
                        let levels = [
                            _mm256_or_si256(
                                _mm256_and_si256(l0, m0f),
                                _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m30),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(l1, m0f),
                                _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m30),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16::<4>(l0), m0f),
                                _mm256_and_si256(qh, m30),
                            ),
                            _mm256_or_si256(
                                _mm256_and_si256(_mm256_srli_epi16::<4>(l1), m0f),
                                _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m30),
                            ),
                        ];
                        let mut dots = [_mm256_setzero_si256(); 4];
                        for (q, level) in levels.into_iter().enumerate() {
                            let e = 128 * h + 32 * q;
                            let av = digits256(self.prep, QK_K * i + e);
                            dots[q] = _mm256_add_epi32(dot4(level, av), _mm256_loadu_si256(bias.add(e / 4).cast()));
                        }
                        // Lanes 0..4 of dots[q] belong to sub-block 2q of the half, lanes 4..8 to
                        // 2q + 1; two rounds of pairwise sums leave one lane per sub-block, in the
                        // order 0, 2, 4, 6, 1, 3, 5, 7.
                        let sums =
                            _mm256_hadd_epi32(_mm256_hadd_epi32(dots[0], dots[1]), _mm256_hadd_epi32(dots[2], dots[3]));
                        let s = _mm256_permutevar8x32_ps(scale, _mm256_set_epi32(7, 5, 3, 1, 6, 4, 2, 0));
                        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), s, acc[r][h]);
                    }
                }
            }
            let mut out = [0f32; R];
            for r in 0..R {
                out[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
            }
            out
        }
    }
}
