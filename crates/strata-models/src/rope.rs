//! RoPE frequency tables for every scaling type, as a function of the sequence length.
//!
//! A [`RopeScheme`] holds a model's RoPE configuration (from config.json or GGUF metadata) and,
//! optionally, a per-request [`ContextScaling`] that replaces the checkpoint's scaling. Asked for
//! the [`RopeTable`] of a sequence of `n` tokens, it returns `inv_freq` (one frequency per rotated
//! pair) and the attention factor that multiplies cos and sin.
//!
//! Each checkpoint scaling type is computed as transformers 5 computes it in
//! `modeling_rope_utils.py` and the `@dynamic_rope_update` of its rotary embeddings, down to
//! which quantities are f32 tensors and which are Python (f64) floats, so that tables agree to
//! the last bit or two:
//!
//! - `default`: `inv_freq[i] = 1 / theta^(2i / rot)` in f32.
//! - `linear`: the default divided by `factor`.
//! - `dynamic` (NTK): for `n > max_position_embeddings` the base becomes
//!   `theta * (factor * n / max_position_embeddings - (factor - 1))^(rot / (rot - 2))`; shorter
//!   sequences keep the default table. `n` is the whole sequence (transformers uses
//!   `max(position_ids) + 1`), so every position of a sequence shares one table.
//! - `yarn`: frequencies blended between interpolation (`/ factor`) and extrapolation by a linear
//!   ramp over the dimensions whose rotation counts within `original_max_position_embeddings` lie
//!   between `beta_slow` and `beta_fast` (ramp ends floored/ceiled when `truncate`); attention
//!   factor `attention_factor`, else `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` when
//!   both are set, else `0.1 ln(factor) + 1` (1 when `factor <= 1`).
//! - `llama3`: wavelengths above `original / low_freq_factor` divided by `factor`, below
//!   `original / high_freq_factor` kept, smoothly interpolated between.
//! - `longrope`: `inv_freq[i] = 1 / (ext[i] * theta^(2i / rot))` with `ext` the long factors when
//!   `n > original_max_position_embeddings`, else the short ones; the attention factor (the same for
//!   every length) is `attention_factor`, else `sqrt(1 + ln(factor) / ln(original))` with `factor`
//!   defaulting to `max_position_embeddings / original` (1 when `factor <= 1`).
//! - GGUF's `rope_freqs.weight` divisors: the default divided by each pair's divisor.
//!
//! Tables that change with the length are the reason the KV cache records the table its keys
//! were rotated with and re-rotates them when it changes (see [`rerotation`]).

use std::f64::consts::PI;

use crate::config::{RopeConfig, RopeScaling};
use crate::context::{ContextScaling, ScalingAlgorithm};
use crate::{Error, Result};

/// A RoPE table: what `strata_tensor::cpu::rope_qk` needs besides positions.
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
    inv_freq_with_base(theta as f32, rotary_dim)
}

/// `1 / base^(2i / rotary_dim)` for an f32 base.
fn inv_freq_with_base(base: f32, rotary_dim: usize) -> Vec<f32> {
    (0..rotary_dim / 2).map(|i| 1.0 / base.powf(exponent(i, rotary_dim))).collect()
}

/// `2i / rotary_dim` in f32, as `arange(0, dim, 2).float() / dim`.
fn exponent(i: usize, rotary_dim: usize) -> f32 {
    (2 * i) as f32 / rotary_dim as f32
}

/// A model's RoPE: its configuration, the context it was configured for, an optional
/// per-request [`ContextScaling`] that replaces the configured scaling, and an optional cap on
/// the sequence length. Cheap to clone.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeScheme {
    theta: f64,
    rotary_dim: usize,
    max_position_embeddings: usize,
    scaling: RopeScaling,
    context: Option<ContextScaling>,
    /// A cap on the sequence length set by the caller ([`RopeScheme::with_limit`]), enforced
    /// besides the context scaling's `max_capacity`.
    limit: Option<usize>,
}

