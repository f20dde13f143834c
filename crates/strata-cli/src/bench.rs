//! `strata bench`: prefill and decode speed, next to the memory-bandwidth bound measured in the
//! same run.
//!
//! Decoding one token reads every weight once, so no CPU engine can decode faster than
//! `read bandwidth / weight bytes per token`; the bench reports that bound and the achieved
//! fraction. Prefill is reported as tokens per second of one forward pass over the prompt.

use std::time::Instant;

use anyhow::Result;
use serde_json::json;

use crate::{BenchArgs, load};

/// Timed repetitions of each measurement; the median is reported.
const RUNS: usize = 3;

pub fn run(a: BenchArgs) -> Result<()> {
    anyhow::ensure!(a.prompt_tokens > 0, "--prompt-tokens must be at least 1");
    anyhow::ensure!(a.gen_tokens > 0, "--gen-tokens must be at least 1");
    let model = load(&a.model)?;
    let hp = model.decoder().hparams().clone();
    let say = |msg: &str| {
        if !a.json {
            eprintln!("{msg}");
        }
    };
    say(&format!("model {} ({} threads)", model.source().display(), model.threads()));

    // A fixed pseudo-random prompt: the same tokens every run.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let prompt: Vec<u32> = (0..a.prompt_tokens)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % hp.vocab_size as u64) as u32
        })
        .collect();

    say("warming up");
    let mut cache = model.new_cache();
    model.step(&prompt[..prompt.len().min(8)], &mut cache)?;

    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    let mut kv_bytes = 0;
    for run in 0..RUNS {
        say(&format!("run {}/{RUNS}: prefill {} tokens, decode {}", run + 1, a.prompt_tokens, a.gen_tokens));
        let mut cache = model.new_cache();
        let t = Instant::now();
        let mut logits = model.step(&prompt, &mut cache)?;
        prefill.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..a.gen_tokens {
            let next = strata::sampling::argmax(&logits) as u32;
            logits = model.step(&[next], &mut cache)?;
        }
        decode.push(t.elapsed().as_secs_f64());
        kv_bytes = cache.allocated_bytes();
    }
    say("measuring memory read bandwidth");
    let bandwidth = model.install(strata::memory_read_bandwidth);

    let prefill_tok_s = a.prompt_tokens as f64 / median(&mut prefill);
    let decode_tok_s = a.gen_tokens as f64 / median(&mut decode);
    let bytes_per_token = model.decoder().weight_bytes_per_token();
    let bound_tok_s = bandwidth / bytes_per_token as f64;
    let report = json!({
        "model": model.source().display().to_string(),
        "threads": model.threads(),
        "prompt_tokens": a.prompt_tokens,
        "gen_tokens": a.gen_tokens,
        "prefill_tok_s": prefill_tok_s,
        "decode_tok_s": decode_tok_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_vram_bytes": null,
        "bytes_read_per_token": bytes_per_token,
        "weight_bytes": model.decoder().weight_bytes(),
        "kv_bytes": kv_bytes,
        "memory_read_gb_s": bandwidth / 1e9,
        "decode_bound_tok_s": bound_tok_s,
        "decode_fraction_of_bound": decode_tok_s / bound_tok_s,
        "io_gb_s": null,
        "expert_cache_hit_rate": null,
        "plan": { "strategy": "all-resident", "device": "cpu" },
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("prefill      {prefill_tok_s:>10.1} tok/s  ({} tokens)", a.prompt_tokens);
        println!(
            "decode       {decode_tok_s:>10.2} tok/s  ({:.0}% of the bandwidth bound {bound_tok_s:.2} tok/s)",
            100.0 * decode_tok_s / bound_tok_s
        );
        println!("weights/token {:>9.1} MB", bytes_per_token as f64 / 1e6);
        println!("memory read  {:>10.1} GB/s (measured in this run)", bandwidth / 1e9);
        if let Some(rss) = peak_rss_bytes() {
            println!("peak RSS     {:>10.1} MB", rss as f64 / 1e6);
        }
    }
    Ok(())
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The process's peak resident set (VmHWM), on Linux.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
