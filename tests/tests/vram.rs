//! Placing a model under a GPU memory ceiling (`--max-vram`) without a GPU: which layers stream
//! from host memory (`strata_models::plan_vram`, what `CudaDecoder::new_within` places), the
//! device expert cache a Mixture-of-Experts model gets instead (`vram_report`), and the facade
//! refusing the ceiling on the CPU. `cuda_models` runs the placements on a card.

use strata::{Device, LoadOptions, Model, OffloadConfig};
use strata_models::{Decoder, VramBudget, plan_vram, vram_report};
use strata_tests::{Fixture, GgufDtypes, write_gguf_layers};

/// A model of `layers` copies of a fixture's layers, as a GGUF file, loaded on the CPU.
fn deep(layers: usize, dir: &std::path::Path) -> (std::path::PathBuf, Decoder) {
    let f = Fixture::load("llama_untied");
    let path = dir.join(format!("llama_untied_{layers}.gguf"));
    write_gguf_layers(&f, GgufDtypes::Uniform(strata_models::tensor::DType::Q8_0), |_| {}, Some(layers), &path);
    let decoder = strata_models::load_gguf(&path).unwrap().decoder;
    assert_eq!(decoder.hparams().n_layers, layers);
    (path, decoder)
}

fn budget(max_bytes: u64) -> VramBudget {
    VramBudget { max_bytes, context_tokens: 256, pass_tokens: 64 }
}

/// Whether everything is resident under `b`: no layer streams and no expert cache.
fn resident(decoder: &Decoder, b: VramBudget) -> bool {
    matches!(vram_report(decoder, &b), Ok(r) if r.expert_slots == 0 && r.streamed.iter().all(|s| !s))
}

/// The smallest ceiling under which nothing streams.
fn all_resident(decoder: &Decoder) -> u64 {
    resident_from(decoder, budget(0))
}

/// The smallest ceiling under which nothing streams, for the context and pass of `base`.
fn resident_from(decoder: &Decoder, base: VramBudget) -> u64 {
    let at = |max_bytes| VramBudget { max_bytes, ..base };
    let (mut lo, mut hi) = (0u64, 1u64 << 40);
    assert!(resident(decoder, at(hi)));
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if resident(decoder, at(mid)) { hi = mid } else { lo = mid }
    }
    hi
}

/// The smallest ceiling under which nothing streams when the facade places the model with a
/// 256-token context (`strata::plan_vram_placement`, `--device cuda`).
fn facade_resident(decoder: &Decoder) -> u64 {
    resident_from(decoder, VramBudget { max_bytes: 0, context_tokens: 256, pass_tokens: strata::VRAM_PASS_TOKENS })
}

#[test]
fn a_tight_ceiling_streams_the_last_layers_in_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let (_, decoder) = deep(8, dir.path());
    let need = all_resident(&decoder);
    // One byte short: the least streaming that fits, the last 4 layers (2 buffers hold them).
    let plan = plan_vram(&decoder, &budget(need - 1)).unwrap();
    assert_eq!(plan, [false, false, false, false, true, true, true, true]);
    // Tighter, more layers stream, always the last ones, always an even count.
    let mut previous = 4;
    let mut ceiling = need - 1;
    while let Ok(plan) = plan_vram(&decoder, &budget(ceiling)) {
        let k = plan.iter().filter(|&&s| s).count();
        assert!(k >= previous && k % 2 == 0, "{k} streamed at {ceiling}");
        assert!(plan[8 - k..].iter().all(|&s| s) && plan[..8 - k].iter().all(|&s| !s), "{plan:?}");
        previous = k;
        ceiling -= 4096;
    }
    assert_eq!(previous, 8, "every layer streams before nothing fits");
    // Below that, an error naming the ceiling and what the least streaming plan needs.
    let err = plan_vram(&decoder, &budget(ceiling)).unwrap_err().to_string();
    assert!(err.contains("--max-vram") && err.contains("streaming 8 of its 8 layers"), "{err}");
}

#[test]
fn the_kv_cache_and_the_pass_count_against_the_ceiling() {
    let dir = tempfile::tempdir().unwrap();
    let (_, decoder) = deep(4, dir.path());
    let need = all_resident(&decoder);
    let resident = |b: VramBudget| resident(&decoder, b);
    assert!(resident(budget(need)));
    assert!(!resident(VramBudget { context_tokens: 257, ..budget(need) }), "one token more of KV cache");
    assert!(!resident(VramBudget { pass_tokens: 65, ..budget(need) }), "one token more per pass");
}

#[test]
fn too_few_layers_to_stream_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (_, decoder) = deep(2, dir.path());
    let need = all_resident(&decoder);
    let err = plan_vram(&decoder, &budget(need - 1)).unwrap_err().to_string();
    assert!(err.contains("too few to stream"), "{err}");
}

