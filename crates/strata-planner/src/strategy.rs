//! Placement strategies: the `PlacementStrategy` trait, the four built-in strategies, and the
//! accounting every strategy shares (`PlanInput::assemble`: memory per tier, the staging ring,
//! the predicted time per token and the budget check).
//!
//! A strategy only chooses which units are streamed and the prefetch depth; `assemble` turns
//! that choice into a `Plan` or a `DoesNotFit` error that says what the choice needs. So a new
//! strategy is a type implementing the trait, not an edit of the accounting.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

use crate::error::PlanError;
use crate::expert_cache::{CacheSimulation, LruHitCurve, uniform_routing_trace};
use crate::hardware::{HardwareProfile, TierBudgets, Workload};
use crate::manifest::{UnitKind, WeightManifest};
use crate::plan::{MemoryUse, Placement, Plan, Tier, TokenTime};
use crate::size::format_size;
use crate::timing::{Ratio, Stage, cycle_time, picoseconds, seconds};

/// The names `strategy_by_name` knows, in the order error messages list them.
pub const STRATEGY_NAMES: [&str; 4] = ["all-resident", "stream-all", "pin-attention", "cost-model"];

/// The strategy used when the user names none.
pub const DEFAULT_STRATEGY: &str = "cost-model";

/// The deepest prefetch the cost model tries when the user fixes no depth.
pub const MAX_AUTO_PREFETCH_DEPTH: usize = 4;

/// The deepest prefetch the planner models (a user's depth above it is an error).
pub const MAX_PREFETCH_DEPTH: usize = 64;

/// The default prefetch depth of `pin-attention`.
pub const PIN_ATTENTION_DEPTH: usize = 2;

/// Without a RAM budget, the default expert cache holds this many times a token's experts per
/// layer (the experts of one layer, and as many again that the next tokens may reuse).
pub const DEFAULT_EXPERT_CACHE_FACTOR: usize = 2;

/// Tokens of uniform routing whose expert cache hits the planner counts (after a warm-up in
/// which every expert is likely to be touched once).
pub const EXPERT_TRACE_TOKENS: usize = 256;

/// The seed of the planner's uniform routing trace.
const EXPERT_TRACE_SEED: u64 = 0x5eed_e8e7;

/// Everything a strategy plans from.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// The model's weight units and per-token memory.
    pub manifest: &'a WeightManifest,
    /// The memory each tier may hold.
    pub budgets: TierBudgets,
    /// The machine's measured rates.
    pub hardware: &'a HardwareProfile,
    /// The request shape: context reserved in the KV cache, largest forward chunk.
    pub workload: Workload,
    /// The user's `--prefetch-layers`; `None` lets the strategy decide.
    pub prefetch_depth: Option<usize>,
    /// RAM the process holds outside the plan (its code and libraries, heap, per-thread
    /// scratch), counted against the RAM budget with the rest.
    pub process_ram: u64,
    /// The user's `--expert-cache`: every expert unit is read on demand into an expert cache of
    /// this many bytes, whatever the strategy. `None`: experts stay resident or are read on
    /// demand as the strategy chooses, and those on disk get a cache of every byte the RAM
    /// budget leaves (at least one expert, at most all of them), or without a budget
    /// [`DEFAULT_EXPERT_CACHE_FACTOR`] times `experts_per_token` experts.
    pub expert_cache: Option<u64>,
    /// Experts a MoE layer runs per token (0 for a dense model): sizes the default expert cache
    /// and the uniform routing trace its expected hit rate is measured on.
    pub experts_per_token: usize,
    /// The expert cache's eviction policy, by name (`EXPERT_CACHE_POLICIES`): `lru` is expected
    /// to hit as its replay of uniform routing says (`LruHitCurve`), the others, which keep
    /// each layer a share of the cache, in proportion to the experts the cache holds.
    pub expert_cache_policy: &'a str,
}

impl PlanInput<'_> {
    /// Turns a strategy's choice into a plan: `streamed[i]` says whether unit `i` is streamed
    /// from disk (the others stay in RAM), and `prefetch_depth` how far ahead the ring loads.
    /// The depth is capped at one less than the number of streamed units (a ring never has more
    /// buffers than streamed units) and is 0 when nothing is streamed.
    ///
    /// Fails if the manifest or hardware profile is invalid, if the depth is above
    /// `MAX_PREFETCH_DEPTH`, if `streamed` does not have one
    /// entry per unit or streams an embedding or `Other` unit, or if the plan needs more RAM
    /// than the budget (the error says how much, of what).
    pub fn assemble(&self, strategy: &str, streamed: &[bool], prefetch_depth: usize) -> Result<Plan, PlanError> {
        let context = Context::new(self)?;
        let candidate = context.evaluate(strategy, streamed, prefetch_depth)?;
        context.check_budget(&candidate)?;
        Ok(candidate.plan)
    }
}

