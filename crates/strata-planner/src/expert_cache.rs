//! Eviction policies of the MoE expert cache, and a trace simulator to compare them.
//!
//! The expert store keeps a bounded set of expert units in RAM; the rest are read from the
//! offload pack when the router asks for them. An `ExpertCachePolicy` decides which cached
//! expert leaves when a missing one must come in. The policies here only see unit indices and
//! the order of accesses: they do no I/O and hold no weights. `simulate_expert_cache` replays a
//! routing trace against a policy and counts hits and misses, which is how the planner (and its
//! tests) compare policies without loading a model.

use std::collections::{BTreeSet, HashMap};

use crate::error::PlanError;

/// The names `expert_cache_policy_by_name` knows, in the order error messages list them.
pub const EXPERT_CACHE_POLICIES: &[&str] = &["lru", "lfu"];

/// The expert cache policy used when the user names none.
pub const DEFAULT_EXPERT_CACHE_POLICY: &str = "lru";

/// The eviction policy of the MoE expert cache; experts are identified by their unit index.
///
/// The store reports every access with `touched` and every eviction with `removed`, and asks
/// `victim` which cached expert to drop when it needs a slot. A policy must be deterministic:
/// the same calls give the same victims.
pub trait ExpertCachePolicy: Send + std::fmt::Debug {
    /// The policy's name, as `--expert-cache-policy` spells it.
    fn name(&self) -> &'static str;

    /// Records an access of `unit`, hit or miss. The store calls it once per expert per forward
    /// pass per layer, in access order.
    fn touched(&mut self, unit: usize);

    /// Records that `unit` left the cache. A policy may forget the unit's recency, but not
    /// statistics that describe the router rather than the cache (an LFU keeps its counts).
    fn removed(&mut self, unit: usize);

    /// Picks which of `candidates` (cached units that may be evicted now) to evict. Ties in the
    /// policy's own order go to the lowest unit index. Returns `None` only when `candidates` is
    /// empty.
    fn victim(&mut self, candidates: &[usize]) -> Option<usize>;
}

/// Least recently used: evicts the candidate touched longest ago (never touched counts as
/// oldest).
#[derive(Debug, Clone, Default)]
pub struct Lru {
    clock: u64,
    last_touch: HashMap<usize, u64>,
}

/// Least frequently used: evicts the candidate touched the fewest times, then the least recently
/// touched. Touch counts survive eviction: they are the router's statistics, not the cache's.
#[derive(Debug, Clone, Default)]
pub struct Lfu {
    /// The recency that breaks ties between equal counts.
    recency: Lru,
    touches: HashMap<usize, u64>,
}

impl Lru {
    /// When `unit` was last touched (0: never, or not since it was removed).
    fn last_touch(&self, unit: usize) -> u64 {
        self.last_touch.get(&unit).copied().unwrap_or(0)
    }
}

impl ExpertCachePolicy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn touched(&mut self, unit: usize) {
        self.clock += 1;
        self.last_touch.insert(unit, self.clock);
    }

    fn removed(&mut self, unit: usize) {
        self.last_touch.remove(&unit);
    }

    fn victim(&mut self, candidates: &[usize]) -> Option<usize> {
        candidates.iter().copied().min_by_key(|&unit| (self.last_touch(unit), unit))
    }
}

impl ExpertCachePolicy for Lfu {
    fn name(&self) -> &'static str {
        "lfu"
    }

    fn touched(&mut self, unit: usize) {
        self.recency.touched(unit);
        *self.touches.entry(unit).or_default() += 1;
    }

    fn removed(&mut self, unit: usize) {
        self.recency.removed(unit);
    }

    fn victim(&mut self, candidates: &[usize]) -> Option<usize> {
        candidates
            .iter()
            .copied()
            .min_by_key(|&unit| (self.touches.get(&unit).copied().unwrap_or(0), self.recency.last_touch(unit), unit))
    }
}

/// Finds a built-in expert cache policy by name (one of `EXPERT_CACHE_POLICIES`), in its
/// initial state.
pub fn expert_cache_policy_by_name(name: &str) -> Result<Box<dyn ExpertCachePolicy>, PlanError> {
    match name {
        "lru" => Ok(Box::new(Lru::default())),
        "lfu" => Ok(Box::new(Lfu::default())),
        _ => {
            Err(PlanError::UnknownExpertCachePolicy { name: name.to_string(), known: EXPERT_CACHE_POLICIES.join(", ") })
        }
    }
}

/// The hits and misses of a replayed expert trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheSimulation {
    /// Accesses served from the cache.
    pub hits: u64,
    /// Accesses that had to read the expert from the offload pack.
    pub misses: u64,
}

impl CacheSimulation {
    /// All accesses counted, hits and misses.
    pub fn accesses(&self) -> u64 {
        self.hits + self.misses
    }

