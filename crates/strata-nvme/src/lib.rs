//! strata-nvme: the weight streamer that reads offloaded weights from NVMe.
//!
//! A [`Streamer`] opens one file (the offload pack) and reads byte ranges of it into buffers
//! from a pool it owns. Reads go through io_uring with `O_DIRECT` into [`ALIGN`]-aligned buffers
//! (registered with the ring where the kernel allows, else plain reads), at most
//! `queue_depth` at a time; each [`Streamer::read`] returns a [`Ticket`] whose
//! [`wait`](Ticket::wait) yields a [`ReadBuf`] holding exactly the requested bytes. Unaligned
//! ranges are widened to the alignment for the device and trimmed for the reader; short reads
//! are resubmitted; a read past the end of the file is an error naming the file, offset and
//! length.
//!
//! Where io_uring is refused (seccomp, `kernel.io_uring_disabled`, an old kernel: probed at
//! open) the streamer falls back to `pread` on worker threads, and where `O_DIRECT` is not
//! supported (tmpfs on older kernels: probed at open) to buffered reads. [`Streamer::backend`]
//! says which path is in use, and opening writes it to stderr in one line, e.g.
//! `strata-nvme: pack.bin: io_uring, O_DIRECT, 4 registered buffers of 4194304 bytes`.
//!
//! Ownership of buffers: a pool buffer belongs to its read from submission until the read
//! completes, even if the [`Ticket`] was dropped; then to the [`ReadBuf`] until that is dropped.
//! Dropping the [`Streamer`] waits for every read in flight before anything is freed.
//!
//! Dependencies: no other strata crate. strata-store is its only user.
#![warn(missing_docs)]

mod buf;
mod error;
mod job;
mod pool;
mod pread;
mod ticket;
mod uring;

#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use crate::buf::AlignedBuf;
pub use crate::error::{Error, Result};
pub use crate::pool::Stats;
pub use crate::ticket::{ReadBuf, Ticket};

use crate::job::{Job, ReadPlan};
use crate::pool::{Pool, Slot};
use crate::pread::PreadWorkers;
use crate::ticket::Completion;
use crate::uring::{Registration, Ring};

/// The alignment of `O_DIRECT` reads: buffer addresses, file offsets and lengths are multiples
/// of it. 4096 covers both 512-byte and 4 KiB logical blocks.
pub const ALIGN: usize = 4096;

/// The most reads a streamer lets be in flight.
const MAX_QUEUE_DEPTH: usize = 4096;
/// The most buffers a pool may have (the kernel's limit on registered buffers).
const MAX_BUFFERS: usize = 1 << 14;

/// The I/O path a [`Streamer`] uses, as chosen at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Reads submitted through io_uring and reaped by a completion thread.
    IoUring {
        /// Whether the file is open with `O_DIRECT` (reads bypass the page cache).
        direct: bool,
        /// Whether the pool's buffers are registered with the ring (`ReadFixed`).
        registered: bool,
    },
    /// Blocking `pread` on worker threads.
    Pread {
        /// Whether the file is open with `O_DIRECT` (reads bypass the page cache).
        direct: bool,
    },
}

impl Backend {
    /// Whether reads bypass the page cache.
    pub fn is_direct(&self) -> bool {
        match *self {
            Backend::IoUring { direct, .. } | Backend::Pread { direct } => direct,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cache = if self.is_direct() { "O_DIRECT" } else { "buffered" };
        match *self {
            Backend::IoUring { registered: true, .. } => write!(f, "io_uring, {cache}, registered buffers"),
            Backend::IoUring { registered: false, .. } => write!(f, "io_uring, {cache}"),
            Backend::Pread { .. } => write!(f, "pread, {cache}"),
        }
    }
}

/// Which I/O path [`Streamer::open`] should take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// io_uring if the kernel allows it, else `pread`.
    #[default]
    Auto,
    /// io_uring or an [`Error::IoUringUnavailable`].
    IoUring,
    /// `pread` on worker threads, even where io_uring works.
    Pread,
}

/// How to open a [`Streamer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamerConfig {
    /// The most reads in flight at once (default 4); at least 1.
    pub queue_depth: usize,
    /// The capacity of each pool buffer (default 4 MiB), rounded up to [`ALIGN`]. A read whose
    /// range, widened to [`ALIGN`], is longer is an [`Error::TooLong`].
    pub buffer_bytes: usize,
    /// The number of pool buffers (default 4); at least 1. A buffer is taken from submission
    /// until the [`ReadBuf`] (or the unwaited [`Ticket`]) is dropped.
    pub buffers: usize,
    /// Whether to try `O_DIRECT` (default true); it is dropped silently where unsupported.
    pub direct: bool,
    /// The I/O path (default [`BackendChoice::Auto`]).
    pub backend: BackendChoice,
}

impl Default for StreamerConfig {
    fn default() -> StreamerConfig {
        StreamerConfig { queue_depth: 4, buffer_bytes: 4 << 20, buffers: 4, direct: true, backend: BackendChoice::Auto }
    }
}

/// The backend a streamer drives: a closed set, dispatched by `match`.
enum Engine {
    Uring(Ring),
    Pread(PreadWorkers),
}

