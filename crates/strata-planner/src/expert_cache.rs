//! Eviction policies of the MoE expert cache, and a trace simulator to compare them.
//!
//! The expert store keeps a bounded set of expert units in RAM; the rest are read from the
//! offload pack when the router asks for them. An `ExpertCachePolicy` decides which cached
//! expert leaves when a missing one must come in. The policies here only see unit indices and
//! the order of accesses: they do no I/O and hold no weights. `simulate_expert_cache` replays a
//! routing trace against a policy and counts hits and misses, which is how the planner (and its
//! tests) compare policies without loading a model.

use std::collections::HashMap;

use crate::error::PlanError;

/// The names `expert_cache_policy_by_name` knows, in the order error messages list them.
pub const EXPERT_CACHE_POLICIES: &[&str] = &["layer-lru", "lru", "lfu"];

/// The expert cache policy used when the user names none.
pub const DEFAULT_EXPERT_CACHE_POLICY: &str = "layer-lru";

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

    /// Tells the policy which layer each expert unit belongs to, as `(unit, layer)` pairs, before
    /// any access. Policies that ignore layers need not implement it.
    fn set_layers(&mut self, _layer_of: &[(usize, usize)]) {}
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

/// Layer-aware LRU: evicts from the layer whose turn comes last, which is the layer running
/// now (its experts are next needed a whole token later), then the one before it, and so on;
/// within a layer, the least recently touched. Units without a known layer come last, among
/// themselves least recently touched first.
///
/// Decode visits the layers in a cycle, and a plain LRU evicts exactly the experts whose layer
/// comes next: with fewer slots than a token's experts over all layers it never hits. This
/// policy keeps each layer a share of the cache instead, which under uniform routing hits in
/// proportion to the experts cached, and keeps each layer's recent (hot) experts in its share.
#[derive(Debug, Clone, Default)]
pub struct LayerLru {
    recency: Lru,
    layer_of: HashMap<usize, usize>,
    /// One more than the highest layer given.
    layers: usize,
    /// The layer of the unit touched last: the layer running now.
    current: Option<usize>,
}

impl LayerLru {
    /// How many layer steps after the current one `unit`'s layer runs again (the current layer
    /// itself: all of them); 0 for a unit of unknown layer.
    fn turns_until(&self, unit: usize) -> usize {
        match (self.current, self.layer_of.get(&unit)) {
            (Some(current), Some(&layer)) => (layer + self.layers - current - 1) % self.layers + 1,
            _ => 0,
        }
    }
}

impl ExpertCachePolicy for LayerLru {
    fn name(&self) -> &'static str {
        "layer-lru"
    }

    fn touched(&mut self, unit: usize) {
        self.recency.touched(unit);
        if let Some(&layer) = self.layer_of.get(&unit) {
            self.current = Some(layer);
        }
    }

    fn removed(&mut self, unit: usize) {
        self.recency.removed(unit);
    }

    fn victim(&mut self, candidates: &[usize]) -> Option<usize> {
        candidates
            .iter()
            .copied()
            .min_by_key(|&unit| (std::cmp::Reverse(self.turns_until(unit)), self.recency.last_touch(unit), unit))
    }

    fn set_layers(&mut self, layer_of: &[(usize, usize)]) {
        self.layer_of = layer_of.iter().copied().collect();
        self.layers = layer_of.iter().map(|&(_, layer)| layer + 1).max().unwrap_or(0);
    }
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
        "layer-lru" => Ok(Box::new(LayerLru::default())),
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
    let mut cache = ExpertSlots::new(slots, policy);
    for batch in accesses {
        cache.serve(&distinct(batch));
    }
    cache.counts()
}

/// Which expert each of a fixed number of cache slots holds, and whom a miss evicts: the
/// bookkeeping of an expert cache of equal slots, without the weights. It replays traces in
/// [`simulate_expert_cache`] and keeps the CUDA decoder's device expert cache, so both evict the
/// same experts.
///
/// A batch's hits are used before its misses may evict them: a miss evicts, by the policy, a
/// cached unit outside the batch; only when every cached unit belongs to the batch may it evict
/// one the batch has already used, and if all of them are still to be used, the missed expert
/// is served without being cached. A batch of no more distinct units than slots therefore always
/// gets a slot for each.
#[derive(Debug)]
pub struct ExpertSlots<P> {
    /// Per slot: the unit it holds.
    owner: Vec<Option<usize>>,
    /// Per cached unit: its slot.
    slot_of: HashMap<usize, usize>,
    policy: P,
    counts: CacheSimulation,
}

