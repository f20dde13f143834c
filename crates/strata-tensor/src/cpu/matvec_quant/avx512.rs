//! AVX-512 kernels of the quantized matrix-vector product, with and without VNNI: 64 weights per
//! 512-bit register (two `Q8_0` blocks; the low or high nibbles of four `Q4_0`/`Q4_1` blocks or of
//! 64 `Q4_K` bytes, matched by a permuted activation; four `Q6_K` sub-blocks), integer dot
//! products with both digits of the activation from the same weight register, by `vpdpbusd`
//! (VNNI: the high digit's lanes shifted left by 8 before the low digit's products are added) or
//! `vpmaddubsw` + `vpmaddwd` (plain AVX-512 BW: the high digit's i16 pairs widened with 256, the
//! low digit's with 1), then f32 scaling per lane. Blocks that do not fill a register run on
//! 256-bit registers.
//!
//! The kernels are written once, generic over [`Dot`], and `#[inline(always)]`; the two entry
//! points [`rows_avx512`] and [`rows_vnni`] carry the `#[target_feature]`s, so everything is
//! compiled inside them for their instruction set.

use std::arch::x86_64::*;
use std::marker::PhantomData;

use super::avx2::{combine256, digits256, f16_at, hsum, nibbles32, odd_lane_sum, q4k_scales_mins, q4k_scales_mins_x2};
use super::{Digits, Prepared, RowKernel, drive, prefetch_ahead};
use crate::DType;
use crate::quant::QK_K;

/// Computes `ys.len()` rows of `dtype` held in `w` with AVX-512 F/BW/DQ/VL.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/DQ/VL, AVX2, FMA and F16C; `w` must hold `ys.len()` rows of
/// `row_bytes` bytes and `prep` must have been built for `Isa::Avx512` and `dtype` from an
/// activation of the row length.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn rows_avx512(dtype: DType, w: &[u8], row_bytes: usize, prep: &Prepared, ys: &mut [f32]) {
    // SAFETY: forwarded from the caller; this function enables what `Plain` needs.
    unsafe { rows::<Plain>(dtype, w, row_bytes, prep, ys) }
}

/// Computes `ys.len()` rows of `dtype` held in `w` with AVX-512 VNNI.
///
/// # Safety
/// As [`rows_avx512`], plus AVX-512 VNNI, and `prep` built for `Isa::Avx512Vnni`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn rows_vnni(dtype: DType, w: &[u8], row_bytes: usize, prep: &Prepared, ys: &mut [f32]) {
    // SAFETY: forwarded from the caller; this function enables what `Vnni` needs.
    unsafe { rows::<Vnni>(dtype, w, row_bytes, prep, ys) }
}

/// [`rows_vnni`] for an activation of one digit (`prep.int8()`), whose low digits it leaves out.
/// (An entry point of its own: dispatching inside `rows_vnni` slowed its two-digit kernels.)
///
/// # Safety
/// As [`rows_vnni`], with every low digit of `prep` zero.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn rows_vnni_high(dtype: DType, w: &[u8], row_bytes: usize, prep: &Prepared, ys: &mut [f32]) {
    debug_assert!(prep.int8());
    // SAFETY: forwarded from the caller; this function enables what `VnniHigh` needs.
    unsafe { rows::<VnniHigh>(dtype, w, row_bytes, prep, ys) }
}

/// Computes `ys.len()` rows of a repacked `Q4_0` or `Q4_K` weight (the rows of
/// `quant::q4_0::repack_row` or `quant::q4_k::repack_row`) held in `w` with AVX-512 F/BW/DQ/VL:
/// the results of [`rows_avx512`] on the original rows.
///
/// # Safety
/// As [`rows_avx512`], with `w` holding repacked rows and `prep` built for them.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
pub(super) unsafe fn packed_avx512(dtype: DType, w: &[u8], row_bytes: usize, prep: &Prepared, ys: &mut [f32]) {
    // SAFETY: forwarded from the caller; this function enables what `Plain` needs.
    unsafe { packed::<Plain>(dtype, w, row_bytes, prep, ys) }
}

/// [`packed_avx512`] with AVX-512 VNNI: the results of [`rows_vnni`] on the original rows.
///
/// # Safety
/// As [`rows_vnni`], with `w` holding repacked rows and `prep` built for them.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn packed_vnni(dtype: DType, w: &[u8], row_bytes: usize, prep: &Prepared, ys: &mut [f32]) {
    // SAFETY: forwarded from the caller; this function enables what `Vnni` needs.
    unsafe { packed::<Vnni>(dtype, w, row_bytes, prep, ys) }
}

/// [`packed_vnni`] for an activation of one digit (see [`rows_vnni_high`]).
///
/// # Safety
/// As [`packed_vnni`], with every low digit of `prep` zero.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn packed_vnni_high(dtype: DType, w: &[u8], row_bytes: usize, prep: &Prepared, ys: &mut [f32]) {
    debug_assert!(prep.int8());
    // SAFETY: forwarded from the caller; this function enables what `VnniHigh` needs.
    unsafe { packed::<VnniHigh>(dtype, w, row_bytes, prep, ys) }
}

#[inline(always)]
unsafe fn packed<D: Dot>(dtype: DType, w: &[u8], row_bytes: usize, prep: &Prepared, ys: &mut [f32]) {
    let nb = row_bytes / dtype.block_bytes();
    let ahead = prefetch_distance(row_bytes);
    // SAFETY: forwarded from the entry points' callers.
    unsafe {
        match dtype {
            DType::Q4_0 => drive::<ROWS, _>(&Q4_0::<D, true> { nb, prep, ahead, dot: PhantomData }, w, row_bytes, ys),
            DType::Q4K => drive::<ROWS, _>(&Q4K::<D, true> { nb, prep, ahead, dot: PhantomData }, w, row_bytes, ys),
            _ => unreachable!("only Q4_0 and Q4_K are repacked"),
        }
    }
}

