//! Unit tests of the router, capacity limits, dynamic top-k and the router losses.

use proptest::prelude::*;

use super::*;

/// Deterministic pseudo-random logits in [-scale, scale).
fn logits(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn plain(logits: &[f32], e: usize, k: usize, renorm: bool) -> (Vec<u32>, Vec<f32>) {
    let t = logits.len() / e;
    let (mut ids, mut w) = (vec![0u32; t * k], vec![0f32; t * k]);
    cpu::topk_gating(logits, e, k, renorm, &mut ids, &mut w).unwrap();
    (ids, w)
}

#[test]
fn default_routing_is_topk_gating() {
    let l = logits(1, 7 * 5, 3.0);
    for renorm in [false, true] {
        let r = route(&l, 5, 2, renorm, &MoeOptions::default()).unwrap();
        let (ids, w) = plain(&l, 5, 2, renorm);
        assert_eq!((r.ids, r.weights, r.slots), (ids, w, 2));
        assert_eq!(r.active, vec![2; 7]);
    }
    // active_experts overrides k.
    let r = route(&l, 5, 2, true, &MoeOptions { active_experts: Some(4), ..MoeOptions::default() }).unwrap();
    assert_eq!((r.ids, r.weights), plain(&l, 5, 4, true));
}

#[test]
fn capacity_moves_overflow_to_the_next_best_expert() {
    // Three tokens all prefer expert 0, then 1, then 2 (4 experts, k = 1): capacity
    // ceil(1.0 * 3 * 1 / 4) = 1 gives token 0 expert 0, token 1 expert 1, token 2 expert 2.
    let row = [3.0f32, 2.0, 1.0, 0.0];
    let l: Vec<f32> = row.iter().cycle().take(12).copied().collect();
    let opts = MoeOptions { capacity_factor: Some(1.0), ..MoeOptions::default() };
    let r = route(&l, 4, 1, true, &opts).unwrap();
    assert_eq!(r.ids, [0, 1, 2]);
    assert_eq!(r.weights, [1.0, 1.0, 1.0]);
    assert_eq!((r.reassigned, r.dropped), (2, 0));
    // Without renormalisation a moved slot carries its new expert's probability.
    let r = route(&l, 4, 1, false, &opts).unwrap();
    let (_, probs) = plain(&row, 4, 4, false);
    assert_eq!(r.weights, [probs[0], probs[1], probs[2]]);
    // Rank by rank: with k = 2 and capacity ceil(0.5 * 3 * 2 / 4) = 1, first choices are served
    // first (token 0 gets 0; tokens 1 and 2 move on to 2 and 3), then second choices (token 0
    // gets 1; tokens 1 and 2 find every expert they have not used full and drop a slot).
    let opts = MoeOptions { capacity_factor: Some(0.5), ..MoeOptions::default() };
    let r = route(&l, 4, 2, true, &opts).unwrap();
    assert_eq!(r.ids, [0, 1, 2, u32::MAX, 3, u32::MAX]);
    assert_eq!(r.active, [2, 1, 1]);
    assert_eq!((r.reassigned, r.dropped), (2, 2));
    assert_eq!(&r.weights[2..], &[1.0, 0.0, 1.0, 0.0]);
    assert_eq!(expert_capacity(0.5, 3, 2, 4), 1);
    assert_eq!(expert_capacity(1.25, 10, 2, 8), 4);
}

#[test]
fn dynamic_topk_with_p_one_is_topk_and_lower_p_uses_fewer_experts() {
    let l = logits(7, 40 * 8, 2.0);
    let one = MoeOptions { routing: Routing::DynamicTopK { p: 1.0, min_experts: 1 }, ..MoeOptions::default() };
    let r = route(&l, 8, 3, true, &one).unwrap();
    assert_eq!((r.ids.clone(), r.weights.clone()), plain(&l, 8, 3, true));
    let low = MoeOptions { routing: Routing::DynamicTopK { p: 0.3, min_experts: 1 }, ..MoeOptions::default() };
    let r = route(&l, 8, 3, true, &low).unwrap();
    let mean = r.active.iter().sum::<u32>() as f32 / 40.0;
    assert!((1.0..3.0).contains(&mean), "{mean}");
    assert!(r.active.iter().all(|&a| (1..=3).contains(&a)));
}

#[test]
fn options_are_checked() {
    let check = |o: MoeOptions| o.check(8, 2);
    assert_eq!(check(MoeOptions::default()).unwrap(), 2);
    assert_eq!(check(MoeOptions { active_experts: Some(8), ..MoeOptions::default() }).unwrap(), 8);
    assert!(check(MoeOptions { active_experts: Some(9), ..MoeOptions::default() }).is_err());
    assert!(check(MoeOptions { active_experts: Some(0), ..MoeOptions::default() }).is_err());
    assert!(check(MoeOptions { capacity_factor: Some(0.0), ..MoeOptions::default() }).is_err());
    assert!(check(MoeOptions { capacity_factor: Some(f32::NAN), ..MoeOptions::default() }).is_err());
    assert!(check(MoeOptions { capacity_factor: Some(f32::INFINITY), ..MoeOptions::default() }).is_ok());
    let dynamic =
        |p, min_experts| MoeOptions { routing: Routing::DynamicTopK { p, min_experts }, ..Default::default() };
    assert!(check(dynamic(0.5, 1)).is_ok());
    assert!(check(dynamic(0.5, 3)).is_err());
    assert!(check(dynamic(0.0, 1)).is_err());
    assert!(check(dynamic(f32::NAN, 1)).is_err());
    let err = check(dynamic(0.5, 0)).unwrap_err();
    assert!(matches!(err, Error::InvalidMoeOptions { .. }), "{err}");
}

/// transformers' `load_balancing_loss_func` on a hand-computed case: two experts, top-1, two
/// rows with probabilities (0.75, 0.25) and (0.25, 0.75): f = (0.5, 0.5), P = (0.5, 0.5), loss
/// = 2 * (0.25 + 0.25) = 1.
#[test]
fn load_balancing_loss_by_hand() {
    let a = 3f32.ln();
    let trace = RouterTrace {
        layers: vec![LayerRecord { layer: 0, n_experts: 2, logits: vec![a, 0.0, 0.0, a], ..Default::default() }],
    };
    assert!((load_balancing_loss(&trace, 2, 1).unwrap() - 1.0).abs() < 1e-6);
    // All rows prefer expert 0 with probability 0.75: f = (1, 0), P = (0.75, 0.25), loss 1.5.
    let trace = RouterTrace {
        layers: vec![LayerRecord { layer: 0, n_experts: 2, logits: vec![a, 0.0, a, 0.0], ..Default::default() }],
    };
    assert!((load_balancing_loss(&trace, 2, 1).unwrap() - 1.5).abs() < 1e-6);
    assert_eq!(load_balancing_loss(&RouterTrace::new(), 2, 1).unwrap(), 0.0);
    assert!(load_balancing_loss(&trace, 3, 1).is_err());
    // z-loss: logsumexp(ln 3, 0) = ln 4 for every row.
    assert!((router_z_loss(&trace) - 4f32.ln().powi(2)).abs() < 1e-6);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// No expert takes more than its capacity; no token uses an expert twice; every slot that
    /// keeps an expert carries a positive weight; and a capacity no expert can fill reproduces
    /// plain (or dynamic) top-k exactly.
    #[test]
    fn capacity_is_respected(tokens in 1usize..40, e in 1usize..12, k_frac in 0.0f64..1.0, cf in 0.05f32..3.0,
                             renorm: bool, dynamic: bool, seed: u64) {
        let k = 1 + ((e - 1) as f64 * k_frac) as usize;
        let l = logits(seed, tokens * e, 3.0);
        let routing = if dynamic { Routing::DynamicTopK { p: 0.6, min_experts: 1 } } else { Routing::TopK };
        let opts = MoeOptions { routing, capacity_factor: Some(cf), ..MoeOptions::default() };
        let r = route(&l, e, k, renorm, &opts).unwrap();
        let cap = expert_capacity(cf, tokens, k, e);
        let counts = r.expert_counts(e);
        prop_assert!(counts.iter().all(|&c| c as usize <= cap), "{:?} > {}", counts, cap);
        for t in 0..tokens {
            let ids: Vec<u32> = r.ids[t * k..][..k].iter().copied().filter(|&i| i != u32::MAX).collect();
            let mut unique = ids.clone();
            unique.sort();
            unique.dedup();
            prop_assert_eq!(unique.len(), ids.len());
            prop_assert_eq!(ids.len() as u32, r.active[t]);
            for s in 0..k {
                let (id, w) = (r.ids[t * k + s], r.weights[t * k + s]);
                let ok = if id == u32::MAX { w == 0.0 } else { w > 0.0 };
                prop_assert!(ok, "token {} slot {}: id {} weight {}", t, s, id, w);
            }
        }
        // Infinite, or too large to fill: exactly the routing without a capacity.
        let free = MoeOptions { capacity_factor: None, ..opts };
        let want = route(&l, e, k, renorm, &free).unwrap();
        for big in [f32::INFINITY, 1e9, e as f32 / k as f32] {
            let r = route(&l, e, k, renorm, &MoeOptions { capacity_factor: Some(big), ..opts }).unwrap();
            prop_assert_eq!(&r, &want, "capacity factor {}", big);
        }
    }
}

/// Which layers are sparse, and each family's defaults, as transformers' decoder layers decide.
#[test]
fn moe_hparams_follow_the_family_rules() {
    use crate::config::ModelConfig;
    use crate::hparams::MoeHparams;

    let config = |model_type: &str, extra: &str| {
        let json = format!(
            r#"{{"model_type": "{model_type}", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 6,
                "num_hidden_layers": 4, "num_attention_heads": 2, "head_dim": 4{extra}}}"#
        );
        MoeHparams::from_config(&ModelConfig::from_json_str(&json).unwrap())
    };
    let m = config("mixtral", "").unwrap().unwrap();
    assert_eq!((m.num_experts, m.top_k, m.expert_intermediate_size, m.norm_topk_prob), (8, 2, 6, true));
    assert_eq!((m.sparse_layers, m.shared_expert_intermediate_size, m.mixtral_names), (vec![true; 4], None, true));
    let q = config("qwen2_moe", r#", "decoder_sparse_step": 2, "mlp_only_layers": [3]"#).unwrap().unwrap();
    assert_eq!(q.sparse_layers, [false, true, false, false]);
    assert_eq!((q.num_experts, q.top_k, q.expert_intermediate_size), (60, 4, 1408));
    assert_eq!((q.norm_topk_prob, q.shared_expert_intermediate_size), (false, Some(5632)));
    let q = config("qwen3_moe", r#", "num_experts": 16, "num_experts_per_tok": 4, "norm_topk_prob": true"#);
    let q = q.unwrap().unwrap();
    assert_eq!((q.num_experts, q.top_k, q.norm_topk_prob, q.shared_expert_intermediate_size), (16, 4, true, None));
    assert_eq!(q.sparse_layers, vec![true; 4]);
    // No sparse layer at all: a dense model.
    assert_eq!(config("qwen3_moe", r#", "num_experts": 0"#).unwrap(), None);
    assert_eq!(config("qwen2_moe", r#", "mlp_only_layers": [0, 1, 2, 3]"#).unwrap(), None);
    assert_eq!(config("llama", "").unwrap(), None);
    assert!(config("qwen2_moe", r#", "decoder_sparse_step": 0"#).is_err());
    assert!(config("mixtral", r#", "num_local_experts": 2, "num_experts_per_tok": 3"#).is_err());
}

/// A `[n, k]` linear of deterministic weights in `dtype`.
fn linear(seed: u64, n: usize, k: usize, dtype: strata_tensor::DType) -> Linear {
    let values = logits(seed, n * k, 0.5);
    Linear::new(Tensor::from_f32_as(&values, [n, k], dtype).unwrap(), None)
}

/// Repacking a MoE layer's experts and shared expert (q4_0 and q4_k rearranged, q8_0 copied)
/// leaves its output bit for bit the same, for one token and for many.
#[test]
fn repacked_experts_give_the_same_output_bit_for_bit() {
    use strata_tensor::DType;
    let (hidden, inter, e) = (256, 256, 4);
    for dtype in [DType::Q4_0, DType::Q4K, DType::Q8_0] {
        let experts = (0..e as u64)
            .map(|i| {
                let seed = 10 * i;
                let down = linear(seed + 3, hidden, inter, dtype);
                Mlp::new(linear(seed + 1, inter, hidden, dtype), linear(seed + 2, inter, hidden, dtype), down)
            })
            .collect();
        let shared_mlp = Mlp::new(
            linear(91, inter, hidden, dtype),
            linear(92, inter, hidden, dtype),
            linear(93, hidden, inter, dtype),
        );
        let shared = SharedExpert { mlp: shared_mlp, gate: linear(94, 1, hidden, DType::F32) };
        let router = Router::new(linear(95, e, hidden, DType::F32), 2, true);
        let plain = MoeLayer { router, experts: Experts::Resident(experts), shared: Some(shared) };
        let mut repacked = plain.clone();
        let count = repacked.resident_linears_mut().into_iter().map(|l| l.repack_for_cpu().unwrap()).filter(|&r| r);
        let want_repacked = if dtype == DType::Q8_0 { 0 } else { 3 * (e + 1) };
        assert_eq!(count.count(), want_repacked, "{dtype:?}");
        for tokens in [1, 20] {
            let x = logits(7, tokens * hidden, 1.0);
            let (mut want, mut got) = (vec![0f32; tokens * hidden], vec![0f32; tokens * hidden]);
            plain.forward(&x, tokens, &MoeOptions::default(), &mut want, None).unwrap();
            repacked.forward(&x, tokens, &MoeOptions::default(), &mut got, None).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{dtype:?}, {tokens} tokens");
        }
    }
}
