//! The built-in strategies on a manifest shaped like TinyLlama-1.1B in q8_0 and on random
//! manifests: budgets are respected, shortfalls say what would fit, the cost model is never
//! slower than the fixed strategies, and the same input gives the same plan.

use std::collections::BTreeMap;

use proptest::prelude::*;
use strata_planner::{
    AllResident, CostModel, DEFAULT_EXPERT_CACHE_FACTOR, DEFAULT_EXPERT_CACHE_POLICY, HardwareProfile, PinAttention,
    PlacementStrategy, Plan, PlanError, PlanInput, StreamAll, Tier, TierBudgets, UnitInfo, UnitKind, WeightManifest,
    Workload, format_size, mapped_ram, parse_size, strategy_by_name,
};

/// Bytes of `weights` q8_0 weights: 34 bytes per block of 32.
fn q8_0(weights: u64) -> u64 {
    weights / 32 * 34
}

const HIDDEN: u64 = 2048;
const INTERMEDIATE: u64 = 5632;
const KV_WIDTH: u64 = 4 * 64;
const VOCAB: u64 = 32000;
const LAYERS: usize = 22;
/// An f32 norm vector.
const NORM: u64 = HIDDEN * 4;

fn unit(name: String, kind: UnitKind, bytes: u64, bytes_per_token: u64) -> UnitInfo {
    UnitInfo { name, kind, bytes, dtype: "q8_0".to_string(), bytes_per_token }
}

/// TinyLlama-1.1B in q8_0: 22 layers, hidden 2048, intermediate 5632, 4 KV heads of 64,
/// vocabulary 32000, f16 KV cache.
fn tinyllama() -> WeightManifest {
    let embedding = q8_0(VOCAB * HIDDEN);
    let attention = q8_0(2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_WIDTH) + NORM;
    let ffn = q8_0(3 * HIDDEN * INTERMEDIATE) + NORM;
    let head = q8_0(VOCAB * HIDDEN) + NORM;
    let mut units = vec![unit("token_embd".into(), UnitKind::Embedding, embedding, q8_0(HIDDEN))];
    for layer in 0..LAYERS {
        units.push(unit(format!("blk.{layer}.attn"), UnitKind::Attention { layer }, attention, attention));
        units.push(unit(format!("blk.{layer}.ffn"), UnitKind::Ffn { layer }, ffn, ffn));
    }
    units.push(unit("output".into(), UnitKind::Head, head, head));
    WeightManifest {
        units,
        n_layers: LAYERS,
        kv_bytes_per_token: LAYERS as u64 * 2 * KV_WIDTH * 2,
        activation_bytes_per_token: 4 * (4 * HIDDEN + 2 * INTERMEDIATE + VOCAB),
    }
}

fn hardware() -> HardwareProfile {
    HardwareProfile {
        disk_read_gb_s: 2.0,
        disk_read_large_gb_s: None,
        memory_gb_s: 40.0,
        matvec_gb_s: BTreeMap::from([("q8_0".to_string(), 20.0), ("f32".to_string(), 10.0)]),
        host_to_device_gb_s: None,
        threads: 8,
    }
}

const WORKLOAD: Workload = Workload { context_tokens: 2048, batch_tokens: 32 };

/// Whether a plan maps unit `i` of `m` (the embedding of a model with its own head).
fn is_mapped(m: &WeightManifest, i: usize) -> bool {
    m.units[i].kind == UnitKind::Embedding && m.units.iter().any(|u| u.kind == UnitKind::Head)
}

/// The RAM unit `i` holds when not streamed, over `context_tokens` tokens.
fn ram_bytes(m: &WeightManifest, i: usize, context_tokens: usize) -> u64 {
    let u = &m.units[i];
    if is_mapped(m, i) { mapped_ram(u.bytes, u.bytes_per_token, context_tokens) } else { u.bytes }
}

/// TinyLlama's RAM with every unit resident (the embedding mapped) over [`WORKLOAD`]'s context.
fn all_resident_weights(m: &WeightManifest) -> u64 {
    (0..m.units.len()).map(|i| ram_bytes(m, i, WORKLOAD.context_tokens)).sum()
}

fn input<'a>(
    manifest: &'a WeightManifest,
    hardware: &'a HardwareProfile,
    ram: Option<u64>,
    depth: Option<usize>,
) -> PlanInput<'a> {
    PlanInput {
        manifest,
        budgets: TierBudgets { vram: None, ram },
        hardware,
        workload: WORKLOAD,
        prefetch_depth: depth,
        process_ram: 0,
        expert_cache: None,
        experts_per_token: 2,
        expert_cache_policy: DEFAULT_EXPERT_CACHE_POLICY,
    }
}

fn strategies() -> Vec<Box<dyn PlacementStrategy>> {
    vec![Box::new(AllResident), Box::new(StreamAll), Box::new(PinAttention), Box::new(CostModel)]
}

