//! Per-request context scaling: which RoPE scaling a request runs with, chosen by the caller
//! rather than by the checkpoint.
//!
//! A [`ContextScaling`] names an algorithm, the context the model was trained for
//! (`base_capacity`) and the longest sequence a request may reach (`max_capacity`). When a
//! request carries one, it replaces the checkpoint's own RoPE scaling (see
//! [`crate::rope::RopeScheme::with_context_scaling`]). The scaling factor is a real number:
//!
//! - length-driven (the `*-dynamic` algorithms, or any algorithm with `dynamic_expansion`): a
//!   sequence of `n` tokens runs with factor `max(1, n / base_capacity)`, so a sequence within
//!   the trained context keeps plain RoPE and a longer one is stretched exactly as much as it needs;
//! - static: factor `max_capacity / base_capacity` whatever the length, as a checkpoint's
//!   `rope_scaling` would give.
//!
//! A factor of 1 always means plain RoPE. The algorithms map onto transformers' RoPE types:
//! `linear` divides the frequencies by the factor; `ntk-dynamic` raises the base to
//! `theta * factor^(rot / (rot - 2))` (transformers' `dynamic` type with factor 1 and
//! `max_position_embeddings = base_capacity`); `yarn` and `yarn-dynamic` are transformers' `yarn`
//! with `original_max_position_embeddings = base_capacity` and that factor; `llama3` is
//! transformers' `llama3` likewise. Parameters other than the factor and the original context
//! (YaRN's betas, mscale and truncation; Llama 3's frequency factors) come from the checkpoint's
//! scaling when it is of the same type, else from the published defaults (32 and 1; 1 and 4).

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// A context-scaling algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScalingAlgorithm {
    /// Plain RoPE: no scaling at all, whatever the checkpoint says.
    None,
    /// Position interpolation: frequencies divided by the factor.
    Linear,
    /// Dynamic NTK: the base grows with the sequence length past `base_capacity`.
    NtkDynamic,
    /// YaRN with a static factor (`max_capacity / base_capacity`, or length-driven with
    /// `dynamic_expansion`).
    Yarn,
    /// YaRN with the factor the sequence length needs.
    YarnDynamic,
    /// Llama 3.1's frequency-dependent scaling.
    Llama3,
}

impl ScalingAlgorithm {
    /// Every algorithm, in the order the CLI lists them.
    pub const ALL: [ScalingAlgorithm; 6] = [
        ScalingAlgorithm::None,
        ScalingAlgorithm::Linear,
        ScalingAlgorithm::NtkDynamic,
        ScalingAlgorithm::Yarn,
        ScalingAlgorithm::YarnDynamic,
        ScalingAlgorithm::Llama3,
    ];

    /// The name the CLI and configs use (`none`, `linear`, `ntk-dynamic`, `yarn`,
    /// `yarn-dynamic`, `llama3`).
    pub const fn name(self) -> &'static str {
        match self {
            ScalingAlgorithm::None => "none",
            ScalingAlgorithm::Linear => "linear",
            ScalingAlgorithm::NtkDynamic => "ntk-dynamic",
            ScalingAlgorithm::Yarn => "yarn",
            ScalingAlgorithm::YarnDynamic => "yarn-dynamic",
            ScalingAlgorithm::Llama3 => "llama3",
        }
    }

    /// Whether the algorithm always picks its factor from the sequence length.
    pub const fn is_dynamic(self) -> bool {
        matches!(self, ScalingAlgorithm::NtkDynamic | ScalingAlgorithm::YarnDynamic)
    }
}

impl fmt::Display for ScalingAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ScalingAlgorithm {
    type Err = Error;

    /// Parses a name of [`ScalingAlgorithm::name`], case-insensitively; `dynamic` and `ntk` are
    /// accepted for `ntk-dynamic`, and `_` for `-`.
    fn from_str(s: &str) -> Result<ScalingAlgorithm> {
        let name = s.trim().to_ascii_lowercase().replace('_', "-");
        let found = match name.as_str() {
            "dynamic" | "ntk" => Some(ScalingAlgorithm::NtkDynamic),
            other => ScalingAlgorithm::ALL.into_iter().find(|a| a.name() == other),
        };
        found.ok_or_else(|| Error::InvalidContextScaling {
            what: format!(
                "unknown RoPE scaling algorithm {s:?}; known: {} (or dynamic)",
                ScalingAlgorithm::ALL.map(|a| a.name()).join(", ")
            ),
        })
    }
}

