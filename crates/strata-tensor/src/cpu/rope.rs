//! Rotary position embedding (fast version), in both pairings models use.
//!
//! For each token the cosines and sines of its angles are computed once (f32 `cos`/`sin` of
//! `pos as f32 * inv_freq[i]`, times the attention factor, as transformers computes them) and
//! applied to every head with vector multiplies and adds. No fused multiply-add is used, so each
//! product is rounded as in the reference and in `q * cos + rotate_half(q) * sin`: the fast
//! version gives the reference's bits. Tokens are split across rayon's threads for prefill.

use rayon::prelude::*;

use super::vec::{self, Par, simd_dispatch};
use super::{Isa, isa};
use crate::{Error, Result};

/// Elements below which the tokens stay on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 14;

/// How the rotary dimensions are paired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// Hugging Face / GPT-NeoX: dimension `i` pairs with `i + rot/2` (`rotate_half`).
    RotateHalf,
    /// GPT-J / ggml's normal mode: dimension `2i` pairs with `2i + 1`.
    Interleaved,
}

/// Rotates the queries or keys `x` (`[positions.len(), n_heads, head_dim]`) in place by their
/// positions.
///
/// The first `rot = 2 * inv_freq.len()` dimensions of each head rotate (`rot <= head_dim`;
/// dimensions past `rot` are unchanged, for partial rotary models); pair `i` turns by the angle
/// `pos as f32 * inv_freq[i]`, and the cosine and sine are multiplied by `attention_factor`
/// (1 unless the RoPE scaling says otherwise, e.g. YaRN). The pairing is `layout`'s.
pub fn rope(
    x: &mut [f32],
    positions: &[usize],
    n_heads: usize,
    head_dim: usize,
    inv_freq: &[f32],
    attention_factor: f32,
    layout: RopeLayout,
) -> Result<()> {
    rope_with(isa(), Par::Auto, x, positions, n_heads, head_dim, inv_freq, attention_factor, layout)
}

/// [`rope`] on a given ISA and threading choice.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_with(
    isa: Isa,
    par: Par,
    x: &mut [f32],
    positions: &[usize],
    n_heads: usize,
    head_dim: usize,
    inv_freq: &[f32],
    attention_factor: f32,
    layout: RopeLayout,
) -> Result<()> {
    check_rope("rope", x.len(), positions.len(), n_heads, head_dim, inv_freq.len())?;
    if x.is_empty() || inv_freq.is_empty() {
        return Ok(());
    }
    let isa = vec::usable(isa);
    let token = |table: &mut Vec<f32>, (x, &pos): (&mut [f32], &usize)| {
        rope_token(isa, x, pos, head_dim, inv_freq, attention_factor, layout, table);
    };
    let stride = n_heads * head_dim;
    if positions.len() > 1 && par.decide(x.len(), PAR_MIN_ELEMS) {
        x.par_chunks_mut(stride).zip(positions.par_iter()).for_each_init(Vec::new, token);
    } else {
        let mut table = Vec::new();
        x.chunks_mut(stride).zip(positions).for_each(|item| token(&mut table, item));
    }
    Ok(())
}

/// Rotates every head of one token; `table` is scratch for its cosines and sines.
#[allow(clippy::too_many_arguments)]
fn rope_token(
    isa: Isa,
    x: &mut [f32],
    pos: usize,
    head_dim: usize,
    inv_freq: &[f32],
    attention_factor: f32,
    layout: RopeLayout,
    table: &mut Vec<f32>,
) {
    let half = inv_freq.len();
    let rot = 2 * half;
    table.clear();
    match layout {
        RopeLayout::RotateHalf => {
            // table = [cos_0 .. cos_{half-1}, sin_0 .. sin_{half-1}].
            table.resize(rot, 0.0);
            let (cos, sin) = table.split_at_mut(half);
            for ((c, s), f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
                let angle = pos as f32 * f;
                *c = angle.cos() * attention_factor;
                *s = angle.sin() * attention_factor;
            }
            for head in x.chunks_exact_mut(head_dim) {
                let (x1, rest) = head.split_at_mut(half);
                simd_dispatch!(isa, rotate_half(x1, &mut rest[..half], cos, sin));
            }
        }
        RopeLayout::Interleaved => {
            // table = [c_0, c_0, c_1, c_1, ..] then [-s_0, s_0, -s_1, s_1, ..], so that lane j
            // computes x[j] * cos2[j] + x[j ^ 1] * sin2[j].
            table.resize(2 * rot, 0.0);
            let (cos2, sin2) = table.split_at_mut(rot);
            for (i, f) in inv_freq.iter().enumerate() {
                let angle = pos as f32 * f;
                let (c, s) = (angle.cos() * attention_factor, angle.sin() * attention_factor);
                cos2[2 * i] = c;
                cos2[2 * i + 1] = c;
                sin2[2 * i] = -s;
                sin2[2 * i + 1] = s;
            }
            for head in x.chunks_exact_mut(head_dim) {
                simd_dispatch!(isa, rotate_pairs(&mut head[..rot], cos2, sin2));
            }
        }
    }
}

