//! A prompt asked for its last position's logits only (`Logits::Last`, how generation prefills)
//! runs the last layer's attention output and feed-forward block for that position alone; its
//! logits must still be the last row of the full pass, in one pass and in chunks through the cache.

use strata_models::{Decoder, Logits};
use strata_tests::{Fixture, max_abs_diff};

/// Rows of one position computed with fewer rows around them: the same arithmetic but for the
/// order of float additions (a matrix-vector product instead of the GEMM).
const TOL: f32 = 1e-5;

fn check(name: &str) {
    let f = Fixture::load(name);
    let d: Decoder = strata_models::load(&f.dir.to_string_lossy()).unwrap().decoder;
    let vocab = f.vocab;
    let ids = &f.prompt_ids;
    assert!(ids.len() >= 4, "{name}: the prompt is too short to split");
    let all = d.forward(ids, &mut d.new_cache(), Logits::All).unwrap();
    let want = &all[all.len() - vocab..];

    let last = d.forward(ids, &mut d.new_cache(), Logits::Last).unwrap();
    let diff = max_abs_diff(&last, want);
    assert!(diff <= TOL, "{name}, one pass: max |last - all's last row| = {diff}");

    // Chunked prefill: the second chunk's queries start past the cache's keys.
    let mut cache = d.new_cache();
    let half = ids.len() / 2;
    d.forward(&ids[..half], &mut cache, Logits::Last).unwrap();
    let chunked = d.forward(&ids[half..], &mut cache, Logits::Last).unwrap();
    let diff = max_abs_diff(&chunked, want);
    assert!(diff <= TOL, "{name}, in two chunks: max |last - all's last row| = {diff}");

    // The cache holds every position's keys and values: decoding on from it matches decoding on
    // from a full pass.
    let mut full = d.new_cache();
    d.forward(ids, &mut full, Logits::All).unwrap();
    let next = [1u32];
    let a = d.forward(&next, &mut cache, Logits::Last).unwrap();
    let b = d.forward(&next, &mut full, Logits::Last).unwrap();
    let diff = max_abs_diff(&a, &b);
    assert!(diff <= TOL, "{name}, the step after: max |logit difference| = {diff}");
}

#[test]
fn last_position_logits_equal_the_full_pass_last_row() {
    for name in
        ["llama_tied", "llama_untied", "mistral_window", "qwen2_bias", "qwen3_qknorm", "mixtral_moe", "qwen2_moe"]
    {
        check(name);
    }
}
