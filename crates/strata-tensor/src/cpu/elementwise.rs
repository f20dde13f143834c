//! Elementwise operations (fast versions): SiLU, SwiGLU, residual add, multiply, scale.
//!
//! Each is one vector pass; SiLU and SwiGLU use the shared vector exponential and otherwise
//! round exactly as the reference (`x / (1 + exp(-x))`, then `* up`), so they differ from it
//! only by that exponential's last-bit error. Long slices (prefill activations) are cut into
//! chunks spread across rayon's threads.

use rayon::prelude::*;

use super::vec::{self, Par, simd_dispatch};
use super::{Isa, isa};
use crate::{Error, Result};

/// Elements below which an op stays on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 16;
/// Elements per parallel task.
const PAR_CHUNK: usize = 1 << 14;

/// SiLU in place: `x = x / (1 + exp(-x))` (also called swish).
pub fn silu(x: &mut [f32]) {
    silu_with(isa(), Par::Auto, x)
}

/// SwiGLU: `out = silu(gate) * up`, the gated activation of Llama-style MLPs. All three slices
/// have the same length.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    swiglu_with(isa(), Par::Auto, gate, up, out)
}

/// Residual add in place: `acc += x`, with `acc.len() == x.len()`.
pub fn add(acc: &mut [f32], x: &[f32]) -> Result<()> {
    add_with(isa(), Par::Auto, acc, x)
}

/// Elementwise multiply in place: `acc *= x`, with `acc.len() == x.len()`.
pub fn mul(acc: &mut [f32], x: &[f32]) -> Result<()> {
    mul_with(isa(), Par::Auto, acc, x)
}

/// Scales in place: `x *= s`.
pub fn scale(x: &mut [f32], s: f32) {
    scale_with(isa(), Par::Auto, x, s)
}

/// [`silu`] on a given ISA and threading choice.
pub(crate) fn silu_with(isa: Isa, par: Par, x: &mut [f32]) {
    let isa = vec::usable(isa);
    let f = |x: &mut [f32]| simd_dispatch!(isa, silu(x));
    if par.decide(x.len(), PAR_MIN_ELEMS) {
        x.par_chunks_mut(PAR_CHUNK).for_each(f);
    } else {
        f(x);
    }
}

/// [`swiglu`] on a given ISA and threading choice.
pub(crate) fn swiglu_with(isa: Isa, par: Par, gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    check_same_len("swiglu", "up", gate.len(), up.len())?;
    check_same_len("swiglu", "out", gate.len(), out.len())?;
    let isa = vec::usable(isa);
    let f = |((g, u), o): ((&[f32], &[f32]), &mut [f32])| simd_dispatch!(isa, swiglu(g, u, o));
    if par.decide(gate.len(), PAR_MIN_ELEMS) {
        gate.par_chunks(PAR_CHUNK).zip(up.par_chunks(PAR_CHUNK)).zip(out.par_chunks_mut(PAR_CHUNK)).for_each(f);
    } else {
        f(((gate, up), out));
    }
    Ok(())
}

/// [`add`] on a given ISA and threading choice.
pub(crate) fn add_with(isa: Isa, par: Par, acc: &mut [f32], x: &[f32]) -> Result<()> {
    check_same_len("add", "x", acc.len(), x.len())?;
    let isa = vec::usable(isa);
    binary(par, acc, x, |a, x| vec::add(isa, a, x));
    Ok(())
}

/// [`mul`] on a given ISA and threading choice.
pub(crate) fn mul_with(isa: Isa, par: Par, acc: &mut [f32], x: &[f32]) -> Result<()> {
    check_same_len("mul", "x", acc.len(), x.len())?;
    let isa = vec::usable(isa);
    binary(par, acc, x, |a, x| vec::mul(isa, a, x));
    Ok(())
}

/// [`scale`] on a given ISA and threading choice.
pub(crate) fn scale_with(isa: Isa, par: Par, x: &mut [f32], s: f32) {
    let isa = vec::usable(isa);
    if par.decide(x.len(), PAR_MIN_ELEMS) {
        x.par_chunks_mut(PAR_CHUNK).for_each(|x| vec::scale(isa, x, s));
    } else {
        vec::scale(isa, x, s);
    }
}

