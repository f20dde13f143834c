//! Mixture-of-Experts through the facade: [`MoeConfig`] at load and
//! [`Model::logits_with_router`]'s statistics against transformers on every MoE fixture (one
//! pass and decode), neutral configs that must reproduce plain top-k bit for bit, the router
//! trace covering every chunk of a chunked pass, and the clear errors (a `k` out of range, MoE
//! settings on a dense model, expert offload).

use std::path::Path;

use strata::{Error, LoadOptions, LogitsMode, Model, MoeConfig, OffloadConfig, RouterStats, RouterTrace, Routing};
use strata_tests::{Fixture, max_abs_diff};

/// The tolerance the issue sets for the auxiliary loss.
const AUX_TOL: f32 = 1e-5;

const MOE: [&str; 5] = ["mixtral_moe", "mixtral_e6_k3", "qwen2_moe_norm", "qwen2_moe", "qwen3_moe"];

fn load(dir: &Path, moe: Option<MoeConfig>) -> strata::Result<Model> {
    Model::from_pretrained(dir, LoadOptions { threads: Some(2), moe, ..LoadOptions::default() })
}

/// transformers' per-layer expert counts from the fixture's expected.json.
fn reference_counts(f: &Fixture) -> Vec<Vec<u64>> {
    let layers = f.expected["moe"]["expert_counts"].as_array().unwrap();
    layers.iter().map(|l| l.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()).collect()
}

fn counts(stats: &RouterStats) -> Vec<Vec<u64>> {
    stats.layers.iter().map(|l| l.expert_counts.clone()).collect()
}