/// Checks the invariants every plan keeps, whatever the strategy.
fn check_plan(plan: &Plan, input: &PlanInput) -> Result<(), TestCaseError> {
    let m = input.manifest;
    prop_assert_eq!(plan.placements.len(), m.units.len());
    for (i, placement) in plan.placements.iter().enumerate() {
        prop_assert_eq!(placement.unit, i);
        prop_assert_eq!(plan.tier_of(i), placement.tier);
        prop_assert!(placement.tier != Tier::Vram, "CPU plans use no VRAM");
        if !m.units[i].kind.is_streamable() {
            let tier = if is_mapped(m, i) { Tier::Mapped } else { Tier::Ram };
            prop_assert_eq!(placement.tier, tier, "unit {} must stay resident", m.units[i].name);
        } else {
            prop_assert!(placement.tier != Tier::Mapped, "unit {} is mapped", m.units[i].name);
        }
    }
    let is_expert = |i: usize| matches!(m.units[i].kind, UnitKind::Expert { .. });
    let on_disk: Vec<usize> =
        m.execution_order().into_iter().filter(|&i| plan.placements[i].tier == Tier::Disk).collect();
    // Experts on disk are read on demand into the expert cache, not streamed in order.
    let expected_order: Vec<usize> = on_disk.iter().copied().filter(|&i| !is_expert(i)).collect();
    prop_assert_eq!(&plan.streamed_units(), &expected_order);
    let largest_expert =
        on_disk.iter().copied().filter(|&i| is_expert(i)).map(|i| m.units[i].bytes.next_multiple_of(4096)).max();
    let on_demand = on_disk.iter().filter(|&&i| is_expert(i)).count() as u64;
    let ram = plan.ram;
    let rest = ram.total - ram.expert_cache;
    let expert_cache = match (largest_expert, input.expert_cache, input.budgets.ram) {
        (None, _, _) => 0,
        (Some(_), Some(bytes), _) => bytes,
        // Without a budget: twice a token's experts, at most all of them.
        (Some(largest), None, None) => {
            largest * ((DEFAULT_EXPERT_CACHE_FACTOR * input.experts_per_token) as u64).clamp(1, on_demand)
        }
        // Under a budget: what the rest leaves, in whole experts, one at least, all at most.
        (Some(largest), None, Some(budget)) => largest * (budget.saturating_sub(rest) / largest).clamp(1, on_demand),
    };
    prop_assert_eq!(plan.ram.expert_cache, expert_cache);
    prop_assert_eq!(plan.expected_expert_hit_rate.is_some(), largest_expert.is_some());
    if let Some(rate) = plan.expected_expert_hit_rate {
        prop_assert!((0.0..=1.0).contains(&rate), "{}", rate);
    }
    let streamed = expected_order.len();
    if streamed == 0 {
        prop_assert_eq!((plan.staging_buffers, plan.staging_buffer_bytes, plan.prefetch_depth), (0, 0, 0));
    } else {
        prop_assert!(plan.prefetch_depth < streamed);
        prop_assert_eq!(plan.staging_buffers, plan.prefetch_depth + 1);
        let largest = expected_order.iter().map(|&i| m.units[i].bytes).max().unwrap();
        prop_assert_eq!(plan.staging_buffer_bytes, largest);
    }
    let resident: u64 = (0..m.units.len())
        .filter(|&i| plan.tier_of(i) != Tier::Disk)
        .map(|i| ram_bytes(m, i, input.workload.context_tokens))
        .sum();
    prop_assert_eq!(ram.resident_weights, resident);
    prop_assert_eq!(ram.kv_cache, m.kv_bytes_per_token * input.workload.context_tokens as u64);
    prop_assert_eq!(ram.activations, m.activation_bytes_per_token * input.workload.batch_tokens as u64);
    prop_assert_eq!(ram.staging, plan.staging_buffers as u64 * plan.staging_buffer_bytes);
    prop_assert_eq!(ram.process, input.process_ram);
    prop_assert_eq!(
        ram.total,
        ram.resident_weights + ram.kv_cache + ram.activations + ram.staging + ram.expert_cache + ram.process
    );
    if let Some(budget) = input.budgets.ram {
        prop_assert!(
            ram.total <= budget,
            "{} needs {} of RAM, over its budget of {}",
            plan.strategy,
            ram.total,
            budget
        );
    }
    prop_assert_eq!(plan.vram.total, 0);
    let t = plan.predicted;
    prop_assert!(t.total_s >= t.compute_s.max(t.transfer_s), "{:?}", t);
    prop_assert!(t.total_s <= t.compute_s + t.transfer_s + 1e-15 * t.total_s, "{:?}", t);
    if plan.prefetch_depth == 0 && !on_disk.is_empty() {
        let sum = t.compute_s + t.transfer_s;
        prop_assert!((t.total_s - sum).abs() <= 1e-12 * sum, "depth 0 adds compute and transfer: {:?}", t);
    }
    Ok(())
}

fn check(plan: &Plan, input: &PlanInput) {
    if let Err(error) = check_plan(plan, input) {
        panic!("{} plan breaks an invariant: {error}\n{}", plan.strategy, plan.to_table(input.manifest));
    }
}

fn does_not_fit(result: Result<Plan, PlanError>) -> (u64, u64, String) {
    match result {
        Err(PlanError::DoesNotFit { needed, budget, tier: Tier::Ram, what, .. }) => (needed, budget, what),
        Err(other) => panic!("expected DoesNotFit, got {other}"),
        Ok(plan) => panic!("expected DoesNotFit, got a plan needing {}", format_size(plan.ram.total)),
    }
}

#[test]
fn the_synthetic_manifest_has_tinyllamas_size() {
    assert_eq!(format_size(tinyllama().total_bytes()), "1.17 GB");
}

