//! `kernels/gating.cu`: top-k expert gating, fixed and dynamic k, expert counts that are not
//! powers of two, deliberate ties, NaN routers, against `reference::topk_gating*` with the GPU
//! tests' comparison (`tests/common/gating.rs`).

#[path = "../common/gating.rs"]
mod common;

use common::{Routing, Rule, compare, logits, on_host};

use crate::driver::{Arg, build, f32_bytes, launch, params32};

/// Tokens per block of `ops::topk_gating` (a warp per token).
const WARPS: usize = 4;

fn u32s(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// The routing of `logits` on the emulator, launched as the launchers launch it; checks that
/// nothing is written past the outputs, and that fixed top-k writes no counts.
fn on_emu(logits: &[f32], e: usize, rule: Rule) -> Routing {
    let emu = build("emu_gating.cpp").expect("checked by the caller");
    let tokens = logits.len() / e;
    let slots = tokens * rule.max_k;
    let mut lb = f32_bytes(logits);
    let mut ids: Vec<u8> = (0..=slots).flat_map(|_| 7u32.to_le_bytes()).collect();
    let mut weights = f32_bytes(&vec![-7f32; slots + 1]);
    let mut counts: Vec<u8> = (0..=tokens).flat_map(|_| 99u32.to_le_bytes()).collect();
    let (min_k, threshold) = match rule.threshold {
        None => (rule.max_k, 0.0f32),
        Some(t) => (rule.min_k, t),
    };
    let p = params32(&[
        (tokens as u32).to_le_bytes(),
        (e as u32).to_le_bytes(),
        (min_k as u32).to_le_bytes(),
        (rule.max_k as u32).to_le_bytes(),
        threshold.to_le_bytes(),
        u32::from(rule.renorm).to_le_bytes(),
    ]);
    let grid = [tokens.div_ceil(WARPS) as u32, 1, 1];
    let threads = 32 * WARPS as u32;
    if rule.threshold.is_none() {
        let mut args = [Arg::Buf(&mut lb, 0), Arg::Buf(&mut ids, 0), Arg::Buf(&mut weights, 0), Arg::Null];
        launch(&emu, "topk_gating_f32", grid, threads, 0, &p, &mut args);
    } else {
        let mut args =
            [Arg::Buf(&mut lb, 0), Arg::Buf(&mut ids, 0), Arg::Buf(&mut weights, 0), Arg::Buf(&mut counts, 0)];
        launch(&emu, "topk_gating_f32", grid, threads, 0, &p, &mut args);
    }
    let (mut ids, mut weights, mut counts) = (u32s(&ids), crate::driver::f32s(&weights), u32s(&counts));
    assert_eq!((ids.pop(), weights.pop(), counts.pop()), (Some(7), Some(-7.0), Some(99)), "wrote past the end");
    if rule.threshold.is_none() {
        assert!(counts.iter().all(|&c| c == 99), "fixed top-k wrote counts");
        counts = vec![rule.max_k as u32; tokens];
    }
    Routing { ids, weights, counts }
}

fn check(logits: &[f32], e: usize, rule: Rule, exact: bool) {
    compare(logits, e, rule, exact, &on_emu(logits, e, rule), &on_host(logits, e, rule));
}

#[test]
fn emulated_gating_matches_the_reference() {
    if build("emu_gating.cpp").is_none() {
        return;
    }
    for (i, e) in [1usize, 7, 32, 33, 129, 256].into_iter().enumerate() {
        for k in [1, e.min(3), e.min(8), e.min(32)] {
            for (renorm, quantized) in [(false, false), (true, true)] {
                let x = logits(9, e, (i * 100 + k) as u64, quantized);
                check(&x, e, Rule { min_k: k, max_k: k, threshold: None, renorm }, quantized);
            }
        }
        let max_k = e.min(8);
        for (min_k, threshold) in [(1, 0.5f32), (max_k.div_ceil(2), 0.8), (1, 0.0), (max_k, 2.0)] {
            let x = logits(9, e, (i * 1000 + min_k) as u64, true);
            check(&x, e, Rule { min_k, max_k, threshold: Some(threshold), renorm: true }, true);
        }
    }
    // Ties go to the lower index; NaN and infinite routers are marked.
    let x = common::tie_logits();
    for k in [1, 3, 8] {
        common::check_ties(
            &on_emu(&x, common::TIE_EXPERTS, Rule { min_k: k, max_k: k, threshold: None, renorm: true }),
            k,
        );
    }
    common::check_nan_routing(&on_emu(&common::NAN_ROUTERS, 5, common::NAN_RULE));
    let fixed = on_emu(&common::NAN_ROUTERS, 5, Rule { min_k: 2, max_k: 2, threshold: None, renorm: false });
    assert_eq!(&fixed.ids[..2], &[4, 3]);
    assert!(fixed.ids[2..8].iter().all(|&i| i == u32::MAX) && fixed.weights[2..8].iter().all(|w| w.is_nan()));
}
