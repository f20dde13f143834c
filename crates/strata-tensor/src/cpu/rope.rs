//! Rotary position embedding (fast version), in both pairings models use.
//!
//! For each token the cosines and sines of its angles are computed once (f32 `cos`/`sin` of
//! `pos as f32 * inv_freq[i]`, times the attention factor, as transformers computes them) and
//! applied to every head with vector multiplies and adds. No fused multiply-add is used, so each
//! product is rounded as in the reference and in `q * cos + rotate_half(q) * sin`: the fast
//! version gives the reference's bits. Tokens are split across rayon's threads for prefill.
//!
//! Three entry points share that core: [`rope`] rotates one tensor, [`rope_qk`] rotates the
//! queries and keys of the same tokens in one pass over one cos/sin table per token (the fused
//! op the decoder uses), and [`rope_rotate`] applies caller-given cosines and sines (the KV
//! cache uses it to turn cached keys from one RoPE table to another).

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
    let half = inv_freq.len();
    let token = |table: &mut Vec<f32>, (x, &pos): (&mut [f32], &usize)| {
        fill_table(table, pos, inv_freq, attention_factor, layout);
        rotate_heads(isa, x, head_dim, half, table, layout);
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

/// Rotates the queries `q` (`[positions.len(), n_heads, head_dim]`) and the keys `k`
/// (`[positions.len(), n_kv_heads, head_dim]`) of the same tokens in place, in one pass: each
/// token's cosines and sines are computed once and applied to its query and key heads.
///
/// The result is bit for bit that of [`rope`] on `q` and then on `k` with the same arguments.
#[allow(clippy::too_many_arguments)]
pub fn rope_qk(
    q: &mut [f32],
    k: &mut [f32],
    positions: &[usize],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    inv_freq: &[f32],
    attention_factor: f32,
    layout: RopeLayout,
) -> Result<()> {
    let rope = Rope { positions, head_dim, inv_freq, attention_factor, layout };
    rope_qk_with(isa(), Par::Auto, q, k, n_heads, n_kv_heads, &rope)
}

/// The arguments [`rope_qk`] shares between queries and keys.
pub(crate) struct Rope<'a> {
    pub(crate) positions: &'a [usize],
    pub(crate) head_dim: usize,
    pub(crate) inv_freq: &'a [f32],
    pub(crate) attention_factor: f32,
    pub(crate) layout: RopeLayout,
}

/// [`rope_qk`] on a given ISA and threading choice.
pub(crate) fn rope_qk_with(
    isa: Isa,
    par: Par,
    q: &mut [f32],
    k: &mut [f32],
    n_heads: usize,
    n_kv_heads: usize,
    r: &Rope<'_>,
) -> Result<()> {
    let (tokens, head_dim, half) = (r.positions.len(), r.head_dim, r.inv_freq.len());
    check_rope("rope_qk (queries)", q.len(), tokens, n_heads, head_dim, half)?;
    check_rope("rope_qk (keys)", k.len(), tokens, n_kv_heads, head_dim, half)?;
    if tokens == 0 || half == 0 || head_dim == 0 {
        return Ok(());
    }
    if n_heads == 0 || n_kv_heads == 0 {
        // Nothing to pair the other side's tokens with: rotate whichever is present alone.
        rope_with(isa, par, q, r.positions, n_heads, head_dim, r.inv_freq, r.attention_factor, r.layout)?;
        return rope_with(isa, par, k, r.positions, n_kv_heads, head_dim, r.inv_freq, r.attention_factor, r.layout);
    }
    let isa = vec::usable(isa);
    let token = |table: &mut Vec<f32>, ((q, k), &pos): ((&mut [f32], &mut [f32]), &usize)| {
        fill_table(table, pos, r.inv_freq, r.attention_factor, r.layout);
        rotate_heads(isa, q, head_dim, half, table, r.layout);
        rotate_heads(isa, k, head_dim, half, table, r.layout);
    };
    let (q_stride, k_stride) = (n_heads * head_dim, n_kv_heads * head_dim);
    if tokens > 1 && par.decide(q.len() + k.len(), PAR_MIN_ELEMS) {
        q.par_chunks_mut(q_stride)
            .zip(k.par_chunks_mut(k_stride))
            .zip(r.positions.par_iter())
            .for_each_init(Vec::new, token);
    } else {
        let mut table = Vec::new();
        q.chunks_mut(q_stride).zip(k.chunks_mut(k_stride)).zip(r.positions).for_each(|item| token(&mut table, item));
    }
    Ok(())
}

