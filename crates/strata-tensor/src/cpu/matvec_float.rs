//! Matrix-vector product `y = W x` for f32, f16 and bf16 weights, and the converting SIMD loads
//! that the float kernels share.
//!
//! Decode reads every weight once per token, so this kernel is bound by memory bandwidth: the
//! goal is to keep the memory system busy, not to save arithmetic. The rows of `W` are split into
//! chunks of a few hundred KiB that rayon spreads over its threads. Within a chunk, eight rows
//! (four with AVX2) are walked at once so that every load of `x` (which stays in L1) feeds eight
//! weight streams and one core keeps enough cache misses in flight; each row keeps two f32
//! accumulators. Weights are widened to f32 in registers (`vcvtph2ps` for f16,
//! a 16-bit left shift for bf16) and never written back, and all weight loads are unaligned
//! loads, since a row of f16 or bf16 may start at any even address.
//!
//! The level of SIMD is an explicit parameter of [`matvec_float_with`] so that tests run every
//! level the CPU has; [`matvec_float`] uses [`crate::cpu::isa`].

use crate::DType;
use crate::cpu::{Isa, isa};

/// Below this many weight bytes a product runs on the calling thread: a task costs more than it
/// saves.
const SERIAL_BYTES: usize = 256 * 1024;

/// The weight bytes one rayon task reads, roughly: enough to amortise the task's cost, small
/// enough to balance the threads at the end.
const CHUNK_BYTES: usize = 256 * 1024;

/// `y = W x` for float weights `w` (`n` rows of `k` elements of `dtype`, little-endian), at the
/// SIMD level of [`crate::cpu::isa`].
pub(crate) fn matvec_float(dtype: DType, w: &[u8], n: usize, k: usize, x: &[f32], y: &mut [f32]) {
    matvec_float_with(isa(), dtype, w, n, k, x, y);
}

/// `y = W x` as [`matvec_float`], at SIMD level `isa` (lowered to what this CPU supports).
pub(crate) fn matvec_float_with(isa: Isa, dtype: DType, w: &[u8], n: usize, k: usize, x: &[f32], y: &mut [f32]) {
    let isa = isa.min(Isa::detect());
    let row_bytes = k * dtype.block_bytes();
    assert!(!dtype.is_quantized(), "matvec_float called with block dtype {dtype}");
    assert!(w.len() >= n * row_bytes && x.len() == k && y.len() == n, "matvec_float operands checked by the caller");
    let total = n * row_bytes;
    if total <= SERIAL_BYTES || rayon::current_num_threads() == 1 {
        rows(isa, dtype, w, k, x, y);
        return;
    }
    let rows_per_task = rows_per_task(n, row_bytes);
    super::team::for_each_chunk_mut(y, rows_per_task, |t, yc| {
        let r0 = t * rows_per_task;
        rows(isa, dtype, &w[r0 * row_bytes..(r0 + yc.len()) * row_bytes], k, x, yc);
    });
}

/// Rows per parallel task for `n` rows of `row_bytes`: about [`CHUNK_BYTES`] of weights, a multiple
/// of the eight-row block, and at least eight tasks per thread so that the threads finish
/// together.
pub(super) fn rows_per_task(n: usize, row_bytes: usize) -> usize {
    let by_bytes = CHUNK_BYTES / row_bytes.max(1);
    let by_balance = n.div_ceil(8 * rayon::current_num_threads());
    by_bytes.min(by_balance).max(8).next_multiple_of(8)
}

/// `y = W x` on the calling thread, for `y.len()` rows of `w`.
pub(super) fn rows(isa: Isa, dtype: DType, w: &[u8], k: usize, x: &[f32], y: &mut [f32]) {
    match dtype {
        DType::F32 => rows_typed::<F32>(isa, w, k, x, y),
        DType::F16 => rows_typed::<F16>(isa, w, k, x, y),
        DType::BF16 => rows_typed::<Bf16>(isa, w, k, x, y),
        _ => unreachable!("matvec_float checked the dtype"),
    }
}

fn rows_typed<E: FloatElem>(isa: Isa, w: &[u8], k: usize, x: &[f32], y: &mut [f32]) {
    let n = y.len();
    assert!(w.len() >= n * k * E::BYTES && x.len() == k);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => {
            // SAFETY: `isa` was lowered to what the CPU supports, so AVX-512 F/BW/VL/DQ are
            // available; `w` holds `n` rows of `k` elements and `x` has `k` (asserted above).
            unsafe { x86::rows_avx512::<E>(w.as_ptr(), n, k, x.as_ptr(), y.as_mut_ptr()) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // SAFETY: as above, for AVX2 + FMA + F16C.
            unsafe { x86::rows_avx2::<E>(w.as_ptr(), n, k, x.as_ptr(), y.as_mut_ptr()) }
        }
        _ => rows_scalar::<E>(w, k, x, y),
    }
}

