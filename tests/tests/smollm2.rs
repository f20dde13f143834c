//! The real SmolLM2-135M-Instruct.Q4_1.gguf against transformers: strata's tokenizer, logits at
//! every position, and greedy continuation, for three prompts (plain text, a chat prompt rendered
//! with the model's template, code), from the fixture written by
//! xtask/fixtures/gen_smollm2_reference.py into tests/fixtures/smollm2/.
//!
//! The reference is transformers' float32 forward pass over the GGUF dequantized to float32.
//! strata keeps the weights as stored (q4_1, the tied embedding q8_0) and may quantize
//! activations, so the logits are compared by cosine similarity (>= 0.999 at every position), not
//! elementwise; the argmax at the last position and the first 8 greedy tokens (of `generate`)
//! must match exactly. The reference logits are stored as float16, whose rounding moves the
//! cosine by about 2e-8 (recorded in expected.json).
//!
//! The logits are checked on both paths: one pass over the prompt (prefill) and one token at a
//! time through the KV cache (decode, what `generate` uses after the prompt).
//!
//! The model is read from the strata cache (see `strata::cache_dir`); every test
//! skips, saying so, when the file is absent.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::Value;
use strata::{GenerateOptions, LoadOptions, LogitsMode, Model, SamplingParams};
use strata_tests::{SMOLLM2_GGUF, cached_file, cosine_similarity, fixtures_dir, max_abs_diff, read_npy, skip_message};

/// The bound on the cosine similarity between strata's and transformers' logits at every
/// position.
const MIN_COSINE: f64 = 0.999;

/// One prompt of the fixture.
struct Prompt {
    name: String,
    text: String,
    ids: Vec<u32>,
    /// transformers' logits, `[ids.len(), vocab]` row-major (stored as float16, widened exactly).
    logits: Vec<f32>,
    vocab: usize,
    greedy_ids: Vec<u32>,
    greedy_margins: Vec<f64>,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("an id list").iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn fixture() -> (Value, Vec<Prompt>) {
    let dir = fixtures_dir().join("smollm2");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).expect("expected.json");
    let prompts = expected["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let (shape, logits) = read_npy(&dir.join(p["logits_file"].as_str().unwrap()));
            let ids = ids(&p["ids"]);
            assert_eq!(shape, [ids.len(), shape[1]], "{}: logits shape", p["name"]);
            Prompt {
                name: p["name"].as_str().unwrap().to_owned(),
                text: p["text"].as_str().unwrap().to_owned(),
                ids,
                logits,
                vocab: shape[1],
                greedy_ids: self::ids(&p["greedy_ids"]),
                greedy_margins: p["greedy_margins"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect(),
            }
        })
        .collect();
    (expected, prompts)
}

/// The GGUF's path, checked against the fixture's record of it, or `None` (after printing why)
/// when it is not in the cache.
fn gguf(test: &str, expected: &Value) -> Option<PathBuf> {
    let Some(path) = cached_file(SMOLLM2_GGUF) else {
        println!("{}", skip_message(test, SMOLLM2_GGUF));
        return None;
    };
    let size = std::fs::metadata(&path).unwrap().len();
    assert_eq!(
        size,
        expected["model"]["size"].as_u64().unwrap(),
        "{} is not the file the fixture was made from (sha256 {})",
        path.display(),
        expected["model"]["sha256"]
    );
    Some(path)
}

/// The model, loaded once for all tests of this binary, and the fixture's prompts; `None` (after
/// printing why) when the model file is not in the cache.
fn model(test: &str) -> Option<(&'static Model, Vec<Prompt>)> {
    static MODEL: OnceLock<Model> = OnceLock::new();
    let (expected, prompts) = fixture();
    let path = gguf(test, &expected)?;
    let model = MODEL.get_or_init(|| {
        Model::from_pretrained(&path, LoadOptions { threads: Some(2), ..LoadOptions::default() }).unwrap()
    });
    Some((model, prompts))
}

#[test]
fn the_tokenizer_gives_transformers_ids() {
    let Some((model, prompts)) = model("the_tokenizer_gives_transformers_ids") else { return };
    let tok = model.tokenizer().expect("the GGUF carries a tokenizer");
    for p in &prompts {
        assert_eq!(tok.encode(&p.text, true).unwrap(), p.ids, "{}: {:?}", p.name, p.text);
    }
}

