//! The expert cache: MoE experts kept in the offload pack and read when the router picks them.
//!
//! A cached unit ([`crate::Residency::Cached`]) is read on demand into one of a fixed set of
//! buffers (as many experts of the largest size as the cache's bytes hold) and stays there, a
//! cache entry, until a read needs its buffer: then the entry the policy names (least recently
//! used, least frequently used; see [`ExpertCachePolicy`]) among those nobody holds is evicted.
//! Memory is therefore bounded by the buffers, allocated once, and a hit costs no copy: the
//! handle views the buffer the read landed in.
//!
//! A layer asks for its experts together ([`crate::Store::fetch_experts`]): the hits are held
//! at once, so the misses cannot evict them, and the misses' reads are all submitted before the
//! first expert is handed over, so the reads of the later ones overlap the compute of the
//! earlier ones. When the buffers run short (a prefill that routes to more experts than the
//! cache holds), the remaining misses are read as the experts before them are handed over and
//! released, and, if need be, later hits give up their hold.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use strata_nvme::{Streamer, StreamerConfig, Ticket};
use strata_planner::ExpertCachePolicy;

use crate::pack::Pack;
use crate::store::UnitBytes;
use crate::{Error, Result, Store, UnitHandle};

/// How big the expert cache is and whom it evicts.
#[derive(Debug)]
pub struct ExpertCacheConfig {
    /// The most bytes the cache's buffers take; it holds `bytes / largest expert unit` experts
    /// (at least one must fit).
    pub bytes: u64,
    /// The eviction policy.
    pub policy: Box<dyn ExpertCachePolicy>,
}

/// Counters of the expert cache since the store opened (or since the last reset).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ExpertCacheStats {
    /// Experts handed over from the cache without a read.
    pub hits: u64,
    /// Experts that had to be read from the pack.
    pub misses: u64,
    /// Bytes of the experts read (before widening to the disk alignment).
    pub bytes_read: u64,
    /// Entries evicted to make room.
    pub evictions: u64,
    /// Time spent waiting for experts' reads to land.
    pub stall: Duration,
    /// Reads submitted ahead by [`Store::prefetch_experts`].
    pub prefetched: u64,
    /// Misses whose read a prefetch had already submitted (counted in `misses` too).
    pub prefetch_used: u64,
    /// Reads ahead dropped unused because a read asked for needed their buffer (their bytes
    /// count in `bytes_read`).
    pub prefetch_wasted: u64,
    /// Reads ahead the next fetch did not ask for, landed and kept as cache entries (their
    /// bytes count in `bytes_read`).
    pub prefetch_unused: u64,
}

impl ExpertCacheStats {
    /// `hits / (hits + misses)`, or `None` before any expert was asked for.
    pub fn hit_rate(&self) -> Option<f64> {
        let total = self.hits + self.misses;
        (total > 0).then(|| self.hits as f64 / total as f64)
    }
}

/// The cache proper: its streamer (whose buffers hold the entries) and the entries.
pub(crate) struct ExpertCache {
    streamer: Streamer,
    buffers: usize,
    state: Mutex<CacheState>,
}

struct CacheState {
    entries: HashMap<usize, Arc<UnitBytes>>,
    /// Reads submitted ahead of a fetch, oldest first: taken over by the fetch that asks for
    /// the unit, or dropped when a read asked for needs their buffer.
    prefetched: VecDeque<(usize, Ticket)>,
    policy: Box<dyn ExpertCachePolicy>,
    stats: ExpertCacheStats,
}

impl CacheState {
    /// Evicts the entry the policy names among those nobody holds (only the map holds an entry
    /// whose count is 1, and nothing clones it without the lock, so dropping it returns its
    /// buffer to the pool now). `false` when every entry is held.
    fn evict_one(&mut self) -> bool {
        let candidates: Vec<usize> =
            self.entries.iter().filter(|(_, b)| Arc::strong_count(b) == 1).map(|(&u, _)| u).collect();
        let Some(named) = self.policy.victim(&candidates) else { return false };
        // A policy that names a unit it was not offered gets the first candidate instead.
        let victim = if candidates.contains(&named) { named } else { candidates[0] };
        self.entries.remove(&victim);
        self.policy.removed(victim);
        self.stats.evictions += 1;
        true
    }
}

