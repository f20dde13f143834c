//! RoPE frequency tables from a model's RoPE configuration.
//!
//! Computes `inv_freq` (one frequency per rotated pair) and the attention factor applied to
//! cos/sin, as transformers' `ROPE_INIT_FUNCTIONS` do. Scaling types whose tables depend on the
//! sequence length are chosen per request by the context-scaling layer built on top of this.

use crate::config::{RopeConfig, RopeScaling};
use crate::{Error, Result};

/// A RoPE table: what `strata_tensor::cpu::rope` needs besides positions.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeTable {
    /// One inverse frequency per rotated pair: `rotary_dim / 2` values.
    pub inv_freq: Vec<f32>,
    /// Multiplies cos and sin.
    pub attention_factor: f32,
}

/// The plain table: `inv_freq[i] = theta^(-2i / rotary_dim)`, computed in f32 as transformers
/// does (`1 / base ** (arange(0, dim, 2).float() / dim)`).
pub fn default_inv_freq(theta: f64, rotary_dim: usize) -> Vec<f32> {
    (0..rotary_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / rotary_dim as f32;
            1.0 / (theta as f32).powf(exponent)
        })
        .collect()
}

/// The table for a static configuration, for a model with `head_dim`-wide heads.
pub fn rope_table(cfg: &RopeConfig, head_dim: usize) -> Result<RopeTable> {
    let rotary_dim = cfg.rotary_dim(head_dim);
    let base = default_inv_freq(cfg.theta, rotary_dim);
    match &cfg.scaling {
        RopeScaling::Default => Ok(RopeTable { inv_freq: base, attention_factor: 1.0 }),
        RopeScaling::Linear { factor } => {
            Ok(RopeTable { inv_freq: base.iter().map(|f| f / *factor as f32).collect(), attention_factor: 1.0 })
        }
        other => Err(Error::Unsupported(format!("RoPE scaling {other:?} is not supported yet"))),
    }
}
