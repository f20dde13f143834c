//! [`MoeConfig`]: how a Mixture-of-Experts model routes tokens at inference, per load; and
//! [`RouterStats`]: what its routers did over a run, with the training losses.
//!
//! The facade's view of `strata_models::MoeOptions`. The routing is the model's own top-k, or
//! dynamic top-k (per token, the fewest experts whose probabilities reach a threshold, between a
//! minimum and `k`); `active_experts` overrides `k`; `capacity_factor` caps the tokens each
//! expert takes in one forward pass. A dense model refuses any setting but the default.
//!
//! [`RouterStats`] condenses a `strata_models::RouterTrace` into the numbers a fine-tuning loop
//! adds to its loss (transformers' load-balancing auxiliary loss, the router z-loss) and the
//! numbers a user reads (tokens per expert and layer, mean experts per token).

use std::path::Path;

use strata_models::{MoeHparams, MoeOptions, RouterTrace, Routing, load_balancing_loss, router_z_loss};

use crate::{Error, Result};

/// Mixture-of-Experts routing for a model, as given by a user. The default is the model's own
/// routing: top-k with its `k`, no capacity limit. Where the experts live is placement
/// ([`crate::OffloadConfig::expert_cache`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MoeConfig {
    /// Plain top-k, or dynamic top-k with its threshold `p` and minimum number of experts.
    pub routing: Routing,
    /// Experts per token instead of the model's `num_experts_per_tok` (for dynamic top-k: the
    /// most a token may get). Must be between 1 and the model's number of experts.
    pub active_experts: Option<usize>,
    /// Each expert takes at most `ceil(capacity_factor * tokens * k / n_experts)` tokens of a
    /// forward pass; an overflowing token goes to its next-best expert with room. `None` is no
    /// limit (infinity), which is exactly plain top-k. The limit applies per forward pass: a
    /// prompt cut into chunks (tiered weights) or decoded token by token is limited per chunk
    /// or per token.
    pub capacity_factor: Option<f32>,
}

impl MoeConfig {
    /// The routing options for `model` (its path, for errors) with the MoE shape `moe` (`None`
    /// for a dense model), checked before any weight is read: a dense model accepts only the
    /// default config, `k` must fit the model's experts, the threshold and capacity must be
    /// positive.
    pub fn options_for(&self, model: &Path, moe: Option<&MoeHparams>) -> Result<MoeOptions> {
        let options = MoeOptions {
            routing: self.routing,
            active_experts: self.active_experts,
            capacity_factor: self.capacity_factor,
        };
        match moe {
            Some(moe) => {
                options.check(moe.num_experts, moe.top_k)?;
                Ok(options)
            }
            None if *self == MoeConfig::default() => Ok(options),
            None => Err(Error::NotMixtureOfExperts {
                model: model.to_path_buf(),
                what: "a MoeConfig other than the default".into(),
            }),
        }
    }
}

/// One MoE layer's routing over a run.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerStats {
    /// The decoder layer.
    pub layer: usize,
    /// Tokens each expert received (after capacity limits), by expert index.
    pub expert_counts: Vec<u64>,
    /// Tokens routed through the layer.
    pub tokens: usize,
    /// Mean experts per token in this layer.
    pub mean_experts_per_token: f64,
    /// Token slots a capacity limit moved to another expert.
    pub reassigned: usize,
    /// Token slots a capacity limit dropped (no expert with room).
    pub dropped: usize,
}

/// What a MoE model's routers did over a run ([`crate::Model::logits_with_router`]).
#[derive(Clone, Debug, PartialEq)]
pub struct RouterStats {
    /// The Switch Transformer load-balancing loss, exactly transformers' `outputs.aux_loss`
    /// (`load_balancing_loss_func` over every layer's router logits with the `k` the model
    /// routes with, not multiplied by `router_aux_loss_coef`): add `coef * aux_loss` to a
    /// fine-tuning loss.
    pub aux_loss: f32,
    /// The ST-MoE router z-loss: the mean over tokens and layers of `logsumexp(logits)^2`.
    pub z_loss: f32,
    /// Mean experts per token over every layer and token (`k` for plain top-k; less with
    /// dynamic top-k or dropped slots).
    pub mean_experts_per_token: f64,
    /// One entry per MoE layer, in layer order.
    pub layers: Vec<LayerStats>,
}

impl RouterStats {
    /// The statistics of `trace`, recorded on a model with `n_experts` experts per layer
    /// routing `top_k` of them per token.
    pub fn from_trace(trace: &RouterTrace, n_experts: usize, top_k: usize) -> Result<RouterStats> {
        let layers = trace
            .layers
            .iter()
            .map(|l| {
                let tokens = l.tokens();
                let experts: u64 = l.active.iter().map(|&a| u64::from(a)).sum();
                LayerStats {
                    layer: l.layer,
                    expert_counts: l.expert_counts.clone(),
                    tokens,
                    mean_experts_per_token: if tokens == 0 { 0.0 } else { experts as f64 / tokens as f64 },
                    reassigned: l.reassigned,
                    dropped: l.dropped,
                }
            })
            .collect();
        Ok(RouterStats {
            aux_loss: load_balancing_loss(trace, n_experts, top_k)?,
            z_loss: router_z_loss(trace),
            mean_experts_per_token: trace.mean_experts_per_token(),
            layers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dense_model_takes_only_the_default() {
        assert_eq!(MoeConfig::default().options_for(Path::new("/m"), None).unwrap(), MoeOptions::default());
        let config = MoeConfig { active_experts: Some(2), ..MoeConfig::default() };
        let err = config.options_for(Path::new("/models/dense"), None).unwrap_err();
        assert!(err.to_string().contains("/models/dense"), "{err}");
        assert!(err.to_string().contains("not a Mixture-of-Experts model"), "{err}");
    }

    #[test]
    fn an_empty_trace_gives_zero_losses() {
        let stats = RouterStats::from_trace(&RouterTrace::new(), 8, 2).unwrap();
        assert_eq!((stats.aux_loss, stats.z_loss, stats.mean_experts_per_token), (0.0, 0.0, 0.0));
        assert!(stats.layers.is_empty());
    }
}