#[test]
fn logits_match_transformers_at_every_position() {
    let Some((model, prompts)) = model("logits_match_transformers_at_every_position") else { return };
    let failures: Vec<String> = prompts.iter().flat_map(|p| compare_logits(model, p, LogitsMode::OnePass)).collect();
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The same check on the decode path (one token at a time through the KV cache), which
/// `generate` uses after the prompt. This path runs the quantized matrix-vector product: with
/// ggml's single 8-bit activation digit it drifted to cosine 0.9973 on this model (emulating that
/// rounding in transformers gives the same drift: `checks.q8_activation_emulation` in
/// expected.json); with the two-digit activations strata uses it stays within about 1e-7 of 1.
#[test]
fn decode_logits_match_transformers_at_every_position() {
    let Some((model, prompts)) = model("decode_logits_match_transformers_at_every_position") else { return };
    let failures: Vec<String> = prompts.iter().flat_map(|p| compare_logits(model, p, LogitsMode::Decode)).collect();
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Runs `p` in `mode`, prints the agreement, and returns what falls outside the bounds:
/// a position whose cosine similarity is below [`MIN_COSINE`], or a different argmax at the last
/// position.
fn compare_logits(model: &Model, p: &Prompt, mode: LogitsMode) -> Vec<String> {
    assert_eq!(model.decoder().hparams().vocab_size, p.vocab, "vocabulary size");
    let got = model.logits(&p.ids, mode).unwrap();
    assert_eq!(got.len(), p.logits.len(), "{} {mode:?}: logits length", p.name);
    let rows = || got.chunks_exact(p.vocab).zip(p.logits.chunks_exact(p.vocab));
    let cosines: Vec<f64> = rows().map(|(a, b)| cosine_similarity(a, b)).collect();
    let argmax_agree = rows().filter(|(a, b)| argmax(a) == argmax(b)).count();
    let min_cos = cosines.iter().copied().fold(f64::INFINITY, f64::min);
    let (last_ours, last_ref) = rows().next_back().unwrap();
    println!(
        "{:>5} {mode:?}: {} positions, min cosine 1 - {:.1e}, max |diff| {:.4}, argmax agrees at {argmax_agree}/{} \
         positions, last argmax {} (reference {})",
        p.name,
        p.ids.len(),
        1.0 - min_cos,
        max_abs_diff(&got, &p.logits),
        p.ids.len(),
        argmax(last_ours),
        argmax(last_ref),
    );
    let mut failures: Vec<String> = cosines
        .iter()
        .enumerate()
        .filter(|&(_, &c)| c.is_nan() || c < MIN_COSINE)
        .map(|(pos, c)| format!("{} {mode:?} position {pos}: cosine {c}", p.name))
        .collect();
    if argmax(last_ours) != argmax(last_ref) {
        failures.push(format!(
            "{} {mode:?}: last-position argmax {} != reference {}",
            p.name,
            argmax(last_ours),
            argmax(last_ref)
        ));
    }
    failures
}

/// The first 8 greedy tokens of `generate` (prefill, then the decode path) equal transformers'.
/// The prompts were chosen (by the reference alone) for top-2 margins of at least 0.2 at every
/// step; the decode path's 8-bit activations move logits by up to about 1, so this can still
/// flip: with an earlier chat prompt (system "Be brief.", user "Hi!") strata diverged at step 7,
/// where the reference margin was 0.61.
#[test]
fn greedy_continuations_match_transformers() {
    let Some((model, prompts)) = model("greedy_continuations_match_transformers") else { return };
    for p in &prompts {
        let got = greedy(model, &p.ids, p.greedy_ids.len());
        let tok = model.tokenizer().unwrap();
        let margin = p.greedy_margins.iter().copied().fold(f64::INFINITY, f64::min);
        println!("{:>5}: greedy {:?} (reference min top-2 margin {margin:.3})", p.name, tok.decode(&got).unwrap());
        assert_eq!(got, p.greedy_ids, "{}: greedy ids (reference margins {:?})", p.name, p.greedy_margins);
    }
}

#[test]
fn the_capital_of_france_is_paris() {
    let Some((model, _)) = model("the_capital_of_france_is_paris") else { return };
    let tok = model.tokenizer().unwrap();
    let prompt = tok.encode("The capital of France is", true).unwrap();
    let text = tok.decode(&greedy(model, &prompt, 8)).unwrap();
    assert!(text.starts_with(" Paris"), "greedy continuation {text:?}");
}

/// Greedy decoding of `n` tokens through the KV cache, not stopping at EOS.
fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let options = GenerateOptions { max_new_tokens: n, sampling: SamplingParams::default(), stop_at_eos: false };
    model.generate(prompt, &options, |_| ControlFlow::Continue(())).unwrap().tokens
}

/// The index of the largest value (the first one on ties).
fn argmax(xs: &[f32]) -> usize {
    strata::sampling::argmax(xs)
}
