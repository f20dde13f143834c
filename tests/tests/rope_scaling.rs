//! RoPE scaling end to end, on tiny Llama fixtures with `max_position_embeddings` 32 (or an
//! original context of 16), so that short prompts cross every boundary:
//!
//! - every checkpoint scaling type (linear, dynamic NTK, YaRN twice, Llama 3, LongRoPE), in both
//!   config spellings, against transformers' one-pass logits (prompts shorter and longer than the
//!   boundary for the length-dependent types), and greedy continuations where transformers' own
//!   cached decoding is a full recompute;
//! - the same scalings from GGUF metadata (and `rope_freqs.weight` for Llama 3);
//! - per-request context scaling: the static algorithms reproduce the transformers types they
//!   name, and for every length-dependent one, decoding token by token (or in chunks) across the
//!   boundary through the KV cache gives the logits of a full recompute of the same sequence
//!   (the default `RopeUpdate::Recompute`), a planned request keeps one table and equals one pass
//!   over the whole sequence row by row, and `RopeUpdate::Rerotate` turns the cached keys exactly
//!   where that is possible (the first layer);
//! - a request past `max_capacity` is refused before any work, and KV memory follows the tokens.

use std::path::Path;

use serde_json::Value;
use strata_models::gguf::write::GgufWriter;
use strata_models::tensor::{DType, Tensor};
use strata_models::{ContextScaling, Decoder, Error, Logits, RopeUpdate, ScalingAlgorithm};
use strata_tests::{Fixture, GgufDtypes, max_abs_diff, read_npy_f32, write_gguf};

/// The tolerance on logits.
const TOL: f32 = 1e-4;

const ROPE_FIXTURES: [&str; 6] =
    ["rope_linear", "rope_dynamic", "rope_yarn", "rope_yarn_mscale", "rope_llama3", "rope_longrope"];

/// One prompt of a fixture with its reference logits.
struct Prompt {
    ids: Vec<u32>,
    logits: Vec<f32>,
}

/// The fixture's main prompt and its extra prefixes (shorter than the scaling's boundary).
fn prompts(f: &Fixture) -> Vec<Prompt> {
    let mut out = vec![Prompt { ids: f.prompt_ids.clone(), logits: f.logits.clone() }];
    for extra in f.expected["extra_prompts"].as_array().into_iter().flatten() {
        let ids = extra["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let (_, logits) = read_npy_f32(&f.dir.join(extra["logits_file"].as_str().unwrap()));
        out.push(Prompt { ids, logits });
    }
    out
}

fn decoder(dir: &Path) -> Decoder {
    strata_models::load_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).decoder
}

