//! The executor of a placement plan on the CPU: resident units held in RAM, streamed units read
//! from the offload pack through the strata-nvme streamer into its ring of staging buffers, with
//! `prefetch_depth` units in flight ahead of the one being computed.
//!
//! Units run in a fixed cyclic order (a token's forward pass visits every layer's attention and
//! FFN, then the head, then the next token starts over), so acquiring unit `i` of the streamed
//! order also submits the reads of the next `prefetch_depth` streamed units. A unit acquired out
//! of that order (a pass that stopped early) is read on demand; prefetches nobody asks for are
//! dropped, and their buffers return to the pool when the reads land. Every unit read from disk
//! is checked against its checksum before a tensor sees it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use strata_nvme::{ReadBuf, Streamer, StreamerConfig, Ticket};
use strata_tensor::{ByteSource, CpuStorage, DType, Tensor};

use crate::experts::{ExpertCache, ExpertCacheConfig, ExpertCacheStats, ExpertFetch};
use crate::pack::{Pack, PackUnit};
use crate::{Error, Result};

/// How a [`Store`] holds one unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residency {
    /// Read once at open and held in RAM.
    Resident,
    /// Mapped from the pack (checked once at open): only the pages touched are read, once, and
    /// held. For a unit of which a token reads a small part, such as the embedding.
    Mapped,
    /// Read from the pack each time it is acquired (prefetched ahead of use).
    Streamed,
    /// An expert: read from the pack when a router picks it, and kept in the expert cache
    /// while the cache has room ([`Store::fetch_experts`]).
    Cached,
}

/// Counters of a store's reads since it opened (or since [`Store::reset_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StoreStats {
    /// Units acquired that had to be streamed.
    pub streamed_units: u64,
    /// Bytes of streamed units handed to the model (before widening to the disk alignment).
    pub streamed_bytes: u64,
    /// Time the model spent waiting for streamed units that had not landed yet.
    pub stall: Duration,
    /// Acquisitions whose read had been prefetched (submitted before it was asked for).
    pub prefetch_hits: u64,
}

/// A unit's bytes in RAM, for as long as any tensor views them.
pub(crate) struct UnitBytes(pub(crate) ReadBuf);

impl ByteSource for UnitBytes {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A unit's weights, held in memory while the handle (or any tensor made from it) lives.
#[derive(Clone)]
pub struct UnitHandle {
    unit: usize,
    bytes: Arc<dyn ByteSource>,
    pack: Arc<Pack>,
}

impl std::fmt::Debug for UnitHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnitHandle").field("unit", &self.meta().name).field("bytes", &self.bytes.bytes().len()).finish()
    }
}

impl UnitHandle {
    /// The unit's entry in the pack manifest.
    pub fn meta(&self) -> &PackUnit {
        &self.pack.manifest().units[self.unit]
    }

    /// Whether the unit holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.meta().tensors.iter().any(|t| t.name == name)
    }

    /// The tensor called `name`, a view of the unit's bytes (no copy).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let unit = self.meta();
        let t = unit
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::TensorNotInUnit { unit: unit.name.clone(), tensor: name.to_string() })?;
        let dtype = DType::from_name(&t.dtype).ok_or_else(|| Error::BadManifest {
            path: self.pack.data_path().to_path_buf(),
            reason: format!("tensor {name} of unit {} has unknown dtype {:?}", unit.name, t.dtype),
        })?;
        let range_error = || Error::BadManifest {
            path: self.pack.data_path().to_path_buf(),
            reason: format!("tensor {name} lies outside unit {} ({} bytes)", unit.name, unit.len),
        };
        let (offset, len) = (usize::try_from(t.offset).map_err(|_| range_error())?, t.len as usize);
        let storage = CpuStorage::view(Arc::clone(&self.bytes), offset, len).ok_or_else(range_error)?;
        Ok(Tensor::from_storage(storage, dtype, t.shape.clone())?)
    }
}

/// Executes a plan: the single owner of the pack's bytes in memory.
pub struct Store {
    pack: Arc<Pack>,
    /// Resident and mapped units' bytes (`None`: streamed).
    resident: Vec<Option<Arc<dyn ByteSource>>>,
    /// The mapped units.
    mapped: Vec<usize>,
    /// Streamed units in execution order.
    order: Vec<usize>,
    /// For each unit, its index in `order` (streamed units only).
    position: Vec<Option<usize>>,
    depth: usize,
    streamer: Option<Streamer>,
    state: Mutex<Pipeline>,
    /// The expert cache, when some units are [`Residency::Cached`].
    experts: Option<ExpertCache>,
}

