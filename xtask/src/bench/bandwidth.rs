//! Memory read bandwidth: a multi-threaded vectorised sum over a buffer much larger than L3.
//!
//! This is the ceiling a decode matvec works against: each weight byte is read once per token,
//! so a memory-bound kernel can go no faster than this sum.

use rayon::prelude::*;

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
    /// Which summing loop ran: `avx512` or `scalar`.
    pub kernel: &'static str,
}

/// Sums a `bytes`-byte buffer in the current rayon pool, pass after pass as `budget` says.
pub fn measure(bytes: usize, budget: Budget) -> Bandwidth {
    let words = bytes / 8;
    // Writing every word makes the kernel back the whole buffer with real pages before timing.
    let buf: Vec<u64> = (0..words as u64).collect();
    // The sum 0 + 1 + ... + (words - 1), wrapped to 64 bits like the kernels' sums.
    let expected = (words as u128 * (words as u128).saturating_sub(1) / 2) as u64;
    let (kernel, sum): (&'static str, fn(&[u64]) -> u64) = pick_kernel();
    let pass = || buf.par_chunks(TASK_BYTES / 8).map(sum).reduce(|| 0, u64::wrapping_add);
    // One untimed pass warms the TLB and the thread pool.
    assert_eq!(pass(), expected, "the bandwidth sum read wrong data");
    let times = sample(budget, |_| {
        std::hint::black_box(pass());
    });
    let gb_s = |t: f64| bytes as f64 / t / 1e9;
    Bandwidth { bytes, passes: times.len(), median_gb_s: gb_s(median(&times)), best_gb_s: gb_s(min(&times)), kernel }
}

/// The fastest summing loop this CPU runs.
fn pick_kernel() -> (&'static str, fn(&[u64]) -> u64) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        return ("avx512", sum_avx512_checked);
    }
    ("scalar", sum_scalar)
}

/// A wrapping sum the compiler vectorises for the baseline target (SSE2 on x86-64).
fn sum_scalar(words: &[u64]) -> u64 {
    words.iter().fold(0, |acc, &w| acc.wrapping_add(w))
}

#[cfg(target_arch = "x86_64")]
fn sum_avx512_checked(words: &[u64]) -> u64 {
    // SAFETY: `pick_kernel` hands out this function only after detecting avx512f.
    unsafe { sum_avx512(words) }
}

/// A wrapping sum with four 512-bit accumulators, so that loads, not add latency, limit it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_avx512(words: &[u64]) -> u64 {
    use std::arch::x86_64::*;

    let chunks = words.chunks_exact(32);
    let tail = sum_scalar(chunks.remainder());
    let mut acc = [_mm512_setzero_si512(); 4];
    for chunk in chunks {
        let p = chunk.as_ptr();
        // SAFETY: `chunk` holds 32 u64, so the four unaligned 64-byte loads at word offsets 0, 8,
        // 16 and 24 stay inside it.
        unsafe {
            acc[0] = _mm512_add_epi64(acc[0], _mm512_loadu_si512(p.cast()));
            acc[1] = _mm512_add_epi64(acc[1], _mm512_loadu_si512(p.add(8).cast()));
            acc[2] = _mm512_add_epi64(acc[2], _mm512_loadu_si512(p.add(16).cast()));
            acc[3] = _mm512_add_epi64(acc[3], _mm512_loadu_si512(p.add(24).cast()));
        }
    }
    let total = _mm512_add_epi64(_mm512_add_epi64(acc[0], acc[1]), _mm512_add_epi64(acc[2], acc[3]));
    (_mm512_reduce_add_epi64(total) as u64).wrapping_add(tail)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn every_kernel_sums_like_the_scalar_loop() {
        let words: Vec<u64> = (0..1000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
        let (_, best) = pick_kernel();
        for len in [0, 1, 31, 32, 33, 64, 100, 999, 1000] {
            assert_eq!(best(&words[..len]), sum_scalar(&words[..len]), "len {len}");
        }
    }

    #[test]
    fn a_small_measurement_is_sane() {
        let budget = Budget { min_samples: 3, min_time: Duration::ZERO, max_time: Duration::from_secs(5) };
        let bw = measure(1 << 20, budget);
        assert_eq!(bw.passes, 3);
        assert!(bw.best_gb_s >= bw.median_gb_s && bw.median_gb_s > 0.0, "{bw:?}");
    }
}