/// A placement policy: given the model, the budgets and the machine, where each unit lives.
pub trait PlacementStrategy {
    /// The strategy's name, as `--strategy` spells it.
    fn name(&self) -> &'static str;
    /// Makes a plan, or says why none fits.
    fn plan(&self, input: &PlanInput) -> Result<Plan, PlanError>;
}

/// Everything resident in RAM; nothing streamed. Fails if RAM is short.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllResident;

/// Every unit but the embedding (and `Other` units) streamed, on demand unless the user gives a
/// prefetch depth: the synchronous baseline that offloading hooks in other frameworks use.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamAll;

/// The embedding, attention blocks (with their norms), head and KV cache resident; the FFNs and
/// experts streamed with prefetch depth 2 unless the user gives one.
#[derive(Debug, Clone, Copy, Default)]
pub struct PinAttention;

/// Chooses the resident set and the prefetch depth (0 to 4, or the user's) that minimise the
/// predicted time per token within the RAM budget.
///
/// For each depth it tries every staging buffer size `s` among the unit sizes: units larger
/// than `s` must be resident; the RAM left after the KV cache, activations and the ring is
/// filled greedily with the largest remaining units (a streamed byte costs the same transfer
/// time wherever it is, so resident bytes are what count; among units of one size the resident
/// ones are spread evenly over the layers, which leaves compute between the streamed ones to
/// hide their loads). Experts on disk are read on demand into the expert cache, which takes the
/// RAM left over: the fill never makes an expert resident, because a cache slot adapts to the
/// router where a pinned expert is an arbitrary pick, and under uniform routing a slot of the
/// layer-aware default policy hits as often (a plain LRU's, less). It also tries the all-resident, stream-all and pin-attention layouts, so
/// it never predicts slower than those under the same budget and depth. The fastest candidate
/// wins; ties go to fewer streamed bytes, then less RAM, then the shallower depth, then the
/// first tried, so the same input always gives the same plan.
#[derive(Debug, Clone, Copy, Default)]
pub struct CostModel;

/// The strategy of the given name (one of `STRATEGY_NAMES`).
pub fn strategy_by_name(name: &str) -> Result<Box<dyn PlacementStrategy>, PlanError> {
    match name {
        "all-resident" => Ok(Box::new(AllResident)),
        "stream-all" => Ok(Box::new(StreamAll)),
        "pin-attention" => Ok(Box::new(PinAttention)),
        "cost-model" => Ok(Box::new(CostModel)),
        _ => Err(PlanError::UnknownStrategy { name: name.to_string(), known: STRATEGY_NAMES.join(", ") }),
    }
}

impl PlacementStrategy for AllResident {
    fn name(&self) -> &'static str {
        "all-resident"
    }

    fn plan(&self, input: &PlanInput) -> Result<Plan, PlanError> {
        let context = Context::new(input)?;
        let streamed = vec![false; input.manifest.units.len()];
        context.fixed_layout(self.name(), &streamed, 0)
    }
}

impl PlacementStrategy for StreamAll {
    fn name(&self) -> &'static str {
        "stream-all"
    }

    fn plan(&self, input: &PlanInput) -> Result<Plan, PlanError> {
        let context = Context::new(input)?;
        context.fixed_layout(self.name(), &context.stream_all(), input.prefetch_depth.unwrap_or(0))
    }
}

impl PlacementStrategy for PinAttention {
    fn name(&self) -> &'static str {
        "pin-attention"
    }

    fn plan(&self, input: &PlanInput) -> Result<Plan, PlanError> {
        let context = Context::new(input)?;
        let depth = input.prefetch_depth.unwrap_or(PIN_ATTENTION_DEPTH);
        context.fixed_layout(self.name(), &context.pin_attention(), depth)
    }
}