impl<P: std::ops::DerefMut<Target = D>, D: ExpertCachePolicy + ?Sized> ExpertSlots<P> {
    /// `slots` empty slots, evicting by `policy` (in its initial state, its layers set).
    pub fn new(slots: usize, policy: P) -> Self {
        ExpertSlots { owner: vec![None; slots], slot_of: HashMap::new(), policy, counts: CacheSimulation::default() }
    }

    /// The number of slots.
    pub fn slots(&self) -> usize {
        self.owner.len()
    }

    /// The hits and misses so far.
    pub fn counts(&self) -> CacheSimulation {
        self.counts
    }

    /// Serves one batch of distinct units, in order: per unit its slot and whether it must be
    /// brought in (a miss), or `None` for a miss served without a slot (see the type's rule).
    pub fn serve(&mut self, batch: &[usize]) -> Vec<Option<(usize, bool)>> {
        self.serve_preferring(batch, |_| false)
    }

    /// Whether `unit` is in a slot.
    pub fn holds(&self, unit: usize) -> bool {
        self.slot_of.contains_key(&unit)
    }

    /// [`ExpertSlots::serve`], a miss evicting a unit `first` picks when any of the units it
    /// may evict is one (the policy choosing among those): a cache in front of another that
    /// holds some units already (a host tier behind a device cache) gives those up first, so
    /// that the two hold more distinct units.
    pub fn serve_preferring(&mut self, batch: &[usize], first: impl Fn(usize) -> bool) -> Vec<Option<(usize, bool)>> {
        debug_assert_eq!(distinct(batch).len(), batch.len(), "a batch of distinct units");
        let mut out = Vec::with_capacity(batch.len());
        for (position, &unit) in batch.iter().enumerate() {
            self.policy.touched(unit);
            if let Some(&slot) = self.slot_of.get(&unit) {
                self.counts.hits += 1;
                out.push(Some((slot, false)));
                continue;
            }
            self.counts.misses += 1;
            let slot = match self.owner.iter().position(Option::is_none) {
                Some(free) => Some(free),
                None => self.evict(&batch[..position], &batch[position + 1..], &first),
            };
            if let Some(slot) = slot {
                self.owner[slot] = Some(unit);
                self.slot_of.insert(unit, slot);
            }
            out.push(slot.map(|slot| (slot, true)));
        }
        out
    }

    /// Evicts a unit for a miss of a batch that has used `used` and has `pending` still to use,
    /// and returns its slot: `None` when every cached unit is pending. Of the units it may evict,
    /// those `first` picks go first.
    fn evict(&mut self, used: &[usize], pending: &[usize], first: &impl Fn(usize) -> bool) -> Option<usize> {
        let mut cached: Vec<usize> = self.slot_of.keys().copied().collect();
        cached.sort_unstable();
        let outside: Vec<usize> =
            cached.iter().copied().filter(|u| !used.contains(u) && !pending.contains(u)).collect();
        let candidates: Vec<usize> =
            if outside.is_empty() { cached.into_iter().filter(|u| !pending.contains(u)).collect() } else { outside };
        let preferred: Vec<usize> = candidates.iter().copied().filter(|&u| first(u)).collect();
        let candidates = if preferred.is_empty() { candidates } else { preferred };
        let victim = self.policy.victim(&candidates)?;
        assert!(
            candidates.contains(&victim),
            "policy {} chose {victim}, not one of the candidates {candidates:?}",
            self.policy.name()
        );
        self.policy.removed(victim);
        let slot = self.slot_of.remove(&victim).expect("a cached unit holds a slot");
        self.owner[slot] = None;
        Some(slot)
    }

    /// Forgets what `slot` holds (its copy failed, say): the next ask for that unit misses.
    pub fn forget(&mut self, slot: usize) {
        if let Some(unit) = self.owner[slot].take() {
            self.slot_of.remove(&unit);
            self.policy.removed(unit);
        }
    }
}