    /// The fraction of accesses that hit, 0.0 when there were none.
    pub fn hit_rate(&self) -> f64 {
        match self.accesses() {
            0 => 0.0,
            accesses => self.hits as f64 / accesses as f64,
        }
    }
}

/// Replays `accesses` against an expert cache of `slots` experts evicting with `policy`, which
/// should be in its initial state.
///
/// Each inner `Vec` is one batch: the experts one layer's forward pass asks for together, served
/// in order; a unit repeated within a batch counts once. A batch's hits are used before its
/// misses may evict them, so a miss evicts a cached unit outside the batch. Only when every
/// cached unit belongs to the batch (the batch has more distinct units than `slots`) may it
/// evict one the batch has already used; if all of them are still to be used, the missed
/// expert is served without being cached. With 0 slots every access is a miss.
pub fn simulate_expert_cache(
    accesses: &[Vec<usize>],
    slots: usize,
    policy: &mut dyn ExpertCachePolicy,
) -> CacheSimulation {
    let mut cache = SimulatedCache { slots, cached: BTreeSet::new(), policy };
    accesses.iter().fold(CacheSimulation::default(), |total, batch| {
        let served = cache.serve(batch);
        CacheSimulation { hits: total.hits + served.hits, misses: total.misses + served.misses }
    })
}

/// The cache contents during a simulation, with the policy that evicts from it.
struct SimulatedCache<'a> {
    slots: usize,
    cached: BTreeSet<usize>,
    policy: &'a mut dyn ExpertCachePolicy,
}

impl SimulatedCache<'_> {
    /// Serves one batch and returns its hits and misses.
    fn serve(&mut self, batch: &[usize]) -> CacheSimulation {
        let batch = distinct(batch);
        let mut served = CacheSimulation::default();
        for (position, &unit) in batch.iter().enumerate() {
            self.policy.touched(unit);
            if self.cached.contains(&unit) {
                served.hits += 1;
                continue;
            }
            served.misses += 1;
            if self.cached.len() < self.slots {
                self.cached.insert(unit);
                continue;
            }
            let outside: Vec<usize> = self.cached.iter().copied().filter(|u| !batch.contains(u)).collect();
            let candidates = if outside.is_empty() {
                let pending = &batch[position + 1..];
                self.cached.iter().copied().filter(|u| !pending.contains(u)).collect()
            } else {
                outside
            };
            if let Some(victim) = self.policy.victim(&candidates) {
                assert!(
                    candidates.contains(&victim),
                    "policy {} chose {victim}, not one of the candidates {candidates:?}",
                    self.policy.name()
                );
                self.cached.remove(&victim);
                self.policy.removed(victim);
                self.cached.insert(unit);
            }
        }
        served
    }
}