#[test]
fn ample_ram_keeps_everything_resident() {
    let manifest = tinyllama();
    let hardware = hardware();
    for ram in [None, Some(parse_size("4GB").unwrap())] {
        let input = input(&manifest, &hardware, ram, None);
        for strategy in strategies() {
            let plan = strategy.plan(&input).unwrap();
            check(&plan, &input);
            assert_eq!(plan.strategy, strategy.name());
        }
        let all = AllResident.plan(&input).unwrap();
        let cost = CostModel.plan(&input).unwrap();
        assert!(cost.streamed_units().is_empty(), "{}", cost.to_table(&manifest));
        assert_eq!(cost.ram, all.ram);
        assert_eq!(cost.predicted, all.predicted);
        assert_eq!(all.ram.total, all_resident_weights(&manifest) + 46_137_344 + 6_586_368);
        // Everything resident: the token costs its compute and nothing else.
        assert_eq!(all.predicted.total_s, all.predicted.compute_s);
        assert_eq!(all.predicted.transfer_s, 0.0);
        let pin = PinAttention.plan(&input).unwrap();
        assert_eq!(pin.prefetch_depth, 2);
        assert_eq!(pin.streamed_units().len(), LAYERS);
        assert!(pin.streamed_units().iter().all(|&i| matches!(manifest.units[i].kind, UnitKind::Ffn { .. })));
    }
}

#[test]
fn a_third_of_the_model_streams_the_rest() {
    let manifest = tinyllama();
    let hardware = hardware();
    let budget = manifest.total_bytes() / 3;
    let input = input(&manifest, &hardware, Some(budget), None);

    let (needed, _, what) = does_not_fit(AllResident.plan(&input));
    assert_eq!(needed, all_resident_weights(&manifest) + 46_137_344 + 6_586_368);
    assert!(what.contains("the all-resident plan needs at least 1.17 GB of RAM"), "{what}");

    // Pin-attention keeps 22 attention blocks and the head resident and rings three FFNs.
    let (needed, _, what) = does_not_fit(PinAttention.plan(&input));
    let ffn = manifest.units[2].bytes;
    let pinned = (0..manifest.units.len())
        .filter(|&i| !matches!(manifest.units[i].kind, UnitKind::Ffn { .. }))
        .map(|i| ram_bytes(&manifest, i, WORKLOAD.context_tokens))
        .sum::<u64>();
    assert_eq!(needed, pinned + 46_137_344 + 6_586_368 + 3 * ffn);
    assert!(what.contains("3 staging buffers of 36.8 MB"), "{what}");
    assert!(what.contains("the cost-model strategy needs at least 140 MB"), "{what}");

    let stream = StreamAll.plan(&input).unwrap();
    check(&stream, &input);
    assert_eq!(stream.prefetch_depth, 0);
    assert_eq!(stream.streamed_units().len(), 2 * LAYERS + 1);

    let cost = CostModel.plan(&input).unwrap();
    check(&cost, &input);
    println!("{}", cost.to_table(&manifest));
    assert!(cost.predicted.total_s < stream.predicted.total_s);
    // The head is the largest streamable unit: keeping it resident halves the ring's buffers.
    assert_eq!(cost.tier_of(manifest.units.len() - 1), Tier::Ram);
    assert!(cost.prefetch_depth >= 1, "a disk-bound pipeline overlaps compute: {}", cost.to_table(&manifest));
    // Disk-bound: the time is the streamed bytes at disk speed, or close to it. Where resident
    // units cluster (the head and the embedding at the token's wrap) they can compute for
    // longer than the next load takes, and depth 1 hides only one unit's compute, so the disk
    // may idle briefly; a deeper ring would cost a resident FFN.
    let t = cost.predicted;
    println!("{t:?}");
    assert!(t.total_s >= t.transfer_s && t.total_s < 1.01 * t.transfer_s, "{t:?}");
    // Little RAM is left unused: less than one more FFN's worth.
    assert!(budget - cost.ram.total < ffn, "{}", cost.to_table(&manifest));
}

#[test]
fn below_the_minimum_every_strategy_says_what_would_fit() {
    let manifest = tinyllama();
    let hardware = hardware();
    let budget = parse_size("100MB").unwrap();
    let input = input(&manifest, &hardware, Some(budget), None);
    for strategy in strategies() {
        let (needed, reported_budget, what) = does_not_fit(strategy.plan(&input));
        assert_eq!(reported_budget, budget);
        assert!(needed > budget);
        assert!(what.contains("the RAM budget of 100 MB is"), "{what}");
    }
    // The smallest ring holds the head: one buffer, on demand.
    let (needed, _, what) = does_not_fit(CostModel.plan(&input));
    let embedding = ram_bytes(&manifest, 0, WORKLOAD.context_tokens);
    let head = manifest.units.last().unwrap().bytes;
    assert_eq!(needed, embedding + 46_137_344 + 6_586_368 + head);
    assert_eq!(
        what,
        "the cost-model plan needs at least 140 MB of RAM (embedding 17.8 MB, KV cache 46.1 MB, activations \
         6.59 MB, 1 staging buffer of 69.6 MB); the RAM budget of 100 MB is 40.2 MB short"
    );
    let message = CostModel.plan(&input).unwrap_err().to_string();
    assert!(message.starts_with("the plan does not fit in RAM: the cost-model plan needs"), "{message}");
    // What the error says would fit does fit.
    let exact = self::input(&manifest, &hardware, Some(needed), None);
    check(&CostModel.plan(&exact).unwrap(), &exact);
    let (_, _, _) = does_not_fit(CostModel.plan(&self::input(&manifest, &hardware, Some(needed - 1), None)));
}

