//! The SmolLM2 fixture (transformers' logits and greedy tokens for three prompts over the real
//! SmolLM2-135M-Instruct.Q4_1.gguf, written by xtask/fixtures/gen_smollm2_reference.py into
//! `tests/fixtures/smollm2/`) and the comparisons the SmolLM2 tests make with it.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::Value;
use strata::{GenerateOptions, LoadOptions, LogitsMode, Model, SamplingParams};

use crate::{SMOLLM2_GGUF, cached_file, cosine_similarity, fixtures_dir, max_abs_diff, read_npy, skip_message};

/// One prompt of the fixture.
pub struct Prompt {
    /// The prompt's name (`plain`, `chat`, `code`).
    pub name: String,
    /// Its text.
    pub text: String,
    /// transformers' token ids of `text`.
    pub ids: Vec<u32>,
    /// transformers' logits, `[ids.len(), vocab]` row-major (stored as float16, widened exactly).
    pub logits: Vec<f32>,
    /// The vocabulary size.
    pub vocab: usize,
    /// transformers' first greedy tokens after the prompt.
    pub greedy_ids: Vec<u32>,
    /// The reference's top-2 logit margin at each greedy step.
    pub greedy_margins: Vec<f64>,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("an id list").iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// `expected.json` and the prompts with their logits.
pub fn fixture() -> (Value, Vec<Prompt>) {
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
pub fn gguf(test: &str, expected: &Value) -> Option<PathBuf> {
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

/// The model (2 threads), loaded once per test binary, and the fixture's prompts; `None` (after
/// printing why) when the model file is not in the cache.
pub fn model(test: &str) -> Option<(&'static Model, Vec<Prompt>)> {
    static MODEL: OnceLock<Model> = OnceLock::new();
    let (expected, prompts) = fixture();
    let path = gguf(test, &expected)?;
    let model = MODEL.get_or_init(|| {
        Model::from_pretrained(&path, LoadOptions { threads: Some(2), ..LoadOptions::default() }).unwrap()
    });
    Some((model, prompts))
}

/// Runs `p` in `mode`, prints the agreement, and returns what falls outside the bounds: a
/// position whose cosine similarity is below `min_cosine`, or a different argmax at the last
/// position.
pub fn compare_logits(model: &Model, p: &Prompt, mode: LogitsMode, min_cosine: f64) -> Vec<String> {
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
        .filter(|&(_, &c)| c.is_nan() || c < min_cosine)
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

/// Greedy decoding of `n` tokens through the KV cache, not stopping at EOS.
pub fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let options = GenerateOptions { max_new_tokens: n, sampling: SamplingParams::default(), stop_at_eos: false };
    model.generate(prompt, &options, |_| ControlFlow::Continue(())).unwrap().tokens
}

/// The index of the largest value (the first one on ties).
pub fn argmax(xs: &[f32]) -> usize {
    strata::sampling::argmax(xs)
}