/// Rotates every head of every token of `x` (`[tokens, n_heads, head_dim]`) by caller-given
/// cosines and sines: `cos` and `sin` are `[tokens, n_freq]`, and pair `i` of token `t` (paired
/// as `layout` says) becomes `(a*c - b*s, b*c + a*s)` with `c = cos[t, i]`, `s = sin[t, i]`.
/// Dimensions past `2 * n_freq` are unchanged.
///
/// `n_freq` is `cos.len() / tokens`. This is how cached keys are turned from the angles of one
/// RoPE table to another's: a rotation by the angle difference, scaled by the ratio of the
/// attention factors.
pub fn rope_rotate(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    layout: RopeLayout,
) -> Result<()> {
    rope_rotate_with(isa(), Par::Auto, x, n_heads, head_dim, cos, sin, layout)
}

/// [`rope_rotate`] on a given ISA and threading choice.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rope_rotate_with(
    isa: Isa,
    par: Par,
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    layout: RopeLayout,
) -> Result<()> {
    let (tokens, half) = check_rotate("rope_rotate", x.len(), n_heads, head_dim, cos.len(), sin.len())?;
    if tokens == 0 || half == 0 {
        return Ok(());
    }
    let isa = vec::usable(isa);
    let token = |table: &mut Vec<f32>, ((x, c), s): ((&mut [f32], &[f32]), &[f32])| match layout {
        RopeLayout::RotateHalf => {
            for head in x.chunks_exact_mut(head_dim) {
                let (x1, rest) = head.split_at_mut(half);
                simd_dispatch!(isa, rotate_half(x1, &mut rest[..half], c, s));
            }
        }
        RopeLayout::Interleaved => {
            table.clear();
            table.resize(4 * half, 0.0);
            let (cos2, sin2) = table.split_at_mut(2 * half);
            for i in 0..half {
                cos2[2 * i] = c[i];
                cos2[2 * i + 1] = c[i];
                sin2[2 * i] = -s[i];
                sin2[2 * i + 1] = s[i];
            }
            for head in x.chunks_exact_mut(head_dim) {
                simd_dispatch!(isa, rotate_pairs(&mut head[..2 * half], cos2, sin2));
            }
        }
    };
    let stride = n_heads * head_dim;
    if tokens > 1 && par.decide(x.len(), PAR_MIN_ELEMS) {
        x.par_chunks_mut(stride).zip(cos.par_chunks(half)).zip(sin.par_chunks(half)).for_each_init(Vec::new, token);
    } else {
        let mut table = Vec::new();
        x.chunks_mut(stride).zip(cos.chunks(half)).zip(sin.chunks(half)).for_each(|item| token(&mut table, item));
    }
    Ok(())
}

/// Fills `table` with one token's cosines and sines (times `attention_factor`) in the form
/// [`rotate_heads`] reads for `layout`.
fn fill_table(table: &mut Vec<f32>, pos: usize, inv_freq: &[f32], attention_factor: f32, layout: RopeLayout) {
    let half = inv_freq.len();
    table.clear();
    match layout {
        RopeLayout::RotateHalf => {
            // table = [cos_0 .. cos_{half-1}, sin_0 .. sin_{half-1}].
            table.resize(2 * half, 0.0);
            let (cos, sin) = table.split_at_mut(half);
            for ((c, s), f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
                let angle = pos as f32 * f;
                *c = angle.cos() * attention_factor;
                *s = angle.sin() * attention_factor;
            }
        }
        RopeLayout::Interleaved => {
            // table = [c_0, c_0, c_1, c_1, ..] then [-s_0, s_0, -s_1, s_1, ..], so that lane j
            // computes x[j] * cos2[j] + x[j ^ 1] * sin2[j].
            table.resize(4 * half, 0.0);
            let (cos2, sin2) = table.split_at_mut(2 * half);
            for (i, f) in inv_freq.iter().enumerate() {
                let angle = pos as f32 * f;
                let (c, s) = (angle.cos() * attention_factor, angle.sin() * attention_factor);
                cos2[2 * i] = c;
                cos2[2 * i + 1] = c;
                sin2[2 * i] = -s;
                sin2[2 * i + 1] = s;
            }
        }
    }
}