impl ExpertCache {
    /// A cache over `pack` for the units `cached`, or an error when not one of them fits in
    /// `config.bytes`.
    pub(crate) fn open(pack: &Pack, cached: &[usize], config: ExpertCacheConfig) -> Result<ExpertCache> {
        let units = &pack.manifest().units;
        let largest = cached.iter().map(|&i| units[i].padded_len()).max().unwrap_or(0).max(1);
        let buffers = usize::try_from(config.bytes / largest).unwrap_or(usize::MAX).min(cached.len().max(1));
        if buffers == 0 {
            let name = cached.iter().max_by_key(|&&i| units[i].padded_len()).map_or("", |&i| units[i].name.as_str());
            return Err(Error::ExpertCache {
                reason: format!(
                    "an expert cache of {} bytes holds no expert: the largest, {name}, takes {largest} bytes",
                    config.bytes
                ),
            });
        }
        let streamer_config = StreamerConfig {
            // A read for every buffer may be in flight, so a refused read means every buffer is
            // taken (and an eviction may free one).
            queue_depth: buffers,
            buffer_bytes: largest as usize,
            buffers,
            ..StreamerConfig::default()
        };
        let streamer = Streamer::open(pack.data_path(), streamer_config)?;
        let state = CacheState {
            entries: HashMap::new(),
            prefetched: VecDeque::new(),
            policy: config.policy,
            stats: ExpertCacheStats::default(),
        };
        Ok(ExpertCache { streamer, buffers, state: Mutex::new(state) })
    }

    /// How many experts the cache holds at most.
    pub(crate) fn buffers(&self) -> usize {
        self.buffers
    }

    /// The bytes of the cache's buffers.
    pub(crate) fn bytes(&self) -> u64 {
        (self.buffers * self.streamer.buffer_bytes()) as u64
    }

    pub(crate) fn streamer(&self) -> &Streamer {
        &self.streamer
    }

    pub(crate) fn stats(&self) -> ExpertCacheStats {
        self.lock().stats
    }

    pub(crate) fn reset_stats(&self) {
        self.lock().stats = ExpertCacheStats::default();
    }