/// The hits an LRU expert cache of every size gets on one trace, from a single replay.
///
/// With the store's batch rule (a batch's hits are held while its misses evict), an LRU cache
/// of `slots` experts holds, between batches, exactly the `slots` most recently touched units:
/// so a batch's unit hits when its depth in the recency stack at the start of the batch is below
/// `slots`, and the counts of those depths give the hits of every cache size at once. This is
/// exact for every size at least as large as the trace's widest batch (the simulator of
/// `simulate_expert_cache` with `Lru` gives the same counts), which decode batches (a layer's
/// experts of one token) always are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LruHitCurve {
    /// `hits_at_depth[d]`: counted accesses whose unit was at depth `d` of the recency stack.
    hits_at_depth: Vec<u64>,
    /// Counted accesses, hits at any depth and cold misses.
    accesses: u64,
}

impl LruHitCurve {
    /// Replays `accesses` (batches as `simulate_expert_cache` takes them), counting from batch
    /// `counted_from` on: the batches before it only warm the cache up.
    pub fn replay(accesses: &[Vec<usize>], counted_from: usize) -> LruHitCurve {
        // A unit's depth is the number of distinct units touched since its own last touch: with
        // a mark at each unit's latest touch (touches numbered in order), the marks after it.
        let touches = accesses.iter().map(Vec::len).sum();
        let mut marks = Fenwick::new(touches);
        let mut last_touch: HashMap<usize, usize> = HashMap::new();
        let mut now = 0;
        let mut curve = LruHitCurve { hits_at_depth: Vec::new(), accesses: 0 };
        for (index, batch) in accesses.iter().enumerate() {
            let batch = distinct(batch);
            if index >= counted_from {
                for unit in &batch {
                    curve.accesses += 1;
                    if let Some(&touch) = last_touch.get(unit) {
                        let depth = (marks.prefix(now) - marks.prefix(touch + 1)) as usize;
                        if curve.hits_at_depth.len() <= depth {
                            curve.hits_at_depth.resize(depth + 1, 0);
                        }
                        curve.hits_at_depth[depth] += 1;
                    }
                }
            }
            // The whole batch's depths are those at its start; then it moves to the front.
            for unit in batch {
                if let Some(touch) = last_touch.insert(unit, now) {
                    marks.add(touch, -1);
                }
                marks.add(now, 1);
                now += 1;
            }
        }
        curve
    }

    /// The counted accesses.
    pub fn accesses(&self) -> u64 {
        self.accesses
    }

    /// The hits and misses of a cache of `slots` experts.
    pub fn with_slots(&self, slots: usize) -> CacheSimulation {
        let hits = self.hits_at_depth.iter().take(slots).sum();
        CacheSimulation { hits, misses: self.accesses - hits }
    }
}

/// A Fenwick tree of counts over `0..n`: point updates and prefix sums in `O(log n)`.
struct Fenwick(Vec<i64>);

impl Fenwick {
    fn new(n: usize) -> Fenwick {
        Fenwick(vec![0; n + 1])
    }

    /// Adds `delta` at `index`.
    fn add(&mut self, index: usize, delta: i64) {
        let mut i = index + 1;
        while i < self.0.len() {
            self.0[i] += delta;
            i += i & i.wrapping_neg();
        }
    }

    /// The sum over `0..end`.
    fn prefix(&self, end: usize) -> i64 {
        let mut i = end;
        let mut sum = 0;
        while i > 0 {
            sum += self.0[i];
            i -= i & i.wrapping_neg();
        }
        sum
    }
}

/// A routing trace where every token picks `k` distinct experts of each layer uniformly at
/// random (a deterministic generator seeded with `seed`), as batches for
/// `simulate_expert_cache` and `LruHitCurve`: one batch per layer per token, in layer order.
///
/// `layers[l] = (experts, on_demand)`: layer `l` has `experts` experts, of which the first
/// `on_demand` go through the cache (the others are resident, so a batch leaves them out).
/// Expert `e` of layer `l` is unit `offset(l) + e`. Under uniform routing which experts are
/// resident does not change the hit rate, only how many.
pub fn uniform_routing_trace(layers: &[(usize, usize)], k: usize, tokens: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut random = SplitMix64(seed);
    let mut offsets = Vec::with_capacity(layers.len());
    let mut next = 0;
    for &(experts, _) in layers {
        offsets.push(next);
        next += experts;
    }
    let mut trace = Vec::with_capacity(tokens * layers.len());
    let mut ids: Vec<usize> = Vec::new();
    for _ in 0..tokens {
        for (&(experts, on_demand), &offset) in layers.iter().zip(&offsets) {
            // The first `k` of a partial Fisher-Yates shuffle: `k` distinct experts.
            ids.clear();
            ids.extend(0..experts);
            let picks = k.min(experts);
            for i in 0..picks {
                let j = i + random.below(experts - i);
                ids.swap(i, j);
            }
            trace.push(ids[..picks].iter().filter(|&&e| e < on_demand).map(|&e| offset + e).collect());
        }
    }
    trace
}

