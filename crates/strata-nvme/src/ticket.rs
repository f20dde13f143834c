//! What a read hands back: a [`Ticket`] to wait on, and the [`ReadBuf`] it resolves to.
//!
//! The ticket and the in-flight read share one [`Completion`]. The backend stores the finished
//! `ReadBuf` (or the error) there; if the ticket was dropped unwaited, the stored `ReadBuf` is
//! dropped with the last reference and its buffer goes back to the pool, without anyone waiting.

use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use crate::error::Result;
use crate::pool::Slot;

/// The meeting point of one read and its ticket.
pub(crate) struct Completion {
    result: Mutex<Option<Result<ReadBuf>>>,
    done: AtomicBool,
    ready: Condvar,
}

impl Completion {
    pub(crate) fn new() -> Arc<Completion> {
        Arc::new(Completion { result: Mutex::new(None), done: AtomicBool::new(false), ready: Condvar::new() })
    }

    /// Stores the read's outcome and wakes the waiter, if any.
    pub(crate) fn complete(&self, result: Result<ReadBuf>) {
        let mut slot = self.result.lock().unwrap_or_else(PoisonError::into_inner);
        debug_assert!(slot.is_none() && !self.done.load(Ordering::Relaxed), "a read completed twice");
        *slot = Some(result);
        self.done.store(true, Ordering::Release);
        drop(slot);
        self.ready.notify_all();
    }
}

/// A read in flight. [`wait`](Ticket::wait) for its bytes, or drop it: the read still runs to
/// completion (its buffer stays owned by the read until the kernel is done with it) and the
/// buffer then returns to the pool.
#[must_use = "dropping a ticket discards the read's data"]
pub struct Ticket {
    completion: Arc<Completion>,
}

impl Ticket {
    pub(crate) fn new(completion: Arc<Completion>) -> Ticket {
        Ticket { completion }
    }

    /// The ticket of an empty read, complete from the start.
    pub(crate) fn empty() -> Ticket {
        let completion = Completion::new();
        completion.complete(Ok(ReadBuf::empty()));
        Ticket { completion }
    }

    /// Blocks until the read completes, then returns its bytes or its error.
    pub fn wait(self) -> Result<ReadBuf> {
        let mut slot = self.completion.result.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(result) = slot.take() {
                return result;
            }
            slot = self.completion.ready.wait(slot).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Whether the read has completed, so that [`wait`](Ticket::wait) will not block.
    pub fn is_done(&self) -> bool {
        self.completion.done.load(Ordering::Acquire)
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket").field("done", &self.is_done()).finish()
    }
}

/// The bytes of one completed read: derefs to exactly the requested range. Dropping it returns
/// its buffer to the streamer's pool (which may unblock a waiting [`Streamer::read`]).
///
/// [`Streamer::read`]: crate::Streamer::read
pub struct ReadBuf {
    /// The pool buffer holding the bytes; `None` for an empty read.
    slot: Option<Slot>,
    /// Where the requested bytes start in the buffer (the widening in front of them).
    head: usize,
    len: usize,
}

impl ReadBuf {
    /// A finished read: `len` bytes at `head` in `slot`'s buffer, which nothing writes any more.
    pub(crate) fn new(slot: Slot, head: usize, len: usize) -> ReadBuf {
        debug_assert!(head + len <= slot.capacity());
        ReadBuf { slot: Some(slot), head, len }
    }

    pub(crate) fn empty() -> ReadBuf {
        ReadBuf { slot: None, head: 0, len: 0 }
    }
}

impl Deref for ReadBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.slot {
            // SAFETY: the slot's buffer holds `capacity >= head + len` initialised bytes (zeroed
            // at allocation, then written by the read) and lives as long as the slot, which this
            // `ReadBuf` owns; the read that wrote it has completed and nothing else may write to
            // an owned slot, so shared reads are sound.
            Some(slot) => unsafe { std::slice::from_raw_parts(slot.ptr().add(self.head), self.len) },
            None => &[],
        }
    }
}

impl AsRef<[u8]> for ReadBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl fmt::Debug for ReadBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadBuf").field("len", &self.len).field("buffer", &self.slot.as_ref().map(Slot::index)).finish()
    }
}
