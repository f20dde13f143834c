//! The io_uring backend: one ring per streamer, submissions behind a mutex, and a reaper thread
//! that waits for completions, resubmits short reads and completes tickets.
//!
//! This is the only module that hands buffers to the kernel asynchronously, so it holds the
//! invariant the rest of the crate relies on: a job (and with it its pool buffer) stays in the
//! in-flight table, indexed by its buffer, from the moment its first chunk is queued until the
//! completion of its last chunk is reaped, whether or not anyone still waits for it. Shutting
//! down queues a no-op to wake the reaper, which exits only once the table is empty; if the
//! reaper died with reads in flight, the pool is leaked rather than freed under the kernel.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use io_uring::{IoUring, Probe, cqueue, opcode, types};

use crate::job::{Job, Step};
use crate::pool::Pool;

/// The `user_data` of the no-op that wakes the reaper at shutdown; real reads carry their
/// buffer index.
const WAKE: u64 = u64::MAX;
/// The `user_data` of the no-op the probe at open sends round the ring.
const PROBE: u64 = u64::MAX - 1;
/// How often a submission refused with `EAGAIN`/`EBUSY` is retried before giving up.
const SUBMIT_RETRIES: usize = 1000;
/// One registered buffer may not exceed 1 GiB.
const MAX_REGISTERED_BUFFER: usize = 1 << 30;

/// A running ring and its reaper thread.
pub(crate) struct Ring {
    shared: Arc<Shared>,
    reaper: Option<JoinHandle<()>>,
    registered: bool,
}

/// How registering the pool's buffers went.
pub(crate) enum Registration {
    /// Reads use `ReadFixed` into the registered buffers.
    Registered,
    /// Registration was not asked for.
    Skipped,
    /// The kernel refused it (typically `RLIMIT_MEMLOCK`); reads use plain `Read`.
    Refused(String),
}

struct Shared {
    // Field order is drop order: the ring (and with it the buffer registration) goes first.
    ring: IoUring,
    file: Arc<File>,
    pool: Arc<Pool>,
    registered: bool,
    table: Mutex<Table>,
    stopping: AtomicBool,
}

/// The reads in flight, indexed by pool buffer.
struct Table {
    jobs: Vec<Option<Job>>,
    live: usize,
}

