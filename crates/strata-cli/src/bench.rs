//! `strata bench`: prefill and decode speed, next to the memory-bandwidth bound measured in the
//! same run.
//!
//! Decoding one token reads every weight once, and the keys and values of every position its
//! layers see (f32; on average over the decode, from the prompt's length on), so no engine
//! keeping that cache in f32 can decode faster than `read bandwidth / (weight + KV bytes per
//! token)`; the bench reports that bound (`bytes_read_per_token`, of which
//! `kv_bytes_read_per_token`) and the achieved fraction. Prefill is reported as tokens per
//! second of one forward pass over the prompt.
//!
//! On a Mixture-of-Experts model a token reads only the experts its router picks: the bench
//! reports `mean_experts_per_token` and counts that many experts per layer in the bytes per token:
//! the model's `k` for plain top-k (`--active-experts` changes it; one token always gets its `k`
//! experts), and with dynamic top-k the mean over one more decode of the same length, untimed,
//! whose routing is recorded. The timed steps record nothing: a recorded step routes on the host
//! on CUDA, where decode steps otherwise route on the device.
//!
//! The bandwidth is the model's device's: on the CPU, reading a large buffer with every thread
//! of the model's pool; on CUDA, device-to-device copies, counting bytes read plus bytes
//! written (`memory_read_method` in the JSON says which). On CUDA, `peak_vram_bytes` is the
//! largest device-wide memory use (total minus free, as the driver reports it) seen after each
//! run, while its KV cache and buffers are alive.
//!
//! `--kernel-profile` (CUDA): after the timed runs, one more decode of the same length with each
//! kernel launch between two timing events (`Model::profile_kernels`), reported per token beside
//! the timed decode's time per token; the difference is the time outside kernels. That decode is
//! not timed itself: the events add host work to every launch.
//!
//! On CUDA the report also gives the host's time queuing each decode step
//! (`decode_host_us_per_token`, `Model::gpu_decode_host_time`) and its share of the step's wall
//! time (`decode_host_share`): near 1, the device waits for the host to queue its kernels.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use serde_json::json;

use strata::Device;

use crate::{BenchArgs, load};

