//! Times decode-shaped products `y = W x` (one activation vector) with block-quantized weights
//! through `cpu::matvec`, on TinyLlama-1.1B's projection shapes, and prints the median time per
//! call and the weight bytes read per second.
//!
//! `cargo run --release -p strata-tensor --example decode_matvec -- [threads] [dtype,..] [reps]`
//!
//! `dtype` is `q4_0`, `q4_k`, `q8_0`, `q4_1`, `q6_k`, or `q4_0r` / `q4_kr` for `Q4_0` / `Q4_K`
//! through `cpu::RepackedWeight` (default `q4_0,q4_0r,q4_k,q4_kr`). With `reps` given,
//! each shape runs exactly `reps` calls after one warm-up (for instruction counts under
//! `valgrind --tool=callgrind`) instead of timing for half a second. Weights are random bytes with
//! finite scales (the speed does not depend on the values); several copies of each weight rotate,
//! so that, as in a model, the weights come from DRAM rather than from the cache.

use std::time::Instant;

use strata_tensor::cpu::RepackedWeight;
use strata_tensor::{DType, Tensor, cpu};

#[path = "common/weights.rs"]
mod weights;
use weights::random_weight;

/// TinyLlama-1.1B's products, `(n, k)`: q/o, k/v, gate/up, down.
const SHAPES: [(usize, usize); 4] = [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)];

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads: usize = args.first().map_or(Ok(2), |a| a.parse())?;
    let dtypes: Vec<(DType, bool)> = args
        .get(1)
        .map_or("q4_0,q4_0r,q4_k,q4_kr", String::as_str)
        .split(',')
        .map(|s| match s {
            "q4_0" => Ok((DType::Q4_0, false)),
            "q4_0r" => Ok((DType::Q4_0, true)),
            "q4_1" => Ok((DType::Q4_1, false)),
            "q4_k" => Ok((DType::Q4K, false)),
            "q4_kr" => Ok((DType::Q4K, true)),
            "q6_k" => Ok((DType::Q6K, false)),
            "q8_0" => Ok((DType::Q8_0, false)),
            other => Err(format!("unknown dtype {other}")),
        })
        .collect::<Result<_, _>>()?;
    let reps: Option<usize> = args.get(2).map(|a| a.parse()).transpose()?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("threads {threads}, isa {:?}, loadavg {}", cpu::isa(), load.trim());
    println!("{:>5} {:>6} {:>6} {:>10} {:>8}", "dtype", "n", "k", "median us", "GB/s");
    pool.install(|| {
        for &(dtype, repack) in &dtypes {
            for (n, k) in SHAPES {
                run(dtype, repack, n, k, reps)?;
            }
        }
        Ok(())
    })
}

/// A weight as the timed product takes it.
enum Weight {
    Tensor(Tensor),
    Repacked(RepackedWeight),
}

impl Weight {
    fn matvec(&self, x: &[f32], y: &mut [f32]) -> strata_tensor::Result<()> {
        match self {
            Weight::Tensor(w) => cpu::matvec(w, x, y),
            Weight::Repacked(w) => w.matvec(x, y),
        }
    }
}

/// Times one shape and prints a line.
fn run(dtype: DType, repack: bool, n: usize, k: usize, reps: Option<usize>) -> Result<(), BoxError> {
    let bytes = n * dtype.bytes_for(k).expect("k is whole blocks");
    // Enough copies to exceed a 32 MiB L3 when timing; one for instruction counts.
    let copies = if reps.is_some() { 1 } else { (64 << 20) / bytes + 1 };
    let ws: Vec<Weight> = (0..copies)
        .map(|c| {
            let w = random_weight(dtype, n, k, 7 + c as u64)?;
            Ok(if repack { Weight::Repacked(RepackedWeight::from_tensor(&w)?) } else { Weight::Tensor(w) })
        })
        .collect::<strata_tensor::Result<_>>()?;
    let x: Vec<f32> = (0..k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5).collect();
    let mut y = vec![0f32; n];
    ws[0].matvec(&x, &mut y)?;
    let mut times = Vec::new();
    let start = Instant::now();
    let mut i = 0;
    loop {
        match reps {
            Some(r) if i >= r => break,
            None if times.len() >= 20 && start.elapsed().as_millis() >= 500 => break,
            _ => {}
        }
        let t = Instant::now();
        ws[i % copies].matvec(&x, &mut y)?;
        times.push(t.elapsed().as_secs_f64());
        i += 1;
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let name = if repack { format!("{dtype}r") } else { dtype.to_string() };
    println!("{name:>5} {n:>6} {k:>6} {:>10.1} {:>8.1}", median * 1e6, bytes as f64 / median / 1e9);
    Ok(())
}
