//! Perplexity of a model over a token sequence: how well it predicts each next token, the
//! quality measure for long-context scaling (a RoPE scaling that breaks long-range attention
//! shows up as perplexity rising with the length).
//!
//! The sequence runs as one request, chunk after chunk through the KV cache (planned for the
//! whole length first, so a length-driven RoPE scaling uses the same angles in every chunk, as
//! a one-pass forward would), and only one chunk's logits exist at a time.

use std::time::{Duration, Instant};

use strata_models::Logits;

use crate::model::Model;
use crate::{Error, Result};

/// The default number of tokens per forward pass.
pub const DEFAULT_PERPLEXITY_CHUNK: usize = 512;

/// The result of [`Model::perplexity`].
#[derive(Clone, Debug, PartialEq)]
pub struct Perplexity {
    /// Tokens in the sequence.
    pub tokens: usize,
    /// Predictions scored: every token after the first.
    pub scored: usize,
    /// Mean negative log-likelihood of the scored tokens, in nats.
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
    /// Time spent in forward passes.
    pub elapsed: Duration,
}

impl Model {
    /// The perplexity of `ids` as one sequence: each token after the first is scored by the
    /// log-probability the model gives it from the tokens before it. Runs `chunk` tokens per
    /// forward pass (at least 1) through one KV cache, calling `progress(done, total)` after each.
    pub fn perplexity(&self, ids: &[u32], chunk: usize, mut progress: impl FnMut(usize, usize)) -> Result<Perplexity> {
        if ids.len() < 2 {
            return Err(Error::InvalidInput(format!(
                "perplexity needs at least 2 tokens (the first is only context), got {}",
                ids.len()
            )));
        }
        let chunk = chunk.max(1);
        let vocab = self.decoder().hparams().vocab_size;
        let mut cache = self.new_cache()?;
        self.plan(&mut cache, ids.len())?;
        let start = Instant::now();
        let mut nll = 0f64;
        for (c, piece) in ids.chunks(chunk).enumerate() {
            let logits = self.forward_cached(piece, &mut cache, Logits::All)?;
            let first = c * chunk;
            for (row, logits) in logits.chunks_exact(vocab).enumerate() {
                // Row `row` predicts the token at position first + row + 1.
                if let Some(&next) = ids.get(first + row + 1) {
                    nll -= log_softmax_at(logits, next as usize);
                }
            }
            progress(first + piece.len(), ids.len());
        }
        let scored = ids.len() - 1;
        let mean_nll = nll / scored as f64;
        Ok(Perplexity { tokens: ids.len(), scored, mean_nll, perplexity: mean_nll.exp(), elapsed: start.elapsed() })
    }
}

/// `log softmax(logits)[index]`, accumulated in f64.
fn log_softmax_at(logits: &[f32], index: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[index] as f64 - max - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_matches_the_definition() {
        let logits = [1.0f32, 2.0, 3.0, -1.0];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        for (i, &l) in logits.iter().enumerate() {
            let want = (l as f64).exp().ln() - z.ln();
            assert!((log_softmax_at(&logits, i) - want).abs() < 1e-12);
        }
        // Large logits do not overflow.
        assert!((log_softmax_at(&[1000.0, 1000.0], 0) - 0.5f64.ln()).abs() < 1e-12);
    }
}
