//! Dense and Mixture-of-Experts models on CUDA against the same references as on the CPU: every committed fixture's
//! logits (one pass, token by token through the device KV cache, and in uneven chunks) and
//! greedy continuation, the RoPE scaling fixtures (including tables that change with the length,
//! which the device cache handles by recomputing, as the CPU's does by default), the GGUF path
//! (the llama fixtures written as GGUF files, in f32 and in ggml block dtypes), and the real
//! SmolLM2 GGUF when it is in the strata cache.
//!
//! Tolerances: [`TOL`] (1e-3) against transformers' logits for every safetensors fixture,
//! including `llama_bf16`, whose reference upcasts the stored bf16 weights to f32 as strata's
//! kernels do (the CPU meets 1e-4 on all of them; the device sums in a different order, and
//! its GEMMs go through cuBLAS). A quantized GGUF has no transformers reference here: it is
//! compared with strata's CPU one-pass logits on the same file, whose f32 arithmetic over the
//! dequantized weights is what the device computes.
//!
//! Every test that needs a GPU skips, saying so, when there is none
//! (`strata_kernels::cuda::testing::device_or_skip`). The GGUF writer's own check (its f32 file
//! gives the reference logits on the CPU) runs everywhere. Run with
//! `cargo test -p strata-tests --features cuda --test cuda_models`; `STRATA_FIXTURES_DIR` points
//! a prebuilt test binary at the fixtures (`strata_tests::fixtures_dir`).
#![cfg(feature = "cuda")]

use std::ops::ControlFlow;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use strata::{Device, GenerateOptions, LoadOptions, LogitsMode, Model, SamplingParams};
use strata_kernels::cuda::testing::device_or_skip;
use strata_models::layer_images;
use strata_models::tensor::DType;
use strata_models::{ContextScaling, CudaDecoder, Decoder, Logits, MoeOptions, RouterTrace, Routing, ScalingAlgorithm};
use strata_tests::{Fixture, GgufDtypes, max_abs_diff, read_npy_f32, write_gguf};

/// The tolerance on CUDA logits against the reference.
const TOL: f32 = 1e-3;

/// The tolerance of the CPU, for the GGUF writer's own check (as in dense_models.rs).
const CPU_TOL: f32 = 1e-4;

const DENSE: [&str; 6] = ["llama_tied", "llama_untied", "mistral_window", "qwen2_bias", "qwen3_qknorm", "llama_bf16"];

/// The Mixture-of-Experts fixtures (tests/tests/moe_models.rs checks them on the CPU).
const MOE: [&str; 5] = ["mixtral_moe", "mixtral_e6_k3", "qwen2_moe_norm", "qwen2_moe", "qwen3_moe"];

/// The RoPE scaling fixtures (tests/tests/rope_scaling.rs checks them on the CPU).
const ROPE_FIXTURES: [&str; 6] =
    ["rope_linear", "rope_dynamic", "rope_yarn", "rope_yarn_mscale", "rope_llama3", "rope_longrope"];

/// The fixtures a GGUF file can express: the `llama` GGUF architecture has no sliding window
/// and no q/k norm, so mistral_window and qwen3_qknorm stay safetensors-only.
const GGUF_ABLE: [&str; 4] = ["llama_tied", "llama_untied", "qwen2_bias", "llama_bf16"];

fn options(device: Device) -> LoadOptions {
    LoadOptions { threads: Some(2), device, ..LoadOptions::default() }
}

fn load(path: &Path, device: Device) -> Model {
    Model::from_pretrained(path, options(device)).unwrap_or_else(|e| panic!("{} on {device}: {e}", path.display()))
}

/// Checks `got` against `want` within `tol`, naming the fixture, the mode and the worst position.
fn check(what: &str, got: &[f32], want: &[f32], vocab: usize, tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: logits length");
    let diff = max_abs_diff(got, want);
    let worst = got
        .chunks_exact(vocab)
        .zip(want.chunks_exact(vocab))
        .map(|(a, b)| max_abs_diff(a, b))
        .enumerate()
        .fold((0, 0f32), |best, (i, d)| if d > best.1 { (i, d) } else { best });
    println!("{what}: max |diff| {diff:.2e} (position {})", worst.0);
    assert!(diff <= tol, "{what}: max |logit - reference| = {diff} at position {} (tolerance {tol})", worst.0);
}

fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let options = GenerateOptions { max_new_tokens: n, sampling: SamplingParams::default(), stop_at_eos: false };
    model.generate(prompt, &options, |_| ControlFlow::Continue(())).unwrap().tokens
}

#[test]
fn logits_match_the_reference_in_one_pass_and_through_the_cache() {
    let Some(_) = device_or_skip("logits_match_the_reference_in_one_pass_and_through_the_cache") else { return };
    for name in DENSE {
        let f = Fixture::load(name);
        let model = load(&f.dir, Device::Cuda(0));
        assert_eq!(model.device(), Device::Cuda(0));
        for mode in [LogitsMode::OnePass, LogitsMode::Decode] {
            let got = model.logits(&f.prompt_ids, mode).unwrap();
            check(&format!("{name} cuda {mode:?}"), &got, &f.logits, f.vocab, TOL);
        }
    }
}

#[test]
fn greedy_continuations_match_the_reference() {
    let Some(_) = device_or_skip("greedy_continuations_match_the_reference") else { return };
    for name in DENSE {
        let f = Fixture::load(name);
        let model = load(&f.dir, Device::Cuda(0));
        assert_eq!(greedy(&model, &f.prompt_ids, f.greedy_ids.len()), f.greedy_ids, "{name}");
    }
}

/// `ids` fed in chunks of 5, 1, 4 tokens, then the rest, through one device cache, every
/// position's logits asked for: the logits, and the tokens the cache then holds.
fn chunked(model: &CudaDecoder, ids: &[u32]) -> (Vec<f32>, usize) {
    let mut cache = model.new_cache().unwrap();
    let mut got = Vec::new();
    let mut start = 0usize;
    for len in [5, 1, 4, usize::MAX] {
        let end = start.saturating_add(len).min(ids.len());
        got.extend(model.forward(&ids[start..end], &mut cache, Logits::All).unwrap());
        start = end;
    }
    (got, cache.len())
}

/// The prompt fed in uneven chunks (5, 1, 4 tokens, then the rest) through one device cache,
/// every position's logits asked for: prefill over a cache that already holds tokens, and
/// mistral_window's window (6) straddling chunk boundaries.
#[test]
fn chunked_prefill_matches_the_reference() {
    let Some(cuda) = device_or_skip("chunked_prefill_matches_the_reference") else { return };
    for name in DENSE {
        let f = Fixture::load(name);
        let decoder = strata_models::load_dir(&f.dir).unwrap().decoder;
        let model = CudaDecoder::new(&decoder, cuda.clone()).unwrap();
        let (got, held) = chunked(&model, &f.prompt_ids);
        assert_eq!(held, f.prompt_ids.len(), "{name}: tokens in the cache");
        check(&format!("{name} cuda chunks 5,1,4,rest"), &got, &f.logits, f.vocab, TOL);
    }
}

