//! The streamer through its public API, on every backend this machine allows: aligned and
//! unaligned ranges, ranges touching the end of the file, concurrent out-of-order reads from
//! several threads, dropped tickets, reads past the end, pool exhaustion, and tmpfs.
//!
//! Test files hold a known pattern: the little-endian u64 at every 8-byte boundary is its own
//! offset. A backend the kernel refuses is skipped with a message on stderr.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use strata_nvme::{
    ALIGN, AlignedBuf, Backend, BackendChoice, Error, ReadBuf, Streamer, StreamerConfig, direct_io_supported,
};
use tempfile::NamedTempFile;

/// A little over 1 MiB, deliberately not a multiple of `ALIGN`.
const FILE_LEN: usize = (1 << 20) + 1234;

/// The byte at `pos` of a pattern file.
fn pattern_byte(pos: u64) -> u8 {
    (pos - pos % 8).to_le_bytes()[(pos % 8) as usize]
}

fn pattern_file_in(dir: &Path, len: usize) -> NamedTempFile {
    let mut file = NamedTempFile::new_in(dir).expect("create a temp file");
    let bytes: Vec<u8> = (0..len as u64).map(pattern_byte).collect();
    file.write_all(&bytes).expect("write the pattern");
    file.flush().expect("flush the pattern");
    file
}

fn pattern_file(len: usize) -> NamedTempFile {
    pattern_file_in(&std::env::temp_dir(), len)
}

/// Asserts that `buf` holds exactly the pattern bytes `offset..offset + len`.
fn assert_pattern(buf: &[u8], offset: u64, len: usize, what: &str) {
    assert_eq!(buf.len(), len, "{what}: length of the read at {offset}");
    if let Some(i) = (0..len).find(|&i| buf[i] != pattern_byte(offset + i as u64)) {
        panic!("{what}: byte {} of the read at {offset} (+{len}) differs", i);
    }
}

/// Reads a range, waits, and checks the bytes.
fn check(streamer: &Streamer, offset: u64, len: usize) {
    let what = streamer.backend().to_string();
    let buf = streamer.read(offset, len).unwrap_or_else(|e| panic!("{what}: submit: {e}"));
    let buf = buf.wait().unwrap_or_else(|e| panic!("{what}: wait: {e}"));
    assert_pattern(&buf, offset, len, &what);
}

/// Opens `path` with `config` under each backend choice and direct setting, skipping io_uring
/// with a message where the kernel refuses it, and hands each streamer (and its config) to `body`.
fn open_each(path: &Path, config: StreamerConfig, mut body: impl FnMut(Streamer, StreamerConfig)) {
    for backend in [BackendChoice::Auto, BackendChoice::IoUring, BackendChoice::Pread] {
        for direct in [true, false] {
            let config = StreamerConfig { backend, direct, ..config.clone() };
            match Streamer::open(path, config.clone()) {
                Ok(streamer) => {
                    assert_backend_matches(&streamer, backend, direct, path);
                    body(streamer, config);
                }
                Err(Error::IoUringUnavailable { reason, .. }) if backend == BackendChoice::IoUring => {
                    eprintln!("skipping the io_uring backend: {reason}");
                }
                Err(e) => panic!("open with {backend:?}, direct {direct}: {e}"),
            }
        }
    }
}

/// `open_each` for bodies that only borrow the streamer.
fn each_backend(path: &Path, config: StreamerConfig, mut body: impl FnMut(&Streamer)) {
    open_each(path, config, |streamer, _| body(&streamer));
}

fn assert_backend_matches(streamer: &Streamer, choice: BackendChoice, direct: bool, path: &Path) {
    let backend = streamer.backend();
    match choice {
        BackendChoice::IoUring => assert!(matches!(backend, Backend::IoUring { .. }), "{backend}"),
        BackendChoice::Pread => assert!(matches!(backend, Backend::Pread { .. }), "{backend}"),
        BackendChoice::Auto => {}
    }
    if !direct {
        assert!(!backend.is_direct(), "{backend}: O_DIRECT was not asked for");
    } else if let Some(dir) = path.parent() {
        assert_eq!(backend.is_direct(), direct_io_supported(dir), "{backend}: O_DIRECT where the probe says");
    }
}

fn small_config() -> StreamerConfig {
    StreamerConfig { queue_depth: 4, buffer_bytes: 2 << 20, buffers: 4, ..StreamerConfig::default() }
}

