//! Top-k expert gating (fixed and dynamic k) on the GPU against the CPU reference: expert
//! counts that are not powers of two, k from 1 to 32, deliberate ties, NaN routers.
#![cfg(feature = "cuda")]

use proptest::prelude::*;
use strata_kernels::cuda::ops;
use strata_kernels::cuda::testing::device_or_skip;
use strata_kernels::{Cuda, Error};

#[path = "../common/gating.rs"]
mod common;
use common::{Routing, Rule, compare, logits, on_host};

fn on_device(cuda: &Cuda, logits: &[f32], e: usize, rule: Rule) -> Routing {
    let tokens = logits.len() / e;
    let dl = cuda.upload(logits).unwrap();
    let slots = tokens * rule.max_k;
    // One spare element after each output, which must stay untouched.
    let mut ids = cuda.upload(&vec![7u32; slots + 1]).unwrap();
    let mut weights = cuda.upload(&vec![-7f32; slots + 1]).unwrap();
    let mut counts = cuda.upload(&vec![99u32; tokens + 1]).unwrap();
    let dl = dl.slice(0..logits.len());
    match rule.threshold {
        None => {
            ops::topk_gating(cuda, &dl, e, rule.max_k, rule.renorm, &mut ids, &mut weights).unwrap();
        }
        Some(threshold) => ops::topk_gating_dynamic(
            cuda,
            &dl,
            e,
            rule.min_k,
            rule.max_k,
            threshold,
            rule.renorm,
            &mut ids,
            &mut weights,
            &mut counts,
        )
        .unwrap(),
    }
    let (mut ids, mut weights, mut counts) =
        (cuda.download(&ids).unwrap(), cuda.download(&weights).unwrap(), cuda.download(&counts).unwrap());
    assert_eq!((ids.pop(), weights.pop(), counts.pop()), (Some(7), Some(-7.0), Some(99)), "wrote past the end");
    if rule.threshold.is_none() {
        assert!(counts.iter().all(|&c| c == 99), "fixed top-k wrote counts");
        counts = vec![rule.max_k as u32; tokens];
    }
    Routing { ids, weights, counts }
}

fn check(cuda: &Cuda, logits: &[f32], e: usize, rule: Rule, exact: bool) {
    compare(logits, e, rule, exact, &on_device(cuda, logits, e, rule), &on_host(logits, e, rule));
}

const EXPERTS: [usize; 13] = [1, 2, 7, 8, 31, 32, 33, 60, 64, 128, 129, 255, 256];

#[test]
fn fixed_k_over_expert_counts() {
    let Some(cuda) = device_or_skip("fixed_k_over_expert_counts") else { return };
    for (i, &e) in EXPERTS.iter().enumerate() {
        for k in (1..=e.min(8)).chain([e.min(32)]) {
            for renorm in [false, true] {
                for quantized in [false, true] {
                    let x = logits(13, e, (i * 100 + k) as u64, quantized);
                    check(&cuda, &x, e, Rule { min_k: k, max_k: k, threshold: None, renorm }, quantized);
                }
            }
        }
    }
}

#[test]
fn deliberate_ties_go_to_the_lower_index() {
    let Some(cuda) = device_or_skip("deliberate_ties_go_to_the_lower_index") else { return };
    let (e, x) = (common::TIE_EXPERTS, common::tie_logits());
    for k in [1, 2, 3, 8] {
        let rule = Rule { min_k: k, max_k: k, threshold: None, renorm: true };
        let got = on_device(&cuda, &x, e, rule);
        check(&cuda, &x, e, rule, true);
        common::check_ties(&got, k);
    }
}

#[test]
fn dynamic_k_over_expert_counts() {
    let Some(cuda) = device_or_skip("dynamic_k_over_expert_counts") else { return };
    for (i, &e) in EXPERTS.iter().enumerate() {
        let max_k = e.min(8);
        for min_k in [1, max_k.div_ceil(2), max_k] {
            for threshold in [0.0f32, 0.3, 0.5, 0.8, 0.95, 1.0, 2.0] {
                for (quantized, renorm) in [(false, false), (true, true), (false, true)] {
                    let x = logits(17, e, (i * 1000 + min_k * 10) as u64, quantized);
                    check(&cuda, &x, e, Rule { min_k, max_k, threshold: Some(threshold), renorm }, quantized);
                }
            }
        }
    }
}