impl Ring {
    /// Sets up a ring for `file` with room for `queue_depth` reads, checks that it works, and
    /// registers the pool's buffers if `register` is set. The error says why io_uring cannot be
    /// used.
    pub(crate) fn start(
        file: Arc<File>,
        pool: Arc<Pool>,
        queue_depth: usize,
        register: bool,
    ) -> Result<(Ring, Registration), String> {
        // One entry per read in flight, plus the shutdown no-op.
        let entries = u32::try_from((queue_depth + 1).next_power_of_two()).map_err(|_| "queue too deep".to_string())?;
        let ring = IoUring::new(entries).map_err(|e| format!("io_uring_setup failed: {e}"))?;
        probe(&ring)?;
        let registration = if !register {
            Registration::Skipped
        } else if pool.buffer_bytes() > MAX_REGISTERED_BUFFER {
            Registration::Refused(format!("buffers over {MAX_REGISTERED_BUFFER} bytes cannot be registered"))
        } else {
            register_buffers(&ring, &pool)
        };
        let registered = matches!(registration, Registration::Registered);
        let table = Table { jobs: (0..pool.buffers().len()).map(|_| None).collect(), live: 0 };
        let shared = Arc::new(Shared {
            ring,
            file,
            pool,
            registered,
            table: Mutex::new(table),
            stopping: AtomicBool::new(false),
        });
        let reaper = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("strata-nvme-reaper".into())
                .spawn(move || reap(&shared))
                .map_err(|e| format!("cannot start the reaper thread: {e}"))?
        };
        Ok((Ring { shared, reaper: Some(reaper), registered }, registration))
    }

    pub(crate) fn registered(&self) -> bool {
        self.registered
    }

    /// Queues the job's first chunk and submits it. On an error the job is either dropped
    /// (failing its ticket) or, if the kernel already holds its entry, left to complete.
    pub(crate) fn submit(&self, job: Job) -> io::Result<()> {
        let mut table = self.shared.lock();
        self.shared.queue(&mut table, job)?;
        self.shared.flush()
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        {
            let _table = self.shared.lock();
            let wake = opcode::Nop::new().build().user_data(WAKE);
            // SAFETY: the submission queue is only touched under the table lock, held here; a
            // no-op refers to no memory.
            let pushed = unsafe { self.shared.ring.submission_shared().push(&wake) };
            // The queue has room for every read in flight plus this entry. Were it full anyway,
            // the reaper still exits after the completion of the last read in flight.
            debug_assert!(pushed.is_ok(), "no room for the shutdown no-op");
            let _ = self.shared.flush();
        }
        if let Some(reaper) = self.reaper.take() {
            let _ = reaper.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // No code panics while holding the lock, so a poisoned table is still consistent.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts the job in the table and queues an entry for its next chunk. The caller holds the
    /// table lock, which also guards the submission queue.
    fn queue(&self, table: &mut Table, mut job: Job) -> io::Result<()> {
        let index = job.buffer_index();
        let (offset, dst, len) = job.next_chunk();
        // Chunks are at most 1 GiB (see `Job::next_chunk`).
        let len = len as u32;
        let fd = types::Fd(self.file.as_raw_fd());
        let entry = if self.registered {
            opcode::ReadFixed::new(fd, dst, len, index as u16).offset(offset).build()
        } else {
            opcode::Read::new(fd, dst, len).offset(offset).build()
        };
        let entry = entry.user_data(index as u64);
        debug_assert!(table.jobs[index].is_none(), "buffer {index} is already in flight");
        table.jobs[index] = Some(job);
        table.live += 1;
        // SAFETY: the submission queue is only touched under the table lock, which the caller
        // holds. The entry writes `len` bytes at `dst`, inside the job's pool buffer (registered
        // at `index` when `registered`); the job, which owns that buffer, sits in the table until
        // the reaper takes the entry's completion, and the pool outlives the ring (or is leaked,
        // see `Drop for Shared`), so the memory stays valid and unaliased while the kernel
        // writes it. The file stays open for as long as `self` lives.
        let pushed = unsafe { self.ring.submission_shared().push(&entry) };
        if pushed.is_err() {
            // Never expected: the queue has room for every read in flight. Dropping the job
            // fails its ticket and frees its buffer (the kernel never saw it).
            table.jobs[index] = None;
            table.live -= 1;
            return Err(io::Error::other("the io_uring submission queue is full"));
        }
        Ok(())
    }

    /// Submits what is queued, retrying while the kernel is interrupted or busy. Entries the
    /// kernel did not take stay queued and go with the next submission.
    fn flush(&self) -> io::Result<()> {
        let mut retries = 0;
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_busy(&e) && retries < SUBMIT_RETRIES => {
                    retries += 1;
                    thread::sleep(Duration::from_micros(100));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let table = self.table.get_mut().unwrap_or_else(PoisonError::into_inner);
        if table.live > 0 {
            // The reaper died with reads in flight: the kernel may still write into their
            // buffers, so the pool must never be freed. Leaking it is the safe choice.
            std::mem::forget(Arc::clone(&self.pool));
        }
    }
}

fn is_busy(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY))
}

/// Checks that the kernel has the read opcodes and that a no-op goes round the ring.
fn probe(ring: &IoUring) -> Result<(), String> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| format!("cannot probe opcodes: {e}"))?;
    if !probe.is_supported(opcode::Read::CODE) || !probe.is_supported(opcode::ReadFixed::CODE) {
        return Err("the kernel lacks IORING_OP_READ".into());
    }
    let nop = opcode::Nop::new().build().user_data(PROBE);
    // SAFETY: the ring is not shared yet, so no other submission queue exists; a no-op refers to
    // no memory.
    unsafe { ring.submission_shared().push(&nop) }.map_err(|e| format!("cannot queue a no-op: {e}"))?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("io_uring_enter failed: {e}")),
        }
    }
    // SAFETY: the ring is not shared yet, so no other completion queue exists.
    let cqe: Option<cqueue::Entry> = unsafe { ring.completion_shared() }.next();
    match cqe {
        Some(cqe) if cqe.user_data() == PROBE && cqe.result() >= 0 => Ok(()),
        Some(cqe) => Err(format!("a no-op failed: {}", io::Error::from_raw_os_error(-cqe.result()))),
        None => Err("a no-op did not complete".into()),
    }
}