fn rows_scalar<E: FloatElem>(w: &[u8], k: usize, x: &[f32], y: &mut [f32]) {
    let row_bytes = k * E::BYTES;
    for (i, out) in y.iter_mut().enumerate() {
        let row = &w[i * row_bytes..(i + 1) * row_bytes];
        // Eight partial sums, so that the additions do not form one long dependency chain.
        let mut acc = [0f32; 8];
        let mut chunks = row.chunks_exact(8 * E::BYTES).zip(x.chunks_exact(8));
        for (wc, xc) in &mut chunks {
            for l in 0..8 {
                acc[l] += E::scalar(&wc[l * E::BYTES..]) * xc[l];
            }
        }
        let done = k / 8 * 8;
        for p in done..k {
            acc[p - done] += E::scalar(&row[p * E::BYTES..]) * x[p];
        }
        *out = acc.iter().sum();
    }
}

/// A float element type of a weight, with the loads that widen it to f32.
///
/// The SIMD loads are unaligned and take a pointer to the first element's first byte.
pub(super) trait FloatElem: Send + Sync {
    /// Bytes per element.
    const BYTES: usize;

    /// The element whose bytes start `b` (little-endian).
    fn scalar(b: &[u8]) -> f32;

    /// Loads 16 elements at `p` as f32.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL must be available and `16 * BYTES` bytes at `p` readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const u8) -> std::arch::x86_64::__m512;

    /// Loads the elements of `p` selected by `mask` (zero elsewhere) as f32.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL must be available and the selected elements readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_masked(p: *const u8, mask: u16) -> std::arch::x86_64::__m512;

    /// Loads 8 elements at `p` as f32.
    ///
    /// # Safety
    /// AVX2 and F16C must be available and `8 * BYTES` bytes at `p` readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const u8) -> std::arch::x86_64::__m256;
}

/// Little-endian IEEE binary32 elements.
pub(super) struct F32;
/// Little-endian IEEE binary16 elements.
pub(super) struct F16;
/// Little-endian bfloat16 elements.
pub(super) struct Bf16;

impl FloatElem for F32 {
    const BYTES: usize = 4;

    #[inline]
    fn scalar(b: &[u8]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const u8) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller guarantees 64 readable bytes; `loadu` needs no alignment.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p.cast()) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16_masked(p: *const u8, mask: u16) -> std::arch::x86_64::__m512 {
        // SAFETY: masked-off elements are not accessed; the caller guarantees the rest.
        unsafe { std::arch::x86_64::_mm512_maskz_loadu_ps(mask, p.cast()) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u8) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 32 readable bytes; `loadu` needs no alignment.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p.cast()) }
    }
}

impl FloatElem for F16 {
    const BYTES: usize = 2;

    #[inline]
    fn scalar(b: &[u8]) -> f32 {
        half::f16::from_le_bytes([b[0], b[1]]).to_f32()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const u8) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 32 readable bytes; `loadu` needs no alignment.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16_masked(p: *const u8, mask: u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: masked-off elements are not accessed; the caller guarantees the rest.
        unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.cast())) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u8) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 16 readable bytes; `loadu` needs no alignment.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
}

impl FloatElem for Bf16 {
    const BYTES: usize = 2;