/// Out-of-vocabulary ids get the CPU's error, and nothing runs; a cache made for another device
/// is refused.
#[test]
fn bad_input_is_refused_like_on_the_cpu() {
    let Some(cuda) = device_or_skip("bad_input_is_refused_like_on_the_cpu") else { return };
    let f = Fixture::load("llama_tied");
    let decoder = strata_models::load_dir(&f.dir).unwrap().decoder;
    let model = CudaDecoder::new(&decoder, cuda).unwrap();
    let mut cache = model.new_cache().unwrap();
    model.forward(&[1, 2], &mut cache, Logits::Last).unwrap();
    let cuda_err = model.forward(&[1, 256], &mut cache, Logits::All).unwrap_err();
    let cpu_err = decoder.forward(&[1, 256], &mut decoder.new_cache(), Logits::All).unwrap_err();
    assert_eq!(cuda_err.to_string(), cpu_err.to_string());
    assert_eq!(cache.token_ids(), [1, 2], "a refused call must not touch the cache");
    let empty = model.forward(&[], &mut cache, Logits::All).unwrap_err();
    assert_eq!(empty.to_string(), decoder.forward(&[], &mut decoder.new_cache(), Logits::All).unwrap_err().to_string());

    let on_cuda = load(&f.dir, Device::Cuda(0));
    let on_cpu = load(&f.dir, Device::Cpu);
    let err = on_cuda.step(&[1], &mut on_cpu.new_cache().unwrap()).unwrap_err();
    assert!(err.to_string().contains("a KV cache on cpu cannot be used by a model on cuda:0"), "{err}");
    let err = on_cuda.logits(&[1, 256], LogitsMode::OnePass).unwrap_err();
    assert!(err.to_string().contains("token id 256"), "{err}");
}

/// Every Mixture-of-Experts fixture (Mixtral, a 6-expert top-3 Mixtral, Qwen2-MoE with and
/// without renormalisation and its shared expert, Qwen3-MoE) on CUDA, both checkpoint layouts:
/// logits in one pass, token by token and in uneven chunks against transformers', the greedy
/// continuation, and the router trace against the CPU decoder's (the same experts for every
/// token of every layer: the routing is the CPU's rule on the device's logits).
#[test]
fn moe_models_match_the_reference() {
    let Some(cuda) = device_or_skip("moe_models_match_the_reference") else { return };
    for name in MOE {
        let f = Fixture::load(name);
        for dir in [f.dir.clone(), f.dir.join("fused")] {
            let what = format!("{name} ({})", dir.display());
            let model = load(&dir, Device::Cuda(0));
            for mode in [LogitsMode::OnePass, LogitsMode::Decode] {
                let got = model.logits(&f.prompt_ids, mode).unwrap();
                check(&format!("{what} cuda {mode:?}"), &got, &f.logits, f.vocab, TOL);
            }
            assert_eq!(greedy(&model, &f.prompt_ids, f.greedy_ids.len()), f.greedy_ids, "{what}");

            let decoder = strata_models::load_dir(&dir).unwrap().decoder;
            let device = CudaDecoder::new(&decoder, cuda.clone()).unwrap();
            let (got, _) = chunked(&device, &f.prompt_ids);
            check(&format!("{what} cuda chunks"), &got, &f.logits, f.vocab, TOL);

            let (mut on_cpu, mut on_cuda) = (RouterTrace::new(), RouterTrace::new());
            decoder.forward_with_router(&f.prompt_ids, &mut decoder.new_cache(), Logits::All, &mut on_cpu).unwrap();
            let mut cache = device.new_cache().unwrap();
            device.forward_traced(&f.prompt_ids, &mut cache, Logits::All, Some(&mut on_cuda)).unwrap();
            assert_eq!(on_cuda.layers.len(), on_cpu.layers.len(), "{what}: traced layers");
            for (g, c) in on_cuda.layers.iter().zip(&on_cpu.layers) {
                assert_eq!((g.layer, &g.expert_counts, &g.active), (c.layer, &c.expert_counts, &c.active), "{what}");
                let diff = max_abs_diff(&g.logits, &c.logits);
                assert!(diff <= TOL, "{what} layer {}: router logits differ by {diff}", g.layer);
            }
        }
    }
}

/// Capacity limits and dynamic top-k route on CUDA as on the CPU: the CPU's rule runs on the
/// device's router logits, so the trace's counts match and the logits agree within [`TOL`].
#[test]
fn moe_routing_options_apply_on_cuda() {
    let Some(cuda) = device_or_skip("moe_routing_options_apply_on_cuda") else { return };
    let f = Fixture::load("mixtral_moe");
    for options in [
        MoeOptions { capacity_factor: Some(1.0), ..MoeOptions::default() },
        MoeOptions { routing: Routing::DynamicTopK { p: 0.5, min_experts: 1 }, ..MoeOptions::default() },
    ] {
        let mut decoder = strata_models::load_dir(&f.dir).unwrap().decoder;
        decoder.set_moe_options(options).unwrap();
        let device = CudaDecoder::new(&decoder, cuda.clone()).unwrap();
        let (mut on_cpu, mut on_cuda) = (RouterTrace::new(), RouterTrace::new());
        let want =
            decoder.forward_with_router(&f.prompt_ids, &mut decoder.new_cache(), Logits::All, &mut on_cpu).unwrap();
        let got = device
            .forward_traced(&f.prompt_ids, &mut device.new_cache().unwrap(), Logits::All, Some(&mut on_cuda))
            .unwrap();
        check(&format!("mixtral_moe {options:?}"), &got, &want, f.vocab, TOL);
        for (g, c) in on_cuda.layers.iter().zip(&on_cpu.layers) {
            assert_eq!(g.expert_counts, c.expert_counts, "{options:?} layer {}", g.layer);
            assert_eq!((g.reassigned, g.dropped), (c.reassigned, c.dropped), "{options:?} layer {}", g.layer);
        }
    }
}

/// Decode steps of every Mixture-of-Experts fixture routed on the device (gating, the chosen
/// experts' products in one launch each, their weighted sum; `CudaDecoder::set_device_routing`)
/// agree with the same steps routed on the host: the same greedy tokens, logits within 1e-4 (the
/// device's softmax moves the routing weights by a few ulp), for plain top-k, dynamic top-k and a
/// capacity limit (which cannot bind one token).
#[test]
fn moe_decode_routes_on_the_device_as_on_the_host() {
    let Some(cuda) = device_or_skip("moe_decode_routes_on_the_device_as_on_the_host") else { return };
    let dynamic = MoeOptions { routing: Routing::DynamicTopK { p: 0.5, min_experts: 1 }, ..MoeOptions::default() };
    let capacity = MoeOptions { capacity_factor: Some(1.0), ..MoeOptions::default() };
    for name in MOE {
        let f = Fixture::load(name);
        let optionss: &[MoeOptions] =
            if name == "mixtral_moe" { &[MoeOptions::default(), dynamic, capacity] } else { &[MoeOptions::default()] };
        for &options in optionss {
            let what = format!("{name} {options:?}");
            let mut decoder = strata_models::load_dir(&f.dir).unwrap().decoder;
            decoder.set_moe_options(options).unwrap();
            let (device, host) =
                (CudaDecoder::new(&decoder, cuda.clone()).unwrap(), CudaDecoder::new(&decoder, cuda.clone()).unwrap());
            device.set_device_routing(true);
            host.set_device_routing(false);
            let (mut dc, mut hc) = (device.new_cache().unwrap(), host.new_cache().unwrap());
            let a = device.forward(&f.prompt_ids, &mut dc, Logits::Last).unwrap();
            let b = host.forward(&f.prompt_ids, &mut hc, Logits::Last).unwrap();
            assert_eq!(a, b, "{what}: a prompt of several tokens routes on the host either way");
            let mut next = argmax(&a);
            for step in 0..24 {
                let a = device.forward(&[next], &mut dc, Logits::Last).unwrap();
                let b = host.forward(&[next], &mut hc, Logits::Last).unwrap();
                let diff = max_abs_diff(&a, &b);
                assert!(diff <= 1e-4, "{what} step {step}: device-routed logits differ by {diff}");
                assert_eq!(argmax(&a), argmax(&b), "{what} step {step}: greedy tokens differ");
                next = argmax(&a);
            }
        }
    }
}

