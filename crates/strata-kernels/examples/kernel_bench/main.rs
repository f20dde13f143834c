//! Kernel benchmarks: each kernel's achieved device-memory bandwidth (or FLOP/s) as a fraction
//! of the card's peak, measured in the same run as a large device-to-device copy.
//!
//! `cargo run --release -p strata-kernels --features cuda --example kernel_bench [-- --json PATH]
//! [--only TEXT]]`: `--only` measures only the rows whose kernel and shape contain TEXT (say
//! "matvec q4_0 t1 16384x8192", for a profiler).
//! Times are medians of CUDA-event timings after a warm-up, with inputs several times the L2.
//! Without a GPU it says so and exits 0 (the bundle runs it unconditionally).
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

#[cfg(feature = "cuda")]
mod attention;
#[cfg(feature = "cuda")]
mod bench;
#[cfg(feature = "cuda")]
mod elementwise;
#[cfg(feature = "cuda")]
mod matvec;
#[cfg(feature = "cuda")]
mod transfer;

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("kernel_bench: built without the `cuda` feature; nothing to measure");
}

#[cfg(feature = "cuda")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).cloned();
    let cuda = match strata_kernels::cuda_device(0) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kernel_bench: {e}; nothing to measure");
            return Ok(());
        }
    };
    let mut b = bench::Bench::new(cuda)?;
    b.only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    elementwise::run(&mut b)?;
    matvec::run(&mut b)?;
    attention::run(&mut b)?;
    // The transfers are timed on the host, not as rows.
    if b.only.is_none() {
        transfer::run(&mut b)?;
    }
    b.finish(json.as_deref())?;
    Ok(())
}
