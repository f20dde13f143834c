//! Benchmarks of the row and element-wise kernels: RMSNorm, RoPE, SwiGLU, add, softmax, gating.

use strata_kernels::cuda::ops;
use strata_kernels::cuda::testing::random_f32;

use crate::bench::Bench;

type R<T> = Result<T, Box<dyn std::error::Error>>;

/// Runs this module's benchmarks.
pub fn run(b: &mut Bench) -> R<()> {
    let cuda = b.cuda.clone();
    // RMSNorm over 16384 rows of 8192 f32 (512 MiB in, 512 MiB out).
    let (rows, cols) = (16384usize, 8192usize);
    let x = cuda.upload(&random_f32(rows * cols, 1, 1.0))?;
    let w = cuda.upload(&random_f32(cols, 2, 1.0))?;
    let mut out = cuda.zeros::<f32>(rows * cols)?;
    let bytes = 2.0 * (rows * cols * 4) as f64;
    b.measure("rms_norm f32", &format!("{rows}x{cols}"), bytes, 20, || {
        ops::rms_norm(&cuda, &x, &w, 1e-5, rows, &mut out)?;
        Ok(())
    })?;
    Ok(())
}