pub fn run(a: BenchArgs) -> Result<()> {
    anyhow::ensure!(a.prompt_tokens > 0, "--prompt-tokens must be at least 1");
    anyhow::ensure!(a.gen_tokens > 0, "--gen-tokens must be at least 1");
    anyhow::ensure!(a.runs > 0, "--runs must be at least 1");
    let runs = a.runs;
    let total = a.prompt_tokens + a.gen_tokens;
    // Under a memory ceiling the plan reserves the KV cache and activations for the longest
    // request: the bench's own unless --max-capacity says otherwise (llama-bench likewise sizes
    // its context to the prompt plus the generated tokens).
    let mut model_args = a.model.clone();
    let placed = crate::offload_config(&model_args.placement)?.is_active();
    if placed && model_args.scaling.max_capacity.is_none() && model_args.scaling.rope_scaling.is_none() {
        model_args.scaling.max_capacity = Some(total);
    }
    let model = load(&model_args)?;
    let hp = model.decoder().hparams().clone();
    let say = |msg: &str| {
        if !a.json {
            eprintln!("{msg}");
        }
    };
    let device_name = model.device_name()?;
    anyhow::ensure!(
        !a.kernel_profile || device_name.is_some(),
        "--kernel-profile times GPU kernels: it needs --device cuda (this model runs on {})",
        model.device()
    );
    match &device_name {
        None => say(&format!(
            "model {} ({} threads, {} activations)",
            model.source().display(),
            model.threads(),
            strata::act_quant()
        )),
        Some(name) => say(&format!("model {} on {} ({name})", model.source().display(), model.device())),
    }

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

    // Each request is planned for its whole length, as `generate` does: the context limit is
    // checked up front and a length-driven RoPE scaling keeps one table for the request.
    say("warming up");
    let mut cache = model.new_cache()?;
    model.plan(&mut cache, total)?;
    if model.device() == Device::Cpu {
        model.step(&prompt[..prompt.len().min(8)], &mut cache)?;
    } else {
        // The first calls on a device load the kernels, create the cuBLAS handle and size the
        // activation buffers: run both paths at full size once before timing.
        let logits = model.step(&prompt, &mut cache)?;
        model.step(&[strata::sampling::argmax(&logits) as u32], &mut cache)?;
    }
    drop(cache);

    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    let mut kv_bytes = 0;
    let mut peak_vram: Option<usize> = None;
    let mut streamed_per_token = Vec::new();
    let mut hit_rates = Vec::new();
    let mut expert_stats = None;
    // What a device expert cache did over the last run's decode.
    let mut gpu_cache: Option<strata::ExpertCacheCounts> = None;
    // Per run: the host's time queuing a GPU decode step, in microseconds per token.
    let mut host_us = Vec::new();
    for run in 0..runs {
        say(&format!("run {}/{runs}: prefill {} tokens, decode {}", run + 1, a.prompt_tokens, a.gen_tokens));
        let mut cache = model.new_cache()?;
        model.plan(&mut cache, total)?;
        let t = Instant::now();
        let mut logits = model.step(&prompt, &mut cache)?;
        prefill.push(t.elapsed().as_secs_f64());
        if let Some(store) = model.store() {
            store.reset_stats();
        }
        let before = model.gpu_expert_cache();
        let host_before = model.gpu_decode_host_time();
        let t = Instant::now();
        for _ in 0..a.gen_tokens {
            let next = strata::sampling::argmax(&logits) as u32;
            logits = model.step(&[next], &mut cache)?;
        }
        decode.push(t.elapsed().as_secs_f64());
        if let (Some(c0), Some(c1)) = (before, model.gpu_expert_cache()) {
            gpu_cache = Some(c1.since(&c0));
        }
        if let (Some((t0, n0)), Some((t1, n1))) = (host_before, model.gpu_decode_host_time())
            && n1 > n0
        {
            host_us.push((t1 - t0).as_secs_f64() * 1e6 / (n1 - n0) as f64);
        }
        if let Some(store) = model.store() {
            // Streamed units and the experts read into the expert cache, per decoded token.
            let experts = store.expert_cache_stats();
            let bytes = store.stats().streamed_bytes + experts.map_or(0, |e| e.bytes_read);
            streamed_per_token.push(bytes as f64 / a.gen_tokens as f64);
            if let Some(rate) = experts.and_then(|e| e.hit_rate()) {
                hit_rates.push(rate);
            }
            expert_stats = experts;
        }
        kv_bytes = cache.allocated_bytes();
        if let Some(used) = model.device_memory_used()? {
            peak_vram = Some(peak_vram.unwrap_or(0).max(used));
        }
    }
    // One more decode of the same length with every kernel timed (untimed itself: the events
    // cost the host time).
    let kernels = if a.kernel_profile {
        say("decoding once more with every kernel timed");
        let mut cache = model.new_cache()?;
        model.plan(&mut cache, total)?;
        let mut logits = model.step(&prompt, &mut cache)?;
        let ((), profile) = model.profile_kernels(|| {
            for _ in 0..a.gen_tokens {
                let next = strata::sampling::argmax(&logits) as u32;
                logits = model.step(&[next], &mut cache)?;
            }
            Ok(())
        })?;
        profile
    } else {
        None
    };
    // The peak resident set of the runs, before the measurements below allocate their buffers.
    let peak_rss = peak_rss_bytes();
    say("measuring memory read bandwidth");
    let bandwidth = model.memory_bandwidth()?;
    // With streamed weights, the disk is the bound: its read rate, measured in this run
    // through the streamer on the offload directory's disk.
    let streaming = match model.store() {
        Some(store) => {
            say("measuring disk read bandwidth");
            let dir = store.pack().dir().parent().unwrap_or(store.pack().dir()).to_path_buf();
            // Reads of the size the store issues: the largest streamed unit or expert.
            let largest = [store.streamer(), store.expert_streamer()].into_iter().flatten().map(|s| s.buffer_bytes());
            let (disk, read) = strata::measure_disk_read_sized(&dir, largest.max().unwrap_or(0))?;
            let disk = disk * 1e9;
            let per_token = median(&mut streamed_per_token);
            let io = store.streamer().or(store.expert_streamer()).map(|s| s.stats().gb_per_s());
            Some((disk, per_token, io, read))
        }
        // Layers streamed into GPU memory from layer images on disk: the disk's read rate, for
        // reads of the largest image, over the bytes a pass reads (of the layers not kept in the
        // host tier).
        None => match (model.gpu_layer_images(), model.gpu_streamed_reads()) {
            (Some((file, largest)), Some((_, bytes))) if bytes > 0 => {
                say("measuring disk read bandwidth");
                let dir = file.parent().and_then(Path::parent).unwrap_or(Path::new(".")).to_path_buf();
                let (disk, read) = strata::measure_disk_read_sized(&dir, largest)?;
                Some((disk * 1e9, bytes as f64, None, read))
            }
            _ => None,
        },
    };

    // Layers streamed into GPU memory (--max-vram): the host-to-device copy rate is their bound.
    let gpu_streamed = match model.gpu_streamed() {
        Some((layers, bytes)) if bytes > 0 => {
            say("measuring host-to-device copy bandwidth");
            model.upload_bandwidth()?.map(|bw| (layers, bytes, bw))
        }
        _ => None,
    };

    let prefill_tok_s = a.prompt_tokens as f64 / median(&mut prefill);
    let decode_tok_s = a.gen_tokens as f64 / median(&mut decode);
    // A MoE token reads the experts it was routed to: `k`, or with dynamic top-k the mean over a
    // recorded decode like the timed ones (the model's weight count assumes `k`, the most).
    let options = model.decoder().moe_options();
    let dynamic_routing = matches!(options.routing, strata::Routing::DynamicTopK { p, .. } if p < 1.0);
    let mean_experts = match &hp.moe {
        None => None,
        Some(_) if dynamic_routing => {
            say("recording the routing of one more decode");
            let mut trace = strata::RouterTrace::new();
            let mut cache = model.new_cache()?;
            model.plan(&mut cache, total)?;
            let mut logits = model.step(&prompt, &mut cache)?;
            for _ in 0..a.gen_tokens {
                let next = strata::sampling::argmax(&logits) as u32;
                logits = model.step_with_router(&[next], &mut cache, &mut trace)?;
            }
            Some(trace.mean_experts_per_token())
        }
        Some(shape) => Some(options.active_experts.unwrap_or(shape.top_k) as f64),
    };
    let mut bytes_per_token = model.decoder().weight_bytes_per_token();
    if let (Some(mean), Some(shape)) = (mean_experts, &hp.moe) {
        let k = model.decoder().moe_options().active_experts.unwrap_or(shape.top_k);
        let unused = (k as f64 - mean).max(0.0) * model.decoder().bytes_per_active_expert() as f64;
        bytes_per_token -= unused.round() as usize;
    }
    // Each decoded token also reads the keys and values of every position its layers see.
    let windows: Vec<Option<usize>> = (0..hp.n_layers).map(|l| hp.layer_windows.get(l).copied().flatten()).collect();
    let kv_per_token = kv_read_per_token(hp.kv_dim(), &windows, a.prompt_tokens, a.gen_tokens);
    bytes_per_token += kv_per_token;
    let bound_tok_s = bandwidth / bytes_per_token as f64;
    // The decode's share of experts found in the expert cache (median over the runs).
    let hit_rate = (!hit_rates.is_empty()).then(|| median(&mut hit_rates));
    let mut report = json!({
        "model": model.source().display().to_string(),
        "threads": model.threads(),
        "act_quant": strata::act_quant().name(),
        "prompt_tokens": a.prompt_tokens,
        "gen_tokens": a.gen_tokens,
        "prefill_tok_s": prefill_tok_s,
        "decode_tok_s": decode_tok_s,
        "peak_rss_bytes": peak_rss,
        "peak_vram_bytes": peak_vram,
        "bytes_read_per_token": bytes_per_token,
        "kv_bytes_read_per_token": kv_per_token,
        "weight_bytes": model.decoder().weight_bytes(),
        "kv_bytes": kv_bytes,
        "memory_read_gb_s": bandwidth / 1e9,
        "decode_bound_tok_s": bound_tok_s,
        "decode_fraction_of_bound": decode_tok_s / bound_tok_s,
        "io_gb_s": null,
        "expert_cache_hit_rate": hit_rate,
        "mean_experts_per_token": mean_experts,
        "plan": { "strategy": "all-resident", "device": model.device().to_string() },
    });
    if let Some(e) = expert_stats {
        // The last run's decode: experts read ahead, and what became of the reads.
        report["expert_prefetch"] = json!({
            "reads_ahead": e.prefetched,
            "taken_over": e.prefetch_used,
            "dropped": e.prefetch_wasted,
            "landed_unused": e.prefetch_unused,
            "misses": e.misses,
            "hits": e.hits,
        });
    }
    if let Some(plan) = model.placement() {
        report["plan"] = json!({
            "strategy": plan.strategy,
            "device": model.device().to_string(),
            "prefetch_depth": plan.prefetch_depth,
            "staging_buffers": plan.staging_buffers,
            "streamed_units": plan.stream_order.len(),
            "max_ram_bytes": plan.budgets.ram,
            "planned_ram_bytes": plan.ram.total,
            "context_tokens": model.decoder().max_context(),
            "resident_weight_bytes": plan.ram.resident_weights,
            "expert_cache_bytes": plan.ram.expert_cache,
            "expected_expert_hit_rate": plan.expected_expert_hit_rate,
            "predicted_s_per_token": plan.predicted.total_s,
        });
    }
    let mut disk_fraction = None;
    if let Some((disk, per_token, io, read)) = streaming {
        let disk_bound = disk / per_token;
        disk_fraction = Some((disk_bound, decode_tok_s / disk_bound));
        report["bytes_streamed_per_token"] = json!(per_token);
        report["disk_read_gb_s"] = json!(disk / 1e9);
        report["io_gb_s"] = json!(io);
        report["decode_disk_bound_tok_s"] = json!(disk_bound);
        report["decode_fraction_of_disk_bound"] = json!(decode_tok_s / disk_bound);
        report["disk_read_method"] = json!(format!(
            "512 MiB file in the offload dir, O_DIRECT io_uring reads of {:.1} MiB (the largest the store issues, \
             8 to 128 MiB), 4 in flight",
            read as f64 / (1 << 20) as f64
        ));
        if model.gpu_layer_images().is_some() {
            report["layer_image_reads"] = json!(
                "one O_DIRECT pread per layer image, two at a time on the reader's threads, into 3 page-locked \
                 staging buffers (the bound's probe keeps 4 reads in flight)"
            );
            if let (Some((read, _)), Some((layers, _))) = (model.gpu_streamed_reads(), model.gpu_streamed()) {
                report["vram_layers_read_from_disk"] = json!(read);
                report["vram_layers_in_host_tier"] = json!(layers - read);
            }
        }
    }
    if let Some((layers, bytes, bw)) = gpu_streamed {
        let upload_bound = bw / bytes as f64;
        report["vram_streamed_layers"] = json!(layers);
        report["bytes_uploaded_per_token"] = json!(bytes);
        report["upload_gb_s"] = json!(bw / 1e9);
        report["decode_upload_bound_tok_s"] = json!(upload_bound);
        report["decode_fraction_of_upload_bound"] = json!(decode_tok_s / upload_bound);
        report["upload_method"] =
            json!("256 MiB pinned host buffer to device on the copy stream, host-timed to completion, median of 5");
    }
    if let Some(name) = &device_name {
        report["device_name"] = json!(name);
        report["memory_read_method"] = json!(
            "device-to-device copy (cuMemcpyDtoD, up to 1 GiB), (bytes read + bytes written) / time, median of 5"
        );
        report["peak_vram_method"] = json!("device total - free after each run (includes the CUDA context)");
    }
    if let Some(p) = &kernels {
        report["kernel_profile"] = kernel_report(p, a.gen_tokens, decode_tok_s);
    }
    // The host's time queuing a GPU decode step (median over the runs) beside the step's wall
    // time: close to it, the device waits for the host.
    let host_us = (!host_us.is_empty()).then(|| median(&mut host_us));
    if let Some(us) = host_us {
        report["decode_host_us_per_token"] = json!(us);
        report["decode_host_share"] = json!(us * decode_tok_s / 1e6);
    }
    // The device expert cache over the last run's decode: its hit rate, and the bytes a token
    // copied in, against the host-to-device copy rate; with the experts read from disk, the bytes
    // a token read (the misses its host tier did not hold), against the disk's read rate.
    let images = model.gpu_layer_images();
    let gpu_cache = gpu_cache.map(|c| {
        let per_token = c.bytes_uploaded as f64 / a.gen_tokens as f64;
        let read = images.as_ref().map_or(0, |(_, read)| *read);
        let read_per_token = (c.disk_reads * read as u64) as f64 / a.gen_tokens as f64;
        (c, per_token, read_per_token)
    });
    // What the copies alone would allow, at the host-to-device rate measured now.
    let cache_bound = match gpu_cache {
        Some((_, per_token, _)) if per_token > 0.0 => {
            say("measuring host-to-device copy bandwidth");
            model.upload_bandwidth()?.map(|bw| (bw, bw / per_token))
        }
        _ => None,
    };
    // Experts read from images on disk on each miss the host tier does not hold: the disk's
    // read rate, for reads of one expert, over the bytes a token read.
    let cache_disk_bound = match (gpu_cache, &images) {
        (Some((_, _, read_per_token)), Some((file, largest))) if read_per_token > 0.0 => {
            say("measuring disk read bandwidth");
            let dir = file.parent().and_then(Path::parent).and_then(Path::parent).unwrap_or(Path::new("."));
            let (disk, _) = strata::measure_disk_read_sized(dir, *largest)?;
            Some((disk * 1e9, disk * 1e9 / read_per_token))
        }
        _ => None,
    };
    if let Some((c, per_token, read_per_token)) = gpu_cache {
        let from_disk = images.is_some();
        report["gpu_expert_cache"] = json!({
            "disk_read_gb_s": cache_disk_bound.map(|(disk, _)| disk / 1e9),
            "decode_disk_bound_tok_s": cache_disk_bound.map(|(_, bound)| bound),
            "decode_fraction_of_disk_bound": cache_disk_bound.map(|(_, bound)| decode_tok_s / bound),
            "bytes_read_per_token": from_disk.then_some(read_per_token),
            "host_tier_experts": from_disk.then_some(c.host_slots),
            "host_tier_share_of_misses": from_disk.then(|| c.host_hits as f64 / c.misses.max(1) as f64),
            "slots": c.slots,
            "hit_rate": c.hit_rate(),
            "expected_hit_rate": c.expected_hit_rate,
            "bytes_uploaded_per_token": per_token,
            "upload_gb_s": cache_bound.map(|(bw, _)| bw / 1e9),
            "decode_upload_bound_tok_s": cache_bound.map(|(_, bound)| bound),
            "decode_fraction_of_upload_bound": cache_bound.map(|(_, bound)| decode_tok_s / bound),
        });
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("prefill      {prefill_tok_s:>10.1} tok/s  ({} tokens)", a.prompt_tokens);
        println!(
            "decode       {decode_tok_s:>10.2} tok/s  ({:.0}% of the bandwidth bound {bound_tok_s:.2} tok/s)",
            100.0 * decode_tok_s / bound_tok_s
        );
        if let Some(us) = host_us {
            println!(
                "decode host  {us:>10.1} us/token queuing each step's work ({:.0}% of the step)",
                100.0 * us * decode_tok_s / 1e6
            );
        }
        println!("weights/token {:>9.1} MB", bytes_per_token as f64 / 1e6);
        if let Some(mean) = mean_experts {
            let how = if dynamic_routing { "mean over the MoE layers of a recorded decode" } else { "the model's k" };
            println!("experts/token {mean:>9.2} ({how})");
        }
        if device_name.is_none() {
            println!("memory read  {:>10.1} GB/s (measured in this run)", bandwidth / 1e9);
        } else {
            println!(
                "memory       {:>10.1} GB/s (device-to-device copy, read + written, measured in this run)",
                bandwidth / 1e9
            );
        }
        if let (Some((disk, per_token, io, _)), Some((bound, fraction))) = (streaming, disk_fraction) {
            let from = match model.placement() {
                Some(p) => format!("the offload pack ({})", p.strategy),
                None => match (model.gpu_streamed_reads(), model.gpu_streamed()) {
                    (Some((read, _)), Some((layers, _))) if read < layers => format!(
                        "layer images, into the GPU ({read} of {layers} streamed layers; the others stay in host memory)"
                    ),
                    _ => "layer images, into the GPU".to_owned(),
                },
            };
            println!("streamed     {:>10.1} MB/token from {from}", per_token / 1e6);
            println!(
                "disk read   {:>10.2} GB/s (measured in this run): bound {bound:.2} tok/s, decode at {:.0}%",
                disk / 1e9,
                100.0 * fraction
            );
            if let Some(io) = io {
                println!("io achieved {io:>10.2} GB/s (while reads were in flight)");
            }
            if let Some(rate) = hit_rate {
                let cache = model.store().and_then(|s| s.expert_cache_capacity());
                let (slots, bytes) = cache.unwrap_or_default();
                let expected = model
                    .placement()
                    .and_then(|p| p.expected_expert_hit_rate)
                    .map_or(String::new(), |e| format!("; {:.1}% planned for uniform routing", 100.0 * e));
                println!(
                    "expert cache {:>9.1}% hits while decoding ({slots} experts, {:.1} MB{expected})",
                    100.0 * rate,
                    bytes as f64 / 1e6
                );
            }
        }
        if let Some((layers, bytes, bw)) = gpu_streamed {
            let bound = bw / bytes as f64;
            println!(
                "uploaded     {:>10.1} MB/token ({layers} layers streamed from host memory under --max-vram)",
                bytes as f64 / 1e6
            );
            println!(
                "host->device {:>10.2} GB/s (pinned, measured in this run): bound {bound:.2} tok/s, decode at {:.0}%",
                bw / 1e9,
                100.0 * decode_tok_s / bound
            );
        }
        if let Some((c, per_token, read_per_token)) = gpu_cache {
            let expected = c
                .expected_hit_rate
                .map_or(String::new(), |e| format!("; {:.1}% planned for uniform routing", 100.0 * e));
            println!(
                "GPU experts  {:>9.1}% hits while decoding ({} slots on the device; {:.1} MB/token copied in{expected})",
                100.0 * c.hit_rate(),
                c.slots,
                per_token / 1e6
            );
            if images.is_some() {
                println!(
                    "host tier    {:>9.1}% of the misses held in host memory ({} experts); {:.1} MB/token read from disk",
                    100.0 * c.host_hits as f64 / c.misses.max(1) as f64,
                    c.host_slots,
                    read_per_token / 1e6
                );
            }
            if let Some((bw, bound)) = cache_bound {
                println!(
                    "host->device {:>10.2} GB/s (pinned, measured in this run): bound {bound:.2} tok/s, decode at {:.0}%",
                    bw / 1e9,
                    100.0 * decode_tok_s / bound
                );
            }
            if let Some((disk, bound)) = cache_disk_bound {
                println!(
                    "disk read    {:>10.2} GB/s (the experts' images, measured in this run): bound {bound:.2} tok/s, \
                     decode at {:.0}%",
                    disk / 1e9,
                    100.0 * decode_tok_s / bound
                );
            }
        }
        if let Some(rss) = peak_rss {
            println!("peak RSS     {:>10.1} MB", rss as f64 / 1e6);
        }
        if let Some(vram) = peak_vram {
            println!("peak VRAM    {:>10.1} MB (device total - free)", vram as f64 / 1e6);
        }
        if let Some(p) = &kernels {
            print_kernels(p, a.gen_tokens, decode_tok_s);
        }
    }
    Ok(())
}

