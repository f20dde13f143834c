//! Top-k expert gating for Mixture-of-Experts routers (fast version).
//!
//! Mirrors transformers' Mixtral and Qwen-MoE routers: softmax over the experts in f32, then
//! `torch.topk` of the probabilities (ties here go to the lower expert index, and the selection
//! is written in descending order of weight), optionally renormalised so the k weights sum to 1.
//! The per-token softmax uses the vector kernels; the selection keeps a sorted list of the best
//! `k` seen so far, which beats sorting for the usual k of 1 to 8. Tokens are split across
//! rayon's threads for prefill-sized batches.
//!
//! [`topk_gating_dynamic`] routes each token to a variable number of experts: the fewest whose
//! probabilities, added in descending order, reach a threshold, clamped to `min_k..=max_k`
//! (dynamic / top-p routing). Each token keeps `max_k` slots, unused ones marked `u32::MAX`.

use rayon::prelude::*;

use super::softmax::softmax_row;
use super::vec::{self, Par};
use super::{Isa, isa};
use crate::{Error, Result};

/// Logits below which the tokens stay on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 13;

/// Routes each token of `logits` (`[t, n_experts]`) to its `k` most probable experts.
///
/// Per token: `ids[t*k..][..k]` receives the expert indices in descending order of
/// probability (ties to the lower index) and `weights` the matching softmax probabilities,
/// divided by their sum when `renormalize` (as Mixtral does; Qwen-MoE makes it a config flag).
/// `k` must be in `1..=n_experts`. A token whose logits give NaN probabilities (a NaN or `+inf`
/// logit) is an error naming the token.
pub fn topk_gating(
    logits: &[f32],
    n_experts: usize,
    k: usize,
    renormalize: bool,
    ids: &mut [u32],
    weights: &mut [f32],
) -> Result<()> {
    topk_gating_with(isa(), Par::Auto, logits, n_experts, k, renormalize, ids, weights)
}

/// [`topk_gating`] on a given ISA and threading choice.
#[allow(clippy::too_many_arguments)]
pub(crate) fn topk_gating_with(
    isa: Isa,
    par: Par,
    logits: &[f32],
    n_experts: usize,
    k: usize,
    renormalize: bool,
    ids: &mut [u32],
    weights: &mut [f32],
) -> Result<()> {
    check_gating("topk_gating", logits.len(), n_experts, k, ids.len(), weights.len())?;
    if logits.is_empty() {
        return Ok(());
    }
    let isa = vec::usable(isa);
    let tokens = logits.len() / n_experts;
    if tokens > 1 && par.decide(logits.len(), PAR_MIN_ELEMS) {
        logits
            .par_chunks(n_experts)
            .zip(ids.par_chunks_mut(k))
            .zip(weights.par_chunks_mut(k))
            .enumerate()
            .try_for_each_init(Vec::new, |probs, (t, ((row, ids), weights))| {
                route_token(isa, renormalize, t, row, probs, ids, weights)
            })
    } else {
        let mut probs = Vec::new();
        logits
            .chunks(n_experts)
            .zip(ids.chunks_mut(k))
            .zip(weights.chunks_mut(k))
            .enumerate()
            .try_for_each(|(t, ((row, ids), weights))| route_token(isa, renormalize, t, row, &mut probs, ids, weights))
    }
}

/// Routes token `t` (its logits `row`); `probs` is scratch.
fn route_token(
    isa: Isa,
    renormalize: bool,
    t: usize,
    row: &[f32],
    probs: &mut Vec<f32>,
    ids: &mut [u32],
    weights: &mut [f32],
) -> Result<()> {
    probs.clear();
    probs.extend_from_slice(row);
    softmax_row(isa, probs);
    if vec::has_nan(isa, probs) {
        return Err(nan_router_error("topk_gating", t));
    }
    select_top_k(probs, ids, weights);
    if renormalize {
        let sum: f32 = weights.iter().sum();
        for w in weights.iter_mut() {
            *w /= sum;
        }
    }
    Ok(())
}

