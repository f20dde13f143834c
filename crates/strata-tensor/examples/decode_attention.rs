//! Times `cpu::attention_decode` (one query token over a paged cache) on a model's shape, with
//! the cache hot (the same layer again and again) and cold (layers rotating through more memory
//! than the L3 holds, as in a decode step, where the weights streamed between two visits of a
//! layer evict its keys and values). Prints the median time per call and the key/value bytes
//! read per second.
//!
//! `cargo run --release -p strata-tensor --example decode_attention -- [threads] [keys,..] [heads/kv_heads/head_dim]`
//!
//! Defaults: 2 threads, 128 and 1088 keys, SmolLM2-135M's 9/3/64. Runs inside `cpu::with_team`
//! (as `Decoder::run` does for a decode step) in blocks of 32 tokens.

use std::time::Instant;

use strata_tensor::cpu;

#[path = "common/attention_args.rs"]
mod attention_args;

use attention_args::BoxError;

/// One layer's key blocks and value blocks.
type Layer = (Vec<Vec<f32>>, Vec<Vec<f32>>);

fn main() -> Result<(), BoxError> {
    let attention_args::Args { threads, sizes: keys, params: p } = attention_args::parse(&[128, 1088])?;
    let (n_heads, n_kv_heads, head_dim) = (p.n_heads, p.n_kv_heads, p.head_dim);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    println!("{:>6} {:>9} {:>10} {:>8}", "keys", "cache", "median us", "GB/s");
    const BLOCK: usize = 32;
    let row = n_kv_heads * head_dim;
    for &n in &keys {
        let blocks = n.div_ceil(BLOCK);
        let kv_bytes = 2 * n * row * 4;
        // Enough layers to pass 64 MiB, so that a cold visit finds nothing in the L3.
        let layers = (64usize << 20).div_ceil(kv_bytes).max(1);
        let fill = |seed: usize| -> Vec<Vec<f32>> {
            (0..blocks)
                .map(|b| (0..BLOCK * row).map(|i| ((i * 7 + b * 13 + seed) % 97) as f32 / 97.0 - 0.5).collect())
                .collect()
        };
        let caches: Vec<Layer> = (0..layers).map(|l| (fill(2 * l), fill(2 * l + 1))).collect();
        let q: Vec<f32> = (0..n_heads * head_dim).map(|i| (i % 11) as f32 / 11.0 - 0.5).collect();
        let mut out = vec![0f32; n_heads * head_dim];
        for (name, rotate, sum) in
            [("hot", false, false), ("cold", true, false), ("sum hot", false, true), ("sum cold", true, true)]
        {
            let mut times = Vec::new();
            pool.install(|| {
                cpu::with_team(|| -> Result<(), BoxError> {
                    let started = Instant::now();
                    let mut i = 0;
                    while started.elapsed().as_secs_f64() < 0.5 || times.len() < 20 {
                        let (k, v) = &caches[if rotate { i % layers } else { 0 }];
                        let kb: Vec<&[f32]> = k.iter().map(Vec::as_slice).collect();
                        let vb: Vec<&[f32]> = v.iter().map(Vec::as_slice).collect();
                        let t = Instant::now();
                        if sum {
                            let mut lanes = [0f32; 16];
                            for b in kb.iter().chain(&vb) {
                                for c in b.chunks_exact(16) {
                                    for (l, &x) in lanes.iter_mut().zip(c) {
                                        *l += x;
                                    }
                                }
                            }
                            let s: f32 = lanes.iter().sum();
                            std::hint::black_box(s);
                        } else {
                            cpu::attention_decode(&q, &kb, &vb, BLOCK, n, &p, &mut out)?;
                        }
                        times.push(t.elapsed().as_secs_f64());
                        i += 1;
                    }
                    Ok(())
                })
            })?;
            times.sort_by(f64::total_cmp);
            let med = times[times.len() / 2];
            println!("{n:>6} {name:>9} {:>10.1} {:>8.1}", med * 1e6, kv_bytes as f64 / med / 1e9);
        }
    }
    Ok(())
}