/// Rows per group: the kernels compute this many rows at once.
const ROWS: usize = 4;

/// The distance the kernels prefetch ahead: the rows two groups of [`ROWS`] ahead, and at least
/// [`PREFETCH_MIN_BYTES`] (short rows).
fn prefetch_distance(row_bytes: usize) -> usize {
    (PREFETCH_GROUPS * ROWS * row_bytes).max(PREFETCH_MIN_BYTES)
}

/// How many groups of rows ahead the kernels prefetch.
const PREFETCH_GROUPS: usize = 2;
/// The least distance, in bytes, the kernels prefetch ahead.
const PREFETCH_MIN_BYTES: usize = 12 * 1024;

#[inline(always)]
unsafe fn rows<D: Dot>(dtype: DType, w: &[u8], row_bytes: usize, prep: &Prepared, ys: &mut [f32]) {
    let nb = row_bytes / dtype.block_bytes();
    let ahead = prefetch_distance(row_bytes);
    // SAFETY: forwarded from the entry points' callers.
    unsafe {
        match dtype {
            DType::Q8_0 => drive::<ROWS, _>(&Q8_0::<D> { nb, prep, ahead, dot: PhantomData }, w, row_bytes, ys),
            DType::Q4_0 => drive::<ROWS, _>(&Q4_0::<D, false> { nb, prep, ahead, dot: PhantomData }, w, row_bytes, ys),
            DType::Q4_1 => drive::<ROWS, _>(&Q4_1::<D> { nb, prep, ahead, dot: PhantomData }, w, row_bytes, ys),
            DType::Q4K => drive::<ROWS, _>(&Q4K::<D, false> { nb, prep, ahead, dot: PhantomData }, w, row_bytes, ys),
            DType::Q6K => drive::<ROWS, _>(&Q6K::<D> { nb, prep, ahead, dot: PhantomData }, w, row_bytes, ys),
            DType::F32 | DType::F16 | DType::BF16 => unreachable!("not a block-quantized dtype"),
        }
    }
}

// Every function below is only ever inlined into `rows_avx512` or `rows_vnni`; the SAFETY
// comments on their intrinsic calls rely on the features those enable (VNNI only in `Vnni`, which
// only `rows_vnni` uses) and say what else they need.

/// The integer dot-product instructions, for the two digits of the activation: `vpdpbusd` or its
/// two-instruction AVX-512 BW equivalent.
trait Dot {
    /// Whether [`Dot::dot_i8`] needs the `-128 * sum` bias (the activation is then prepared with
    /// it).
    const I8_BIAS: bool;
    /// `acc` plus, in each i32 lane, the four products of the lane's unsigned bytes of `u` with the
    /// activation values `256 * hi + lo` of `a` (weight bytes at most 128 in the BW version, so its
    /// i16 pairs cannot saturate).
    unsafe fn dpbusd(acc: __m512i, u: __m512i, a: Digits<__m512i>) -> __m512i;
    /// [`Dot::dpbusd`] on 256-bit registers.
    unsafe fn dpbusd256(acc: __m256i, u: __m256i, a: Digits<__m256i>) -> __m256i;
    /// `acc` plus the lanes of `lo` times `a_lo` and of `hi` times `a_hi`, for 4-bit `lo` and
    /// `hi`: the BW version adds the i16 pair sums (at most 2 * 15 * 127 each) before widening.
    unsafe fn dpbusd_halves(
        acc: __m512i,
        lo: __m512i,
        a_lo: Digits<__m512i>,
        hi: __m512i,
        a_hi: Digits<__m512i>,
    ) -> __m512i;
    /// The lanes of [`Dot::dpbusd`] of four unsigned 4-bit registers `u[p]` with `a[p]`, summed:
    /// the VNNI version keeps two chains per digit, the BW version sums the i16 pairs of the four
    /// (at most 4 * 2 * 15 * 127) before widening.
    unsafe fn dpbusd4(u: [__m512i; 4], a: [Digits<__m512i>; 4]) -> __m512i;
    /// Lanes of four products of signed weights `w` with the activation values of `a`. `bias`
    /// holds `-128 * (sum of the lane's activation values)` when the activation was prepared for
    /// VNNI (whose versions, this default, add 128 to `w` to make it unsigned) and is ignored
    /// otherwise.
    #[inline(always)]
    unsafe fn dot_i8(bias: __m512i, w: __m512i, a: Digits<__m512i>) -> __m512i {
        // SAFETY: AVX-512 F for the flip, and what `Self::dpbusd` needs; no memory access.
        unsafe { Self::dpbusd(bias, _mm512_xor_si512(w, _mm512_set1_epi8(-128)), a) }
    }
    /// [`Dot::dot_i8`] on 256-bit registers.
    #[inline(always)]
    unsafe fn dot_i8_256(bias: __m256i, w: __m256i, a: Digits<__m256i>) -> __m256i {
        // SAFETY: AVX2 for the flip, and what `Self::dpbusd256` needs; no memory access.
        unsafe { Self::dpbusd256(bias, _mm256_xor_si256(w, _mm256_set1_epi8(-128)), a) }
    }
}

/// AVX-512 BW: `vpmaddubsw` per digit, then `vpmaddwd` with 256 (high digit) and 1 (low digit).
struct Plain;

impl Plain {
    /// The i32 lanes `256 * hi + lo` of the i16 pair sums of the two digits' products.
    #[inline(always)]
    unsafe fn combine(hi: __m512i, lo: __m512i) -> __m512i {
        // SAFETY: AVX-512 BW (see above); no memory access.
        unsafe {
            _mm512_add_epi32(_mm512_madd_epi16(hi, _mm512_set1_epi16(256)), _mm512_madd_epi16(lo, _mm512_set1_epi16(1)))
        }
    }
}

impl Dot for Plain {
    const I8_BIAS: bool = false;

