//! Host-to-device transfers: pinned upload bandwidth, and whether an upload on the copy stream
//! overlaps compute on the compute stream (the store's prefetch pattern).

use std::time::Instant;

use strata_kernels::cuda::ops;
use strata_kernels::cuda::pinned::Pinned;
use strata_kernels::cuda::testing::random_f32;

use crate::bench::Bench;

type R<T> = Result<T, Box<dyn std::error::Error>>;

/// Runs this module's benchmarks.
pub fn run(b: &mut Bench) -> R<()> {
    let cuda = b.cuda.clone();
    let bytes = 256usize << 20;
    let mut staging = Pinned::new(&cuda, bytes)?;
    staging.as_mut_slice()?.fill(1);
    let mut dst = cuda.zeros::<u8>(bytes)?;

    // Pinned upload bandwidth (PCIe / C2C), timed on the host around a synchronised copy.
    let mut times = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let up = cuda.upload_async(&staging, bytes, &mut dst)?;
        cuda.wait_upload(&up)?;
        cuda.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let upload_s = times[times.len() / 2];
    eprintln!("pinned upload: {:.1} GB/s ({} MiB)", bytes as f64 / upload_s / 1e9, bytes >> 20);

    // Compute alone: enough RMSNorm passes over a 512 MiB buffer to take about as long as the upload.
    let (rows, cols) = (16384usize, 8192usize);
    let x = cuda.upload(&random_f32(rows * cols, 5, 1.0))?;
    let w = cuda.upload(&random_f32(cols, 6, 1.0))?;
    let mut out = cuda.zeros::<f32>(rows * cols)?;
    let t = Instant::now();
    ops::rms_norm(&cuda, &x, &w, 1e-5, rows, &mut out)?;
    cuda.synchronize()?;
    let one = t.elapsed().as_secs_f64();
    let passes = ((upload_s / one).round() as usize).clamp(1, 200);
    let compute = |n: usize, out: &mut strata_kernels::cuda::CudaSlice<f32>| -> R<f64> {
        let t = Instant::now();
        for _ in 0..n {
            ops::rms_norm(&cuda, &x, &w, 1e-5, rows, out)?;
        }
        cuda.synchronize()?;
        Ok(t.elapsed().as_secs_f64())
    };
    compute(passes, &mut out)?;
    let compute_s = compute(passes, &mut out)?;
    // Both at once: the upload on the copy stream, the passes on the compute stream.
    let t = Instant::now();
    let up = cuda.upload_async(&staging, bytes, &mut dst)?;
    for _ in 0..passes {
        ops::rms_norm(&cuda, &x, &w, 1e-5, rows, &mut out)?;
    }
    cuda.wait_upload(&up)?;
    cuda.synchronize()?;
    let both_s = t.elapsed().as_secs_f64();
    let hidden = (upload_s + compute_s - both_s) / upload_s.min(compute_s);
    eprintln!(
        "overlap: upload {:.2} ms, compute {:.2} ms, together {:.2} ms: {:.0}% of the shorter one hidden",
        upload_s * 1e3,
        compute_s * 1e3,
        both_s * 1e3,
        100.0 * hidden
    );
    b.note(format!(
        "pinned upload {:.1} GB/s; upload {:.2} ms + compute {:.2} ms ran together in {:.2} ms ({:.0}% of the shorter hidden)",
        bytes as f64 / upload_s / 1e9,
        upload_s * 1e3,
        compute_s * 1e3,
        both_s * 1e3,
        100.0 * hidden
    ));
    Ok(())
}