/// Routes each token of `logits` (`[t, n_experts]`) to a variable number of experts: the
/// fewest, in descending order of probability, whose probabilities add up to `threshold`.
///
/// Per token: softmax over the experts, experts ranked by descending probability (ties to the
/// lower index, as in [`topk_gating`]), the probabilities added in that order in f32 starting
/// from 0, and the count is the first `n` at which the running sum is `>= threshold` (all
/// experts if it never is: the sum may stop just short of 1), clamped to `min_k..=max_k`.
/// Each token owns `max_k` slots of `ids` and `weights`: the first `count` hold the chosen
/// experts and their probabilities (divided by their sum, added in the same order, when
/// `renormalize`), the rest id `u32::MAX` and weight 0; `counts[t]` receives the count.
/// `min_k` must be in `1..=max_k`, `max_k` in `1..=n_experts`, and `threshold` not NaN. A token
/// whose logits give NaN probabilities is an error naming the token.
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
    let bounds = DynamicK { min_k, max_k, threshold };
    topk_gating_dynamic_with(isa(), Par::Auto, logits, n_experts, bounds, renormalize, ids, weights, counts)
}

/// The count rule of [`topk_gating_dynamic`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct DynamicK {
    pub(crate) min_k: usize,
    pub(crate) max_k: usize,
    pub(crate) threshold: f32,
}

/// [`topk_gating_dynamic`] on a given ISA and threading choice.
#[allow(clippy::too_many_arguments)]
pub(crate) fn topk_gating_dynamic_with(
    isa: Isa,
    par: Par,
    logits: &[f32],
    n_experts: usize,
    bounds: DynamicK,
    renormalize: bool,
    ids: &mut [u32],
    weights: &mut [f32],
    counts: &mut [u32],
) -> Result<()> {
    let DynamicK { min_k, max_k, threshold } = bounds;
    check_gating_dynamic(
        "topk_gating_dynamic",
        logits.len(),
        n_experts,
        min_k,
        max_k,
        threshold,
        ids.len(),
        weights.len(),
        counts.len(),
    )?;
    if logits.is_empty() {
        return Ok(());
    }
    let isa = vec::usable(isa);
    let tokens = logits.len() / n_experts;
    let route = |probs: &mut Vec<f32>, (t, (((row, ids), weights), count)): (usize, TokenSlots<'_>)| {
        route_token_dynamic(isa, bounds, renormalize, t, row, probs, ids, weights, count)
    };
    if tokens > 1 && par.decide(logits.len(), PAR_MIN_ELEMS) {
        logits
            .par_chunks(n_experts)
            .zip(ids.par_chunks_mut(max_k))
            .zip(weights.par_chunks_mut(max_k))
            .zip(counts.par_iter_mut())
            .enumerate()
            .try_for_each_init(Vec::new, route)
    } else {
        let mut probs = Vec::new();
        logits
            .chunks(n_experts)
            .zip(ids.chunks_mut(max_k))
            .zip(weights.chunks_mut(max_k))
            .zip(counts.iter_mut())
            .enumerate()
            .try_for_each(|item| route(&mut probs, item))
    }
}

/// One token's logits and output slots (ids, weights, count), as the iterators zip them.
type TokenSlots<'a> = (((&'a [f32], &'a mut [u32]), &'a mut [f32]), &'a mut u32);