/// The reads in flight, oldest first, and the counters.
#[derive(Default)]
struct Pipeline {
    inflight: VecDeque<(usize, Ticket)>,
    stats: StoreStats,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("pack", &self.pack.data_path())
            .field("streamed", &self.order.len())
            .field("depth", &self.depth)
            .field("expert_cache_slots", &self.experts.as_ref().map(ExpertCache::buffers))
            .finish()
    }
}

impl Store {
    /// Opens a store over `pack` with each unit held as `residency` says (one entry per pack
    /// unit) and `prefetch_depth` streamed units in flight ahead of compute. Resident units are
    /// read (and checked) now; `progress(done, total)` reports the bytes read. No unit may be
    /// [`Residency::Cached`] (see [`Store::open_with_experts`]).
    pub fn open(
        pack: Pack,
        residency: &[Residency],
        prefetch_depth: usize,
        progress: impl FnMut(u64, u64),
    ) -> Result<Store> {
        Store::open_with_experts(pack, residency, prefetch_depth, None, progress)
    }

    /// [`Store::open`] with an expert cache for the [`Residency::Cached`] units, which need one.
    pub fn open_with_experts(
        pack: Pack,
        residency: &[Residency],
        prefetch_depth: usize,
        expert_cache: Option<ExpertCacheConfig>,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Store> {
        let units = &pack.manifest().units;
        if residency.len() != units.len() {
            return Err(Error::PlanMismatch {
                reason: format!("the plan places {} units but the pack has {}", residency.len(), units.len()),
            });
        }
        let total: u64 =
            units.iter().zip(residency).filter(|(_, r)| **r == Residency::Resident).map(|(u, _)| u.len).sum();
        let mut done = 0;
        let mut resident = Vec::with_capacity(units.len());
        let mut order = Vec::new();
        let mut position = vec![None; units.len()];
        let mut mapped = Vec::new();
        let mut cached = Vec::new();
        for (i, (unit, r)) in units.iter().zip(residency).enumerate() {
            match r {
                Residency::Resident => {
                    let bytes = pack.read_unit(i)?;
                    done += unit.len;
                    progress(done, total);
                    resident.push(Some(Arc::new(bytes) as Arc<dyn ByteSource>));
                }
                Residency::Mapped => {
                    resident.push(Some(Arc::new(pack.map_unit(i)?) as Arc<dyn ByteSource>));
                    mapped.push(i);
                }
                Residency::Streamed => {
                    position[i] = Some(order.len());
                    order.push(i);
                    resident.push(None);
                }
                Residency::Cached => {
                    cached.push(i);
                    resident.push(None);
                }
            }
        }
        let experts = match (cached.is_empty(), expert_cache) {
            (true, _) => None,
            (false, Some(config)) => Some(ExpertCache::open(&pack, &cached, config)?),
            (false, None) => {
                return Err(Error::ExpertCache {
                    reason: format!(
                        "the plan caches {} expert units but gives the store no expert cache",
                        cached.len()
                    ),
                });
            }
        };
        let streamer = if order.is_empty() {
            None
        } else {
            let largest = order.iter().map(|&i| units[i].padded_len()).max().unwrap_or(0);
            let config = StreamerConfig {
                // The read asked for now, plus the prefetches.
                queue_depth: prefetch_depth + 1,
                buffer_bytes: largest as usize,
                // The unit being computed, plus the ones in flight.
                buffers: prefetch_depth + 1,
                ..StreamerConfig::default()
            };
            Some(Streamer::open(pack.data_path(), config)?)
        };
        Ok(Store {
            pack: Arc::new(pack),
            resident,
            mapped,
            order,
            position,
            depth: prefetch_depth,
            streamer,
            state: Mutex::new(Pipeline::default()),
            experts,
        })
    }

    /// The pack the store reads.
    pub fn pack(&self) -> &Pack {
        &self.pack
    }

    /// Units streamed per pass, in execution order.
    pub fn streamed_units(&self) -> &[usize] {
        &self.order
    }

    /// How many streamed units are read ahead of the one in use.
    pub fn prefetch_depth(&self) -> usize {
        self.depth
    }

    /// The streamer's I/O path and counters (`None` when nothing is streamed).
    pub fn streamer(&self) -> Option<&Streamer> {
        self.streamer.as_ref()
    }

    /// Counters since open or the last reset.
    pub fn stats(&self) -> StoreStats {
        self.lock().stats
    }

    /// Zeroes the counters (the expert cache's too).
    pub fn reset_stats(&self) {
        self.lock().stats = StoreStats::default();
        if let Some(cache) = &self.experts {
            cache.reset_stats();
        }
    }

    /// The expert cache's counters since open or the last reset (`None`: no expert cache).
    pub fn expert_cache_stats(&self) -> Option<ExpertCacheStats> {
        self.experts.as_ref().map(ExpertCache::stats)
    }

    /// How many experts the cache holds at most, and the bytes of its buffers (`None`: no
    /// expert cache).
    pub fn expert_cache_capacity(&self) -> Option<(usize, u64)> {
        self.experts.as_ref().map(|c| (c.buffers(), c.bytes()))
    }

    /// The expert units cached now, ascending.
    pub fn cached_experts(&self) -> Vec<usize> {
        self.experts.as_ref().map(ExpertCache::cached).unwrap_or_default()
    }

    /// The expert cache's streamer, for its I/O counters (`None`: no expert cache).
    pub fn expert_streamer(&self) -> Option<&Streamer> {
        self.experts.as_ref().map(ExpertCache::streamer)
    }

    /// Whether unit `unit` is [`Residency::Cached`].
    pub fn is_cached(&self, unit: usize) -> bool {
        self.experts.is_some() && self.resident.get(unit).is_some_and(Option::is_none) && self.position[unit].is_none()
    }

    /// The experts `units` (cached or resident units, each once) of one layer, handed over in
    /// that order by [`ExpertFetch::next_expert`]: the cached ones are held at once, and the
    /// reads of the others are all submitted now (as far as the cache's buffers go), so the later
    /// ones load while the earlier ones compute.
    pub fn fetch_experts(&self, units: &[usize]) -> Result<ExpertFetch<'_>> {
        ExpertFetch::new(self, units)
    }