impl RopeScheme {
    /// The scheme of a model whose heads are `head_dim` wide and whose configuration says
    /// `max_position_embeddings`. Fails on parameters no table can be computed from (factor
    /// lists of the wrong length, a dynamic base with fewer than 4 rotated dimensions).
    pub fn new(cfg: &RopeConfig, head_dim: usize, max_position_embeddings: usize) -> Result<RopeScheme> {
        let rotary_dim = cfg.rotary_dim(head_dim);
        let scheme = RopeScheme {
            theta: cfg.theta,
            rotary_dim,
            max_position_embeddings,
            scaling: cfg.scaling.clone(),
            context: None,
            limit: None,
        };
        let bad = |what: String| Err(Error::Unsupported(format!("RoPE scaling {}: {what}", cfg.scaling.rope_type())));
        let pairs = rotary_dim / 2;
        match &cfg.scaling {
            RopeScaling::Dynamic { .. } if rotary_dim <= 2 => {
                return bad(format!("the dynamic base needs more than 2 rotated dimensions, not {rotary_dim}"));
            }
            RopeScaling::LongRope { short_factor, long_factor, .. } => {
                for (name, list) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                    if list.len() != pairs {
                        return bad(format!("{name} has {} entries for {pairs} rotated pairs", list.len()));
                    }
                    if list.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
                        return bad(format!("{name} holds a factor that is not a positive number"));
                    }
                }
            }
            RopeScaling::FreqDivisors { divisors } => {
                if divisors.len() != pairs {
                    return bad(format!("{} divisors for {pairs} rotated pairs", divisors.len()));
                }
                if divisors.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
                    return bad("a divisor is not a positive number".into());
                }
            }
            _ => {}
        }
        Ok(scheme)
    }

    /// This scheme with `context` replacing the configured scaling (`None`: back to the
    /// checkpoint's own).
    pub fn with_context_scaling(&self, context: Option<ContextScaling>) -> Result<RopeScheme> {
        if let Some(c) = &context {
            c.validate()?;
            if c.algorithm == ScalingAlgorithm::NtkDynamic && self.rotary_dim <= 2 {
                return Err(Error::InvalidContextScaling {
                    what: format!("ntk-dynamic needs more than 2 rotated dimensions, not {}", self.rotary_dim),
                });
            }
        }
        Ok(RopeScheme { context, ..self.clone() })
    }

    /// This scheme with requests capped at `limit` tokens (prompt plus generated), whatever the
    /// scaling (`None`: no cap beyond the context scaling's `max_capacity`). It changes no angle:
    /// it lets a caller bound the KV cache, as a memory ceiling needs.
    pub fn with_limit(&self, limit: Option<usize>) -> RopeScheme {
        RopeScheme { limit, ..self.clone() }
    }

    /// The RoPE base (`rope_theta`).
    pub fn theta(&self) -> f64 {
        self.theta
    }

    /// The number of rotated dimensions per head.
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim
    }

    /// The checkpoint's scaling.
    pub fn scaling(&self) -> &RopeScaling {
        &self.scaling
    }

    /// The per-request scaling that replaces the checkpoint's, if any.
    pub fn context_scaling(&self) -> Option<&ContextScaling> {
        self.context.as_ref()
    }

    /// The context the model was trained for: `original_max_position_embeddings` for the
    /// scaling types that have one, else `max_position_embeddings`. The natural
    /// `base_capacity` of a [`ContextScaling`].
    pub fn trained_context(&self) -> usize {
        match &self.scaling {
            RopeScaling::Yarn { original_max_position_embeddings: o, .. }
            | RopeScaling::Llama3 { original_max_position_embeddings: o, .. }
            | RopeScaling::LongRope { original_max_position_embeddings: o, .. } => *o,
            _ => self.max_position_embeddings,
        }
    }

    /// The longest sequence a request may reach: the smaller of the context scaling's
    /// `max_capacity` and the cap of [`RopeScheme::with_limit`] (`None`: unbounded).
    pub fn max_capacity(&self) -> Option<usize> {
        match (self.context.as_ref().map(|c| c.max_capacity), self.limit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Checks that a sequence of `seq_len` tokens is allowed ([`Error::ContextTooLong`] past
    /// [`RopeScheme::max_capacity`]).
    pub fn check_fits(&self, seq_len: usize) -> Result<()> {
        match self.max_capacity() {
            Some(max_capacity) if seq_len > max_capacity => {
                Err(Error::ContextTooLong { tokens: seq_len, max_capacity })
            }
            _ => Ok(()),
        }
    }

    /// Whether the table depends on the sequence length.
    pub fn is_length_dependent(&self) -> bool {
        match &self.context {
            Some(c) => c.algorithm != ScalingAlgorithm::None && c.is_length_driven(),
            None => matches!(self.scaling, RopeScaling::Dynamic { .. } | RopeScaling::LongRope { .. }),
        }
    }

    /// The table for a sequence of `seq_len` tokens (all of them: the tokens already in the
    /// cache plus those being fed).
    pub fn table(&self, seq_len: usize) -> RopeTable {
        match &self.context {
            Some(c) => self.context_table(c, seq_len),
            None => self.checkpoint_table(&self.scaling, self.max_position_embeddings, seq_len),
        }
    }

    /// The table a per-request scaling gives at `seq_len`.
    fn context_table(&self, c: &ContextScaling, seq_len: usize) -> RopeTable {
        let factor = c.factor(seq_len);
        if factor <= 1.0 {
            return self.plain();
        }
        let base = c.base_capacity;
        let scaling = match c.algorithm {
            ScalingAlgorithm::None => return self.plain(),
            ScalingAlgorithm::Linear => RopeScaling::Linear { factor },
            ScalingAlgorithm::NtkDynamic => {
                // The base that transformers' dynamic type gives with factor 1 and
                // max_position_embeddings = base_capacity: theta * (n / base)^(rot / (rot - 2)).
                let inv_freq = ntk_inv_freq(self.theta, self.rotary_dim, 1.0, base, seq_len);
                return RopeTable { inv_freq, attention_factor: 1.0 };
            }
            ScalingAlgorithm::Yarn | ScalingAlgorithm::YarnDynamic => match &self.scaling {
                RopeScaling::Yarn { beta_fast, beta_slow, mscale, mscale_all_dim, truncate, .. } => RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: base,
                    attention_factor: None,
                    beta_fast: *beta_fast,
                    beta_slow: *beta_slow,
                    mscale: *mscale,
                    mscale_all_dim: *mscale_all_dim,
                    truncate: *truncate,
                },
                _ => RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: base,
                    attention_factor: None,
                    beta_fast: 32.0,
                    beta_slow: 1.0,
                    mscale: None,
                    mscale_all_dim: None,
                    truncate: true,
                },
            },
            ScalingAlgorithm::Llama3 => {
                let (low_freq_factor, high_freq_factor) = match &self.scaling {
                    RopeScaling::Llama3 { low_freq_factor, high_freq_factor, .. } => {
                        (*low_freq_factor, *high_freq_factor)
                    }
                    _ => (1.0, 4.0),
                };
                RopeScaling::Llama3 {
                    factor,
                    original_max_position_embeddings: base,
                    low_freq_factor,
                    high_freq_factor,
                }
            }
        };
        self.checkpoint_table(&scaling, base, seq_len)
    }

    /// Unscaled RoPE with this scheme's base.
    fn plain(&self) -> RopeTable {
        RopeTable { inv_freq: default_inv_freq(self.theta, self.rotary_dim), attention_factor: 1.0 }
    }

    /// The table of a transformers scaling type at `seq_len`, for a model configured for
    /// `max_position_embeddings`.
    fn checkpoint_table(&self, scaling: &RopeScaling, max_position_embeddings: usize, seq_len: usize) -> RopeTable {
        let (theta, dim) = (self.theta, self.rotary_dim);
        let (inv_freq, attention_factor) = match scaling {
            RopeScaling::Default => (default_inv_freq(theta, dim), 1.0),
            RopeScaling::Linear { factor } => {
                (default_inv_freq(theta, dim).into_iter().map(|f| f / *factor as f32).collect(), 1.0)
            }
            RopeScaling::Dynamic { factor } => {
                (ntk_inv_freq(theta, dim, *factor, max_position_embeddings, seq_len), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let ramp = YarnRamp {
                    beta_fast: *beta_fast,
                    beta_slow: *beta_slow,
                    original: *original_max_position_embeddings,
                    truncate: *truncate,
                };
                let af = attention_factor.unwrap_or_else(|| match (mscale, mscale_all_dim) {
                    (Some(m), Some(m_all)) if *m != 0.0 && *m_all != 0.0 => {
                        yarn_mscale(*factor, *m) / yarn_mscale(*factor, *m_all)
                    }
                    _ => yarn_mscale(*factor, 1.0),
                });
                (yarn_inv_freq(theta, dim, *factor, &ramp), af)
            }
            RopeScaling::Llama3 { factor, original_max_position_embeddings, low_freq_factor, high_freq_factor } => (
                llama3_inv_freq(
                    theta,
                    dim,
                    *factor,
                    *original_max_position_embeddings,
                    *low_freq_factor,
                    *high_freq_factor,
                ),
                1.0,
            ),
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                factor,
                original_max_position_embeddings: original,
                attention_factor,
            } => {
                let factor = factor.unwrap_or(max_position_embeddings as f64 / *original as f64);
                let af = attention_factor.unwrap_or_else(|| {
                    if factor <= 1.0 { 1.0 } else { (1.0 + factor.ln() / (*original as f64).ln()).sqrt() }
                });
                let ext = if seq_len > *original { long_factor } else { short_factor };
                let base = theta as f32;
                let inv_freq =
                    ext.iter().enumerate().map(|(i, e)| 1.0 / (*e as f32 * base.powf(exponent(i, dim)))).collect();
                (inv_freq, af)
            }
            RopeScaling::FreqDivisors { divisors } => {
                (default_inv_freq(theta, dim).into_iter().zip(divisors).map(|(f, d)| f / *d as f32).collect(), 1.0)
            }
        };
        RopeTable { inv_freq, attention_factor: attention_factor as f32 }
    }
}

