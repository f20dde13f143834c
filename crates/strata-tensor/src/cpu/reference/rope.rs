//! Reference rotary position embedding: [`rope`], the fused [`rope_qk`] built from it, and
//! [`rope_rotate`] with caller-given cosines and sines.

use crate::Result;
pub use crate::cpu::RopeLayout;
use crate::cpu::rope::{check_rope, check_rotate};

/// Reference for [`crate::cpu::rope`]: for each token, head and frequency `i`, the angle
/// `pos * inv_freq[i]` in f32, `c = cos(angle) * attention_factor`, `s = sin(angle) *
/// attention_factor`, and the pair `(a, b)` (`(i, i + rot/2)` for [`RopeLayout::RotateHalf`],
/// `(2i, 2i + 1)` for [`RopeLayout::Interleaved`]) becomes `(a*c - b*s, b*c + a*s)`, each
/// product rounded separately as in `q * cos + rotate_half(q) * sin`.
pub fn rope(
    x: &mut [f32],
    positions: &[usize],
    n_heads: usize,
    head_dim: usize,
    inv_freq: &[f32],
    attention_factor: f32,
    layout: RopeLayout,
) -> Result<()> {
    check_rope("reference::rope", x.len(), positions.len(), n_heads, head_dim, inv_freq.len())?;
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..n_heads {
            let v = &mut x[(t * n_heads + h) * head_dim..][..head_dim];
            for (i, f) in inv_freq.iter().enumerate() {
                let angle = pos as f32 * f;
                rotate_pair(
                    v,
                    i,
                    inv_freq.len(),
                    angle.cos() * attention_factor,
                    angle.sin() * attention_factor,
                    layout,
                );
            }
        }
    }
    Ok(())
}

/// Reference for [`crate::cpu::rope_qk`]: [`rope`] on the queries, then [`rope`] on the keys.
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
    check_rope("reference::rope_qk (queries)", q.len(), positions.len(), n_heads, head_dim, inv_freq.len())?;
    check_rope("reference::rope_qk (keys)", k.len(), positions.len(), n_kv_heads, head_dim, inv_freq.len())?;
    rope(q, positions, n_heads, head_dim, inv_freq, attention_factor, layout)?;
    rope(k, positions, n_kv_heads, head_dim, inv_freq, attention_factor, layout)
}

/// Reference for [`crate::cpu::rope_rotate`]: pair `i` of every head of token `t` becomes
/// `(a*c - b*s, b*c + a*s)` with `c = cos[t, i]`, `s = sin[t, i]`.
pub fn rope_rotate(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
    layout: RopeLayout,
) -> Result<()> {
    let (tokens, half) = check_rotate("reference::rope_rotate", x.len(), n_heads, head_dim, cos.len(), sin.len())?;
    for t in 0..tokens {
        for h in 0..n_heads {
            let v = &mut x[(t * n_heads + h) * head_dim..][..head_dim];
            for i in 0..half {
                rotate_pair(v, i, half, cos[t * half + i], sin[t * half + i], layout);
            }
        }
    }
    Ok(())
}

/// Turns pair `i` of one head `v` (with `half` pairs) by `(c, s)`.
fn rotate_pair(v: &mut [f32], i: usize, half: usize, c: f32, s: f32, layout: RopeLayout) {
    let (a, b) = match layout {
        RopeLayout::RotateHalf => (i, i + half),
        RopeLayout::Interleaved => (2 * i, 2 * i + 1),
    };
    let (x0, x1) = (v[a], v[b]);
    v[a] = x0 * c - x1 * s;
    v[b] = x1 * c + x0 * s;
}