    #[inline(always)]
    unsafe fn dpbusd(acc: __m512i, u: __m512i, a: Digits<__m512i>) -> __m512i {
        // SAFETY: AVX-512 BW (see above); no memory access.
        unsafe {
            let dot = Plain::combine(_mm512_maddubs_epi16(u, a.hi), _mm512_maddubs_epi16(u, a.lo));
            _mm512_add_epi32(acc, dot)
        }
    }

    #[inline(always)]
    unsafe fn dpbusd256(acc: __m256i, u: __m256i, a: Digits<__m256i>) -> __m256i {
        // SAFETY: AVX2 (see above); no memory access.
        unsafe { _mm256_add_epi32(acc, combine256(_mm256_maddubs_epi16(u, a.hi), _mm256_maddubs_epi16(u, a.lo))) }
    }

    #[inline(always)]
    unsafe fn dpbusd_halves(
        acc: __m512i,
        lo: __m512i,
        a_lo: Digits<__m512i>,
        hi: __m512i,
        a_hi: Digits<__m512i>,
    ) -> __m512i {
        // SAFETY: AVX-512 BW (see above); no memory access.
        unsafe {
            let pairs_hi = _mm512_add_epi16(_mm512_maddubs_epi16(lo, a_lo.hi), _mm512_maddubs_epi16(hi, a_hi.hi));
            let pairs_lo = _mm512_add_epi16(_mm512_maddubs_epi16(lo, a_lo.lo), _mm512_maddubs_epi16(hi, a_hi.lo));
            _mm512_add_epi32(acc, Plain::combine(pairs_hi, pairs_lo))
        }
    }

    #[inline(always)]
    unsafe fn dpbusd4(u: [__m512i; 4], a: [Digits<__m512i>; 4]) -> __m512i {
        // SAFETY: AVX-512 BW (see above); no memory access.
        unsafe {
            let pairs = |digit: fn(&Digits<__m512i>) -> __m512i| {
                let p01 = _mm512_add_epi16(
                    _mm512_maddubs_epi16(u[0], digit(&a[0])),
                    _mm512_maddubs_epi16(u[1], digit(&a[1])),
                );
                let p23 = _mm512_add_epi16(
                    _mm512_maddubs_epi16(u[2], digit(&a[2])),
                    _mm512_maddubs_epi16(u[3], digit(&a[3])),
                );
                _mm512_add_epi16(p01, p23)
            };
            Plain::combine(pairs(|d| d.hi), pairs(|d| d.lo))
        }
    }

    #[inline(always)]
    unsafe fn dot_i8(_bias: __m512i, w: __m512i, a: Digits<__m512i>) -> __m512i {
        // SAFETY: AVX-512 BW (see above); no memory access.
        unsafe {
            // |w| times the digits with w's sign; digits are never -128, so negating them is exact.
            let negate = _mm512_movepi8_mask(w);
            let zero = _mm512_setzero_si512();
            let signed = Digits {
                hi: _mm512_mask_sub_epi8(a.hi, negate, zero, a.hi),
                lo: _mm512_mask_sub_epi8(a.lo, negate, zero, a.lo),
            };
            Plain::dpbusd(zero, _mm512_abs_epi8(w), signed)
        }
    }

    #[inline(always)]
    unsafe fn dot_i8_256(_bias: __m256i, w: __m256i, a: Digits<__m256i>) -> __m256i {
        // SAFETY: AVX2 (see above); no memory access.
        unsafe {
            let signed = Digits { hi: _mm256_sign_epi8(a.hi, w), lo: _mm256_sign_epi8(a.lo, w) };
            Plain::dpbusd256(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), signed)
        }
    }
}

/// AVX-512 VNNI: `vpdpbusd` per digit, the high digit's lanes shifted left by 8 (times 256) before
/// the low digit's products are accumulated onto them.
struct Vnni;

impl Dot for Vnni {
    const I8_BIAS: bool = true;

    #[inline(always)]
    unsafe fn dpbusd(acc: __m512i, u: __m512i, a: Digits<__m512i>) -> __m512i {
        // SAFETY: AVX-512 VNNI (only `rows_vnni` instantiates `Vnni`); no memory access.
        unsafe {
            let hi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, a.hi);
            _mm512_dpbusd_epi32(_mm512_add_epi32(acc, _mm512_slli_epi32::<8>(hi)), u, a.lo)
        }
    }

    #[inline(always)]
    unsafe fn dpbusd256(acc: __m256i, u: __m256i, a: Digits<__m256i>) -> __m256i {
        // SAFETY: AVX-512 VNNI and VL (see above); no memory access.
        unsafe {
            let hi = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, a.hi);
            _mm256_dpbusd_epi32(_mm256_add_epi32(acc, _mm256_slli_epi32::<8>(hi)), u, a.lo)
        }
    }

    #[inline(always)]
    unsafe fn dpbusd_halves(
        acc: __m512i,
        lo: __m512i,
        a_lo: Digits<__m512i>,
        hi: __m512i,
        a_hi: Digits<__m512i>,
    ) -> __m512i {
        // SAFETY: AVX-512 VNNI (see above); no memory access.
        unsafe {
            let high = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, a_lo.hi), hi, a_hi.hi);
            let acc = _mm512_add_epi32(acc, _mm512_slli_epi32::<8>(high));
            _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, lo, a_lo.lo), hi, a_hi.lo)
        }
    }

    #[inline(always)]
    unsafe fn dpbusd4(u: [__m512i; 4], a: [Digits<__m512i>; 4]) -> __m512i {
        // SAFETY: AVX-512 VNNI (see above); no memory access.
        unsafe {
            let zero = _mm512_setzero_si512();
            let high = _mm512_add_epi32(
                _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, u[0], a[0].hi), u[1], a[1].hi),
                _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, u[2], a[2].hi), u[3], a[3].hi),
            );
            let first =
                _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32::<8>(high), u[0], a[0].lo), u[1], a[1].lo);
            _mm512_add_epi32(first, _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, u[2], a[2].lo), u[3], a[3].lo))
        }
    }
}

