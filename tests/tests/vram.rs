//! Placing a model under a GPU memory ceiling (`--max-vram`) without a GPU: which layers stream
//! from host memory (`strata_models::plan_vram`, what `CudaDecoder::new_within` places), and the
//! facade refusing the ceiling on the CPU. `cuda_models` runs the placements on a card.

use strata::{Device, LoadOptions, Model, OffloadConfig};
use strata_models::{Decoder, VramBudget, plan_vram};
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

/// The smallest ceiling under which nothing streams.
fn all_resident(decoder: &Decoder) -> u64 {
    let (mut lo, mut hi) = (0u64, 1u64 << 40);
    assert!(plan_vram(decoder, &budget(hi)).unwrap().iter().all(|s| !s));
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        match plan_vram(decoder, &budget(mid)) {
            Ok(plan) if plan.iter().all(|s| !s) => hi = mid,
            _ => lo = mid,
        }
    }
    hi
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
    let resident = |b: VramBudget| matches!(plan_vram(&decoder, &b), Ok(plan) if plan.iter().all(|&s| !s));
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