#[test]
fn nan_routers_are_marked() {
    let Some(cuda) = device_or_skip("nan_routers_are_marked") else { return };
    let (e, x) = (5, common::NAN_ROUTERS);
    common::check_nan_routing(&on_device(&cuda, &x, e, common::NAN_RULE));
    let fixed = on_device(&cuda, &x, e, Rule { min_k: 2, max_k: 2, threshold: None, renorm: false });
    assert_eq!(&fixed.ids[..2], &[4, 3]);
    assert!(fixed.ids[2..8].iter().all(|&i| i == u32::MAX) && fixed.weights[2..8].iter().all(|w| w.is_nan()));
}

#[test]
fn many_tokens() {
    let Some(cuda) = device_or_skip("many_tokens") else { return };
    let (tokens, e) = (5003, 60);
    let x = logits(tokens, e, 9, false);
    check(&cuda, &x, e, Rule { min_k: 4, max_k: 4, threshold: None, renorm: true }, false);
    check(&cuda, &x, e, Rule { min_k: 2, max_k: 6, threshold: Some(0.6), renorm: true }, false);
}

#[test]
fn bad_arguments_are_typed_errors() {
    let Some(cuda) = device_or_skip("bad_arguments_are_typed_errors") else { return };
    let logits = cuda.zeros::<f32>(8).unwrap();
    let mut ids = cuda.zeros::<u32>(8).unwrap();
    let mut w = cuda.zeros::<f32>(8).unwrap();
    let mut counts = cuda.zeros::<u32>(2).unwrap();
    let invalid = |r: strata_kernels::Result<()>, needle: &str| match r {
        Err(Error::InvalidArgument { message, .. }) => assert!(message.contains(needle), "{message}"),
        other => panic!("expected InvalidArgument about {needle:?}, got {other:?}"),
    };
    invalid(ops::topk_gating(&cuda, &logits, 0, 1, false, &mut ids, &mut w), "0 experts");
    invalid(ops::topk_gating(&cuda, &cuda.zeros::<f32>(257).unwrap(), 257, 1, false, &mut ids, &mut w), "257 experts");
    invalid(ops::topk_gating(&cuda, &logits, 4, 0, false, &mut ids, &mut w), "k = 0");
    invalid(ops::topk_gating(&cuda, &logits, 4, 5, false, &mut ids, &mut w), "k = 5");
    let wide = cuda.zeros::<f32>(40).unwrap();
    invalid(ops::topk_gating(&cuda, &wide, 40, 33, false, &mut ids, &mut w), "k = 33");
    invalid(ops::topk_gating(&cuda, &logits, 3, 1, false, &mut ids, &mut w), "whole number of tokens");
    invalid(ops::topk_gating(&cuda, &logits, 4, 2, false, &mut ids.slice_mut(0..3), &mut w), "ids holds 3");
    invalid(ops::topk_gating(&cuda, &logits, 4, 2, false, &mut ids, &mut w.slice_mut(0..3)), "weights holds 3");
    let dynamic = |min_k, max_k, t: f32, ids: &mut _, w: &mut _, counts: &mut _| {
        ops::topk_gating_dynamic(&cuda, &logits, 4, min_k, max_k, t, true, ids, w, counts)
    };
    invalid(dynamic(0, 2, 0.5, &mut ids, &mut w, &mut counts), "min_k = 0");
    invalid(dynamic(3, 2, 0.5, &mut ids, &mut w, &mut counts), "min_k = 3");
    invalid(dynamic(1, 2, f32::NAN, &mut ids, &mut w, &mut counts), "NaN");
    invalid(dynamic(1, 2, 0.5, &mut ids, &mut w, &mut cuda.zeros::<u32>(1).unwrap()), "counts holds 1");
    dynamic(1, 2, 0.5, &mut ids, &mut w, &mut counts).unwrap();
    // No tokens: nothing to do.
    ops::topk_gating(&cuda, &logits.slice(0..0), 4, 2, false, &mut ids, &mut w).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn random_routers_match_the_reference(tokens in 1usize..40, e in 1usize..=256, max_frac in 0.0f64..1.0,
                                          min_frac in 0.0f64..=1.0, threshold in 0.0f32..1.1, dynamic: bool,
                                          renorm: bool, quantized: bool, seed: u64) {
        let Some(cuda) = device_or_skip("random_routers_match_the_reference") else { return Ok(()) };
        let max_k = 1 + ((e.min(32) - 1) as f64 * max_frac) as usize;
        let min_k = if dynamic { 1 + ((max_k - 1) as f64 * min_frac) as usize } else { max_k };
        let rule = Rule { min_k, max_k, threshold: dynamic.then_some(threshold), renorm };
        check(&cuda, &logits(tokens, e, seed, quantized), e, rule, quantized);
    }
}
