//! Mixture-of-Experts models against transformers: every MoE fixture, in both weight layouts
//! (one tensor per expert as `save_pretrained` writes it, and transformers 5's fused
//! `gate_up_proj`/`down_proj` stacks in `fused/`), gives transformers' logits in one pass and
//! through the KV cache, the same greedy continuation, the same router logits and expert counts,
//! and the same auxiliary loss. Also: the routing options (dynamic top-k, capacity) on real
//! models.

use std::path::{Path, PathBuf};

use strata_models::moe::expert_capacity;
use strata_models::{Decoder, Logits, MoeOptions, RouterTrace, Routing, load_balancing_loss, load_dir, router_z_loss};
use strata_tests::{Fixture, max_abs_diff, read_npy_f32};

/// The tolerance the issue sets for logits.
const TOL: f32 = 1e-4;
/// The tolerance the issue sets for the auxiliary loss.
const AUX_TOL: f32 = 1e-5;

const MOE: [&str; 5] = ["mixtral_moe", "mixtral_e6_k3", "qwen2_moe_norm", "qwen2_moe", "qwen3_moe"];

/// The fixture's two checkpoint layouts: (label, directory).
fn layouts(f: &Fixture) -> [(&'static str, PathBuf); 2] {
    [("per-expert", f.dir.clone()), ("fused", f.dir.join("fused"))]
}

fn load(dir: &Path) -> Decoder {
    load_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).decoder
}

fn one_pass(d: &Decoder, ids: &[u32]) -> Vec<f32> {
    d.forward(ids, &mut d.new_cache(), Logits::All).unwrap()
}

