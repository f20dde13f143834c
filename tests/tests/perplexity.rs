//! `Model::perplexity`: chunked scoring through the KV cache equals scoring the one-pass
//! logits of the whole sequence, for any chunk size, also when a length-driven RoPE scaling
//! (the rope_dynamic fixture's prompt crosses its boundary) picks the angles.

use strata::{LoadOptions, LogitsMode, Model};
use strata_tests::Fixture;

/// Mean negative log-likelihood of each next token under `logits` `[n, vocab]`, in f64.
fn mean_nll(logits: &[f32], ids: &[u32], vocab: usize) -> f64 {
    let mut nll = 0f64;
    for (row, &next) in logits.chunks_exact(vocab).zip(&ids[1..]) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
        nll -= row[next as usize] as f64 - max - z.ln();
    }
    nll / (ids.len() - 1) as f64
}

#[test]
fn chunked_perplexity_equals_the_one_pass_score() {
    for name in ["llama_tied", "qwen3_qknorm", "rope_dynamic"] {
        let f = Fixture::load(name);
        let model = Model::from_pretrained(&f.dir, LoadOptions { threads: Some(2), ..LoadOptions::default() }).unwrap();
        let ids = &f.prompt_ids;
        let want = mean_nll(&model.logits(ids, LogitsMode::OnePass).unwrap(), ids, f.vocab);
        for chunk in [1, 3, ids.len() - 1, ids.len(), 1000] {
            let mut calls = Vec::new();
            let p = model.perplexity(ids, chunk, |done, total| calls.push((done, total))).unwrap();
            assert_eq!((p.tokens, p.scored), (ids.len(), ids.len() - 1), "{name}");
            assert!(
                (p.mean_nll - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{name} chunk {chunk}: {} vs {want}",
                p.mean_nll
            );
            assert!((p.perplexity - want.exp()).abs() <= 1e-4 * want.exp(), "{name} chunk {chunk}");
            assert_eq!(calls.len(), ids.len().div_ceil(chunk), "{name} chunk {chunk}: one progress call per chunk");
            assert_eq!(calls.last(), Some(&(ids.len(), ids.len())), "{name}");
        }
    }
}

#[test]
fn perplexity_needs_two_tokens() {
    let f = Fixture::load("llama_tied");
    let model = Model::from_pretrained(&f.dir, LoadOptions::default()).unwrap();
    let err = model.perplexity(&f.prompt_ids[..1], 4, |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("at least 2 tokens"), "{err}");
}
