//! Times prefill-shaped products with block-quantized weights: `cpu::matmul_dequantized` (the
//! weight dequantized to f32 while packing, then the f32 GEMM) next to `cpu::matmul_quantized`
//! (two-digit activations, integer dot products; the VNNI GEMM where the CPU has it), and, for
//! `Q4_0` and `Q4_K`, `cpu::RepackedWeight::matmul` (the same products on the repacked weight), in
//! GFLOP/s (`2 m n k` per call, median of the timed calls).
//!
//! `cargo run --release -p strata-tensor --example prefill_matmul -- [threads] [m,m,..]`
//!
//! Without an `m` list it runs `m = 128` on the TinyLlama-1.1B projection shapes in `Q8_0`,
//! `Q4_0` and `Q4_K`; with one it runs those `m` on the 2048 x 2048 shape (the crossover), adding
//! the decode kernel run once per row of `x`. Weights are random bytes with finite scales (the
//! speed does not depend on the values).

use std::time::{Duration, Instant};

use strata_tensor::cpu::RepackedWeight;
use strata_tensor::{DType, cpu};

#[path = "common/weights.rs"]
mod weights;
use weights::random_weight;

/// TinyLlama-1.1B's products, `(n, k)`: q/o, k/v, gate/up, down, lm_head.
const SHAPES: [(usize, usize); 5] = [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632), (32000, 2048)];

const DTYPES: [DType; 3] = [DType::Q8_0, DType::Q4_0, DType::Q4K];

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads: usize = args.first().map_or(Ok(2), |a| a.parse())?;
    let ms: Option<Vec<usize>> =
        args.get(1).map(|a| a.split(',').map(str::parse).collect::<Result<_, _>>()).transpose()?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("threads {threads}, isa {:?}, loadavg {}", cpu::isa(), load.trim());
    println!(
        "{:>5} {:>6} {:>6} {:>5} {:>12} {:>12} {:>12} {:>12} {:>8}",
        "dtype", "n", "k", "m", "dequant", "quantized", "repacked", "per-row", "speedup"
    );
    pool.install(|| {
        for dtype in DTYPES {
            match &ms {
                None => {
                    for (n, k) in SHAPES {
                        run(dtype, 128, n, k, false)?;
                    }
                }
                Some(ms) => {
                    for &m in ms {
                        run(dtype, m, 2048, 2048, true)?;
                    }
                }
            }
        }
        Ok(())
    })
}

/// Times one shape and prints a line of GFLOP/s.
fn run(dtype: DType, m: usize, n: usize, k: usize, per_row: bool) -> Result<(), BoxError> {
    let w = random_weight(dtype, n, k, 7)?;
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5).collect();
    let mut y = vec![0f32; m * n];
    let gflop = 2.0 * (m * n * k) as f64 / 1e9;
    let old = gflop / median_time(|| cpu::matmul_dequantized(&x, &w, &mut y))?;
    let new = gflop / median_time(|| cpu::matmul_quantized(&x, &w, &mut y))?;
    let repacked = if RepackedWeight::supports(dtype) {
        let packed = RepackedWeight::from_tensor(&w)?;
        format!("{:>12.1}", gflop / median_time(|| packed.matmul(&x, &mut y))?)
    } else {
        format!("{:>12}", "-")
    };
    let rows = if per_row {
        let rate = gflop
            / median_time(|| {
                for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)) {
                    cpu::matvec(&w, xr, yr)?;
                }
                Ok(())
            })?;
        format!("{rate:>12.1}")
    } else {
        format!("{:>12}", "-")
    };
    println!(
        "{:>5} {n:>6} {k:>6} {m:>5} {old:>12.1} {new:>12.1} {repacked} {rows} {:>7.2}x",
        dtype.to_string(),
        new / old
    );
    Ok(())
}

/// The median time of `f` in seconds: one warm-up call, then at least 5 calls and 0.5 s.
fn median_time(mut f: impl FnMut() -> strata_tensor::Result<()>) -> strata_tensor::Result<f64> {
    f()?;
    let (start, mut times) = (Instant::now(), Vec::new());
    while times.len() < 5 || start.elapsed() < Duration::from_millis(500) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
