//! The MoE expert cache through the facade: a model whose experts stay in the offload pack and
//! are read when their router picks them gives the logits and router statistics of the model
//! held in memory, bit for bit, whatever the cache's size (from one expert to all of them), its
//! policy, the checkpoint's expert layout (per expert, or fused stacks cut per expert when
//! packed) and the strategy placing the other weights; the cache's counters add up.

use std::path::Path;

use strata::planner::Tier;
use strata::{LoadOptions, LogitsMode, Model, OffloadConfig};
use strata_tests::{Fixture, fixed_hardware};

const MOE: [&str; 5] = ["mixtral_moe", "mixtral_e6_k3", "qwen2_moe_norm", "qwen2_moe", "qwen3_moe"];

fn load(dir: &Path, offload: OffloadConfig) -> strata::Result<Model> {
    Model::from_pretrained(dir, LoadOptions { threads: Some(2), offload, ..LoadOptions::default() })
}

fn config(offload_dir: &Path, strategy: &str, cache: Option<u64>, policy: &str) -> OffloadConfig {
    OffloadConfig {
        strategy: Some(strategy.into()),
        offload_dir: Some(offload_dir.to_path_buf()),
        hardware: Some(fixed_hardware()),
        expert_cache: cache,
        expert_cache_policy: Some(policy.into()),
        ..OffloadConfig::default()
    }
}

/// The largest expert unit of a model loaded with its experts in the cache, and how many there
/// are.
fn expert_units(model: &Model) -> (u64, usize) {
    let store = model.store().expect("experts in the store");
    let units = &store.pack().manifest().units;
    let experts: Vec<u64> = units.iter().filter(|u| u.name.contains(".experts.")).map(|u| u.padded_len()).collect();
    (experts.iter().copied().max().unwrap(), experts.len())
}

#[test]
fn cached_experts_give_the_resident_logits_bit_for_bit() {
    let offload_dir = tempfile::tempdir().unwrap();
    for name in MOE {
        let f = Fixture::load(name);
        for dir in [f.dir.clone(), f.dir.join("fused")] {
            let plain = load(&dir, OffloadConfig::default()).unwrap();
            let (want_one, want_stats) = plain.logits_with_router(&f.prompt_ids, LogitsMode::OnePass).unwrap();
            let want_decode = plain.logits(&f.prompt_ids, LogitsMode::Decode).unwrap();

            let probe = load(&dir, config(offload_dir.path(), "all-resident", Some(1 << 30), "lru")).unwrap();
            let (largest, count) = expert_units(&probe);
            drop(probe);
            for (strategy, slots, policy) in [
                ("all-resident", 1, "lru"),
                ("all-resident", 3, "lfu"),
                ("stream-all", 2, "lru"),
                ("stream-all", 3, "layer-lru"),
                ("cost-model", count as u64, "lfu"),
            ] {
                let what = format!("{} {strategy}, {slots} of {count} experts cached, {policy}", dir.display());
                let model = load(&dir, config(offload_dir.path(), strategy, Some(slots * largest), policy))
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let plan = model.placement().unwrap();
                let manifest_experts = plan.placements.iter().filter(|p| p.tier == Tier::Disk).count();
                assert!(manifest_experts >= count, "{what}: every expert is on disk");
                assert_eq!(plan.ram.expert_cache, slots * largest, "{what}");
                let store = model.store().unwrap();
                assert_eq!(store.expert_cache_capacity(), Some((slots as usize, slots * largest)), "{what}");

                let (got_one, got_stats) = model.logits_with_router(&f.prompt_ids, LogitsMode::OnePass).unwrap();
                assert_eq!(got_one, want_one, "{what}: one pass");
                assert_eq!(got_stats, want_stats, "{what}: router statistics");
                let got_decode = model.logits(&f.prompt_ids, LogitsMode::Decode).unwrap();
                assert_eq!(got_decode, want_decode, "{what}: decode");

                let stats = store.expert_cache_stats().unwrap();
                assert!(stats.misses > 0, "{what}: {stats:?}");
                assert!(store.cached_experts().len() <= slots as usize, "{what}");
                if slots as usize >= count {
                    // Every expert read once at most: only cold misses, never an eviction.
                    assert!(stats.misses <= count as u64 && stats.evictions == 0, "{what}: {stats:?}");
                    assert!(stats.hits > 0, "{what}: {stats:?}");
                } else {
                    assert!(stats.evictions > 0, "{what}: {stats:?}");
                }
            }
        }
    }
}