/// A copy of fixture `name` whose config.json is `config` (the weights copied alongside).
fn with_config(f: &Fixture, config: &Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(f.dir.join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Logits at every position of one forward pass over `ids` from an empty cache.
fn one_pass(d: &Decoder, scaling: Option<&ContextScaling>, ids: &[u32]) -> Vec<f32> {
    let mut cache = d.new_cache_with_scaling(scaling.cloned()).unwrap();
    d.forward(ids, &mut cache, Logits::All).unwrap()
}

fn greedy(d: &Decoder, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = d.new_cache();
    let mut logits = d.forward(prompt, &mut cache, Logits::Last).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let next = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
        out.push(next);
        logits = d.forward(&[next], &mut cache, Logits::Last).unwrap();
    }
    out
}

#[test]
fn checkpoint_scalings_match_transformers_in_both_spellings() {
    for name in ROPE_FIXTURES {
        let f = Fixture::load(name);
        let legacy = with_config(&f, &read_json(&f.dir.join("config_legacy.json")));
        for (spelling, dir) in [("rope_parameters", f.dir.as_path()), ("legacy rope_scaling", legacy.path())] {
            let d = decoder(dir);
            for p in prompts(&f) {
                let diff = max_abs_diff(&one_pass(&d, None, &p.ids), &p.logits);
                assert!(diff <= TOL, "{name} ({spelling}), {} ids: max |logit - transformers| = {diff}", p.ids.len());
            }
            assert_eq!(greedy(&d, &f.prompt_ids, f.greedy_ids.len()), f.greedy_ids, "{name} ({spelling})");
        }
    }
}

#[test]
fn length_dependent_checkpoints_cross_their_boundary() {
    // The fixtures' prompts really sit on both sides: strata must pick the table by length.
    let dynamic = Fixture::load("rope_dynamic");
    let d = decoder(&dynamic.dir);
    let scheme = d.rope_scheme();
    assert!(scheme.is_length_dependent());
    assert_eq!(scheme.table(20), scheme.table(32));
    assert_ne!(scheme.table(32), scheme.table(48));
    let longrope = decoder(&Fixture::load("rope_longrope").dir);
    assert_ne!(longrope.rope_scheme().table(16), longrope.rope_scheme().table(17));
}

/// The cases whose RoPE table changes with the sequence length: the fixture whose weights (and
/// checkpoint scaling) run, and the per-request scaling, if any.
fn length_dependent_cases() -> Vec<(&'static str, Option<ContextScaling>)> {
    let expanding = |algorithm| ContextScaling { dynamic_expansion: true, ..ContextScaling::new(algorithm, 16, 64) };
    vec![
        ("rope_dynamic", None),
        ("rope_longrope", None),
        ("rope_linear", Some(ContextScaling::new(ScalingAlgorithm::NtkDynamic, 16, 64))),
        ("rope_linear", Some(ContextScaling::new(ScalingAlgorithm::YarnDynamic, 16, 64))),
        ("rope_yarn", Some(ContextScaling::new(ScalingAlgorithm::YarnDynamic, 16, 64))),
        ("rope_linear", Some(expanding(ScalingAlgorithm::Linear))),
        ("rope_linear", Some(expanding(ScalingAlgorithm::Yarn))),
        ("rope_linear", Some(expanding(ScalingAlgorithm::Llama3))),
    ]
}

#[test]
fn decoding_across_the_boundary_equals_a_full_recompute() {
    let ids = Fixture::load("rope_dynamic").prompt_ids; // 48 ids: past 16 and 32.
    for (name, scaling) in length_dependent_cases() {
        let what = format!("{name} with {:?}", scaling.as_ref().map(|s| s.algorithm));
        let d = decoder(&Fixture::load(name).dir);
        let mut cache = d.new_cache_with_scaling(scaling.clone()).unwrap();
        let mut tables = Vec::new();
        let mut worst = 0f32;
        for i in 0..ids.len() {
            let step = d.forward(&ids[i..=i], &mut cache, Logits::Last).unwrap();
            tables.push(cache.rope_table().unwrap().clone());
            let full = one_pass(&d, scaling.as_ref(), &ids[..=i]);
            let diff = max_abs_diff(&step, &full[full.len() - step.len()..]);
            worst = worst.max(diff);
            assert!(diff <= TOL, "{what}: token {i}: cached decode vs recompute differ by {diff}");
        }
        // The table did change along the way, so the cached keys were re-rotated.
        assert_ne!(tables.first(), tables.last(), "{what}: the table never changed");
        println!("{what}: max |decode - recompute| over {} steps = {worst:e}", ids.len());
    }
}

#[test]
fn a_planned_request_keeps_one_table_and_equals_the_one_pass_logits() {
    // Planned for its whole length, a request runs with that length's table from the first token:
    // every row of a token-by-token decode equals the same row of one pass over the sequence, and
    // nothing is recomputed or re-rotated on the way.
    let ids = Fixture::load("rope_dynamic").prompt_ids;
    for (name, scaling) in length_dependent_cases() {
        let d = decoder(&Fixture::load(name).dir);
        let full = one_pass(&d, scaling.as_ref(), &ids);
        let mut cache = d.new_cache_with_scaling(scaling.clone()).unwrap();
        d.plan(&mut cache, ids.len()).unwrap();
        let mut rows = Vec::new();
        let mut first_table = None;
        for i in 0..ids.len() {
            rows.extend(d.forward(&ids[i..=i], &mut cache, Logits::Last).unwrap());
            let table = cache.rope_table().unwrap().clone();
            assert_eq!(first_table.get_or_insert_with(|| table.clone()), &table, "{name}: the table moved");
        }
        let diff = max_abs_diff(&rows, &full);
        assert!(diff <= TOL, "{name} {scaling:?}: planned decode vs one pass differ by {diff}");
    }
}

#[test]
fn rerotation_turns_cached_keys_exactly_where_it_can() {
    // With RopeUpdate::Rerotate the first layer's cached keys are those a recompute gives (their
    // inputs do not depend on RoPE); deeper layers' inputs came from attention under the earlier
    // table, which is why Recompute is the default.
    let ids = Fixture::load("rope_dynamic").prompt_ids;
    for (name, scaling) in length_dependent_cases() {
        let d = decoder(&Fixture::load(name).dir);
        let mut turned = d.new_cache_with_scaling(scaling.clone()).unwrap().with_rope_update(RopeUpdate::Rerotate);
        let mut worst_logit = 0f32;
        for i in 0..ids.len() {
            let step = d.forward(&ids[i..=i], &mut turned, Logits::Last).unwrap();
            let full = one_pass(&d, scaling.as_ref(), &ids[..=i]);
            worst_logit = worst_logit.max(max_abs_diff(&step, &full[full.len() - step.len()..]));
        }
        let mut recomputed = d.new_cache_with_scaling(scaling.clone()).unwrap();
        d.forward(&ids, &mut recomputed, Logits::Last).unwrap();
        assert_eq!(turned.rope_table(), recomputed.rope_table(), "{name}");
        let (k_turned, v_turned) = turned.contiguous(0);
        let (k_full, v_full) = recomputed.contiguous(0);
        let diff = max_abs_diff(&k_turned, &k_full);
        assert!(diff <= 1e-5, "{name} {scaling:?}: re-rotated first-layer keys differ by {diff}");
        assert!(max_abs_diff(&v_turned, &v_full) <= 1e-5, "{name}: first-layer values");
        println!(
            "{name} with {:?}: re-rotation: first-layer keys within {diff:e}, logits within {worst_logit:e} of a recompute",
            scaling.as_ref().map(|s| s.algorithm)
        );
    }
}

#[test]
fn chunked_prefill_across_the_boundary_equals_a_full_recompute() {
    let ids = Fixture::load("rope_dynamic").prompt_ids;
    for (name, scaling) in length_dependent_cases() {
        let d = decoder(&Fixture::load(name).dir);
        let mut cache = d.new_cache_with_scaling(scaling.clone()).unwrap();
        let mut start = 0;
        for len in [10, 9, 1, 14, 1, 13] {
            let end = start + len;
            let chunk = d.forward(&ids[start..end], &mut cache, Logits::All).unwrap();
            // Rows of a chunk use the table of the sequence's length at the chunk's end: they are
            // the last rows of a one-pass forward over the prefix that ends there.
            let full = one_pass(&d, scaling.as_ref(), &ids[..end]);
            let diff = max_abs_diff(&chunk, &full[full.len() - chunk.len()..]);
            assert!(diff <= TOL, "{name} {scaling:?}: chunk {start}..{end} differs from recompute by {diff}");
            start = end;
        }
        assert_eq!(start, ids.len());
    }
}

#[test]
fn context_scaling_reproduces_the_transformers_types_it_names() {
    // Each fixture's weights with default RoPE in config.json, and the per-request algorithm that
    // names the fixture's scaling: the transformers logits come back.
    let cases = [
        ("rope_linear", ContextScaling::new(ScalingAlgorithm::Linear, 32, 80)),
        ("rope_llama3", ContextScaling::new(ScalingAlgorithm::Llama3, 16, 64)),
    ];
    for (name, scaling) in cases {
        let f = Fixture::load(name);
        let mut config = read_json(&f.dir.join("config.json"));
        let theta = config["rope_parameters"]["rope_theta"].clone();
        config["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": theta});
        let dir = with_config(&f, &config);
        let d = decoder(dir.path());
        let plain = max_abs_diff(&one_pass(&d, None, &f.prompt_ids), &f.logits);
        assert!(plain > 1e-2, "{name}: the scaling should matter ({plain})");
        let diff = max_abs_diff(&one_pass(&d, Some(&scaling), &f.prompt_ids), &f.logits);
        assert!(diff <= TOL, "{name} via {}: max |logit - transformers| = {diff}", scaling.algorithm);
    }
    // YaRN keeps the checkpoint's betas: static yarn to 3x from 16 is the rope_yarn fixture.
    let f = Fixture::load("rope_yarn");
    let mut d = decoder(&f.dir);
    d.set_context_scaling(Some(ContextScaling::new(ScalingAlgorithm::Yarn, 16, 48))).unwrap();
    let mut cache = d.new_cache();
    let diff = max_abs_diff(&d.forward(&f.prompt_ids, &mut cache, Logits::All).unwrap(), &f.logits);
    assert!(diff <= TOL, "rope_yarn via yarn: {diff}");
    // `none` switches the checkpoint's scaling off.
    d.set_context_scaling(Some(ContextScaling::new(ScalingAlgorithm::None, 16, 48))).unwrap();
    assert_eq!(d.rope_scheme().table(40).attention_factor, 1.0);
    assert!(max_abs_diff(&one_pass(&d, None, &f.prompt_ids), &f.logits) <= TOL, "None as argument is the checkpoint's");
    let mut cache = d.new_cache();
    assert!(max_abs_diff(&d.forward(&f.prompt_ids, &mut cache, Logits::All).unwrap(), &f.logits) > 1e-2);
}