    #[inline]
    fn scalar(b: &[u8]) -> f32 {
        f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const u8) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 32 readable bytes; `loadu` needs no alignment. A bf16 is
        // the top half of an f32, so zero-extending and shifting left by 16 widens it exactly.
        unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())))) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16_masked(p: *const u8, mask: u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: masked-off elements are not accessed; the caller guarantees the rest.
        unsafe {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
                mask,
                p.cast(),
            ))))
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u8) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 16 readable bytes; `loadu` needs no alignment.
        unsafe { _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())))) }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::FloatElem;

    /// `y[i] = dot(row i of w, x)` for `n` rows of `k` elements, with AVX-512.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/DQ must be available, `w` must hold `n * k` elements of `E`, `x` `k` f32
    /// and `y` `n` f32.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
    pub(super) unsafe fn rows_avx512<E: FloatElem>(w: *const u8, n: usize, k: usize, x: *const f32, y: *mut f32) {
        // Eight rows at a time: each x load feeds eight weight streams, and eight streams in
        // flight keep enough cache misses outstanding for one core. There is no software
        // prefetch: measured on TinyLlama's shapes (scratch variants against the AVX-512 sum in
        // one run), prefetching the next rows cost 7-10% of the bandwidth and eight rows without
        // it read at 0.92-0.96 of the sum, against 0.82-0.85 for four rows with it.
        const ROWS: usize = 8;
        let row_bytes = k * E::BYTES;
        let tail = k % 16;
        let tail_mask = ((1u32 << tail) - 1) as u16;
        let mut i = 0;
        // SAFETY (whole body): every row pointer is `w + r * row_bytes` with `r < n`, and every
        // element offset `p < k` (full vectors end at `p + 16 <= k`, the tail load is masked to
        // the `k % 16` remaining elements), so all accesses stay inside the caller's buffers.
        unsafe {
            while i + ROWS <= n {
                let r: [*const u8; ROWS] = std::array::from_fn(|j| w.add((i + j) * row_bytes));
                let mut acc0 = [_mm512_setzero_ps(); ROWS];
                let mut acc1 = [_mm512_setzero_ps(); ROWS];
                let mut p = 0;
                while p + 32 <= k {
                    let x0 = _mm512_loadu_ps(x.add(p));
                    let x1 = _mm512_loadu_ps(x.add(p + 16));
                    for j in 0..ROWS {
                        acc0[j] = _mm512_fmadd_ps(E::load16(r[j].add(p * E::BYTES)), x0, acc0[j]);
                        acc1[j] = _mm512_fmadd_ps(E::load16(r[j].add((p + 16) * E::BYTES)), x1, acc1[j]);
                    }
                    p += 32;
                }
                if p + 16 <= k {
                    let x0 = _mm512_loadu_ps(x.add(p));
                    for j in 0..ROWS {
                        acc0[j] = _mm512_fmadd_ps(E::load16(r[j].add(p * E::BYTES)), x0, acc0[j]);
                    }
                    p += 16;
                }
                if tail != 0 {
                    let x0 = _mm512_maskz_loadu_ps(tail_mask, x.add(p));
                    for j in 0..ROWS {
                        acc1[j] = _mm512_fmadd_ps(E::load16_masked(r[j].add(p * E::BYTES), tail_mask), x0, acc1[j]);
                    }
                }
                for j in 0..ROWS {
                    *y.add(i + j) = _mm512_reduce_add_ps(_mm512_add_ps(acc0[j], acc1[j]));
                }
                i += ROWS;
            }
            while i < n {
                let r = w.add(i * row_bytes);
                let mut acc0 = _mm512_setzero_ps();
                let mut acc1 = _mm512_setzero_ps();
                let mut p = 0;
                while p + 32 <= k {
                    acc0 = _mm512_fmadd_ps(E::load16(r.add(p * E::BYTES)), _mm512_loadu_ps(x.add(p)), acc0);
                    acc1 = _mm512_fmadd_ps(E::load16(r.add((p + 16) * E::BYTES)), _mm512_loadu_ps(x.add(p + 16)), acc1);
                    p += 32;
                }
                if p + 16 <= k {
                    acc0 = _mm512_fmadd_ps(E::load16(r.add(p * E::BYTES)), _mm512_loadu_ps(x.add(p)), acc0);
                    p += 16;
                }
                if tail != 0 {
                    let x0 = _mm512_maskz_loadu_ps(tail_mask, x.add(p));
                    acc1 = _mm512_fmadd_ps(E::load16_masked(r.add(p * E::BYTES), tail_mask), x0, acc1);
                }
                *y.add(i) = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
                i += 1;
            }
        }
    }

    /// `y[i] = dot(row i of w, x)` for `n` rows of `k` elements, with AVX2, FMA and F16C.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available, `w` must hold `n * k` elements of `E`, `x` `k` f32
    /// and `y` `n` f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx2<E: FloatElem>(w: *const u8, n: usize, k: usize, x: *const f32, y: *mut f32) {
        let row_bytes = k * E::BYTES;
        let mut i = 0;
        // SAFETY (whole body): row pointers are `w + r * row_bytes` with `r < n`; vector loads
        // end at `p + 8 <= k` and the scalar tail reads elements `p < k` through slices of the
        // row's remaining bytes.
        unsafe {
            while i + 4 <= n {
                let r = [
                    w.add(i * row_bytes),
                    w.add((i + 1) * row_bytes),
                    w.add((i + 2) * row_bytes),
                    w.add((i + 3) * row_bytes),
                ];
                let mut acc0 = [_mm256_setzero_ps(); 4];
                let mut acc1 = [_mm256_setzero_ps(); 4];
                let mut p = 0;
                while p + 16 <= k {
                    let x0 = _mm256_loadu_ps(x.add(p));
                    let x1 = _mm256_loadu_ps(x.add(p + 8));
                    for j in 0..4 {
                        acc0[j] = _mm256_fmadd_ps(E::load8(r[j].add(p * E::BYTES)), x0, acc0[j]);
                        acc1[j] = _mm256_fmadd_ps(E::load8(r[j].add((p + 8) * E::BYTES)), x1, acc1[j]);
                    }
                    p += 16;
                }
                if p + 8 <= k {
                    let x0 = _mm256_loadu_ps(x.add(p));
                    for j in 0..4 {
                        acc0[j] = _mm256_fmadd_ps(E::load8(r[j].add(p * E::BYTES)), x0, acc0[j]);
                    }
                    p += 8;
                }
                for j in 0..4 {
                    let mut s = hsum256(_mm256_add_ps(acc0[j], acc1[j]));
                    for q in p..k {
                        let b = std::slice::from_raw_parts(r[j].add(q * E::BYTES), E::BYTES);
                        s += E::scalar(b) * *x.add(q);
                    }
                    *y.add(i + j) = s;
                }
                i += 4;
            }
            while i < n {
                let r = w.add(i * row_bytes);
                let mut acc0 = _mm256_setzero_ps();
                let mut acc1 = _mm256_setzero_ps();
                let mut p = 0;
                while p + 16 <= k {
                    acc0 = _mm256_fmadd_ps(E::load8(r.add(p * E::BYTES)), _mm256_loadu_ps(x.add(p)), acc0);
                    acc1 = _mm256_fmadd_ps(E::load8(r.add((p + 8) * E::BYTES)), _mm256_loadu_ps(x.add(p + 8)), acc1);
                    p += 16;
                }
                if p + 8 <= k {
                    acc0 = _mm256_fmadd_ps(E::load8(r.add(p * E::BYTES)), _mm256_loadu_ps(x.add(p)), acc0);
                    p += 8;
                }
                let mut s = hsum256(_mm256_add_ps(acc0, acc1));
                for q in p..k {
                    let b = std::slice::from_raw_parts(r.add(q * E::BYTES), E::BYTES);
                    s += E::scalar(b) * *x.add(q);
                }
                *y.add(i) = s;
                i += 1;
            }
        }
    }

    /// The sum of the eight lanes of `v`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::Tensor;

    /// Compares every SIMD level with the reference on a random `[n, k]` weight of `dtype` whose
    /// bytes start `offset` bytes past an aligned address. Tolerance: both sum the same `k`
    /// products in different orders; the rounding error of either is at most about
    /// `k * eps * sum |w x|` and in practice near `sqrt(k) * eps * sum |w x|`, so that is the
    /// scale used, with a small absolute floor.
    fn check(dtype: DType, n: usize, k: usize, offset: usize, seed: u64) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let wf: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let x: Vec<f32> = (0..k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let w = Tensor::from_f32_as(&wf, [n, k], dtype).unwrap();
        let mut want = vec![0f32; n];
        crate::cpu::reference::matvec(&w, &x, &mut want).unwrap();
        // A copy of the bytes at `offset` from a 64-byte boundary, to exercise unaligned rows.
        let mut shifted = vec![0u8; w.byte_len() + offset];
        shifted[offset..].copy_from_slice(w.cpu_bytes().unwrap());
        let bytes = &shifted[offset..];
        // The weight as the kernels see it (rounded to `dtype`), to size the tolerance.
        let wf = w.to_f32_vec().unwrap();
        for isa in Isa::available() {
            let mut got = vec![f32::NAN; n];
            matvec_float_with(isa, dtype, bytes, n, k, &x, &mut got);
            for i in 0..n {
                let mag: f32 = (0..k).map(|p| (wf[i * k + p] * x[p]).abs()).sum();
                let tol = 1e-5 + mag * 4.0 * f32::EPSILON * (k as f32).sqrt();
                assert!(
                    (got[i] - want[i]).abs() <= tol,
                    "{dtype} {isa:?} n={n} k={k} offset={offset} row {i}: got {} want {} tol {tol}",
                    got[i],
                    want[i]
                );
            }
        }
    }

    #[test]
    fn known_values() {
        // Rows [1, 2, 3] and [-1, 0.5, 4] times [1, -1, 2] are 5 and 6.5, exact in every dtype.
        let w = [1.0f32, 2.0, 3.0, -1.0, 0.5, 4.0];
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let t = Tensor::from_f32_as(&w, [2, 3], dtype).unwrap();
            for isa in Isa::available() {
                let mut y = [0f32; 2];
                matvec_float_with(isa, dtype, t.cpu_bytes().unwrap(), 2, 3, &[1.0, -1.0, 2.0], &mut y);
                assert_eq!(y, [5.0, 6.5], "{dtype} {isa:?}");
            }
        }
    }

    #[test]
    fn large_threaded() {
        // Big enough to be split into rayon tasks, with a row count that is not a multiple of
        // the eight-row block or of the task size.
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            check(dtype, 1027, 333, 2, 7);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn matches_reference(
            dtype in prop::sample::select(vec![DType::F32, DType::F16, DType::BF16]),
            n in 1usize..23,
            k in 1usize..200,
            odd in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let offset = if odd { dtype.block_bytes() } else { 0 };
            check(dtype, n, k, offset, seed);
        }
    }
}