/// The index of the largest of `v` (the first of equals).
fn argmax(v: &[f32]) -> u32 {
    strata_models::tensor::cpu::argmax(v).expect("logits") as u32
}

/// The weight sizes agree with the CPU decoder's, and the device reports memory and bandwidth.
#[test]
fn sizes_memory_and_bandwidth_are_reported() {
    let Some(cuda) = device_or_skip("sizes_memory_and_bandwidth_are_reported") else { return };
    let f = Fixture::load("llama_untied");
    let decoder = strata_models::load_dir(&f.dir).unwrap().decoder;
    let model = CudaDecoder::new(&decoder, cuda.clone()).unwrap();
    assert_eq!(model.weight_bytes(), decoder.weight_bytes());
    assert_eq!(model.weight_bytes_per_token(), decoder.weight_bytes_per_token());
    assert!(model.device_memory_used().unwrap() > decoder.weight_bytes());
    let bw = strata_models::cuda_decoder::copy_bandwidth(&cuda, 256 << 20, 3).unwrap();
    println!("device-to-device copy: {:.0} GB/s (read + written)", bw / 1e9);
    assert!(bw > 1e10 && bw < 1e14, "implausible bandwidth {bw} B/s");
}

/// Every RoPE scaling fixture's prompts (the main one and the shorter extra ones, on both sides
/// of a length-dependent scaling's boundary) against transformers' one-pass logits, and its
/// greedy continuation.
#[test]
fn rope_scalings_match_the_reference() {
    let Some(cuda) = device_or_skip("rope_scalings_match_the_reference") else { return };
    for name in ROPE_FIXTURES {
        let f = Fixture::load(name);
        let model = CudaDecoder::new(&strata_models::load_dir(&f.dir).unwrap().decoder, cuda.clone()).unwrap();
        let mut prompts = vec![(f.prompt_ids.clone(), f.logits.clone())];
        for extra in f.expected["extra_prompts"].as_array().into_iter().flatten() {
            let ids = extra["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            prompts.push((ids, read_npy_f32(&f.dir.join(extra["logits_file"].as_str().unwrap())).1));
        }
        for (ids, want) in &prompts {
            let got = model.forward(ids, &mut model.new_cache().unwrap(), Logits::All).unwrap();
            check(&format!("{name} cuda, {} ids", ids.len()), &got, want, f.vocab, TOL);
        }
        let mut cache = model.new_cache().unwrap();
        let mut logits = model.forward(&f.prompt_ids, &mut cache, Logits::Last).unwrap();
        let mut tokens = Vec::new();
        for _ in 0..f.greedy_ids.len() {
            let next = strata::sampling::argmax(&logits) as u32;
            tokens.push(next);
            logits = model.forward(&[next], &mut cache, Logits::Last).unwrap();
        }
        assert_eq!(tokens, f.greedy_ids, "{name} cuda greedy");
    }
}

/// Tables that change with the sequence length (rope_scaling.rs's cases, a few of them): on the
/// device, decoding token by token across the boundaries, feeding uneven chunks, and a planned
/// request all give the logits of the CPU's one-pass recompute of the same prefix.
#[test]
fn length_dependent_tables_recompute_like_the_cpu() {
    let Some(cuda) = device_or_skip("length_dependent_tables_recompute_like_the_cpu") else { return };
    let ids = Fixture::load("rope_dynamic").prompt_ids; // 48 ids: past 16 and 32.
    let expanding = |algorithm| ContextScaling { dynamic_expansion: true, ..ContextScaling::new(algorithm, 16, 64) };
    let cases = [
        ("rope_dynamic", None),
        ("rope_longrope", None),
        ("rope_linear", Some(ContextScaling::new(ScalingAlgorithm::NtkDynamic, 16, 64))),
        ("rope_yarn", Some(ContextScaling::new(ScalingAlgorithm::YarnDynamic, 16, 64))),
        ("rope_linear", Some(expanding(ScalingAlgorithm::Llama3))),
    ];
    for (name, scaling) in cases {
        let what = format!("{name} with {:?}", scaling.as_ref().map(|s| s.algorithm));
        let cpu = strata_models::load_dir(&Fixture::load(name).dir).unwrap().decoder;
        let vocab = cpu.hparams().vocab_size;
        let dev = CudaDecoder::new(&cpu, cuda.clone()).unwrap();
        let recompute = |prefix: &[u32]| {
            let mut c = cpu.new_cache_with_scaling(scaling.clone()).unwrap();
            cpu.forward(prefix, &mut c, Logits::All).unwrap()
        };

        let mut cache = dev.new_cache_with_scaling(scaling.clone()).unwrap();
        let mut tables = Vec::new();
        for i in 0..ids.len() {
            let step = dev.forward(&ids[i..=i], &mut cache, Logits::Last).unwrap();
            tables.push(cache.rope_table().unwrap().clone());
            let full = recompute(&ids[..=i]);
            let diff = max_abs_diff(&step, &full[full.len() - vocab..]);
            assert!(diff <= TOL, "{what}: token {i}: cuda decode vs cpu recompute differ by {diff}");
        }
        assert_ne!(tables.first(), tables.last(), "{what}: the table never changed");
        assert_eq!(cache.token_ids(), &ids[..], "{what}: the cache holds every id");

        let mut cache = dev.new_cache_with_scaling(scaling.clone()).unwrap();
        let mut start = 0;
        for len in [10, 9, 1, 14, 1, 13] {
            let end = start + len;
            let chunk = dev.forward(&ids[start..end], &mut cache, Logits::All).unwrap();
            let full = recompute(&ids[..end]);
            check(&format!("{what} chunk {start}..{end}"), &chunk, &full[full.len() - chunk.len()..], vocab, TOL);
            start = end;
        }

        let mut cache = dev.new_cache_with_scaling(scaling.clone()).unwrap();
        dev.plan(&mut cache, ids.len()).unwrap();
        let mut rows = Vec::new();
        for i in 0..ids.len() {
            rows.extend(dev.forward(&ids[i..=i], &mut cache, Logits::Last).unwrap());
        }
        check(&format!("{what} planned decode vs one pass"), &rows, &recompute(&ids), vocab, TOL);
    }
}

/// Writes fixture `f` as a GGUF file in `dir` stored as `dtypes` says ([`write_gguf`]).
fn gguf_of(f: &Fixture, dtypes: GgufDtypes, dir: &Path) -> PathBuf {
    let path = dir.join(format!("{}-{dtypes:?}.gguf", f.name));
    write_gguf(f, dtypes, |_| {}, &path);
    path
}

/// The writer is right: its f32 files give the reference logits on the CPU (with the
/// interleaved RoPE of the GGUF path). Needs no GPU.
#[test]
fn gguf_files_of_the_fixtures_match_the_reference_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    for name in GGUF_ABLE {
        let f = Fixture::load(name);
        let model = load(&gguf_of(&f, GgufDtypes::Uniform(DType::F32), dir.path()), Device::Cpu);
        let got = model.logits(&f.prompt_ids, LogitsMode::OnePass).unwrap();
        check(&format!("{name} gguf f32 cpu"), &got, &f.logits, f.vocab, CPU_TOL);
    }
}