#[test]
fn each_expert_is_a_unit_of_the_plan() {
    let offload_dir = tempfile::tempdir().unwrap();
    let f = Fixture::load("mixtral_e6_k3");
    let model = load(
        &f.dir,
        OffloadConfig { expert_prefetch: true, ..config(offload_dir.path(), "cost-model", Some(1 << 20), "lru") },
    )
    .unwrap();
    let store = model.store().unwrap();
    let units = &store.pack().manifest().units;
    for (i, u) in units.iter().enumerate() {
        if let Some(rest) = u.name.strip_prefix("layers.0.experts.") {
            let e: usize = rest.parse().unwrap();
            assert!(store.is_cached(i), "{}", u.name);
            let names: Vec<&str> = u.tensors.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(
                names,
                ["w1", "w3", "w2"].map(|n| format!("model.layers.0.block_sparse_moe.experts.{e}.{n}.weight")),
                "{}",
                u.name
            );
        }
    }
    let plan = model.placement().unwrap();
    assert!(plan.stream_order.iter().all(|&i| !units[i].name.contains(".experts.")));
    // Decoding, layer 0 reads ahead the experts layer 1's router picks for its residual stream;
    // the logits stay those of the model in memory.
    store.reset_stats();
    let got = model.logits(&f.prompt_ids, LogitsMode::Decode).unwrap();
    let stats = store.expert_cache_stats().unwrap();
    assert!(stats.prefetched > 0, "{stats:?}");
    assert!(stats.prefetch_used + stats.prefetch_unused + stats.prefetch_wasted <= stats.prefetched, "{stats:?}");
    let plain = load(&f.dir, OffloadConfig::default()).unwrap();
    assert_eq!(got, plain.logits(&f.prompt_ids, LogitsMode::Decode).unwrap());
}

#[test]
fn without_a_size_streamed_experts_get_a_cache_of_twice_a_tokens_experts() {
    let offload_dir = tempfile::tempdir().unwrap();
    let f = Fixture::load("mixtral_e6_k3");
    let model = load(&f.dir, config(offload_dir.path(), "stream-all", None, "lru")).unwrap();
    let (largest, _) = expert_units(&model);
    let plan = model.placement().unwrap();
    // k = 3 experts per token; the planner counts an expert as the pack stores it (4 KiB
    // aligned), so the store's buffers are the plan's.
    assert_eq!(plan.ram.expert_cache, 6 * largest);
    assert_eq!(model.store().unwrap().expert_cache_capacity().map(|c| c.0), Some(6));
}

/// Under `--max-ram` without `--expert-cache`, experts on disk get what the rest of the plan
/// leaves of the budget, in whole experts: the store holds as many, and the logits stay the
/// resident model's.
#[test]
fn under_a_ram_budget_the_cache_takes_what_the_plan_leaves() {
    let offload_dir = tempfile::tempdir().unwrap();
    let f = Fixture::load("mixtral_e6_k3");
    let unbudgeted = load(&f.dir, config(offload_dir.path(), "stream-all", None, "layer-lru")).unwrap();
    let (largest, count) = expert_units(&unbudgeted);
    let plan = unbudgeted.placement().unwrap();
    let rest = plan.ram.total - plan.ram.expert_cache;
    drop(unbudgeted);
    let plain = load(&f.dir, OffloadConfig::default()).unwrap();
    let want = plain.logits(&f.prompt_ids, LogitsMode::Decode).unwrap();
    for slots in [1, 4, count as u64] {
        let budget = rest + slots * largest + largest / 2;
        let offload =
            OffloadConfig { max_ram: Some(budget), ..config(offload_dir.path(), "stream-all", None, "layer-lru") };
        let model = load(&f.dir, offload).unwrap();
        let plan = model.placement().unwrap();
        assert_eq!(plan.ram.expert_cache, slots * largest, "{slots}: {}", plan.ram.total);
        assert_eq!(model.store().unwrap().expert_cache_capacity(), Some((slots as usize, slots * largest)));
        // layer-lru is expected to hit in proportion to the experts it holds.
        let expected = plan.expected_expert_hit_rate.unwrap();
        assert!((expected - slots as f64 / count as f64).abs() < 1e-12, "{slots}: {expected}");
        assert_eq!(model.logits(&f.prompt_ids, LogitsMode::Decode).unwrap(), want, "{slots} experts cached");
    }
}

/// A policy alone places nothing (it is the expert cache's, on the CPU or the GPU, and there is
/// none here): the model runs memory-mapped as without flags. An unknown policy is refused, named,
/// whatever else is set.
#[test]
fn a_policy_alone_places_nothing_and_an_unknown_one_is_refused() {
    let f = Fixture::load("mixtral_moe");
    let policy = |p: &str| OffloadConfig { expert_cache_policy: Some(p.into()), ..OffloadConfig::default() };
    let model = load(&f.dir, policy("lru")).unwrap();
    assert!(model.placement().is_none() && model.store().is_none());
    let plain = load(&f.dir, OffloadConfig::default()).unwrap();
    let (a, b) = (
        model.logits(&f.prompt_ids, LogitsMode::OnePass).unwrap(),
        plain.logits(&f.prompt_ids, LogitsMode::OnePass).unwrap(),
    );
    assert_eq!(a, b);
    let Err(err) = load(&f.dir, policy("fifo")) else { panic!("an unknown policy loaded") };
    assert!(err.to_string().contains("fifo"), "{err}");
}