#[test]
fn the_same_input_gives_the_same_plan() {
    let manifest = tinyllama();
    let hardware = hardware();
    for ram in [None, Some(manifest.total_bytes() / 2), Some(manifest.total_bytes() / 3)] {
        for depth in [None, Some(1), Some(3)] {
            let input = input(&manifest, &hardware, ram, depth);
            for strategy in strategies() {
                let first = strategy.plan(&input);
                let second = strategy.plan(&input);
                assert_eq!(first, second);
                if let Ok(plan) = first {
                    let json = serde_json::to_string(&plan).unwrap();
                    assert_eq!(json, serde_json::to_string(&second.unwrap()).unwrap());
                    let back: Plan = serde_json::from_str(&json).unwrap();
                    assert_eq!(back, plan);
                }
            }
        }
    }
}

#[test]
fn a_deeper_user_depth_grows_the_ring_and_never_slows_the_token() {
    let manifest = tinyllama();
    let hardware = hardware();
    let head = manifest.units.last().unwrap().bytes;
    let mut previous: Option<Plan> = None;
    for depth in 0..=6 {
        let input = input(&manifest, &hardware, None, Some(depth));
        let plan = StreamAll.plan(&input).unwrap();
        check(&plan, &input);
        assert_eq!(plan.prefetch_depth, depth);
        assert_eq!(plan.staging_buffers, depth + 1);
        assert_eq!(plan.staging_buffer_bytes, head);
        assert_eq!(plan.ram.staging, (depth as u64 + 1) * head);
        if let Some(previous) = &previous {
            assert!(plan.predicted.total_s <= previous.predicted.total_s, "depth {depth}");
            assert_eq!(plan.ram.total - previous.ram.total, head);
        }
        previous = Some(plan);
    }
    // The default for stream-all is the synchronous baseline: one buffer, no overlap.
    let baseline = StreamAll.plan(&input(&manifest, &hardware, None, None)).unwrap();
    assert_eq!((baseline.prefetch_depth, baseline.staging_buffers), (0, 1));
    assert!(baseline.predicted.total_s > previous.unwrap().predicted.total_s);
    // A fixed depth binds the cost model too.
    let budget = Some(manifest.total_bytes() / 3);
    for depth in 0..=3 {
        let plan = CostModel.plan(&input(&manifest, &hardware, budget, Some(depth))).unwrap();
        assert_eq!(plan.prefetch_depth, depth);
        assert_eq!(plan.staging_buffers, depth + 1);
    }
}

#[test]
fn the_table_collapses_layers_by_tier() {
    let manifest = tinyllama();
    let hardware = hardware();
    let input = input(&manifest, &hardware, Some(parse_size("900MB").unwrap()), None);
    let plan = PinAttention.plan(&input).unwrap();
    let table = plan.to_table(&manifest);
    println!("{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines[0], "strategy pin-attention: prefetch depth 2, 3 staging buffers of 36.8 MB");
    assert!(
        lines.iter().any(|l| l.starts_with("token_embd") && l.contains("mapped") && l.ends_with("69.6 MB")),
        "{table}"
    );
    assert!(lines.iter().any(|l| l.starts_with("layers 0-21 attention") && l.contains("RAM") && l.ends_with("221 MB")));
    assert!(lines.iter().any(|l| l.starts_with("layers 0-21 ffn") && l.contains("disk") && l.ends_with("809 MB")));
    assert!(lines.iter().any(|l| l.starts_with("output") && l.contains("RAM")));
    assert!(
        table.contains("RAM   471 MB of 900 MB: weights 308 MB, KV cache 46.1 MB, activations 6.59 MB, staging 110 MB")
    );
    assert!(table.contains("VRAM  unused"));
    assert!(table.contains("streamed per token: 809 MB"));
    assert!(table.contains("predicted per token: "));

    let cost = CostModel.plan(&input).unwrap();
    let table = cost.to_table(&manifest);
    println!("{table}");
    // Runs of layers break where the tier changes.
    let ffn_lines = table.lines().filter(|l| l.contains(" ffn ")).count();
    assert!(ffn_lines > 1, "{table}");
}

#[test]
fn strategies_are_found_by_name() {
    for name in strata_planner::STRATEGY_NAMES {
        assert_eq!(strategy_by_name(name).unwrap().name(), name);
    }
    assert_eq!(strategy_by_name(strata_planner::DEFAULT_STRATEGY).unwrap().name(), "cost-model");
    let error = strategy_by_name("fastest").err().unwrap();
    assert_eq!(
        error.to_string(),
        "unknown placement strategy \"fastest\"; the strategies are all-resident, stream-all, pin-attention, cost-model"
    );
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let manifest = tinyllama();
    let mut bad_hardware = hardware();
    bad_hardware.disk_read_gb_s = 0.0;
    let result = CostModel.plan(&input(&manifest, &bad_hardware, None, None));
    assert!(matches!(result, Err(PlanError::InvalidHardware { .. })), "{result:?}");

    let hardware = hardware();
    let input = input(&manifest, &hardware, None, None);
    let mut streamed = vec![false; manifest.units.len()];
    streamed[0] = true;
    let error = input.assemble("mine", &streamed, 0).unwrap_err();
    assert!(error.to_string().contains("\"token_embd\""), "{error}");
    let error = input.assemble("mine", &[true], 0).unwrap_err();
    assert!(error.to_string().contains("1 placements for a manifest of 46 units"), "{error}");

    let result = StreamAll.plan(&PlanInput { prefetch_depth: Some(65), ..input });
    assert_eq!(result, Err(PlanError::PrefetchTooDeep { depth: 65, max: 64 }));
    assert!(StreamAll.plan(&PlanInput { prefetch_depth: Some(64), ..input }).is_ok());

    let mut huge = tinyllama();
    huge.kv_bytes_per_token = u64::MAX / 2;
    let result = AllResident.plan(&self::input(&huge, &hardware, None, None));
    assert!(matches!(result, Err(PlanError::Overflow { .. })), "{result:?}");
}

#[test]
fn a_custom_strategy_uses_the_shared_accounting() {
    /// Streams only the head.
    struct StreamHead;
    impl PlacementStrategy for StreamHead {
        fn name(&self) -> &'static str {
            "stream-head"
        }
        fn plan(&self, input: &PlanInput) -> Result<Plan, PlanError> {
            let streamed: Vec<bool> = input.manifest.units.iter().map(|u| u.kind == UnitKind::Head).collect();
            input.assemble(self.name(), &streamed, 3)
        }
    }
    let manifest = tinyllama();
    let hardware = hardware();
    let input = input(&manifest, &hardware, None, None);
    let plan = StreamHead.plan(&input).unwrap();
    check(&plan, &input);
    // One streamed unit: the depth is capped, the ring is one buffer.
    assert_eq!((plan.prefetch_depth, plan.staging_buffers), (0, 1));
    assert_eq!(plan.streamed_units(), vec![manifest.units.len() - 1]);
}