/// Checks the operands of a rotary embedding.
pub(crate) fn check_rope(
    op: &'static str,
    x_len: usize,
    tokens: usize,
    n_heads: usize,
    head_dim: usize,
    n_freq: usize,
) -> Result<()> {
    let expected = tokens.checked_mul(n_heads).and_then(|v| v.checked_mul(head_dim)).ok_or_else(|| {
        Error::InvalidArgument { op, msg: format!("{tokens} tokens x {n_heads} heads x {head_dim} overflows") }
    })?;
    if x_len != expected {
        return Err(Error::LengthMismatch { op, what: "x", expected, got: x_len });
    }
    if 2 * n_freq > head_dim {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("{n_freq} frequencies rotate {} dimensions, more than head_dim {head_dim}", 2 * n_freq),
        });
    }
    Ok(())
}

mod scalar {
    /// `(x1, x2) = (x1*c - x2*s, x2*c + x1*s)` lane by lane.
    pub(super) fn rotate_half(x1: &mut [f32], x2: &mut [f32], cos: &[f32], sin: &[f32]) {
        for (((a, b), c), s) in x1.iter_mut().zip(x2.iter_mut()).zip(cos).zip(sin) {
            let (x0, x1) = (*a, *b);
            *a = x0 * c - x1 * s;
            *b = x1 * c + x0 * s;
        }
    }

