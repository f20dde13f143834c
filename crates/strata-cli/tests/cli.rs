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

#[test]
fn flags_of_later_features_are_refused_by_name() {
    let model = fixture("llama_tied");
    let out = strata(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "1",
        "--out",
        "/dev/null",
        "--expert-cache",
        "1GB",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--expert-cache is not supported yet"), "{}", stderr(&out));
}

/// A strata cache dir holding a fixed hardware profile for 2 threads, so that no command
/// measures the machine.
fn cache_with_profile() -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let profile =
        r#"{"disk_read_gb_s": 1.5, "memory_gb_s": 20.0, "matvec_gb_s": {}, "host_to_device_gb_s": null, "threads": 2}"#;
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

    let out = strata_in(cache.path(), &["plan", "--model", model, "--threads", "2", "--max-ram", "3MB", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["plan"]["strategy"], "cost-model");
    assert!(plan["plan"]["ram"]["total"].as_u64().unwrap() <= 3_000_000);
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

    let out = strata(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        "1",
        "--out",
        "/dev/null",
        "--max-capacity",
        "64",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("need --rope-scaling"), "{}", stderr(&out));
}