/// Knobs that only tests turn.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Options {
    /// Whether to try registering the pool's buffers with the ring.
    pub(crate) register: bool,
}

/// Streams byte ranges of one open file into pool buffers. `Send + Sync`: any number of threads
/// may submit reads through a shared reference.
pub struct Streamer {
    // Field order is drop order: the engine goes first, and waits for every read in flight.
    engine: Engine,
    pool: Arc<Pool>,
    path: Arc<Path>,
    file_len: u64,
    backend: Backend,
}

impl Streamer {
    /// Opens `path` for streaming: probes `O_DIRECT` and io_uring, allocates the buffer pool,
    /// starts the completion thread (or the `pread` workers), and writes the chosen path to
    /// stderr in one line.
    pub fn open(path: &Path, config: StreamerConfig) -> Result<Streamer> {
        Streamer::open_with(path, config, Options { register: true })
    }

    pub(crate) fn open_with(path: &Path, config: StreamerConfig, options: Options) -> Result<Streamer> {
        let (queue_depth, buffers, buffer_bytes) = validate(path, &config)?;
        let mut notes = Vec::new();
        let (file, direct) = open_file(path, config.direct, &mut notes)?;
        let file_len = file.metadata().map_err(|source| Error::Open { path: path.to_path_buf(), source })?.len();
        let file = Arc::new(file);
        let pool = Pool::new(buffers, buffer_bytes, queue_depth);
        // No more reads than buffers are ever in flight.
        let queue_depth = queue_depth.min(buffers);

        let ring = match config.backend {
            BackendChoice::Pread => None,
            BackendChoice::IoUring | BackendChoice::Auto => {
                match Ring::start(Arc::clone(&file), Arc::clone(&pool), queue_depth, options.register) {
                    Ok(ring) => Some(ring),
                    Err(reason) if config.backend == BackendChoice::IoUring => {
                        return Err(Error::IoUringUnavailable { path: path.to_path_buf(), reason });
                    }
                    Err(reason) => {
                        notes.push(format!("io_uring unavailable: {reason}"));
                        None
                    }
                }
            }
        };
        let (engine, backend) = match ring {
            Some((ring, registration)) => {
                if let Registration::Refused(reason) = registration {
                    notes.push(format!("buffer registration refused: {reason}"));
                }
                let backend = Backend::IoUring { direct, registered: ring.registered() };
                (Engine::Uring(ring), backend)
            }
            None => {
                let workers = PreadWorkers::start(Arc::clone(&file), queue_depth)
                    .map_err(|source| Error::Open { path: path.to_path_buf(), source })?;
                (Engine::Pread(workers), Backend::Pread { direct })
            }
        };

        let kind = if matches!(backend, Backend::IoUring { .. }) { "io_uring" } else { "pread" };
        let cache = if direct { "O_DIRECT" } else { "buffered" };
        let registered = if matches!(backend, Backend::IoUring { registered: true, .. }) { "registered " } else { "" };
        let notes = if notes.is_empty() { String::new() } else { format!(" ({})", notes.join("; ")) };
        eprintln!(
            "strata-nvme: {}: {kind}, {cache}, {buffers} {registered}buffers of {buffer_bytes} bytes{notes}",
            path.display()
        );

        Ok(Streamer { engine, pool, path: Arc::from(path), file_len, backend })
    }

    /// The I/O path in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The file being streamed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length when it was opened.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The capacity of each pool buffer: the longest read, after widening to [`ALIGN`].
    pub fn buffer_bytes(&self) -> usize {
        self.pool.buffer_bytes()
    }

    /// Submits a read of `len` bytes at `offset`. Blocks only while every pool buffer is taken
    /// or `queue_depth` reads are in flight; reads complete in any order.
    ///
    /// A buffer stays taken until its [`ReadBuf`] is dropped (or, for a dropped ticket, until
    /// its read completes). A thread that holds every buffer's `ReadBuf` (or unwaited tickets
    /// for all of them) and calls `read` again blocks until another thread drops one: with one
    /// thread, drop or wait earlier reads first, or use [`try_read`](Streamer::try_read).
    ///
    /// Errors at once for a range past the end of the file ([`Error::PastEnd`]) or one that does
    /// not fit a buffer ([`Error::TooLong`]); I/O errors come from [`Ticket::wait`].
    pub fn read(&self, offset: u64, len: usize) -> Result<Ticket> {
        let Some(plan) = self.plan(offset, len)? else { return Ok(Ticket::empty()) };
        let slot = self.pool.acquire();
        self.submit(plan, slot)
    }

    /// Like [`read`](Streamer::read), but returns `Ok(None)` instead of blocking when no buffer
    /// or no place in the queue is free.
    pub fn try_read(&self, offset: u64, len: usize) -> Result<Option<Ticket>> {
        let Some(plan) = self.plan(offset, len)? else { return Ok(Some(Ticket::empty())) };
        match self.pool.try_acquire() {
            Some(slot) => self.submit(plan, slot).map(Some),
            None => Ok(None),
        }
    }

    /// Bytes read, reads completed and the time spent with reads in flight, since open.
    pub fn stats(&self) -> Stats {
        self.pool.stats()
    }