    /// `x[j] = x[j] * cos2[j] + x[j ^ 1] * sin2[j]` for each pair.
    pub(super) fn rotate_pairs(x: &mut [f32], cos2: &[f32], sin2: &[f32]) {
        for ((p, c), s) in x.chunks_exact_mut(2).zip(cos2.chunks_exact(2)).zip(sin2.chunks_exact(2)) {
            let (x0, x1) = (p[0], p[1]);
            p[0] = x0 * c[0] + x1 * s[0];
            p[1] = x1 * c[1] + x0 * s[1];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::cpu::vec::avx512::{W, tail_mask};

    #[target_feature(enable = "avx512f")]
    pub(super) fn rotate_half(x1: &mut [f32], x2: &mut [f32], cos: &[f32], sin: &[f32]) {
        let n = cos.len();
        debug_assert!(x1.len() >= n && x2.len() >= n && sin.len() >= n);
        let (p1, p2, pc, ps) = (x1.as_mut_ptr(), x2.as_mut_ptr(), cos.as_ptr(), sin.as_ptr());
        let mut i = 0;
        while i < n {
            let m = if i + W <= n { !0 } else { tail_mask(n - i) };
            // SAFETY: lanes of `m` cover `i..min(i+16, n)`, inside all four slices (each holds
            // at least `n` floats); `x1` and `x2` are disjoint.
            unsafe {
                let (a, b) = (_mm512_maskz_loadu_ps(m, p1.add(i)), _mm512_maskz_loadu_ps(m, p2.add(i)));
                let (c, s) = (_mm512_maskz_loadu_ps(m, pc.add(i)), _mm512_maskz_loadu_ps(m, ps.add(i)));
                let ra = _mm512_sub_ps(_mm512_mul_ps(a, c), _mm512_mul_ps(b, s));
                let rb = _mm512_add_ps(_mm512_mul_ps(b, c), _mm512_mul_ps(a, s));
                _mm512_mask_storeu_ps(p1.add(i), m, ra);
                _mm512_mask_storeu_ps(p2.add(i), m, rb);
            }
            i += W;
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn rotate_pairs(x: &mut [f32], cos2: &[f32], sin2: &[f32]) {
        let n = x.len();
        debug_assert!(cos2.len() >= n && sin2.len() >= n && n.is_multiple_of(2));
        let (px, pc, ps) = (x.as_mut_ptr(), cos2.as_ptr(), sin2.as_ptr());
        let mut i = 0;
        while i < n {
            let m = if i + W <= n { !0 } else { tail_mask(n - i) };
            // SAFETY: lanes of `m` cover `i..min(i+16, n)`, inside all three slices. `n` is
            // even and `i` a multiple of 16, so no pair straddles the mask boundary.
            unsafe {
                let v = _mm512_maskz_loadu_ps(m, px.add(i));
                let swapped = _mm512_permute_ps::<0b10_11_00_01>(v);
                let (c, s) = (_mm512_maskz_loadu_ps(m, pc.add(i)), _mm512_maskz_loadu_ps(m, ps.add(i)));
                let r = _mm512_add_ps(_mm512_mul_ps(v, c), _mm512_mul_ps(swapped, s));
                _mm512_mask_storeu_ps(px.add(i), m, r);
            }
            i += W;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::cpu::vec::avx2::{W, tail_mask};

    #[target_feature(enable = "avx2")]
    pub(super) fn rotate_half(x1: &mut [f32], x2: &mut [f32], cos: &[f32], sin: &[f32]) {
        let n = cos.len();
        debug_assert!(x1.len() >= n && x2.len() >= n && sin.len() >= n);
        let (p1, p2, pc, ps) = (x1.as_mut_ptr(), x2.as_mut_ptr(), cos.as_ptr(), sin.as_ptr());
        let mut i = 0;
        while i < n {
            let m = if i + W <= n { _mm256_set1_epi32(-1) } else { tail_mask(n - i) };
            // SAFETY: lanes of `m` cover `i..min(i+8, n)`, inside all four slices (each holds at
            // least `n` floats); `x1` and `x2` are disjoint.
            unsafe {
                let (a, b) = (_mm256_maskload_ps(p1.add(i), m), _mm256_maskload_ps(p2.add(i), m));
                let (c, s) = (_mm256_maskload_ps(pc.add(i), m), _mm256_maskload_ps(ps.add(i), m));
                let ra = _mm256_sub_ps(_mm256_mul_ps(a, c), _mm256_mul_ps(b, s));
                let rb = _mm256_add_ps(_mm256_mul_ps(b, c), _mm256_mul_ps(a, s));
                _mm256_maskstore_ps(p1.add(i), m, ra);
                _mm256_maskstore_ps(p2.add(i), m, rb);
            }
            i += W;
        }
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn rotate_pairs(x: &mut [f32], cos2: &[f32], sin2: &[f32]) {
        let n = x.len();
        debug_assert!(cos2.len() >= n && sin2.len() >= n && n.is_multiple_of(2));
        let (px, pc, ps) = (x.as_mut_ptr(), cos2.as_ptr(), sin2.as_ptr());
        let mut i = 0;
        while i < n {
            let m = if i + W <= n { _mm256_set1_epi32(-1) } else { tail_mask(n - i) };
            // SAFETY: lanes of `m` cover `i..min(i+8, n)`, inside all three slices. `n` is even
            // and `i` a multiple of 8, so no pair straddles the mask boundary.
            unsafe {
                let v = _mm256_maskload_ps(px.add(i), m);
                let swapped = _mm256_permute_ps::<0b10_11_00_01>(v);
                let (c, s) = (_mm256_maskload_ps(pc.add(i), m), _mm256_maskload_ps(ps.add(i), m));
                let r = _mm256_add_ps(_mm256_mul_ps(v, c), _mm256_mul_ps(swapped, s));
                _mm256_maskstore_ps(px.add(i), m, r);
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
    use crate::cpu::vec::testing::random_vec;

    const LAYOUTS: [RopeLayout; 2] = [RopeLayout::RotateHalf, RopeLayout::Interleaved];

    /// HF-style inverse frequencies `base^(-2i/rot)` for `rot` rotary dimensions.
    fn inv_freq(rot: usize, base: f32) -> Vec<f32> {
        (0..rot / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / rot as f32)).collect()
    }

    #[test]
    fn position_zero_is_identity() {
        let x = random_vec(7, 3 * 2 * 10, 1.0);
        for layout in LAYOUTS {
            for isa in Isa::available() {
                let mut y = x.clone();
                rope_with(isa, Par::Never, &mut y, &[0, 0, 0], 2, 10, &inv_freq(8, 10000.0), 1.0, layout).unwrap();
                assert_eq!(y, x, "{isa:?} {layout:?}");
            }
        }
    }

    #[test]
    fn hand_computed_rotation() {
        // One head of 6 dims, 2 frequencies (rot 4, dims 4 and 5 pass through), position 1,
        // inv_freq [pi/2, pi]: pair 0 turns by 90 degrees, pair 1 by 180 degrees.
        let freqs = [std::f32::consts::FRAC_PI_2, std::f32::consts::PI];
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        // RotateHalf pairs (0, 2) and (1, 3): (1, 3) -> (-3, 1); (2, 4) -> (-2, -4).
        let half = [-3.0f32, -2.0, 1.0, -4.0, 5.0, 6.0];
        // Interleaved pairs (0, 1) and (2, 3): (1, 2) -> (-2, 1); (3, 4) -> (-3, -4).
        let inter = [-2.0f32, 1.0, -3.0, -4.0, 5.0, 6.0];
        for (layout, want) in [(RopeLayout::RotateHalf, half), (RopeLayout::Interleaved, inter)] {
            let mut y = x;
            reference::rope(&mut y, &[1], 1, 6, &freqs, 1.0, layout).unwrap();
            for (g, w) in y.iter().zip(&want) {
                assert!((g - w).abs() < 1e-6, "{layout:?}: {y:?} vs {want:?}");
            }
            // The attention factor scales the rotated dims only.
            let mut z = x;
            reference::rope(&mut z, &[1], 1, 6, &freqs, 2.0, layout).unwrap();
            assert_eq!(&z[4..], &x[4..]);
            assert!((z[0] - 2.0 * want[0]).abs() < 1e-5);
        }
    }

    #[test]
    fn rotation_composes_additively() {
        // Rotating by position 5 and then by 7 equals rotating by 12: rotations compose
        // additively, which the KV cache's re-rotation of cached keys relies on.
        let freqs = inv_freq(16, 500.0);
        let x = random_vec(3, 16, 1.0);
        for layout in LAYOUTS {
            let mut a = x.clone();
            rope(&mut a, &[5], 1, 16, &freqs, 1.0, layout).unwrap();
            rope(&mut a, &[7], 1, 16, &freqs, 1.0, layout).unwrap();
            let mut b = x.clone();
            rope(&mut b, &[12], 1, 16, &freqs, 1.0, layout).unwrap();
            for (g, w) in a.iter().zip(&b) {
                assert!((g - w).abs() < 1e-5, "{layout:?}");
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut x = vec![0f32; 24];
        assert!(matches!(
            rope(&mut x, &[0, 1], 2, 5, &[1.0], 1.0, RopeLayout::RotateHalf),
            Err(Error::LengthMismatch { .. })
        ));
        assert!(rope(&mut x, &[0, 1], 2, 6, &[1.0; 4], 1.0, RopeLayout::RotateHalf).is_err());
        assert!(reference::rope(&mut x, &[0, 1], 2, 6, &[1.0; 4], 1.0, RopeLayout::Interleaved).is_err());
        assert!(rope(&mut x, &[0, 1], 2, 6, &[1.0; 3], 1.0, RopeLayout::Interleaved).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]

        /// The fast version gives the reference's bits: same angles, same roundings, no FMA.
        #[test]
        fn matches_reference_exactly(
            tokens in 1usize..6,
            n_heads in 1usize..5,
            head_dim in 1usize..140,
            rot_frac in 0.0f64..=1.0,
            pos0 in 0usize..5000,
            factor in 0.5f32..2.0,
            seed: u64,
        ) {
            let rot = ((head_dim / 2) as f64 * rot_frac) as usize * 2;
            let freqs = inv_freq(rot, 10000.0);
            let positions: Vec<usize> = (0..tokens).map(|t| pos0 + t * 37).collect();
            let x = random_vec(seed, tokens * n_heads * head_dim, 2.0);
            for layout in LAYOUTS {
                let mut want = x.clone();
                reference::rope(&mut want, &positions, n_heads, head_dim, &freqs, factor, layout).unwrap();
                for isa in Isa::available() {
                    for par in [Par::Never, Par::Always] {
                        let mut got = x.clone();
                        rope_with(isa, par, &mut got, &positions, n_heads, head_dim, &freqs, factor, layout).unwrap();
                        prop_assert_eq!(&got, &want, "{:?} {:?} {:?}", isa, par, layout);
                    }
                }
            }
        }
    }
}