#[test]
fn aligned_unaligned_and_end_touching_ranges() {
    let file = pattern_file(FILE_LEN);
    let end = FILE_LEN as u64;
    let ranges: &[(u64, usize)] = &[
        (0, ALIGN),
        (ALIGN as u64, 2 * ALIGN),
        (0, 1),
        (1, 1),
        (7, 9),
        (ALIGN as u64 - 1, 2),
        (12345, 54321),
        (3 * ALIGN as u64 + 100, 5 * ALIGN),
        (end - 1, 1),
        (end - 100, 100),
        (end - 5000, 5000),
        (end - ALIGN as u64, ALIGN),
        (end - 1234, 1234),
        (0, FILE_LEN),
        (end, 0),
        (500, 0),
    ];
    each_backend(file.path(), small_config(), |streamer| {
        assert_eq!(streamer.file_len(), end);
        assert_eq!(streamer.path(), file.path());
        for &(offset, len) in ranges {
            check(streamer, offset, len);
        }
    });
}

#[test]
fn concurrent_reads_complete_out_of_order() {
    let file = pattern_file(FILE_LEN);
    let config = StreamerConfig { queue_depth: 3, buffer_bytes: 64 << 10, buffers: 8, ..StreamerConfig::default() };
    each_backend(file.path(), config, |streamer| {
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                scope.spawn(move || {
                    // A small linear congruential generator gives each thread its own ranges.
                    let mut state = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(t + 1);
                    let mut next = move || {
                        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                        state >> 33
                    };
                    for _ in 0..25 {
                        // Two reads in flight per thread, waited for in reverse order.
                        let mut pending = Vec::new();
                        for _ in 0..2 {
                            let len = 1 + (next() % 40_000) as usize;
                            let offset = next() % (FILE_LEN - len) as u64;
                            pending.push((offset, len, streamer.read(offset, len).expect("submit")));
                        }
                        while let Some((offset, len, ticket)) = pending.pop() {
                            let buf = ticket.wait().expect("wait");
                            assert_pattern(&buf, offset, len, &streamer.backend().to_string());
                        }
                    }
                });
            }
        });
        let stats = streamer.stats();
        assert_eq!(stats.reads, 4 * 25 * 2);
        assert_eq!(stats.failed, 0);
        assert!(stats.busy > Duration::ZERO);
    });
}

#[test]
fn dropped_tickets_return_their_buffers() {
    let file = pattern_file(FILE_LEN);
    let config = StreamerConfig { queue_depth: 1, buffer_bytes: 256 << 10, buffers: 1, ..StreamerConfig::default() };
    each_backend(file.path(), config, |streamer| {
        // Dropped at once, while the read is (most likely) in flight: the next read waits for it.
        drop(streamer.read(0, 200_000).expect("submit"));
        check(streamer, 777, 100_000);
        // Dropped after completion: the buffer held by the finished read goes back.
        let ticket = streamer.read(4096, 1000).expect("submit");
        while !ticket.is_done() {
            std::thread::yield_now();
        }
        drop(ticket);
        check(streamer, 5, 5);
        // Many dropped in a row through a one-buffer pool.
        for i in 0..20u64 {
            drop(streamer.read(i * 1000, 3000).expect("submit"));
        }
        check(streamer, 0, 256 << 10);
        assert_eq!(streamer.stats().failed, 0);
    });
}

#[test]
fn reads_past_the_end_are_errors_naming_the_range() {
    let file = pattern_file(FILE_LEN);
    let end = FILE_LEN as u64;
    each_backend(file.path(), small_config(), |streamer| {
        for (offset, len) in [(end - 10, 20), (end, 1), (end + 1, 0), (end + 4096, 4096), (u64::MAX, 10)] {
            let err = streamer.read(offset, len).expect_err("a read past the end");
            assert!(
                matches!(err, Error::PastEnd { offset: o, len: l, file_len, .. } if o == offset && l == len && file_len == end)
            );
            let message = err.to_string();
            assert!(message.contains(&file.path().display().to_string()), "{message}");
            assert!(message.contains(&offset.to_string()) && message.contains(&len.to_string()), "{message}");
        }
        // The streamer still works after the errors.
        check(streamer, end - 3, 3);
    });
}