#[test]
fn router_statistics_match_transformers_in_both_modes() {
    for name in MOE {
        let f = Fixture::load(name);
        let moe = &f.expected["moe"];
        let want_aux = moe["aux_loss"].as_f64().unwrap() as f32;
        let want_z = moe["router_z_loss"].as_f64().unwrap() as f32;
        let top_k = moe["top_k"].as_u64().unwrap() as f64;
        let layers: Vec<usize> =
            moe["moe_layers"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let model = load(&f.dir, None).unwrap();
        for mode in [LogitsMode::OnePass, LogitsMode::Decode] {
            let (logits, stats) = model.logits_with_router(&f.prompt_ids, mode).unwrap();
            // The statistics come with the same logits as a plain run.
            assert_eq!(logits, model.logits(&f.prompt_ids, mode).unwrap(), "{name} {mode:?}");
            let aux_diff = (stats.aux_loss - want_aux).abs();
            assert!(aux_diff <= AUX_TOL, "{name} {mode:?}: aux_loss {} vs transformers {want_aux}", stats.aux_loss);
            assert!(
                (stats.z_loss - want_z).abs() <= 1e-5 * want_z.abs().max(1.0),
                "{name} {mode:?}: z-loss {} vs transformers {want_z}",
                stats.z_loss
            );
            assert_eq!(counts(&stats), reference_counts(&f), "{name} {mode:?}: expert counts");
            assert_eq!(stats.layers.iter().map(|l| l.layer).collect::<Vec<_>>(), layers, "{name} {mode:?}");
            assert_eq!(stats.mean_experts_per_token, top_k, "{name} {mode:?}");
            assert!(stats.layers.iter().all(|l| l.tokens == f.prompt_ids.len() && l.dropped == 0));
            println!(
                "{name:15} {mode:?}: aux_loss {:.7} (transformers {want_aux:.7}, |diff| {aux_diff:.1e})",
                stats.aux_loss
            );
        }
    }
}

/// Configs that must not change the routing give exactly the logits of the default load.
#[test]
fn neutral_configs_reproduce_topk_exactly() {
    for name in MOE {
        let f = Fixture::load(name);
        let want_one = load(&f.dir, None).unwrap().logits(&f.prompt_ids, LogitsMode::OnePass).unwrap();
        let want_decode = load(&f.dir, None).unwrap().logits(&f.prompt_ids, LogitsMode::Decode).unwrap();
        let neutral = [
            MoeConfig::default(),
            MoeConfig { capacity_factor: Some(1e9), ..MoeConfig::default() },
            MoeConfig { capacity_factor: Some(f32::INFINITY), ..MoeConfig::default() },
            MoeConfig { routing: Routing::DynamicTopK { p: 1.0, min_experts: 1 }, ..MoeConfig::default() },
        ];
        for config in neutral {
            let model = load(&f.dir, Some(config.clone())).unwrap();
            assert_eq!(model.logits(&f.prompt_ids, LogitsMode::OnePass).unwrap(), want_one, "{name} {config:?}");
            assert_eq!(model.logits(&f.prompt_ids, LogitsMode::Decode).unwrap(), want_decode, "{name} {config:?}");
        }
    }
}

/// Settings that do change the routing show in the statistics: fewer experts per token with
/// dynamic top-k, exactly `K` with `active_experts`, a capacity that holds per pass.
#[test]
fn routing_settings_show_in_the_statistics() {
    let f = Fixture::load("mixtral_e6_k3");
    let dynamic = MoeConfig { routing: Routing::DynamicTopK { p: 0.5, min_experts: 1 }, ..MoeConfig::default() };
    let (_, stats) =
        load(&f.dir, Some(dynamic)).unwrap().logits_with_router(&f.prompt_ids, LogitsMode::OnePass).unwrap();
    assert!((1.0..3.0).contains(&stats.mean_experts_per_token), "{}", stats.mean_experts_per_token);
    let per_layer: f64 = stats.layers.iter().map(|l| l.mean_experts_per_token).sum::<f64>() / stats.layers.len() as f64;
    assert!((per_layer - stats.mean_experts_per_token).abs() < 1e-12);

    let two = MoeConfig { active_experts: Some(2), ..MoeConfig::default() };
    let (_, stats) = load(&f.dir, Some(two)).unwrap().logits_with_router(&f.prompt_ids, LogitsMode::OnePass).unwrap();
    assert_eq!(stats.mean_experts_per_token, 2.0);
    for l in &stats.layers {
        assert_eq!(l.expert_counts.iter().sum::<u64>(), 2 * f.prompt_ids.len() as u64);
    }

    let tight = MoeConfig { capacity_factor: Some(1.0), ..MoeConfig::default() };
    let (_, stats) = load(&f.dir, Some(tight)).unwrap().logits_with_router(&f.prompt_ids, LogitsMode::OnePass).unwrap();
    // ceil(1.0 * 16 tokens * 3 / 6 experts) = 8.
    for l in &stats.layers {
        assert!(l.expert_counts.iter().all(|&c| c <= 8), "layer {}: {:?}", l.layer, l.expert_counts);
        assert_eq!(l.expert_counts.iter().sum::<u64>() + l.dropped as u64, 3 * f.prompt_ids.len() as u64);
    }
}

/// A model loaded with a placement plan runs long inputs in chunks of
/// [`strata::DEFAULT_PREFILL_CHUNK`] tokens: the router statistics still cover every token.
#[test]
fn the_trace_covers_every_chunk() {
    let f = Fixture::load("mixtral_moe");
    let n = strata::DEFAULT_PREFILL_CHUNK + 88;
    let ids: Vec<u32> = (0..n).map(|i| ((i * 37 + 5) % f.vocab) as u32).collect();
    let plain = load(&f.dir, None).unwrap();
    let (want_logits, want) = plain.logits_with_router(&ids, LogitsMode::OnePass).unwrap();
    let offload_dir = tempfile::tempdir().unwrap();
    let offload = OffloadConfig {
        strategy: Some("all-resident".into()),
        offload_dir: Some(offload_dir.path().to_path_buf()),
        hardware: Some(strata_tests::fixed_hardware()),
        ..OffloadConfig::default()
    };
    let chunked =
        Model::from_pretrained(&f.dir, LoadOptions { threads: Some(2), offload, ..LoadOptions::default() }).unwrap();
    assert!(chunked.placement().is_some());
    let (logits, got) = chunked.logits_with_router(&ids, LogitsMode::OnePass).unwrap();
    let diff = max_abs_diff(&logits, &want_logits);
    assert!(diff <= 1e-4, "chunked logits differ by {diff}");
    assert_eq!(got.layers.len(), want.layers.len());
    for (g, w) in got.layers.iter().zip(&want.layers) {
        assert_eq!(g.layer, w.layer);
        assert_eq!(g.tokens, n, "layer {}", g.layer);
        assert_eq!(g.expert_counts.iter().sum::<u64>(), 2 * n as u64, "layer {}", g.layer);
    }
    assert_eq!(counts(&got), counts(&want));
    assert!((got.aux_loss - want.aux_loss).abs() <= AUX_TOL, "{} vs {}", got.aux_loss, want.aux_loss);
}

/// A generation-style loop records many steps into one trace.
#[test]
fn steps_accumulate_in_one_trace() {
    let f = Fixture::load("qwen3_moe");
    let model = load(&f.dir, None).unwrap();
    let (_, want) = model.logits_with_router(&f.prompt_ids, LogitsMode::OnePass).unwrap();
    let mut cache = model.new_cache().unwrap();
    model.plan(&mut cache, f.prompt_ids.len()).unwrap();
    let mut trace = RouterTrace::new();
    let (head, tail) = f.prompt_ids.split_at(5);
    model.step_with_router(head, &mut cache, &mut trace).unwrap();
    for &id in tail {
        model.step_with_router(&[id], &mut cache, &mut trace).unwrap();
    }
    let got = model.router_stats(&trace).unwrap();
    assert_eq!(counts(&got), counts(&want));
    assert!((got.aux_loss - want.aux_loss).abs() <= AUX_TOL, "{} vs {}", got.aux_loss, want.aux_loss);
}

#[test]
fn bad_settings_are_clear_errors() {
    let f = Fixture::load("mixtral_e6_k3");
    for k in [0, 7] {
        let config = MoeConfig { active_experts: Some(k), ..MoeConfig::default() };
        let err = load(&f.dir, Some(config)).unwrap_err();
        assert!(err.to_string().contains(&format!("active_experts = {k} is outside 1..=6")), "{err}");
    }
    let config = MoeConfig { routing: Routing::DynamicTopK { p: 0.9, min_experts: 4 }, ..MoeConfig::default() };
    let err = load(&f.dir, Some(config)).unwrap_err();
    assert!(err.to_string().contains("min_experts = 4 is outside 1..=3"), "{err}");
    let config = MoeConfig { capacity_factor: Some(0.0), ..MoeConfig::default() };
    assert!(load(&f.dir, Some(config)).unwrap_err().to_string().contains("capacity_factor"));

    let dense = Fixture::load("llama_tied");
    let config = MoeConfig { active_experts: Some(2), ..MoeConfig::default() };
    let err = load(&dense.dir, Some(config)).unwrap_err();
    assert!(matches!(&err, Error::NotMixtureOfExperts { model, .. } if model == &dense.dir), "{err}");
    assert!(err.to_string().contains("llama_tied"), "{err}");
    // The default config is the model's own routing, which a dense model also has.
    let model = load(&dense.dir, Some(MoeConfig::default())).unwrap();
    let err = model.logits_with_router(&[1, 2, 3], LogitsMode::OnePass).unwrap_err();
    assert!(matches!(err, Error::NotMixtureOfExperts { .. }), "{err}");
    assert!(err.to_string().contains("is not a Mixture-of-Experts model"), "{err}");
}
