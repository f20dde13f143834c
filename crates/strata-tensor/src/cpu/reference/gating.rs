//! Reference top-k expert gating.

use super::softmax::softmax_row;
use crate::Result;
use crate::cpu::gating::{check_gating, nan_router_error};

/// Reference for [`crate::cpu::topk_gating`]: per token, softmax over the experts, a stable
/// sort of the expert indices by descending probability (so ties keep the lower index first),
/// the first `k` kept, then optionally divided by their sum (added in that descending order).
pub fn topk_gating(
    logits: &[f32],
    n_experts: usize,
    k: usize,
    renormalize: bool,
    ids: &mut [u32],
    weights: &mut [f32],
) -> Result<()> {
    check_gating("reference::topk_gating", logits.len(), n_experts, k, ids.len(), weights.len())?;
    for (t, row) in logits.chunks_exact(n_experts).enumerate() {
        let mut probs = row.to_vec();
        softmax_row(&mut probs);
        if probs.iter().any(|p| p.is_nan()) {
            return Err(nan_router_error("reference::topk_gating", t));
        }
        let mut order: Vec<usize> = (0..n_experts).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let (ids, weights) = (&mut ids[t * k..][..k], &mut weights[t * k..][..k]);
        for ((id, w), &e) in ids.iter_mut().zip(weights.iter_mut()).zip(&order) {
            *id = e as u32;
            *w = probs[e];
        }
        if renormalize {
            let sum: f32 = weights.iter().sum();
            for w in weights.iter_mut() {
                *w /= sum;
            }
        }
    }
    Ok(())
}