    /// Submits ahead the reads of the cached experts among `units` that are neither cached nor
    /// on their way (the experts a later layer is expected to ask for), as far as free buffers
    /// and entries nobody holds allow, and never more than half the cache's buffers. A later
    /// [`Store::fetch_experts`] that asks for one takes its read over; the others are dropped
    /// when a read asked for needs their buffers. Does nothing without an expert cache.
    pub fn prefetch_experts(&self, units: &[usize]) -> Result<()> {
        match &self.experts {
            Some(cache) => {
                let cached: Vec<usize> = units.iter().copied().filter(|&u| self.is_cached(u)).collect();
                cache.prefetch(&self.pack, &cached)
            }
            None => Ok(()),
        }
    }

    /// Unit `unit`'s handle if it is resident or mapped; `None` if it streams or is cached.
    pub(crate) fn resident_handle(&self, unit: usize) -> Result<Option<UnitHandle>> {
        match self.resident.get(unit) {
            None => Err(Error::PlanMismatch {
                reason: format!("unit {unit} is not in the pack ({} units)", self.resident.len()),
            }),
            Some(slot) => Ok(slot.as_ref().map(|bytes| self.handle(unit, Arc::clone(bytes)))),
        }
    }

    /// A handle of unit `unit` over `bytes`.
    pub(crate) fn handle(&self, unit: usize, bytes: Arc<dyn ByteSource>) -> UnitHandle {
        UnitHandle { unit, bytes, pack: Arc::clone(&self.pack) }
    }

    pub(crate) fn expert_cache(&self) -> Option<&ExpertCache> {
        self.experts.as_ref()
    }

    /// Bytes held in RAM by resident units (mapped units not counted: they hold the pages
    /// touched, which the process's resident set shows).
    pub fn resident_bytes(&self) -> u64 {
        (0..self.resident.len())
            .filter(|i| !self.mapped.contains(i))
            .filter_map(|i| self.resident[i].as_ref())
            .map(|b| b.bytes().len() as u64)
            .sum()
    }

    /// The units mapped from the pack.
    pub fn mapped_units(&self) -> &[usize] {
        &self.mapped
    }

    /// The unit called `name`.
    pub fn unit_index(&self, name: &str) -> Option<usize> {
        self.pack.unit_index(name)
    }

