//! Prefill matmul: `strata_tensor::cpu::matmul` in f32 next to the `gemm` crate.
//!
//! Both compute `y = x W^T` for activations `x` `[m, k]`, a weight `W` `[n, k]` (Hugging Face
//! layout) and `y` `[m, n]`, on the same data and the same rayon pool; gemm gets
//! `Parallelism::Rayon(threads)`.

use std::time::Duration;

use strata_tensor::Tensor;

use super::measure::{Budget, max_rel_diff, median, random_f32, sample};

/// The sampling budget of each implementation.
pub const BUDGET: Budget =
    Budget { min_samples: 5, min_time: Duration::from_millis(1000), max_time: Duration::from_secs(10) };

/// One implementation's timing.
#[derive(Clone, Copy, Debug)]
pub struct MatmulStats {
    /// Timed calls.
    pub calls: usize,
    /// The median time of one call, in seconds.
    pub median_s: f64,
    /// `2 m n k` floating-point operations per median call, in GFLOP/s.
    pub gflop_s: f64,
}

/// The comparison.
#[derive(Clone, Debug)]
pub struct MatmulResult {
    /// Rows of `x` (tokens).
    pub m: usize,
    /// Rows of `W` (output features).
    pub n: usize,
    /// The shared inner dimension (input features).
    pub k: usize,
    /// The `gemm` crate.
    pub gemm: MatmulStats,
    /// strata's matmul and its `max |y - y_gemm| / max |y_gemm|`, or why there is none.
    pub strata: Result<(MatmulStats, f64), String>,
}

/// Measures both implementations on `x` `[m, k]` (random) and `W` `[n, k]` from `w_data`, in the
/// current rayon pool of `threads` threads.
pub fn measure(w_data: &[f32], m: usize, n: usize, k: usize, threads: usize, budget: Budget) -> MatmulResult {
    let x = random_f32(m * k, 3);
    let flop = 2.0 * (m * n * k) as f64;
    let stats = |times: Vec<f64>| {
        let median_s = median(&times);
        MatmulStats { calls: times.len(), median_s, gflop_s: flop / median_s / 1e9 }
    };

    let mut y_gemm = vec![0f32; m * n];
    gemm_matmul(&x, w_data, &mut y_gemm, m, n, k, threads);
    let gemm = stats(sample(budget, |_| gemm_matmul(&x, w_data, &mut y_gemm, m, n, k, threads)));

    let strata = Tensor::from_f32(w_data, [n, k]).map_err(|e| e.to_string()).and_then(|w| {
        let mut y = vec![0f32; m * n];
        strata_matmul(&x, &w, &mut y)?;
        let diff = max_rel_diff(&y, &y_gemm);
        let mut failure = None;
        let times = sample(budget, |_| {
            if let Err(e) = strata_matmul(&x, &w, &mut y) {
                failure.get_or_insert(e);
            }
        });
        failure.map_or(Ok((stats(times), diff)), Err)
    });
    MatmulResult { m, n, k, gemm, strata }
}

/// `y = x W^T` through gemm: `dst := 1 * lhs * rhs` with `lhs = x` (row-major `[m, k]`),
/// `rhs = W^T` (`W` row-major `[n, k]` read as a column-major `[k, n]`), `dst = y` (row-major
/// `[m, n]`). Strides are given as (column stride, row stride).
fn gemm_matmul(x: &[f32], w: &[f32], y: &mut [f32], m: usize, n: usize, k: usize, threads: usize) {
    assert!(x.len() == m * k && w.len() == n * k && y.len() == m * n, "operand lengths");
    let (n_i, k_i) = (n as isize, k as isize);
    // SAFETY: the assert above makes every index gemm forms from these strides fall inside its
    // slice: lhs (i, p) at i * k + p < m * k, rhs (p, j) at j * k + p < n * k, dst (i, j) at
    // i * n + j < m * n. `y` is borrowed mutably, so nothing else reads or writes it meanwhile.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n_i,
            false,
            x.as_ptr(),
            1,
            k_i,
            w.as_ptr(),
            k_i,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(threads),
        );
    }
}

/// `y = x W^T` through strata.
fn strata_matmul(x: &[f32], w: &Tensor, y: &mut [f32]) -> Result<(), String> {
    strata_tensor::cpu::matmul(x, w, y).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain triple loop `y[i][j] = sum_p x[i][p] * w[j][p]`.
    fn naive(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum();
            }
        }
        y
    }

    #[test]
    fn gemm_strides_compute_x_times_w_transposed() {
        for (m, n, k) in [(1, 1, 1), (3, 5, 7), (17, 33, 64), (128, 40, 9)] {
            let x = random_f32(m * k, 10);
            let w = random_f32(n * k, 11);
            let mut y = vec![f32::NAN; m * n];
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            pool.install(|| gemm_matmul(&x, &w, &mut y, m, n, k, 2));
            let diff = max_rel_diff(&y, &naive(&x, &w, m, n, k));
            assert!(diff < 1e-5, "({m}, {n}, {k}): {diff}");
        }
    }

    #[test]
    fn a_small_comparison_is_measured() {
        let (m, n, k) = (8, 16, 32);
        let budget = Budget { min_samples: 2, min_time: Duration::ZERO, max_time: Duration::from_secs(5) };
        let r = measure(&random_f32(n * k, 12), m, n, k, 1, budget);
        assert!(r.gemm.calls >= 2 && r.gemm.gflop_s > 0.0, "{r:?}");
        let (strata, diff) = r.strata.as_ref().expect("strata matmul runs");
        assert!(strata.gflop_s > 0.0 && *diff < 1e-4, "{r:?}");
    }
}