/// The GGUF path on the device: f32 files against the reference (one pass, decode, greedy),
/// and mixed block-dtype files against the CPU's one-pass logits of the same file.
#[test]
fn gguf_models_match_on_cuda() {
    let Some(_) = device_or_skip("gguf_models_match_on_cuda") else { return };
    let dir = tempfile::tempdir().unwrap();
    for name in GGUF_ABLE {
        let f = Fixture::load(name);
        let path = gguf_of(&f, GgufDtypes::Uniform(DType::F32), dir.path());
        let model = load(&path, Device::Cuda(0));
        for mode in [LogitsMode::OnePass, LogitsMode::Decode] {
            let got = model.logits(&f.prompt_ids, mode).unwrap();
            check(&format!("{name} gguf f32 cuda {mode:?}"), &got, &f.logits, f.vocab, TOL);
        }
        assert_eq!(greedy(&model, &f.prompt_ids, f.greedy_ids.len()), f.greedy_ids, "{name} gguf f32 cuda");

        let path = gguf_of(&f, GgufDtypes::Mixed, dir.path());
        let want = load(&path, Device::Cpu).logits(&f.prompt_ids, LogitsMode::OnePass).unwrap();
        let model = load(&path, Device::Cuda(0));
        for mode in [LogitsMode::OnePass, LogitsMode::Decode] {
            let got = model.logits(&f.prompt_ids, mode).unwrap();
            check(&format!("{name} gguf mixed cuda {mode:?} vs cpu"), &got, &want, f.vocab, TOL);
        }
    }
}

/// The real SmolLM2-135M-Instruct Q4_1 GGUF (Q8_0 embedding) on the device, when it is in the
/// strata cache: at every position of the fixture's three prompts, cosine similarity with
/// transformers' logits of at least 0.999 on both paths, the same last-position argmax, the
/// same 8 greedy tokens (the bounds of tests/tests/smollm2.rs).
#[test]
fn smollm2_matches_transformers_on_cuda() {
    let test = "smollm2_matches_transformers_on_cuda";
    let Some(_) = device_or_skip(test) else { return };
    let Some(path) = strata_tests::cached_file(strata_tests::SMOLLM2_GGUF) else {
        println!("{}", strata_tests::skip_message(test, strata_tests::SMOLLM2_GGUF));
        return;
    };
    let dir = strata_tests::fixtures_dir().join("smollm2");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let model = load(&path, Device::Cuda(0));
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    };
    for p in expected["prompts"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let prompt = ids(&p["ids"]);
        let (shape, want) = strata_tests::read_npy(&dir.join(p["logits_file"].as_str().unwrap()));
        let vocab = shape[1];
        for mode in [LogitsMode::OnePass, LogitsMode::Decode] {
            let got = model.logits(&prompt, mode).unwrap();
            let rows = || got.chunks_exact(vocab).zip(want.chunks_exact(vocab));
            let min_cos = rows().map(|(a, b)| strata_tests::cosine_similarity(a, b)).fold(f64::INFINITY, f64::min);
            let (last, last_ref) = rows().next_back().unwrap();
            let (am, am_ref) = (strata::sampling::argmax(last), strata::sampling::argmax(last_ref));
            println!("smollm2 {name} cuda {mode:?}: min cosine 1 - {:.1e}, last argmax {am} ({am_ref})", 1.0 - min_cos);
            assert!(min_cos >= 0.999, "{name} {mode:?}: min cosine {min_cos}");
            assert_eq!(am, am_ref, "{name} {mode:?}: last-position argmax");
        }
        let want_greedy = ids(&p["greedy_ids"]);
        assert_eq!(greedy(&model, &prompt, want_greedy.len()), want_greedy, "{name}: greedy ids");
    }
}

/// Decoding on the device and on the CPU from one loaded checkpoint agree token for token over
/// a longer run than the fixtures' (past several KV blocks), and the device's cache grows by
/// blocks.
#[test]
fn a_long_greedy_run_agrees_with_the_cpu() {
    let Some(cuda) = device_or_skip("a_long_greedy_run_agrees_with_the_cpu") else { return };
    let f = Fixture::load("mistral_window");
    let decoder: Decoder = strata_models::load_dir(&f.dir).unwrap().decoder;
    let on_cuda = CudaDecoder::new(&decoder, cuda).unwrap();
    let (mut cpu_cache, mut cuda_cache) = (decoder.new_cache(), on_cuda.new_cache().unwrap());
    let mut cpu = decoder.forward(&f.prompt_ids, &mut cpu_cache, Logits::Last).unwrap();
    let mut dev = on_cuda.forward(&f.prompt_ids, &mut cuda_cache, Logits::Last).unwrap();
    for step in 0..100 {
        check(&format!("mistral_window step {step}"), &dev, &cpu, f.vocab, TOL);
        let next = strata::sampling::argmax(&cpu) as u32;
        cpu = decoder.forward(&[next], &mut cpu_cache, Logits::Last).unwrap();
        dev = on_cuda.forward(&[next], &mut cuda_cache, Logits::Last).unwrap();
    }
    assert_eq!(cuda_cache.len(), cpu_cache.len());
    assert_eq!(cuda_cache.allocated_bytes(), cpu_cache.allocated_bytes(), "same blocks of the same size");
}

