//! Tests that need the crate's insides: io_uring with buffer registration refused (as
//! `RLIMIT_MEMLOCK` would refuse it for an unprivileged user), buffers returning to the pool
//! after dropped tickets, and the short-read arithmetic of a job.

use std::io::Write;
use std::time::{Duration, Instant};

use tempfile::NamedTempFile;

use crate::job::{Job, ReadPlan, Step};
use crate::pool::Pool;
use crate::ticket::Completion;
use crate::{ALIGN, Backend, BackendChoice, Error, Options, Streamer, StreamerConfig};

fn pattern_byte(pos: u64) -> u8 {
    (pos - pos % 8).to_le_bytes()[(pos % 8) as usize]
}

fn pattern_file(len: usize) -> NamedTempFile {
    let mut file = NamedTempFile::new().expect("create a temp file");
    let bytes: Vec<u8> = (0..len as u64).map(pattern_byte).collect();
    file.write_all(&bytes).expect("write the pattern");
    file
}

fn assert_pattern(buf: &[u8], offset: u64) {
    assert!(buf.iter().enumerate().all(|(i, &b)| b == pattern_byte(offset + i as u64)), "read at {offset}");
}

/// Waits (briefly) until every buffer of the streamer's pool is free again.
fn wait_all_free(streamer: &Streamer) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !streamer.pool().all_free() {
        assert!(Instant::now() < deadline, "buffers did not return to the pool");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn io_uring_without_registered_buffers_reads_with_plain_read() {
    let file = pattern_file(300_000);
    let config = StreamerConfig {
        backend: BackendChoice::IoUring,
        buffer_bytes: 128 << 10,
        buffers: 8,
        ..StreamerConfig::default()
    };
    let streamer = match Streamer::open_with(file.path(), config, Options { register: false }) {
        Ok(streamer) => streamer,
        Err(Error::IoUringUnavailable { reason, .. }) => {
            eprintln!("skipping: io_uring is unavailable: {reason}");
            return;
        }
        Err(e) => panic!("open: {e}"),
    };
    assert!(matches!(streamer.backend(), Backend::IoUring { registered: false, .. }));
    let tickets: Vec<_> = (0..8u64).map(|i| (i * 33_333, streamer.read(i * 33_333, 50_000).unwrap())).collect();
    for (offset, ticket) in tickets.into_iter().rev() {
        assert_pattern(&ticket.wait().unwrap(), offset);
    }
}

#[test]
fn registered_buffers_are_used_where_the_kernel_allows() {
    let file = pattern_file(100_000);
    let config =
        StreamerConfig { backend: BackendChoice::IoUring, buffer_bytes: 64 << 10, ..StreamerConfig::default() };
    match Streamer::open(file.path(), config) {
        Ok(streamer) => {
            // Registration may be refused (RLIMIT_MEMLOCK); either way the reads are right.
            eprintln!("backend: {}", streamer.backend());
            assert_pattern(&streamer.read(4097, 60_000).unwrap().wait().unwrap(), 4097);
        }
        Err(Error::IoUringUnavailable { reason, .. }) => eprintln!("skipping: io_uring is unavailable: {reason}"),
        Err(e) => panic!("open: {e}"),
    }
}

#[test]
fn every_buffer_returns_after_dropped_tickets_and_bufs() {
    let file = pattern_file(1 << 20);
    for backend in [BackendChoice::Auto, BackendChoice::Pread] {
        let config = StreamerConfig { backend, buffers: 3, queue_depth: 2, ..StreamerConfig::default() };
        let streamer = Streamer::open(file.path(), config).unwrap();
        for i in 0..10u64 {
            drop(streamer.read(i * 4096, 100_000).unwrap());
        }
        let kept = streamer.read(5, 5).unwrap().wait().unwrap();
        assert!(!streamer.pool().all_free());
        drop(kept);
        wait_all_free(&streamer);
        let stats = streamer.stats();
        assert_eq!((stats.reads, stats.failed), (11, 0), "{}", streamer.backend());
    }
}

#[test]
fn short_direct_reads_restart_at_the_aligned_position() {
    let pool = Pool::new(1, 4 * ALIGN, 1);
    let plan = ReadPlan::new(100, 3 * ALIGN, true).unwrap();
    assert_eq!((plan.base, plan.head, plan.span), (0, 100, 4 * ALIGN));
    let completion = Completion::new();
    let mut job = Job::new(std::path::Path::new("f").into(), plan, pool.acquire(), completion);
    let (offset, _, len) = job.next_chunk();
    assert_eq!((offset, len), (0, 4 * ALIGN));
    // A short read ending off the alignment: the next chunk restarts at the block below it.
    assert_eq!(job.advance(ALIGN + 10), Step::More);
    let (offset, _, len) = job.next_chunk();
    assert_eq!((offset, len), (ALIGN as u64, 3 * ALIGN));
    // Rereading only what was already there is the end of the file.
    assert_eq!(job.advance(10), Step::Eof);
    // A fresh job that gets the rest in the second chunk is done.
    let pool = Pool::new(1, 4 * ALIGN, 1);
    let mut job = Job::new(std::path::Path::new("f").into(), plan, pool.acquire(), Completion::new());
    job.next_chunk();
    assert_eq!(job.advance(2 * ALIGN), Step::More);
    let (offset, _, len) = job.next_chunk();
    assert_eq!((offset, len), (2 * ALIGN as u64, 2 * ALIGN));
    assert_eq!(job.advance(ALIGN + 100), Step::Done);
}

#[test]
fn buffered_short_reads_continue_where_they_stopped() {
    let pool = Pool::new(1, 4 * ALIGN, 1);
    let plan = ReadPlan::new(100, 1000, false).unwrap();
    let mut job = Job::new(std::path::Path::new("f").into(), plan, pool.acquire(), Completion::new());
    assert_eq!(job.next_chunk().0, 100);
    assert_eq!(job.advance(300), Step::More);
    let (offset, _, len) = job.next_chunk();
    assert_eq!((offset, len), (400, 700));
    assert_eq!(job.advance(0), Step::Eof);
}