fn decode(d: &Decoder, ids: &[u32]) -> Vec<f32> {
    let mut cache = d.new_cache();
    ids.iter().flat_map(|&id| d.forward(&[id], &mut cache, Logits::Last).unwrap()).collect()
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn logits_match_transformers_in_one_pass_and_through_the_cache() {
    for name in MOE {
        let f = Fixture::load(name);
        for (layout, dir) in layouts(&f) {
            let d = load(&dir);
            let diff = max_abs_diff(&one_pass(&d, &f.prompt_ids), &f.logits);
            assert!(diff <= TOL, "{name} {layout} one pass: max |logit - reference| = {diff}");
            let decoded = max_abs_diff(&decode(&d, &f.prompt_ids), &f.logits);
            assert!(decoded <= TOL, "{name} {layout} decode: max |logit - reference| = {decoded}");
            println!("{name:15} {layout:10} max |logit - transformers|: one pass {diff:.1e}, decode {decoded:.1e}");
        }
    }
}

#[test]
fn greedy_continuations_match_transformers() {
    for name in MOE {
        let f = Fixture::load(name);
        for (layout, dir) in layouts(&f) {
            let d = load(&dir);
            let mut cache = d.new_cache();
            let mut next = argmax(&d.forward(&f.prompt_ids, &mut cache, Logits::Last).unwrap());
            let mut got = vec![next];
            while got.len() < f.greedy_ids.len() {
                next = argmax(&d.forward(&[next], &mut cache, Logits::Last).unwrap());
                got.push(next);
            }
            assert_eq!(got, f.greedy_ids, "{name} {layout}");
        }
    }
}

#[test]
fn router_statistics_match_transformers() {
    for name in MOE {
        let f = Fixture::load(name);
        let moe = &f.expected["moe"];
        let (n_experts, top_k) =
            (moe["num_experts"].as_u64().unwrap() as usize, moe["top_k"].as_u64().unwrap() as usize);
        let layers: Vec<usize> =
            moe["moe_layers"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let (shape, want_logits) = read_npy_f32(&f.dir.join("router_logits.npy"));
        assert_eq!(shape, [layers.len(), f.prompt_ids.len(), n_experts], "{name}");
        let want_aux = moe["aux_loss"].as_f64().unwrap() as f32;
        let want_z = moe["router_z_loss"].as_f64().unwrap() as f32;
        let d = load(&f.dir);
        assert_eq!(d.hparams().moe.as_ref().map(|m| (m.num_experts, m.top_k)), Some((n_experts, top_k)));

        let mut trace = RouterTrace::new();
        d.forward_with_router(&f.prompt_ids, &mut d.new_cache(), Logits::Last, &mut trace).unwrap();
        assert_eq!(trace.layers.iter().map(|l| l.layer).collect::<Vec<_>>(), layers, "{name}: MoE layers");
        for (i, record) in trace.layers.iter().enumerate() {
            let want = &want_logits[i * f.prompt_ids.len() * n_experts..][..f.prompt_ids.len() * n_experts];
            let diff = max_abs_diff(&record.logits, want);
            assert!(diff <= TOL, "{name} layer {}: router logits differ by {diff}", record.layer);
            let counts: Vec<u64> =
                moe["expert_counts"][i].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            assert_eq!(record.expert_counts, counts, "{name} layer {}: expert counts", record.layer);
        }
        assert_eq!(trace.mean_experts_per_token(), top_k as f64);
        let aux = load_balancing_loss(&trace, n_experts, top_k).unwrap();
        assert!((aux - want_aux).abs() <= AUX_TOL, "{name}: aux_loss {aux} vs transformers {want_aux}");
        println!("{name:15} aux_loss {aux:.7} (transformers {want_aux:.7}, |diff| {:.1e})", (aux - want_aux).abs());
        let z = router_z_loss(&trace);
        assert!((z - want_z).abs() <= 1e-5 * want_z.abs().max(1.0), "{name}: z-loss {z} vs {want_z}");

        // Decoding token by token records the same rows, so the same statistics.
        let mut decoded = RouterTrace::new();
        let mut cache = d.new_cache();
        for &id in &f.prompt_ids {
            d.forward_with_router(&[id], &mut cache, Logits::Last, &mut decoded).unwrap();
        }
        let aux = load_balancing_loss(&decoded, n_experts, top_k).unwrap();
        assert!((aux - want_aux).abs() <= AUX_TOL, "{name} decode: aux_loss {aux} vs transformers {want_aux}");
        assert_eq!(
            decoded.layers.iter().map(|l| l.expert_counts.clone()).collect::<Vec<_>>(),
            trace.layers.iter().map(|l| l.expert_counts.clone()).collect::<Vec<_>>(),
            "{name} decode counts"
        );
    }
}

/// Options that must not change the routing: dynamic top-k with p = 1 and capacity factors no
/// expert can fill give exactly (bit for bit) the logits of plain top-k.
#[test]
fn neutral_routing_options_reproduce_topk_exactly() {
    for name in MOE {
        let f = Fixture::load(name);
        let mut d = load(&f.dir);
        let want = one_pass(&d, &f.prompt_ids);
        let hp = d.hparams().moe.clone().unwrap();
        let neutral = [
            MoeOptions { routing: Routing::DynamicTopK { p: 1.0, min_experts: 1 }, ..MoeOptions::default() },
            MoeOptions { capacity_factor: Some(f32::INFINITY), ..MoeOptions::default() },
            MoeOptions { capacity_factor: Some(hp.num_experts as f32 / hp.top_k as f32), ..MoeOptions::default() },
            MoeOptions { active_experts: Some(hp.top_k), ..MoeOptions::default() },
        ];
        for options in neutral {
            d.set_moe_options(options).unwrap();
            assert_eq!(one_pass(&d, &f.prompt_ids), want, "{name} {options:?}");
            assert_eq!(decode(&d, &f.prompt_ids), decode_default(&f), "{name} {options:?} decode");
        }
    }
}

fn decode_default(f: &Fixture) -> Vec<f32> {
    decode(&load(&f.dir), &f.prompt_ids)
}

/// A tight capacity keeps every expert within ceil(cf * tokens * k / E) tokens of the pass,
/// on a real model, and moves the logits.
#[test]
fn capacity_limits_hold_on_a_model() {
    let f = Fixture::load("mixtral_moe");
    let mut d = load(&f.dir);
    let hp = d.hparams().moe.clone().unwrap();
    let cf = 1.0;
    d.set_moe_options(MoeOptions { capacity_factor: Some(cf), ..MoeOptions::default() }).unwrap();
    let mut trace = RouterTrace::new();
    let got = d.forward_with_router(&f.prompt_ids, &mut d.new_cache(), Logits::All, &mut trace).unwrap();
    let cap = expert_capacity(cf, f.prompt_ids.len(), hp.top_k, hp.num_experts) as u64;
    for layer in &trace.layers {
        assert!(
            layer.expert_counts.iter().all(|&c| c <= cap),
            "layer {}: {:?} > {cap}",
            layer.layer,
            layer.expert_counts
        );
        assert_eq!(
            layer.expert_counts.iter().sum::<u64>() + layer.dropped as u64,
            (f.prompt_ids.len() * hp.top_k) as u64
        );
    }
    assert!(trace.layers.iter().any(|l| l.reassigned > 0), "cf = 1 moved no token on this prompt");
    assert!(max_abs_diff(&got, &f.logits) > TOL);
}

/// Dynamic top-k on every fixture: the mean experts per token and the largest logit divergence
/// from plain top-k for p in {0.5, 0.7, 0.9} (printed; run with `--nocapture` to see the
/// report). Lower p never uses more experts, every token keeps between 1 and k, and p = 0.5
/// uses fewer than k on average.
#[test]
fn dynamic_topk_report() {
    for name in MOE {
        let f = Fixture::load(name);
        let mut d = load(&f.dir);
        let k = d.hparams().moe.as_ref().unwrap().top_k;
        let topk = one_pass(&d, &f.prompt_ids);
        let mut last_mean = 0.0;
        for p in [0.5f32, 0.7, 0.9] {
            d.set_moe_options(MoeOptions {
                routing: Routing::DynamicTopK { p, min_experts: 1 },
                ..MoeOptions::default()
            })
            .unwrap();
            let mut trace = RouterTrace::new();
            let got = d.forward_with_router(&f.prompt_ids, &mut d.new_cache(), Logits::All, &mut trace).unwrap();
            let mean = trace.mean_experts_per_token();
            let divergence = max_abs_diff(&got, &topk);
            println!(
                "{name:15} k {k}  p {p:.1}: mean experts/token {mean:.3}, max |logit - top-k logit| {divergence:.4}"
            );
            assert!(mean >= last_mean && (1.0..=k as f64).contains(&mean), "{name} p {p}: mean {mean}");
            assert!(trace.layers.iter().flat_map(|l| &l.active).all(|&a| (1..=k as u32).contains(&a)));
            if p == 0.5 {
                assert!(mean < k as f64, "{name}: p = 0.5 kept all {k} experts");
            }
            last_mean = mean;
        }
    }
}

#[test]
fn options_are_checked_against_the_model() {
    let mut d = load(&Fixture::load("mixtral_e6_k3").dir);
    assert!(d.set_moe_options(MoeOptions { active_experts: Some(7), ..MoeOptions::default() }).is_err());
    assert!(d.set_moe_options(MoeOptions { active_experts: Some(6), ..MoeOptions::default() }).is_ok());
    let mut dense = load(&Fixture::load("llama_tied").dir);
    let err = dense.set_moe_options(MoeOptions { active_experts: Some(2), ..MoeOptions::default() }).unwrap_err();
    assert!(err.to_string().contains("no Mixture-of-Experts"), "{err}");
    assert!(dense.set_moe_options(MoeOptions::default()).is_ok());
    // A dense model records nothing.
    let mut trace = RouterTrace::new();
    dense.forward_with_router(&[1, 2, 3], &mut dense.new_cache(), Logits::Last, &mut trace).unwrap();
    assert!(trace.layers.is_empty());
}

/// A missing expert is named, in the layout the checkpoint otherwise uses.
#[test]
fn a_missing_expert_is_named() {
    let f = Fixture::load("mixtral_e6_k3");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(f.dir.join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.dir.join("config.json")).unwrap()).unwrap();
    config["num_local_experts"] = 7.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = load_dir(dir.path()).unwrap_err();
    // The router is [6, hidden] where 7 experts need [7, hidden].
    assert!(
        matches!(&err, strata_models::Error::TensorShape { tensor, .. } if tensor.ends_with("block_sparse_moe.gate.weight")),
        "{err}"
    );
}
