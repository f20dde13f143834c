//! Shared f32 vector primitives for the fast CPU ops, one implementation per [`Isa`].
//!
//! Each primitive (dot product, axpy, their four-row forms for attention, sum of squares,
//! maximum, "exponentiate, shift and sum", scaling, elementwise add and multiply, a NaN scan)
//! has an AVX-512 version, an AVX2+FMA version and a portable version, behind a dispatcher
//! that takes the [`Isa`] to use. The vector exponential lives here too, so that softmax, SiLU
//! and attention share one approximation. Ragged tails are handled with masked loads and stores, so a row of any length
//! takes the same arithmetic path as a multiple of the vector width.
//!
//! The dispatchers trust their `isa` argument: every caller passes [`crate::cpu::isa()`] or a
//! level from [`Isa::available`], both at most what the CPU supports (checked in debug builds).
//! Ops that take an `Isa` from outside this module clamp it with [`usable`] first.
//!
//! [`Par`] is the other shared helper: whether an op splits its work across rayon's threads.

use super::Isa;

/// Whether a fast op runs its independent pieces (rows, heads, tokens) on rayon's threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Par {
    /// Parallel when the op's work passes the op's own threshold.
    Auto,
    /// Always parallel (tests use this to exercise the threaded path on small shapes).
    #[cfg_attr(not(test), allow(dead_code))]
    Always,
    /// Never parallel.
    #[cfg_attr(not(test), allow(dead_code))]
    Never,
}

impl Par {
    /// Whether to go parallel for `work` units of work against a threshold of `min_work`.
    pub(crate) fn decide(self, work: usize, min_work: usize) -> bool {
        match self {
            Par::Auto => work >= min_work && rayon::current_num_threads() > 1,
            Par::Always => true,
            Par::Never => false,
        }
    }
}

/// `isa` lowered to what this CPU supports, for entry points that take an ISA from a caller.
pub(crate) fn usable(isa: Isa) -> Isa {
    isa.min(Isa::detect())
}

/// Calls `avx512::$f`, `avx2::$f` or `scalar::$f` (modules in scope at the call site) for the
/// given [`Isa`], with the given arguments. The two x86 modules hold `#[target_feature]`
/// functions; the macro is the one place that calls them.
macro_rules! simd_dispatch {
    ($isa:expr, $f:ident($($arg:expr),* $(,)?)) => {{
        let isa: $crate::cpu::Isa = $isa;
        debug_assert!(isa <= $crate::cpu::Isa::detect(), "ISA {isa:?} is not supported by this CPU");
        match isa {
            #[cfg(target_arch = "x86_64")]
            $crate::cpu::Isa::Avx512 | $crate::cpu::Isa::Avx512Vnni => {
                // SAFETY: callers pass an ISA at most what the CPU supports (see the module
                // documentation), so avx512f/bw/dq/vl are available.
                unsafe { avx512::$f($($arg),*) }
            }
            #[cfg(target_arch = "x86_64")]
            $crate::cpu::Isa::Avx2 => {
                // SAFETY: callers pass an ISA at most what the CPU supports, so avx2 and fma
                // are available.
                unsafe { avx2::$f($($arg),*) }
            }
            _ => scalar::$f($($arg),*),
        }
    }};
}
pub(crate) use simd_dispatch;

/// `sum(a[i] * b[i])` over the common length.
pub(crate) fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    simd_dispatch!(isa, dot(a, b))
}

/// `y[i] += alpha * x[i]`.
pub(crate) fn axpy(isa: Isa, alpha: f32, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), y.len());
    simd_dispatch!(isa, axpy(alpha, x, y))
}

/// The dot products of `q` with each of four rows `k[u]` (each at least `q.len()` long).
pub(crate) fn dot4(isa: Isa, q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
    debug_assert!(k.iter().all(|k| k.len() >= q.len()));
    simd_dispatch!(isa, dot4(q, k))
}

/// `acc[i] += p[0] * v[0][i] + p[1] * v[1][i] + p[2] * v[2][i] + p[3] * v[3][i]`, as four
/// fused multiply-adds in that order (the same roundings as four [`axpy`] calls with FMA).
pub(crate) fn axpy4(isa: Isa, p: [f32; 4], v: [&[f32]; 4], acc: &mut [f32]) {
    debug_assert!(v.iter().all(|v| v.len() >= acc.len()));
    simd_dispatch!(isa, axpy4(p, v, acc))
}