/// Routes token `t` (its logits `row`) to a dynamic number of experts; `probs` is scratch.
#[allow(clippy::too_many_arguments)]
fn route_token_dynamic(
    isa: Isa,
    bounds: DynamicK,
    renormalize: bool,
    t: usize,
    row: &[f32],
    probs: &mut Vec<f32>,
    ids: &mut [u32],
    weights: &mut [f32],
    count: &mut u32,
) -> Result<()> {
    probs.clear();
    probs.extend_from_slice(row);
    softmax_row(isa, probs);
    if vec::has_nan(isa, probs) {
        return Err(nan_router_error("topk_gating_dynamic", t));
    }
    // The best max_k in descending order; the running sum decides how many of them stay. A sum
    // that has not reached the threshold by max_k would be clamped to max_k anyway.
    select_top_k(probs, ids, weights);
    let mut n = bounds.max_k;
    let mut cumulative = 0f32;
    for (i, &w) in weights.iter().enumerate() {
        cumulative += w;
        if cumulative >= bounds.threshold {
            n = i + 1;
            break;
        }
    }
    let n = n.clamp(bounds.min_k, bounds.max_k);
    if renormalize {
        let sum: f32 = weights[..n].iter().sum();
        for w in &mut weights[..n] {
            *w /= sum;
        }
    }
    ids[n..].fill(u32::MAX);
    weights[n..].fill(0.0);
    *count = n as u32;
    Ok(())
}

/// Writes the `ids.len()` largest of `probs` (none NaN) into `ids`/`weights`, in descending
/// order, ties to the lower index.
fn select_top_k(probs: &[f32], ids: &mut [u32], weights: &mut [f32]) {
    let k = ids.len();
    let mut filled = 0;
    for (e, &p) in probs.iter().enumerate() {
        if filled == k && p <= weights[k - 1] {
            continue;
        }
        // Insert after every kept entry with a probability >= p: earlier experts win ties.
        let at = weights[..filled].partition_point(|&w| w >= p);
        let end = filled.min(k - 1);
        ids.copy_within(at..end, at + 1);
        weights.copy_within(at..end, at + 1);
        ids[at] = e as u32;
        weights[at] = p;
        filled = (filled + 1).min(k);
    }
}

/// Checks the operands of top-k gating.
pub(crate) fn check_gating(
    op: &'static str,
    logits_len: usize,
    n_experts: usize,
    k: usize,
    ids_len: usize,
    weights_len: usize,
) -> Result<()> {
    if n_experts == 0 {
        return Err(Error::InvalidArgument { op, msg: "n_experts is 0".into() });
    }
    if k == 0 || k > n_experts {
        return Err(Error::InvalidArgument { op, msg: format!("k = {k} is outside 1..={n_experts}") });
    }
    if !logits_len.is_multiple_of(n_experts) {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("{logits_len} logits are not a whole number of tokens of {n_experts} experts"),
        });
    }
    let expected = logits_len / n_experts * k;
    if ids_len != expected {
        return Err(Error::LengthMismatch { op, what: "ids", expected, got: ids_len });
    }
    if weights_len != expected {
        return Err(Error::LengthMismatch { op, what: "weights", expected, got: weights_len });
    }
    Ok(())
}

/// Checks the operands of dynamic top-k gating.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_gating_dynamic(
    op: &'static str,
    logits_len: usize,
    n_experts: usize,
    min_k: usize,
    max_k: usize,
    threshold: f32,
    ids_len: usize,
    weights_len: usize,
    counts_len: usize,
) -> Result<()> {
    check_gating(op, logits_len, n_experts, max_k, ids_len, weights_len)?;
    if min_k == 0 || min_k > max_k {
        return Err(Error::InvalidArgument { op, msg: format!("min_k = {min_k} is outside 1..={max_k} (max_k)") });
    }
    if threshold.is_nan() {
        return Err(Error::InvalidArgument { op, msg: "the threshold is NaN".into() });
    }
    let expected = logits_len / n_experts;
    if counts_len != expected {
        return Err(Error::LengthMismatch { op, what: "counts", expected, got: counts_len });
    }
    Ok(())
}