/// Products that normalise their activations themselves (`CudaDecoder::set_fused_norms`: q/k/v,
/// a dense block's gate/up, the output head) give the logits of separate RMSNorm launches, bit for
/// bit: f32 and bf16 fixtures, Qwen2's q/k/v biases, its GGUF in q8_0 (the integer matvec
/// quantizing the normalised row in its blocks) and the mixed block-dtype GGUF (split q/k/v
/// dtypes: the norm launched for them, fused for gate/up and the head), and Mixture-of-Experts
/// blocks routed on the device (Mixtral; Qwen2-MoE with its shared expert: router, experts and
/// shared expert all normalising); a prompt of 2 tokens (the quantized products' most) and of 5,
/// then 12 decode steps.
#[test]
fn fused_norms_give_the_separate_norms_logits_bit_for_bit() {
    let Some(cuda) = device_or_skip("fused_norms_give_the_separate_norms_logits_bit_for_bit") else { return };
    let dir = tempfile::tempdir().unwrap();
    let (llama, qwen2, bf16) =
        (Fixture::load("llama_untied"), Fixture::load("qwen2_bias"), Fixture::load("llama_bf16"));
    let q8 = gguf_of(&qwen2, GgufDtypes::Uniform(DType::Q8_0), dir.path());
    let mixed = gguf_of(&llama, GgufDtypes::Mixed, dir.path());
    let (mixtral, qwen2_moe) = (Fixture::load("mixtral_moe"), Fixture::load("qwen2_moe"));
    let decoders = [
        ("mixtral_moe", &mixtral, strata_models::load_dir(&mixtral.dir).unwrap().decoder),
        ("qwen2_moe", &qwen2_moe, strata_models::load_dir(&qwen2_moe.dir).unwrap().decoder),
        ("llama_untied", &llama, strata_models::load_dir(&llama.dir).unwrap().decoder),
        ("qwen2_bias", &qwen2, strata_models::load_dir(&qwen2.dir).unwrap().decoder),
        ("llama_bf16", &bf16, strata_models::load_dir(&bf16.dir).unwrap().decoder),
        ("qwen2_bias gguf q8_0", &qwen2, strata_models::load_gguf(&q8).unwrap().decoder),
        ("llama_untied gguf mixed", &llama, strata_models::load_gguf(&mixed).unwrap().decoder),
    ];
    for (name, f, decoder) in decoders {
        let (fused, separate) =
            (CudaDecoder::new(&decoder, cuda.clone()).unwrap(), CudaDecoder::new(&decoder, cuda.clone()).unwrap());
        fused.set_fused_norms(true);
        separate.set_fused_norms(false);
        for prompt in [&f.prompt_ids[..2], &f.prompt_ids[..5]] {
            let (mut fc, mut sc) = (fused.new_cache().unwrap(), separate.new_cache().unwrap());
            let a = fused.forward(prompt, &mut fc, Logits::All).unwrap();
            let b = separate.forward(prompt, &mut sc, Logits::All).unwrap();
            let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same(&a, &b), "{name}: a prompt of {}: logits differ by {}", prompt.len(), max_abs_diff(&a, &b));
            for step in 0..12u32 {
                let id = (step * 11 + 5) % f.vocab as u32;
                let a = fused.forward(&[id], &mut fc, Logits::Last).unwrap();
                let b = separate.forward(&[id], &mut sc, Logits::Last).unwrap();
                assert!(same(&a, &b), "{name} step {step}: logits differ by {}", max_abs_diff(&a, &b));
            }
        }
    }
}

/// Decode steps run as CUDA graphs (`CudaDecoder::set_graphs`) give the logits of the same steps
/// launched kernel by kernel, bit for bit: an f32 fixture and its mixed block-dtype GGUF (the
/// integer matvec, the norm's quantized activations), and two Mixture-of-Experts fixtures routed
/// on the device (Mixtral; Qwen2-MoE with its shared expert), 90 steps each, past two KV blocks
/// (new block tables) and with the attention's key splits changing. The kept graph is updated
/// from step to step rather than rebuilt.
#[test]
fn decode_graphs_give_the_launches_logits_bit_for_bit() {
    let Some(cuda) = device_or_skip("decode_graphs_give_the_launches_logits_bit_for_bit") else { return };
    let dir = tempfile::tempdir().unwrap();
    let llama = Fixture::load("llama_untied");
    let mixed = gguf_of(&llama, GgufDtypes::Mixed, dir.path());
    let (mixtral, qwen2) = (Fixture::load("mixtral_moe"), Fixture::load("qwen2_moe"));
    let decoders = [
        ("llama_untied", &llama, strata_models::load_dir(&llama.dir).unwrap().decoder),
        ("llama_untied gguf mixed", &llama, strata_models::load_gguf(&mixed).unwrap().decoder),
        ("mixtral_moe", &mixtral, strata_models::load_dir(&mixtral.dir).unwrap().decoder),
        ("qwen2_moe", &qwen2, strata_models::load_dir(&qwen2.dir).unwrap().decoder),
    ];
    for (name, f, decoder) in decoders {
        let (graphed, launched) =
            (CudaDecoder::new(&decoder, cuda.clone()).unwrap(), CudaDecoder::new(&decoder, cuda.clone()).unwrap());
        graphed.set_graphs(true);
        launched.set_graphs(false);
        graphed.set_device_routing(true);
        launched.set_device_routing(true);
        let (mut gc, mut lc) = (graphed.new_cache().unwrap(), launched.new_cache().unwrap());
        let a = graphed.forward(&f.prompt_ids, &mut gc, Logits::Last).unwrap();
        let b = launched.forward(&f.prompt_ids, &mut lc, Logits::Last).unwrap();
        assert_eq!(a, b, "{name}: the prompt (no graph)");
        assert!(graphed.graph_stats().is_none(), "{name}: a prompt of several tokens makes no graph");
        let steps = 90u32;
        for step in 0..steps {
            let id = (step * 7 + 3) % f.vocab as u32;
            let a = graphed.forward(&[id], &mut gc, Logits::Last).unwrap();
            let b = launched.forward(&[id], &mut lc, Logits::Last).unwrap();
            let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{name} step {step}: graph logits differ by {}", max_abs_diff(&a, &b));
        }
        let stats = graphed.graph_stats().expect("one-token passes ran as graphs");
        println!("{name}: {stats:?}");
        assert_eq!(stats.builds + stats.updates, steps as usize, "{name}: every step one graph launch");
        assert!(stats.updates >= steps as usize - 4, "{name}: the graph was rebuilt too often: {stats:?}");
        assert!(launched.graph_stats().is_none(), "{name}: graphs off makes none");
        // Each decode step's host time was counted (the prompt's not), either way.
        for d in [&graphed, &launched] {
            let (time, passes) = d.decode_host_time();
            assert_eq!(passes, u64::from(steps), "{name}: one-token passes timed");
            assert!(!time.is_zero(), "{name}: host time counted");
        }
    }
}