/// `sum(x[i]^2)`.
pub(crate) fn sum_sq(isa: Isa, x: &[f32]) -> f32 {
    simd_dispatch!(isa, sum_sq(x))
}

/// The largest element, ignoring NaNs; `-inf` for an empty or all-NaN slice.
pub(crate) fn max(isa: Isa, x: &[f32]) -> f32 {
    simd_dispatch!(isa, max(x))
}

/// Whether any element is NaN.
pub(crate) fn has_nan(isa: Isa, x: &[f32]) -> bool {
    simd_dispatch!(isa, has_nan(x))
}

/// `x[i] = exp(x[i] - shift)` in place, returning the sum of the new values.
pub(crate) fn exp_shift_sum(isa: Isa, x: &mut [f32], shift: f32) -> f32 {
    simd_dispatch!(isa, exp_shift_sum(x, shift))
}

/// `x[i] *= s`.
pub(crate) fn scale(isa: Isa, x: &mut [f32], s: f32) {
    simd_dispatch!(isa, scale(x, s))
}

/// `acc[i] += x[i]`.
pub(crate) fn add(isa: Isa, acc: &mut [f32], x: &[f32]) {
    debug_assert_eq!(acc.len(), x.len());
    simd_dispatch!(isa, add(acc, x))
}

/// `acc[i] *= x[i]`.
pub(crate) fn mul(isa: Isa, acc: &mut [f32], x: &[f32]) {
    debug_assert_eq!(acc.len(), x.len());
    simd_dispatch!(isa, mul(acc, x))
}

/// Portable versions, written so that LLVM vectorises them with the baseline target features.
pub(crate) mod scalar {
    /// Independent partial sums, so the loop is not one long dependency chain.
    const LANES: usize = 8;

    pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for l in 0..LANES {
                acc[l] += x[l] * y[l];
            }
        }
        for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
            acc[l] += x * y;
        }
        acc.iter().sum()
    }

    pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        for (y, x) in y.iter_mut().zip(x) {
            *y += alpha * x;
        }
    }

    pub(crate) fn dot4(q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
        k.map(|k| dot(q, &k[..q.len()]))
    }

    pub(crate) fn axpy4(p: [f32; 4], v: [&[f32]; 4], acc: &mut [f32]) {
        for (u, v) in v.iter().enumerate() {
            axpy(p[u], v, acc);
        }
    }

    pub(crate) fn sum_sq(x: &[f32]) -> f32 {
        dot(x, x)
    }

    pub(crate) fn max(x: &[f32]) -> f32 {
        x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
    }

    pub(crate) fn has_nan(x: &[f32]) -> bool {
        x.iter().any(|v| v.is_nan())
    }

    pub(crate) fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 {
        let mut acc = [0f32; LANES];
        for (i, v) in x.iter_mut().enumerate() {
            *v = (*v - shift).exp();
            acc[i % LANES] += *v;
        }
        acc.iter().sum()
    }

    pub(crate) fn scale(x: &mut [f32], s: f32) {
        for v in x {
            *v *= s;
        }
    }

    pub(crate) fn add(acc: &mut [f32], x: &[f32]) {
        for (a, x) in acc.iter_mut().zip(x) {
            *a += x;
        }
    }

    pub(crate) fn mul(acc: &mut [f32], x: &[f32]) {
        for (a, x) in acc.iter_mut().zip(x) {
            *a *= x;
        }
    }
}