#[test]
fn reads_longer_than_a_buffer_are_errors() {
    let file = pattern_file(FILE_LEN);
    let config = StreamerConfig { buffer_bytes: 64 << 10, ..small_config() };
    open_each(file.path(), config, |streamer, _| {
        let buffer = 64 << 10;
        check(&streamer, 0, buffer);
        for (offset, len) in [(0, buffer + 1), (1, buffer), (100_000, 3 * buffer)] {
            let result = streamer.read(offset, len);
            // Only O_DIRECT widens (1, buffer) past the buffer.
            if !streamer.backend().is_direct() && len == buffer {
                assert_pattern(&result.unwrap().wait().unwrap(), offset, len, "buffered");
                continue;
            }
            let err = result.expect_err("a read longer than a buffer");
            assert!(
                matches!(err, Error::TooLong { offset: o, len: l, buffer_bytes, needed, .. }
                    if o == offset && l == len && buffer_bytes == buffer && needed > buffer),
                "{err}"
            );
        }
    });
}

#[test]
fn a_file_truncated_after_open_fails_the_read_with_unexpected_eof() {
    let file = pattern_file(FILE_LEN);
    each_backend(file.path(), small_config(), |streamer| {
        let short = 600_000u64;
        file.as_file().set_len(short).expect("truncate");
        let err = streamer.read(short - 100, 10_000).expect("submit").wait().expect_err("the file shrank");
        assert!(
            matches!(err, Error::UnexpectedEof { offset, len: 10_000, got: 100, .. } if offset == short - 100),
            "{err}"
        );
        assert!(err.to_string().contains(&file.path().display().to_string()), "{err}");
        assert_eq!(streamer.stats().failed, 1);
        check(streamer, short - 100, 100);
        // Restore the pattern for the next backend.
        let tail: Vec<u8> = (short..FILE_LEN as u64).map(pattern_byte).collect();
        std::os::unix::fs::FileExt::write_all_at(file.as_file(), &tail, short).expect("restore");
    });
}

#[test]
fn an_exhausted_pool_blocks_until_a_buffer_is_dropped() {
    let file = pattern_file(FILE_LEN);
    let config = StreamerConfig { queue_depth: 2, buffer_bytes: 64 << 10, buffers: 2, ..StreamerConfig::default() };
    each_backend(file.path(), config, |streamer| {
        let held: Vec<ReadBuf> = (0..2).map(|i| streamer.read(i * 10_000, 10_000).unwrap().wait().unwrap()).collect();
        assert!(streamer.try_read(0, 10).expect("a valid range").is_none(), "every buffer is held");
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| {
                let buf = streamer.read(3, 30_000).expect("submit").wait().expect("wait");
                done.store(true, Ordering::SeqCst);
                assert_pattern(&buf, 3, 30_000, "after the release");
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(!done.load(Ordering::SeqCst), "read() returned with every buffer held");
            let mut held = held;
            let first = held.remove(0);
            assert_pattern(&first, 0, 10_000, "held");
            drop(first);
            waiter.join().expect("the waiter");
            assert!(done.load(Ordering::SeqCst));
            assert_pattern(&held[0], 10_000, 10_000, "still held");
        });
        // Both buffers are free again.
        let a = streamer.try_read(0, 10).unwrap().expect("a free buffer");
        let b = streamer.try_read(10, 10).unwrap().expect("a second free buffer");
        assert_pattern(&b.wait().unwrap(), 10, 10, "try_read");
        assert_pattern(&a.wait().unwrap(), 0, 10, "try_read");
    });
}

#[test]
fn tickets_and_buffers_outlive_the_streamer() {
    let file = pattern_file(FILE_LEN);
    let config = StreamerConfig { buffers: 6, ..small_config() };
    open_each(file.path(), config, |streamer, _| {
        let held = streamer.read(100, 1000).unwrap().wait().unwrap();
        let tickets: Vec<_> = (0..3u64).map(|i| (i * 50_000, streamer.read(i * 50_000, 40_000).unwrap())).collect();
        drop(streamer.read(0, 1 << 20).unwrap());
        drop(streamer);
        for (offset, ticket) in tickets {
            assert_pattern(&ticket.wait().expect("completed before the drop"), offset, 40_000, "after drop");
        }
        assert_pattern(&held, 100, 1000, "held across drop");
    });
}

#[test]
fn stats_count_widened_bytes() {
    let file = pattern_file(FILE_LEN);
    each_backend(file.path(), small_config(), |streamer| {
        check(streamer, 10, 100);
        check(streamer, 8192, 8192);
        let stats = streamer.stats();
        assert_eq!((stats.reads, stats.failed), (2, 0));
        let expected = if streamer.backend().is_direct() { 4096 + 8192 } else { 100 + 8192 };
        assert_eq!(stats.bytes_read, expected, "{}", streamer.backend());
        assert!(stats.gb_per_s() > 0.0);
    });
}