/// A kernel profile times each launch of the steps it covers, one by one even where the decoder
/// would make a graph, and changes no logit; the facade's `profile_kernels` returns it.
#[test]
fn a_kernel_profile_times_every_launch_and_changes_no_logit() {
    let Some(cuda) = device_or_skip("a_kernel_profile_times_every_launch_and_changes_no_logit") else { return };
    let f = Fixture::load("llama_untied");
    let decoder = strata_models::load_dir(&f.dir).unwrap().decoder;
    // The profiled decoder on an instance of its own: the shared one may run other tests'
    // launches meanwhile.
    let own = strata_kernels::Cuda::new(0).unwrap();
    let (profiled, plain) = (CudaDecoder::new(&decoder, own).unwrap(), CudaDecoder::new(&decoder, cuda).unwrap());
    profiled.set_graphs(true);
    plain.set_graphs(true);
    let (mut pc, mut qc) = (profiled.new_cache().unwrap(), plain.new_cache().unwrap());
    let a = profiled.forward(&f.prompt_ids, &mut pc, Logits::Last).unwrap();
    let b = plain.forward(&f.prompt_ids, &mut qc, Logits::Last).unwrap();
    assert_eq!(a, b, "the prompt");
    let pcuda = profiled.cuda();
    assert!(!pcuda.profiling() && pcuda.finish_profile().unwrap().is_none(), "no profile before start");
    let steps = 5u32;
    pcuda.start_profile();
    assert!(pcuda.profiling());
    for step in 0..steps {
        let id = (step * 7 + 3) % f.vocab as u32;
        let a = profiled.forward(&[id], &mut pc, Logits::Last).unwrap();
        let b = plain.forward(&[id], &mut qc, Logits::Last).unwrap();
        let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "step {step}: profiled logits differ by {}", max_abs_diff(&a, &b));
    }
    let profile = pcuda.finish_profile().unwrap().expect("a profile was running");
    assert!(!pcuda.profiling() && pcuda.finish_profile().unwrap().is_none(), "finished once");
    println!("{} launches, {:.1} us of GPU time over {steps} steps", profile.launches(), profile.seconds() * 1e6);
    for k in &profile.kernels {
        println!("  {:<36} {:>4} launches {:>9.2} us", k.kernel, k.launches, k.seconds * 1e6);
        assert!(k.launches > 0 && k.seconds > 0.0 && k.seconds < 1.0, "{k:?}");
    }
    // Every step launches the same kernels: the per-kernel counts are multiples of the steps.
    assert!(profile.launches() >= steps as usize * decoder.hparams().n_layers, "{profile:?}");
    for k in &profile.kernels {
        assert_eq!(k.launches % steps as usize, 0, "{}: {} launches over {steps} steps", k.kernel, k.launches);
    }
    assert!(profile.kernels.iter().any(|k| k.kernel.starts_with("matvec")), "{profile:?}");
    assert!(profile.kernels.windows(2).all(|w| w[0].seconds >= w[1].seconds), "most time first");
    // The profiled decoder launched one by one; the other made its graph.
    assert!(profiled.graph_stats().is_none(), "{:?}", profiled.graph_stats());
    assert!(plain.graph_stats().is_some());

    // Through the facade: the same decode, timed.
    let model = load(&f.dir, Device::Cuda(0));
    let mut cache = model.new_cache().unwrap();
    let logits = model.step(&f.prompt_ids, &mut cache).unwrap();
    let (next, profile) =
        model.profile_kernels(|| model.step(&[strata::sampling::argmax(&logits) as u32], &mut cache)).unwrap();
    assert_eq!(next.len(), f.vocab);
    let profile = profile.expect("a model on CUDA profiles");
    assert!(profile.launches() >= decoder.hparams().n_layers && profile.seconds() > 0.0, "{profile:?}");
}

/// A model of `layers` copies of a fixture's layers as a GGUF file of `dtypes`, loaded.
fn deep_decoder(f: &Fixture, dtypes: GgufDtypes, layers: usize, dir: &Path) -> (PathBuf, Decoder) {
    let path = dir.join(format!("{}_{layers}_{dtypes:?}.gguf", f.name).replace([' ', '(', ')'], "_"));
    strata_tests::write_gguf_layers(f, dtypes, |_| {}, Some(layers), &path);
    let decoder = strata_models::load_gguf(&path).unwrap().decoder;
    (path, decoder)
}

/// Where a streamed case's weights come from, for its messages: host copies, images on disk, or
/// images behind a host tier of `tier` layers or experts.
fn source(from_disk: bool, tier: usize) -> String {
    match (from_disk, tier) {
        (false, _) => String::new(),
        (true, 0) => ", from disk".into(),
        (true, t) => format!(", from disk behind a host tier of {t}"),
    }
}

/// Layers whose weights stay in page-locked host memory and stream into two device buffers pass
/// by pass (`CudaDecoder::new_streaming`, what `--max-vram` does under a tight ceiling) give the
/// resident model's logits bit for bit: the same kernels read the same bytes, from the buffer the
/// layer was copied into. Six copies of a fixture's layers in f32 and in the mixed block dtypes,
/// the last 4 streamed (two layers per buffer) and all 6 (three per buffer); Mixtral's two layers
/// (each buffer one layer, its experts' device tables pointing into it), routed on the device.
/// Prompts of 2 and 5 tokens, then 24 decode steps, graphs asked for (streaming runs without).
/// Each case also streams its layers from layer images on disk (`new_streaming_from`), written
/// by the first decoder of a case and used as they are by the later ones: with no host tier,
/// with one layer kept in host memory (`set_host_tier`), and with all of them.
#[test]
fn streamed_layers_give_the_resident_logits_bit_for_bit() {
    let Some(cuda) = device_or_skip("streamed_layers_give_the_resident_logits_bit_for_bit") else { return };
    let dir = tempfile::tempdir().unwrap();
    let (llama, mixtral) = (Fixture::load("llama_untied"), Fixture::load("mixtral_moe"));
    let (_, f32_6) = deep_decoder(&llama, GgufDtypes::Uniform(DType::F32), 6, dir.path());
    let (_, mixed_6) = deep_decoder(&llama, GgufDtypes::Mixed, 6, dir.path());
    let moe = strata_models::load_dir(&mixtral.dir).unwrap().decoder;
    let last4 = [false, false, true, true, true, true];
    let cases: [(&str, &Fixture, &Decoder, &[bool]); 5] = [
        ("f32 x6, last 4 streamed", &llama, &f32_6, &last4),
        ("f32 x6, all streamed", &llama, &f32_6, &[true; 6]),
        ("mixed x6, last 4 streamed", &llama, &mixed_6, &last4),
        ("mixed x6, all streamed", &llama, &mixed_6, &[true; 6]),
        ("mixtral_moe, both streamed", &mixtral, &moe, &[true, true]),
    ];
    // (case, images, layers in the host tier: usize::MAX for all)
    let runs = cases.iter().enumerate().flat_map(|(i, c)| {
        let images = dir.path().join(format!("images-{i}"));
        [(c, None, 0), (c, Some(images.clone()), 0), (c, Some(images.clone()), 1), (c, Some(images), usize::MAX)]
    });
    for (&(name, f, decoder, streamed), images, tier) in runs {
        let written = images.as_ref().map(|d| std::fs::metadata(d.join(layer_images::DATA_FILE)).ok().map(|m| m.ino()));
        let resident = CudaDecoder::new(decoder, cuda.clone()).unwrap();
        let mut streaming =
            CudaDecoder::new_streaming_from(decoder, cuda.clone(), streamed, images.as_deref()).unwrap();
        if let Some(d) = &images {
            let now = std::fs::metadata(d.join(layer_images::DATA_FILE)).unwrap().ino();
            // The second decoder finds the first one's images and does not write them again.
            if let Some(Some(before)) = written {
                assert_eq!(before, now, "{name}: the layer images were written again");
            }
        }
        let k = streamed.iter().filter(|&&s| s).count();
        let tier = tier.min(k);
        if images.is_some() {
            let (_, read) = streaming.layer_images().expect("layers from disk");
            assert_eq!(streaming.streamed_read_per_pass().map(|r| r.0), Some(k), "{name}: every layer read");
            // A byte short of one more layer: the tier keeps `tier`.
            let kept = streaming.set_host_tier((tier * read + read - 1) as u64).unwrap();
            assert_eq!(kept, tier.min(k), "{name}");
            let (read_layers, bytes) = streaming.streamed_read_per_pass().unwrap();
            assert_eq!(read_layers, k - tier, "{name}");
            assert_eq!(bytes == 0, tier == k, "{name}");
        }
        let name = format!("{name}{}", source(images.is_some(), tier));
        let name = name.as_str();
        assert_eq!(streaming.streamed_layers(), k, "{name}");
        // Two streamed layers keep a buffer each: nothing is copied after the first pass.
        assert_eq!(streaming.streamed_bytes_per_pass() > 0, k > 2, "{name}");
        assert_eq!(resident.streamed_layers(), 0, "{name}");
        streaming.set_graphs(true);
        resident.set_graphs(false);
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        for prompt in [&f.prompt_ids[..2], &f.prompt_ids[..5]] {
            let (mut rc, mut sc) = (resident.new_cache().unwrap(), streaming.new_cache().unwrap());
            let a = resident.forward(prompt, &mut rc, Logits::All).unwrap();
            let b = streaming.forward(prompt, &mut sc, Logits::All).unwrap();
            assert!(same(&a, &b), "{name}: a prompt of {}: logits differ by {}", prompt.len(), max_abs_diff(&a, &b));
            for step in 0..24u32 {
                let id = (step * 13 + 1) % f.vocab as u32;
                let a = resident.forward(&[id], &mut rc, Logits::Last).unwrap();
                let b = streaming.forward(&[id], &mut sc, Logits::Last).unwrap();
                assert!(same(&a, &b), "{name} step {step}: logits differ by {}", max_abs_diff(&a, &b));
            }
        }
        assert!(streaming.graph_stats().is_none(), "{name}: a streaming model runs without graphs");
    }
    // Counts the stream cannot take.
    let err = CudaDecoder::new_streaming(&f32_6, cuda.clone(), &[false, false, false, true, true, true]).unwrap_err();
    assert!(err.to_string().contains("multiple of 2"), "{err}");
}