    /// The units cached now, in ascending order.
    pub(crate) fn cached(&self) -> Vec<usize> {
        let mut units: Vec<usize> = self.lock().entries.keys().copied().collect();
        units.sort_unstable();
        units
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        // Nothing panics while holding the lock but the policy; its state is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Submits the read of `unit` if a buffer is free or an entry nobody holds can be evicted
    /// for one (or, with `before_reads_ahead`, a read ahead nobody took over can be dropped for
    /// one); `None` when neither.
    fn try_submit(
        &self,
        pack: &Pack,
        state: &mut CacheState,
        unit: usize,
        before_reads_ahead: bool,
    ) -> Result<Option<Ticket>> {
        let u = &pack.manifest().units[unit];
        loop {
            if let Some(ticket) = self.streamer.try_read(u.offset, u.padded_len() as usize)? {
                return Ok(Some(ticket));
            }
            if state.evict_one() || (before_reads_ahead && self.drop_oldest_prefetch(pack, state)?) {
                continue;
            }
            return Ok(None);
        }
    }

    /// Waits for the oldest read ahead nobody took over and drops it, so that its buffer can be
    /// used (its bytes count as read, and as wasted). `false` when there is none.
    fn drop_oldest_prefetch(&self, pack: &Pack, state: &mut CacheState) -> Result<bool> {
        let Some((unit, ticket)) = state.prefetched.pop_front() else { return Ok(false) };
        drop(ticket.wait()?);
        state.stats.bytes_read += pack.manifest().units[unit].len;
        state.stats.prefetch_wasted += 1;
        Ok(true)
    }

    /// Turns the reads ahead that have landed into cache entries (a unit already cached, or
    /// bytes that fail their checksum, just give the buffer back), counting them unused.
    fn settle_landed(&self, pack: &Pack, state: &mut CacheState) {
        let mut k = 0;
        while k < state.prefetched.len() {
            if !state.prefetched[k].1.is_done() {
                k += 1;
                continue;
            }
            let (unit, ticket) = state.prefetched.remove(k).expect("k is in range");
            state.stats.prefetch_unused += 1;
            state.stats.bytes_read += pack.manifest().units[unit].len;
            if let Ok(buf) = ticket.wait()
                && pack.verify(unit, &buf).is_ok()
                && !state.entries.contains_key(&unit)
            {
                state.entries.insert(unit, Arc::new(UnitBytes(buf)));
            }
        }
    }

    /// Submits the reads of those of `units` that are neither cached nor on their way, while a
    /// buffer is free or an entry nobody holds can be evicted, keeping at most half the buffers
    /// for reads ahead (a fetch may need the others at once).
    pub(crate) fn prefetch(&self, pack: &Pack, units: &[usize]) -> Result<()> {
        let mut state = self.lock();
        for &unit in units {
            let state = &mut *state;
            if state.prefetched.len() >= (self.buffers / 2).max(1) {
                break;
            }
            if state.entries.contains_key(&unit) || state.prefetched.iter().any(|(u, _)| *u == unit) {
                continue;
            }
            // Never wait here, nor drop another read ahead: a guess is not worth a stall.
            let Some(ticket) = self.try_submit(pack, state, unit, false)? else { break };
            state.prefetched.push_back((unit, ticket));
            state.stats.prefetched += 1;
        }
        Ok(())
    }
}

/// One expert of a [`ExpertFetch`], on its way.
enum Pending {
    /// Resident in the store, or a hit held since the fetch began.
    Ready(UnitHandle, bool),
    /// A miss whose read is in flight.
    Reading(Ticket),
    /// A miss not submitted yet (no buffer was free), or a hit that gave up its hold.
    Later,
}

/// The experts one layer asked for, handed over in the order asked ([`Store::fetch_experts`]).
/// Drop each handle before taking the next where the cache is small: a handle holds its buffer.
pub struct ExpertFetch<'s> {
    store: &'s Store,
    units: Vec<usize>,
    pending: Vec<Pending>,
    next: usize,
}

impl std::fmt::Debug for ExpertFetch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertFetch").field("units", &self.units).field("next", &self.next).finish()
    }
}