/// A random manifest: a few layers of attention, FFN and sometimes experts, an embedding, a
/// head and sometimes an `Other` unit, in shuffled order.
fn manifest_strategy() -> impl Strategy<Value = WeightManifest> {
    let dtype = prop::sample::select(vec!["f32", "bf16", "q8_0", "q4_k"]);
    let layer = (1u64..2_000_000, 1u64..5_000_000, 0usize..3, 1u64..1_000_000, dtype.clone());
    (
        prop::collection::vec(layer, 1..6),
        1u64..3_000_000,
        1u64..3_000_000,
        prop::option::of(1u64..100_000),
        0u64..2000,
        0u64..2000,
        any::<prop::sample::Index>(),
        dtype,
    )
        .prop_map(|(layers, embedding, head, other, kv, act, rotation, dtype)| {
            let mut units = vec![UnitInfo {
                name: "embed".into(),
                kind: UnitKind::Embedding,
                bytes: embedding,
                dtype: dtype.to_string(),
                bytes_per_token: embedding / 1000 + 1,
            }];
            for (layer, &(attention, ffn, experts, expert_bytes, dtype)) in layers.iter().enumerate() {
                let make = |name: String, kind, bytes: u64, per_token: u64| UnitInfo {
                    name,
                    kind,
                    bytes,
                    dtype: dtype.to_string(),
                    bytes_per_token: per_token,
                };
                units.push(make(format!("{layer}.attn"), UnitKind::Attention { layer }, attention, attention));
                units.push(make(format!("{layer}.ffn"), UnitKind::Ffn { layer }, ffn, ffn));
                for expert in 0..experts {
                    let kind = UnitKind::Expert { layer, expert };
                    units.push(make(format!("{layer}.e{expert}"), kind, expert_bytes, expert_bytes / 2));
                }
            }
            units.push(UnitInfo {
                name: "head".into(),
                kind: UnitKind::Head,
                bytes: head,
                dtype: dtype.to_string(),
                bytes_per_token: head,
            });
            if let Some(bytes) = other {
                units.push(UnitInfo {
                    name: "norm".into(),
                    kind: UnitKind::Other,
                    bytes,
                    dtype: "f32".into(),
                    bytes_per_token: bytes,
                });
            }
            let shift = rotation.index(units.len());
            units.rotate_left(shift);
            WeightManifest { units, n_layers: layers.len(), kv_bytes_per_token: kv, activation_bytes_per_token: act }
        })
}

