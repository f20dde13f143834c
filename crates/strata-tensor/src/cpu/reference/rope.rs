//! Reference rotary position embedding.

use crate::Result;
pub use crate::cpu::RopeLayout;
use crate::cpu::rope::check_rope;

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
    let half = inv_freq.len();
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..n_heads {
            let v = &mut x[(t * n_heads + h) * head_dim..][..head_dim];
            for (i, f) in inv_freq.iter().enumerate() {
                let angle = pos as f32 * f;
                let c = angle.cos() * attention_factor;
                let s = angle.sin() * attention_factor;
                let (a, b) = match layout {
                    RopeLayout::RotateHalf => (i, i + half),
                    RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                };
                let (x0, x1) = (v[a], v[b]);
                v[a] = x0 * c - x1 * s;
                v[b] = x1 * c + x0 * s;
            }
        }
    }
    Ok(())
}