impl<'s> ExpertFetch<'s> {
    pub(crate) fn new(store: &'s Store, units: &[usize]) -> Result<ExpertFetch<'s>> {
        let mut pending = Vec::with_capacity(units.len());
        for (i, &unit) in units.iter().enumerate() {
            if units[..i].contains(&unit) {
                return Err(Error::ExpertCache { reason: format!("unit {unit} asked for twice in one fetch") });
            }
            pending.push(match store.resident_handle(unit)? {
                Some(handle) => Pending::Ready(handle, false),
                None => Pending::Later,
            });
        }
        let mut fetch = ExpertFetch { store, units: units.to_vec(), pending, next: 0 };
        if let Some(cache) = store.expert_cache() {
            let mut state = cache.lock();
            // Hold every hit first, so that the misses cannot evict them; a miss whose read was
            // submitted ahead takes that read over.
            for (p, &unit) in fetch.pending.iter_mut().zip(&fetch.units) {
                if matches!(p, Pending::Later) {
                    state.policy.touched(unit);
                    if let Some(bytes) = state.entries.get(&unit) {
                        *p = Pending::Ready(store.handle(unit, Arc::clone(bytes) as _), true);
                    } else if let Some(k) = state.prefetched.iter().position(|(u, _)| *u == unit) {
                        let (_, ticket) = state.prefetched.remove(k).expect("found above");
                        state.stats.prefetch_used += 1;
                        *p = Pending::Reading(ticket);
                    }
                }
            }
            // Reads ahead are for the fetch after them: those it did not ask for were guessed
            // wrong. The ones that landed become cache entries (nobody has touched them, so
            // they are the first to go); the others are dropped when their buffers are needed.
            cache.settle_landed(store.pack(), &mut state);
            fetch.submit_ahead(cache, &mut state)?;
        }
        Ok(fetch)
    }

    /// Submits the reads of the misses not yet submitted, in order, while buffers can be had.
    fn submit_ahead(&mut self, cache: &ExpertCache, state: &mut CacheState) -> Result<()> {
        for k in self.next..self.units.len() {
            if matches!(self.pending[k], Pending::Later) {
                match cache.try_submit(self.store.pack(), state, self.units[k], true)? {
                    Some(ticket) => self.pending[k] = Pending::Reading(ticket),
                    None => break,
                }
            }
        }
        Ok(())
    }

    /// The next expert's weights, waiting for its read if need be; `None` after the last.
    pub fn next_expert(&mut self) -> Option<Result<UnitHandle>> {
        if self.next == self.units.len() {
            return None;
        }
        let k = self.next;
        self.next += 1;
        Some(self.take(k))
    }

    fn take(&mut self, k: usize) -> Result<UnitHandle> {
        let (store, unit) = (self.store, self.units[k]);
        let cache = store
            .expert_cache()
            .ok_or_else(|| Error::ExpertCache { reason: format!("unit {unit} is neither resident nor cached") })?;
        let ticket = match std::mem::replace(&mut self.pending[k], Pending::Later) {
            Pending::Ready(handle, hit) => {
                if hit {
                    cache.lock().stats.hits += 1;
                }
                return Ok(handle);
            }
            Pending::Reading(ticket) => ticket,
            Pending::Later => {
                let mut state = cache.lock();
                if let Some(entry) = state.entries.get(&unit) {
                    // Read by another fetch meanwhile, or a hit that gave up its hold.
                    let bytes = Arc::clone(entry);
                    state.stats.hits += 1;
                    return Ok(store.handle(unit, bytes as _));
                }
                self.submit_now(cache, &mut state, k)?
            }
        };
        let waited = Instant::now();
        let buf = ticket.wait()?;
        let stall = waited.elapsed();
        store.pack().verify(unit, &buf)?;
        let bytes = Arc::new(UnitBytes(buf));
        let mut state = cache.lock();
        state.stats.misses += 1;
        state.stats.stall += stall;
        state.stats.bytes_read += store.pack().manifest().units[unit].len;
        // Another fetch may have read the same expert meanwhile: keep one entry.
        let entry = Arc::clone(state.entries.entry(unit).or_insert(bytes));
        self.submit_ahead(cache, &mut state)?;
        drop(state);
        Ok(store.handle(unit, entry as _))
    }

    /// Submits unit `k`'s read now: when no buffer is free and no entry can be evicted, the
    /// later experts' hits give up their holds (last first) until one can.
    fn submit_now(&mut self, cache: &ExpertCache, state: &mut CacheState, k: usize) -> Result<Ticket> {
        let unit = self.units[k];
        loop {
            if let Some(ticket) = cache.try_submit(self.store.pack(), state, unit, true)? {
                return Ok(ticket);
            }
            let held = (k + 1..self.units.len()).rev().find(|&j| matches!(self.pending[j], Pending::Ready(_, true)));
            let Some(j) = held else {
                return Err(Error::ExpertCache {
                    reason: format!(
                        "all {} buffers of the expert cache are held (expert handles kept while asking for \
                         unit {unit}); release each expert before taking the next, or give the cache more memory",
                        cache.buffers()
                    ),
                });
            };
            self.pending[j] = Pending::Later;
        }
    }
}