/// Dynamic NTK frequencies for a sequence of `seq_len` tokens. Within `max_position_embeddings`
/// the plain table (transformers keeps its init-time table, whose base works out to `theta`);
/// beyond, the grown base computed in f32 as transformers' forward does (its `seq_len` is then
/// a tensor, so `factor * seq_len / max_pos - (factor - 1)` and the power are f32 operations).
fn ntk_inv_freq(theta: f64, dim: usize, factor: f64, max_position_embeddings: usize, seq_len: usize) -> Vec<f32> {
    if seq_len <= max_position_embeddings {
        return default_inv_freq(theta, dim);
    }
    let scaled = factor as f32 * seq_len as f32 / max_position_embeddings as f32 - (factor - 1.0) as f32;
    let power = (dim as f64 / (dim as f64 - 2.0)) as f32;
    let base = theta as f32 * scaled.powf(power);
    inv_freq_with_base(base, dim)
}

/// `get_mscale` of transformers' YaRN: `0.1 * mscale * ln(scale) + 1`, or 1 when `scale <= 1`.
fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 { 1.0 } else { 0.1 * mscale * scale.ln() + 1.0 }
}

/// Where YaRN's ramp between interpolated and extrapolated frequencies lies.
struct YarnRamp {
    beta_fast: f64,
    beta_slow: f64,
    original: usize,
    truncate: bool,
}