    /// Checks a range and widens it; `None` for an empty one.
    fn plan(&self, offset: u64, len: usize) -> Result<Option<ReadPlan>> {
        let past_end = || Error::PastEnd { path: self.path.to_path_buf(), offset, len, file_len: self.file_len };
        let end = offset.checked_add(len as u64).ok_or_else(past_end)?;
        if end > self.file_len {
            return Err(past_end());
        }
        if len == 0 {
            return Ok(None);
        }
        let buffer_bytes = self.pool.buffer_bytes();
        let too_long = |needed| Error::TooLong { path: self.path.to_path_buf(), offset, len, needed, buffer_bytes };
        let plan = ReadPlan::new(offset, len, self.backend.is_direct()).ok_or_else(|| too_long(usize::MAX))?;
        if plan.span > buffer_bytes {
            return Err(too_long(plan.span));
        }
        Ok(Some(plan))
    }

    fn submit(&self, plan: ReadPlan, slot: Slot) -> Result<Ticket> {
        let completion = Completion::new();
        let job = Job::new(Arc::clone(&self.path), plan, slot, Arc::clone(&completion));
        match &self.engine {
            Engine::Uring(ring) => ring.submit(job).map_err(|source| Error::Read {
                path: self.path.to_path_buf(),
                offset: plan.offset,
                len: plan.len,
                source,
            })?,
            Engine::Pread(workers) => workers.submit(job),
        }
        Ok(Ticket::new(completion))
    }

    #[cfg(test)]
    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }
}

impl fmt::Debug for Streamer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Streamer")
            .field("path", &self.path)
            .field("file_len", &self.file_len)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// Checks the config; returns the queue depth, the buffer count and the rounded buffer size.
fn validate(path: &Path, config: &StreamerConfig) -> Result<(usize, usize, usize)> {
    let invalid = |field, value, limit| Error::Config { path: path.to_path_buf(), field, value, limit };
    if !(1..=MAX_QUEUE_DEPTH).contains(&config.queue_depth) {
        return Err(invalid("queue_depth", config.queue_depth, "must be between 1 and 4096"));
    }
    if !(1..=MAX_BUFFERS).contains(&config.buffers) {
        return Err(invalid("buffers", config.buffers, "must be between 1 and 16384"));
    }
    let buffer_bytes = config
        .buffer_bytes
        .checked_next_multiple_of(ALIGN)
        .filter(|&b| b > 0 && b <= isize::MAX as usize / config.buffers)
        .ok_or_else(|| invalid("buffer_bytes", config.buffer_bytes, "must be at least 1 and fit in memory"))?;
    Ok((config.queue_depth, config.buffers, buffer_bytes))
}

fn is_einval(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

fn open_plain(path: &Path, direct: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options.open(path)
}

/// Opens the file, with `O_DIRECT` if asked and it works: the open and a first direct read must
/// both be accepted. Returns the file and whether it is direct; fallbacks are noted.
fn open_file(path: &Path, direct: bool, notes: &mut Vec<String>) -> Result<(File, bool)> {
    let open_error = |source| Error::Open { path: path.to_path_buf(), source };
    if !direct {
        return Ok((open_plain(path, false).map_err(open_error)?, false));
    }
    let file = match open_plain(path, true) {
        Ok(file) => file,
        Err(e) if is_einval(&e) => {
            notes.push(format!("O_DIRECT refused at open: {e}"));
            return Ok((open_plain(path, false).map_err(open_error)?, false));
        }
        Err(e) => return Err(open_error(e)),
    };
    let mut probe = AlignedBuf::zeroed(ALIGN);
    loop {
        match file.read_at(probe.as_mut_slice(), 0) {
            Ok(_) => return Ok((file, true)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_einval(&e) => {
                notes.push(format!("O_DIRECT read refused: {e}"));
                return Ok((open_plain(path, false).map_err(open_error)?, false));
            }
            Err(source) => return Err(Error::Read { path: path.to_path_buf(), offset: 0, len: ALIGN, source }),
        }
    }
}

/// Whether files in `dir` can be read with `O_DIRECT`: writes a one-block probe file there,
/// reads it back direct into an aligned buffer, and removes it. False if any step fails.
pub fn direct_io_supported(dir: &Path) -> bool {
    static PROBES: AtomicUsize = AtomicUsize::new(0);
    let name = format!(".strata-nvme-direct-probe-{}-{}", std::process::id(), PROBES.fetch_add(1, Ordering::Relaxed));
    let probe: PathBuf = dir.join(name);
    let Ok(file) = OpenOptions::new().write(true).create_new(true).open(&probe) else { return false };
    let supported = file.write_all_at(&[0x5a; ALIGN], 0).is_ok()
        && open_plain(&probe, true).is_ok_and(|file| {
            let mut buf = AlignedBuf::zeroed(ALIGN);
            file.read_at(buf.as_mut_slice(), 0).is_ok_and(|n| n == ALIGN && buf.as_slice().iter().all(|&b| b == 0x5a))
        });
    drop(file);
    let _ = fs::remove_file(&probe);
    supported
}
