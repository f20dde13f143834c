//! Reads a file sequentially through the streamer, in units of N MiB with a queue of reads in
//! flight, once per backend (io_uring, pread) with and without `O_DIRECT`, and prints the
//! achieved GB/s: over wall time, and over the streamer's busy time.
//!
//! Usage: `cargo run --release -p strata-nvme --example read_bw -- FILE [UNIT_MIB] [QUEUE_DEPTH]`
//! (defaults 4 MiB and 4). Buffered runs after the first mostly measure the page cache; drop
//! caches (`sync; echo 3 > /proc/sys/vm/drop_caches`) for a cold buffered number.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use strata_nvme::{BackendChoice, Error, Streamer, StreamerConfig, Ticket};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next().map(PathBuf::from) else {
        eprintln!("usage: read_bw FILE [UNIT_MIB] [QUEUE_DEPTH]");
        return ExitCode::FAILURE;
    };
    let unit_mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let queue_depth: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let unit = unit_mib << 20;

    for backend in [BackendChoice::IoUring, BackendChoice::Pread] {
        for direct in [true, false] {
            let config = StreamerConfig { queue_depth, buffer_bytes: unit, buffers: queue_depth, direct, backend };
            match run(&path, config, unit) {
                Ok(line) => println!("{line}"),
                Err(Error::IoUringUnavailable { reason, .. }) => println!("io_uring: unavailable ({reason})"),
                Err(e) => {
                    eprintln!("read_bw: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}

/// Reads the whole file once and describes the throughput.
fn run(path: &std::path::Path, config: StreamerConfig, unit: usize) -> Result<String, Error> {
    let streamer = Streamer::open(path, config.clone())?;
    let len = streamer.file_len();
    let start = Instant::now();
    let mut in_flight: VecDeque<Ticket> = VecDeque::with_capacity(config.queue_depth);
    // A byte from every unit, summed so the reads cannot be skipped.
    let mut checksum = 0u64;
    let mut offset = 0u64;
    while offset < len || !in_flight.is_empty() {
        if offset < len && in_flight.len() < config.queue_depth {
            let n = (len - offset).min(unit as u64) as usize;
            in_flight.push_back(streamer.read(offset, n)?);
            offset += n as u64;
            continue;
        }
        if let Some(ticket) = in_flight.pop_front() {
            let buf = ticket.wait()?;
            checksum = checksum.wrapping_add(buf.first().copied().unwrap_or(0) as u64);
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let stats = streamer.stats();
    Ok(format!(
        "{:<36} {:>8.2} GB/s wall  {:>8.2} GB/s busy  ({} MiB in {} reads, {:.3} s, checksum {checksum})",
        streamer.backend().to_string(),
        len as f64 / wall / 1e9,
        stats.gb_per_s(),
        len >> 20,
        stats.reads,
        wall,
    ))
}
