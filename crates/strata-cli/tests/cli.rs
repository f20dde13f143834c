//! Runs the `strata` binary: the CLI contract's commands, flags and outputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata")).args(args).output().expect("the strata binary runs")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn version_names_the_package_version() {
    let out = strata(&["--version"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("strata {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn help_lists_the_contract_commands() {
    let out = strata(&["--help"]);
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["logits", "generate", "bench"] {
        assert!(help.contains(cmd), "{help}");
    }
}

#[test]
fn logits_writes_an_npy_of_every_position() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.npy");
    let model = fixture("llama_tied");
    for decode in [false, true] {
        let mut args = vec!["logits", "--model", model.to_str().unwrap(), "--ids", "1,2,3"];
        args.extend(["--out", out_path.to_str().unwrap()]);
        if decode {
            args.push("--decode");
        }
        let out = strata(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let bytes = std::fs::read(&out_path).unwrap();
        assert_eq!(&bytes[..6], b"\x93NUMPY");
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(header.contains("'shape': (3, 256)"), "{header}");
        assert_eq!(bytes.len(), 10 + header_len + 3 * 256 * 4);
    }
}

/// `--expert-cache` keeps the experts in the offload pack, read as the routers pick them: the
/// logits stay the same bit for bit, in one pass and decoding.
#[test]
fn an_expert_cache_gives_the_same_logits() {
    let model = fixture("mixtral_e6_k3");
    let tmp = tempfile::tempdir().unwrap();
    let ids = "5,17,90,3,44,61,2,78";
    for decode in [false, true] {
        let logits = |name: &str, flags: &[&str]| {
            let out_path = tmp.path().join(name);
            let mut args = vec!["logits", "--model", model.to_str().unwrap(), "--ids", ids];
            args.extend(["--out", out_path.to_str().unwrap()]);
            if decode {
                args.push("--decode");
            }
            args.extend_from_slice(flags);
            let out = strata(&args);
            assert!(out.status.success(), "{flags:?}: {}", stderr(&out));
            std::fs::read(out_path).unwrap()
        };
        let dir = tmp.path().join("offload");
        let dir = dir.to_str().unwrap();
        let plain = logits("plain.npy", &[]);
        for policy in ["layer-lru", "lru", "lfu"] {
            let cached = logits(
                "cached.npy",
                &["--expert-cache", "16KiB", "--expert-cache-policy", policy, "--offload-dir", dir],
            );
            assert_eq!(cached, plain, "decode {decode}, {policy}");
        }
        let ahead = logits("ahead.npy", &["--expert-cache", "24KiB", "--expert-prefetch", "--offload-dir", dir]);
        assert_eq!(ahead, plain, "decode {decode}, reading ahead");
    }
}

/// An expert cache needs experts; its policy must be one the planner knows.
#[test]
fn expert_cache_flags_are_checked() {
    let run = |model: &str, flags: &[&str]| {
        let model = fixture(model);
        let mut args = vec!["logits", "--model", model.to_str().unwrap(), "--ids", "1", "--out", "/dev/null"];
        args.extend_from_slice(flags);
        strata(&args)
    };
    let out = run("llama_tied", &["--expert-cache", "1GB"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--expert-cache: the model is dense"), "{}", stderr(&out));
    let out = run("mixtral_e6_k3", &["--expert-cache", "1GB", "--expert-cache-policy", "fifo"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown expert cache policy \"fifo\""), "{}", stderr(&out));
    assert!(stderr(&out).contains("layer-lru, lru, lfu"), "{}", stderr(&out));
    let out = run("mixtral_e6_k3", &["--expert-cache", "1KB"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("holds no expert"), "{}", stderr(&out));
}

/// `--max-vram` bounds GPU memory: on the CPU it is refused, saying what it needs.
/// Sampling parameters out of range are refused before the model loads, with the value named
/// (a negative number is taken as the flag's value, not as another flag).
#[test]
fn sampling_parameters_out_of_range_are_refused() {
    for (flag, value, want) in [
        ("--temperature", "-1", "temperature -1"),
        ("--top-p", "1.5", "top-p 1.5"),
        ("--repetition-penalty", "0", "repetition penalty 0"),
    ] {
        let out = strata(&["generate", "--model", "/nonexistent", "--prompt", "hi", flag, value]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(want) && !stderr(&out).contains("nonexistent"), "{}", stderr(&out));
    }
}

#[test]
fn a_gpu_ceiling_on_the_cpu_is_refused() {
    let model = fixture("llama_tied");
    let out = strata(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "1",
        "--out",
        "/dev/null",
        "--max-vram",
        "1GB",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--max-vram is a ceiling on GPU memory: it needs --device cuda"), "{}", stderr(&out));
}

/// `strata plan --max-vram` places the model for CUDA without a GPU: a roomy ceiling keeps every
/// layer on the device, a CPU placement flag beside it is refused.
#[test]
fn plan_places_a_model_under_a_gpu_ceiling() {
    let model = fixture("llama_tied");
    let out = strata(&["plan", "--model", model.to_str().unwrap(), "--max-vram", "1GB", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["device"], "cuda");
    assert_eq!(v["max_vram_bytes"], 1_000_000_000u64);
    assert_eq!(v["streamed_layers"], 0);
    assert_eq!(v["layers"].as_array().unwrap().len(), 2);
    let device = v["device_bytes"].as_u64().unwrap();
    assert!(device > 0 && device <= 1_000_000_000, "{v}");
    assert_eq!(v["host_bytes"], 0, "{v}");
    // --max-ram bounds the host memory of the GPU placement; the CPU's placement flags are refused.
    let out = strata(&["plan", "--model", model.to_str().unwrap(), "--max-vram", "1GB", "--max-ram", "1GB", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["max_ram_bytes"].as_u64(), v["host_bytes"].as_u64()), (Some(1_000_000_000), Some(0)));
    // --offload-dir is where the layers it streams would be read from.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = strata(&["plan", "--model", model.to_str().unwrap(), "--max-vram", "1GB", "--offload-dir", d, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["layer_images"].as_str().is_some_and(|p| p.starts_with(d) && p.ends_with("-cuda")), "{v}");
    let out = strata(&["plan", "--model", model.to_str().unwrap(), "--max-vram", "1GB", "--strategy", "stream-all"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("give one or the other"), "{}", stderr(&out));
    let out = strata(&["plan", "--model", model.to_str().unwrap(), "--max-vram", "1MB"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--max-vram 1.0 MB"), "{}", stderr(&out));
}

/// `strata plan --max-vram` for a MoE model one byte short of resident: the routed experts stay
/// in host memory with a device cache of most of them, no layer streams, and the text says so.
#[test]
fn plan_gives_a_moe_model_short_of_room_a_device_expert_cache() {
    let model = fixture("mixtral_moe");
    let model = model.to_str().unwrap();
    let plan = |max_vram: &str| {
        let out = strata(&["plan", "--model", model, "--max-vram", max_vram, "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let roomy = plan("1GB");
    assert_eq!((roomy["expert_cache_slots"].as_u64(), roomy["routed_experts"].as_u64()), (Some(0), Some(16)));
    let need = roomy["device_bytes"].as_u64().unwrap();
    let tight = plan(&(need - 1).to_string());
    assert_eq!(tight["streamed_layers"], 0, "{tight}");
    let slots = tight["expert_cache_slots"].as_u64().unwrap();
    assert!((1..16).contains(&slots), "{tight}");
    assert!(tight["device_bytes"].as_u64().unwrap() < need, "{tight}");
    assert_eq!(tight["buffer_bytes"].as_u64().unwrap(), slots * tight["expert_slot_bytes"].as_u64().unwrap());
    let hit = tight["expected_expert_hit_rate"].as_f64().unwrap();
    assert!((0.0..1.0).contains(&hit), "{tight}");
    assert!(tight["expected_expert_upload_per_token"].as_u64().unwrap() > 0, "{tight}");
    assert!(roomy["expected_expert_hit_rate"].is_null(), "{roomy}");
    let out = strata(&["plan", "--model", model, "--max-vram", &(need - 1).to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("expert cache") && text.contains(&format!("{slots} slots")), "{text}");
    assert!(text.contains("copied per token"), "{text}");
    // Every routed expert in page-locked host memory, which --max-ram bounds.
    let host = tight["host_bytes"].as_u64().unwrap();
    assert_eq!(host, 16 * tight["expert_slot_bytes"].as_u64().unwrap(), "{tight}");
    let out =
        strata(&["plan", "--model", model, "--max-vram", &(need - 1).to_string(), "--max-ram", &host.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("in host memory"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let short = (host - 1).to_string();
    let out = strata(&["plan", "--model", model, "--max-vram", &(need - 1).to_string(), "--max-ram", &short]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--max-ram") && stderr(&out).contains("its 16 routed experts"), "{}", stderr(&out));
    // From images on disk (--offload-dir), --max-ram beyond the three staging buffers keeps a host
    // tier of the experts read last: here five of them.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let read = tight["expert_slot_bytes"].as_u64().unwrap().next_multiple_of(4096);
    let args = |max_ram: u64| {
        let ram = max_ram.to_string();
        let vram = (need - 1).to_string();
        let out =
            strata(&["plan", "--model", model, "--max-vram", &vram, "--offload-dir", d, "--max-ram", &ram, "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let staged = args(3 * read);
    assert_eq!((staged["host_tier_units"].as_u64(), staged["host_bytes"].as_u64()), (Some(0), Some(3 * read)));
    assert!(staged["expected_host_tier_hit_rate"].is_null(), "{staged}");
    let tiered = args(8 * read + read - 1);
    assert_eq!(tiered["host_tier_units"], 5, "{tiered}");
    assert_eq!((tiered["host_tier_bytes"].as_u64(), tiered["host_bytes"].as_u64()), (Some(5 * read), Some(8 * read)));
    let share = tiered["expected_host_tier_hit_rate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&share), "{tiered}");
    let all = args(1 << 40);
    assert_eq!(all["host_tier_units"], 16, "{all}");
    assert_eq!(all["expected_host_tier_hit_rate"], 1.0, "{all}");
    let out = strata(&[
        "plan",
        "--model",
        model,
        "--max-vram",
        &(need - 1).to_string(),
        "--offload-dir",
        d,
        "--max-ram",
        &(8 * read).to_string(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("host tier") && text.contains("5 experts read last") && text.contains("read per token"),
        "{text}"
    );
    // Without --max-ram, the plan says what it would do.
    let out = strata(&["plan", "--model", model, "--max-vram", &(need - 1).to_string(), "--offload-dir", d]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("host tier") && text.contains("--max-ram beyond it would keep"), "{text}");
}

/// `--out` writes a regular file through a temporary renamed into place; a special file is
/// written in place. (Renaming over `/dev/null`, as root, once left a regular file there that
/// fed its contents to every later reader: cargo's `rustc -` probe among them.)
#[test]
fn logits_to_dev_null_leave_it_a_device() {
    use std::os::unix::fs::FileTypeExt;
    let null = Path::new("/dev/null");
    if !std::fs::metadata(null).is_ok_and(|m| m.file_type().is_char_device()) {
        eprintln!("skipped: /dev/null is not a character device on this machine");
        return;
    }
    let model = fixture("llama_tied");
    let out = strata(&["logits", "--model", model.to_str().unwrap(), "--ids", "1,2", "--out", "/dev/null"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::fs::metadata(null).unwrap().file_type().is_char_device(), "/dev/null was replaced by a file");
}

/// A strata cache dir holding a fixed hardware profile for 2 threads, so that no command
/// measures the machine.
fn cache_with_profile() -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let profile = r#"{"disk_read_gb_s": 1.5, "disk_read_large_gb_s": 1.5, "memory_gb_s": 20.0, "matvec_gb_s": {}, "host_to_device_gb_s": null, "threads": 2}"#;
    std::fs::write(cache.path().join("hardware.json"), profile).unwrap();
    cache
}

fn strata_in(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata")).env("STRATA_CACHE", cache).args(args).output().expect("strata runs")
}

#[test]
fn placement_flags_give_the_same_logits_and_plan_and_pack_work() {
    let cache = cache_with_profile();
    let model = fixture("llama_untied");
    let model = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.npy");
    let out =
        strata_in(cache.path(), &["logits", "--model", model, "--ids", "1,2,3,4", "--out", plain.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let offload = dir.path().join("offload");
    for (strategy, depth) in [("stream-all", "0"), ("stream-all", "2"), ("pin-attention", "1")] {
        let placed = dir.path().join(format!("{strategy}-{depth}.npy"));
        let out = strata_in(
            cache.path(),
            &[
                "logits",
                "--model",
                model,
                "--ids",
                "1,2,3,4",
                "--out",
                placed.to_str().unwrap(),
                "--decode",
                "--threads",
                "2",
                "--strategy",
                strategy,
                "--prefetch-layers",
                depth,
                "--max-ram",
                "1GB",
                "--offload-dir",
                offload.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{strategy} {depth}: {}", stderr(&out));
        let (a, b) = (std::fs::read(&plain).unwrap(), std::fs::read(&placed).unwrap());
        assert_eq!(a.len(), b.len());
        let max = a[128..]
            .chunks_exact(4)
            .zip(b[128..].chunks_exact(4))
            .map(|(x, y)| (f32::from_le_bytes(x.try_into().unwrap()) - f32::from_le_bytes(y.try_into().unwrap())).abs())
            .fold(0f32, f32::max);
        assert!(max <= 1e-4, "{strategy} {depth}: decode through the store differs by {max}");
    }

    // 3 MB for the model, over the 48 MiB the process itself is counted for on 2 threads.
    let out = strata_in(cache.path(), &["plan", "--model", model, "--threads", "2", "--max-ram", "53.4MB", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["plan"]["strategy"], "cost-model");
    assert_eq!(plan["plan"]["ram"]["process"].as_u64(), Some(strata::process_ram(2)));
    assert!(plan["plan"]["ram"]["total"].as_u64().unwrap() <= 53_400_000);
    let out = strata_in(cache.path(), &["plan", "--model", model, "--threads", "2", "--max-ram", "1kB"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("needs at least"), "{}", stderr(&out));

    let packs = dir.path().join("packs");
    let out = strata_in(cache.path(), &["pack", "--model", model, "--offload-dir", packs.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("built the pack"), "{:?}", out);
    let out = strata_in(cache.path(), &["pack", "--model", model, "--offload-dir", packs.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("found a valid pack"), "{:?}", out);
}

#[test]
fn bad_inputs_get_clear_errors() {
    let out = strata(&["logits", "--model", "/nonexistent/model", "--ids", "1", "--out", "/dev/null"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/nonexistent/model"), "{}", stderr(&out));

    let model = fixture("llama_tied");
    let out = strata(&["logits", "--model", model.to_str().unwrap(), "--ids", "1,9999", "--out", "/dev/null"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("token id 9999"), "{}", stderr(&out));

    let out = strata(&["generate", "--model", model.to_str().unwrap(), "--prompt", "hi"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no tokenizer"), "{}", stderr(&out));

    let out = strata(&["logits", "--model", model.to_str().unwrap(), "--ids", "1", "--act-quant", "int4"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("`int4`") && stderr(&out).contains("int16 or int8"), "{}", stderr(&out));

    let args = ["logits", "--model", model.to_str().unwrap(), "--ids", "1", "--out", "/dev/null"];
    let out = strata(&[&args[..], &["--act-quant", "int8", "--device", "cuda"]].concat());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--act-quant int8 applies to the CPU backend"), "{}", stderr(&out));
}

#[test]
fn a_kernel_profile_needs_a_gpu() {
    let model = fixture("qwen2_bias");
    let out = strata(&["bench", "--model", model.to_str().unwrap(), "--kernel-profile", "--runs", "1", "--json"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("--kernel-profile") && err.contains("--device cuda"), "{err}");
}

#[test]
fn bench_reports_the_contract_fields_as_json() {
    let model = fixture("qwen2_bias");
    let out = strata(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "4",
        "--threads",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["act_quant"], "int16");
    for key in [
        "prefill_tok_s",
        "decode_tok_s",
        "peak_rss_bytes",
        "peak_vram_bytes",
        "bytes_read_per_token",
        "io_gb_s",
        "expert_cache_hit_rate",
        "plan",
        "kv_bytes",
        "memory_read_gb_s",
        "decode_bound_tok_s",
    ] {
        assert!(report.get(key).is_some(), "missing {key} in {report}");
    }
    assert!(report["decode_tok_s"].as_f64().unwrap() > 0.0);
}

/// Under `--max-ram`, `strata bench` plans for its own request (the KV cache of 16 tokens), keeps
/// the plan within the ceiling, streams, and its measured peak RSS stays under the ceiling too.
#[test]
fn bench_under_max_ram_stays_under_it() {
    let cache = cache_with_profile();
    let model = fixture("llama_untied");
    let offload = tempfile::tempdir().unwrap();
    // 0.27 MB for the model (of its 0.3 MB of weights), over the 48 MiB the process itself is
    // counted for on 2 threads: some units stream.
    let out = strata_in(
        cache.path(),
        &[
            "bench",
            "--model",
            model.to_str().unwrap(),
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "8",
            "--runs",
            "1",
            "--threads",
            "2",
            "--max-ram",
            "50.6MB",
            "--offload-dir",
            offload.path().to_str().unwrap(),
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let plan = &report["plan"];
    assert_eq!(plan["context_tokens"], 16, "{report}");
    assert!(plan["streamed_units"].as_u64().unwrap() > 0, "{report}");
    assert!(plan["planned_ram_bytes"].as_u64().unwrap() <= 50_600_000, "{report}");
    assert!(report["peak_rss_bytes"].as_u64().unwrap() <= 50_600_000, "{report}");
    assert!(report["bytes_streamed_per_token"].as_f64().unwrap() > 0.0, "{report}");
}

/// The float32 payload of a `.npy` written by `strata logits`.
fn read_npy(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    bytes[10 + header_len..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn dynamic_rope_scaling_decodes_across_the_boundary_like_one_pass() {
    // rope_dynamic was trained on 32 positions; 48 ids cross into the scaled range.
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("rope_dynamic");
    let ids: Vec<String> = (0..48).map(|i| ((i * 37 + 11) % 128).to_string()).collect();
    let ids = ids.join(",");
    for algorithm in ["dynamic", "yarn-dynamic"] {
        let mut runs = Vec::new();
        for decode in [false, true] {
            let path = dir.path().join(format!("{algorithm}-{decode}.npy"));
            let mut args = vec!["logits", "--model", model.to_str().unwrap(), "--ids", &ids];
            args.extend(["--out", path.to_str().unwrap(), "--rope-scaling", algorithm, "--base-capacity", "32"]);
            if decode {
                args.push("--decode");
            }
            let out = strata(&args);
            assert!(out.status.success(), "{algorithm}: {}", stderr(&out));
            runs.push(read_npy(&path));
        }
        let worst = runs[0].iter().zip(&runs[1]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4, "{algorithm}: --decode differs from one pass by {worst}");
    }
}

#[test]
fn a_request_past_max_capacity_is_refused_up_front() {
    let model = fixture("rope_dynamic");
    let ids: Vec<String> = (0..40).map(|i| (i % 128).to_string()).collect();
    let args = ["--rope-scaling", "yarn-dynamic", "--base-capacity", "16", "--max-capacity", "32"];
    let mut cmd = vec!["logits", "--model", model.to_str().unwrap(), "--ids"];
    let ids = ids.join(",");
    cmd.extend([ids.as_str(), "--out", "/dev/null"]);
    cmd.extend(args);
    let out = strata(&cmd);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("40 tokens, past max_capacity 32"), "{}", stderr(&out));

    // Alone, --max-capacity caps requests under the model's own RoPE.
    let out = strata(&["logits", "--model", model.to_str().unwrap(), "--ids", "1,2,3", "--out", "/dev/null"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let capped = |cap: &str| {
        strata(&[
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--ids",
            "1,2,3",
            "--out",
            "/dev/null",
            "--max-capacity",
            cap,
        ])
    };
    let out = capped("2");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("3 tokens, past max_capacity 2"), "{}", stderr(&out));
    let out = capped("3");
    assert!(out.status.success(), "{}", stderr(&out));

    let out = strata(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "1",
        "--out",
        "/dev/null",
        "--base-capacity",
        "64",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--base-capacity needs --rope-scaling"), "{}", stderr(&out));
}

/// `strata logits` with `args` on `model`, writing the logits to `dir/name.npy`; returns them.
fn logits_with(dir: &Path, name: &str, model: &Path, ids: &str, args: &[&str]) -> Vec<f32> {
    let path = dir.join(format!("{name}.npy"));
    let mut cmd = vec!["logits", "--model", model.to_str().unwrap(), "--ids", ids, "--out", path.to_str().unwrap()];
    cmd.extend_from_slice(args);
    let out = strata(&cmd);
    assert!(out.status.success(), "{name}: {}", stderr(&out));
    read_npy(&path)
}

/// The prompt ids of a fixture, comma-separated, and its expected.json.
fn fixture_prompt(name: &str) -> (String, serde_json::Value) {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("expected.json")).unwrap()).unwrap();
    let ids: Vec<String> = expected["prompt_ids"].as_array().unwrap().iter().map(|v| v.to_string()).collect();
    (ids.join(","), expected)
}

#[test]
fn router_json_has_the_contract_format_and_transformers_numbers() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["mixtral_moe", "mixtral_e6_k3", "qwen2_moe_norm", "qwen2_moe", "qwen3_moe"] {
        let model = fixture(name);
        let (ids, expected) = fixture_prompt(name);
        let moe = &expected["moe"];
        for decode in [false, true] {
            let json_path = dir.path().join(format!("{name}-{decode}.json"));
            let mut args = vec!["--router-json", json_path.to_str().unwrap()];
            if decode {
                args.push("--decode");
            }
            let with_router = logits_with(dir.path(), &format!("{name}-{decode}"), &model, &ids, &args);
            let plain = logits_with(dir.path(), &format!("{name}-{decode}-plain"), &model, &ids, &args[2..]);
            assert!(with_router == plain, "{name}: --router-json changed the logits");

            let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
            let aux = report["aux_loss"].as_f64().unwrap();
            let want = moe["aux_loss"].as_f64().unwrap();
            assert!((aux - want).abs() <= 1e-5, "{name} decode={decode}: aux_loss {aux} vs transformers {want}");
            let layers = report["layers"].as_array().unwrap();
            assert_eq!(layers.len(), moe["expert_counts"].as_array().unwrap().len(), "{name}");
            for (layer, want) in layers.iter().zip(moe["expert_counts"].as_array().unwrap()) {
                // Each layer holds exactly the contract's key.
                assert_eq!(layer.as_object().unwrap().keys().collect::<Vec<_>>(), ["expert_counts"], "{layer}");
                assert_eq!(&layer["expert_counts"], want, "{name} decode={decode}");
            }
            assert_eq!(report["moe_layers"], moe["moe_layers"], "{name}");
            assert_eq!(report["mean_experts_per_token"].as_f64(), moe["top_k"].as_f64(), "{name}");
            let z = report["z_loss"].as_f64().unwrap();
            let want_z = moe["router_z_loss"].as_f64().unwrap();
            assert!((z - want_z).abs() <= 1e-5 * want_z.abs().max(1.0), "{name}: z-loss {z} vs {want_z}");
        }
    }
}

#[test]
fn neutral_moe_flags_give_plain_topk_logits_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("qwen2_moe");
    let (ids, expected) = fixture_prompt("qwen2_moe");
    let k = expected["moe"]["top_k"].to_string();
    for decode in [&[][..], &["--decode"][..]] {
        let plain = logits_with(dir.path(), "plain", &model, &ids, decode);
        let neutral: [&[&str]; 4] = [
            &["--capacity-factor", "1e9"],
            &["--capacity-factor", "inf"],
            &["--routing", "dynamic-top-k", "--routing-threshold", "1.0"],
            &["--routing", "top-k", "--active-experts", &k],
        ];
        for flags in neutral {
            let mut args = flags.to_vec();
            args.extend_from_slice(decode);
            let got = logits_with(dir.path(), "neutral", &model, &ids, &args);
            assert!(got == plain, "{args:?}: the logits differ from plain top-k");
        }
        // Fewer experts per token changes the answer.
        let mut args = vec!["--routing", "dynamic-top-k", "--routing-threshold", "0.3"];
        args.extend_from_slice(decode);
        assert!(logits_with(dir.path(), "dynamic", &model, &ids, &args) != plain, "{args:?}: no change");
    }
}

#[test]
fn bad_moe_flags_get_clear_errors() {
    let moe = fixture("mixtral_moe");
    let dense = fixture("llama_tied");
    let run = |model: &Path, flags: &[&str]| {
        let mut args = vec!["logits", "--model", model.to_str().unwrap(), "--ids", "1,2", "--out", "/dev/null"];
        args.extend_from_slice(flags);
        let out = strata(&args);
        assert!(!out.status.success(), "{flags:?} succeeded");
        stderr(&out)
    };
    let err = run(&moe, &["--active-experts", "9"]);
    assert!(err.contains("active_experts = 9 is outside 1..=8"), "{err}");
    let err = run(&moe, &["--active-experts", "0"]);
    assert!(err.contains("active_experts = 0 is outside 1..=8"), "{err}");
    let err = run(&moe, &["--routing", "dynamic-top-k", "--min-experts", "3"]);
    assert!(err.contains("min_experts = 3 is outside 1..=2"), "{err}");
    let err = run(&moe, &["--routing", "dynamic-top-k", "--routing-threshold=-1"]);
    assert!(err.contains("threshold"), "{err}");
    let err = run(&moe, &["--routing-threshold", "0.5"]);
    assert!(err.contains("need --routing dynamic-top-k"), "{err}");
    let err = run(&moe, &["--capacity-factor", "0"]);
    assert!(err.contains("capacity_factor = 0"), "{err}");
    let err = run(&moe, &["--routing", "top-p"]);
    assert!(err.contains("top-k") && err.contains("dynamic-top-k"), "{err}");

    for flags in [
        &["--active-experts", "2"][..],
        &["--routing", "top-k"],
        &["--capacity-factor", "1.5"],
        &["--routing", "dynamic-top-k"],
        &["--router-json", "/dev/null"],
    ] {
        let err = run(&dense, flags);
        assert!(err.contains("llama_tied is not a Mixture-of-Experts model"), "{flags:?}: {err}");
    }
}

#[test]
fn moe_flags_are_documented_with_their_defaults() {
    for cmd in ["logits", "generate", "chat", "bench", "perplexity", "plan"] {
        let out = strata(&[cmd, "--help"]);
        assert!(out.status.success(), "{cmd}");
        let help = String::from_utf8_lossy(&out.stdout);
        for flag in ["--active-experts", "--routing", "--capacity-factor", "--routing-threshold", "--min-experts"] {
            assert!(help.contains(flag), "{cmd} --help lacks {flag}");
        }
        assert!(help.contains("default 0.9") && help.contains("default 1)"), "{cmd}: {help}");
    }
}

#[test]
fn bench_reports_experts_per_token_on_a_moe_model() {
    let model = fixture("mixtral_e6_k3");
    let bench = |flags: &[&str]| {
        let mut args = vec!["bench", "--model", model.to_str().unwrap(), "--prompt-tokens", "8"];
        args.extend(["--gen-tokens", "6", "--threads", "1", "--json"]);
        args.extend_from_slice(flags);
        let out = strata(&args);
        assert!(out.status.success(), "{flags:?}: {}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let plain = bench(&[]);
    assert_eq!(plain["mean_experts_per_token"].as_f64(), Some(3.0), "{plain}");
    assert!(plain["expert_cache_hit_rate"].is_null());
    // With the experts in a cache of all 12 (8 KiB each in the pack), the decode only hits.
    let offload_dir = tempfile::tempdir().unwrap();
    let dir = offload_dir.path().to_str().unwrap();
    let cached = bench(&["--expert-cache", "96KiB", "--offload-dir", dir]);
    assert_eq!(cached["expert_cache_hit_rate"].as_f64(), Some(1.0), "{cached}");
    assert_eq!(cached["plan"]["expert_cache_bytes"].as_u64(), Some(96 << 10), "{cached}");
    // With two, some reads.
    let small = bench(&["--expert-cache", "16KiB", "--offload-dir", dir]);
    let rate = small["expert_cache_hit_rate"].as_f64().unwrap();
    assert!((0.0..1.0).contains(&rate), "{small}");
    assert!(small["bytes_streamed_per_token"].as_f64().unwrap() > 0.0, "{small}");
    let bytes = |r: &serde_json::Value| r["bytes_read_per_token"].as_u64().unwrap();

    // One expert per token reads fewer bytes; dynamic top-k reads as many as it uses.
    let one = bench(&["--active-experts", "1"]);
    assert_eq!(one["mean_experts_per_token"].as_f64(), Some(1.0));
    assert!(bytes(&one) < bytes(&plain), "{one}");
    let dynamic = bench(&["--routing", "dynamic-top-k", "--routing-threshold", "0.3"]);
    let mean = dynamic["mean_experts_per_token"].as_f64().unwrap();
    assert!((1.0..3.0).contains(&mean), "{dynamic}");
    assert!(bytes(&one) <= bytes(&dynamic) && bytes(&dynamic) < bytes(&plain), "{dynamic}");
    // The bytes per expert are the same whichever way the count goes down.
    let per_expert = (bytes(&plain) - bytes(&one)) as f64 / 2.0;
    let expected = bytes(&plain) as f64 - (3.0 - mean) * per_expert;
    assert!((bytes(&dynamic) as f64 - expected).abs() <= 4.0, "{} vs {expected}", bytes(&dynamic));

    // A dense model reports no experts.
    let out = strata(&[
        "bench",
        "--model",
        fixture("llama_tied").to_str().unwrap(),
        "--prompt-tokens",
        "4",
        "--gen-tokens",
        "2",
        "--threads",
        "1",
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["mean_experts_per_token"].is_null(), "{report}");
}
