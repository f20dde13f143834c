//! Reference top-k expert gating.

use super::softmax::softmax_row;
use crate::Result;
use crate::cpu::gating::{check_gating, check_gating_dynamic, nan_router_error};

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

/// Reference for [`crate::cpu::topk_gating_dynamic`]: per token, softmax over the experts and a
/// stable sort of the expert indices by descending probability (ties keep the lower index
/// first), as in [`topk_gating`]. Then the probabilities are added in that order in f32,
/// starting from 0, and the count is the first `n` at which the running sum is `>= threshold`
/// (all `n_experts` if it never is), clamped to `min_k..=max_k`. The first `count` slots of the
/// token get the chosen experts and their probabilities (divided by their sum, added in the same
/// descending order, when `renormalize`); the remaining slots get id `u32::MAX` and weight 0.
#[allow(clippy::too_many_arguments)]
pub fn topk_gating_dynamic(
    logits: &[f32],
    n_experts: usize,
    min_k: usize,
    max_k: usize,
    threshold: f32,
    renormalize: bool,
    ids: &mut [u32],
    weights: &mut [f32],
    counts: &mut [u32],
) -> Result<()> {
    check_gating_dynamic(
        "reference::topk_gating_dynamic",
        logits.len(),
        n_experts,
        min_k,
        max_k,
        threshold,
        ids.len(),
        weights.len(),
        counts.len(),
    )?;
    for (t, row) in logits.chunks_exact(n_experts).enumerate() {
        let mut probs = row.to_vec();
        softmax_row(&mut probs);
        if probs.iter().any(|p| p.is_nan()) {
            return Err(nan_router_error("reference::topk_gating_dynamic", t));
        }
        let mut order: Vec<usize> = (0..n_experts).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let mut reached = n_experts;
        let mut cumulative = 0f32;
        for (n, &e) in order.iter().enumerate() {
            cumulative += probs[e];
            if cumulative >= threshold {
                reached = n + 1;
                break;
            }
        }
        let count = reached.clamp(min_k, max_k);
        let (ids, weights) = (&mut ids[t * max_k..][..max_k], &mut weights[t * max_k..][..max_k]);
        let sum: f32 = order[..count].iter().map(|&e| probs[e]).sum();
        for (slot, (id, w)) in ids.iter_mut().zip(weights.iter_mut()).enumerate() {
            if slot < count {
                let e = order[slot];
                *id = e as u32;
                *w = if renormalize { probs[e] / sum } else { probs[e] };
            } else {
                *id = u32::MAX;
                *w = 0.0;
            }
        }
        counts[t] = count as u32;
    }
    Ok(())
}