#[test]
fn a_request_past_max_capacity_is_refused_before_any_work() {
    let f = Fixture::load("rope_dynamic");
    let mut d = decoder(&f.dir);
    d.set_context_scaling(Some(ContextScaling::new(ScalingAlgorithm::YarnDynamic, 32, 40))).unwrap();
    let mut cache = d.new_cache();
    d.forward(&f.prompt_ids[..30], &mut cache, Logits::Last).unwrap();
    let (held, bytes, table) = (cache.len(), cache.allocated_bytes(), cache.rope_table().cloned());
    match d.forward(&f.prompt_ids[30..41], &mut cache, Logits::Last) {
        Err(Error::ContextTooLong { tokens: 41, max_capacity: 40 }) => {}
        other => panic!("expected ContextTooLong, got {other:?}"),
    }
    assert_eq!((cache.len(), cache.allocated_bytes(), cache.rope_table().cloned()), (held, bytes, table));
    let err = d.check_capacity(&cache, 11).unwrap_err().to_string();
    assert!(err.contains("41 tokens") && err.contains("max_capacity 40"), "{err}");
    d.check_capacity(&cache, 10).unwrap();
    d.forward(&f.prompt_ids[30..40], &mut cache, Logits::Last).unwrap();
    assert!(matches!(d.forward(&f.prompt_ids[40..41], &mut cache, Logits::Last), Err(Error::ContextTooLong { .. })));
    // A whole prompt that is too long is refused with nothing allocated.
    let mut fresh = d.new_cache();
    assert!(d.forward(&f.prompt_ids, &mut fresh, Logits::All).is_err());
    assert_eq!(fresh.allocated_bytes(), 0);
    // Bad capacities are refused when set.
    assert!(matches!(
        d.set_context_scaling(Some(ContextScaling::new(ScalingAlgorithm::Yarn, 64, 32))),
        Err(Error::InvalidContextScaling { .. })
    ));
}