#[test]
fn a_file_on_tmpfs_works_through_whichever_path_applies() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipping the tmpfs test: /dev/shm does not exist");
        return;
    }
    let file = pattern_file_in(shm, FILE_LEN);
    eprintln!("O_DIRECT on /dev/shm: {}", direct_io_supported(shm));
    each_backend(file.path(), small_config(), |streamer| {
        check(streamer, 0, 4096);
        check(streamer, 4095, 70_001);
        check(streamer, FILE_LEN as u64 - 17, 17);
    });
}

#[test]
fn invalid_configs_are_errors_naming_the_field() {
    let file = pattern_file(4096);
    let cases = [
        ("queue_depth", StreamerConfig { queue_depth: 0, ..StreamerConfig::default() }),
        ("buffers", StreamerConfig { buffers: 0, ..StreamerConfig::default() }),
        ("buffer_bytes", StreamerConfig { buffer_bytes: 0, ..StreamerConfig::default() }),
        ("buffer_bytes", StreamerConfig { buffer_bytes: usize::MAX, ..StreamerConfig::default() }),
    ];
    for (field, config) in cases {
        let err = Streamer::open(file.path(), config).expect_err("an invalid config");
        assert!(matches!(err, Error::Config { field: f, .. } if f == field), "{err}");
    }
    let missing = file.path().with_extension("missing");
    let err = Streamer::open(&missing, StreamerConfig::default()).expect_err("a missing file");
    assert!(matches!(&err, Error::Open { path, .. } if *path == missing), "{err}");
}

#[test]
fn an_empty_file_opens_and_serves_empty_reads() {
    let file = pattern_file(0);
    each_backend(file.path(), small_config(), |streamer| {
        assert_eq!(streamer.file_len(), 0);
        assert!(streamer.read(0, 0).unwrap().wait().unwrap().is_empty());
        assert!(matches!(streamer.read(0, 1), Err(Error::PastEnd { .. })));
    });
}

#[test]
fn aligned_bufs_are_aligned_and_zeroed() {
    let mut buf = AlignedBuf::zeroed(10_000);
    assert_eq!(buf.as_slice().as_ptr() as usize % ALIGN, 0);
    assert_eq!(buf.len(), 10_000);
    assert!(buf.as_slice().iter().all(|&b| b == 0));
    buf.as_mut_slice()[9_999] = 1;
    assert_eq!(buf.as_slice()[9_999], 1);
}

#[test]
fn the_public_types_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Streamer>();
    send_sync::<ReadBuf>();
    send_sync::<AlignedBuf>();
    send_sync::<Error>();
    send::<strata_nvme::Ticket>();
}

/// Installs a seccomp filter on the calling thread (inherited by the threads it starts) that
/// fails `io_uring_setup` with `EPERM`, as a container runtime's default profile does.
fn refuse_io_uring_on_this_thread() -> std::io::Result<()> {
    const NR_IO_URING_SETUP: u32 = 425;
    let stmt = |code: u32, k: u32| libc::sock_filter { code: code as u16, jt: 0, jf: 0, k };
    let filter = [
        // Load the syscall number (offset 0 of `struct seccomp_data`).
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        // If it is io_uring_setup, fall through to the refusal; otherwise skip it.
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: NR_IO_URING_SETUP,
        },
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let program = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only and affects this thread.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `program` points at `filter`, a valid classic BPF program that outlives the call
    // (the kernel copies it); without TSYNC the filter applies to this thread and its children.
    if unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &program as *const libc::sock_fprog) } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn a_refused_io_uring_falls_back_to_pread() {
    let file = pattern_file(FILE_LEN);
    let path = file.path().to_path_buf();
    // A thread of its own carries the filter, so no other test is affected.
    std::thread::spawn(move || {
        if let Err(e) = refuse_io_uring_on_this_thread() {
            eprintln!("skipping: cannot install a seccomp filter: {e}");
            return;
        }
        let auto = Streamer::open(&path, small_config()).expect("open with Auto");
        assert!(matches!(auto.backend(), Backend::Pread { .. }), "{}", auto.backend());
        check(&auto, 4095, 100_000);
        let forced = StreamerConfig { backend: BackendChoice::IoUring, ..small_config() };
        let err = Streamer::open(&path, forced).expect_err("io_uring is refused");
        assert!(
            matches!(&err, Error::IoUringUnavailable { reason, .. } if reason.contains("Operation not permitted")),
            "{err}"
        );
    })
    .join()
    .expect("the filtered thread");
}
