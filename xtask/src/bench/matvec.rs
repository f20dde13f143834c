//! Decode matvec: `strata_tensor::cpu::matvec` on one FFN weight, for every dtype.
//!
//! A 5632 x 2048 weight (one FFN matrix of a 1.1B Llama) takes 44 MiB in f32 and 6 to 22 MiB in
//! the other dtypes, which fit in the 32 MiB L3. A real decode step reads every layer's weights
//! once, from DRAM, so the bench rotates over enough distinct copies of the weight that together
//! they are several times the L3: each call then finds its weight in DRAM, and the achieved
//! bandwidth compares with the measured read bandwidth.

use std::time::Duration;

use strata_tensor::{AlignedBytes, CpuStorage, DType, Tensor, cpu};

use super::measure::{Budget, max_rel_diff, median, random_f32, sample};

/// The sampling budget of one dtype: about a second, and never much more than ten.
pub const BUDGET: Budget =
    Budget { min_samples: 20, min_time: Duration::from_millis(1000), max_time: Duration::from_secs(10) };

/// The result of one dtype.
#[derive(Clone, Debug)]
pub struct MatvecResult {
    /// The weight's dtype.
    pub dtype: DType,
    /// The measurement, or why there is none (the dtype cannot be quantized or multiplied yet).
    pub outcome: Result<MatvecStats, String>,
}

/// The measurement of one dtype.
#[derive(Clone, Debug)]
pub struct MatvecStats {
    /// Bytes of one weight copy.
    pub weight_bytes: usize,
    /// Distinct copies rotated over.
    pub copies: usize,
    /// Timed calls.
    pub calls: usize,
    /// The median time of one call, in seconds.
    pub median_s: f64,
    /// Weight bytes read per second at the median time, in GB/s.
    pub gb_s: f64,
    /// `max |y - y_ref| / max |y_ref|` against `cpu::reference::matvec` on the same weight: a
    /// check that the timed kernel computes what it should.
    pub max_rel_err: f64,
}

/// Measures `matvec` on an `[n, k]` weight of `dtype` made from `data` (n * k values), rotating
/// over copies that total at least `rotate_bytes`, in the current rayon pool.
pub fn measure(data: &[f32], n: usize, k: usize, dtype: DType, rotate_bytes: usize, budget: Budget) -> MatvecResult {
    let x = random_f32(k, 2);
    MatvecResult { dtype, outcome: measure_one(data, n, k, dtype, &x, rotate_bytes, budget) }
}

fn measure_one(
    data: &[f32],
    n: usize,
    k: usize,
    dtype: DType,
    x: &[f32],
    rotate_bytes: usize,
    budget: Budget,
) -> Result<MatvecStats, String> {
    let first = Tensor::from_f32_as(data, [n, k], dtype).map_err(|e| e.to_string())?;
    let bytes = first.cpu_bytes().map_err(|e| e.to_string())?;
    let weight_bytes = bytes.len();
    let copies = rotate_bytes.div_ceil(weight_bytes).max(2);
    let mut weights = vec![first.clone()];
    for _ in 1..copies {
        let storage = CpuStorage::owned(AlignedBytes::copy_from(bytes));
        weights.push(Tensor::from_storage(storage, dtype, [n, k]).map_err(|e| e.to_string())?);
    }

    let mut y = vec![0f32; n];
    let mut y_ref = vec![0f32; n];
    cpu::reference::matvec(&first, x, &mut y_ref).map_err(|e| format!("reference: {e}"))?;
    cpu::matvec(&first, x, &mut y).map_err(|e| e.to_string())?;
    let max_rel_err = max_rel_diff(&y, &y_ref);

    // One untimed rotation, so that every copy has been touched once before timing.
    for w in &weights {
        cpu::matvec(w, x, &mut y).map_err(|e| e.to_string())?;
    }
    let budget = Budget { min_samples: budget.min_samples.max(2 * copies), ..budget };
    let mut failure = None;
    let times = sample(budget, |i| {
        if let Err(e) = cpu::matvec(&weights[i % copies], x, &mut y) {
            failure.get_or_insert(e.to_string());
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    let median_s = median(&times);
    Ok(MatvecStats {
        weight_bytes,
        copies,
        calls: times.len(),
        median_s,
        gb_s: weight_bytes as f64 / median_s / 1e9,
        max_rel_err,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_float_matvec_is_measured_and_checked() {
        let (n, k) = (64, 96);
        let data = random_f32(n * k, 1);
        let budget = Budget { min_samples: 3, min_time: Duration::ZERO, max_time: Duration::from_secs(5) };
        let result = measure(&data, n, k, DType::F32, 3 * n * k * 4, budget);
        let stats = result.outcome.as_ref().expect("f32 matvec works");
        assert_eq!(stats.weight_bytes, n * k * 4);
        assert_eq!(stats.copies, 3);
        assert!(stats.calls >= 6, "at least two rotations: {stats:?}");
        assert!(stats.gb_s > 0.0 && stats.max_rel_err < 1e-5, "{stats:?}");
    }

    #[test]
    fn a_shape_the_dtype_cannot_hold_is_reported_not_measured() {
        let data = random_f32(4 * 48, 1);
        let result = measure(&data, 4, 48, DType::Q8_0, 1 << 20, BUDGET);
        let err = result.outcome.as_ref().unwrap_err();
        assert!(err.contains("48"), "{err}");
    }
}
