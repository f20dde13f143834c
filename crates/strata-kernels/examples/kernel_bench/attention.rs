//! Benchmarks of the attention kernels (filled in with the attention kernels).

use crate::bench::Bench;

type R<T> = Result<T, Box<dyn std::error::Error>>;

/// Runs this module's benchmarks.
pub fn run(_b: &mut Bench) -> R<()> {
    Ok(())
}
