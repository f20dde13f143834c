//! Memory read bandwidth through 4 KiB pages against huge pages: the same parallel sum
//! (`cpu::sum_f32` over disjoint chunks, as `cpu::read_bandwidth` does) over two 256 MiB buffers,
//! one from `Vec` (4 KiB pages: transparent huge pages are only `madvise`d here) and one from
//! `AlignedBytes::zeroed_huge`, alternated so both see the same machine state.
//!
//! `cargo run --release -p strata-tensor --example page_bandwidth -- [threads] [rounds]`
//!
//! Prints each round's GB/s (the median of 9 sums per buffer) and the medians over the rounds.

use std::time::Instant;

use rayon::prelude::*;
use strata_tensor::{AlignedBytes, cpu};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const BYTES: usize = 256 << 20;

/// The median GB/s of 9 parallel sums of `buf`.
fn gb_s(buf: &[f32]) -> f64 {
    let chunk = buf.len().div_ceil(rayon::current_num_threads() * 8).next_multiple_of(16);
    let mut times: Vec<f64> = (0..9)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(buf.par_chunks(chunk).map(cpu::sum_f32).sum::<f32>());
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (buf.len() * 4) as f64 / times[4] / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let threads: usize = args.first().map_or(Ok(2), |a| a.parse())?;
    let rounds: usize = args.get(1).map_or(Ok(8), |a| a.parse())?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    let small = vec![1f32; BYTES / 4];
    let mut storage = AlignedBytes::zeroed_huge(BYTES);
    let mapped = storage.is_huge_mapped();
    let huge: &mut [f32] = bytemuck::cast_slice_mut(storage.as_mut_slice());
    huge.fill(1.0);
    let huge: &[f32] = huge;
    println!("threads {threads}, 256 MiB per buffer, huge buffer mapped on its own: {mapped}");
    let (mut a, mut b) = (Vec::new(), Vec::new());
    pool.install(|| {
        for round in 0..rounds {
            a.push(gb_s(&small));
            b.push(gb_s(huge));
            println!("round {round}: 4 KiB pages {:.1} GB/s, huge pages {:.1} GB/s", a[round], b[round]);
        }
    });
    let (a, b) = (median(a), median(b));
    println!("median: 4 KiB pages {a:.1} GB/s, huge pages {b:.1} GB/s, ratio {:.2}", b / a);
    Ok(())
}