/// [`Vnni`] for one-digit activations (`ActQuant::Int8`: every low digit zero): the same lanes
/// from the high digits' `vpdpbusd` alone, half the instructions.
struct VnniHigh;

impl Dot for VnniHigh {
    const I8_BIAS: bool = true;

    #[inline(always)]
    unsafe fn dpbusd(acc: __m512i, u: __m512i, a: Digits<__m512i>) -> __m512i {
        // SAFETY: AVX-512 VNNI (only `rows_vnni_high` and `packed_vnni_high` instantiate `VnniHigh`); no
        // memory access.
        unsafe { _mm512_add_epi32(acc, _mm512_slli_epi32::<8>(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, a.hi))) }
    }

    #[inline(always)]
    unsafe fn dpbusd256(acc: __m256i, u: __m256i, a: Digits<__m256i>) -> __m256i {
        // SAFETY: AVX-512 VNNI and VL (see above); no memory access.
        unsafe { _mm256_add_epi32(acc, _mm256_slli_epi32::<8>(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, a.hi))) }
    }

    #[inline(always)]
    unsafe fn dpbusd_halves(
        acc: __m512i,
        lo: __m512i,
        a_lo: Digits<__m512i>,
        hi: __m512i,
        a_hi: Digits<__m512i>,
    ) -> __m512i {
        // SAFETY: AVX-512 VNNI (see above); no memory access.
        unsafe {
            let high = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, a_lo.hi), hi, a_hi.hi);
            _mm512_add_epi32(acc, _mm512_slli_epi32::<8>(high))
        }
    }

    #[inline(always)]
    unsafe fn dpbusd4(u: [__m512i; 4], a: [Digits<__m512i>; 4]) -> __m512i {
        // SAFETY: AVX-512 VNNI (see above); no memory access.
        unsafe {
            let zero = _mm512_setzero_si512();
            let high = _mm512_add_epi32(
                _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, u[0], a[0].hi), u[1], a[1].hi),
                _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, u[2], a[2].hi), u[3], a[3].hi),
            );
            _mm512_slli_epi32::<8>(high)
        }
    }
}

/// The two digit registers of the 64 activation values at offset `at` of `prep`'s arrays.
#[inline(always)]
unsafe fn digits512(prep: &Prepared, at: usize) -> Digits<__m512i> {
    // SAFETY: the caller guarantees 64 values at `at`; AVX-512 F.
    unsafe {
        Digits {
            hi: _mm512_loadu_si512(prep.hi.as_ptr().add(at).cast()),
            lo: _mm512_loadu_si512(prep.lo.as_ptr().add(at).cast()),
        }
    }
}

/// The f16 values at `p` and `p + stride` (unaligned), converted to f32 in lanes 0 and 1.
#[inline(always)]
unsafe fn f16_pair(p: *const u8, stride: usize) -> __m128 {
    // SAFETY: the caller guarantees two readable bytes at `p` and at `p + stride`; F16C.
    unsafe {
        let h0 = i32::from(p.cast::<u16>().read_unaligned());
        let h1 = i32::from(p.add(stride).cast::<u16>().read_unaligned());
        _mm_cvtph_ps(_mm_insert_epi16::<1>(_mm_cvtsi32_si128(h0), h1))
    }
}

/// A 16-lane vector of `s[0]` in lanes 0..8 and `s[i1]` in lanes 8..16, for the two blocks of a
/// register.
#[inline(always)]
unsafe fn spread_pair<const I1: i32>(s: __m128) -> __m512 {
    // SAFETY: AVX-512 F; only lanes 0..4 of the cast are read.
    unsafe {
        let idx = _mm512_set_epi32(I1, I1, I1, I1, I1, I1, I1, I1, 0, 0, 0, 0, 0, 0, 0, 0);
        _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(s))
    }
}

/// `Q8_0`, two blocks per register.
struct Q8_0<'a, D> {
    nb: usize,
    prep: &'a Prepared,
    ahead: usize,
    dot: PhantomData<D>,
}

impl<D: Dot> RowKernel for Q8_0<'_, D> {
    #[inline(always)]
    unsafe fn dot<const R: usize>(&self, rows: [*const u8; R]) -> [f32; R] {
        // SAFETY: each row holds `nb` blocks of 34 bytes (d, then 32 values); the activation
        // holds `nb` blocks of 32, and the bias (VNNI only) 8 lanes per block.
        unsafe {
            let act = &self.prep.act;
            let vnni_bias = D::I8_BIAS;
            debug_assert_eq!(vnni_bias, !self.prep.bias.is_empty());
            let mut acc = [_mm512_setzero_ps(); R];
            for b in (0..self.nb - self.nb % 2).step_by(2) {
                let a = digits512(self.prep, 32 * b);
                let bias = if vnni_bias {
                    _mm512_loadu_si512(self.prep.bias.as_ptr().add(8 * b).cast())
                } else {
                    _mm512_setzero_si512()
                };
                let da = _mm_castpd_ps(_mm_load_sd(act.d.as_ptr().add(b).cast()));
                for r in 0..R {
                    let block = rows[r].add(34 * b);
                    prefetch_ahead::<68>(block, self.ahead);
                    let lo = _mm512_castsi256_si512(_mm256_loadu_si256(block.add(2).cast()));
                    let w = _mm512_inserti64x4::<1>(lo, _mm256_loadu_si256(block.add(36).cast()));
                    let scale = spread_pair::<1>(_mm_mul_ps(f16_pair(block, 34), da));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(D::dot_i8(bias, w, a)), scale, acc[r]);
                }
            }
            let mut out = [0f32; R];
            for r in 0..R {
                out[r] = _mm512_reduce_add_ps(acc[r]);
            }
            if self.nb % 2 == 1 {
                let b = self.nb - 1;
                let a = digits256(self.prep, 32 * b);
                let bias = if vnni_bias {
                    _mm256_loadu_si256(self.prep.bias.as_ptr().add(8 * b).cast())
                } else {
                    _mm256_setzero_si256()
                };
                for r in 0..R {
                    let block = rows[r].add(34 * b);
                    prefetch_ahead::<34>(block, self.ahead);
                    let w = _mm256_loadu_si256(block.add(2).cast());
                    let dot = _mm256_cvtepi32_ps(D::dot_i8_256(bias, w, a));
                    out[r] += hsum(_mm256_mul_ps(dot, _mm256_set1_ps(f16_at(block) * act.d[b])));
                }
            }
            out
        }
    }
}