impl PlacementStrategy for CostModel {
    fn name(&self) -> &'static str {
        "cost-model"
    }

    fn plan(&self, input: &PlanInput) -> Result<Plan, PlanError> {
        let context = Context::new(input)?;
        let search = context.search(self.name())?;
        match search.best {
            Some(best) => Ok(best.plan),
            None => Err(context.shortfall(&search.smallest, None)),
        }
    }
}

/// A plan before the budget check, with its exact time per token.
#[derive(Debug, Clone)]
struct Candidate {
    plan: Plan,
    time: Ratio,
    /// Bytes of units that are always resident (embedding and `Other`).
    pinned_bytes: u64,
}

/// The expert cache of a layout: its bytes, and its expected hits under uniform routing.
#[derive(Debug, Clone, Copy)]
struct ExpertCache {
    bytes: u64,
    expected: CacheSimulation,
}

impl ExpertCache {
    /// No expert read on demand.
    const NONE: ExpertCache = ExpertCache { bytes: 0, expected: CacheSimulation { hits: 0, misses: 0 } };

    /// The expected missed part of `value` (all of it when no access was counted).
    fn misses_of(&self, value: i128) -> i128 {
        match self.expected.accesses() {
            0 => value,
            accesses => value.saturating_mul(i128::from(self.expected.misses)) / i128::from(accesses),
        }
    }
}

/// The outcome of the cost model's search.
struct Search {
    /// The best candidate within the budget.
    best: Option<Candidate>,
    /// The candidate that needs the least RAM, for error messages.
    smallest: Candidate,
}

/// The input, validated, with per-unit times worked out once.
struct Context<'a> {
    input: &'a PlanInput<'a>,
    /// All units in execution order.
    order: Vec<usize>,
    /// Per unit: the time to compute it, in picoseconds.
    compute_ps: Vec<i128>,
    /// Per unit: the time to read it from disk if streamed, in picoseconds.
    transfer_ps: Vec<i128>,
    /// Per unit: the bytes read from disk per token if streamed (an expert's expected share).
    stream_bytes: Vec<u64>,
    /// Per unit: whether it is memory-mapped rather than read whole when not streamed.
    mapped: Vec<bool>,
    /// Per unit: the RAM it holds when not streamed (a mapped unit: the pages the workload can
    /// touch).
    ram_bytes: Vec<u64>,
    kv_cache: u64,
    activations: u64,
    /// Per MoE layer, in execution order: its expert units.
    expert_layers: Vec<Vec<usize>>,
    /// The LRU hit curves of uniform routing, by the (experts, on-demand experts) of each MoE
    /// layer: candidates with the same counts share one.
    hit_curves: RefCell<HashMap<Vec<(usize, usize)>, LruHitCurve>>,
}

/// The page size RAM is charged in for mapped units.
pub const PAGE_BYTES: u64 = 4096;

/// What a mapped unit may hold in RAM besides the rows a workload touches (the final norm
/// packed with the embedding, say).
pub const MAPPED_SLACK_BYTES: u64 = 1 << 20;

/// The RAM a mapped unit can come to hold over `context_tokens` tokens, each reading
/// `row_bytes` of it: every row's pages (a row may straddle one more page than its length
/// needs) plus [`MAPPED_SLACK_BYTES`], at most the whole unit. A plan counts this for a unit in
/// [`Tier::Mapped`].
pub fn mapped_ram(unit_bytes: u64, row_bytes: u64, context_tokens: usize) -> u64 {
    let row_pages = row_bytes.div_ceil(PAGE_BYTES) + 1;
    (context_tokens as u64).saturating_mul(row_pages * PAGE_BYTES).saturating_add(MAPPED_SLACK_BYTES).min(unit_bytes)
}

fn checked_product(a: u64, b: usize, what: &str) -> Result<u64, PlanError> {
    a.checked_mul(b as u64).ok_or_else(|| PlanError::Overflow { what: what.to_string() })
}

fn checked_sum(values: impl IntoIterator<Item = u64>, what: &str) -> Result<u64, PlanError> {
    values
        .into_iter()
        .try_fold(0u64, |sum, v| sum.checked_add(v))
        .ok_or_else(|| PlanError::Overflow { what: what.to_string() })
}