#[test]
fn a_bad_id_at_a_table_change_leaves_the_cache_as_it_was() {
    let f = Fixture::load("rope_dynamic");
    let d = decoder(&f.dir);
    let mut cache = d.new_cache();
    d.forward(&f.prompt_ids[..32], &mut cache, Logits::Last).unwrap();
    let before = (cache.len(), cache.token_ids().to_vec(), cache.rope_table().cloned(), cache.contiguous(1));
    // The 33rd token would change the table (and recompute the 32 held tokens), but it is invalid.
    let err = d.forward(&[5, 128], &mut cache, Logits::Last).unwrap_err().to_string();
    assert!(err.contains("token id 128"), "{err}");
    assert!(before == (cache.len(), cache.token_ids().to_vec(), cache.rope_table().cloned(), cache.contiguous(1)));
}

#[test]
fn kv_memory_follows_the_tokens_held() {
    let f = Fixture::load("rope_dynamic");
    let d = decoder(&f.dir);
    let hp = d.hparams();
    let mut cache = d.new_cache();
    let block_bytes = 2 * hp.n_layers * cache.block_len() * hp.kv_dim() * 4;
    for (i, &id) in f.prompt_ids.iter().enumerate() {
        d.forward(&[id], &mut cache, Logits::Last).unwrap();
        assert_eq!(cache.allocated_bytes(), (i + 1).div_ceil(cache.block_len()) * block_bytes);
    }
}