/// A decode's kernel profile per token, beside the timed decode's time per token: what the GPU
/// computed, and what went to launches, host work and waits (the rest).
fn kernel_report(p: &strata::KernelProfile, tokens: usize, decode_tok_s: f64) -> serde_json::Value {
    let per_token = |x: f64| x / tokens as f64;
    let kernel_us = per_token(p.seconds()) * 1e6;
    let decode_us = 1e6 / decode_tok_s;
    let rows: Vec<_> = p
        .kernels
        .iter()
        .map(|k| {
            json!({
                "kernel": k.kernel,
                "launches_per_token": per_token(k.launches as f64),
                "us_per_token": per_token(k.seconds) * 1e6,
                "share_of_kernel_time": k.seconds / p.seconds().max(f64::MIN_POSITIVE),
            })
        })
        .collect();
    json!({
        "method": "one more decode of gen_tokens tokens, kernels launched one by one (no CUDA graph), \
                   each between two CUDA timing events on the compute stream; cuBLAS and copies not counted",
        "decoded_tokens": tokens,
        "launches_per_token": per_token(p.launches() as f64),
        "kernel_us_per_token": kernel_us,
        "decode_us_per_token": decode_us,
        "outside_kernels_us_per_token": decode_us - kernel_us,
        "kernels": rows,
    })
}