/// Constants of the vector exponential.
///
/// `exp(x) = 2^n * exp(r)` with `n = round(x / ln 2)` and `r = x - n ln 2` in
/// `[-ln2/2, ln2/2]`, `ln 2` split in a short high part (so `n * LN2_HI` is exact) and a
/// correction. `exp(r)` is its Taylor polynomial of degree 7 (truncation error below 1e-8
/// relative on that interval), and `2^n` is applied as two factors `2^(n/2)` and `2^(n - n/2)`
/// so that results down in the subnormal range and up to the overflow threshold round once.
/// Inputs are clamped to `[EXP_MIN, EXP_MAX]`, beyond which the result is 0 or infinity anyway;
/// the clamp keeps NaN.
#[cfg(target_arch = "x86_64")]
mod exp_consts {
    pub(super) const EXP_MIN: f32 = -104.0;
    pub(super) const EXP_MAX: f32 = 88.8;
    pub(super) const LOG2_E: f32 = std::f32::consts::LOG2_E;
    pub(super) const LN2_HI: f32 = 0.693_359_4;
    pub(super) const LN2_LO: f32 = -2.121_944_4e-4;
    /// `1/k!` for k = 7 down to 2; the 1/1! and 1/0! terms are 1.
    pub(super) const TAYLOR: [f32; 6] = [1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5];
}

