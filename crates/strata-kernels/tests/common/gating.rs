//! The checks shared by the GPU and the emulated tests of top-k gating (`tests/gpu/gating.rs`,
//! `tests/emu/gating.rs`): a routing, its rule, the reference's routing and the comparison.

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
