//! [`ContextScalingConfig`]: how a model stretches RoPE past its trained context, per load.
//!
//! The facade's view of `strata_models::ContextScaling`: the capacities may be left out and are
//! filled in from the model when it loads (its trained context as `base_capacity`). When given,
//! it overrides the checkpoint's own RoPE scaling. The dynamic algorithms run plain RoPE while a
//! sequence fits `base_capacity` and grow the factor exactly as much as the length needs past
//! it; every request is checked against `max_capacity` before any work.

use strata_models::{ContextScaling, ScalingAlgorithm};

use crate::{Error, Result};

/// The default `max_capacity` of the length-driven algorithms, in multiples of `base_capacity`.
pub const DEFAULT_DYNAMIC_EXPANSION: usize = 4;

/// Context scaling for a model, as given by a user.
#[derive(Clone, Debug, PartialEq)]
pub struct ContextScalingConfig {
    /// none, linear, ntk-dynamic, yarn, yarn-dynamic or llama3.
    pub algorithm: ScalingAlgorithm,
    /// The context the model was trained for. `None`: the model's own (its
    /// `original_max_position_embeddings`, or `max_position_embeddings`).
    pub base_capacity: Option<usize>,
    /// The longest sequence a request may reach. `None`: `base_capacity` for `none`,
    /// [`DEFAULT_DYNAMIC_EXPANSION`] × `base_capacity` for the length-driven algorithms; the
    /// static ones (linear, yarn, llama3), whose factor is `max_capacity / base_capacity`, need it.
    pub max_capacity: Option<usize>,
    /// Whether the factor follows the sequence length. `None`: exactly for the `*-dynamic`
    /// algorithms.
    pub dynamic_expansion: Option<bool>,
}

impl ContextScalingConfig {
    /// `algorithm` with every other setting taken from the model.
    pub fn new(algorithm: ScalingAlgorithm) -> ContextScalingConfig {
        ContextScalingConfig { algorithm, base_capacity: None, max_capacity: None, dynamic_expansion: None }
    }

    /// The settings for a model trained on `trained_context` tokens.
    pub fn resolve(&self, trained_context: usize) -> Result<ContextScaling> {
        let base = self.base_capacity.unwrap_or(trained_context);
        let dynamic = self.dynamic_expansion.unwrap_or(self.algorithm.is_dynamic());
        let max = match (self.max_capacity, self.algorithm) {
            (Some(m), _) => m,
            (None, ScalingAlgorithm::None) => base,
            (None, _) if dynamic => base.saturating_mul(DEFAULT_DYNAMIC_EXPANSION),
            (None, a) => {
                return Err(Error::InvalidInput(format!(
                    "RoPE scaling {} has a fixed factor (max_capacity / base_capacity): give max_capacity \
                     (--max-capacity), e.g. {} for a factor of 2",
                    a.name(),
                    base.saturating_mul(2)
                )));
            }
        };
        if base == 0 || max < base {
            return Err(Error::InvalidInput(format!(
                "context scaling needs 0 < base_capacity <= max_capacity, got base {base} and max {max}"
            )));
        }
        Ok(ContextScaling {
            algorithm: self.algorithm,
            base_capacity: base,
            max_capacity: max,
            dynamic_expansion: dynamic,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_default_from_the_model() {
        let c = ContextScalingConfig::new(ScalingAlgorithm::YarnDynamic).resolve(8192).unwrap();
        assert_eq!((c.base_capacity, c.max_capacity, c.dynamic_expansion), (8192, 32768, true));
        let c = ContextScalingConfig::new(ScalingAlgorithm::None).resolve(2048).unwrap();
        assert_eq!((c.base_capacity, c.max_capacity, c.dynamic_expansion), (2048, 2048, false));
        let c =
            ContextScalingConfig { max_capacity: Some(16384), ..ContextScalingConfig::new(ScalingAlgorithm::Linear) }
                .resolve(8192)
                .unwrap();
        assert_eq!((c.max_capacity, c.dynamic_expansion), (16384, false));
    }

    #[test]
    fn bad_settings_are_errors() {
        let err = ContextScalingConfig::new(ScalingAlgorithm::Llama3).resolve(8192).unwrap_err();
        assert!(err.to_string().contains("--max-capacity"), "{err}");
        let err =
            ContextScalingConfig { max_capacity: Some(100), ..ContextScalingConfig::new(ScalingAlgorithm::NtkDynamic) }
                .resolve(8192)
                .unwrap_err();
        assert!(err.to_string().contains("base_capacity <= max_capacity"), "{err}");
    }
}
