//! Measuring the machine's memory read bandwidth: the bound every decode benchmark is
//! compared with.
//!
//! Decoding one token reads every weight once, so the fastest possible decode takes
//! `weight bytes / read bandwidth`. This module measures that bandwidth the way a matvec reads:
//! all threads of the current rayon pool stream disjoint parts of a buffer larger than the
//! last-level cache, summing it with the widest vector unit the CPU has.

use std::time::Instant;

use rayon::prelude::*;

use super::simd::{Isa, isa};
use crate::AlignedBytes;

/// The default buffer for [`read_bandwidth`]: well past any last-level cache.
pub const DEFAULT_BANDWIDTH_BYTES: usize = 256 << 20;

/// Memory read bandwidth in bytes per second: the median of `passes` parallel sums over a
/// `bytes`-sized buffer, using every thread of the current rayon pool.
///
/// The median, not the best: on a shared virtual machine the bandwidth a process gets swings
/// with its neighbours (here 32 to 55 GB/s between runs of the best of 5), and the decode speed
/// it is compared with is a median too.
pub fn read_bandwidth(bytes: usize, passes: usize) -> f64 {
    let n = (bytes / 4).max(1 << 16);
    // In huge pages where the kernel grants them, as the weights a decode streams are
    // (`AlignedBytes::zeroed_huge`): through 4 KiB pages the bound would read low.
    let mut storage = AlignedBytes::zeroed_huge(n * 4);
    let buf: &mut [f32] = bytemuck::cast_slice_mut(storage.as_mut_slice());
    buf.fill(1.0);
    let buf: &[f32] = buf;
    let threads = rayon::current_num_threads();
    let chunk = n.div_ceil(threads * 8).next_multiple_of(16);
    let mut times = Vec::with_capacity(passes.max(1));
    let mut sink = 0f32;
    // The fill faulted the pages in; one untimed pass starts the threads and the caches.
    sink += buf.par_chunks(chunk).map(sum_f32).sum::<f32>();
    for _ in 0..passes.max(1) {
        let t = Instant::now();
        sink += buf.par_chunks(chunk).map(sum_f32).sum::<f32>();
        times.push(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    times.sort_by(f64::total_cmp);
    (n * 4) as f64 / times[times.len() / 2]
}

/// The sum of `xs`, with the widest vector unit the CPU has: a loop limited by loads, not by
/// add latency, which is what a bandwidth measurement needs.
pub fn sum_f32(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if isa() >= Isa::Avx512 {
            // SAFETY: isa() reports AVX-512F only when the CPU supports it.
            return unsafe { sum_avx512(xs) };
        }
        if isa() >= Isa::Avx2 {
            // SAFETY: isa() reports AVX2 only when the CPU supports it.
            return unsafe { sum_avx2(xs) };
        }
    }
    xs.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_avx512(xs: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut chunks = xs.chunks_exact(64);
    for c in &mut chunks {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: `c` has 64 floats, so the 16 at offset 16 * j are in bounds.
            *a = _mm512_add_ps(*a, unsafe { _mm512_loadu_ps(c.as_ptr().add(16 * j)) });
        }
    }
    let v = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(v) + chunks.remainder().iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_avx2(xs: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut chunks = xs.chunks_exact(32);
    for c in &mut chunks {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: `c` has 32 floats, so the 8 at offset 8 * j are in bounds.
            *a = _mm256_add_ps(*a, unsafe { _mm256_loadu_ps(c.as_ptr().add(8 * j)) });
        }
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_agree_and_bandwidth_is_positive() {
        let xs: Vec<f32> = (0..1000).map(|i| (i % 7) as f32).collect();
        let expected: f32 = xs.iter().sum();
        assert_eq!(sum_f32(&xs), expected);
        assert!(read_bandwidth(1 << 20, 1) > 0.0);
    }
}