/// YaRN frequencies: f32 tensors blended with a ramp whose ends are Python floats.
fn yarn_inv_freq(theta: f64, dim: usize, factor: f64, ramp: &YarnRamp) -> Vec<f32> {
    // The dimension (in 0..dim) at which a frequency turns `rotations` times over the original
    // context: dim * ln(original / (rotations * 2 pi)) / (2 ln theta).
    let correction_dim =
        |rotations: f64| dim as f64 * (ramp.original as f64 / (rotations * 2.0 * PI)).ln() / (2.0 * theta.ln());
    let (mut low, mut high) = (correction_dim(ramp.beta_fast), correction_dim(ramp.beta_slow));
    if ramp.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let low = low.max(0.0);
    let mut high = high.min((dim - 1) as f64);
    if low == high {
        // transformers' guard against a zero-width ramp.
        high += 0.001;
    }
    let (low32, width32) = (low as f32, (high - low) as f32);
    let base = theta as f32;
    let factor32 = factor as f32;
    (0..dim / 2)
        .map(|i| {
            let pos_freq = base.powf(exponent(i, dim));
            let extrapolation = 1.0 / pos_freq;
            let interpolation = 1.0 / (factor32 * pos_freq);
            let ramp = ((i as f32 - low32) / width32).clamp(0.0, 1.0);
            let extrapolation_factor = 1.0 - ramp;
            interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
        })
        .collect()
}