/// Rotates every head of one token (`x` is `[heads, head_dim]`) by a table from [`fill_table`].
fn rotate_heads(isa: Isa, x: &mut [f32], head_dim: usize, half: usize, table: &[f32], layout: RopeLayout) {
    match layout {
        RopeLayout::RotateHalf => {
            let (cos, sin) = table.split_at(half);
            for head in x.chunks_exact_mut(head_dim) {
                let (x1, rest) = head.split_at_mut(half);
                simd_dispatch!(isa, rotate_half(x1, &mut rest[..half], cos, sin));
            }
        }
        RopeLayout::Interleaved => {
            let (cos2, sin2) = table.split_at(2 * half);
            for head in x.chunks_exact_mut(head_dim) {
                simd_dispatch!(isa, rotate_pairs(&mut head[..2 * half], cos2, sin2));
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

/// Checks the operands of [`rope_rotate`] and returns `(tokens, n_freq)`.
pub(crate) fn check_rotate(
    op: &'static str,
    x_len: usize,
    n_heads: usize,
    head_dim: usize,
    cos_len: usize,
    sin_len: usize,
) -> Result<(usize, usize)> {
    let stride = n_heads
        .checked_mul(head_dim)
        .ok_or_else(|| Error::InvalidArgument { op, msg: format!("{n_heads} heads x {head_dim} overflows") })?;
    if sin_len != cos_len {
        return Err(Error::LengthMismatch { op, what: "sin", expected: cos_len, got: sin_len });
    }
    if stride == 0 || x_len == 0 {
        if x_len != 0 {
            return Err(Error::LengthMismatch { op, what: "x", expected: 0, got: x_len });
        }
        return Ok((0, 0));
    }
    if !x_len.is_multiple_of(stride) {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("x has {x_len} values, not a whole number of tokens of {n_heads} x {head_dim}"),
        });
    }
    let tokens = x_len / stride;
    if !cos_len.is_multiple_of(tokens) {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("cos has {cos_len} values, not a whole number of frequencies for {tokens} tokens"),
        });
    }
    let n_freq = cos_len / tokens;
    check_rope(op, x_len, tokens, n_heads, head_dim, n_freq)?;
    Ok((tokens, n_freq))
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

    #[test]
    fn fused_qk_bad_shapes_are_errors() {
        let (mut q, mut k) = (vec![0f32; 2 * 4 * 8], vec![0f32; 2 * 2 * 8]);
        let f = inv_freq(8, 100.0);
        assert!(rope_qk(&mut q, &mut k, &[0, 1], 4, 2, 8, &f, 1.0, RopeLayout::RotateHalf).is_ok());
        assert!(matches!(
            rope_qk(&mut q, &mut k, &[0, 1], 4, 1, 8, &f, 1.0, RopeLayout::RotateHalf),
            Err(Error::LengthMismatch { op: "rope_qk (keys)", .. })
        ));
        assert!(rope_qk(&mut q, &mut k, &[0], 4, 2, 8, &f, 1.0, RopeLayout::Interleaved).is_err());
        assert!(
            reference::rope_qk(&mut q, &mut k, &[0, 1], 4, 2, 8, &inv_freq(10, 1.0), 1.0, RopeLayout::Interleaved)
                .is_err()
        );
    }

    #[test]
    fn rotate_bad_shapes_are_errors() {
        let mut x = vec![0f32; 3 * 2 * 8];
        let ok = rope_rotate(&mut x, 2, 8, &[0.0; 12], &[0.0; 12], RopeLayout::RotateHalf);
        assert!(ok.is_ok());
        // sin shorter than cos; cos not a whole number of frequencies per token; too many pairs.
        assert!(rope_rotate(&mut x, 2, 8, &[0.0; 12], &[0.0; 9], RopeLayout::RotateHalf).is_err());
        assert!(rope_rotate(&mut x, 2, 8, &[0.0; 13], &[0.0; 13], RopeLayout::RotateHalf).is_err());
        assert!(reference::rope_rotate(&mut x, 2, 8, &[0.0; 15], &[0.0; 15], RopeLayout::Interleaved).is_err());
        assert!(rope_rotate(&mut x[..47], 2, 8, &[0.0; 12], &[0.0; 12], RopeLayout::Interleaved).is_err());
        assert!(rope_rotate(&mut [], 2, 8, &[], &[], RopeLayout::Interleaved).is_ok());
    }

    #[test]
    fn rotating_by_the_angle_difference_reaches_the_new_table() {
        // Keys rotated with one table, then turned by the angle difference (and scaled by the ratio
        // of attention factors), equal keys rotated with the other table: the KV cache's re-rotation.
        let (old, new) = (inv_freq(16, 10000.0), inv_freq(16, 31000.0));
        let positions: Vec<usize> = (0..9).map(|t| 3 + 11 * t).collect();
        let x = random_vec(9, positions.len() * 3 * 20, 1.0);
        for layout in LAYOUTS {
            let mut turned = x.clone();
            rope(&mut turned, &positions, 3, 20, &old, 1.25, layout).unwrap();
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            for &pos in &positions {
                for (o, n) in old.iter().zip(&new) {
                    let delta = f64::from(pos as f32 * n) - f64::from(pos as f32 * o);
                    cos.push((delta.cos() * 0.8 / 1.25) as f32);
                    sin.push((delta.sin() * 0.8 / 1.25) as f32);
                }
            }
            rope_rotate(&mut turned, 3, 20, &cos, &sin, layout).unwrap();
            let mut direct = x.clone();
            rope(&mut direct, &positions, 3, 20, &new, 0.8, layout).unwrap();
            for (g, w) in turned.iter().zip(&direct) {
                assert!((g - w).abs() < 1e-5, "{layout:?}: {g} vs {w}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]

        /// The fused op gives the bits of the reference (two separate rotations), at every ISA
        /// level, threaded or not, for any head counts (GQA and MQA included).
        #[test]
        fn fused_qk_matches_reference_exactly(
            tokens in 1usize..7,
            n_heads in 1usize..6,
            n_kv_heads in 1usize..4,
            head_dim in 1usize..140,
            rot_frac in 0.0f64..=1.0,
            pos0 in 0usize..70_000,
            factor in 0.5f32..2.0,
            seed: u64,
        ) {
            let rot = ((head_dim / 2) as f64 * rot_frac) as usize * 2;
            let freqs = inv_freq(rot, 500_000.0);
            let positions: Vec<usize> = (0..tokens).map(|t| pos0 + t * 13).collect();
            let q = random_vec(seed, tokens * n_heads * head_dim, 2.0);
            let k = random_vec(seed ^ 1, tokens * n_kv_heads * head_dim, 2.0);
            for layout in LAYOUTS {
                let (mut want_q, mut want_k) = (q.clone(), k.clone());
                reference::rope_qk(&mut want_q, &mut want_k, &positions, n_heads, n_kv_heads, head_dim, &freqs,
                    factor, layout).unwrap();
                let r = Rope { positions: &positions, head_dim, inv_freq: &freqs, attention_factor: factor, layout };
                for isa in Isa::available() {
                    for par in [Par::Never, Par::Always] {
                        let (mut got_q, mut got_k) = (q.clone(), k.clone());
                        rope_qk_with(isa, par, &mut got_q, &mut got_k, n_heads, n_kv_heads, &r).unwrap();
                        prop_assert_eq!(&got_q, &want_q, "q {:?} {:?} {:?}", isa, par, layout);
                        prop_assert_eq!(&got_k, &want_k, "k {:?} {:?} {:?}", isa, par, layout);
                    }
                }
            }
        }

        /// Rotation by caller-given cosines and sines gives the reference's bits.
        #[test]
        fn rotate_matches_reference_exactly(
            tokens in 1usize..40,
            n_heads in 1usize..5,
            head_dim in 1usize..140,
            rot_frac in 0.0f64..=1.0,
            seed: u64,
        ) {
            let half = ((head_dim / 2) as f64 * rot_frac) as usize;
            let x = random_vec(seed, tokens * n_heads * head_dim, 2.0);
            let cos = random_vec(seed ^ 2, tokens * half, 1.2);
            let sin = random_vec(seed ^ 3, tokens * half, 1.2);
            for layout in LAYOUTS {
                let mut want = x.clone();
                reference::rope_rotate(&mut want, n_heads, head_dim, &cos, &sin, layout).unwrap();
                for isa in Isa::available() {
                    for par in [Par::Never, Par::Always] {
                        let mut got = x.clone();
                        rope_rotate_with(isa, par, &mut got, n_heads, head_dim, &cos, &sin, layout).unwrap();
                        prop_assert_eq!(&got, &want, "{:?} {:?} {:?}", isa, par, layout);
                    }
                }
            }
        }

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
