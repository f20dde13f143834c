//! The crate's error type: every variant names the file, and a read's errors also name the
//! offset and length that were asked for, so a failed weight load says exactly what it tried.

use std::io;
use std::path::PathBuf;

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong opening a file for streaming or reading from it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened, or its length could not be read.
    #[error("{path}: cannot open for streaming: {source}", path = path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A [`StreamerConfig`](crate::StreamerConfig) field is out of range.
    #[error("{path}: streamer config field `{field}` = {value} is invalid: {limit}", path = path.display())]
    Config {
        /// The file the streamer was opened for.
        path: PathBuf,
        /// The field's name.
        field: &'static str,
        /// The value that was given.
        value: usize,
        /// What the field must satisfy.
        limit: &'static str,
    },
    /// [`BackendChoice::IoUring`](crate::BackendChoice::IoUring) was asked for, but the kernel
    /// refused io_uring (seccomp, `kernel.io_uring_disabled`, an old kernel).
    #[error("{path}: io_uring is unavailable: {reason}", path = path.display())]
    IoUringUnavailable {
        /// The file the streamer was opened for.
        path: PathBuf,
        /// What the probe at open saw.
        reason: String,
    },
    /// The requested range does not lie inside the file.
    #[error(
        "{path}: read of {len} bytes at offset {offset} ends past the end of the file ({file_len} bytes)",
        path = path.display()
    )]
    PastEnd {
        /// The file.
        path: PathBuf,
        /// The first byte asked for.
        offset: u64,
        /// The number of bytes asked for.
        len: usize,
        /// The file's length when the streamer opened it.
        file_len: u64,
    },
    /// The requested range, widened to [`ALIGN`](crate::ALIGN) for `O_DIRECT`, does not fit in
    /// one pool buffer.
    #[error(
        "{path}: read of {len} bytes at offset {offset} needs {needed} bytes of buffer, more than a pool \
         buffer holds ({buffer_bytes} bytes)",
        path = path.display()
    )]
    TooLong {
        /// The file.
        path: PathBuf,
        /// The first byte asked for.
        offset: u64,
        /// The number of bytes asked for.
        len: usize,
        /// The buffer bytes the read needs after widening.
        needed: usize,
        /// The capacity of each pool buffer.
        buffer_bytes: usize,
    },
    /// The operating system failed the read.
    #[error("{path}: read of {len} bytes at offset {offset} failed: {source}", path = path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The first byte asked for.
        offset: u64,
        /// The number of bytes asked for.
        len: usize,
        /// The operating system's error.
        source: io::Error,
    },
    /// The file ended before the requested range did (it was truncated after the streamer
    /// opened it).
    #[error(
        "{path}: read of {len} bytes at offset {offset} reached the end of the file after {got} of them",
        path = path.display()
    )]
    UnexpectedEof {
        /// The file.
        path: PathBuf,
        /// The first byte asked for.
        offset: u64,
        /// The number of bytes asked for.
        len: usize,
        /// How many of the requested bytes were read before the end of the file.
        got: usize,
    },
    /// The streamer's I/O thread stopped before the read completed (it panicked).
    #[error("{path}: read of {len} bytes at offset {offset} was abandoned by the streamer's I/O thread", path = path.display())]
    Abandoned {
        /// The file.
        path: PathBuf,
        /// The first byte asked for.
        offset: u64,
        /// The number of bytes asked for.
        len: usize,
    },
}