/// Routed experts in page-locked host memory with a device cache of hot ones
/// (`CudaDecoder::new_expert_cached`, what `--max-vram` does for a MoE model under a tight
/// ceiling) give the logits of the resident model routed on the host, bit for bit: one pass over
/// the prompt (more experts than slots: rounds) and token by token, with 1, 3 and every slot and
/// each eviction policy, for Mixtral-style and Qwen2-MoE (shared expert) layers. The counts add up: every expert a layer
/// asked for is a hit or a miss, each miss copied one expert in; with every slot, each expert is
/// copied once. With 3 slots the experts are also read from images on disk on each miss
/// (`new_expert_cached_from`: written by the first such decoder, reused by the second).
#[test]
fn a_device_expert_cache_gives_the_resident_logits_bit_for_bit() {
    let Some(cuda) = device_or_skip("a_device_expert_cache_gives_the_resident_logits_bit_for_bit") else { return };
    let dir = tempfile::tempdir().unwrap();
    for name in ["mixtral_moe", "qwen2_moe"] {
        let f = Fixture::load(name);
        let decoder = strata_models::load_dir(&f.dir).unwrap().decoder;
        let resident = CudaDecoder::new(&decoder, cuda.clone()).unwrap();
        resident.set_device_routing(false);
        assert!(resident.expert_cache().is_none());
        let moe = decoder.hparams().moe.as_ref().unwrap();
        let n_experts = moe.num_experts * moe.sparse_layers.iter().filter(|&&s| s).count();
        let images = dir.path().join(name);
        // (slots, policy, images, experts in the host tier in front of the images)
        let runs = [
            (1, "layer-lru", None, 0),
            (3, "layer-lru", None, 0),
            (3, "lru", None, 0),
            (n_experts, "lfu", None, 0),
            (3, "layer-lru", Some(images.as_path()), 0),
            (3, "lru", Some(images.as_path()), 0),
            (2, "layer-lru", Some(images.as_path()), 3),
            (1, "lru", Some(images.as_path()), n_experts),
        ];
        for (slots, policy, images, tier) in runs {
            let mut cached = CudaDecoder::new_expert_cached_from(&decoder, cuda.clone(), slots, images).unwrap();
            if policy != "layer-lru" {
                cached
                    .set_expert_cache_policy(
                        strata_models::store::planner::expert_cache_policy_by_name(policy).unwrap(),
                    )
                    .unwrap();
            }
            if tier > 0 {
                let (_, read) = cached.layer_images().expect("experts from disk");
                // A byte short of one more expert: the tier holds `tier`.
                assert_eq!(cached.set_host_tier((tier * read + read - 1) as u64).unwrap(), tier);
            }
            let what = format!("{name}, {slots} slots, {policy}{}", source(images.is_some(), tier));
            let (mut rc, mut cc) = (resident.new_cache().unwrap(), cached.new_cache().unwrap());
            let a = resident.forward(&f.prompt_ids, &mut rc, Logits::All).unwrap();
            let b = cached.forward(&f.prompt_ids, &mut cc, Logits::All).unwrap();
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{what}: prompt: {}",
                max_abs_diff(&a, &b)
            );
            for step in 0..12u32 {
                let id = (step * 5 + 1) % f.vocab as u32;
                let a = resident.forward(&[id], &mut rc, Logits::Last).unwrap();
                let b = cached.forward(&[id], &mut cc, Logits::Last).unwrap();
                let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{what}: step {step}: {}", max_abs_diff(&a, &b));
            }
            let c = cached.expert_cache().expect("experts in a cache");
            println!("{what}: {c:?}");
            assert_eq!(c.slots, slots.min(n_experts));
            assert!(c.misses > 0 && c.bytes_uploaded > 0 && c.bytes_uploaded.is_multiple_of(c.misses), "{what}: {c:?}");
            if slots == n_experts {
                assert!(c.misses <= n_experts as u64, "{what}: every expert copied once at most: {c:?}");
                assert!(c.hits > 0, "{what}: {c:?}");
            }
            assert_eq!(c.host_slots, tier, "{what}");
            if images.is_some() {
                assert_eq!(c.host_hits + c.disk_reads, c.misses, "{what}: each miss from the tier or the disk: {c:?}");
            } else {
                assert_eq!((c.host_hits, c.disk_reads), (0, 0), "{what}: {c:?}");
            }
            if tier == n_experts {
                assert!(c.disk_reads <= n_experts as u64, "{what}: every expert read once at most: {c:?}");
                assert!(c.host_hits > 0, "{what}: {c:?}");
            } else if tier == 0 {
                assert_eq!(c.host_hits, 0, "{what}: {c:?}");
            }
            assert!(cached.graph_stats().is_none(), "{what}: no graphs: the layers route on the host");
        }
        let err = CudaDecoder::new_expert_cached(&decoder, cuda.clone(), 0).unwrap_err();
        assert!(err.to_string().contains("at least one slot"), "{err}");
    }
}

