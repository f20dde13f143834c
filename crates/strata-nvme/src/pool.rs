//! The buffer pool a streamer owns: a fixed set of [`AlignedBuf`]s, the free list, the count of
//! reads in flight (bounded by the queue depth), and the I/O statistics.
//!
//! A buffer is handed out as a [`Slot`], which puts it back on the free list when dropped. A slot
//! moves from the submitting call into the in-flight read, then into the [`ReadBuf`] the reader
//! gets (or into the dropped ticket's state, which drops it), so a buffer returns to the pool
//! exactly when nothing (the kernel included) uses it any more.
//!
//! [`ReadBuf`]: crate::ReadBuf

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::buf::AlignedBuf;

/// I/O counters of one streamer, from [`Streamer::stats`](crate::Streamer::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Bytes read from the file, counting the widening of unaligned ranges to [`ALIGN`](crate::ALIGN).
    pub bytes_read: u64,
    /// Reads that completed successfully.
    pub reads: u64,
    /// Reads that completed with an error.
    pub failed: u64,
    /// Wall time during which at least one read was in flight.
    pub busy: Duration,
}

impl Stats {
    /// `bytes_read / busy` in GB/s (10^9 bytes per second); 0 before any read.
    pub fn gb_per_s(&self) -> f64 {
        let secs = self.busy.as_secs_f64();
        if secs > 0.0 { self.bytes_read as f64 / secs / 1e9 } else { 0.0 }
    }
}

struct State {
    free: Vec<usize>,
    in_flight: usize,
    busy_since: Option<Instant>,
    stats: Stats,
}

/// The buffers and the admission control of one streamer.
pub(crate) struct Pool {
    bufs: Box<[AlignedBuf]>,
    buffer_bytes: usize,
    queue_depth: usize,
    state: Mutex<State>,
    changed: Condvar,
}

impl Pool {
    /// `buffers` buffers of `buffer_bytes` (a multiple of `ALIGN`) each, at most `queue_depth`
    /// reads in flight.
    pub(crate) fn new(buffers: usize, buffer_bytes: usize, queue_depth: usize) -> Arc<Pool> {
        let bufs: Box<[AlignedBuf]> = (0..buffers).map(|_| AlignedBuf::zeroed(buffer_bytes)).collect();
        let state =
            State { free: (0..buffers).rev().collect(), in_flight: 0, busy_since: None, stats: Stats::default() };
        Arc::new(Pool { bufs, buffer_bytes, queue_depth, state: Mutex::new(state), changed: Condvar::new() })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock, so a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn buffer_bytes(&self) -> usize {
        self.buffer_bytes
    }

    pub(crate) fn buffers(&self) -> &[AlignedBuf] {
        &self.bufs
    }

    /// Takes a free buffer and a place in the queue, blocking while there is neither.
    pub(crate) fn acquire(self: &Arc<Self>) -> Slot {
        let mut state = self.lock();
        loop {
            if let Some(slot) = self.try_take(&mut state) {
                return slot;
            }
            state = self.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Takes a free buffer and a place in the queue if both are available now.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let mut state = self.lock();
        self.try_take(&mut state)
    }

    fn try_take(self: &Arc<Self>, state: &mut State) -> Option<Slot> {
        if state.in_flight >= self.queue_depth {
            return None;
        }
        let index = state.free.pop()?;
        state.in_flight += 1;
        if state.in_flight == 1 {
            state.busy_since = Some(Instant::now());
        }
        Some(Slot { pool: Arc::clone(self), index, in_flight: true })
    }

    pub(crate) fn stats(&self) -> Stats {
        let state = self.lock();
        let mut stats = state.stats;
        if let Some(since) = state.busy_since {
            stats.busy += since.elapsed();
        }
        stats
    }

    /// Whether every buffer is back on the free list (for tests).
    #[cfg(test)]
    pub(crate) fn all_free(&self) -> bool {
        let state = self.lock();
        state.free.len() == self.bufs.len() && state.in_flight == 0
    }
}

/// One pool buffer, owned. While `in_flight` it also holds a place in the queue.
pub(crate) struct Slot {
    pool: Arc<Pool>,
    index: usize,
    in_flight: bool,
}

impl Slot {
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// The start of this slot's buffer. Only the slot's owner writes through it.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.pool.bufs[self.index].as_ptr()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.pool.buffer_bytes
    }

    /// Ends the read this slot was taken for: frees its place in the queue and counts it. The
    /// buffer itself stays taken until the slot is dropped.
    pub(crate) fn finish(&mut self, bytes: u64, ok: bool) {
        let mut state = self.pool.lock();
        state.stats.bytes_read += bytes;
        if ok {
            state.stats.reads += 1;
        } else {
            state.stats.failed += 1;
        }
        if std::mem::take(&mut self.in_flight) {
            end_flight(&mut state);
        }
        drop(state);
        self.pool.changed.notify_all();
    }
}

/// Frees one place in the queue; the busy time stops when the last read lands.
fn end_flight(state: &mut State) {
    state.in_flight -= 1;
    if state.in_flight == 0
        && let Some(since) = state.busy_since.take()
    {
        state.stats.busy += since.elapsed();
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        if std::mem::take(&mut self.in_flight) {
            end_flight(&mut state);
        }
        state.free.push(self.index);
        drop(state);
        self.pool.changed.notify_all();
    }
}