/// The error for a token whose router probabilities are NaN.
pub(crate) fn nan_router_error(op: &'static str, token: usize) -> Error {
    Error::InvalidArgument { op, msg: format!("token {token}: router logits give NaN probabilities (NaN or +inf)") }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cpu::reference;
    use crate::cpu::vec::testing::random_vec;

    fn run(isa: Isa, par: Par, logits: &[f32], e: usize, k: usize, renorm: bool) -> (Vec<u32>, Vec<f32>) {
        let t = logits.len() / e;
        let (mut ids, mut w) = (vec![0u32; t * k], vec![0f32; t * k]);
        topk_gating_with(isa, par, logits, e, k, renorm, &mut ids, &mut w).unwrap();
        (ids, w)
    }

    fn run_reference(logits: &[f32], e: usize, k: usize, renorm: bool) -> (Vec<u32>, Vec<f32>) {
        let t = logits.len() / e;
        let (mut ids, mut w) = (vec![0u32; t * k], vec![0f32; t * k]);
        reference::topk_gating(logits, e, k, renorm, &mut ids, &mut w).unwrap();
        (ids, w)
    }

    #[test]
    fn ties_go_to_the_lower_index_in_descending_order() {
        // Experts 1, 3 and 4 tie for the largest logit; 0 is next, then 2.
        let logits = [1.0f32, 2.0, 0.0, 2.0, 2.0];
        let (ids, w) = run_reference(&logits, 5, 4, false);
        assert_eq!(ids, [1, 3, 4, 0]);
        assert!(w[0] == w[1] && w[1] == w[2] && w[2] > w[3]);
        for isa in Isa::available() {
            assert_eq!(run(isa, Par::Never, &logits, 5, 4, false), (ids.clone(), w.clone()), "{isa:?}");
        }
    }

    #[test]
    fn hand_computed_weights() {
        // Logits [ln 1, ln 2, ln 3, ln 4]: probabilities [0.1, 0.2, 0.3, 0.4].
        let logits: Vec<f32> = [1f32, 2.0, 3.0, 4.0].iter().map(|v| v.ln()).collect();
        let (ids, w) = run_reference(&logits, 4, 2, false);
        assert_eq!(ids, [3, 2]);
        assert!((w[0] - 0.4).abs() < 1e-6 && (w[1] - 0.3).abs() < 1e-6);
        let (ids, w) = run_reference(&logits, 4, 2, true);
        assert_eq!(ids, [3, 2]);
        assert!((w[0] - 4.0 / 7.0).abs() < 1e-6 && (w[1] - 3.0 / 7.0).abs() < 1e-6);
        // k = E with renormalisation returns the full softmax, sorted.
        let (ids, w) = run(isa(), Par::Never, &logits, 4, 4, true);
        assert_eq!(ids, [3, 2, 1, 0]);
        assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let mut ids = [0u32; 4];
        let mut w = [0f32; 4];
        assert!(topk_gating(&[0.0; 8], 4, 0, false, &mut ids[..0], &mut w[..0]).is_err());
        assert!(topk_gating(&[0.0; 8], 4, 5, false, &mut ids, &mut w).is_err());
        assert!(topk_gating(&[0.0; 8], 0, 1, false, &mut ids, &mut w).is_err());
        assert!(topk_gating(&[0.0; 7], 4, 2, false, &mut ids, &mut w).is_err());
        assert!(matches!(
            topk_gating(&[0.0; 8], 4, 2, false, &mut ids[..3], &mut w),
            Err(Error::LengthMismatch { what: "ids", .. })
        ));
        assert!(matches!(
            topk_gating(&[0.0; 8], 4, 2, false, &mut ids, &mut w[..2]),
            Err(Error::LengthMismatch { what: "weights", .. })
        ));
        let nan = [0.0, 1.0, 2.0, 3.0, 0.0, f32::NAN, 1.0, 1.0];
        let err = topk_gating(&nan, 4, 2, false, &mut ids, &mut w).unwrap_err();
        assert!(err.to_string().contains("token 1"), "{err}");
        assert!(reference::topk_gating(&nan, 4, 2, false, &mut ids, &mut w).is_err());
    }

    #[allow(clippy::too_many_arguments)]
    fn run_dynamic(
        isa: Isa,
        par: Par,
        logits: &[f32],
        e: usize,
        min_k: usize,
        max_k: usize,
        threshold: f32,
        renorm: bool,
    ) -> (Vec<u32>, Vec<f32>, Vec<u32>) {
        let t = logits.len() / e;
        let (mut ids, mut w, mut counts) = (vec![0u32; t * max_k], vec![0f32; t * max_k], vec![0u32; t]);
        let bounds = DynamicK { min_k, max_k, threshold };
        topk_gating_dynamic_with(isa, par, logits, e, bounds, renorm, &mut ids, &mut w, &mut counts).unwrap();
        (ids, w, counts)
    }

    fn run_dynamic_reference(
        logits: &[f32],
        e: usize,
        min_k: usize,
        max_k: usize,
        threshold: f32,
        renorm: bool,
    ) -> (Vec<u32>, Vec<f32>, Vec<u32>) {
        let t = logits.len() / e;
        let (mut ids, mut w, mut counts) = (vec![0u32; t * max_k], vec![0f32; t * max_k], vec![0u32; t]);
        reference::topk_gating_dynamic(logits, e, min_k, max_k, threshold, renorm, &mut ids, &mut w, &mut counts)
            .unwrap();
        (ids, w, counts)
    }

    #[test]
    fn dynamic_counts_follow_the_cumulative_probability() {
        // Probabilities [0.1, 0.2, 0.3, 0.4]: running sums in descending order 0.4, 0.7, 0.9, 1.0.
        let logits: Vec<f32> = [1f32, 2.0, 3.0, 4.0].iter().map(|v| v.ln()).collect();
        // (min_k, max_k, threshold) -> count.
        let cases = [
            (1, 4, 0.3, 1),
            (1, 4, 0.39, 1),
            (1, 4, 0.5, 2),
            (1, 4, 0.8, 3),
            (1, 4, 0.95, 4),
            (1, 4, 2.0, 4),
            (1, 2, 0.95, 2),
            (3, 4, 0.1, 3),
            (1, 3, -1.0, 1),
        ];
        for (min_k, max_k, threshold, count) in cases {
            let want = run_dynamic_reference(&logits, 4, min_k, max_k, threshold, false);
            assert_eq!(want.2, [count as u32], "min_k {min_k} max_k {max_k} threshold {threshold}");
            assert_eq!(&want.0[..count], &[3, 2, 1, 0][..count]);
            assert!(want.0[count..].iter().all(|&i| i == u32::MAX));
            assert!(want.1[count..].iter().all(|&w| w == 0.0));
            for (w, p) in want.1[..count].iter().zip([0.4, 0.3, 0.2, 0.1]) {
                assert!((w - p).abs() < 1e-6, "{w} vs {p}");
            }
            for isa in Isa::available() {
                assert_eq!(run_dynamic(isa, Par::Never, &logits, 4, min_k, max_k, threshold, false), want, "{isa:?}");
            }
            // Renormalised, the chosen weights sum to 1.
            let (_, w, _) = run_dynamic_reference(&logits, 4, min_k, max_k, threshold, true);
            assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{w:?}");
        }
    }

    #[test]
    fn dynamic_ties_go_to_the_lower_index() {
        // Experts 1, 3 and 4 tie (about 0.3 each); two of them reach 0.5.
        let logits = [1.0f32, 2.0, 0.0, 2.0, 2.0];
        let (ids, w, counts) = run_dynamic_reference(&logits, 5, 1, 4, 0.5, false);
        assert_eq!((ids.as_slice(), counts.as_slice()), (&[1, 3, u32::MAX, u32::MAX][..], &[2][..]));
        assert!(w[0] == w[1] && w[2] == 0.0);
        for isa in Isa::available() {
            assert_eq!(
                run_dynamic(isa, Par::Never, &logits, 5, 1, 4, 0.5, false),
                (ids.clone(), w.clone(), counts.clone())
            );
        }
    }

    #[test]
    fn dynamic_bad_arguments_are_errors() {
        // Two tokens of four experts; (min_k, max_k, threshold, slots per token, counts).
        let call = |min_k, max_k, threshold: f32, slots: usize, counts: usize| {
            let (mut ids, mut w, mut c) = (vec![0u32; 2 * slots], vec![0f32; 2 * slots], vec![0u32; counts]);
            topk_gating_dynamic(&[0.0; 8], 4, min_k, max_k, threshold, false, &mut ids, &mut w, &mut c)
        };
        assert!(call(1, 2, 0.5, 2, 2).is_ok());
        assert!(call(0, 2, 0.5, 2, 2).is_err());
        assert!(call(3, 2, 0.5, 2, 2).is_err());
        assert!(call(1, 5, 0.5, 5, 2).is_err());
        assert!(call(1, 2, f32::NAN, 2, 2).is_err());
        assert!(matches!(call(1, 2, 0.5, 3, 2), Err(Error::LengthMismatch { what: "ids", .. })));
        assert!(matches!(call(1, 2, 0.5, 2, 1), Err(Error::LengthMismatch { what: "counts", .. })));
        let mut ids = [0u32; 4];
        let nan = [0.0, 1.0, 2.0, 3.0, 0.0, f32::NAN, 1.0, 1.0];
        let (mut w, mut c) = ([0f32; 4], [0u32; 2]);
        let err = topk_gating_dynamic(&nan, 4, 1, 2, 0.5, false, &mut ids, &mut w, &mut c).unwrap_err();
        assert!(err.to_string().contains("token 1"), "{err}");
        assert!(reference::topk_gating_dynamic(&nan, 4, 1, 2, 0.5, false, &mut ids, &mut w, &mut c).is_err());
        // No tokens is fine.
        assert!(topk_gating_dynamic(&[], 4, 1, 2, 0.5, false, &mut [], &mut [], &mut []).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Ids compared as ranked lists and weights by rank. A near-tie (two reference
        /// probabilities within the tolerance) may legitimately order differently after the
        /// fast exponential's last-bit error, so an id that differs must carry a reference
        /// probability equal, within tolerance, to the weight at that rank.
        #[test]
        fn matches_reference(tokens in 1usize..20, e in 1usize..70, k_frac in 0.0f64..1.0, renorm: bool,
                             quantize: bool, seed: u64) {
            let k = 1 + ((e - 1) as f64 * k_frac) as usize;
            let mut logits = random_vec(seed, tokens * e, 4.0);
            if quantize {
                // Coarse logits make exact ties common.
                logits.iter_mut().for_each(|v| *v = v.round());
            }
            let (want_ids, want_w) = run_reference(&logits, e, k, renorm);
            for isa in Isa::available() {
                for par in [Par::Never, Par::Always] {
                    let (ids, w) = run(isa, par, &logits, e, k, renorm);
                    for t in 0..tokens {
                        let mut probs = logits[t * e..][..e].to_vec();
                        reference::softmax(&mut probs, e).unwrap();
                        let sum: f32 = want_ids[t * k..][..k].iter().map(|&i| probs[i as usize]).sum();
                        for r in 0..k {
                            let (i, g, want) = (t * k + r, w[t * k + r], want_w[t * k + r]);
                            let tol = 1e-7 + want.abs() * 2e-6;
                            prop_assert!((g - want).abs() <= tol, "{:?} {:?} token {} rank {}: {} vs {}", isa, par, t, r, g, want);
                            if ids[i] != want_ids[i] {
                                let p = probs[ids[i] as usize];
                                let p = if renorm { p / sum } else { p };
                                prop_assert!((p - want).abs() <= tol, "{:?} {:?} token {} rank {}: id {} vs {}", isa, par, t, r, ids[i], want_ids[i]);
                            }
                        }
                        // Exact ties in the input resolve identically: equal logits give equal
                        // probabilities in both versions.
                        if quantize {
                            prop_assert_eq!(&ids[t * k..][..k], &want_ids[t * k..][..k]);
                        }
                    }
                }
            }
        }

        /// With `min_k == max_k == k` the dynamic rule is plain top-k, whatever the threshold.
        #[test]
        fn dynamic_with_a_fixed_count_is_topk(tokens in 1usize..8, e in 1usize..40, k_frac in 0.0f64..1.0,
                                              threshold in -0.5f32..1.5, renorm: bool, seed: u64) {
            let k = 1 + ((e - 1) as f64 * k_frac) as usize;
            let logits = random_vec(seed, tokens * e, 4.0);
            let (ids, w) = run_reference(&logits, e, k, renorm);
            let dynamic = run_dynamic_reference(&logits, e, k, k, threshold, renorm);
            prop_assert_eq!(dynamic, (ids, w, vec![k as u32; tokens]));
        }

        /// The fast version against the reference. Counts agree unless the threshold lies within
        /// rounding of the reference's running sum where they part; weights as in
        /// `matches_reference`.
        #[test]
        fn dynamic_matches_reference(tokens in 1usize..16, e in 1usize..70, min_frac in 0.0f64..1.0,
                                     max_frac in 0.0f64..1.0, threshold in 0.0f32..1.1, renorm: bool,
                                     quantize: bool, seed: u64) {
            let max_k = 1 + ((e - 1) as f64 * max_frac) as usize;
            let min_k = 1 + ((max_k - 1) as f64 * min_frac) as usize;
            let mut logits = random_vec(seed, tokens * e, 4.0);
            if quantize {
                logits.iter_mut().for_each(|v| *v = v.round());
            }
            let (want_ids, want_w, want_c) = run_dynamic_reference(&logits, e, min_k, max_k, threshold, renorm);
            for isa in Isa::available() {
                for par in [Par::Never, Par::Always] {
                    let (ids, w, c) = run_dynamic(isa, par, &logits, e, min_k, max_k, threshold, renorm);
                    for t in 0..tokens {
                        let mut probs = logits[t * e..][..e].to_vec();
                        reference::softmax(&mut probs, e).unwrap();
                        let slots = t * max_k..(t + 1) * max_k;
                        if c[t] != want_c[t] {
                            let n = c[t].min(want_c[t]) as usize;
                            let reached: f32 = want_ids[slots.clone()][..n].iter().map(|&i| probs[i as usize]).sum();
                            prop_assert!((reached - threshold).abs() <= 1e-5,
                                "{:?} {:?} token {}: count {} vs {} with the running sum {} far from {}",
                                isa, par, t, c[t], want_c[t], reached, threshold);
                            continue;
                        }
                        let n = c[t] as usize;
                        let sum: f32 = want_ids[slots.clone()][..n].iter().map(|&i| probs[i as usize]).sum();
                        for r in 0..max_k {
                            let (i, g, want) = (t * max_k + r, w[t * max_k + r], want_w[t * max_k + r]);
                            if r >= n {
                                prop_assert!(ids[i] == u32::MAX && g == 0.0);
                                continue;
                            }
                            let tol = 1e-7 + want.abs() * 2e-6;
                            prop_assert!((g - want).abs() <= tol, "{:?} {:?} token {} rank {}: {} vs {}", isa, par, t, r, g, want);
                            if ids[i] != want_ids[i] {
                                let p = probs[ids[i] as usize];
                                let p = if renorm { p / sum } else { p };
                                prop_assert!((p - want).abs() <= tol, "{:?} {:?} token {} rank {}: id {} vs {}", isa, par, t, r, ids[i], want_ids[i]);
                            }
                        }
                        if quantize {
                            prop_assert_eq!(&ids[slots.clone()], &want_ids[slots]);
                        }
                    }
                }
            }
        }
    }
}