fn print_kernels(p: &strata::KernelProfile, tokens: usize, decode_tok_s: f64) {
    let per_token = |x: f64| x / tokens as f64;
    let kernel_us = per_token(p.seconds()) * 1e6;
    let decode_us = 1e6 / decode_tok_s;
    println!(
        "kernels      {kernel_us:>10.1} us/token of GPU time, {:.1} launches/token (one more decode, each launch timed)",
        per_token(p.launches() as f64)
    );
    println!(
        "             the timed decode took {decode_us:.1} us/token: {:.1} us ({:.0}%) outside kernels \
         (launches, host work, copies, cuBLAS)",
        decode_us - kernel_us,
        100.0 * (decode_us - kernel_us) / decode_us
    );
    for k in &p.kernels {
        println!(
            "  {:<36} {:>7.2} launches {:>9.1} us/token {:>5.1}%",
            k.kernel,
            per_token(k.launches as f64),
            per_token(k.seconds) * 1e6,
            100.0 * k.seconds / p.seconds().max(f64::MIN_POSITIVE)
        );
    }
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

/// Bytes of the f32 KV cache a decoded token reads, on average over the decode of `steps` tokens
/// after a prompt of `prompt`, for layers of `kv_dim` key (and value) floats per position and
/// the sliding windows `windows` (one per layer, `None`: none): step `i` sees `prompt + i + 1`
/// positions in each layer, at most its window.
fn kv_read_per_token(kv_dim: usize, windows: &[Option<usize>], prompt: usize, steps: usize) -> usize {
    let total: usize = (0..steps)
        .map(|i| windows.iter().map(|w| w.map_or(prompt + i + 1, |w| (prompt + i + 1).min(w))).sum::<usize>())
        .sum();
    2 * kv_dim * 4 * total / steps.max(1)
}

#[cfg(test)]
mod tests {
    use super::kv_read_per_token;

    #[test]
    fn the_kv_read_averages_the_positions_each_layer_sees() {
        // Two layers of 8 floats per row: steps see 5, 6, 7 positions (a mean of 6) in the first,
        // at most 5 in the windowed one.
        assert_eq!(kv_read_per_token(8, &[None, Some(5)], 4, 3), 2 * 8 * 4 * (18 + 15) / 3);
        assert_eq!(kv_read_per_token(8, &[], 4, 3), 0);
        assert_eq!(kv_read_per_token(8, &[None], 4, 0), 0);
    }
}