/// `vpermt2w` indices gathering the nibbles of four `Q4_0` blocks from the 72 bytes at the first
/// one, loaded as bytes 0..64 and 8..72: 128-bit lane `b` gets bytes `18b + 2..18b + 18`.
static Q4_0_QS: [u16; 32] = {
    let mut t = [0u16; 32];
    let mut i = 0;
    while i < 32 {
        let byte = 18 * (i / 8) + 2 + 2 * (i % 8);
        t[i] = if byte < 64 { (byte / 2) as u16 } else { 32 + ((byte - 8) / 2) as u16 };
        i += 1;
    }
    t
};

/// `vpermt2w` indices gathering the scales `[d0, .., d7]` of eight `Q4_0` blocks (two groups) from
/// the first 64 bytes of each group (the second group's in the second operand, indices 32..64).
static Q4_0_D8: [u16; 16] = [0, 9, 18, 27, 32, 41, 50, 59, 0, 0, 0, 0, 0, 0, 0, 0];

/// `vpermw` indices gathering the scales `[d0, .., d3]` of four `Q4_0` blocks from their first 64
/// bytes.
static Q4_0_D: [u16; 32] =
    [0, 9, 18, 27, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// `vpermt2w` indices gathering the nibbles of four `Q4_1` blocks from the 80 bytes at the first
/// one, loaded as bytes 0..64 and 16..80: 128-bit lane `b` gets bytes `20b + 4..20b + 20`.
static Q4_1_QS: [u16; 32] = {
    let mut t = [0u16; 32];
    let mut i = 0;
    while i < 32 {
        let byte = 20 * (i / 8) + 4 + 2 * (i % 8);
        t[i] = if byte < 64 { (byte / 2) as u16 } else { 32 + ((byte - 16) / 2) as u16 };
        i += 1;
    }
    t
};

/// `vpermw` indices gathering `[d0, m0, .., d3, m3]` of four `Q4_1` blocks from their first 64
/// bytes.
static Q4_1_DM: [u16; 32] =
    [0, 1, 10, 11, 20, 21, 30, 31, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// `vpermps` indices putting lane `i` of a 4-lane vector in 128-bit lane `i` (lanes `4i..4i+4`).
static SPREAD4: [i32; 16] = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3];

/// `vpermps` indices putting lane `4 + i` of an 8-lane vector in 128-bit lane `i`.
static SPREAD4_HI: [i32; 16] = [4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7];

/// `vpermps` indices putting the even lanes `2i` of an 8-lane vector in 128-bit lane `i`.
static SPREAD4_EVEN: [i32; 16] = [0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6];

/// `Q4_0`, four blocks per pair of registers (activation in [`super::Order::Groups4`]); the offset
/// of 8 is removed by the prepared bias lanes. A group's 72 bytes are loaded as two registers,
/// from which one `vpermt2w` gathers the four blocks' nibbles into 128-bit lanes (`Q4_0_QS`): far
/// fewer instructions than loading and inserting each block's nibbles. Groups go in pairs, whose
/// eight f16 scales one `vpermt2w` gathers from the two groups' first registers (`Q4_0_D8`); a
/// last odd group gathers its four with one `vpermw` (`Q4_0_D`).
///
/// With `PACKED`, the rows are in the layout of `quant::q4_0::repack_row` (`cpu::RepackedQ4_0`):
/// a group's nibbles are one load and a pair's scales another, with no gathering; the arithmetic,
/// and so every result bit, is the same.
struct Q4_0<'a, D, const PACKED: bool> {
    nb: usize,
    prep: &'a Prepared,
    ahead: usize,
    dot: PhantomData<D>,
}

