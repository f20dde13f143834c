//! `kernels/gating.cu`: top-k expert gating, fixed and dynamic k, expert counts that are not
//! powers of two, deliberate ties, NaN routers, against `reference::topk_gating*` with the GPU
//! tests' comparison (`tests/common/gating.rs`).

#[path = "../common/gating.rs"]
mod common;

use common::{Routing, Rule, compare, on_host};

use crate::driver::{Arg, build, f32_bytes, launch, params32, random_f32};

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

/// Router logits; `quantized` rounds them to integers, so ties are common and exact.
fn logits(tokens: usize, e: usize, seed: u64, quantized: bool) -> Vec<f32> {
    let mut x = random_f32(tokens * e, seed, 4.0);
    if quantized {
        x.iter_mut().for_each(|v| *v = v.round());
    }
    x
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
    // All equal: experts 0..k in order; equal pairs straddling lanes 0 and 32 of the warp.
    let e = 129;
    let mut x = vec![0.5f32; 3 * e];
    (x[e + 100], x[e + 4], x[e + 36], x[2 * e + 128], x[2 * e + 64]) = (2.0, 2.0, 2.0, 1.0, 1.0);
    for k in [1, 3, 8] {
        let got = on_emu(&x, e, Rule { min_k: k, max_k: k, threshold: None, renorm: true });
        assert_eq!(&got.ids[..k], &(0..k as u32).collect::<Vec<_>>()[..]);
        assert_eq!(&got.ids[k..][..k.min(3)], &[4, 36, 100][..k.min(3)]);
        assert_eq!(&got.ids[2 * k..][..k.min(2)], &[64, 128][..k.min(2)]);
    }
    // NaN and infinite routers: token 0's probabilities are about [0.012, 0.032, 0.086, 0.234,
    // 0.636], two reach 0.7.
    let (inf, nan) = (f32::INFINITY, f32::NAN);
    #[rustfmt::skip]
    let x = [
        1.0, 2.0, 3.0, 4.0, 5.0,
        1.0, nan, 3.0, 4.0, 5.0,
        1.0, 2.0, inf, 4.0, 5.0,
        -inf, -inf, -inf, -inf, -inf,
        -inf, -inf, 0.0, -inf, -inf,
    ];
    let got = on_emu(&x, 5, Rule { min_k: 1, max_k: 3, threshold: Some(0.7), renorm: true });
    assert_eq!(got.counts, [2, 0, 0, 0, 1]);
    assert_eq!(&got.ids[..3], &[4, 3, u32::MAX]);
    assert_eq!(&got.ids[12..], &[2, u32::MAX, u32::MAX]);
    assert_eq!(&got.weights[12..], &[1.0, 0.0, 0.0]);
    for t in 1..4 {
        assert!(got.ids[t * 3..][..3].iter().all(|&i| i == u32::MAX), "token {t}: {got:?}");
        assert!(got.weights[t * 3..][..3].iter().all(|w| w.is_nan()), "token {t}: {got:?}");
    }
}
