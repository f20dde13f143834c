//! Token sampling: greedy, temperature, top-k, top-p and repetition penalty, reproducible
//! from a seed.
//!
//! The order of transformations follows transformers' logits processors: repetition penalty,
//! then temperature, then top-k, then top-p, then a draw from the softmax. Temperature 0 is
//! greedy decoding (the penalty still applies).

/// How to pick the next token.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (0 or `None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`.
    pub top_p: Option<f32>,
    /// Divide positive (multiply negative) logits of tokens already seen by this; 1 disables it.
    pub repetition_penalty: f32,
    /// Seed of the random draws.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> SamplingParams {
        SamplingParams { temperature: 0.0, top_k: None, top_p: None, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    /// Checks the parameters: a temperature of at least 0, a top-p in (0, 1] and a repetition
    /// penalty above 0, all finite. (A penalty of 0 would make every seen token's logit
    /// infinite; a temperature below 0 or a top-p above 1 mean nothing.)
    pub fn check(&self) -> crate::Result<()> {
        let bad = |what: String| Err(crate::Error::InvalidInput(what));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!("temperature {}: it must be 0 (greedy) or more", self.temperature));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return bad(format!("top-p {p}: it must be above 0 and at most 1"));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!("repetition penalty {}: it must be above 0 (1 turns it off)", self.repetition_penalty));
        }
        Ok(())
    }
}

/// A sampler: the parameters and the random state.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = SplitMix64(params.seed);
        Sampler { params, rng }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (modified in place), given the tokens of the sequence
    /// so far for the repetition penalty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &id in &seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(logits) as u32;
        }
        // Candidates sorted by logit, descending; ties by lower id, as torch's sort is stable.
        let mut cand: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, l / p.temperature)).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(k) = p.top_k.filter(|&k| k > 0) {
            cand.truncate(k.max(1));
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if let Some(top_p) = p.top_p.filter(|&t| t < 1.0) {
            // Keep tokens until the cumulative probability reaches top_p (at least one).
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= total);
        }
        let r = self.rng.next_f64();
        let mut cum = 0.0;
        for (c, q) in cand.iter().zip(&probs) {
            cum += q;
            if r < cum {
                return c.0;
            }
        }
        cand[cand.len() - 1].0
    }
}

/// The first index of the largest value (NaN never wins; 0 when every value is NaN, or for an
/// empty slice).
///
/// Two passes the compiler vectorizes: the maximum over sixteen lanes (`f32::max` skips NaN),
/// then the first index holding it. A greedy step runs this over the whole vocabulary (49,152
/// logits for SmolLM2), where the one-pass loop, each comparison waiting on the last, took 2% of
/// a decode step.
pub fn argmax(xs: &[f32]) -> usize {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = m.max(x);
        }
    }
    let max = lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    xs.iter().position(|&x| x == max).unwrap_or(0)
}

/// SplitMix64: a tiny, well-mixed generator whose sequence never changes between versions,
/// so a seed reproduces the same text forever.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams { temperature, ..SamplingParams::default() }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    /// The vectorized argmax against the one-pass definition: the first index of the largest
    /// non-NaN value, on lengths around the sixteen lanes, with ties, NaNs, infinities and
    /// signed zeros.
    #[test]
    fn argmax_is_the_first_largest_non_nan() {
        fn one_pass(xs: &[f32]) -> usize {
            let mut best: Option<usize> = None;
            for (i, &x) in xs.iter().enumerate() {
                if !x.is_nan() && best.is_none_or(|b| x > xs[b]) {
                    best = Some(i);
                }
            }
            best.unwrap_or(0)
        }
        let mut rng = SplitMix64(7);
        let pool = [0.0, -0.0, 1.5, -2.0, 1.5, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 3.25, -7.0];
        for len in [0, 1, 2, 15, 16, 17, 31, 33, 100] {
            for _ in 0..200 {
                let xs: Vec<f32> = (0..len).map(|_| pool[(rng.next_u64() % pool.len() as u64) as usize]).collect();
                assert_eq!(argmax(&xs), one_pass(&xs), "{xs:?}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[-0.0, 0.0]), 0);
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0, 2.0]), 2);
    }

    #[test]
    fn parameters_out_of_range_are_refused() {
        assert!(SamplingParams::default().check().is_ok());
        let ok = SamplingParams { temperature: 0.7, top_p: Some(1.0), repetition_penalty: 1.3, ..params(0.0) };
        assert!(ok.check().is_ok());
        let refused = [
            (SamplingParams { temperature: -1.0, ..params(0.0) }, "temperature -1"),
            (SamplingParams { temperature: f32::NAN, ..params(0.0) }, "temperature NaN"),
            (SamplingParams { top_p: Some(1.5), ..params(0.0) }, "top-p 1.5"),
            (SamplingParams { top_p: Some(0.0), ..params(0.0) }, "top-p 0"),
            (SamplingParams { repetition_penalty: 0.0, ..params(0.0) }, "repetition penalty 0"),
            (SamplingParams { repetition_penalty: f32::INFINITY, ..params(0.0) }, "repetition penalty inf"),
        ];
        for (p, want) in refused {
            let err = p.check().unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..params(0.0) });
        // Token 0 (4.0 -> 2.0) loses to token 1 (3.0); a seen negative logit gets more negative.
        let mut l = [4.0, 3.0, -1.0];
        assert_eq!(s.sample(&mut l, &[0, 2, 0]), 1);
        assert_eq!(l, [2.0, 3.0, -2.0]);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_reproduce() {
        let mut s = Sampler::new(SamplingParams { top_k: Some(1), ..params(1.0) });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 0.5], &[]), 1);
        }
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { seed, ..params(1.0) });
            (0..32).map(|_| s.sample(&mut [0.0, 0.1, 0.2, 0.3], &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities about 0.64, 0.24, 0.09, 0.03: p = 0.8 keeps the first two.
        let mut s = Sampler::new(SamplingParams { top_p: Some(0.8), seed: 3, ..params(1.0) });
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut seen = [false; 4];
        for _ in 0..500 {
            seen[s.sample(&mut logits.clone(), &[]) as usize] = true;
        }
        assert_eq!(seen, [true, true, false, false]);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let mut s = Sampler::new(SamplingParams { seed: 11, ..params(1.0) });
        let logits = [0.0f32, (3.0f32).ln()];
        let ones = (0..4000).filter(|_| s.sample(&mut logits.clone(), &[]) == 1).count();
        // Expected 3000 of 4000; 5 standard deviations is about 140.
        assert!((ones as i64 - 3000).abs() < 140, "{ones}");
    }
}