/// The units of `batch` in order of first appearance, each once.
fn distinct(batch: &[usize]) -> Vec<usize> {
    let mut units = Vec::with_capacity(batch.len());
    for &unit in batch {
        if !units.contains(&unit) {
            units.push(unit);
        }
    }
    units
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Batches of one expert each.
    fn singles(units: &[usize]) -> Vec<Vec<usize>> {
        units.iter().map(|&unit| vec![unit]).collect()
    }

    fn check(name: &str, accesses: &[Vec<usize>], slots: usize, hits: u64, misses: u64) {
        let mut policy = expert_cache_policy_by_name(name).unwrap();
        let got = simulate_expert_cache(accesses, slots, policy.as_mut());
        assert_eq!(got, CacheSimulation { hits, misses }, "{name}, {slots} slots, trace {accesses:?}");
    }

    #[test]
    fn lru_evicts_the_least_recently_touched() {
        let mut lru = Lru::default();
        for unit in [0, 1, 2, 0] {
            lru.touched(unit);
        }
        assert_eq!(lru.victim(&[0, 1, 2]), Some(1));
        // 3 evicts 1, then 1 evicts 2 (0 was touched after 2), and 0 still hits.
        check("lru", &singles(&[0, 1, 2, 0, 3, 1, 0]), 3, 2, 5);
    }

    #[test]
    fn lfu_keeps_the_frequent_expert_that_lru_evicts() {
        let trace = singles(&[0, 0, 0, 1, 2, 0, 1, 2, 0]);
        check("lru", &trace, 2, 2, 7);
        check("lfu", &trace, 2, 4, 5);
    }

    #[test]
    fn lfu_counts_survive_eviction() {
        let mut lfu = Lfu::default();
        for unit in [0, 0, 1] {
            lfu.touched(unit);
        }
        lfu.removed(0);
        assert_eq!(lfu.victim(&[0, 1]), Some(1));
    }

    #[test]
    fn victims_are_deterministic_and_ties_go_to_the_lowest_index() {
        let policies: [Box<dyn ExpertCachePolicy>; 2] = [Box::new(Lru::default()), Box::new(Lfu::default())];
        for mut policy in policies {
            assert_eq!(policy.victim(&[]), None, "{}", policy.name());
            assert_eq!(policy.victim(&[5, 3, 9]), Some(3), "{}: never touched", policy.name());
            assert_eq!(policy.victim(&[9, 5, 3]), Some(3), "{}: order of candidates", policy.name());
        }
        let mut lfu = Lfu::default();
        for unit in [2, 1, 3, 3] {
            lfu.touched(unit);
        }
        // 1 and 2 are touched once each; 2 was touched first.
        assert_eq!(lfu.victim(&[3, 1, 2]), Some(2));
        assert_eq!(lfu.victim(&[1, 3]), Some(1));
    }

    #[test]
    fn a_miss_does_not_evict_a_unit_of_its_own_batch() {
        // After the warm-up 0 is the most frequent expert, so LFU would pick 1 if the batch [1, 2]
        // did not protect it; 2 evicts 0 instead, and repeating the batch hits twice.
        let trace = [vec![0], vec![0], vec![0], vec![1], vec![1, 2], vec![2, 1]];
        check("lru", &trace, 2, 5, 3);
        check("lfu", &trace, 2, 5, 3);
    }

    #[test]
    fn a_batch_larger_than_the_cache_evicts_units_it_has_used() {
        // 0 and 1 are used before 2 evicts one of them; 3 then evicts the other.
        check("lru", &[vec![0, 1, 2, 3], vec![2, 3]], 2, 2, 4);
        // The cached 1 is still to be used when 0 misses, so 0 is served uncached.
        check("lru", &[vec![1], vec![0, 1], vec![1]], 1, 2, 2);
    }

    #[test]
    fn zero_slots_miss_every_access() {
        let trace = [vec![0, 1, 1], vec![0], vec![2, 0]];
        for name in EXPERT_CACHE_POLICIES {
            check(name, &trace, 0, 0, 5);
        }
        assert_eq!(CacheSimulation::default().hit_rate(), 0.0);
        assert_eq!(CacheSimulation { hits: 1, misses: 3 }.hit_rate(), 0.25);
    }

    #[test]
    fn policies_are_found_by_name() {
        for &name in EXPERT_CACHE_POLICIES {
            assert_eq!(expert_cache_policy_by_name(name).unwrap().name(), name);
        }
        assert!(EXPERT_CACHE_POLICIES.contains(&DEFAULT_EXPERT_CACHE_POLICY));
        let error = expert_cache_policy_by_name("arc").unwrap_err();
        assert_eq!(error, PlanError::UnknownExpertCachePolicy { name: "arc".into(), known: "lru, lfu".into() });
        let message = error.to_string();
        assert!(message.contains("\"arc\"") && message.contains("lru, lfu"), "{message}");
    }

    fn traces() -> impl Strategy<Value = Vec<Vec<usize>>> {
        prop::collection::vec(prop::collection::vec(0usize..16, 1..=4), 0..64)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn every_distinct_access_is_a_hit_or_a_miss(trace in traces(), slots in 0usize..8) {
            let total: u64 = trace.iter().map(|batch| distinct(batch).len() as u64).sum();
            for name in EXPERT_CACHE_POLICIES {
                let mut policy = expert_cache_policy_by_name(name).unwrap();
                let got = simulate_expert_cache(&trace, slots, policy.as_mut());
                prop_assert_eq!(got.accesses(), total, "{}", name);
            }
        }

        #[test]
        fn a_cache_holding_every_unit_only_misses_cold(trace in traces(), extra in 0usize..4) {
            let units: BTreeSet<usize> = trace.iter().flatten().copied().collect();
            for name in EXPERT_CACHE_POLICIES {
                let mut policy = expert_cache_policy_by_name(name).unwrap();
                let got = simulate_expert_cache(&trace, units.len() + extra, policy.as_mut());
                prop_assert_eq!(got.misses, units.len() as u64, "{}", name);
            }
        }

        #[test]
        fn a_batch_that_fits_stays_cached(trace in traces(), slots in 0usize..8) {
            for name in EXPERT_CACHE_POLICIES {
                let mut policy = expert_cache_policy_by_name(name).unwrap();
                let mut cache = SimulatedCache { slots, cached: BTreeSet::new(), policy: policy.as_mut() };
                for batch in &trace {
                    cache.serve(batch);
                    prop_assert!(cache.cached.len() <= slots);
                    if distinct(batch).len() <= slots {
                        prop_assert!(batch.iter().all(|unit| cache.cached.contains(unit)), "{} lost part of {:?}", name, batch);
                    }
                }
            }
        }
    }
}