impl<D: Dot, const PACKED: bool> RowKernel for Q4_0<'_, D, PACKED> {
    #[inline(always)]
    unsafe fn dot<const R: usize>(&self, rows: [*const u8; R]) -> [f32; R] {
        // SAFETY: each row holds `nb` blocks of 18 bytes (d, then 16 bytes of nibbles), or their
        // repacked form of the same length (the groups' nibbles at `64 * g`, their scales at
        // `64 * groups + 8 * g`, then the tail blocks at `18 * b`); the activation holds `nb`
        // blocks of 32 and the bias 16 lanes per group of four blocks, then 8 per tail block.
        unsafe {
            let (act, bias) = (&self.prep.act, self.prep.bias.as_ptr());
            let spread = _mm512_loadu_si512(SPREAD4.as_ptr().cast());
            let qs_idx = _mm512_loadu_si512(Q4_0_QS.as_ptr().cast());
            let d_idx = _mm512_loadu_si512(Q4_0_D.as_ptr().cast());
            let mask = _mm512_set1_epi8(0x0f);
            let groups = self.nb / 4;
            // Where a repacked row keeps the scales of its groups.
            let scales_at = 64 * groups;
            let mut acc = [_mm512_setzero_ps(); R];
            let d8_idx = _mm512_castsi256_si512(_mm256_loadu_si256(Q4_0_D8.as_ptr().cast()));
            let spread_hi = _mm512_loadu_si512(SPREAD4_HI.as_ptr().cast());
            // Two groups (eight blocks) per step: one `vpermt2w` (or one load) gathers their eight
            // scales, and one conversion and one product with the activation's units serve both.
            let pairs = groups - groups % 2;
            for g in (0..pairs).step_by(2) {
                let a = [
                    (digits512(self.prep, 128 * g), digits512(self.prep, 128 * g + 64)),
                    (digits512(self.prep, 128 * g + 128), digits512(self.prep, 128 * g + 192)),
                ];
                let biases =
                    [_mm512_loadu_si512(bias.add(16 * g).cast()), _mm512_loadu_si512(bias.add(16 * g + 16).cast())];
                let da = _mm256_loadu_ps(act.d.as_ptr().add(4 * g));
                for r in 0..R {
                    let block = rows[r].add(18 * 4 * g);
                    prefetch_ahead::<144>(block, self.ahead);
                    let (d, qs) = if PACKED {
                        let d = _mm_loadu_si128(rows[r].add(scales_at + 8 * g).cast());
                        let nibbles = rows[r].add(64 * g);
                        (d, [_mm512_loadu_si512(nibbles.cast()), _mm512_loadu_si512(nibbles.add(64).cast())])
                    } else {
                        let z = [_mm512_loadu_si512(block.cast()), _mm512_loadu_si512(block.add(72).cast())];
                        let d = _mm512_castsi512_si128(_mm512_permutex2var_epi16(z[0], d8_idx, z[1]));
                        let qs = [0, 1].map(|h| {
                            _mm512_permutex2var_epi16(z[h], qs_idx, _mm512_loadu_si512(block.add(72 * h + 8).cast()))
                        });
                        (d, qs)
                    };
                    let prod = _mm512_castps256_ps512(_mm256_mul_ps(_mm256_cvtph_ps(d), da));
                    let scales = [_mm512_permutexvar_ps(spread, prod), _mm512_permutexvar_ps(spread_hi, prod)];
                    for h in 0..2 {
                        let (lo, hi) =
                            (_mm512_and_si512(qs[h], mask), _mm512_and_si512(_mm512_srli_epi16::<4>(qs[h]), mask));
                        let dot = D::dpbusd_halves(biases[h], lo, a[h].0, hi, a[h].1);
                        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scales[h], acc[r]);
                    }
                }
            }
            // An odd last group on its own.
            for g in pairs..groups {
                let a_lo = digits512(self.prep, 128 * g);
                let a_hi = digits512(self.prep, 128 * g + 64);
                let bias = _mm512_loadu_si512(bias.add(16 * g).cast());
                let da = _mm_loadu_ps(act.d.as_ptr().add(4 * g));
                for r in 0..R {
                    let block = rows[r].add(18 * 4 * g);
                    prefetch_ahead::<72>(block, self.ahead);
                    let (d, qs) = if PACKED {
                        let d = _mm_loadl_epi64(rows[r].add(scales_at + 8 * g).cast());
                        (d, _mm512_loadu_si512(rows[r].add(64 * g).cast()))
                    } else {
                        let z0 = _mm512_loadu_si512(block.cast());
                        let z1 = _mm512_loadu_si512(block.add(8).cast());
                        (
                            _mm512_castsi512_si128(_mm512_permutexvar_epi16(d_idx, z0)),
                            _mm512_permutex2var_epi16(z0, qs_idx, z1),
                        )
                    };
                    let (lo, hi) = (_mm512_and_si512(qs, mask), _mm512_and_si512(_mm512_srli_epi16::<4>(qs), mask));
                    let dot = D::dpbusd_halves(bias, lo, a_lo, hi, a_hi);
                    let d = _mm_cvtph_ps(d);
                    let scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_mul_ps(d, da)));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
                }
            }
            // The tail blocks are at `18 * b` in both layouts.
            let mut tail = [_mm256_setzero_ps(); R];
            for b in 4 * groups..self.nb {
                let a = digits256(self.prep, 32 * b);
                let bias = _mm256_loadu_si256(bias.add(16 * groups + 8 * (b - 4 * groups)).cast());
                for r in 0..R {
                    let block = rows[r].add(18 * b);
                    prefetch_ahead::<18>(block, self.ahead);
                    let dot = _mm256_cvtepi32_ps(D::dpbusd256(bias, nibbles32(block.add(2)), a));
                    tail[r] = _mm256_fmadd_ps(dot, _mm256_set1_ps(f16_at(block) * act.d[b]), tail[r]);
                }
            }
            let mut out = [0f32; R];
            for r in 0..R {
                out[r] = _mm512_reduce_add_ps(acc[r]) + hsum(tail[r]);
            }
            out
        }
    }
}

/// `Q4_1`, four blocks per pair of registers (activation in [`super::Order::Groups4`]):
/// `(d * da) * dot + (m * da) * S` with `[da, da * S]` prepared per block. Nibbles, scales and
/// minimums are gathered from two registers as for `Q4_0`.
struct Q4_1<'a, D> {
    nb: usize,
    prep: &'a Prepared,
    ahead: usize,
    dot: PhantomData<D>,
}