    /// Unit `unit`'s weights: at once if resident; if streamed, after its read lands (submitted
    /// now unless a prefetch already did), with the reads of the next `prefetch_depth` streamed
    /// units submitted before waiting.
    pub fn acquire(&self, unit: usize) -> Result<UnitHandle> {
        let units = &self.pack.manifest().units;
        let Some(slot) = self.resident.get(unit) else {
            return Err(Error::PlanMismatch {
                reason: format!("unit {unit} is not in the pack ({} units)", units.len()),
            });
        };
        if let Some(bytes) = slot {
            return Ok(UnitHandle { unit, bytes: Arc::clone(bytes), pack: Arc::clone(&self.pack) });
        }
        let Some(at) = self.position[unit] else {
            // Neither resident nor streamed: a cached expert.
            let mut fetch = self.fetch_experts(&[unit])?;
            return fetch.next_expert().expect("one unit was asked for");
        };
        let ticket = {
            let mut state = self.lock();
            let found = state.inflight.iter().position(|(u, _)| *u == unit);
            let (ticket, hit) = match found {
                Some(k) => {
                    // Reads submitted before this one belong to units skipped over: drop them
                    // (their buffers return to the pool when they land).
                    state.inflight.drain(..k);
                    (state.inflight.pop_front().map(|(_, t)| t).expect("found above"), true)
                }
                None => {
                    state.inflight.clear();
                    (self.submit(unit)?, false)
                }
            };
            if hit {
                state.stats.prefetch_hits += 1;
            }
            // Keep the next `depth` units of the cyclic order in flight. A prefetch never waits
            // for a buffer (the caller may hold one): it is retried at the next acquire.
            for step in 1..=self.depth.min(self.order.len().saturating_sub(1)) {
                let next = self.order[(at + step) % self.order.len()];
                if !state.inflight.iter().any(|(u, _)| *u == next) {
                    let u = &units[next];
                    match self.active_streamer().try_read(u.offset, u.padded_len() as usize)? {
                        Some(t) => state.inflight.push_back((next, t)),
                        None => break,
                    }
                }
            }
            ticket
        };
        let waited = Instant::now();
        let buf = ticket.wait()?;
        let stall = waited.elapsed();
        self.pack.verify(unit, &buf)?;
        let mut state = self.lock();
        state.stats.stall += stall;
        state.stats.streamed_units += 1;
        state.stats.streamed_bytes += units[unit].len;
        drop(state);
        Ok(UnitHandle { unit, bytes: Arc::new(UnitBytes(buf)), pack: Arc::clone(&self.pack) })
    }

    /// Submits the read of `unit` now, waiting for a free buffer if need be.
    fn submit(&self, unit: usize) -> Result<Ticket> {
        let u = &self.pack.manifest().units[unit];
        Ok(self.active_streamer().read(u.offset, u.padded_len() as usize)?)
    }

    fn active_streamer(&self) -> &Streamer {
        self.streamer.as_ref().expect("a store with streamed units has a streamer")
    }

    fn lock(&self) -> MutexGuard<'_, Pipeline> {
        // A panic while holding the lock leaves only counters and tickets behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use strata_tensor::DType;

    use super::*;
    use crate::pack::{PackOptions, SourceKey, TensorSpec, UnitSpec, ensure_pack};

    /// Unit `u`'s one tensor: `len` f32 values `u * 1000 + i`, shape `[len]`.
    fn unit_data(u: usize, len: usize) -> Vec<u8> {
        (0..len).flat_map(|i| ((u * 1000 + i) as f32).to_le_bytes()).collect()
    }

    /// A pack of `n` units of different sizes (a few KiB to tens of KiB).
    fn build(dir: &Path, n: usize) -> (Pack, Vec<Vec<u8>>) {
        let src = dir.join("model.bin");
        std::fs::write(&src, b"source").unwrap();
        let data: Vec<Vec<u8>> = (0..n).map(|u| unit_data(u, 700 + 1500 * (u % 4))).collect();
        let units: Vec<UnitSpec> = data
            .iter()
            .enumerate()
            .map(|(u, d)| UnitSpec {
                name: format!("unit{u}"),
                tensors: vec![TensorSpec { name: "w".into(), dtype: DType::F32, shape: vec![d.len() / 4], data: d }],
            })
            .collect();
        let key = SourceKey::for_files(&[src], "test", None).unwrap();
        let pack = ensure_pack(&dir.join("packs"), &key, &units, &PackOptions::default(), &mut |_| {}).unwrap();
        (pack, data)
    }

