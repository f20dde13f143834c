//! Reference RMS normalisation.

use super::softmax::pairwise_sum;
use crate::Result;
use crate::cpu::norm::check_rms_norm;

/// Reference for [`crate::cpu::rms_norm`]: per row, `x * (1 / sqrt(mean(x^2) + eps))`, then
/// times `weight`, each product rounded to f32 in that order as in HF `LlamaRMSNorm`. The mean
/// is a pairwise f32 sum of the squares divided by the row length.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    check_rms_norm("reference::rms_norm", x, weight, out)?;
    let d = weight.len();
    for (x, out) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let squares: Vec<f32> = x.iter().map(|v| v * v).collect();
        let mean = pairwise_sum(&squares) / d as f32;
        let inv_rms = 1.0 / (mean + eps).sqrt();
        for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
            *o = (v * inv_rms) * w;
        }
    }
    Ok(())
}
