//! Top-k expert gating for Mixture-of-Experts routers, fixed and dynamic k (`kernels/gating.cu`).
//!
//! The routing stays on the device: expert ids and weights are written to device buffers for
//! the expert kernels to read, never copied to the host to pick experts.

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

use crate::cuda::params::{GatingParams, STRATA_GATING_MAX_EXPERTS, STRATA_GATING_MAX_K};
use crate::cuda::{Cuda, check_len, ptr, ptr_mut};
use crate::{Error, Result};

/// Warps (tokens) per block.
const WARPS: usize = 4;

/// Checks the shape of a gating launch and returns the number of tokens.
fn check_gating(op: &str, logits: usize, n_experts: usize, min_k: usize, max_k: usize) -> Result<usize> {
    if n_experts == 0 || n_experts > STRATA_GATING_MAX_EXPERTS as usize {
        return Err(Error::invalid(op, format!("{n_experts} experts; 1 to {STRATA_GATING_MAX_EXPERTS} supported")));
    }
    if max_k == 0 || max_k > n_experts || max_k > STRATA_GATING_MAX_K as usize {
        return Err(Error::invalid(
            op,
            format!("k = {max_k} is outside 1..={}", n_experts.min(STRATA_GATING_MAX_K as usize)),
        ));
    }
    if min_k == 0 || min_k > max_k {
        return Err(Error::invalid(op, format!("min_k = {min_k} is outside 1..={max_k} (max_k)")));
    }
    if !logits.is_multiple_of(n_experts) {
        return Err(Error::invalid(
            op,
            format!("{logits} logits are not a whole number of tokens of {n_experts} experts"),
        ));
    }
    let tokens = logits / n_experts;
    if tokens > u32::MAX as usize {
        return Err(Error::invalid(op, format!("{tokens} tokens: at most 2^32 - 1 per launch")));
    }
    Ok(tokens)
}

/// Launches `topk_gating_f32`; `counts` is 0 (null) for fixed k.
fn launch(cuda: &Cuda, p: GatingParams, logits: u64, ids: u64, weights: u64, counts: u64) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: ((p.tokens as usize).div_ceil(WARPS) as u32, 1, 1),
        block_dim: (32 * WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the callers checked that logits holds tokens * n_experts floats, ids and weights
    // tokens * max_k elements and counts (when not null) tokens; the kernel touches no more.
    unsafe { cuda.launch("gating", "topk_gating_f32", cfg, &p, &[logits, ids, weights, counts]) }
}

/// Routes each token of `logits` (`[tokens, n_experts]`) to its `k` most probable experts: per
/// token, softmax over the experts, then `ids[t*k..][..k]` gets the expert indices in
/// descending order of probability (ties to the lower index) and `weights` the probabilities,
/// divided by their sum (added in that order) when `renormalize`.
///
/// The CUDA twin of `strata_tensor::cpu::reference::topk_gating`: ids the same, weights within a
/// few ulp (the softmax sum is added in another order). `n_experts` may be at most 256 and `k`
/// at most 32 (and `n_experts`). A token whose logits give NaN probabilities (a NaN or `+inf`
/// logit), which the CPU version reports as an error, gets ids `u32::MAX` and weights NaN here:
/// the device cannot return an error without a synchronisation.
pub fn topk_gating<L, I, W>(
    cuda: &Cuda,
    logits: &L,
    n_experts: usize,
    k: usize,
    renormalize: bool,
    ids: &mut I,
    weights: &mut W,
) -> Result<()>
where
    L: DevicePtr<f32>,
    I: DevicePtrMut<u32>,
    W: DevicePtrMut<f32>,
{
    const OP: &str = "topk_gating";
    let tokens = check_gating(OP, logits.len(), n_experts, k, k)?;
    check_len(OP, "ids", ids.len(), tokens * k)?;
    check_len(OP, "weights", weights.len(), tokens * k)?;
    if tokens == 0 {
        return Ok(());
    }
    let p = GatingParams {
        tokens: tokens as u32,
        n_experts: n_experts as u32,
        min_k: k as u32,
        max_k: k as u32,
        threshold: 0.0,
        renormalize: renormalize.into(),
    };
    launch(cuda, p, ptr(cuda, logits), ptr_mut(cuda, ids), ptr_mut(cuda, weights), 0)
}

/// Routes each token of `logits` (`[tokens, n_experts]`) to a variable number of experts: the
/// fewest, in descending order of probability (ties to the lower index), whose probabilities
/// added in that order in f32 reach `threshold` (`>=`; all experts if the sum never does),
/// clamped to `min_k..=max_k`.
///
/// Token `t` owns slots `t*max_k..(t+1)*max_k` of `ids` and `weights`: the first `counts[t]`
/// hold the chosen experts and their probabilities (divided by their sum, added in the same
/// order, when `renormalize`); the rest get id `u32::MAX` and weight 0. The CUDA twin of
/// `strata_tensor::cpu::reference::topk_gating_dynamic` (counts may differ only where the
/// threshold lies within rounding of a running sum). Limits as for [`topk_gating`], with
/// `1 <= min_k <= max_k`; a NaN `threshold` is an error. A token whose probabilities are NaN
/// gets ids `u32::MAX`, weights NaN and count 0.
#[allow(clippy::too_many_arguments)]
pub fn topk_gating_dynamic<L, I, W, C>(
    cuda: &Cuda,
    logits: &L,
    n_experts: usize,
    min_k: usize,
    max_k: usize,
    threshold: f32,
    renormalize: bool,
    ids: &mut I,
    weights: &mut W,
    counts: &mut C,
) -> Result<()>
where
    L: DevicePtr<f32>,
    I: DevicePtrMut<u32>,
    W: DevicePtrMut<f32>,
    C: DevicePtrMut<u32>,
{
    const OP: &str = "topk_gating_dynamic";
    let tokens = check_gating(OP, logits.len(), n_experts, min_k, max_k)?;
    if threshold.is_nan() {
        return Err(Error::invalid(OP, "the threshold is NaN"));
    }
    check_len(OP, "ids", ids.len(), tokens * max_k)?;
    check_len(OP, "weights", weights.len(), tokens * max_k)?;
    check_len(OP, "counts", counts.len(), tokens)?;
    if tokens == 0 {
        return Ok(());
    }
    let p = GatingParams {
        tokens: tokens as u32,
        n_experts: n_experts as u32,
        min_k: min_k as u32,
        max_k: max_k as u32,
        threshold,
        renormalize: renormalize.into(),
    };
    launch(cuda, p, ptr(cuda, logits), ptr_mut(cuda, ids), ptr_mut(cuda, weights), ptr_mut(cuda, counts))
}