    fn check(handle: &UnitHandle, want: &[u8]) {
        let t = handle.tensor("w").unwrap();
        assert_eq!(t.cpu_bytes().unwrap(), want, "{}", handle.meta().name);
        assert!(matches!(handle.tensor("x"), Err(Error::TensorNotInUnit { .. })));
    }

    #[test]
    fn every_residency_and_depth_gives_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let n = 7;
        for depth in 0..4 {
            for pattern in 0..3 {
                let (pack, data) = build(dir.path(), n);
                let residency: Vec<Residency> = (0..n)
                    .map(|u| match pattern {
                        0 => Residency::Streamed,
                        1 if u % 3 == 0 => Residency::Resident,
                        1 if u % 3 == 1 => Residency::Mapped,
                        1 => Residency::Streamed,
                        _ => Residency::Resident,
                    })
                    .collect();
                let store = Store::open(pack, &residency, depth, |_, _| {}).unwrap();
                // Three passes in order, as tokens decode.
                for _ in 0..3 {
                    for (u, want) in data.iter().enumerate() {
                        let h = store.acquire(u).unwrap();
                        check(&h, want);
                    }
                }
                let streamed = residency.iter().filter(|r| **r == Residency::Streamed).count() as u64;
                let stats = store.stats();
                assert_eq!(stats.streamed_units, 3 * streamed, "depth {depth} pattern {pattern}");
                if depth > 0 && streamed > 1 {
                    // After the first acquire, every streamed unit had been prefetched.
                    assert_eq!(stats.prefetch_hits, 3 * streamed - 1, "depth {depth} pattern {pattern}");
                }
                // Out of order (a pass abandoned halfway), then in order again.
                for u in [5, 2, 6, 0, 1, 3] {
                    check(&store.acquire(u).unwrap(), &data[u]);
                }
                for (u, want) in data.iter().enumerate() {
                    check(&store.acquire(u).unwrap(), want);
                }
            }
        }
    }

    #[test]
    fn a_handle_may_be_held_while_acquiring_the_next_unit() {
        // Depth 1 gives a ring of two buffers: one held plus one in flight never deadlocks.
        let dir = tempfile::tempdir().unwrap();
        let (pack, data) = build(dir.path(), 5);
        let store = Store::open(pack, &[Residency::Streamed; 5], 1, |_, _| {}).unwrap();
        for _ in 0..3 {
            let mut held = store.acquire(0).unwrap();
            for (u, want) in data.iter().enumerate().skip(1) {
                let next = store.acquire(u).unwrap();
                check(&held, &data[u - 1]);
                held = next;
                check(&held, want);
            }
        }
    }

    #[test]
    fn a_corrupt_unit_is_an_error_naming_it() {
        for residency in [Residency::Streamed, Residency::Resident, Residency::Mapped] {
            let dir = tempfile::tempdir().unwrap();
            let (pack, data) = build(dir.path(), 4);
            let at = pack.manifest().units[2].offset as usize + 17;
            let mut bytes = std::fs::read(pack.data_path()).unwrap();
            bytes[at] ^= 0x40;
            std::fs::write(pack.data_path(), bytes).unwrap();
            let result = Store::open(pack, &[residency; 4], 2, |_, _| {}).and_then(|store| {
                for (u, want) in data.iter().enumerate().take(2) {
                    check(&store.acquire(u)?, want);
                }
                store.acquire(2)
            });
            let err = result.unwrap_err();
            assert!(matches!(&err, Error::Checksum { unit, .. } if unit == "unit2"), "{residency:?}: {err}");
            assert!(err.to_string().contains("unit2"), "{err}");
        }
    }

    #[test]
    fn a_plan_for_another_pack_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (pack, _) = build(dir.path(), 3);
        let err = Store::open(pack, &[Residency::Resident; 2], 0, |_, _| {}).unwrap_err();
        assert!(matches!(err, Error::PlanMismatch { .. }), "{err}");
    }

    #[test]
    fn resident_bytes_and_progress() {
        let dir = tempfile::tempdir().unwrap();
        let (pack, data) = build(dir.path(), 5);
        let mut calls = Vec::new();
        let residency =
            [Residency::Resident, Residency::Streamed, Residency::Resident, Residency::Streamed, Residency::Mapped];
        let store = Store::open(pack, &residency, 1, |done, total| calls.push((done, total))).unwrap();
        let want = (data[0].len() + data[2].len()) as u64;
        assert_eq!(calls.last(), Some(&(want, want)));
        // Resident units hold their padded length; the mapped unit is not counted (it holds
        // only the pages touched).
        let units = &store.pack().manifest().units;
        assert_eq!(store.resident_bytes(), units[0].padded_len() + units[2].padded_len());
        assert_eq!(store.streamed_units(), &[1, 3]);
        assert_eq!(store.mapped_units(), &[4]);
        check(&store.acquire(4).unwrap(), &data[4]);
        assert!(store.streamer().is_some());
    }

    /// A store over `n` units whose first is resident and the others cached experts, with a
    /// cache of `slots` of the largest.
    fn cached_store(dir: &Path, n: usize, slots: u64) -> (Store, Vec<Vec<u8>>) {
        let (pack, data) = build(dir, n);
        let largest = pack.manifest().units[1..].iter().map(|u| u.padded_len()).max().unwrap();
        let mut residency = vec![Residency::Cached; n];
        residency[0] = Residency::Resident;
        let config = ExpertCacheConfig { bytes: slots * largest, policy: Box::new(strata_planner::Lru::default()) };
        (Store::open_with_experts(pack, &residency, 1, Some(config), |_, _| {}).unwrap(), data)
    }

    /// Takes every expert of `units` in order, checking its bytes and dropping it before the next.
    fn take_all(store: &Store, units: &[usize], data: &[Vec<u8>]) {
        let mut fetch = store.fetch_experts(units).unwrap();
        for &u in units {
            check(&fetch.next_expert().unwrap().unwrap(), &data[u]);
        }
        assert!(fetch.next_expert().is_none());
    }

    #[test]
    fn experts_are_read_once_then_hit_until_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let (store, data) = cached_store(dir.path(), 7, 3);
        assert_eq!(store.expert_cache_capacity().map(|c| c.0), Some(3));
        assert!(store.is_cached(3) && !store.is_cached(0));
        take_all(&store, &[1, 2], &data);
        take_all(&store, &[1, 2], &data);
        let stats = store.expert_cache_stats().unwrap();
        assert_eq!((stats.hits, stats.misses, stats.evictions), (2, 2, 0));
        assert_eq!(stats.bytes_read, store.pack().manifest().units[1].len + store.pack().manifest().units[2].len);
        // A resident unit comes through a fetch too, and is neither a hit nor a miss.
        take_all(&store, &[0, 3], &data);
        assert_eq!(store.cached_experts(), [1, 2, 3]);
        // Two more misses evict the two least recently used.
        take_all(&store, &[4, 5], &data);
        assert_eq!(store.cached_experts(), [3, 4, 5]);
        let stats = store.expert_cache_stats().unwrap();
        assert_eq!((stats.hits, stats.misses, stats.evictions), (2, 5, 2));
        assert_eq!(stats.hit_rate(), Some(2.0 / 7.0));
        // `acquire` of a cached unit is a fetch of one.
        check(&store.acquire(3).unwrap(), &data[3]);
        assert_eq!(store.expert_cache_stats().unwrap().hits, 3);
        store.reset_stats();
        assert_eq!(store.expert_cache_stats().unwrap(), ExpertCacheStats::default());
    }

    #[test]
    fn a_fetch_keeps_its_hits_from_its_own_misses() {
        let dir = tempfile::tempdir().unwrap();
        let (store, data) = cached_store(dir.path(), 6, 2);
        take_all(&store, &[1, 2], &data);
        // 1 is the least recently used, but this fetch holds it: the miss of 3 evicts 2.
        take_all(&store, &[3, 1], &data);
        assert_eq!(store.cached_experts(), [1, 3]);
        let stats = store.expert_cache_stats().unwrap();
        assert_eq!((stats.hits, stats.misses), (1, 3));
    }

    #[test]
    fn a_fetch_larger_than_the_cache_hands_every_expert_over() {
        let dir = tempfile::tempdir().unwrap();
        for slots in 1..4 {
            let (store, data) = cached_store(dir.path(), 8, slots);
            for _ in 0..2 {
                take_all(&store, &[7, 1, 2, 3, 4, 5, 6], &data);
                take_all(&store, &[2, 6, 4], &data);
            }
            assert_eq!(store.cached_experts().len(), slots as usize);
        }
    }

    #[test]
    fn an_expert_held_past_the_cache_is_an_error_not_a_deadlock() {
        let dir = tempfile::tempdir().unwrap();
        let (store, data) = cached_store(dir.path(), 4, 1);
        let held = store.acquire(1).unwrap();
        let err = store.acquire(2).unwrap_err();
        assert!(matches!(err, Error::ExpertCache { .. }), "{err}");
        assert!(err.to_string().contains("all 1 buffers of the expert cache are held"), "{err}");
        drop(held);
        check(&store.acquire(2).unwrap(), &data[2]);
    }

    #[test]
    fn expert_cache_sizes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (pack, _) = build(dir.path(), 3);
        let residency = [Residency::Resident, Residency::Cached, Residency::Cached];
        let err = Store::open(pack, &residency, 1, |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("no expert cache"), "{err}");
        let (pack, _) = build(dir.path(), 3);
        let config = ExpertCacheConfig { bytes: 4095, policy: Box::new(strata_planner::Lru::default()) };
        let err = Store::open_with_experts(pack, &residency, 1, Some(config), |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("holds no expert: the largest, unit2"), "{err}");
    }

    #[test]
    fn a_corrupt_expert_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (pack, data) = build(dir.path(), 4);
        let at = pack.manifest().units[2].offset as usize + 5;
        let mut bytes = std::fs::read(pack.data_path()).unwrap();
        bytes[at] ^= 1;
        std::fs::write(pack.data_path(), bytes).unwrap();
        let residency = [Residency::Resident, Residency::Cached, Residency::Cached, Residency::Cached];
        let config = ExpertCacheConfig { bytes: 1 << 20, policy: Box::new(strata_planner::Lfu::default()) };
        let store = Store::open_with_experts(pack, &residency, 1, Some(config), |_, _| {}).unwrap();
        let mut fetch = store.fetch_experts(&[1, 2, 3]).unwrap();
        check(&fetch.next_expert().unwrap().unwrap(), &data[1]);
        let err = fetch.next_expert().unwrap().unwrap_err();
        assert!(matches!(&err, Error::Checksum { unit, .. } if unit == "unit2"), "{err}");
        check(&fetch.next_expert().unwrap().unwrap(), &data[3]);
        // The corrupt unit was not cached.
        assert_eq!(store.cached_experts(), [1, 3]);
    }

    #[test]
    fn reads_ahead_are_taken_over_or_settled_by_the_next_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let (store, data) = cached_store(dir.path(), 8, 4);
        // At most half the buffers read ahead: 3 is not submitted.
        store.prefetch_experts(&[0, 1, 2, 3]).unwrap();
        assert_eq!(store.expert_cache_stats().unwrap().prefetched, 2);
        // The next fetch takes the read of 1 over (a miss, read ahead); the read of 2 was a
        // wrong guess: kept as an entry if it landed, else dropped when its buffer is needed.
        take_all(&store, &[1], &data);
        let stats = store.expert_cache_stats().unwrap();
        assert_eq!((stats.misses, stats.prefetch_used, stats.hits), (1, 1, 0), "{stats:?}");
        take_all(&store, &[3, 4, 5, 6], &data);
        let stats = store.expert_cache_stats().unwrap();
        assert_eq!((stats.prefetch_used, stats.prefetch_unused + stats.prefetch_wasted), (1, 1), "{stats:?}");
        assert_eq!(
            stats.bytes_read,
            [1, 2, 3, 4, 5, 6].map(|u| store.pack().manifest().units[u].len).iter().sum::<u64>()
        );
        // The entries nobody touched went first.
        assert_eq!(store.cached_experts(), [3, 4, 5, 6]);
        // A read ahead of what is cached does nothing.
        store.prefetch_experts(&[3, 4]).unwrap();
        assert_eq!(store.expert_cache_stats().unwrap().prefetched, 2);
        // Whatever becomes of reads ahead, every expert comes back right.
        for round in 0..3 {
            store.prefetch_experts(&[7, round + 1]).unwrap();
            take_all(&store, &[5, round + 1], &data);
            take_all(&store, &[7, 1, 6], &data);
        }
        let stats = store.expert_cache_stats().unwrap();
        assert!(stats.prefetch_used + stats.prefetch_unused + stats.prefetch_wasted <= stats.prefetched, "{stats:?}");
    }
}
