//! The checks shared by the GPU and the emulated tests of top-k gating (`tests/gpu/gating.rs`,
//! `tests/emu/gating.rs`): a routing, its rule, the reference's routing and the comparison.

use strata_kernels::testing::random_f32;
use strata_tensor::cpu::reference;

/// Ids, weights and counts of a routing, `max_k` slots per token.
#[derive(Debug, PartialEq)]
pub struct Routing {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
    pub counts: Vec<u32>,
}

/// The dynamic rule's parameters; fixed top-k is `min_k == max_k` without a threshold.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub min_k: usize,
    pub max_k: usize,
    pub threshold: Option<f32>,
    pub renorm: bool,
}

pub fn on_host(logits: &[f32], e: usize, rule: Rule) -> Routing {
    let tokens = logits.len() / e;
    let (mut ids, mut weights, mut counts) =
        (vec![0u32; tokens * rule.max_k], vec![0f32; tokens * rule.max_k], vec![0u32; tokens]);
    match rule.threshold {
        None => {
            reference::topk_gating(logits, e, rule.max_k, rule.renorm, &mut ids, &mut weights).unwrap();
            counts.fill(rule.max_k as u32);
        }
        Some(t) => reference::topk_gating_dynamic(
            logits,
            e,
            rule.min_k,
            rule.max_k,
            t,
            rule.renorm,
            &mut ids,
            &mut weights,
            &mut counts,
        )
        .unwrap(),
    }
    Routing { ids, weights, counts }
}

/// Compares the device's routing with the reference's. Weights match within a few ulp. Ids
/// match exactly when `exact` (exact ties in the input resolve the same way on both); otherwise
/// an id may differ only where the reference probability at that rank is within rounding of
/// the device's (a near-tie the device's last-bit softmax difference may order otherwise). A
/// count may differ only where the threshold lies within rounding of the reference's running
/// sum at the smaller count.
pub fn compare(logits: &[f32], e: usize, rule: Rule, exact: bool, got: &Routing, want: &Routing) {
    let k = rule.max_k;
    for t in 0..logits.len() / e {
        let mut probs = logits[t * e..][..e].to_vec();
        reference::softmax(&mut probs, e).unwrap();
        let (gi, gw) = (&got.ids[t * k..][..k], &got.weights[t * k..][..k]);
        let (wi, ww) = (&want.ids[t * k..][..k], &want.weights[t * k..][..k]);
        let ctx = format!("token {t} of {e} experts, {rule:?}: got {gi:?} {gw:?}, want {wi:?} {ww:?}");
        let (gc, wc) = (got.counts[t] as usize, want.counts[t] as usize);
        if gc != wc {
            let n = gc.min(wc);
            let reached = wi[..n].iter().fold(0f32, |s, &i| s + probs[i as usize]);
            let threshold = rule.threshold.expect("fixed top-k counts cannot differ");
            assert!((reached - threshold).abs() <= 1e-5, "{ctx}: counts {gc} vs {wc}, running sum {reached}");
            continue;
        }
        let sum = wi[..wc].iter().fold(0f32, |s, &i| s + probs[i as usize]);
        for r in 0..k {
            if r >= wc {
                assert!(gi[r] == u32::MAX && gw[r] == 0.0, "{ctx}: unused slot {r}");
                continue;
            }
            let tol = 1e-7 + ww[r].abs() * 2e-6;
            assert!((gw[r] - ww[r]).abs() <= tol, "{ctx}: weight {r}");
            if gi[r] != wi[r] {
                assert!(!exact, "{ctx}: id {r}");
                let p = probs[gi[r] as usize];
                let p = if rule.renorm { p / sum } else { p };
                assert!((p - ww[r]).abs() <= tol, "{ctx}: id {r} is not a near-tie");
            }
        }
        let mut distinct = gi[..wc].to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), wc, "{ctx}: repeated expert");
    }
}

/// Router logits; `quantized` rounds them to integers, so ties are common and exact.
pub fn logits(tokens: usize, e: usize, seed: u64, quantized: bool) -> Vec<f32> {
    let mut x = random_f32(tokens * e, seed, 4.0);
    if quantized {
        x.iter_mut().for_each(|v| *v = v.round());
    }
    x
}

/// Experts of [`tie_logits`].
pub const TIE_EXPERTS: usize = 129;

/// Three tokens of deliberate ties: all equal; three equal maxima at 4, 36 and 100 (straddling
/// lanes 0 and 32 of a warp); two at 64 and 128.
pub fn tie_logits() -> Vec<f32> {
    let e = TIE_EXPERTS;
    let mut x = vec![0.5f32; 3 * e];
    (x[e + 100], x[e + 4], x[e + 36], x[2 * e + 128], x[2 * e + 64]) = (2.0, 2.0, 2.0, 1.0, 1.0);
    x
}

/// Ties go to the lower index: checks the first `k` ids of each token of [`tie_logits`].
pub fn check_ties(got: &Routing, k: usize) {
    assert_eq!(&got.ids[..k], &(0..k as u32).collect::<Vec<_>>()[..]);
    assert_eq!(&got.ids[k..][..k.min(3)], &[4, 36, 100][..k.min(3)]);
    assert_eq!(&got.ids[2 * k..][..k.min(2)], &[64, 128][..k.min(2)]);
}

/// Five tokens of five experts: finite, one NaN, one +inf, all -inf, one finite among -inf.
/// Token 0's probabilities are about [0.012, 0.032, 0.086, 0.234, 0.636]: two reach 0.7.
#[rustfmt::skip]
pub const NAN_ROUTERS: [f32; 25] = [
    1.0, 2.0, 3.0, 4.0, 5.0,
    1.0, f32::NAN, 3.0, 4.0, 5.0,
    1.0, 2.0, f32::INFINITY, 4.0, 5.0,
    f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY,
    f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY,
];

/// The dynamic rule [`NAN_ROUTERS`] is routed under.
pub const NAN_RULE: Rule = Rule { min_k: 1, max_k: 3, threshold: Some(0.7), renorm: true };

/// The routing of [`NAN_ROUTERS`] under [`NAN_RULE`]: tokens 1 to 3 marked (no expert, NaN
/// weights), token 4's one finite expert with weight 1.
pub fn check_nan_routing(got: &Routing) {
    assert_eq!(got.counts, [2, 0, 0, 0, 1]);
    assert_eq!(&got.ids[..3], &[4, 3, u32::MAX]);
    assert_eq!(&got.ids[12..], &[2, u32::MAX, u32::MAX]);
    assert_eq!(&got.weights[12..], &[1.0, 0.0, 0.0]);
    for t in 1..4 {
        assert!(got.ids[t * 3..][..3].iter().all(|&i| i == u32::MAX), "token {t}: {got:?}");
        assert!(got.weights[t * 3..][..3].iter().all(|w| w.is_nan()), "token {t}: {got:?}");
    }
}