/// Llama 3.1 frequencies, with transformers' f32 tensor arithmetic.
fn llama3_inv_freq(theta: f64, dim: usize, factor: f64, original: usize, low: f64, high: f64) -> Vec<f32> {
    let low_freq_wavelen = (original as f64 / low) as f32;
    let high_freq_wavelen = (original as f64 / high) as f32;
    let (factor32, original32, low32, span32) = (factor as f32, original as f32, low as f32, (high - low) as f32);
    let two_pi = (2.0 * PI) as f32;
    default_inv_freq(theta, dim)
        .into_iter()
        .map(|f| {
            let wavelen = two_pi / f;
            let scaled = if wavelen > low_freq_wavelen { f / factor32 } else { f };
            // transformers' `~(wavelen < high) * ~(wavelen > low)`; wavelengths are never NaN.
            let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
            if medium {
                let smooth = (original32 / wavelen - low32) / span32;
                (1.0 - smooth) * scaled / factor32 + smooth * scaled
            } else {
                scaled
            }
        })
        .collect()
}

/// The cosines and sines (`[positions.len(), n_freq]` each, as `strata_tensor::cpu::rope_rotate`
/// takes them) that turn keys rotated with `from` into keys rotated with `to`, for the tokens at
/// `positions`: pair `i` at position `p` turns by `angle_to - angle_from`, with each angle the
/// f32 product `p as f32 * inv_freq[i]` that the forward pass uses, and is scaled by
/// `to.attention_factor / from.attention_factor`. The difference, its cosine and sine are
/// taken in f64, so the keys land on the new angles as closely as f32 storage allows.
pub fn rerotation(
    from: &RopeTable,
    to: &RopeTable,
    positions: std::ops::Range<usize>,
    cos: &mut Vec<f32>,
    sin: &mut Vec<f32>,
) {
    debug_assert_eq!(from.inv_freq.len(), to.inv_freq.len());
    let scale = f64::from(to.attention_factor) / f64::from(from.attention_factor);
    cos.clear();
    sin.clear();
    for pos in positions {
        let p = pos as f32;
        for (f_from, f_to) in from.inv_freq.iter().zip(&to.inv_freq) {
            let delta = f64::from(p * f_to) - f64::from(p * f_from);
            let (s, c) = delta.sin_cos();
            cos.push((c * scale) as f32);
            sin.push((s * scale) as f32);
        }
    }
}

#[cfg(test)]
mod tests;
