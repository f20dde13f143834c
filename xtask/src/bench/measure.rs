//! Timing and test-data helpers shared by the benchmarks.

use std::time::{Duration, Instant};

/// How long to keep sampling one operation.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Take at least this many samples.
    pub min_samples: usize,
    /// And keep sampling until this much time has passed.
    pub min_time: Duration,
    /// But stop once this much time has passed, even short of `min_samples` (a slow placeholder
    /// kernel must not make the bench run for minutes). At least one sample is always taken.
    pub max_time: Duration,
}

/// Calls `f(i)` for `i = 0, 1, ...` as `budget` says and returns each call's duration in
/// seconds.
pub fn sample(budget: Budget, mut f: impl FnMut(usize)) -> Vec<f64> {
    let start = Instant::now();
    let mut times = Vec::new();
    loop {
        let t = Instant::now();
        f(times.len());
        times.push(t.elapsed().as_secs_f64());
        let elapsed = start.elapsed();
        let enough = times.len() >= budget.min_samples && elapsed >= budget.min_time;
        if enough || elapsed >= budget.max_time {
            return times;
        }
    }
}

/// The median of `xs` (the mean of the two middle values for an even count). `xs` must not be
/// empty.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 }
}

/// The smallest of `xs`.
pub fn min(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::INFINITY, f64::min)
}

/// `len` pseudo-random values uniform in [-1, 1), the same for the same `seed` (splitmix64).
pub fn random_f32(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            // The top 24 bits give a value in [0, 1) that f32 represents exactly.
            (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// `max |a - b| / max |b|`: how far a result is from a reference, relative to the reference's
/// scale. The plain `max |a - b|` when the reference is all zeros.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    if scale == 0.0 { diff } else { diff / scale }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(min(&[4.0, 1.0, 3.0]), 1.0);
    }

    #[test]
    fn random_values_are_in_range_and_repeatable() {
        let a = random_f32(10_000, 7);
        assert!(a.iter().all(|x| (-1.0..1.0).contains(x)));
        assert_eq!(a, random_f32(10_000, 7));
        assert_ne!(a, random_f32(10_000, 8));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.05, "mean {mean}");
    }

    #[test]
    fn sampling_respects_the_budget() {
        let budget = Budget { min_samples: 5, min_time: Duration::ZERO, max_time: Duration::from_secs(10) };
        let mut seen = Vec::new();
        assert_eq!(sample(budget, |i| seen.push(i)).len(), 5);
        assert_eq!(seen, [0, 1, 2, 3, 4]);
        let slow = Budget { min_samples: 1000, min_time: Duration::ZERO, max_time: Duration::from_millis(20) };
        let n = sample(slow, |_| std::thread::sleep(Duration::from_millis(5))).len();
        assert!((1..1000).contains(&n), "{n} samples");
    }

    #[test]
    fn relative_difference() {
        assert_eq!(max_rel_diff(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert_eq!(max_rel_diff(&[1.0, 3.0], &[1.0, 2.0]), 0.5);
        assert_eq!(max_rel_diff(&[0.5], &[0.0]), 0.5);
    }
}