/// AVX-512 versions: 16 lanes, masked tails.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::exp_consts::*;

    /// Lanes per vector.
    pub(crate) const W: usize = 16;

    /// A mask selecting the first `rem` lanes (`rem < 16`).
    #[inline]
    pub(crate) fn tail_mask(rem: usize) -> __mmask16 {
        debug_assert!(rem < W);
        ((1u32 << rem) - 1) as __mmask16
    }

    /// `exp(x)` per lane, within about 2 ulp of the correctly rounded value.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn exp(x: __m512) -> __m512 {
        // `max(lo, x)` and `min(hi, x)` return their second operand when one is NaN, so NaN
        // passes through the clamp.
        let x = _mm512_min_ps(_mm512_set1_ps(EXP_MAX), _mm512_max_ps(_mm512_set1_ps(EXP_MIN), x));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(TAYLOR[0]);
        for c in &TAYLOR[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        let one = _mm512_set1_ps(1.0);
        p = _mm512_fmadd_ps(p, r, one);
        p = _mm512_fmadd_ps(p, r, one);
        let ni = _mm512_cvtps_epi32(n);
        let n1 = _mm512_srai_epi32::<1>(ni);
        let n2 = _mm512_sub_epi32(ni, n1);
        let bias = _mm512_set1_epi32(127);
        let s1 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(n1, bias)));
        let s2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(n2, bias)));
        _mm512_mul_ps(_mm512_mul_ps(p, s1), s2)
    }

    #[target_feature(enable = "avx512f")]
    pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: each unmasked load reads 16 floats at an offset `i + u*16` with
        // `i + (u+1)*16 <= n`; the masked tail reads only lanes below `n - i`. Both slices hold
        // at least `n` floats.
        unsafe {
            while i + 4 * W <= n {
                for (u, acc) in acc.iter_mut().enumerate() {
                    let o = i + u * W;
                    *acc = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(o)), _mm512_loadu_ps(pb.add(o)), *acc);
                }
                i += 4 * W;
            }
            while i + W <= n {
                acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc[0]);
                i += W;
            }
            if i < n {
                let m = tail_mask(n - i);
                acc[1] =
                    _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, pa.add(i)), _mm512_maskz_loadu_ps(m, pb.add(i)), acc[1]);
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])))
    }

    #[target_feature(enable = "avx512f")]
    pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let va = _mm512_set1_ps(alpha);
        let mut i = 0;
        // SAFETY: unmasked accesses cover `i..i+16` with `i + 16 <= n`; the masked tail touches
        // only lanes below `n - i`. Both slices hold at least `n` floats and do not overlap
        // (one is shared, the other exclusive).
        unsafe {
            while i + W <= n {
                let r = _mm512_fmadd_ps(va, _mm512_loadu_ps(px.add(i)), _mm512_loadu_ps(py.add(i)));
                _mm512_storeu_ps(py.add(i), r);
                i += W;
            }
            if i < n {
                let m = tail_mask(n - i);
                let r = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, px.add(i)), _mm512_maskz_loadu_ps(m, py.add(i)));
                _mm512_mask_storeu_ps(py.add(i), m, r);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(crate) fn dot4(q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
        let n = q.len();
        let pq = q.as_ptr();
        let pk = k.map(|k| k.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i < n {
            let m = if i + W <= n { !0 } else { tail_mask(n - i) };
            // SAFETY: lanes of `m` cover `i..min(i+16, n)`; `q` holds `n` floats and each `k[u]`
            // at least `n` (checked by the dispatcher in debug builds, guaranteed by callers).
            unsafe {
                let vq = _mm512_maskz_loadu_ps(m, pq.add(i));
                for u in 0..4 {
                    acc[u] = _mm512_fmadd_ps(vq, _mm512_maskz_loadu_ps(m, pk[u].add(i)), acc[u]);
                }
            }
            i += W;
        }
        acc.map(|a| _mm512_reduce_add_ps(a))
    }

    #[target_feature(enable = "avx512f")]
    pub(crate) fn axpy4(p: [f32; 4], v: [&[f32]; 4], acc: &mut [f32]) {
        let n = acc.len();
        let pa = acc.as_mut_ptr();
        let pv = v.map(|v| v.as_ptr());
        let vp = p.map(|p| _mm512_set1_ps(p));
        let mut i = 0;
        while i < n {
            let m = if i + W <= n { !0 } else { tail_mask(n - i) };
            // SAFETY: lanes of `m` cover `i..min(i+16, n)`; `acc` holds `n` floats and each
            // `v[u]` at least `n`; `acc` is exclusive, so it overlaps none of them.
            unsafe {
                let mut a = _mm512_maskz_loadu_ps(m, pa.add(i));
                for u in 0..4 {
                    a = _mm512_fmadd_ps(vp[u], _mm512_maskz_loadu_ps(m, pv[u].add(i)), a);
                }
                _mm512_mask_storeu_ps(pa.add(i), m, a);
            }
            i += W;
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(crate) fn sum_sq(x: &[f32]) -> f32 {
        dot(x, x)
    }

    #[target_feature(enable = "avx512f")]
    pub(crate) fn max(x: &[f32]) -> f32 {
        let n = x.len();
        let p = x.as_ptr();
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut acc = [ninf; 2];
        let mut i = 0;
        // SAFETY: unmasked loads read `i..i+16` with `i + 16 <= n`; the masked tail reads only
        // lanes below `n - i` (the others take -inf from `src`).
        unsafe {
            // `max(v, acc)` returns `acc` when `v` is NaN, so NaNs are skipped.
            while i + 2 * W <= n {
                acc[0] = _mm512_max_ps(_mm512_loadu_ps(p.add(i)), acc[0]);
                acc[1] = _mm512_max_ps(_mm512_loadu_ps(p.add(i + W)), acc[1]);
                i += 2 * W;
            }
            while i + W <= n {
                acc[0] = _mm512_max_ps(_mm512_loadu_ps(p.add(i)), acc[0]);
                i += W;
            }
            if i < n {
                let v = _mm512_mask_loadu_ps(ninf, tail_mask(n - i), p.add(i));
                acc[1] = _mm512_max_ps(v, acc[1]);
            }
        }
        _mm512_reduce_max_ps(_mm512_max_ps(acc[0], acc[1]))
    }

    #[target_feature(enable = "avx512f")]
    pub(crate) fn has_nan(x: &[f32]) -> bool {
        let n = x.len();
        let p = x.as_ptr();
        let mut found: __mmask16 = 0;
        let mut i = 0;
        // SAFETY: unmasked loads read `i..i+16` with `i + 16 <= n`; the masked tail reads only
        // lanes below `n - i` (the others are zero, not NaN).
        unsafe {
            while i + W <= n {
                let v = _mm512_loadu_ps(p.add(i));
                found |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                i += W;
            }
            if i < n {
                let v = _mm512_maskz_loadu_ps(tail_mask(n - i), p.add(i));
                found |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            }
        }
        found != 0
    }

    #[target_feature(enable = "avx512f")]
    pub(crate) fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 {
        let n = x.len();
        let p = x.as_mut_ptr();
        let vs = _mm512_set1_ps(shift);
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut i = 0;
        // SAFETY: unmasked accesses cover `i..i+16` with `i + 16 <= n`; the masked tail loads
        // and stores only lanes below `n - i`, and `maskz_exp` zeroes the others before they
        // reach the sum.
        unsafe {
            while i + W <= n {
                let e = exp(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), vs));
                _mm512_storeu_ps(p.add(i), e);
                acc[(i / W) & 1] = _mm512_add_ps(acc[(i / W) & 1], e);
                i += W;
            }
            if i < n {
                let m = tail_mask(n - i);
                let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), vs));
                _mm512_mask_storeu_ps(p.add(i), m, e);
                acc[0] = _mm512_add_ps(acc[0], _mm512_maskz_mov_ps(m, e));
            }
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
    }

    #[target_feature(enable = "avx512f")]
    pub(crate) fn scale(x: &mut [f32], s: f32) {
        let n = x.len();
        let p = x.as_mut_ptr();
        let vs = _mm512_set1_ps(s);
        let mut i = 0;
        // SAFETY: unmasked accesses cover `i..i+16` with `i + 16 <= n`; the masked tail touches
        // only lanes below `n - i`.
        unsafe {
            while i + W <= n {
                _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), vs));
                i += W;
            }
            if i < n {
                let m = tail_mask(n - i);
                _mm512_mask_storeu_ps(p.add(i), m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(i)), vs));
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(crate) fn add(acc: &mut [f32], x: &[f32]) {
        binary(acc, x, |a, b| _mm512_add_ps(a, b))
    }

    #[target_feature(enable = "avx512f")]
    pub(crate) fn mul(acc: &mut [f32], x: &[f32]) {
        binary(acc, x, |a, b| _mm512_mul_ps(a, b))
    }

    /// `acc[i] = f(acc[i], x[i])`, 16 lanes at a time.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn binary(acc: &mut [f32], x: &[f32], f: impl Fn(__m512, __m512) -> __m512) {
        let n = acc.len().min(x.len());
        let (pa, px) = (acc.as_mut_ptr(), x.as_ptr());
        let mut i = 0;
        // SAFETY: unmasked accesses cover `i..i+16` with `i + 16 <= n`; the masked tail touches
        // only lanes below `n - i`. Both slices hold at least `n` floats.
        unsafe {
            while i + W <= n {
                _mm512_storeu_ps(pa.add(i), f(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(px.add(i))));
                i += W;
            }
            if i < n {
                let m = tail_mask(n - i);
                let r = f(_mm512_maskz_loadu_ps(m, pa.add(i)), _mm512_maskz_loadu_ps(m, px.add(i)));
                _mm512_mask_storeu_ps(pa.add(i), m, r);
            }
        }
    }
}

