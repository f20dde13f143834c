//! Dense models against transformers: every reference fixture's logits (one pass and through
//! the KV cache) and greedy continuation, and typed errors for checkpoints that do not match
//! their config.

use std::ops::ControlFlow;

use strata::{GenerateOptions, LoadOptions, LogitsMode, Model, SamplingParams};
use strata_tests::{Fixture, max_abs_diff};

/// The tolerance the issue sets for f32 weights (and met by the bf16 fixture, whose reference
/// upcasts the stored bf16 weights to f32).
const TOL: f32 = 1e-4;

const DENSE: [&str; 6] = ["llama_tied", "llama_untied", "mistral_window", "qwen2_bias", "qwen3_qknorm", "llama_bf16"];

fn load(f: &Fixture) -> Model {
    Model::from_pretrained(&f.dir, LoadOptions { threads: Some(2), ..LoadOptions::default() })
        .unwrap_or_else(|e| panic!("{}: {e}", f.name))
}

#[test]
fn logits_match_transformers_in_one_pass_and_through_the_cache() {
    for name in DENSE {
        let f = Fixture::load(name);
        let model = load(&f);
        for mode in [LogitsMode::OnePass, LogitsMode::Decode] {
            let got = model.logits(&f.prompt_ids, mode).unwrap();
            let diff = max_abs_diff(&got, &f.logits);
            assert!(diff <= TOL, "{name} {mode:?}: max |logit - reference| = {diff}");
        }
    }
}

#[test]
fn greedy_continuations_match_transformers() {
    for name in DENSE {
        let f = Fixture::load(name);
        let model = load(&f);
        let options = GenerateOptions {
            max_new_tokens: f.greedy_ids.len(),
            sampling: SamplingParams::default(),
            stop_at_eos: false,
        };
        let mut streamed = Vec::new();
        let g = model
            .generate(&f.prompt_ids, &options, |id| {
                streamed.push(id);
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(g.tokens, f.greedy_ids, "{name}");
        assert_eq!(streamed, f.greedy_ids, "{name}: streamed tokens");
    }
}

/// Copies a fixture into a temporary directory with its config.json edited by `edit`.
fn with_config(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let f = Fixture::load(name);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(f.dir.join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.dir.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

fn load_error(dir: &std::path::Path) -> strata_models::Error {
    match Model::from_pretrained(dir, LoadOptions::default()) {
        Err(strata::Error::Model(e)) => e,
        Err(other) => panic!("expected a model error, got {other}"),
        Ok(_) => panic!("loading {} should fail", dir.display()),
    }
}

#[test]
fn a_tensor_missing_for_the_config_is_named() {
    let dir = with_config("llama_tied", |c| c["num_hidden_layers"] = 3.into());
    match load_error(dir.path()) {
        strata_models::Error::TensorNotFound { tensor, .. } => {
            assert!(tensor.starts_with("model.layers.2."), "{tensor}")
        }
        other => panic!("expected TensorNotFound, got {other}"),
    }
}

#[test]
fn a_shape_that_disagrees_with_the_config_is_named() {
    let dir = with_config("llama_untied", |c| c["intermediate_size"] = 50.into());
    match load_error(dir.path()) {
        strata_models::Error::TensorShape { tensor, expected, got, .. } => {
            assert_eq!(tensor, "model.layers.0.mlp.gate_proj.weight");
            assert_eq!(expected, vec![50, 64]);
            assert_eq!(got, vec![48, 64]);
        }
        other => panic!("expected TensorShape, got {other}"),
    }
}

/// On the CPU there are no kernels to time: `profile_kernels` runs the work and returns none.
#[test]
fn a_kernel_profile_on_the_cpu_runs_the_work_and_is_none() {
    let f = Fixture::load("llama_tied");
    let model = load(&f);
    let mut cache = model.new_cache().unwrap();
    let (logits, profile) = model.profile_kernels(|| model.step(&f.prompt_ids, &mut cache)).unwrap();
    assert!(profile.is_none());
    assert_eq!(logits.len(), f.vocab);
    assert_eq!(cache.len(), f.prompt_ids.len());
    // An error of the work is the call's.
    let err = model.profile_kernels(|| model.step(&[u32::MAX], &mut cache)).unwrap_err();
    assert!(err.to_string().contains(&u32::MAX.to_string()), "{err}");
    // Nor a GPU's decode host time.
    assert!(model.gpu_decode_host_time().is_none());
}

#[test]
fn out_of_vocabulary_ids_are_refused() {
    let f = Fixture::load("llama_tied");
    let model = load(&f);
    let err = model.logits(&[1, 256], LogitsMode::OnePass).unwrap_err();
    assert!(err.to_string().contains("token id 256"), "{err}");
}