/// A MoE model that does not fit keeps its routed experts in host memory and a device cache of
/// as many as the rest leaves room for: no layer streams, the placement stays under the ceiling,
/// the slots shrink with it down to one, and below one an error (two layers are too few to
/// stream). A dense model never gets a cache.
#[test]
fn a_moe_model_under_a_tight_ceiling_gets_a_device_expert_cache() {
    let f = Fixture::load("mixtral_moe");
    let decoder = strata_models::load_dir(&f.dir).unwrap().decoder;
    let need = all_resident(&decoder);
    let report = vram_report(&decoder, &budget(need)).unwrap();
    assert_eq!(report.expert_slots, 0, "everything fits: no cache");
    let needs = report.needs.clone();
    assert_eq!(needs.expert_count, 2 * 8);
    let experts: u64 = needs.experts.iter().sum();
    // Each f32 expert: gate, up [20, 32] and down [32, 20]; a slot adds a 256-byte boundary each.
    assert_eq!(experts, 16 * 3 * 20 * 32 * 4);
    assert_eq!(needs.expert_slot, 3 * 20 * 32 * 4 + 3 * 256);
    let base = need - experts;
    for ceiling in [need - 1, base + 5 * needs.expert_slot + 7, base + needs.expert_slot] {
        let r = vram_report(&decoder, &budget(ceiling)).unwrap();
        let want = ((ceiling - base) / needs.expert_slot) as usize;
        assert_eq!(r.expert_slots, want.min(16), "at {ceiling}");
        assert!(r.streamed.iter().all(|&s| !s), "a cache, not streamed layers");
        assert!(r.device_bytes() <= ceiling, "{} placed under {ceiling}", r.device_bytes());
        assert_eq!(plan_vram(&decoder, &budget(ceiling)).unwrap(), vec![false; 2]);
    }
    assert_eq!(vram_report(&decoder, &budget(need - 1)).unwrap().expert_slots, 14);
    let err = vram_report(&decoder, &budget(base + needs.expert_slot - 1)).unwrap_err().to_string();
    assert!(err.contains("too few to stream") && err.contains("a device cache of one"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let (_, dense) = deep(8, dir.path());
    let r = vram_report(&dense, &budget(all_resident(&dense) - 1)).unwrap();
    assert_eq!((r.expert_slots, r.needs.expert_count, r.needs.expert_slot), (0, 0, 0));
}

#[test]
fn a_gpu_ceiling_on_the_cpu_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = deep(2, dir.path());
    let options = LoadOptions {
        device: Device::Cpu,
        offload: OffloadConfig { max_vram: Some(1 << 30), ..OffloadConfig::default() },
        ..LoadOptions::default()
    };
    let Err(err) = Model::from_pretrained(&path, options) else { panic!("--max-vram on the CPU loaded") };
    let err = err.to_string();
    assert!(err.contains("--max-vram") && err.contains("--device cuda"), "{err}");
}

/// `--max-ram` beside `--max-vram` bounds the page-locked host copies of the CUDA placement: the
/// streamed layers' matrices, or the routed experts under a device expert cache. Under the
/// ceiling the placement is the same; one byte short, an error names what they need.
#[test]
fn a_host_ceiling_bounds_the_page_locked_copies_of_a_gpu_placement() {
    let dir = tempfile::tempdir().unwrap();
    let (path, decoder) = deep(8, dir.path());
    let f = Fixture::load("mixtral_moe");
    let moe = strata_models::load_dir(&f.dir).unwrap().decoder;
    for (path, decoder) in [(path, decoder), (f.dir.clone(), moe)] {
        let need = facade_resident(&decoder);
        let options = |max_ram: Option<u64>| LoadOptions {
            max_context: Some(256),
            offload: OffloadConfig { max_vram: Some(need - 1), max_ram, ..OffloadConfig::default() },
            ..LoadOptions::default()
        };
        let free = strata::plan_vram_placement(&path, &options(None)).unwrap();
        let host = free.report.host_bytes();
        let r = &free.report;
        let want: u64 = if r.expert_slots > 0 {
            r.needs.expert_count as u64 * r.needs.expert_slot
        } else {
            (0..r.streamed.len()).filter(|&i| r.streamed[i]).map(|i| r.needs.streamed[i]).sum()
        };
        assert!(host > 0 && host == want, "{host} against {want}");
        let fits = strata::plan_vram_placement(&path, &options(Some(host))).unwrap();
        assert_eq!((fits.report, fits.max_ram), (free.report.clone(), Some(host)));
        let err = strata::plan_vram_placement(&path, &options(Some(host - 1))).unwrap_err().to_string();
        assert!(
            err.contains("--max-ram") && err.contains("page-locked host memory") && err.contains("--max-vram"),
            "{err}"
        );
        // With --offload-dir the streamed layers (or the routed experts) are read from images
        // there: three staging buffers of the largest take the host memory.
        let images = tempfile::tempdir().unwrap();
        let from_disk = |max_ram: Option<u64>| LoadOptions {
            offload: OffloadConfig { offload_dir: Some(images.path().to_path_buf()), ..options(max_ram).offload },
            ..options(None)
        };
        let disk = strata::plan_vram_placement(&path, &from_disk(None)).unwrap();
        assert!(disk.images.as_ref().is_some_and(|d| d.starts_with(images.path())), "{:?}", disk.images);
        assert_eq!(disk.report, free.report);
        let staged = disk.report.host_bytes_with(true);
        let largest = if r.expert_slots > 0 {
            r.needs.expert_slot
        } else {
            (0..r.streamed.len()).filter(|&i| r.streamed[i]).map(|i| r.needs.streamed[i]).max().unwrap()
        };
        assert_eq!(staged, 3 * largest.next_multiple_of(4096));
        assert_eq!(strata::plan_vram_placement(&path, &from_disk(Some(staged))).unwrap().host_tier, 0);
        assert_eq!(strata::plan_vram_placement(&path, &from_disk(None)).unwrap().host_tier, 0, "no ceiling, no tier");
        // What --max-ram leaves beyond them keeps layers (or experts) in a host tier, a buffer
        // of the largest read each, up to all of them.
        let read = largest.next_multiple_of(4096);
        let units = if r.expert_slots > 0 { r.needs.expert_count } else { r.streamed.iter().filter(|&&s| s).count() };
        for (extra, tier) in [(read - 1, 0), (read, 1), (2 * read + read - 1, 2), (1 << 40, units)] {
            let p = strata::plan_vram_placement(&path, &from_disk(Some(staged + extra))).unwrap();
            assert_eq!(p.host_tier, tier, "{extra} bytes beyond the staging buffers");
            assert_eq!(p.report.host_tier_bytes(tier), tier as u64 * read);
            let share = p.report.expected_host_tier_hit_rate(tier).unwrap();
            if r.expert_slots == 0 {
                assert_eq!(share, tier as f64 / units as f64, "the layers kept, of those streamed");
            } else if tier == units {
                assert_eq!(share, 1.0, "every expert kept: every miss held");
            }
        }
        // Without --offload-dir there are no images to keep a tier of.
        assert_eq!(strata::plan_vram_placement(&path, &options(Some(1 << 40))).unwrap().host_tier, 0);
        let err = strata::plan_vram_placement(&path, &from_disk(Some(staged - 1))).unwrap_err().to_string();
        assert!(err.contains("staging buffers") && err.contains("read from disk"), "{err}");
        // Without --offload-dir, the error says it would help.
        let err = strata::plan_vram_placement(&path, &options(Some(host - 1))).unwrap_err().to_string();
        assert!(err.contains("--offload-dir"), "{err}");
        // Everything resident: nothing in host memory, whatever the ceiling.
        let roomy = LoadOptions {
            offload: OffloadConfig { max_vram: Some(need), max_ram: Some(1), ..OffloadConfig::default() },
            ..options(None)
        };
        assert_eq!(strata::plan_vram_placement(&path, &roomy).unwrap().report.host_bytes(), 0);
    }
}

/// On CUDA the host ceiling is checked before the device is opened, and the CPU's placement
/// flags are refused (this runs without a GPU: both fail before one is needed).
#[cfg(feature = "cuda")]
#[test]
fn cuda_checks_the_host_ceiling_before_it_opens_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let (path, decoder) = deep(8, dir.path());
    let need = facade_resident(&decoder);
    let load = |offload: OffloadConfig| {
        let options =
            LoadOptions { device: Device::Cuda(0), max_context: Some(256), offload, ..LoadOptions::default() };
        match Model::from_pretrained(&path, options) {
            Ok(_) => panic!("loaded"),
            Err(e) => e.to_string(),
        }
    };
    let err = load(OffloadConfig { max_vram: Some(need - 1), max_ram: Some(1), ..OffloadConfig::default() });
    assert!(err.contains("--max-ram 1 B") && err.contains("page-locked host memory"), "{err}");
    let err = load(OffloadConfig {
        max_vram: Some(need - 1),
        strategy: Some("stream-all".into()),
        ..OffloadConfig::default()
    });
    assert!(err.contains("--strategy") && err.contains("place the CPU's tiers"), "{err}");
    // --offload-dir on CUDA is where streamed layers are read from: it needs --max-vram, and its
    // host ceiling counts the staging buffers only. The images' directory is made ready (its key
    // written) before the device is opened.
    let offload = tempfile::tempdir().unwrap();
    let err = load(OffloadConfig { offload_dir: Some(offload.path().to_path_buf()), ..OffloadConfig::default() });
    assert!(err.contains("--offload-dir") && err.contains("give --max-vram"), "{err}");
    let disk = |max_ram: u64| OffloadConfig {
        max_vram: Some(need - 1),
        max_ram: Some(max_ram),
        offload_dir: Some(offload.path().to_path_buf()),
        ..OffloadConfig::default()
    };
    let err = load(disk(1));
    assert!(err.contains("staging buffers") && err.contains("read from disk"), "{err}");
    let err = load(disk(1 << 30));
    assert!(!err.contains("--max-ram"), "{err}");
    let images = strata_models::layer_images::images_dir(offload.path(), &path).unwrap();
    assert!(images.join("source.json").is_file(), "{err}");
}