/// How one request scales RoPE past the model's trained context.
#[derive(Clone, Debug, PartialEq)]
pub struct ContextScaling {
    /// The algorithm.
    pub algorithm: ScalingAlgorithm,
    /// The context the model was trained for, in tokens: sequences up to this length run with
    /// plain RoPE under the length-driven algorithms.
    pub base_capacity: usize,
    /// The longest sequence (prompt plus generated tokens) a request may reach; a forward pass
    /// that would pass it is refused before any work with [`Error::ContextTooLong`].
    pub max_capacity: usize,
    /// Whether the factor follows the sequence length (`max(1, len / base_capacity)`) rather than
    /// staying at `max_capacity / base_capacity`. Always in effect for the `*-dynamic`
    /// algorithms.
    pub dynamic_expansion: bool,
}

impl ContextScaling {
    /// `algorithm` between `base_capacity` and `max_capacity`, length-driven exactly when the
    /// algorithm is one of the `*-dynamic` ones.
    pub fn new(algorithm: ScalingAlgorithm, base_capacity: usize, max_capacity: usize) -> ContextScaling {
        ContextScaling { algorithm, base_capacity, max_capacity, dynamic_expansion: algorithm.is_dynamic() }
    }

    /// Checks that the capacities make sense: `0 < base_capacity <= max_capacity`.
    pub fn validate(&self) -> Result<()> {
        if self.base_capacity == 0 {
            return Err(Error::InvalidContextScaling { what: "base_capacity must be positive".into() });
        }
        if self.max_capacity < self.base_capacity {
            return Err(Error::InvalidContextScaling {
                what: format!(
                    "max_capacity {} is below base_capacity {}: a request could not even fill the trained context",
                    self.max_capacity, self.base_capacity
                ),
            });
        }
        Ok(())
    }

    /// Whether the factor follows the sequence length.
    pub fn is_length_driven(&self) -> bool {
        self.dynamic_expansion || self.algorithm.is_dynamic()
    }

    /// The scaling factor for a sequence of `seq_len` tokens (at least 1; exactly 1 means plain
    /// RoPE).
    pub fn factor(&self, seq_len: usize) -> f64 {
        if self.algorithm == ScalingAlgorithm::None {
            return 1.0;
        }
        let target = if self.is_length_driven() { seq_len } else { self.max_capacity };
        (target as f64 / self.base_capacity as f64).max(1.0)
    }

    /// Checks that a sequence of `seq_len` tokens fits in `max_capacity`.
    pub fn check_fits(&self, seq_len: usize) -> Result<()> {
        if seq_len > self.max_capacity {
            return Err(Error::ContextTooLong { tokens: seq_len, max_capacity: self.max_capacity });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_aliases_parse() {
        for a in ScalingAlgorithm::ALL {
            assert_eq!(a.name().parse::<ScalingAlgorithm>().unwrap(), a);
            assert_eq!(a.to_string(), a.name());
        }
        assert_eq!("dynamic".parse::<ScalingAlgorithm>().unwrap(), ScalingAlgorithm::NtkDynamic);
        assert_eq!("YaRN_Dynamic".parse::<ScalingAlgorithm>().unwrap(), ScalingAlgorithm::YarnDynamic);
        let err = "rope".parse::<ScalingAlgorithm>().unwrap_err().to_string();
        assert!(err.contains("yarn-dynamic") && err.contains("\"rope\""), "{err}");
    }

    #[test]
    fn length_driven_factors_are_exactly_what_the_length_needs() {
        let c = ContextScaling::new(ScalingAlgorithm::YarnDynamic, 8192, 32768);
        assert!(c.dynamic_expansion);
        assert_eq!(c.factor(1), 1.0);
        assert_eq!(c.factor(8192), 1.0);
        assert_eq!(c.factor(8193), 8193.0 / 8192.0);
        assert_eq!(c.factor(16384), 2.0);
        assert_eq!(c.factor(20000), 20000.0 / 8192.0);
    }

    #[test]
    fn static_factors_reach_max_capacity() {
        let c = ContextScaling::new(ScalingAlgorithm::Yarn, 4096, 10240);
        assert!(!c.dynamic_expansion);
        assert_eq!(c.factor(10), 2.5);
        assert_eq!(c.factor(10240), 2.5);
        let expanding = ContextScaling { dynamic_expansion: true, ..c.clone() };
        assert_eq!(expanding.factor(10), 1.0);
        assert_eq!(expanding.factor(6144), 1.5);
        let none = ContextScaling::new(ScalingAlgorithm::None, 4096, 10240);
        assert_eq!(none.factor(10000), 1.0);
    }

    #[test]
    fn capacities_are_checked() {
        assert!(ContextScaling::new(ScalingAlgorithm::Linear, 0, 10).validate().is_err());
        assert!(ContextScaling::new(ScalingAlgorithm::Linear, 20, 10).validate().is_err());
        let c = ContextScaling::new(ScalingAlgorithm::Linear, 10, 10);
        c.validate().unwrap();
        c.check_fits(10).unwrap();
        match c.check_fits(11) {
            Err(Error::ContextTooLong { tokens: 11, max_capacity: 10 }) => {}
            other => panic!("expected ContextTooLong, got {other:?}"),
        }
    }
}
