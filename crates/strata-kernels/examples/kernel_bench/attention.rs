//! Benchmarks of the attention kernels: split-K decode over a long f32 context and over a short
//! one, its chunks merged both ways (bytes: the keys and values read, by a run of calls queued
//! back to back), and tiled prefill (bytes: keys, values, queries and outputs; the
//! shape also gives the achieved GFLOP/s of the causal products).

use strata_kernels::Cuda;
use strata_kernels::cuda::kv::DeviceKvCache;
use strata_kernels::cuda::ops;
use strata_kernels::cuda::testing::random_f32;
use strata_tensor::cpu::AttentionParams;

use crate::bench::{Bench, time_ms};

type R<T> = Result<T, Box<dyn std::error::Error>>;

/// Decode calls per timed run.
const DECODE_CALLS: usize = 20;

/// A one-layer cache holding `tokens` random tokens.
fn filled_cache(cuda: &Cuda, n_kv: usize, hd: usize, tokens: usize) -> R<DeviceKvCache> {
    let mut cache = DeviceKvCache::new(cuda, 1, n_kv, hd, 32)?;
    let k = cuda.upload(&random_f32(tokens * n_kv * hd, 1, 1.0))?;
    let v = cuda.upload(&random_f32(tokens * n_kv * hd, 2, 1.0))?;
    cache.append(cuda, 0, &k, &v, tokens)?;
    Ok(cache)
}

fn params(n_heads: usize, n_kv: usize, hd: usize) -> AttentionParams {
    AttentionParams { n_heads, n_kv_heads: n_kv, head_dim: hd, scale: 1.0 / (hd as f32).sqrt(), sliding_window: None }
}

/// Runs this module's benchmarks.
pub fn run(b: &mut Bench) -> R<()> {
    let cuda = b.cuda.clone();

    // Decode: one query over 16384 cached tokens (128 MiB of keys and values for 8 KV heads).
    for (n_heads, n_kv) in [(32usize, 8usize), (28, 4)] {
        let (hd, tokens) = (128usize, 16384usize);
        let cache = filled_cache(&cuda, n_kv, hd, tokens)?;
        let p = params(n_heads, n_kv, hd);
        let q = cuda.upload(&random_f32(n_heads * hd, 3, 1.0))?;
        let mut out = cuda.zeros::<f32>(n_heads * hd)?;
        // A decode step is tens of microseconds, about what issuing it takes on the host: time
        // calls queued back to back, as a decoder issues them, rather than one at a time.
        let bytes = (DECODE_CALLS * 2 * tokens * n_kv * hd * 4) as f64;
        let shape = format!("{n_heads}q/{n_kv}kv x {hd}, {tokens} tok, x{DECODE_CALLS}");
        b.measure("attention decode f32", &shape, bytes, 20, || {
            for _ in 0..DECODE_CALLS {
                ops::attention(&cuda, &cache, 0, &q, 1, &p, &mut out)?;
            }
            Ok(())
        })?;
    }

    // Decode over a short context, TinyLlama's heads (32 q / 4 kv x 64) at 384 tokens: 24 key
    // chunks on a card of 132 SMs, merged by the decode launch's last blocks (the default) or by
    // a combine launch after it. Launch-bound: what the folded merge saves per layer.
    let (n_heads, n_kv, hd, tokens) = (32usize, 4usize, 64usize, 384usize);
    let cache = filled_cache(&cuda, n_kv, hd, tokens)?;
    let p = params(n_heads, n_kv, hd);
    let q = cuda.upload(&random_f32(n_heads * hd, 3, 1.0))?;
    let mut out = cuda.zeros::<f32>(n_heads * hd)?;
    let bytes = (DECODE_CALLS * 2 * tokens * n_kv * hd * 4) as f64;
    for (fold, name) in [(true, "attention decode folded"), (false, "attention decode + combine")] {
        cache.set_folded_combine(fold);
        let shape = format!("{n_heads}q/{n_kv}kv x {hd}, {tokens} tok, x{DECODE_CALLS}");
        b.measure(name, &shape, bytes, 20, || {
            for _ in 0..DECODE_CALLS {
                ops::attention(&cuda, &cache, 0, &q, 1, &p, &mut out)?;
            }
            Ok(())
        })?;
    }

    // Prefill: 2048 tokens from an empty cache, causal.
    let (n_heads, n_kv, hd, tokens) = (32usize, 8usize, 128usize, 2048usize);
    let cache = filled_cache(&cuda, n_kv, hd, tokens)?;
    let p = params(n_heads, n_kv, hd);
    let q = cuda.upload(&random_f32(tokens * n_heads * hd, 4, 1.0))?;
    let mut out = cuda.zeros::<f32>(tokens * n_heads * hd)?;
    let mut run = || -> R<()> {
        ops::attention(&cuda, &cache, 0, &q, tokens, &p, &mut out)?;
        Ok(())
    };
    // Two multiply-adds per visible (query, key) pair and head element: Q K^T and P V.
    let flops = 4.0 * (n_heads * hd) as f64 * (tokens * (tokens + 1) / 2) as f64;
    if !b.wants("attention prefill f32", "") {
        return Ok(());
    }
    let ms = time_ms(&cuda, 10, &mut run)?;
    let bytes = (2 * tokens * n_kv * hd * 4 + 2 * tokens * n_heads * hd * 4) as f64;
    let shape = format!("{n_heads}q/{n_kv}kv x {hd}, {tokens} tok, {:.0} GFLOP/s", flops / (ms / 1e3) / 1e9);
    b.measure("attention prefill f32", &shape, bytes, 10, run)?;
    Ok(())
}