impl<D: Dot> RowKernel for Q4_1<'_, D> {
    #[inline(always)]
    unsafe fn dot<const R: usize>(&self, rows: [*const u8; R]) -> [f32; R] {
        // SAFETY: each row holds `nb` blocks of 20 bytes (d, m, then 16 bytes of nibbles); the
        // activation holds `nb` blocks of 32 and `aux` two floats per block.
        unsafe {
            let aux = self.prep.aux.as_ptr();
            let spread = _mm512_loadu_si512(SPREAD4_EVEN.as_ptr().cast());
            let qs_idx = _mm512_loadu_si512(Q4_1_QS.as_ptr().cast());
            let dm_idx = _mm512_loadu_si512(Q4_1_DM.as_ptr().cast());
            let mask = _mm512_set1_epi8(0x0f);
            let groups = self.nb / 4;
            let mut acc = [_mm512_setzero_ps(); R];
            // The odd lanes accumulate the minimum terms m * da * S.
            let mut acc_min = [_mm256_setzero_ps(); R];
            for g in 0..groups {
                let a_lo = digits512(self.prep, 128 * g);
                let a_hi = digits512(self.prep, 128 * g + 64);
                let factors = _mm256_loadu_ps(aux.add(8 * g));
                for r in 0..R {
                    let block = rows[r].add(20 * 4 * g);
                    prefetch_ahead::<80>(block, self.ahead);
                    let z0 = _mm512_loadu_si512(block.cast());
                    let z1 = _mm512_loadu_si512(block.add(16).cast());
                    let qs = _mm512_permutex2var_epi16(z0, qs_idx, z1);
                    let (lo, hi) = (_mm512_and_si512(qs, mask), _mm512_and_si512(_mm512_srli_epi16::<4>(qs), mask));
                    let dot = D::dpbusd_halves(_mm512_setzero_si512(), lo, a_lo, hi, a_hi);
                    // [d_i * da_i, m_i * da_i * S_i] for the four blocks.
                    let dm = _mm512_castsi512_si128(_mm512_permutexvar_epi16(dm_idx, z0));
                    let prod = _mm256_mul_ps(_mm256_cvtph_ps(dm), factors);
                    let scale = _mm512_permutexvar_ps(spread, _mm512_castps256_ps512(prod));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
                    acc_min[r] = _mm256_add_ps(acc_min[r], prod);
                }
            }
            let mut tail = [_mm256_setzero_ps(); R];
            for b in 4 * groups..self.nb {
                let a = digits256(self.prep, 32 * b);
                let factors = _mm_castpd_ps(_mm_load_sd(aux.add(2 * b).cast()));
                for r in 0..R {
                    let block = rows[r].add(20 * b);
                    prefetch_ahead::<20>(block, self.ahead);
                    let dot = _mm256_cvtepi32_ps(D::dpbusd256(_mm256_setzero_si256(), nibbles32(block.add(4)), a));
                    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(block.cast::<i32>().read_unaligned()));
                    let prod = _mm_mul_ps(dm, factors);
                    tail[r] = _mm256_fmadd_ps(dot, _mm256_broadcastss_ps(prod), tail[r]);
                    acc_min[r] = _mm256_add_ps(acc_min[r], _mm256_castps128_ps256(prod));
                }
            }
            let mut out = [0f32; R];
            for r in 0..R {
                out[r] = _mm512_reduce_add_ps(acc[r]) + hsum(tail[r]) + odd_lane_sum(acc_min[r]);
            }
            out
        }
    }
}

/// `Q4_K` (activation in [`super::Order::SubBlocks0213`]): per sub-block
/// `(d * sc) * da * dot - (dmin * m) * da * S`. The low nibbles of 64 bytes (sub-blocks `4h` and
/// `4h + 2`) fill one register, their high nibbles (`4h + 1`, `4h + 3`) another; the four
/// registers' lanes are then summed to two per sub-block before scaling.
///
/// With `PACKED`, the nibbles are in the layout of `quant::q4_k::repack_row`
/// (`cpu::RepackedWeight`), where lane `m` of the four registers holds the nibbles that the
/// original layout's in-lane shuffles sum into lane `m`: the four registers' dot products are then
/// accumulated in the same lanes ([`Dot::dpbusd4`]), with the same integers, and the rest is
/// unchanged.
struct Q4K<'a, D, const PACKED: bool> {
    nb: usize,
    prep: &'a Prepared,
    ahead: usize,
    dot: PhantomData<D>,
}

impl<D: Dot, const PACKED: bool> RowKernel for Q4K<'_, D, PACKED> {
    #[inline(always)]
    unsafe fn dot<const R: usize>(&self, rows: [*const u8; R]) -> [f32; R] {
        // SAFETY: each row holds `nb` super-blocks of 144 bytes (d, dmin, 12 scale bytes, 128
        // bytes of nibbles; reading 16 bytes at the scales stays inside); the activation holds
        // 256 values and `aux` 16 floats per super-block.
        unsafe {
            let mask = _mm512_set1_epi8(0x0f);
            let dd_idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            // Lanes 8..16 accumulate dmin * m * da * S.
            let mut acc_min = [_mm512_setzero_ps(); R];
            for i in 0..self.nb {
                let factors = _mm512_loadu_ps(self.prep.aux.as_ptr().add(16 * i));
                // The packed scales of two rows are unpacked together in 256-bit registers.
                let mut packed = [_mm_setzero_si128(); R];
                let mut r = 0;
                while r + 1 < R {
                    let both = q4k_scales_mins_x2(rows[r].add(144 * i + 4), rows[r + 1].add(144 * i + 4));
                    packed[r] = _mm256_castsi256_si128(both);
                    packed[r + 1] = _mm256_extracti128_si256::<1>(both);
                    r += 2;
                }
                if r < R {
                    packed[r] = q4k_scales_mins(rows[r].add(144 * i + 4));
                }
                for r in 0..R {
                    let block = rows[r].add(144 * i);
                    prefetch_ahead::<144>(block, self.ahead);
                    // [d x 8, dmin x 8] times [sc_j, m_j] times [da_j, da_j * S_j].
                    let dd = _mm512_permutexvar_ps(
                        dd_idx,
                        _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(block.cast::<i32>().read_unaligned()))),
                    );
                    let scm = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(packed[r]));
                    let t = _mm512_mul_ps(_mm512_mul_ps(scm, dd), factors);
                    acc_min[r] = _mm512_add_ps(acc_min[r], t);
                    let mut q = [_mm512_setzero_si512(); 4];
                    for h in 0..2 {
                        let bytes = _mm512_loadu_si512(block.add(16 + 64 * h).cast());
                        q[2 * h] = _mm512_and_si512(bytes, mask);
                        q[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(bytes), mask);
                    }
                    let a: [Digits<__m512i>; 4] = std::array::from_fn(|p| digits512(self.prep, QK_K * i + 64 * p));
                    let z = if PACKED {
                        D::dpbusd4(q, a)
                    } else {
                        let dots: [__m512i; 4] = std::array::from_fn(|p| D::dpbusd(_mm512_setzero_si512(), q[p], a[p]));
                        // Sum each register's 8 lanes per sub-block down to 2 with in-lane
                        // shuffles: then one conversion and one FMA scale all eight sub-blocks.
                        let x = _mm512_add_epi32(
                            _mm512_unpacklo_epi32(dots[0], dots[1]),
                            _mm512_unpackhi_epi32(dots[0], dots[1]),
                        );
                        let y = _mm512_add_epi32(
                            _mm512_unpacklo_epi32(dots[2], dots[3]),
                            _mm512_unpackhi_epi32(dots[2], dots[3]),
                        );
                        _mm512_add_epi32(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y))
                    };
                    let scale = _mm512_permutexvar_ps(_mm512_loadu_si512(Z_ORDER.as_ptr().cast()), t);
                    acc[r][i % 2] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(z), scale, acc[r][i % 2]);
                }
            }
            let mut out = [0f32; R];
            for r in 0..R {
                let mins = _mm512_extractf32x8_ps::<1>(acc_min[r]);
                out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])) - hsum(mins);
            }
            out
        }
    }
}

