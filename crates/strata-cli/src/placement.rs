//! `strata plan` (where the weights would live, and the predicted time per token) and
//! `strata pack` (build the offload pack ahead of the first offloaded run).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::{ModelArgs, load_options, model_path};

#[derive(Args, Debug)]
pub(crate) struct PlanArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Print the plan as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Measure this machine again (disk, memory, matvec per dtype) and cache the result.
    #[arg(long)]
    probe: bool,
}

#[derive(Args, Debug)]
pub(crate) struct PackArgs {
    /// A checkpoint directory, a .gguf file or a model id (default: the default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Directory for the offload pack (default: `<strata cache>/offload`).
    #[arg(long, value_name = "DIR")]
    offload_dir: Option<PathBuf>,
    /// Store the pack's matrices in this dtype (q8_0, q4_0, q4_1, q4_k, q6_k, f16, bf16).
    #[arg(long, value_name = "DTYPE")]
    pack_dtype: Option<String>,
}

pub(crate) fn plan(a: PlanArgs) -> Result<()> {
    let mut options = load_options(&a.model)?;
    if options.offload.max_vram.is_some() {
        return plan_vram(&a, &options);
    }
    if !options.offload.is_active() {
        // `strata plan` with no placement flags plans the default strategy with no ceiling.
        options.offload.strategy = Some(strata::planner::DEFAULT_STRATEGY.to_string());
    }
    if a.probe {
        let threads = options.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        eprintln!("measuring disk, memory and matvec rates with {threads} threads...");
        let profile = strata::probe_hardware(&options.offload.offload_dir(), threads)?;
        strata::save_hardware_profile(&profile)?;
        eprintln!("saved {}", strata::hardware_profile_path().display());
        options.offload.hardware = Some(profile);
    }
    let path = model_path(&a.model)?;
    let report = strata::plan_placement(&path, &options).with_context(|| format!("cannot plan {}", path.display()))?;
    if a.json {
        let value = serde_json::json!({
            "model": path.display().to_string(),
            "context_tokens": report.context_tokens,
            "hardware": report.hardware,
            "units": report.manifest.units,
            "plan": report.plan,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let h = &report.hardware;
        println!(
            "model {}: {} units, {} of weights; KV cache reserved for {} tokens",
            path.display(),
            report.manifest.units.len(),
            strata::planner::format_size(report.manifest.total_bytes()),
            report.context_tokens
        );
        let large = h.disk_read_large_gb_s.map_or(String::new(), |r| format!(" in 8 MiB reads, {r:.2} in 64 MiB"));
        println!(
            "machine: disk {:.2} GB/s{large}, memory {:.1} GB/s, {} threads ({})",
            h.disk_read_gb_s,
            h.memory_gb_s,
            h.threads,
            strata::hardware_profile_path().display()
        );
        print!("{}", report.plan.to_table(&report.manifest));
    }
    Ok(())
}

pub(crate) fn pack(a: PackArgs) -> Result<()> {
    let path = match &a.model {
        Some(p) => p.clone(),
        None => strata::default_model()?,
    };
    let dir = a.offload_dir.clone().unwrap_or_else(|| strata::cache_dir().join("offload"));
    let mut last_percent: Option<usize> = None;
    let dtype = a.pack_dtype.as_deref().map(crate::parse_dtype).transpose()?;
    // A bar redrawn in place on a terminal; a line per tenth in a log.
    let terminal = std::io::stderr().is_terminal();
    let report = strata::pack_model(&path, &dir, dtype, |done, total, unit| {
        let percent = (100 * done / total.max(1)) as usize;
        if terminal && last_percent != Some(percent) {
            let bar = "#".repeat(percent / 4) + &" ".repeat(25 - percent / 4);
            eprint!("\r  packing [{bar}] {percent:>3}%  {unit:<24}");
            let _ = std::io::stderr().flush();
        } else if !terminal && last_percent.is_none_or(|last| percent / 10 > last / 10) {
            eprintln!("  packing: {percent:>3}% ({unit})");
        }
        last_percent = Some(percent);
    })
    .with_context(|| format!("cannot pack {}", path.display()))?;
    if terminal && last_percent.is_some() {
        eprintln!();
    }
    let what = match &report.built_because {
        Some(reason) => format!("built the pack ({reason})"),
        None => "found a valid pack".to_string(),
    };
    println!(
        "{what} of {}: {} units, {} in {}",
        path.display(),
        report.units,
        strata::planner::format_size(report.bytes),
        report.dir.display()
    );
    Ok(())
}

/// `strata plan --max-vram SIZE`: where the weights go on CUDA under that ceiling (no GPU
/// needed): what stays on the device, which layers stream from host memory, what a token copies.
fn plan_vram(a: &PlanArgs, options: &strata::LoadOptions) -> Result<()> {
    anyhow::ensure!(
        !options.offload.sets_cpu_placement(),
        "--max-vram plans the GPU (with --max-ram bounding the host memory it takes and --offload-dir the \
         layers it streams read from disk); --strategy, --prefetch-layers, --pack-dtype and --expert-cache plan \
         the CPU's tiers: give one or the other"
    );
    let path = model_path(&a.model)?;
    let r = strata::plan_vram_placement(&path, options).with_context(|| format!("cannot plan {}", path.display()))?;
    let (b, rep) = (&r.budget, &r.report);
    let size = strata::planner::format_size;
    let streamed: Vec<usize> = (0..r.layers).filter(|&i| rep.streamed[i]).collect();
    let from_disk = r.images.is_some();
    let tier_bytes = rep.host_tier_bytes(r.host_tier);
    let tier_rate = (r.host_tier > 0).then(|| rep.expected_host_tier_hit_rate(r.host_tier)).flatten();
    let host_bytes = rep.host_bytes_with(from_disk) + tier_bytes;
    if a.json {
        let layers: Vec<_> = (0..r.layers)
            .map(|i| {
                serde_json::json!({
                    "layer": i,
                    "bytes": rep.needs.resident[i],
                    "streamed": rep.streamed[i],
                })
            })
            .collect();
        let value = serde_json::json!({
            "model": path.display().to_string(),
            "device": "cuda",
            "max_vram_bytes": b.max_bytes,
            "context_tokens": b.context_tokens,
            "pass_tokens": b.pass_tokens,
            "fixed_bytes": {
                "weights": rep.needs.weights,
                "kv_cache": rep.needs.kv_cache,
                "scratch": rep.needs.scratch,
            },
            "layers": layers,
            "streamed_layers": streamed.len(),
            "expert_cache_slots": rep.expert_slots,
            "expected_expert_hit_rate": rep.expected_expert_hit_rate,
            "expected_expert_upload_per_token": rep.expected_expert_upload(),
            "expert_slot_bytes": rep.needs.expert_slot,
            "routed_experts": rep.needs.expert_count,
            "buffer_bytes": rep.buffer_bytes(),
            "uploaded_bytes_per_token": rep.uploaded_per_pass(),
            "device_bytes": rep.device_bytes(),
            "host_bytes": host_bytes,
            "max_ram_bytes": r.max_ram,
            "layer_images": r.images.as_ref().map(|d| d.display().to_string()),
            "host_tier_units": r.host_tier,
            "host_tier_bytes": tier_bytes,
            "expected_host_tier_hit_rate": tier_rate,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!(
        "model {}: {} layers on CUDA under --max-vram {} (KV cache for {} tokens, passes of {} tokens)",
        path.display(),
        r.layers,
        size(b.max_bytes),
        b.context_tokens,
        b.pass_tokens
    );
    println!(
        "stays on the GPU   {:>10}  (embeddings, head, norms {}; KV cache {}; scratch {})",
        size(rep.needs.fixed()),
        size(rep.needs.weights),
        size(rep.needs.kv_cache),
        size(rep.needs.scratch)
    );
    let kept: u64 = (0..r.layers).filter(|&i| !rep.streamed[i]).map(|i| rep.needs.resident[i]).sum();
    if rep.expert_slots > 0 {
        let experts: u64 = rep.needs.experts.iter().sum();
        println!(
            "resident layers    {:>10}  ({} of {}, without their routed experts)",
            size(kept - experts),
            r.layers,
            r.layers
        );
        let from = match &r.images {
            Some(dir) => format!("read from images in {}", dir.join("experts").display()),
            None => "in page-locked host memory".to_owned(),
        };
        println!(
            "routed experts     {:>10}  ({} {from}, copied in as the routers pick them)",
            size(experts),
            rep.needs.expert_count
        );
        println!(
            "expert cache       {:>10}  ({} slots of {}: {:.0}% of the experts on the device)",
            size(rep.buffer_bytes()),
            rep.expert_slots,
            size(rep.needs.expert_slot),
            100.0 * rep.expert_slots as f64 / rep.needs.expert_count as f64
        );
        if let (Some(hit), Some(upload)) = (rep.expected_expert_hit_rate, rep.expected_expert_upload()) {
            println!(
                "copied per token   {:>10}  (expected: {:.0}% hits if the routers picked uniformly, layer-lru)",
                size(upload),
                100.0 * hit
            );
            if from_disk {
                let share = tier_rate.unwrap_or(0.0);
                if r.host_tier > 0 {
                    println!(
                        "host tier          {:>10}  ({} experts read last, kept in page-locked memory under --max-ram: \
                         expected to hold {:.0}% of the misses)",
                        size(tier_bytes),
                        r.host_tier,
                        100.0 * share
                    );
                }
                let why = if share < 1.0 {
                    "expected; decode is bounded by the disk's read rate over this"
                } else {
                    "every expert stays in host memory once read"
                };
                println!("read per token     {:>10}  ({why})", size((upload as f64 * (1.0 - share)).round() as u64));
            }
        }
        println!("on the GPU in all  {:>10}  of {}", size(rep.device_bytes()), size(b.max_bytes));
        host_line(host_bytes, r.max_ram, from_disk);
        return Ok(());
    }
    println!("resident layers    {:>10}  ({} of {})", size(kept), r.layers - streamed.len(), r.layers);
    match (streamed.first(), streamed.last()) {
        (Some(first), Some(last)) => {
            let from = match &r.images {
                Some(dir) => format!("read from layer images in {}", dir.display()),
                None => "from page-locked host memory".to_owned(),
            };
            println!(
                "streamed layers    {:>10}  ({} of {}: layers {first}-{last}, {from})",
                size(rep.uploaded_per_pass()),
                streamed.len(),
                r.layers
            );
            println!("layer buffers      {:>10}  (2, taken in turn)", size(rep.buffer_bytes()));
            if r.host_tier > 0 {
                println!(
                    "host tier          {:>10}  ({} of the {} streamed layers kept in page-locked memory under --max-ram, \
                     read from disk once)",
                    size(tier_bytes),
                    r.host_tier,
                    streamed.len()
                );
            }
            let bound = if from_disk && r.host_tier < streamed.len() {
                "the host-to-device copy rate over this, and the disk's read rate over what is read"
            } else {
                "the host-to-device copy rate over this"
            };
            println!("uploaded per token {:>10}  (decode is bounded by {bound})", size(rep.uploaded_per_pass()));
            if from_disk {
                let share = tier_rate.unwrap_or(0.0);
                println!(
                    "read per token     {:>10}  ({} layers read from disk each pass)",
                    size((rep.uploaded_per_pass() as f64 * (1.0 - share)).round() as u64),
                    streamed.len() - r.host_tier
                );
            }
        }
        _ => println!("streamed layers    {:>10}  (every layer fits)", size(0)),
    }
    println!("on the GPU in all  {:>10}  of {}", size(rep.device_bytes()), size(b.max_bytes));
    host_line(host_bytes, r.max_ram, from_disk);
    Ok(())
}

/// The page-locked host memory line of `strata plan --max-vram`, against `--max-ram` if given;
/// from disk without it, a hint that it would keep some of what is read in host memory.
fn host_line(host_bytes: u64, max_ram: Option<u64>, from_disk: bool) {
    let size = strata::planner::format_size;
    let of = match max_ram {
        Some(m) => format!("  of {} (--max-ram)", size(m)),
        None if from_disk => "  (--max-ram beyond it would keep some of what is read in host memory)".to_owned(),
        None => String::new(),
    };
    println!("in host memory     {:>10}  (page-locked){of}", size(host_bytes));
}