/// Runs `f` over `(acc, x)`, in parallel chunks when long enough.
fn binary(par: Par, acc: &mut [f32], x: &[f32], f: impl Fn(&mut [f32], &[f32]) + Sync) {
    if par.decide(acc.len(), PAR_MIN_ELEMS) {
        acc.par_chunks_mut(PAR_CHUNK).zip(x.par_chunks(PAR_CHUNK)).for_each(|(a, x)| f(a, x));
    } else {
        f(acc, x);
    }
}

/// Checks that operand `what` has the `expected` length.
pub(crate) fn check_same_len(op: &'static str, what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        return Err(Error::LengthMismatch { op, what, expected, got });
    }
    Ok(())
}

mod scalar {
    pub(super) fn silu(x: &mut [f32]) {
        for v in x {
            *v = *v / (1.0 + (-*v).exp());
        }
    }

    pub(super) fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
            *o = (g / (1.0 + (-g).exp())) * u;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::cpu::vec::avx512::{W, exp, tail_mask};

    /// `x / (1 + exp(-x))` per lane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn silu_v(x: __m512) -> __m512 {
        let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e))
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn silu(x: &mut [f32]) {
        let n = x.len();
        let p = x.as_mut_ptr();
        let mut i = 0;
        while i < n {
            let m = if i + W <= n { !0 } else { tail_mask(n - i) };
            // SAFETY: lanes of `m` cover `i..min(i+16, n)`, inside `x`.
            unsafe { _mm512_mask_storeu_ps(p.add(i), m, silu_v(_mm512_maskz_loadu_ps(m, p.add(i)))) };
            i += W;
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len().min(gate.len()).min(up.len());
        let (pg, pu, po) = (gate.as_ptr(), up.as_ptr(), out.as_mut_ptr());
        let mut i = 0;
        while i < n {
            let m = if i + W <= n { !0 } else { tail_mask(n - i) };
            // SAFETY: lanes of `m` cover `i..min(i+16, n)`, inside all three slices.
            unsafe {
                let s = silu_v(_mm512_maskz_loadu_ps(m, pg.add(i)));
                _mm512_mask_storeu_ps(po.add(i), m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, pu.add(i))));
            }
            i += W;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::cpu::vec::avx2::{W, exp, tail_mask};

    /// `x / (1 + exp(-x))` per lane.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn silu_v(x: __m256) -> __m256 {
        let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn silu(x: &mut [f32]) {
        let n = x.len();
        let p = x.as_mut_ptr();
        let mut i = 0;
        while i < n {
            let m = if i + W <= n { _mm256_set1_epi32(-1) } else { tail_mask(n - i) };
            // SAFETY: lanes of `m` cover `i..min(i+8, n)`, inside `x`.
            unsafe { _mm256_maskstore_ps(p.add(i), m, silu_v(_mm256_maskload_ps(p.add(i), m))) };
            i += W;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len().min(gate.len()).min(up.len());
        let (pg, pu, po) = (gate.as_ptr(), up.as_ptr(), out.as_mut_ptr());
        let mut i = 0;
        while i < n {
            let m = if i + W <= n { _mm256_set1_epi32(-1) } else { tail_mask(n - i) };
            // SAFETY: lanes of `m` cover `i..min(i+8, n)`, inside all three slices.
            unsafe {
                let s = silu_v(_mm256_maskload_ps(pg.add(i), m));
                _mm256_maskstore_ps(po.add(i), m, _mm256_mul_ps(s, _mm256_maskload_ps(pu.add(i), m)));
            }
            i += W;
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cpu::reference;
    use crate::cpu::vec::testing::{assert_close, random_vec};

    const PARS: [Par; 2] = [Par::Never, Par::Always];

    #[test]
    fn hand_computed_values() {
        // silu(0) = 0, silu(x) -> x for large x, -> -0 for very negative x; silu(1) = 1/(1+1/e).
        let x = [0.0f32, 1.0, 30.0, -200.0, f32::INFINITY];
        let want = [0.0f32, 1.0 / (1.0 + (-1f32).exp()), 30.0, -0.0, f32::INFINITY];
        let mut r = x;
        reference::silu(&mut r);
        assert_close(&r, &want, 0.0, 1e-7, "reference silu");
        for isa in Isa::available() {
            let mut y = x;
            silu_with(isa, Par::Never, &mut y);
            assert_close(&y, &want, 0.0, 5e-7, &format!("{isa:?} silu"));
            let mut out = [0f32; 5];
            swiglu_with(isa, Par::Never, &x, &[2.0; 5], &mut out).unwrap();
            let doubled: Vec<f32> = want.iter().map(|w| 2.0 * w).collect();
            assert_close(&out, &doubled, 0.0, 5e-7, &format!("{isa:?} swiglu"));
        }
        let mut acc = [1.0f32, 2.0, 3.0];
        add(&mut acc, &[0.5, 0.5, -3.0]).unwrap();
        assert_eq!(acc, [1.5, 2.5, 0.0]);
        mul(&mut acc, &[2.0, -2.0, 7.0]).unwrap();
        assert_eq!(acc, [3.0, -5.0, 0.0]);
        scale(&mut acc, 0.5);
        assert_eq!(acc, [1.5, -2.5, 0.0]);
    }

    #[test]
    fn length_mismatches_are_errors() {
        let mut out = [0f32; 3];
        assert!(matches!(swiglu(&[1.0; 3], &[1.0; 2], &mut out), Err(Error::LengthMismatch { what: "up", .. })));
        assert!(matches!(swiglu(&[1.0; 3], &[1.0; 3], &mut out[..2]), Err(Error::LengthMismatch { .. })));
        assert!(add(&mut out, &[1.0; 4]).is_err());
        assert!(mul(&mut out, &[1.0; 2]).is_err());
        assert!(reference::add(&mut out, &[1.0; 4]).is_err());
        assert!(reference::swiglu(&[1.0; 3], &[1.0; 2], &mut out).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]

        #[test]
        fn match_reference(len in 0usize..400, spread in 0.1f32..100.0, s in -3.0f32..3.0, seed: u64) {
            let a = random_vec(seed, len, spread);
            let b = random_vec(seed ^ 7, len, 2.0);
            let mut silu_want = a.clone();
            reference::silu(&mut silu_want);
            let mut swiglu_want = vec![0f32; len];
            reference::swiglu(&a, &b, &mut swiglu_want).unwrap();
            let (mut add_want, mut mul_want, mut scale_want) = (a.clone(), a.clone(), a.clone());
            reference::add(&mut add_want, &b).unwrap();
            reference::mul(&mut mul_want, &b).unwrap();
            reference::scale(&mut scale_want, s);
            for isa in Isa::available() {
                for par in PARS {
                    let ctx = format!("{isa:?} {par:?}");
                    let mut got = a.clone();
                    silu_with(isa, par, &mut got);
                    assert_close(&got, &silu_want, 1e-30, 5e-7, &ctx);
                    let mut got = vec![0f32; len];
                    swiglu_with(isa, par, &a, &b, &mut got).unwrap();
                    assert_close(&got, &swiglu_want, 1e-30, 5e-7, &ctx);
                    // Add, multiply and scale round exactly as the reference.
                    let mut got = a.clone();
                    add_with(isa, par, &mut got, &b).unwrap();
                    prop_assert_eq!(&got, &add_want);
                    let mut got = a.clone();
                    mul_with(isa, par, &mut got, &b).unwrap();
                    prop_assert_eq!(&got, &mul_want);
                    let mut got = a.clone();
                    scale_with(isa, par, &mut got, s);
                    prop_assert_eq!(&got, &scale_want);
                }
            }
        }

        /// A long slice, so the parallel chunking splits it with a ragged last chunk.
        #[test]
        fn long_slices_match_reference(extra in 0usize..100, seed: u64) {
            let len = 2 * PAR_CHUNK + extra;
            let a = random_vec(seed, len, 10.0);
            let b = random_vec(seed ^ 3, len, 1.0);
            let mut want = vec![0f32; len];
            reference::swiglu(&a, &b, &mut want).unwrap();
            for isa in Isa::available() {
                let mut got = vec![0f32; len];
                swiglu_with(isa, Par::Always, &a, &b, &mut got).unwrap();
                assert_close(&got, &want, 1e-30, 5e-7, &format!("{isa:?}"));
            }
        }
    }
}
