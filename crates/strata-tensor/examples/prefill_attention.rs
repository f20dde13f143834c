//! Times `cpu::attention` for a prompt's prefill (every token attending to the tokens up to
//! itself) on a model's shape, and prints the median time per call and the multiply-adds per
//! second of its two products (Q K^T and P V, over the visible pairs only).
//!
//! `cargo run --release -p strata-tensor --example prefill_attention -- [threads] [tokens,..] [heads/kv_heads/head_dim]`
//!
//! Defaults: 2 threads, 512 and 2048 tokens, SmolLM2-135M's 9/3/64.

use std::time::Instant;

use strata_tensor::cpu;

#[path = "common/attention_args.rs"]
mod attention_args;

use attention_args::BoxError;

fn main() -> Result<(), BoxError> {
    let attention_args::Args { threads, sizes: tokens, params: p } = attention_args::parse(&[512, 2048])?;
    let (n_heads, n_kv_heads, head_dim) = (p.n_heads, p.n_kv_heads, p.head_dim);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    println!("{:>6} {:>10} {:>10}", "tokens", "median ms", "GFMA/s");
    for &n in &tokens {
        let fill = |len: usize, seed: usize| -> Vec<f32> {
            (0..len).map(|i| ((i * 7 + seed) % 97) as f32 / 97.0 - 0.5).collect()
        };
        let q = fill(n * n_heads * head_dim, 1);
        let k = fill(n * n_kv_heads * head_dim, 2);
        let v = fill(n * n_kv_heads * head_dim, 3);
        let mut out = vec![0f32; q.len()];
        let mut times = Vec::new();
        pool.install(|| -> Result<(), BoxError> {
            let started = Instant::now();
            while started.elapsed().as_secs_f64() < 2.0 || times.len() < 5 {
                let t = Instant::now();
                cpu::attention(&q, &k, &v, 0, &p, &mut out)?;
                times.push(t.elapsed().as_secs_f64());
            }
            Ok(())
        })?;
        times.sort_by(f64::total_cmp);
        let med = times[times.len() / 2];
        // Two products of head_dim multiply-adds per visible (query, key) pair and head.
        let fma = 2.0 * (n_heads * head_dim) as f64 * (n * (n + 1) / 2) as f64;
        println!("{n:>6} {:>10.2} {:>10.1}", med * 1e3, fma / med / 1e9);
    }
    Ok(())
}