fn hardware_strategy() -> impl Strategy<Value = HardwareProfile> {
    let rates = (0.1f64..10.0, prop::option::of(0.1f64..10.0), 1.0f64..100.0, 0.5f64..60.0, 0.5f64..60.0);
    rates.prop_map(|(disk, large, memory, q8, f32)| HardwareProfile {
        disk_read_gb_s: disk,
        disk_read_large_gb_s: large,
        memory_gb_s: memory,
        matvec_gb_s: BTreeMap::from([("q8_0".to_string(), q8), ("f32".to_string(), f32)]),
        host_to_device_gb_s: None,
        threads: 4,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_plan_respects_its_budget_and_the_cost_model_is_never_slower(
        manifest in manifest_strategy(),
        hardware in hardware_strategy(),
        budget_fraction in prop::option::of(0.0f64..1.3),
        depth in prop::option::of(0usize..6),
        context in 0usize..4096,
        batch in 1usize..64,
    ) {
        let workload = Workload { context_tokens: context, batch_tokens: batch };
        let everything = manifest.total_bytes() + manifest.kv_bytes_per_token * context as u64
            + manifest.activation_bytes_per_token * batch as u64;
        let ram = budget_fraction.map(|f| (everything as f64 * f) as u64);
        let input = PlanInput { manifest: &manifest, budgets: TierBudgets { vram: Some(1 << 30), ram }, hardware: &hardware, workload, prefetch_depth: depth, process_ram: 0, expert_cache: None, experts_per_token: 2, expert_cache_policy: "layer-lru" };
        let cost = CostModel.plan(&input);
        prop_assert_eq!(&cost, &CostModel.plan(&input), "the same input gives the same plan");
        for strategy in strategies() {
            match strategy.plan(&input) {
                Ok(plan) => {
                    check_plan(&plan, &input)?;
                    if let Some(d) = depth && !plan.streamed_units().is_empty() {
                        prop_assert_eq!(plan.prefetch_depth, d.min(plan.streamed_units().len() - 1));
                    }
                    let Ok(best) = &cost else {
                        return Err(TestCaseError::fail(format!("{} fits but the cost model does not", plan.strategy)));
                    };
                    prop_assert!(best.predicted.total_s <= plan.predicted.total_s,
                        "cost model {} s, {} {} s", best.predicted.total_s, plan.strategy, plan.predicted.total_s);
                }
                Err(PlanError::DoesNotFit { needed, budget, .. }) => {
                    prop_assert_eq!(Some(budget), ram);
                    prop_assert!(needed > budget);
                    // What the error says would fit does fit.
                    let enough = PlanInput { budgets: TierBudgets { vram: None, ram: Some(needed) }, ..input };
                    let plan = strategy.plan(&enough).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    check_plan(&plan, &enough)?;
                }
                Err(other) => return Err(TestCaseError::fail(format!("{}: {other}", strategy.name()))),
            }
        }
    }

    #[test]
    fn deeper_prefetch_never_predicts_slower_with_ample_ram(
        manifest in manifest_strategy(),
        hardware in hardware_strategy(),
    ) {
        let mut previous = f64::INFINITY;
        for depth in 0..6 {
            let input = PlanInput { manifest: &manifest, budgets: TierBudgets::default(), hardware: &hardware, workload: WORKLOAD, prefetch_depth: Some(depth), process_ram: 0, expert_cache: None, experts_per_token: 2, expert_cache_policy: "layer-lru" };
            for plan in [StreamAll.plan(&input), PinAttention.plan(&input)] {
                let plan = plan.map_err(|e| TestCaseError::fail(e.to_string()))?;
                check_plan(&plan, &input)?;
            }
            let total = StreamAll.plan(&input).unwrap().predicted.total_s;
            prop_assert!(total <= previous, "depth {}: {} s after {} s", depth, total, previous);
            previous = total;
        }
    }
}

#[test]
fn the_table_groups_experts_across_layers() {
    let make = |name: String, kind| UnitInfo { name, kind, bytes: 1000, dtype: "f32".into(), bytes_per_token: 250 };
    let mut units = vec![make("embed".into(), UnitKind::Embedding)];
    for layer in 0..3 {
        units.push(make(format!("{layer}.attn"), UnitKind::Attention { layer }));
        for expert in 0..4 {
            units.push(make(format!("{layer}.e{expert}"), UnitKind::Expert { layer, expert }));
        }
    }
    let manifest = WeightManifest { units, n_layers: 3, kv_bytes_per_token: 0, activation_bytes_per_token: 0 };
    let hardware = hardware();
    let input = input(&manifest, &hardware, None, Some(1));
    // Stream the experts of layer 1 from expert 2 on, and all of layer 2's.
    let streamed: Vec<bool> = manifest
        .units
        .iter()
        .map(|u| matches!(u.kind, UnitKind::Expert { layer, expert } if layer == 2 || (layer == 1 && expert >= 2)))
        .collect();
    let plan = input.assemble("mine", &streamed, 1).unwrap();
    check(&plan, &input);
    // An expert streams its expected share per token, times the expected misses of the cache
    // (4 experts of the 6 on disk, k = 2 of each layer's 4).
    let rate = plan.expected_expert_hit_rate.unwrap();
    assert!(rate > 0.2 && rate < 0.9, "{rate}");
    let expected = 6.0 * 250.0 * (1.0 - rate);
    assert!(
        (plan.bytes_streamed_per_token as f64 - expected).abs() < 1.0,
        "{} vs {expected}",
        plan.bytes_streamed_per_token
    );
    let table = plan.to_table(&manifest);
    let labels: Vec<&str> = table.lines().skip(2).take(4).map(|l| l.split("  ").next().unwrap().trim()).collect();
    assert_eq!(
        labels,
        ["embed", "layers 0-2 attention", "layer 0 expert 0 - layer 1 expert 1", "layer 1 expert 2 - layer 2 expert 3"],
        "{table}"
    );
    assert!(table.lines().nth(5).unwrap().contains("disk"), "{table}");
    // Streamed experts are read on demand into a cache of twice a token's experts (k = 2 here),
    // each counted at its size in the pack (page-aligned).
    assert_eq!(plan.ram.expert_cache, 2 * 2 * 4096);
    assert!(plan.stream_order.is_empty());
    assert!(
        table.starts_with(&format!(
            "strategy mine: experts read on demand into an expert cache of 16.4 KB (expected hit rate {rate:.2} under \
             uniform routing)"
        )),
        "{table}"
    );
}

/// Each unit is one read, timed at the disk's rate for a read of its size: with a profile whose
/// large reads are faster, TinyLlama's 36.8 MB FFNs and 8.7 MB attention blocks read faster.
#[test]
fn units_read_at_the_disks_rate_for_their_size() {
    let manifest = tinyllama();
    let slow = hardware();
    let fast = HardwareProfile { disk_read_large_gb_s: Some(4.0), ..hardware() };
    let plan = |hardware: &HardwareProfile| StreamAll.plan(&input(&manifest, hardware, None, Some(0))).unwrap();
    let (slow_plan, fast_plan) = (plan(&slow), plan(&fast));
    let expected: f64 = fast_plan
        .stream_order
        .iter()
        .map(|&i| manifest.units[i].bytes as f64 / (fast.disk_read_rate(manifest.units[i].bytes) * 1e9))
        .sum();
    let got = fast_plan.predicted.transfer_s;
    assert!((got - expected).abs() <= 1e-9 * expected, "{got} vs {expected}");
    assert!(got < slow_plan.predicted.transfer_s * 0.8, "{got} vs {}", slow_plan.predicted.transfer_s);
    assert!(fast.disk_read_rate(manifest.units[2].bytes) > 2.0 && fast.disk_read_rate(manifest.units[2].bytes) < 4.0);
}

/// Under a RAM budget, experts on disk get the RAM the rest of the plan leaves: a larger budget
/// holds more experts, reads less and predicts a faster token, until everything fits. (Before,
/// the cache stayed at twice a token's experts, and the rest of the budget went unused.)
#[test]
fn the_expert_cache_takes_the_ram_the_budget_leaves() {
    const EXPERT: u64 = 1 << 20;
    let make = |name: String, kind, bytes: u64, per_token: u64| UnitInfo {
        name,
        kind,
        bytes,
        dtype: "q8_0".into(),
        bytes_per_token: per_token,
    };
    let mut units = vec![make("embed".into(), UnitKind::Embedding, 1 << 16, 64)];
    for layer in 0..4 {
        units.push(make(format!("{layer}.attn"), UnitKind::Attention { layer }, 1 << 18, 1 << 18));
        units.push(make(format!("{layer}.ffn"), UnitKind::Ffn { layer }, 1 << 12, 1 << 12));
        for expert in 0..8 {
            // k = 2 of 8: a quarter of an expert per token.
            units.push(make(format!("{layer}.e{expert}"), UnitKind::Expert { layer, expert }, EXPERT, EXPERT / 4));
        }
    }
    units.push(make("head".into(), UnitKind::Head, 1 << 16, 1 << 16));
    let manifest = WeightManifest { units, n_layers: 4, kv_bytes_per_token: 16, activation_bytes_per_token: 16 };
    let hardware = hardware();
    let unlimited = input(&manifest, &hardware, None, None);
    let all_resident = AllResident.plan(&unlimited).unwrap();
    let rest = all_resident.ram.total - 32 * EXPERT;
    let mut previous: Option<Plan> = None;
    for held in [1u64, 2, 4, 8, 16, 24, 31] {
        let budget = PlanInput { budgets: TierBudgets { vram: None, ram: Some(rest + held * EXPERT) }, ..unlimited };
        let plan = CostModel.plan(&budget).unwrap();
        check(&plan, &budget);
        let table = plan.to_table(&manifest);
        assert!(plan.ram.expert_cache >= held * EXPERT, "{held}: {table}");
        assert!(plan.ram.total + EXPERT > rest + held * EXPERT, "{held}: RAM left unused\n{table}");
        let rate = plan.expected_expert_hit_rate.unwrap();
        if let Some(previous) = &previous {
            assert!(plan.predicted.total_s < previous.predicted.total_s, "{held}: {table}");
            assert!(plan.bytes_streamed_per_token < previous.bytes_streamed_per_token, "{held}: {table}");
            assert!(rate > previous.expected_expert_hit_rate.unwrap(), "{held}: {table}");
        }
        previous = Some(plan);
    }
    // Under uniform routing, an LRU cache of half the experts hits about half the time.
    let half = PlanInput { budgets: TierBudgets { vram: None, ram: Some(rest + 16 * EXPERT) }, ..unlimited };
    let rate = CostModel.plan(&half).unwrap().expected_expert_hit_rate.unwrap();
    assert!((0.4..0.65).contains(&rate), "{rate}");
    // With room for every expert, nothing is read.
    let everything = PlanInput { budgets: TierBudgets { vram: None, ram: Some(all_resident.ram.total) }, ..unlimited };
    let plan = CostModel.plan(&everything).unwrap();
    assert_eq!(plan.bytes_streamed_per_token, 0, "{}", plan.to_table(&manifest));
    // A budget below one expert's room is refused, naming the one-expert cache it would need.
    let short = PlanInput { budgets: TierBudgets { vram: None, ram: Some(rest) }, ..unlimited };
    let (needed, _, what) = does_not_fit(CostModel.plan(&short));
    assert!(what.contains("expert cache 1.05 MB"), "{what}");
    let enough = PlanInput { budgets: TierBudgets { vram: None, ram: Some(needed) }, ..unlimited };
    check(&CostModel.plan(&enough).unwrap(), &enough);
}

/// `--expert-cache` puts every expert in the cache, whatever the strategy; a cache that holds
/// no expert is refused.
#[test]
fn an_expert_cache_takes_every_expert_whatever_the_strategy() {
    let make = |name: String, kind, bytes| UnitInfo { name, kind, bytes, dtype: "f32".into(), bytes_per_token: bytes };
    let mut units = vec![make("embed".into(), UnitKind::Embedding, 1000)];
    for layer in 0..2 {
        units.push(make(format!("{layer}.attn"), UnitKind::Attention { layer }, 3000));
        units.push(make(format!("{layer}.ffn"), UnitKind::Ffn { layer }, 500));
        for expert in 0..4 {
            units.push(make(format!("{layer}.e{expert}"), UnitKind::Expert { layer, expert }, 5000 + expert as u64));
        }
    }
    let manifest = WeightManifest { units, n_layers: 2, kv_bytes_per_token: 64, activation_bytes_per_token: 256 };
    let hardware = hardware();
    let cache = 3 * 8192;
    let with_cache = PlanInput { expert_cache: Some(cache), ..input(&manifest, &hardware, None, None) };
    for strategy in strategies() {
        let plan = strategy.plan(&with_cache).unwrap();
        check(&plan, &with_cache);
        for (u, p) in manifest.units.iter().zip(&plan.placements) {
            if matches!(u.kind, UnitKind::Expert { .. }) {
                assert_eq!(p.tier, Tier::Disk, "{}: {}", plan.strategy, u.name);
            }
        }
        assert_eq!(plan.ram.expert_cache, cache, "{}", plan.strategy);
    }
    // The experts' reads wait for their routers, so streaming other units in front of them
    // hides nothing: with RAM to spare, the cost model keeps everything else resident.
    let plan = CostModel.plan(&with_cache).unwrap();
    assert!(plan.stream_order.is_empty(), "{}", plan.to_table(&manifest));
    let p = plan.predicted;
    assert!((p.total_s - (p.compute_s + p.transfer_s)).abs() <= 1e-12 * p.total_s, "{p:?}");
    // Under a RAM budget the cache counts with the rest.
    let tight = PlanInput { budgets: TierBudgets { vram: None, ram: Some(1) }, ..with_cache };
    let (needed, _, what) = does_not_fit(CostModel.plan(&tight));
    assert!(what.contains("expert cache 24.6 KB"), "{what}");
    let budget = PlanInput { budgets: TierBudgets { vram: None, ram: Some(needed) }, ..with_cache };
    let plan = CostModel.plan(&budget).unwrap();
    check(&plan, &budget);
    assert_eq!(plan.ram.total, needed);
    let small = PlanInput { expert_cache: Some(8191), ..with_cache };
    match AllResident.plan(&small) {
        Err(PlanError::InvalidPlacement { reason }) => {
            assert!(
                reason.contains("an expert cache of 8.19 KB (8191 bytes) holds no expert: 0.e0 takes 8192 bytes"),
                "{reason}"
            )
        }
        other => panic!("expected InvalidPlacement, got {other:?}"),
    }
}

/// The embedding is mapped only when the model has its own head: a tied head reads the whole
/// table every token, so there it stays in RAM at its full size.
#[test]
fn the_embedding_is_mapped_only_beside_a_separate_head() {
    let hardware = hardware();
    let separate = tinyllama();
    let mut tied = tinyllama();
    tied.units.retain(|u| u.kind != UnitKind::Head);
    for (manifest, tier) in [(&separate, Tier::Mapped), (&tied, Tier::Ram)] {
        let input = input(manifest, &hardware, None, None);
        for strategy in strategies() {
            let plan = strategy.plan(&input).unwrap();
            check(&plan, &input);
            assert_eq!(plan.tier_of(0), tier, "{}", plan.to_table(manifest));
        }
    }
    // Mapped, the embedding counts the pages 2,048 tokens can touch: two per 2,176-byte row.
    let plan = AllResident.plan(&input(&separate, &hardware, None, None)).unwrap();
    let tied_plan = AllResident.plan(&input(&tied, &hardware, None, None)).unwrap();
    let head = separate.units.last().unwrap().bytes;
    assert_eq!(
        plan.ram.resident_weights - head,
        tied_plan.ram.resident_weights - separate.units[0].bytes + 2048 * 8192 + (1 << 20)
    );
}

/// What the process holds outside the plan counts against the budget: the cost model keeps
/// fewer weights resident, and a shortfall names it.
#[test]
fn the_process_itself_counts_against_the_budget() {
    let manifest = tinyllama();
    let hardware = hardware();
    let budget = manifest.total_bytes() / 3;
    let bare = input(&manifest, &hardware, Some(budget), None);
    let process_ram = 50_000_000;
    let with_process = PlanInput { process_ram, ..input(&manifest, &hardware, Some(budget), None) };
    let (a, b) = (CostModel.plan(&bare).unwrap(), CostModel.plan(&with_process).unwrap());
    check(&a, &bare);
    check(&b, &with_process);
    assert_eq!(b.ram.process, process_ram);
    assert!(b.ram.resident_weights < a.ram.resident_weights, "{}", b.to_table(&manifest));
    assert!(b.to_table(&manifest).contains(", process 50 MB"), "{}", b.to_table(&manifest));
    let tiny =
        PlanInput { budgets: TierBudgets { vram: None, ram: Some(parse_size("150MB").unwrap()) }, ..with_process };
    let (_, _, what) = does_not_fit(CostModel.plan(&tiny));
    assert!(what.contains("the process itself 50 MB"), "{what}");
}