#[test]
fn gguf_rope_metadata_gives_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    type Metadata = Box<dyn FnOnce(&mut GgufWriter)>;
    let cases: [(&str, Metadata); 3] = [
        (
            "rope_linear",
            Box::new(|w| {
                w.set_metadata("llama.rope.scaling.type", "linear");
                w.set_metadata("llama.rope.scaling.factor", 2.5f32);
            }),
        ),
        (
            "rope_yarn",
            Box::new(|w| {
                w.set_metadata("llama.rope.scaling.type", "yarn");
                w.set_metadata("llama.rope.scaling.factor", 3.0f32);
                w.set_metadata("llama.rope.scaling.original_context_length", 16u32);
                w.set_metadata("llama.rope.scaling.yarn_beta_fast", 4.0f32);
                w.set_metadata("llama.rope.scaling.yarn_beta_slow", 0.25f32);
            }),
        ),
        (
            "rope_llama3",
            Box::new(|w| {
                // What llama.cpp's converter writes for Llama 3.1 scaling: one divisor per
                // frequency (factor 4, low/high frequency factors 1 and 4, 16 original positions).
                let (factor, low, high, original) = (4.0f64, 1.0f64, 4.0f64, 16.0f64);
                let divisors: Vec<f32> = (0..16)
                    .map(|i| {
                        let freq = 1.0 / 10000f64.powf(2.0 * i as f64 / 32.0);
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < original / high {
                            1.0
                        } else if wavelen > original / low {
                            factor as f32
                        } else {
                            let smooth = (original / wavelen - low) / (high - low);
                            (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                        }
                    })
                    .collect();
                w.add_tensor("rope_freqs.weight", &Tensor::from_f32(&divisors, vec![16]).unwrap()).unwrap();
            }),
        ),
    ];
    for (name, rope) in cases {
        let f = Fixture::load(name);
        let path = dir.path().join(format!("{name}.gguf"));
        write_gguf(&f, GgufDtypes::Uniform(DType::F32), rope, &path);
        let d = strata_models::load_gguf(&path).unwrap().decoder;
        let diff = max_abs_diff(&one_pass(&d, None, &f.prompt_ids), &f.logits);
        assert!(diff <= TOL, "{name} from GGUF: max |logit - transformers| = {diff}");
    }
}