impl<'a> Context<'a> {
    fn new(input: &'a PlanInput<'a>) -> Result<Context<'a>, PlanError> {
        let manifest = input.manifest;
        manifest.validate()?;
        input.hardware.validate()?;
        let hardware = input.hardware;
        let compute_ps =
            manifest.units.iter().map(|u| picoseconds(u.bytes_per_token, hardware.matvec_rate(&u.dtype))).collect();
        let stream_bytes: Vec<u64> = manifest
            .units
            .iter()
            .map(|u| if matches!(u.kind, UnitKind::Expert { .. }) { u.bytes_per_token } else { u.bytes })
            .collect();
        // A unit is read whole, at the disk's rate for a read of its size.
        let transfer_ps = manifest
            .units
            .iter()
            .zip(&stream_bytes)
            .map(|(u, &b)| picoseconds(b, hardware.disk_read_rate(u.bytes)))
            .collect();
        // The embedding is mapped when the model has its own output head (a tied head reads the
        // whole table every token, so it stays resident).
        let has_head = manifest.units.iter().any(|u| u.kind == UnitKind::Head);
        let mapped: Vec<bool> = manifest.units.iter().map(|u| has_head && u.kind == UnitKind::Embedding).collect();
        let context_tokens = input.workload.context_tokens;
        let ram_bytes = manifest
            .units
            .iter()
            .zip(&mapped)
            .map(|(u, &m)| if m { mapped_ram(u.bytes, u.bytes_per_token, context_tokens) } else { u.bytes })
            .collect();
        let order = manifest.execution_order();
        let mut by_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for &i in &order {
            if let UnitKind::Expert { layer, .. } = manifest.units[i].kind {
                by_layer.entry(layer).or_default().push(i);
            }
        }
        Ok(Context {
            input,
            order,
            compute_ps,
            transfer_ps,
            stream_bytes,
            mapped,
            ram_bytes,
            kv_cache: checked_product(manifest.kv_bytes_per_token, input.workload.context_tokens, "the KV cache")?,
            activations: checked_product(
                manifest.activation_bytes_per_token,
                input.workload.batch_tokens,
                "the activations",
            )?,
            expert_layers: by_layer.into_values().collect(),
            hit_curves: RefCell::new(HashMap::new()),
        })
    }

    fn units(&self) -> &[crate::manifest::UnitInfo] {
        &self.input.manifest.units
    }

    fn stream_all(&self) -> Vec<bool> {
        self.units().iter().map(|u| u.kind.is_streamable()).collect()
    }

    fn pin_attention(&self) -> Vec<bool> {
        self.units().iter().map(|u| matches!(u.kind, UnitKind::Ffn { .. } | UnitKind::Expert { .. })).collect()
    }

    /// Plans a layout a fixed strategy chose, with the budget check; a shortfall also says what
    /// the cost model would need at least, when that is less.
    fn fixed_layout(&self, strategy: &str, streamed: &[bool], depth: usize) -> Result<Plan, PlanError> {
        let candidate = self.evaluate(strategy, streamed, depth)?;
        if self.fits(&candidate) {
            return Ok(candidate.plan);
        }
        let search = self.search(CostModel.name())?;
        let hint =
            (search.smallest.plan.ram.total < candidate.plan.ram.total).then_some(search.smallest.plan.ram.total);
        Err(self.shortfall(&candidate, hint))
    }

    fn fits(&self, candidate: &Candidate) -> bool {
        self.input.budgets.ram.is_none_or(|budget| candidate.plan.ram.total <= budget)
    }

    fn check_budget(&self, candidate: &Candidate) -> Result<(), PlanError> {
        if self.fits(candidate) { Ok(()) } else { Err(self.shortfall(candidate, None)) }
    }

    /// The `DoesNotFit` error for a candidate over the RAM budget: what it needs, of what, and
    /// how short the budget is; `cost_model_minimum` adds what the cost model would need.
    fn shortfall(&self, candidate: &Candidate, cost_model_minimum: Option<u64>) -> PlanError {
        let plan = &candidate.plan;
        let budget = self.input.budgets.ram.unwrap_or(u64::MAX);
        let ram = &plan.ram;
        let mut parts = Vec::new();
        let pinned = candidate.pinned_bytes;
        if pinned > 0 {
            parts.push(format!("embedding {}", format_size(pinned)));
        }
        if ram.resident_weights > pinned {
            parts.push(format!("resident weights {}", format_size(ram.resident_weights - pinned)));
        }
        parts.push(format!("KV cache {}", format_size(ram.kv_cache)));
        parts.push(format!("activations {}", format_size(ram.activations)));
        if plan.staging_buffers > 0 {
            parts.push(format!(
                "{} staging buffer{} of {}",
                plan.staging_buffers,
                if plan.staging_buffers == 1 { "" } else { "s" },
                format_size(plan.staging_buffer_bytes)
            ));
        }
        if ram.expert_cache > 0 {
            parts.push(format!("expert cache {}", format_size(ram.expert_cache)));
        }
        if ram.process > 0 {
            parts.push(format!("the process itself {}", format_size(ram.process)));
        }
        let mut what = format!(
            "the {} plan needs at least {} of RAM ({}); the RAM budget of {} is {} short",
            plan.strategy,
            format_size(ram.total),
            parts.join(", "),
            format_size(budget),
            format_size(ram.total.saturating_sub(budget))
        );
        if let Some(minimum) = cost_model_minimum {
            what.push_str(&format!("; the cost-model strategy needs at least {}", format_size(minimum)));
        }
        PlanError::DoesNotFit { strategy: plan.strategy.clone(), needed: ram.total, budget, tier: Tier::Ram, what }
    }

    /// Memory and time of a layout, without the budget check.
    fn evaluate(&self, strategy: &str, streamed: &[bool], depth: usize) -> Result<Candidate, PlanError> {
        let units = self.units();
        if depth > MAX_PREFETCH_DEPTH {
            return Err(PlanError::PrefetchTooDeep { depth, max: MAX_PREFETCH_DEPTH });
        }
        if streamed.len() != units.len() {
            return Err(PlanError::InvalidPlacement {
                reason: format!("{} placements for a manifest of {} units", streamed.len(), units.len()),
            });
        }
        if let Some(unit) = units.iter().zip(streamed).find(|(u, s)| **s && !u.kind.is_streamable()).map(|(u, _)| u) {
            return Err(PlanError::InvalidPlacement {
                reason: format!("unit {:?} is an embedding or `Other` unit, which stay resident", unit.name),
            });
        }
        // Experts are read when their router picks them, into the expert cache: not in the
        // cyclic stream order, not through the staging ring.
        let forced: Vec<bool>;
        let streamed = if self.input.expert_cache.is_some() {
            forced = units.iter().zip(streamed).map(|(u, &s)| s || matches!(u.kind, UnitKind::Expert { .. })).collect();
            &forced
        } else {
            streamed
        };
        let is_expert = |i: usize| matches!(units[i].kind, UnitKind::Expert { .. });
        let stream_order: Vec<usize> = self.order.iter().copied().filter(|&i| streamed[i] && !is_expert(i)).collect();
        let cached: Vec<usize> = self.order.iter().copied().filter(|&i| streamed[i] && is_expert(i)).collect();
        let streamed_count = stream_order.len();
        let prefetch_depth = if streamed_count == 0 { 0 } else { depth.min(streamed_count - 1) };
        let staging_buffers = if streamed_count == 0 { 0 } else { prefetch_depth + 1 };
        let staging_buffer_bytes = stream_order.iter().map(|&i| units[i].bytes).max().unwrap_or(0);
        let staging = checked_product(staging_buffer_bytes, staging_buffers, "the staging ring")?;
        let resident = (0..units.len()).filter(|&i| !streamed[i]).map(|i| self.ram_bytes[i]);
        let resident_weights = checked_sum(resident, "the resident weights")?;
        let pinned_bytes = checked_sum(
            (0..units.len()).filter(|&i| !units[i].kind.is_streamable()).map(|i| self.ram_bytes[i]),
            "the embedding and other resident units",
        )?;
        let process = self.input.process_ram;
        let rest = checked_sum([resident_weights, self.kv_cache, self.activations, staging, process], "the RAM total")?;
        let cache = self.expert_cache(&cached, rest)?;
        let expert_cache = cache.bytes;
        let total = checked_sum([rest, expert_cache], "the RAM total")?;
        let ram = MemoryUse {
            resident_weights,
            kv_cache: self.kv_cache,
            activations: self.activations,
            staging,
            expert_cache,
            process,
            total,
        };
        let placements = (0..units.len())
            .map(|unit| {
                let tier = if streamed[unit] {
                    Tier::Disk
                } else if self.mapped[unit] {
                    Tier::Mapped
                } else {
                    Tier::Ram
                };
                Placement { unit, tier }
            })
            .collect();
        let compute: i128 = self.compute_ps.iter().fold(0i128, |sum, &t| sum.saturating_add(t));
        // An expert on disk reads its expected share per token, times the expected misses of the
        // cache under uniform routing.
        let ordered_ps: i128 = stream_order.iter().fold(0i128, |sum, &i| sum.saturating_add(self.transfer_ps[i]));
        let experts_ps = cache.misses_of(cached.iter().fold(0i128, |sum, &i| sum.saturating_add(self.transfer_ps[i])));
        let transfer = ordered_ps.saturating_add(experts_ps);
        // Units in the stream order load ahead of their use; an expert's read starts only once
        // its router has run, so its time is added (the model does not count the overlap of a
        // layer's later reads with its earlier experts' compute).
        let time = if streamed_count == 0 {
            Ratio::whole(compute)
        } else {
            let ordered: Vec<bool> = (0..units.len()).map(|i| streamed[i] && !is_expert(i)).collect();
            cycle_time(&self.stages(&ordered), prefetch_depth)
        }
        .plus(experts_ps);
        let experts_bytes = cached.iter().fold(0u64, |sum, &i| sum.saturating_add(self.stream_bytes[i]));
        let bytes_streamed_per_token = stream_order
            .iter()
            .fold(0u64, |sum, &i| sum.saturating_add(self.stream_bytes[i]))
            .saturating_add(u64::try_from(cache.misses_of(i128::from(experts_bytes))).unwrap_or(u64::MAX));
        let plan = Plan {
            strategy: strategy.to_string(),
            placements,
            stream_order,
            prefetch_depth,
            staging_buffers,
            staging_buffer_bytes,
            budgets: self.input.budgets,
            ram,
            vram: MemoryUse::default(),
            bytes_streamed_per_token,
            expected_expert_hit_rate: (!cached.is_empty()).then(|| cache.expected.hit_rate()),
            predicted: TokenTime {
                compute_s: seconds(compute),
                transfer_s: seconds(transfer),
                total_s: time.seconds(),
            },
        };
        Ok(Candidate { plan, time, pinned_bytes })
    }

    /// The expert cache of a layout whose on-demand experts are `cached`, when the rest of the
    /// plan takes `rest` bytes of RAM: the user's size (which must hold the largest expert), or
    /// what the RAM budget leaves (at least one expert, at most all of them), or without a budget
    /// [`DEFAULT_EXPERT_CACHE_FACTOR`] times a token's experts; in whole experts of the largest
    /// size, each counted as the pack stores it, rounded up to [`PAGE_BYTES`]. Nothing when no
    /// expert is read on demand.
    fn expert_cache(&self, cached: &[usize], rest: u64) -> Result<ExpertCache, PlanError> {
        let units = self.units();
        // The pack stores each unit on page boundaries, and a cache buffer holds a whole one.
        let Some(largest) = cached.iter().map(|&i| units[i].bytes.next_multiple_of(PAGE_BYTES)).max() else {
            return Ok(ExpertCache::NONE);
        };
        let (bytes, slots) = match (self.input.expert_cache, self.input.budgets.ram) {
            (Some(bytes), _) if bytes < largest => {
                let name = cached
                    .iter()
                    .find(|&&i| units[i].bytes.next_multiple_of(PAGE_BYTES) == largest)
                    .map_or("", |&i| units[i].name.as_str());
                return Err(PlanError::InvalidPlacement {
                    reason: format!(
                        "an expert cache of {} ({bytes} bytes) holds no expert: {name} takes {largest} bytes in the \
                         offload pack",
                        format_size(bytes)
                    ),
                });
            }
            (Some(bytes), _) => (bytes, usize::try_from(bytes / largest).unwrap_or(usize::MAX)),
            (None, budget) => {
                let slots = match budget {
                    Some(budget) => usize::try_from(budget.saturating_sub(rest) / largest).unwrap_or(usize::MAX),
                    None => DEFAULT_EXPERT_CACHE_FACTOR.saturating_mul(self.input.experts_per_token),
                };
                let slots = slots.clamp(1, cached.len());
                (checked_product(largest, slots, "the expert cache")?, slots)
            }
        };
        Ok(ExpertCache { bytes, expected: self.expected_hits(cached, slots) })
    }

    /// The hits and misses an expert cache of `slots` experts is expected to have when the
    /// experts `cached` are read on demand and every token routes uniformly (a cache that holds
    /// every one of them hits always). For `lru`, replayed on [`EXPERT_TRACE_TOKENS`] tokens
    /// after a warm-up in which each expert is touched with probability about 1 - e^-4: in
    /// layers visited in a cycle it never hits with fewer slots than a token's experts over all
    /// layers. The other policies keep each layer a share of the slots, which hits in
    /// proportion: `slots` of every `cached.len()` accesses (`LayerLru`'s test checks this).
    fn expected_hits(&self, cached: &[usize], slots: usize) -> CacheSimulation {
        let mut on_disk = vec![false; self.units().len()];
        for &i in cached {
            on_disk[i] = true;
        }
        let key: Vec<(usize, usize)> = self
            .expert_layers
            .iter()
            .map(|layer| (layer.len(), layer.iter().filter(|&&i| on_disk[i]).count()))
            .collect();
        // A cache that holds them all misses only while it warms up.
        let on_demand: usize = key.iter().map(|&(_, on_demand)| on_demand).sum();
        if slots >= on_demand {
            return CacheSimulation { hits: 1, misses: 0 };
        }
        if self.input.expert_cache_policy != "lru" {
            return CacheSimulation { hits: slots as u64, misses: (on_demand - slots) as u64 };
        }
        let k = self.input.experts_per_token;
        let mut curves = self.hit_curves.borrow_mut();
        let curve = curves.entry(key).or_insert_with_key(|layers| {
            let widest = layers.iter().map(|&(experts, _)| experts).max().unwrap_or(0);
            let warm_up = (4 * widest).div_ceil(k.max(1)).clamp(16, 1024);
            let trace = uniform_routing_trace(layers, k, warm_up + EXPERT_TRACE_TOKENS, EXPERT_TRACE_SEED);
            LruHitCurve::replay(&trace, warm_up * layers.len())
        });
        curve.with_slots(slots)
    }

    /// The pipeline stages of a layout with at least one streamed unit: each streamed unit with
    /// its transfer time and the compute from its start to the next streamed unit's start.
    fn stages(&self, streamed: &[bool]) -> Vec<Stage> {
        let positions: Vec<usize> = (0..self.order.len()).filter(|&p| streamed[self.order[p]]).collect();
        let n = self.order.len();
        positions
            .iter()
            .enumerate()
            .map(|(k, &p)| {
                let next = positions[(k + 1) % positions.len()];
                let span = if next > p { next - p } else { next + n - p };
                let compute =
                    (0..span).fold(0i128, |sum, step| sum.saturating_add(self.compute_ps[self.order[(p + step) % n]]));
                Stage { transfer: self.transfer_ps[self.order[p]], compute }
            })
            .collect()
    }

    /// The cost model's search over depths and staging buffer sizes (see `CostModel`).
    fn search(&self, strategy: &str) -> Result<Search, PlanError> {
        let units = self.units();
        let depths: Vec<usize> = match self.input.prefetch_depth {
            Some(depth) => vec![depth],
            None => (0..=MAX_AUTO_PREFETCH_DEPTH).collect(),
        };
        let streamable: Vec<usize> = self.order.iter().copied().filter(|&i| units[i].kind.is_streamable()).collect();
        let priorities = [self.residency_priority(&streamable, false), self.residency_priority(&streamable, true)];
        let mut caps: Vec<u64> = streamable.iter().map(|&i| units[i].bytes).collect();
        caps.sort_unstable_by(|a, b| b.cmp(a));
        caps.dedup();

        let all_resident = self.evaluate(strategy, &vec![false; units.len()], 0)?;
        let mut best: Option<Candidate> = self.fits(&all_resident).then(|| all_resident.clone());
        let mut smallest = all_resident;
        let mut consider = |candidate: Candidate| {
            if candidate.plan.ram.total < smallest.plan.ram.total {
                smallest = candidate.clone();
            }
            if self.fits(&candidate) && best.as_ref().is_none_or(|b| better(&candidate, b)) {
                best = Some(candidate);
            }
        };
        for &depth in &depths {
            consider(self.evaluate(strategy, &self.stream_all(), depth)?);
            consider(self.evaluate(strategy, &self.pin_attention(), depth)?);
            for &cap in &caps {
                let forced = self.streamed_up_to(cap);
                consider(self.evaluate(strategy, &forced, depth)?);
                if let Some(budget) = self.input.budgets.ram {
                    for priority in &priorities {
                        let filled = self.fill(forced.clone(), cap, depth, budget, priority);
                        consider(self.evaluate(strategy, &filled, depth)?);
                    }
                }
            }
        }
        Ok(Search { best, smallest })
    }

    /// The streamed flags with every streamable unit no larger than `cap` streamed and the
    /// larger ones resident.
    fn streamed_up_to(&self, cap: u64) -> Vec<bool> {
        self.units().iter().map(|u| u.kind.is_streamable() && u.bytes <= cap).collect()
    }

    /// Makes resident, in `priority` order, every streamed unit but the experts that still fits
    /// in `budget` with a ring of `depth + 1` buffers of the largest streamed unit below `cap`
    /// (fewer when few units are left) and, when experts are read on demand, the smallest
    /// expert cache (the user's, or one expert), which `evaluate` then gives what is left.
    fn fill(&self, mut streamed: Vec<bool>, cap: u64, depth: usize, budget: u64, priority: &[usize]) -> Vec<bool> {
        let units = self.units();
        let is_expert = |i: usize| matches!(units[i].kind, UnitKind::Expert { .. });
        if self.input.expert_cache.is_some() {
            for i in (0..units.len()).filter(|&i| is_expert(i)) {
                streamed[i] = true;
            }
        }
        let on_demand: Vec<usize> = (0..units.len()).filter(|&i| streamed[i] && is_expert(i)).collect();
        let cache_floor = match self.input.expert_cache {
            _ if on_demand.is_empty() => 0,
            Some(bytes) => bytes,
            None => on_demand.iter().map(|&i| units[i].bytes.next_multiple_of(PAGE_BYTES)).max().unwrap_or(0),
        };
        let ring_unit =
            (0..units.len()).filter(|&i| streamed[i] && !is_expert(i)).map(|i| units[i].bytes.min(cap)).max();
        let ring_unit = ring_unit.unwrap_or(0);
        let ring =
            |count: usize| if count == 0 { 0 } else { (depth.min(count - 1) as u64 + 1).saturating_mul(ring_unit) };
        let mut count = (0..units.len()).filter(|&i| streamed[i] && !is_expert(i)).count();
        let mut used = (0..units.len()).filter(|&i| !streamed[i]).fold(
            self.kv_cache
                .saturating_add(self.activations)
                .saturating_add(self.input.process_ram)
                .saturating_add(cache_floor),
            |sum, i| sum.saturating_add(self.ram_bytes[i]),
        );
        for &i in priority {
            if !streamed[i] || is_expert(i) {
                continue;
            }
            let with_it = used.saturating_add(units[i].bytes);
            if with_it.saturating_add(ring(count - 1)) <= budget {
                streamed[i] = false;
                used = with_it;
                count -= 1;
            }
        }
        streamed
    }

    /// The order in which the cost model makes streamable units resident: the largest first;
    /// among units of one size, spread over the execution order (by bit-reversed rank), so that
    /// the streamed ones between them have resident compute to hide behind. The spread starts
    /// at the first unit of each size, or with `offset`, half-way through them (which keeps the
    /// first resident pick away from the head and embedding at the token's wrap).
    fn residency_priority(&self, streamable: &[usize], offset: bool) -> Vec<usize> {
        let units = self.units();
        let mut count_of_size: BTreeMap<u64, usize> = BTreeMap::new();
        for &i in streamable {
            *count_of_size.entry(units[i].bytes).or_insert(0) += 1;
        }
        let mut rank_of_size: BTreeMap<u64, usize> = BTreeMap::new();
        let mut keyed: Vec<(Reverse<u64>, u32, usize)> = Vec::with_capacity(streamable.len());
        for &i in streamable {
            let bytes = units[i].bytes;
            let rank = rank_of_size.entry(bytes).or_insert(0);
            let count = count_of_size[&bytes];
            let position = if offset { (*rank + count / 2) % count } else { *rank };
            // Ranks beyond 2^32 units of one size only lose the spread, not the determinism.
            keyed.push((Reverse(bytes), (position as u32).reverse_bits(), i));
            *rank += 1;
        }
        keyed.sort_unstable();
        keyed.into_iter().map(|(_, _, i)| i).collect()
    }
}

/// Whether `a` beats `b`: faster, then fewer streamed bytes, then less RAM, then shallower.
fn better(a: &Candidate, b: &Candidate) -> bool {
    let key = |c: &Candidate| (c.time, c.plan.bytes_streamed_per_token, c.plan.ram.total, c.plan.prefetch_depth);
    key(a) < key(b)
}
