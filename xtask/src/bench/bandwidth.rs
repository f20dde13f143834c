//! Memory read bandwidth: a multi-threaded vectorised sum over a buffer much larger than L3.
//!
//! This is the ceiling a decode matvec works against: each weight byte is read once per token,
//! so a memory-bound kernel can go no faster than this sum.

use rayon::prelude::*;
use strata_tensor::cpu::{isa, sum_f32};

use super::measure::{Budget, median, min, sample};

/// Each task of the parallel sum reads this many bytes, so that rayon balances the threads.
const TASK_BYTES: usize = 4 << 20;

/// The measured read bandwidth.
#[derive(Clone, Debug)]
pub struct Bandwidth {
    /// The buffer size in bytes.
    pub bytes: usize,
    /// How many passes over the buffer were timed.
    pub passes: usize,
    /// The median over passes, in GB/s (10^9 bytes per second).
    pub median_gb_s: f64,
    /// The fastest pass, in GB/s.
    pub best_gb_s: f64,
    /// Which instruction set the summing loop used.
    pub kernel: String,
}

/// Sums a `bytes`-byte buffer in the current rayon pool, pass after pass as `budget` says, with
/// the tensor core's vectorised sum (`strata_tensor::cpu::sum_f32`).
pub fn measure(bytes: usize, budget: Budget) -> Bandwidth {
    let n = bytes / 4;
    // Writing every element makes the kernel back the whole buffer with real pages before timing.
    let buf: Vec<f32> = (0..n).map(|i| (i % 3) as f32).collect();
    let expected = (n / 3 * 3) as f64 + if n % 3 == 2 { 1.0 } else { 0.0 };
    let pass = || buf.par_chunks(TASK_BYTES / 4).map(sum_f32).map(f64::from).sum::<f64>();
    // One untimed pass warms the TLB and the thread pool; the sum also proves the data was read.
    let first = pass();
    assert!((first - expected).abs() <= expected * 1e-3, "the bandwidth sum read wrong data: {first} vs {expected}");
    let times = sample(budget, |_| {
        std::hint::black_box(pass());
    });
    let gb_s = |t: f64| bytes as f64 / t / 1e9;
    let kernel = format!("{:?}", isa()).to_lowercase();
    Bandwidth { bytes, passes: times.len(), median_gb_s: gb_s(median(&times)), best_gb_s: gb_s(min(&times)), kernel }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_small_measurement_is_sane() {
        let budget = Budget { min_samples: 3, min_time: Duration::ZERO, max_time: Duration::from_secs(5) };
        let bw = measure(1 << 20, budget);
        assert_eq!(bw.passes, 3);
        assert!(bw.best_gb_s >= bw.median_gb_s && bw.median_gb_s > 0.0, "{bw:?}");
    }
}