/// `--max-vram` through the facade: a MoE model one byte short of resident keeps its experts in
/// host memory with a device cache, and decodes the logits of the resident model routed on the
/// host.
#[test]
fn a_gpu_ceiling_gives_a_moe_model_a_device_expert_cache() {
    let Some(_) = device_or_skip("a_gpu_ceiling_gives_a_moe_model_a_device_expert_cache") else { return };
    let f = Fixture::load("mixtral_moe");
    let decoder = strata_models::load_dir(&f.dir).unwrap().decoder;
    let context = 256;
    let budget = |max_bytes| strata_models::VramBudget {
        max_bytes,
        context_tokens: context,
        pass_tokens: strata::VRAM_PASS_TOKENS,
    };
    let (mut lo, mut hi) = (0u64, 1u64 << 40);
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        let r = strata_models::vram_report(&decoder, &budget(mid));
        if matches!(r, Ok(r) if r.expert_slots == 0 && r.streamed.iter().all(|&s| !s)) { hi = mid } else { lo = mid }
    }
    let options = LoadOptions {
        max_context: Some(context),
        offload: strata::OffloadConfig { max_vram: Some(hi - 1), ..Default::default() },
        ..options(Device::Cuda(0))
    };
    let bounded = Model::from_pretrained(&f.dir, options.clone()).unwrap();
    let slots = bounded.gpu_expert_cache().expect("one byte short: the experts go in a cache").slots;
    assert!((1..16).contains(&slots), "{slots} slots");
    assert_eq!(bounded.gpu_streamed(), None, "a cache, not streamed layers");
    let resident = CudaDecoder::new(&decoder, strata_kernels::Cuda::new(0).unwrap()).unwrap();
    resident.set_device_routing(false);
    let mut rc = resident.new_cache().unwrap();
    let a = resident.forward(&f.prompt_ids, &mut rc, Logits::All).unwrap();
    let b = bounded.logits(&f.prompt_ids, LogitsMode::OnePass).unwrap();
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{}", max_abs_diff(&a, &b));
    let c = bounded.gpu_expert_cache().unwrap();
    assert!(c.misses > 0 && c.bytes_uploaded > 0, "{c:?}");
    assert_eq!((c.host_slots, c.host_hits, c.disk_reads), (0, 0, 0), "no images, no tier: {c:?}");
    let expected = c.expected_hit_rate.expect("placed under a ceiling");
    assert!((0.0..1.0).contains(&expected), "{expected}");
    drop(bounded);

    // With --offload-dir, and --max-ram for the staging buffers and two experts more: the
    // experts come from images on disk behind a host tier of two, with the same logits.
    let dir = tempfile::tempdir().unwrap();
    let mut disk = options.clone();
    disk.offload.offload_dir = Some(dir.path().to_path_buf());
    let plan = strata::plan_vram_placement(&f.dir, &disk).unwrap();
    disk.offload.max_ram = Some(plan.report.host_bytes_with(true) + plan.report.host_tier_bytes(2));
    assert_eq!(strata::plan_vram_placement(&f.dir, &disk).unwrap().host_tier, 2);
    let from_disk = Model::from_pretrained(&f.dir, disk).unwrap();
    let b = from_disk.logits(&f.prompt_ids, LogitsMode::OnePass).unwrap();
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "from disk: {}", max_abs_diff(&a, &b));
    let c = from_disk.gpu_expert_cache().unwrap();
    assert_eq!(c.host_slots, 2, "{c:?}");
    assert!(c.disk_reads > 0 && c.host_hits + c.disk_reads == c.misses, "{c:?}");
}

/// `--max-vram` through the facade: a ceiling one byte under what the model needs resident
/// streams its last 4 layers (`strata_models::plan_vram`'s choice) with the unbounded model's
/// logits, bit for bit, one pass and token by token; a ceiling below any plan is an error that
/// names it.
#[test]
fn a_gpu_ceiling_streams_the_last_layers_with_the_same_logits() {
    let Some(_) = device_or_skip("a_gpu_ceiling_streams_the_last_layers_with_the_same_logits") else { return };
    let dir = tempfile::tempdir().unwrap();
    let llama = Fixture::load("llama_untied");
    let (path, decoder) = deep_decoder(&llama, GgufDtypes::Uniform(DType::Q8_0), 8, dir.path());
    let context = 256;
    let budget = |max_bytes| strata_models::VramBudget {
        max_bytes,
        context_tokens: context,
        pass_tokens: strata::VRAM_PASS_TOKENS,
    };
    let resident = |b| matches!(strata_models::plan_vram(&decoder, &budget(b)), Ok(p) if p.iter().all(|&s| !s));
    let (mut lo, mut hi) = (0u64, 1u64 << 40);
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if resident(mid) { hi = mid } else { lo = mid }
    }
    let with_ceiling = |max_vram| LoadOptions {
        max_context: Some(context),
        offload: strata::OffloadConfig { max_vram: Some(max_vram), ..Default::default() },
        ..options(Device::Cuda(0))
    };
    let unbounded = load(&path, Device::Cuda(0));
    assert_eq!(unbounded.gpu_streamed(), None);
    let bounded = Model::from_pretrained(&path, with_ceiling(hi - 1)).unwrap();
    let (layers, bytes) = bounded.gpu_streamed().expect("one byte short of resident: layers stream");
    assert_eq!(layers, 4);
    assert!(bytes > 0);
    // The unbounded model's logits bit for bit, one pass and token by token.
    let same_logits = |model: &Model, what: &str| {
        for mode in [LogitsMode::OnePass, LogitsMode::Decode] {
            let prompt = &llama.prompt_ids;
            let (a, b) = (unbounded.logits(prompt, mode).unwrap(), model.logits(prompt, mode).unwrap());
            let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{what}, {mode:?}: differ by {}", max_abs_diff(&a, &b));
        }
    };
    same_logits(&bounded, "host copies");
    assert!(bounded.upload_bandwidth().unwrap().unwrap() > 1e8, "host-to-device copies run");
    // With --offload-dir, and --max-ram for the staging buffers and two layers more: two of the
    // four streamed layers stay in host memory, the other two are read from disk every pass.
    let mut disk = with_ceiling(hi - 1);
    disk.offload.offload_dir = Some(dir.path().join("offload"));
    let plan = strata::plan_vram_placement(&path, &disk).unwrap();
    disk.offload.max_ram = Some(plan.report.host_bytes_with(true) + plan.report.host_tier_bytes(2));
    assert_eq!(strata::plan_vram_placement(&path, &disk).unwrap().host_tier, 2);
    let from_disk = Model::from_pretrained(&path, disk).unwrap();
    assert_eq!(from_disk.gpu_streamed().map(|s| s.0), Some(4));
    assert_eq!(from_disk.gpu_streamed_reads().map(|r| r.0), Some(2), "two layers read, two in the host tier");
    same_logits(&from_disk, "from disk behind a host tier");
    let Err(err) = Model::from_pretrained(&path, with_ceiling(1 << 20)) else { panic!("1 MiB holds no plan") };
    let err = err.to_string();
    assert!(err.contains("--max-vram"), "{err}");
}
