//! One read as the backends see it: the requested range widened to the alignment (`ReadPlan`),
//! the pool buffer it owns, and its progress through short reads (`Job`).
//!
//! Both backends drive a job the same way: ask it for the next chunk, issue that chunk, and
//! report how many bytes came back. A short read resubmits the rest; with `O_DIRECT` the rest
//! restarts at the aligned position at or below the bytes already read, and a read that makes no
//! progress has hit the end of the file.

use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::ALIGN;
use crate::error::Error;
use crate::pool::Slot;
use crate::ticket::{Completion, ReadBuf};

/// The most bytes one chunk asks the kernel for; Linux caps a single read near 2 GiB anyway.
const MAX_CHUNK: usize = 1 << 30;

/// A requested range and the buffer-relative span actually read for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadPlan {
    /// The first byte asked for.
    pub(crate) offset: u64,
    /// The number of bytes asked for.
    pub(crate) len: usize,
    /// The file offset the buffer's first byte comes from (`offset` rounded down when direct).
    pub(crate) base: u64,
    /// Where the requested bytes start in the buffer.
    pub(crate) head: usize,
    /// The bytes read into the buffer (`head + len` rounded up to `ALIGN` when direct).
    pub(crate) span: usize,
    /// The granularity of chunk starts: `ALIGN` when direct, 1 otherwise.
    step: usize,
}

impl ReadPlan {
    /// The plan for `len > 0` bytes at `offset`; `None` if the arithmetic overflows.
    pub(crate) fn new(offset: u64, len: usize, direct: bool) -> Option<ReadPlan> {
        if !direct {
            return Some(ReadPlan { offset, len, base: offset, head: 0, span: len, step: 1 });
        }
        let head = (offset % ALIGN as u64) as usize;
        let span = head.checked_add(len)?.checked_next_multiple_of(ALIGN)?;
        Some(ReadPlan { offset, len, base: offset - head as u64, head, span, step: ALIGN })
    }

    /// The buffer bytes up to the end of the requested range.
    fn need(&self) -> usize {
        self.head + self.len
    }
}

/// What to do after a chunk came back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Every requested byte is in the buffer.
    Done,
    /// Issue the next chunk.
    More,
    /// The file ended first.
    Eof,
}

/// A read in flight: owns its pool buffer until [`Job::finish`] hands it to the reader.
pub(crate) struct Job {
    path: Arc<Path>,
    plan: ReadPlan,
    slot: Option<Slot>,
    completion: Option<Arc<Completion>>,
    /// Buffer bytes known to be read, from the start of the buffer.
    done: usize,
    /// Where the chunk in flight starts in the buffer.
    chunk_start: usize,
    /// Bytes the kernel returned over all chunks, for the statistics.
    bytes: u64,
}

impl Job {
    pub(crate) fn new(path: Arc<Path>, plan: ReadPlan, slot: Slot, completion: Arc<Completion>) -> Job {
        debug_assert!(plan.span <= slot.capacity());
        Job { path, plan, slot: Some(slot), completion: Some(completion), done: 0, chunk_start: 0, bytes: 0 }
    }

    /// The index of the pool buffer this job reads into.
    pub(crate) fn buffer_index(&self) -> usize {
        self.slot.as_ref().map_or(usize::MAX, Slot::index)
    }

    /// Starts the next chunk: returns its file offset, its destination and its length. The
    /// destination lies inside this job's buffer, which stays owned by the job until `finish`.
    pub(crate) fn next_chunk(&mut self) -> (u64, *mut u8, usize) {
        let start = self.done - self.done % self.plan.step;
        self.chunk_start = start;
        let len = (self.plan.span - start).min(MAX_CHUNK);
        let buffer = self.slot.as_ref().map_or(std::ptr::null_mut(), Slot::ptr);
        // The destination stays inside the buffer: `start + len <= span <= capacity`.
        (self.plan.base + start as u64, buffer.wrapping_add(start), len)
    }

    /// Records that the chunk in flight returned `n` bytes.
    pub(crate) fn advance(&mut self, n: usize) -> Step {
        self.bytes += n as u64;
        let end = self.chunk_start + n;
        if end <= self.done {
            return Step::Eof;
        }
        self.done = end;
        if self.done >= self.plan.need() { Step::Done } else { Step::More }
    }

    /// Hands the buffer to the ticket: the read succeeded.
    pub(crate) fn succeed(mut self) {
        let Some(mut slot) = self.slot.take() else { return };
        slot.finish(self.bytes, true);
        let buf = ReadBuf::new(slot, self.plan.head, self.plan.len);
        if let Some(completion) = self.completion.take() {
            completion.complete(Ok(buf));
        }
    }

    /// Fails the read with the OS error a chunk returned.
    pub(crate) fn fail_os(self, source: io::Error) {
        let error = Error::Read { path: self.path.to_path_buf(), offset: self.plan.offset, len: self.plan.len, source };
        self.fail(error);
    }

    /// Fails the read because the file ended inside the requested range.
    pub(crate) fn fail_eof(self) {
        let got = self.done.saturating_sub(self.plan.head).min(self.plan.len);
        let error =
            Error::UnexpectedEof { path: self.path.to_path_buf(), offset: self.plan.offset, len: self.plan.len, got };
        self.fail(error);
    }

    fn fail(mut self, error: Error) {
        if let Some(slot) = &mut self.slot {
            slot.finish(self.bytes, false);
        }
        // The buffer goes back to the pool before the waiter wakes.
        self.slot = None;
        if let Some(completion) = self.completion.take() {
            completion.complete(Err(error));
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // Reached only when a backend thread unwinds with the job in hand (or the streamer is torn
        // down with a read still queued): the waiter gets an error instead of blocking forever.
        if let Some(completion) = self.completion.take() {
            self.slot = None;
            completion.complete(Err(Error::Abandoned {
                path: self.path.to_path_buf(),
                offset: self.plan.offset,
                len: self.plan.len,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_widen_only_when_direct() {
        let plan = ReadPlan::new(5000, 100, false).unwrap();
        assert_eq!((plan.base, plan.head, plan.span), (5000, 0, 100));
        let plan = ReadPlan::new(5000, 100, true).unwrap();
        assert_eq!((plan.base, plan.head, plan.span), (4096, 904, 4096));
        let plan = ReadPlan::new(4096, 4096, true).unwrap();
        assert_eq!((plan.base, plan.head, plan.span), (4096, 0, 4096));
        let plan = ReadPlan::new(4095, 2, true).unwrap();
        assert_eq!((plan.base, plan.head, plan.span), (0, 4095, 8192));
        assert_eq!(ReadPlan::new(0, usize::MAX, true), None);
    }
}