/// The SplitMix64 generator: small, fast and the same on every machine. The sampler in the
/// strata facade has its own (`sampling.rs`); the planner depends on no strata crate above
/// strata-tensor, so it cannot share that one.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`; the modulo bias is below 2^-40 for the counts used here).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
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
    use std::collections::BTreeSet;

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
    fn layer_lru_evicts_from_the_layer_whose_turn_comes_last() {
        let mut policy = LayerLru::default();
        // Units 0-2 are layer 0, 3-5 layer 1, 6-8 layer 2; 9 has no layer.
        let layers: Vec<(usize, usize)> = (0..9).map(|u| (u, u / 3)).collect();
        policy.set_layers(&layers);
        for unit in [9, 0, 1, 3, 4, 6, 7, 2] {
            policy.touched(unit);
        }
        // Layer 0 runs now (2 was touched last): its own experts go first, the least recent (0)
        // before 1; then layer 2's (run just before), then layer 1's; the unknown one last.
        assert_eq!(policy.victim(&[0, 1, 3, 4, 6, 7, 9]), Some(0));
        assert_eq!(policy.victim(&[1, 3, 6, 9]), Some(1));
        assert_eq!(policy.victim(&[3, 4, 6, 7, 9]), Some(6));
        assert_eq!(policy.victim(&[3, 4, 9]), Some(3));
        assert_eq!(policy.victim(&[9]), Some(9));
        // Without layers it is an LRU.
        let mut plain = LayerLru::default();
        for unit in [2, 0, 1] {
            plain.touched(unit);
        }
        assert_eq!(plain.victim(&[0, 1, 2]), Some(2));
    }

    /// Under uniform routing over layers in a cycle, a plain LRU with fewer slots than a token's
    /// experts never hits, and the layer-aware one hits in proportion to the experts cached.
    #[test]
    fn layer_lru_hits_where_lru_cannot_under_cyclic_layers() {
        let (layers, experts, k) = (32, 8, 2);
        let shape = vec![(experts, experts); layers];
        let trace = uniform_routing_trace(&shape, k, 400, 3);
        let layer_of: Vec<(usize, usize)> = (0..layers * experts).map(|u| (u, u / experts)).collect();
        let warm = 100 * layers;
        let rate = |policy: &mut dyn ExpertCachePolicy, slots: usize| {
            policy.set_layers(&layer_of);
            let all = simulate_expert_cache(&trace, slots, policy);
            let mut again = expert_cache_policy_by_name(policy.name()).unwrap();
            again.set_layers(&layer_of);
            let warm_up = simulate_expert_cache(&trace[..warm], slots, again.as_mut());
            (all.hits - warm_up.hits) as f64 / (all.accesses() - warm_up.accesses()) as f64
        };
        let n = layers * experts;
        for slots in [25, 64, 128, 192] {
            let lru = rate(&mut Lru::default(), slots);
            let layered = rate(&mut LayerLru::default(), slots);
            let share = slots as f64 / n as f64;
            eprintln!("{slots} of {n} experts cached: lru {lru:.3}, layer-lru {layered:.3}, share {share:.3}");
            assert!((layered - share).abs() < 0.03, "{slots} slots: layer-lru {layered}, share {share}");
            assert!(layered + 0.01 >= lru, "{slots} slots: layer-lru {layered}, lru {lru}");
            if slots < k * layers {
                assert_eq!(lru, 0.0, "{slots} slots");
            }
        }
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
        let policies: [Box<dyn ExpertCachePolicy>; 3] =
            [Box::new(Lru::default()), Box::new(Lfu::default()), Box::new(LayerLru::default())];
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
        let known = "layer-lru, lru, lfu";
        assert_eq!(error, PlanError::UnknownExpertCachePolicy { name: "arc".into(), known: known.into() });
        let message = error.to_string();
        assert!(message.contains("\"arc\"") && message.contains(known), "{message}");
    }

    #[test]
    fn the_hit_curve_counts_depths_in_the_recency_stack() {
        // Stack after [0, 1], [2]: 2 1 0 (most recent first). [0, 2]: 0 at depth 2, 2 at depth 0.
        let curve = LruHitCurve::replay(&[vec![0, 1], vec![2], vec![0, 2], vec![3]], 2);
        assert_eq!(curve.accesses(), 3);
        assert_eq!(curve.with_slots(0), CacheSimulation { hits: 0, misses: 3 });
        assert_eq!(curve.with_slots(1), CacheSimulation { hits: 1, misses: 2 });
        assert_eq!(curve.with_slots(2), CacheSimulation { hits: 1, misses: 2 });
        assert_eq!(curve.with_slots(3), CacheSimulation { hits: 2, misses: 1 });
        assert_eq!(curve.with_slots(100), CacheSimulation { hits: 2, misses: 1 });
    }

    #[test]
    fn uniform_routing_picks_k_distinct_experts_per_layer_and_token() {
        let layers = [(8, 8), (6, 4), (3, 0)];
        let trace = uniform_routing_trace(&layers, 2, 500, 7);
        assert_eq!(trace.len(), 1500);
        assert_eq!(trace, uniform_routing_trace(&layers, 2, 500, 7), "deterministic");
        let mut counts = [0u32; 17];
        for (i, batch) in trace.iter().enumerate() {
            assert_eq!(distinct(batch).len(), batch.len(), "{batch:?}");
            match i % 3 {
                0 => assert!(batch.len() == 2 && batch.iter().all(|&u| u < 8), "{batch:?}"),
                // Layer 1's experts 4 and 5 are resident: a batch holds 0 to 2 of units 8..12.
                1 => assert!(batch.len() <= 2 && batch.iter().all(|&u| (8..12).contains(&u)), "{batch:?}"),
                _ => assert!(batch.is_empty(), "{batch:?}"),
            }
            for &u in batch {
                counts[u] += 1;
            }
        }
        // Each of layer 0's experts is picked a quarter of the time (500 * 2 / 8 = 125).
        for (unit, &count) in counts[..8].iter().enumerate() {
            assert!((85..=165).contains(&count), "unit {unit}: {count}");
        }
        // More experts than the layer has: all of them.
        assert_eq!(uniform_routing_trace(&[(3, 3)], 5, 1, 1)[0].len(), 3);
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
        fn the_hit_curve_is_the_lru_simulation_at_every_size_that_holds_a_batch(trace in traces(), warm in 0usize..8) {
            let widest = trace.iter().map(|batch| distinct(batch).len()).max().unwrap_or(0);
            let curve = LruHitCurve::replay(&trace, warm.min(trace.len()));
            for slots in widest..=17 {
                let mut lru = Lru::default();
                let all = simulate_expert_cache(&trace, slots, &mut lru);
                let mut lru = Lru::default();
                let warm_up = simulate_expert_cache(&trace[..warm.min(trace.len())], slots, &mut lru);
                // The warm-up's own counts are the simulation of its prefix alone.
                let counted = CacheSimulation { hits: all.hits - warm_up.hits, misses: all.misses - warm_up.misses };
                prop_assert_eq!(curve.with_slots(slots), counted, "{} slots", slots);
            }
        }

        #[test]
        fn a_batch_that_fits_stays_cached(trace in traces(), slots in 0usize..8) {
            for name in EXPERT_CACHE_POLICIES {
                let mut policy = expert_cache_policy_by_name(name).unwrap();
                let mut cache = ExpertSlots::new(slots, policy.as_mut());
                for batch in &trace {
                    let batch = distinct(batch);
                    let served = cache.serve(&batch);
                    prop_assert!(cache.slot_of.len() <= slots);
                    if batch.len() <= slots {
                        prop_assert!(batch.iter().all(|unit| cache.slot_of.contains_key(unit)), "{} lost part of {:?}", name, batch);
                        prop_assert!(served.iter().all(Option::is_some), "{} left part of {:?} without a slot", name, batch);
                    }
                }
            }
        }
    }

    #[test]
    fn expert_slots_give_each_expert_of_a_batch_its_own_slot() {
        let mut t = ExpertSlots::new(3, expert_cache_policy_by_name("lru").unwrap());
        assert_eq!(t.slots(), 3);
        let slot = |s: usize, miss: bool| Some((s, miss));
        // Empty slots first, in order; all misses.
        assert_eq!(t.serve(&[7, 2]), [slot(0, true), slot(1, true)]);
        // 7 hits where it is; 9 takes the last empty slot.
        assert_eq!(t.serve(&[9, 7]), [slot(2, true), slot(0, false)]);
        // Full: 4 evicts the least recently used (2, in slot 1), never 9 or 7 of its batch.
        assert_eq!(t.serve(&[4, 9]), [slot(1, true), slot(2, false)]);
        // 2 was evicted: a miss again; the victim is 7 (slot 0), 4 and 9 being asked with it.
        assert_eq!(t.serve(&[2, 4, 9]), [slot(0, true), slot(1, false), slot(2, false)]);
        assert_eq!(t.counts(), CacheSimulation { hits: 4, misses: 5 });
        // A forgotten slot is empty again, and its expert misses.
        t.forget(1);
        assert_eq!(t.serve(&[4]), [slot(1, true)]);
        // Batches wider than the slots. 5 first finds every cached unit still to be used by its
        // batch, so it is served without a slot; after 2, it evicts 2, the one the batch has used.
        assert_eq!(t.serve(&[5, 2, 4, 9]), [None, slot(0, false), slot(1, false), slot(2, false)]);
        assert_eq!(t.serve(&[2, 5, 4, 9]), [slot(0, false), slot(0, true), slot(1, false), slot(2, false)]);
        assert_eq!(t.counts(), CacheSimulation { hits: 10, misses: 8 });
    }

    #[test]
    fn expert_slots_evict_the_units_preferred_first() {
        let mut t = ExpertSlots::new(3, expert_cache_policy_by_name("lru").unwrap());
        let slot = |s: usize, miss: bool| Some((s, miss));
        t.serve(&[1, 2, 3]);
        assert!(t.holds(2) && !t.holds(4));
        // 1 is the least recently used, but 3 is preferred: 3 goes.
        assert_eq!(t.serve_preferring(&[4], |u| u == 3), [slot(2, true)]);
        assert!(!t.holds(3) && t.holds(1));
        // Among several preferred, the policy picks (1, then 2); none preferred: as serve.
        assert_eq!(t.serve_preferring(&[5], |u| u == 1 || u == 2), [slot(0, true)]);
        assert_eq!(t.serve_preferring(&[6], |u| u == 9), [slot(1, true)]);
        // A preferred unit of the batch itself is not evicted while the batch still needs it.
        assert_eq!(t.serve_preferring(&[7, 4], |u| u == 4), [slot(0, true), slot(2, false)]);
        assert_eq!(t.counts(), CacheSimulation { hits: 1, misses: 7 });
    }

    #[test]
    fn expert_slots_never_give_two_experts_one_slot() {
        // A random walk of batches of 1-4 experts out of 24 over 4 slots: the slots of a batch are
        // distinct, and each expert is where the table last put it.
        let mut t = ExpertSlots::new(4, expert_cache_policy_by_name("lru").unwrap());
        let mut held = [None; 4];
        let mut random = SplitMix64(12345);
        for _ in 0..500 {
            let n = 1 + random.below(4);
            let batch = distinct(&(0..n).map(|_| random.below(24)).collect::<Vec<_>>());
            let slots: Vec<(usize, bool)> = t.serve(&batch).into_iter().map(Option::unwrap).collect();
            for (&unit, &(slot, miss)) in batch.iter().zip(&slots) {
                assert_eq!(miss, held[slot] != Some(unit), "{unit} in slot {slot}: {held:?}");
                held[slot] = Some(unit);
            }
            let mut taken: Vec<usize> = slots.iter().map(|&(s, _)| s).collect();
            taken.sort();
            taken.dedup();
            assert_eq!(taken.len(), batch.len());
        }
    }
}