/// `Q6_K`: a register holds 64 elements (four sub-blocks of 16, one per 128-bit lane). The four
/// registers of a super-block are summed to one lane per sub-block with in-lane shuffles, then the
/// offset of 32 is removed by the prepared per-sub-block bias and one FMA applies `d * sc * da` of
/// every sub-block. Sums, bias and factors are in the transposed order [`TRANSPOSE4`] leaves them.
struct Q6K<'a, D> {
    nb: usize,
    prep: &'a Prepared,
    ahead: usize,
    dot: PhantomData<D>,
}

impl<D: Dot> RowKernel for Q6K<'_, D> {
    #[inline(always)]
    unsafe fn dot<const R: usize>(&self, rows: [*const u8; R]) -> [f32; R] {
        // SAFETY: each row holds `nb` super-blocks of 210 bytes (ql 128, qh 64, scales 16, d);
        // the activation holds 256 values, and the bias and `aux` 16 lanes per super-block.
        unsafe {
            let m0f = _mm512_set1_epi8(0x0f);
            let m30 = _mm512_set1_epi8(0x30);
            // High bits for elements 0..32 of a half sit at bits 0..2 of qh (shift left by 4),
            // for 32..64 at bits 2..4 (by 2), for 64..96 at bits 4..6 (none), for 96..128 at
            // bits 6..8 (right by 2); see `quant::q6_k`.
            let shl = _mm512_set_epi64(2 * S1, 2 * S1, 2 * S1, 2 * S1, 4 * S1, 4 * S1, 4 * S1, 4 * S1);
            let shr = _mm512_set_epi64(2 * S1, 2 * S1, 2 * S1, 2 * S1, 0, 0, 0, 0);
            let transpose = _mm_loadu_si128(TRANSPOSE4.as_ptr().cast());
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for i in 0..self.nb {
                let bias = _mm512_loadu_si512(self.prep.bias.as_ptr().add(16 * i).cast());
                let da = _mm512_loadu_ps(self.prep.aux.as_ptr().add(16 * i));
                for r in 0..R {
                    let block = rows[r].add(210 * i);
                    prefetch_ahead::<210>(block, self.ahead);
                    let d = _mm512_set1_ps(f16_at(block.add(208)));
                    let sc = _mm_shuffle_epi8(_mm_loadu_si128(block.add(192).cast()), transpose);
                    let scale = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)), d), da);
                    let mut dots = [_mm512_setzero_si512(); 4];
                    for h in 0..2 {
                        let ql = _mm512_loadu_si512(block.add(64 * h).cast());
                        let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(block.add(128 + 32 * h).cast()));
                        // Select the low nibble from the first operand, bits 4..6 from the second.
                        let first = _mm512_ternarylogic_epi32::<0xe4>(
                            ql,
                            _mm512_and_si512(_mm512_sllv_epi16(qh, shl), m30),
                            m0f,
                        );
                        let second = _mm512_ternarylogic_epi32::<0xe4>(
                            _mm512_srli_epi16::<4>(ql),
                            _mm512_and_si512(_mm512_srlv_epi16(qh, shr), m30),
                            m0f,
                        );
                        for (j, q) in [first, second].into_iter().enumerate() {
                            let c = 2 * h + j;
                            dots[c] = D::dpbusd(_mm512_setzero_si512(), q, digits512(self.prep, QK_K * i + 64 * c));
                        }
                    }
                    let x = _mm512_add_epi32(
                        _mm512_unpacklo_epi32(dots[0], dots[1]),
                        _mm512_unpackhi_epi32(dots[0], dots[1]),
                    );
                    let y = _mm512_add_epi32(
                        _mm512_unpacklo_epi32(dots[2], dots[3]),
                        _mm512_unpackhi_epi32(dots[2], dots[3]),
                    );
                    let z = _mm512_add_epi32(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y));
                    let z = _mm512_add_epi32(z, bias);
                    acc[r][i % 2] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(z), scale, acc[r][i % 2]);
                }
            }
            let mut out = [0f32; R];
            for r in 0..R {
                out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
            }
            out
        }
    }
}

/// `vpshufb` indices transposing a 4 x 4 matrix of bytes: byte `4s + c` reads byte `4c + s`. Summing
/// the four 128-bit lanes of registers 0..4 with `vpunpck*` leaves, in lane `4s + c`, the sum over
/// 128-bit lane `s` of register `c`; for `Q6_K` that is sub-block `4c + s`, and its scales are
/// transposed the same way.
static TRANSPOSE4: [u8; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];

/// A shift of 1 in each of four u16 lanes.
const S1: i64 = 0x0001_0001_0001_0001;

/// The sub-block of each lane of the reduced `Q4_K` dot products: in 128-bit lane `s`, the sums
/// of registers 0..4 over that lane, register `p` holding sub-blocks `4 * (p / 2) + p % 2` (first
/// half) and that plus 2 (second half).
static Z_ORDER: [i32; 16] = [0, 1, 4, 5, 0, 1, 4, 5, 2, 3, 6, 7, 2, 3, 6, 7];