/// Registers every pool buffer with the ring, at its pool index.
fn register_buffers(ring: &IoUring, pool: &Pool) -> Registration {
    let iovecs: Vec<libc::iovec> = pool
        .buffers()
        .iter()
        .map(|buf| libc::iovec { iov_base: buf.as_ptr().cast(), iov_len: buf.capacity() })
        .collect();
    // SAFETY: each iovec covers one whole pool buffer, and the pool outlives the ring: `Shared`
    // holds it and drops the ring first, and leaks it if reads are still in flight.
    match unsafe { ring.submitter().register_buffers(&iovecs) } {
        Ok(()) => Registration::Registered,
        Err(e) => Registration::Refused(e.to_string()),
    }
}

/// What became of a reaped read.
enum Outcome {
    Done(Job),
    Failed(Job, io::Error),
    Eof(Job),
}

/// The reaper thread: waits for completions and acts on them until shutdown with nothing left
/// in flight.
fn reap(shared: &Shared) {
    let mut completions: Vec<(u64, i32)> = Vec::new();
    let mut outcomes: Vec<Outcome> = Vec::new();
    loop {
        // SAFETY: only this thread reads the completion queue (the probe at open ran before it
        // started).
        completions.extend(unsafe { shared.ring.completion_shared() }.map(|cqe| (cqe.user_data(), cqe.result())));
        if !completions.is_empty() {
            let mut table = shared.lock();
            let mut resubmitted = false;
            for (user_data, result) in completions.drain(..) {
                resubmitted |= complete(shared, &mut table, user_data, result, &mut outcomes);
            }
            if resubmitted && let Err(e) = shared.flush() {
                // The entries stay queued and go with the next submission (at the latest the
                // shutdown no-op's).
                eprintln!("strata-nvme: resubmitting short reads failed: {e}");
            }
        }
        // Tickets are completed outside the lock: waking a waiter may drop buffers.
        for outcome in outcomes.drain(..) {
            match outcome {
                Outcome::Done(job) => job.succeed(),
                Outcome::Failed(job, e) => job.fail_os(e),
                Outcome::Eof(job) => job.fail_eof(),
            }
        }
        if shared.stopping.load(Ordering::Acquire) && shared.lock().live == 0 {
            return;
        }
        match shared.ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted || is_busy(&e) => {}
            Err(e) => {
                eprintln!("strata-nvme: waiting for io_uring completions failed: {e}");
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Acts on one completion: finishes the read or queues its next chunk (returning true then).
fn complete(shared: &Shared, table: &mut Table, user_data: u64, result: i32, outcomes: &mut Vec<Outcome>) -> bool {
    if user_data == WAKE || user_data == PROBE {
        return false;
    }
    let Some(job) = usize::try_from(user_data).ok().and_then(|i| table.jobs.get_mut(i)).and_then(Option::take) else {
        debug_assert!(false, "a completion for buffer {user_data}, which has no read in flight");
        return false;
    };
    table.live -= 1;
    let mut job = job;
    let step = match usize::try_from(result) {
        Ok(n) => job.advance(n),
        Err(_) if matches!(-result, libc::EINTR | libc::EAGAIN) => Step::More,
        Err(_) => {
            outcomes.push(Outcome::Failed(job, io::Error::from_raw_os_error(-result)));
            return false;
        }
    };
    match step {
        Step::Done => outcomes.push(Outcome::Done(job)),
        Step::Eof => outcomes.push(Outcome::Eof(job)),
        Step::More => {
            // `queue` puts the job back in the table; on failure it drops the job, which fails
            // its ticket.
            if let Err(e) = shared.queue(table, job) {
                eprintln!("strata-nvme: cannot resubmit a short read: {e}");
                return false;
            }
            return true;
        }
    }
    false
}