/// AVX2+FMA versions: 8 lanes, masked tails through `vmaskmovps`.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::exp_consts::*;

    /// Lanes per vector.
    pub(crate) const W: usize = 8;

    /// A lane mask (all ones in the first `rem` lanes) for `maskload`/`maskstore`, `rem < 8`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) fn tail_mask(rem: usize) -> __m256i {
        debug_assert!(rem < W);
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(rem as i32), lane)
    }

    /// The sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// The maximum of the 8 lanes (none of which is NaN).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) fn hmax(v: __m256) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_max_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// `exp(x)` per lane, within about 2 ulp of the correctly rounded value.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp(x: __m256) -> __m256 {
        // `max(lo, x)` and `min(hi, x)` return their second operand when one is NaN, so NaN
        // passes through the clamp.
        let x = _mm256_min_ps(_mm256_set1_ps(EXP_MAX), _mm256_max_ps(_mm256_set1_ps(EXP_MIN), x));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(TAYLOR[0]);
        for c in &TAYLOR[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let one = _mm256_set1_ps(1.0);
        p = _mm256_fmadd_ps(p, r, one);
        p = _mm256_fmadd_ps(p, r, one);
        let ni = _mm256_cvtps_epi32(n);
        let n1 = _mm256_srai_epi32::<1>(ni);
        let n2 = _mm256_sub_epi32(ni, n1);
        let bias = _mm256_set1_epi32(127);
        let s1 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n1, bias)));
        let s2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(n2, bias)));
        _mm256_mul_ps(_mm256_mul_ps(p, s1), s2)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: each unmasked load reads 8 floats at an offset `i + u*8` with
        // `i + (u+1)*8 <= n`; the masked tail reads only lanes below `n - i`. Both slices hold
        // at least `n` floats.
        unsafe {
            while i + 4 * W <= n {
                for (u, acc) in acc.iter_mut().enumerate() {
                    let o = i + u * W;
                    *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o)), *acc);
                }
                i += 4 * W;
            }
            while i + W <= n {
                acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
                i += W;
            }
            if i < n {
                let m = tail_mask(n - i);
                acc[1] = _mm256_fmadd_ps(_mm256_maskload_ps(pa.add(i), m), _mm256_maskload_ps(pb.add(i), m), acc[1]);
            }
        }
        hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let va = _mm256_set1_ps(alpha);
        let mut i = 0;
        // SAFETY: unmasked accesses cover `i..i+8` with `i + 8 <= n`; the masked tail touches
        // only lanes below `n - i`. Both slices hold at least `n` floats.
        unsafe {
            while i + W <= n {
                let r = _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
                _mm256_storeu_ps(py.add(i), r);
                i += W;
            }
            if i < n {
                let m = tail_mask(n - i);
                let r = _mm256_fmadd_ps(va, _mm256_maskload_ps(px.add(i), m), _mm256_maskload_ps(py.add(i), m));
                _mm256_maskstore_ps(py.add(i), m, r);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn dot4(q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
        let n = q.len();
        let pq = q.as_ptr();
        let pk = k.map(|k| k.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i < n {
            let m = if i + W <= n { _mm256_set1_epi32(-1) } else { tail_mask(n - i) };
            // SAFETY: lanes of `m` cover `i..min(i+8, n)`; `q` holds `n` floats and each `k[u]`
            // at least `n` (checked by the dispatcher in debug builds, guaranteed by callers).
            unsafe {
                let vq = _mm256_maskload_ps(pq.add(i), m);
                for u in 0..4 {
                    acc[u] = _mm256_fmadd_ps(vq, _mm256_maskload_ps(pk[u].add(i), m), acc[u]);
                }
            }
            i += W;
        }
        acc.map(|a| hsum(a))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn axpy4(p: [f32; 4], v: [&[f32]; 4], acc: &mut [f32]) {
        let n = acc.len();
        let pa = acc.as_mut_ptr();
        let pv = v.map(|v| v.as_ptr());
        let vp = p.map(|p| _mm256_set1_ps(p));
        let mut i = 0;
        while i < n {
            let m = if i + W <= n { _mm256_set1_epi32(-1) } else { tail_mask(n - i) };
            // SAFETY: lanes of `m` cover `i..min(i+8, n)`; `acc` holds `n` floats and each
            // `v[u]` at least `n`; `acc` is exclusive, so it overlaps none of them.
            unsafe {
                let mut a = _mm256_maskload_ps(pa.add(i), m);
                for u in 0..4 {
                    a = _mm256_fmadd_ps(vp[u], _mm256_maskload_ps(pv[u].add(i), m), a);
                }
                _mm256_maskstore_ps(pa.add(i), m, a);
            }
            i += W;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn sum_sq(x: &[f32]) -> f32 {
        dot(x, x)
    }

    #[target_feature(enable = "avx2")]
    pub(crate) fn max(x: &[f32]) -> f32 {
        let n = x.len();
        let p = x.as_ptr();
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut acc = [ninf; 2];
        let mut i = 0;
        // SAFETY: unmasked loads read `i..i+8` with `i + 8 <= n`; the masked tail reads only
        // lanes below `n - i`.
        unsafe {
            // `max(v, acc)` returns `acc` when `v` is NaN, so NaNs are skipped.
            while i + 2 * W <= n {
                acc[0] = _mm256_max_ps(_mm256_loadu_ps(p.add(i)), acc[0]);
                acc[1] = _mm256_max_ps(_mm256_loadu_ps(p.add(i + W)), acc[1]);
                i += 2 * W;
            }
            while i + W <= n {
                acc[0] = _mm256_max_ps(_mm256_loadu_ps(p.add(i)), acc[0]);
                i += W;
            }
            if i < n {
                let m = tail_mask(n - i);
                // Lanes past the end load as 0; replace them with -inf before the maximum.
                let v = _mm256_blendv_ps(ninf, _mm256_maskload_ps(p.add(i), m), _mm256_castsi256_ps(m));
                acc[1] = _mm256_max_ps(v, acc[1]);
            }
        }
        hmax(_mm256_max_ps(acc[0], acc[1]))
    }

    #[target_feature(enable = "avx2")]
    pub(crate) fn has_nan(x: &[f32]) -> bool {
        let n = x.len();
        let p = x.as_ptr();
        let mut found = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: unmasked loads read `i..i+8` with `i + 8 <= n`; the masked tail reads only
        // lanes below `n - i` (the others are zero, not NaN).
        unsafe {
            while i + W <= n {
                let v = _mm256_loadu_ps(p.add(i));
                found = _mm256_or_ps(found, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
                i += W;
            }
            if i < n {
                let v = _mm256_maskload_ps(p.add(i), tail_mask(n - i));
                found = _mm256_or_ps(found, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
            }
        }
        _mm256_movemask_ps(found) != 0
    }

    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 {
        let n = x.len();
        let p = x.as_mut_ptr();
        let vs = _mm256_set1_ps(shift);
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut i = 0;
        // SAFETY: unmasked accesses cover `i..i+8` with `i + 8 <= n`; the masked tail loads
        // and stores only lanes below `n - i`, and the `and` zeroes the others before the sum.
        unsafe {
            while i + W <= n {
                let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vs));
                _mm256_storeu_ps(p.add(i), e);
                acc[(i / W) & 1] = _mm256_add_ps(acc[(i / W) & 1], e);
                i += W;
            }
            if i < n {
                let m = tail_mask(n - i);
                let e = exp(_mm256_sub_ps(_mm256_maskload_ps(p.add(i), m), vs));
                _mm256_maskstore_ps(p.add(i), m, e);
                acc[0] = _mm256_add_ps(acc[0], _mm256_and_ps(e, _mm256_castsi256_ps(m)));
            }
        }
        hsum(_mm256_add_ps(acc[0], acc[1]))
    }

    #[target_feature(enable = "avx2")]
    pub(crate) fn scale(x: &mut [f32], s: f32) {
        let n = x.len();
        let p = x.as_mut_ptr();
        let vs = _mm256_set1_ps(s);
        let mut i = 0;
        // SAFETY: unmasked accesses cover `i..i+8` with `i + 8 <= n`; the masked tail touches
        // only lanes below `n - i`.
        unsafe {
            while i + W <= n {
                _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), vs));
                i += W;
            }
            if i < n {
                let m = tail_mask(n - i);
                _mm256_maskstore_ps(p.add(i), m, _mm256_mul_ps(_mm256_maskload_ps(p.add(i), m), vs));
            }
        }
    }

    #[target_feature(enable = "avx2")]
    pub(crate) fn add(acc: &mut [f32], x: &[f32]) {
        binary(acc, x, |a, b| _mm256_add_ps(a, b))
    }

    #[target_feature(enable = "avx2")]
    pub(crate) fn mul(acc: &mut [f32], x: &[f32]) {
        binary(acc, x, |a, b| _mm256_mul_ps(a, b))
    }

    /// `acc[i] = f(acc[i], x[i])`, 8 lanes at a time.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn binary(acc: &mut [f32], x: &[f32], f: impl Fn(__m256, __m256) -> __m256) {
        let n = acc.len().min(x.len());
        let (pa, px) = (acc.as_mut_ptr(), x.as_ptr());
        let mut i = 0;
        // SAFETY: unmasked accesses cover `i..i+8` with `i + 8 <= n`; the masked tail touches
        // only lanes below `n - i`. Both slices hold at least `n` floats.
        unsafe {
            while i + W <= n {
                _mm256_storeu_ps(pa.add(i), f(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(px.add(i))));
                i += W;
            }
            if i < n {
                let m = tail_mask(n - i);
                let r = f(_mm256_maskload_ps(pa.add(i), m), _mm256_maskload_ps(px.add(i), m));
                _mm256_maskstore_ps(pa.add(i), m, r);
            }
        }
    }
}

/// Helpers shared by the ops' tests.
#[cfg(test)]
pub(crate) mod testing {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// `len` values drawn uniformly from `[-spread, spread]`, reproducible from `seed`.
    pub(crate) fn random_vec(seed: u64, len: usize, spread: f32) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-spread..=spread)).collect()
    }

    /// Asserts `|got - want| <= abs + |want| * rel` elementwise (NaN matching NaN, equal
    /// infinities matching), naming the first offending index.
    #[track_caller]
    pub(crate) fn assert_close(got: &[f32], want: &[f32], abs: f32, rel: f32, ctx: &str) {
        assert_eq!(got.len(), want.len(), "{ctx}: lengths differ");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let ok = (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= abs + w.abs() * rel;
            assert!(ok, "{ctx}: element {i}: got {g}, want {w} (tolerance {abs} + |want| * {rel})");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector exponential against `f32::exp` over the whole useful range, subnormal
    /// results, overflow, infinities and NaN included.
    #[test]
    fn exp_matches_libm() {
        let mut xs: Vec<f32> = (-210_000..=180_000).map(|i| i as f32 * 5e-4).collect();
        xs.extend([f32::NEG_INFINITY, f32::INFINITY, -1e30, 1e30, 88.72, 88.73, -87.0, -103.0, 0.0, -0.0]);
        for isa in Isa::available() {
            let mut got = xs.clone();
            exp_shift_sum(isa, &mut got, 0.0);
            for (x, g) in xs.iter().zip(&got) {
                let want = x.exp();
                let tol = 3.0 * f32::EPSILON * want + 2.0 * f32::from_bits(1);
                assert!(
                    (g - want).abs() <= tol || (g.is_infinite() && want.is_infinite()),
                    "{isa:?}: exp({x}) = {g}, want {want}"
                );
            }
            let mut nan = [f32::NAN; 3];
            exp_shift_sum(isa, &mut nan, 0.0);
            assert!(nan.iter().all(|v| v.is_nan()), "{isa:?}: exp(NaN) must be NaN");
        }
    }

    #[test]
    fn primitives_match_scalar() {
        for n in [0usize, 1, 7, 8, 15, 16, 17, 33, 63, 64, 65, 130] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.25).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 11 % 17) as f32 - 8.0) * 0.5).collect();
            let want_dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let want_max = a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            for isa in Isa::available() {
                // These inputs are multiples of 1/4 with small sums, so every order is exact.
                assert_eq!(dot(isa, &a, &b), want_dot, "{isa:?} dot n={n}");
                assert_eq!(max(isa, &a), want_max, "{isa:?} max n={n}");
                let rows: [Vec<f32>; 4] = std::array::from_fn(|u| b.iter().map(|v| v * (u as f32 - 1.5)).collect());
                let rows = [&rows[0][..], &rows[1][..], &rows[2][..], &rows[3][..]];
                let want4: [f32; 4] = rows.map(|r| a.iter().zip(r).map(|(x, y)| x * y).sum());
                assert_eq!(dot4(isa, &a, rows), want4, "{isa:?} dot4 n={n}");
                let mut y = a.clone();
                axpy4(isa, [1.0, -0.5, 0.25, 2.0], rows, &mut y);
                let mut y1 = a.clone();
                for (p, r) in [1.0, -0.5, 0.25, 2.0].into_iter().zip(rows) {
                    axpy(isa, p, r, &mut y1);
                }
                assert_eq!(y, y1, "{isa:?} axpy4 n={n}");
                let mut y = b.clone();
                axpy(isa, 2.0, &a, &mut y);
                let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| y + 2.0 * x).collect();
                assert_eq!(y, want, "{isa:?} axpy n={n}");
                let mut s = a.clone();
                add(isa, &mut s, &b);
                assert_eq!(s, a.iter().zip(&b).map(|(x, y)| x + y).collect::<Vec<_>>(), "{isa:?} add");
                mul(isa, &mut s, &b);
                scale(isa, &mut s, 0.5);
                let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| (x + y) * y * 0.5).collect();
                assert_eq!(s, want, "{isa:?} mul/scale");
                assert!(!has_nan(isa, &a));
                if n > 0 {
                    let mut with_nan = a.clone();
                    with_nan[n - 1] = f32::NAN;
                    assert!(has_nan(isa, &with_nan), "{isa:?} has_nan n={n}");
                    assert_eq!(max(isa, &with_nan), max(isa, &a[..n - 1]), "{isa:?} max skips NaN");
                }
            }
        }
    }
}
