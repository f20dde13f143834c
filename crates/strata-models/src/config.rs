//! `config.json` parsing: [`ModelConfig`], the architecture-level facts a model needs, read the
//! way Hugging Face transformers (version 5, and the 4.x files still in circulation) reads them.
//!
//! Each family's defaults for absent keys mirror its transformers config class
//! (`LlamaConfig`, `MistralConfig`, `Qwen2Config`, `Qwen3Config`, `MixtralConfig`,
//! `Qwen2MoeConfig`, `Qwen3MoeConfig`; the MoE defaults are applied by
//! [`crate::hparams::MoeHparams::from_config`]). The dimensions (`vocab_size`, `hidden_size`,
//! `intermediate_size`, `num_hidden_layers`, `num_attention_heads`) are required: the class
//! defaults exist for building configs in code, and a checkpoint without them is broken.
//!
//! Facts that transformers derives rather than stores are derived here the same way:
//! - `head_dim`: the key when present and non-null, else `hidden_size / num_attention_heads`,
//!   except for Qwen3 (and Qwen3-MoE), whose class default is 128.
//! - attention biases: Llama's `attention_bias` covers q, k, v and o; Mistral and Mixtral never
//!   have biases (their attention ignores the key); Qwen2 always has q/k/v biases and no o bias
//!   (Qwen2-MoE reads `qkv_bias`, default true); Qwen3's `attention_bias` covers all four.
//! - sliding windows, per layer: Mistral and Mixtral apply `sliding_window` (when non-null) to
//!   every layer. The Qwen families keep it only when `use_sliding_window` is true, and then
//!   follow `layer_types` when present, else transformers' rule: layer `i` slides when
//!   `i >= max_window_layers`.
//! - RoPE: `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (legacy, with
//!   `type` or `rope_type`), normalised as transformers' `convert_rope_params_to_dict` and
//!   `standardize_rope_params` do (see [`RopeConfig`]).

use std::path::Path;

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use strata_tensor::DType;

use crate::error::{ConfigError, Error, Result};

/// A model family: one transformers architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// Llama (1, 2, 3.x) and the many models that reuse its architecture.
    Llama,
    /// Mistral.
    Mistral,
    /// Qwen2 and Qwen2.5.
    Qwen2,
    /// Qwen3 (dense).
    Qwen3,
    /// Mixtral (MoE).
    Mixtral,
    /// Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B).
    Qwen2Moe,
    /// Qwen3-MoE.
    Qwen3Moe,
}

/// The families strata can run: every family it parses, dense and Mixture-of-Experts.
pub const SUPPORTED: &[Family] = &Family::ALL;

impl Family {
    /// Every family whose config strata can parse.
    pub const ALL: [Family; 7] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Mixtral,
        Family::Qwen2Moe,
        Family::Qwen3Moe,
    ];

    /// The `model_type` in config.json.
    pub const fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3Moe => "qwen3_moe",
        }
    }

    /// The causal-LM class name in config.json's `architectures`.
    pub const fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Mixtral => "MixtralForCausalLM",
            Family::Qwen2Moe => "Qwen2MoeForCausalLM",
            Family::Qwen3Moe => "Qwen3MoeForCausalLM",
        }
    }

    /// The family with this `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.model_type() == model_type)
    }

    /// The family with this `architectures` entry.
    pub fn from_architecture(architecture: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.architecture() == architecture)
    }

    /// Whether strata can run this family (it is in [`SUPPORTED`]).
    pub fn is_supported(self) -> bool {
        SUPPORTED.contains(&self)
    }

    /// Whether this is a Mixture-of-Experts family.
    pub const fn is_moe(self) -> bool {
        matches!(self, Family::Mixtral | Family::Qwen2Moe | Family::Qwen3Moe)
    }

    fn default_head_dim(self) -> Option<usize> {
        match self {
            // Qwen3Config declares `head_dim: int = 128`.
            Family::Qwen3 | Family::Qwen3Moe => Some(128),
            _ => None,
        }
    }

    fn default_max_position_embeddings(self) -> usize {
        match self {
            Family::Llama => 2048,
            Family::Mistral | Family::Mixtral => 4096 * 32,
            Family::Qwen2 | Family::Qwen3 | Family::Qwen2Moe | Family::Qwen3Moe => 32768,
        }
    }

    fn default_rms_norm_eps(self) -> f64 {
        match self {
            Family::Mixtral => 1e-5,
            _ => 1e-6,
        }
    }

    /// `tie_word_embeddings` when absent. Every family here defaults to false in transformers
    /// (checked per class); listed per family so that a new one states its own.
    fn default_tie_word_embeddings(self) -> bool {
        match self {
            Family::Llama
            | Family::Mistral
            | Family::Qwen2
            | Family::Qwen3
            | Family::Mixtral
            | Family::Qwen2Moe
            | Family::Qwen3Moe => false,
        }
    }

    /// `(bos, eos)` when the keys are absent (not when they are null).
    fn default_special_tokens(self) -> (Option<u32>, Vec<u32>) {
        match self {
            Family::Llama | Family::Mistral | Family::Mixtral => (Some(1), vec![2]),
            Family::Qwen2 | Family::Qwen3 | Family::Qwen2Moe | Family::Qwen3Moe => (None, vec![]),
        }
    }
}

/// Which attention projections carry a bias.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttentionBias {
    /// The q, k and v projections.
    pub qkv: bool,
    /// The output projection.
    pub o: bool,
}

/// The Mixture-of-Experts fields as written, for the families that have them (all `None` or
/// empty for dense families). [`crate::hparams::MoeHparams::from_config`] applies each family's
/// defaults and rules.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MoeConfig {
    /// Experts per MoE layer: `num_local_experts` (Mixtral) or `num_experts` (Qwen).
    pub num_experts: Option<usize>,
    /// Experts each token is routed to.
    pub num_experts_per_tok: Option<usize>,
    /// Each expert's FFN width (Qwen MoE; Mixtral's experts use `intermediate_size`).
    pub moe_intermediate_size: Option<usize>,
    /// The shared expert's FFN width (Qwen2-MoE).
    pub shared_expert_intermediate_size: Option<usize>,
    /// Every `decoder_sparse_step`-th layer is MoE (Qwen MoE).
    pub decoder_sparse_step: Option<usize>,
    /// Layers that use a dense MLP instead (Qwen MoE).
    pub mlp_only_layers: Vec<usize>,
    /// Whether the top-k routing weights are renormalised to sum to one (Qwen MoE).
    pub norm_topk_prob: Option<bool>,
    /// The load-balancing loss coefficient.
    pub router_aux_loss_coef: Option<f64>,
    /// Router jitter noise (Mixtral; training only).
    pub router_jitter_noise: Option<f64>,
}

/// RoPE parameters, normalised from either spelling.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// The base (`rope_theta`); 10000 when absent, as transformers' `default_theta`.
    pub theta: f64,
    /// The fraction of each head's dimensions that rotate; 1 when absent.
    pub partial_rotary_factor: f64,
    /// The scaling type and its parameters.
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// The number of rotated dimensions for heads of `head_dim`:
    /// `int(head_dim * partial_rotary_factor)`, as transformers computes it.
    pub fn rotary_dim(&self, head_dim: usize) -> usize {
        (head_dim as f64 * self.partial_rotary_factor) as usize
    }
}

/// A RoPE scaling type with its parameters, as transformers' `rope_type`s define them.
///
/// `original_max_position_embeddings` (YaRN, Llama 3, LongRoPE) is taken from the top-level
/// key when the config has one (transformers gives it priority), else from the RoPE
/// parameters, else `max_position_embeddings`.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Unscaled RoPE.
    Default,
    /// Position interpolation: frequencies divided by `factor`.
    Linear {
        /// The scaling factor.
        factor: f64,
    },
    /// Dynamic NTK: the base grows with the sequence length past `max_position_embeddings`.
    Dynamic {
        /// The scaling factor.
        factor: f64,
    },
    /// YaRN.
    Yarn {
        /// The scaling factor.
        factor: f64,
        /// The pre-training context length.
        original_max_position_embeddings: usize,
        /// The cos/sin scale; when `None`, derived from `factor` (and `mscale`,
        /// `mscale_all_dim` when both are set) by the RoPE module.
        attention_factor: Option<f64>,
        /// The extrapolation boundary, in rotations (default 32; 0 also means the default).
        beta_fast: f64,
        /// The interpolation boundary, in rotations (default 1; 0 also means the default).
        beta_slow: f64,
        /// DeepSeek-style `mscale`.
        mscale: Option<f64>,
        /// DeepSeek-style `mscale_all_dim`.
        mscale_all_dim: Option<f64>,
        /// Whether the correction range is rounded to whole dimensions (default true).
        truncate: bool,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// The scaling factor.
        factor: f64,
        /// The pre-training context length.
        original_max_position_embeddings: usize,
        /// The low-frequency wavelength factor.
        low_freq_factor: f64,
        /// The high-frequency wavelength factor.
        high_freq_factor: f64,
    },
    /// Per-frequency divisors (GGUF's `rope_freqs.weight`, which llama.cpp's converter writes for
    /// Llama 3.1 scaling): `inv_freq[i] = theta^(-2i/rot) / divisors[i]`. Never read from
    /// config.json.
    FreqDivisors {
        /// One divisor per rotated pair.
        divisors: Vec<f64>,
    },
    /// LongRoPE (Phi-3 style).
    LongRope {
        /// Per-dimension factors for short contexts.
        short_factor: Vec<f64>,
        /// Per-dimension factors for long contexts.
        long_factor: Vec<f64>,
        /// The scaling factor, if given.
        factor: Option<f64>,
        /// The pre-training context length.
        original_max_position_embeddings: usize,
        /// The cos/sin scale, if given (else derived by the RoPE module).
        attention_factor: Option<f64>,
    },
}

impl RopeScaling {
    /// The RoPE types strata parses.
    pub const TYPES: [&'static str; 6] = ["default", "linear", "dynamic", "yarn", "llama3", "longrope"];

    /// The transformers `rope_type` name (`rope_freqs` for [`RopeScaling::FreqDivisors`], which
    /// only GGUF files have).
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::Default => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Dynamic { .. } => "dynamic",
            RopeScaling::Yarn { .. } => "yarn",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::LongRope { .. } => "longrope",
            RopeScaling::FreqDivisors { .. } => "rope_freqs",
        }
    }
}

/// The architecture facts of a model, from its `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// The family.
    pub family: Family,
    /// `model_type` as written (empty when the config only had `architectures`).
    pub model_type: String,
    /// `architectures` as written.
    pub architectures: Vec<String>,
    /// Vocabulary size: rows of the embedding and of the LM head.
    pub vocab_size: usize,
    /// The residual stream's width.
    pub hidden_size: usize,
    /// The dense MLP's width.
    pub intermediate_size: usize,
    /// The number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than the query heads, MQA when 1).
    pub num_key_value_heads: usize,
    /// Each head's width.
    pub head_dim: usize,
    /// The MLP activation (`hidden_act`, default `silu`).
    pub hidden_act: String,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Which attention projections have biases.
    pub attention_bias: AttentionBias,
    /// Whether the MLP projections have biases (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// Whether q and k go through a per-head RMSNorm before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Each layer's attention window (`None`: full causal attention), one entry per layer.
    pub sliding_windows: Vec<Option<usize>>,
    /// The context length the model was configured for.
    pub max_position_embeddings: usize,
    /// The dtype the weights were saved in (`dtype`, or the older `torch_dtype`), if stated.
    pub dtype: Option<DType>,
    /// The beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// The end-of-sequence tokens (the config may give one id or a list).
    pub eos_token_ids: Vec<u32>,
    /// The padding token.
    pub pad_token_id: Option<u32>,
    /// RoPE parameters.
    pub rope: RopeConfig,
    /// Mixture-of-Experts fields (empty for dense families).
    pub moe: MoeConfig,
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<ModelConfig> {
        ModelConfig::from_file(dir.as_ref().join("config.json"))
    }

    /// Reads a config file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<ModelConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|error| Error::Io { path: path.to_path_buf(), error })?;
        ModelConfig::from_json_str(&text).map_err(|error| Error::Config { path: path.to_path_buf(), error })
    }

    /// Parses config JSON for a family in [`SUPPORTED`].
    pub fn from_json_str(json: &str) -> Result<ModelConfig, ConfigError> {
        parse(json, SUPPORTED)
    }

    /// Query heads sharing each key/value head.
    pub fn kv_group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The width of the concatenated query heads: `num_attention_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// The width of the concatenated key (or value) heads: `num_key_value_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

/// `eos_token_id`: one id or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(i64),
    Many(Vec<i64>),
}

/// config.json as written, every field optional. `Option<Option<T>>` fields tell an absent key
/// (outer `None`) from an explicit null (`Some(None)`), where the family defaults differ.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    rms_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    qkv_bias: Option<bool>,
    mlp_bias: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    sliding_window: Option<Option<usize>>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    layer_types: Option<Vec<String>>,
    dtype: Option<String>,
    torch_dtype: Option<String>,
    #[serde(default, deserialize_with = "present")]
    bos_token_id: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    eos_token_id: Option<Option<TokenIds>>,
    pad_token_id: Option<i64>,
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rope_scaling: Option<Map<String, Value>>,
    rope_parameters: Option<Map<String, Value>>,
    original_max_position_embeddings: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
    norm_topk_prob: Option<bool>,
    router_aux_loss_coef: Option<f64>,
    router_jitter_noise: Option<f64>,
}

/// Deserializes a field that is present (possibly null) as `Some(..)`; with `#[serde(default)]`
/// an absent field stays `None`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> std::result::Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Parses config JSON, accepting the families in `supported`.
fn parse(json: &str, supported: &[Family]) -> Result<ModelConfig, ConfigError> {
    let raw: RawConfig = serde_json::from_str(json).map_err(|e| ConfigError::InvalidJson { what: e.to_string() })?;
    let family = family_of(&raw, supported)?;

    let vocab_size = required(raw.vocab_size, "vocab_size")?;
    let hidden_size = required(raw.hidden_size, "hidden_size")?;
    let intermediate_size = required(raw.intermediate_size, "intermediate_size")?;
    let num_hidden_layers = required(raw.num_hidden_layers, "num_hidden_layers")?;
    let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads")?;
    let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
    if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
        return Err(invalid(
            "num_key_value_heads",
            format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
        ));
    }
    let head_dim = match raw.head_dim.or(family.default_head_dim()) {
        Some(d) => d,
        None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
        None => {
            let what =
                format!("hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}");
            return Err(invalid("head_dim", format!("absent, and {what}")));
        }
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(invalid("head_dim", format!("{head_dim} is not a positive even number")));
    }

    let max_position_embeddings = raw.max_position_embeddings.unwrap_or(family.default_max_position_embeddings());
    let rms_norm_eps = raw.rms_norm_eps.unwrap_or(family.default_rms_norm_eps());
    if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
        return Err(invalid("rms_norm_eps", format!("{rms_norm_eps} is not a finite non-negative number")));
    }

    let attention_bias = match family {
        Family::Llama => {
            let b = raw.attention_bias.unwrap_or(false);
            AttentionBias { qkv: b, o: b }
        }
        Family::Mistral | Family::Mixtral => AttentionBias { qkv: false, o: false },
        Family::Qwen2 => AttentionBias { qkv: true, o: false },
        Family::Qwen2Moe => AttentionBias { qkv: raw.qkv_bias.unwrap_or(true), o: false },
        Family::Qwen3 | Family::Qwen3Moe => {
            let b = raw.attention_bias.unwrap_or(false);
            AttentionBias { qkv: b, o: b }
        }
    };
    let mlp_bias = family == Family::Llama && raw.mlp_bias.unwrap_or(false);
    let qk_norm = matches!(family, Family::Qwen3 | Family::Qwen3Moe);

    let sliding_windows = sliding_windows(&raw, family, num_hidden_layers)?;
    let rope = parse_rope(&raw, max_position_embeddings)?;

    let dtype = match raw.dtype.as_deref().or(raw.torch_dtype.as_deref()) {
        None => None,
        Some("float32") => Some(DType::F32),
        Some("float16") => Some(DType::F16),
        Some("bfloat16") => Some(DType::BF16),
        Some(other) => {
            let field = if raw.dtype.is_some() { "dtype" } else { "torch_dtype" };
            return Err(invalid(field, format!("{other:?} is not float32, float16 or bfloat16")));
        }
    };

    let (default_bos, default_eos) = family.default_special_tokens();
    let bos_token_id = match raw.bos_token_id {
        None => default_bos,
        Some(id) => id.and_then(token_id),
    };
    let eos_token_ids = match raw.eos_token_id {
        None => default_eos,
        Some(None) => vec![],
        Some(Some(TokenIds::One(id))) => token_id(id).into_iter().collect(),
        Some(Some(TokenIds::Many(ids))) => ids.into_iter().filter_map(token_id).collect(),
    };

    let moe = MoeConfig {
        num_experts: raw.num_local_experts.or(raw.num_experts),
        num_experts_per_tok: raw.num_experts_per_tok,
        moe_intermediate_size: raw.moe_intermediate_size,
        shared_expert_intermediate_size: raw.shared_expert_intermediate_size,
        decoder_sparse_step: raw.decoder_sparse_step,
        mlp_only_layers: raw.mlp_only_layers.unwrap_or_default(),
        norm_topk_prob: raw.norm_topk_prob,
        router_aux_loss_coef: raw.router_aux_loss_coef,
        router_jitter_noise: raw.router_jitter_noise,
    };

    for (field, v) in [
        ("vocab_size", vocab_size),
        ("hidden_size", hidden_size),
        ("intermediate_size", intermediate_size),
        ("num_hidden_layers", num_hidden_layers),
        ("num_attention_heads", num_attention_heads),
        ("max_position_embeddings", max_position_embeddings),
    ] {
        if v == 0 {
            return Err(invalid(field, "must be positive".into()));
        }
    }

    Ok(ModelConfig {
        family,
        model_type: raw.model_type.unwrap_or_default(),
        architectures: raw.architectures.unwrap_or_default(),
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        hidden_act: raw.hidden_act.unwrap_or_else(|| "silu".to_owned()),
        rms_norm_eps,
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(family.default_tie_word_embeddings()),
        attention_bias,
        mlp_bias,
        qk_norm,
        sliding_windows,
        max_position_embeddings,
        dtype,
        bos_token_id,
        eos_token_ids,
        pad_token_id: raw.pad_token_id.and_then(token_id),
        rope,
        moe,
    })
}

/// A token id; negative ids (some configs write -1) mean "none".
fn token_id(id: i64) -> Option<u32> {
    u32::try_from(id).ok()
}

fn required(v: Option<usize>, field: &'static str) -> Result<usize, ConfigError> {
    v.ok_or(ConfigError::MissingField { field })
}

fn invalid(field: &'static str, what: String) -> ConfigError {
    ConfigError::InvalidField { field, what }
}

/// The family named by `model_type`, or by `architectures` when `model_type` is absent.
fn family_of(raw: &RawConfig, supported: &[Family]) -> Result<Family, ConfigError> {
    let archs = raw.architectures.as_deref().unwrap_or_default();
    let family = match &raw.model_type {
        Some(t) => Family::from_model_type(t),
        None => archs.iter().find_map(|a| Family::from_architecture(a)),
    };
    match family {
        Some(f) if supported.contains(&f) => Ok(f),
        _ => {
            let mut found = match &raw.model_type {
                Some(t) => format!("model_type {t:?}"),
                None => "no model_type".to_owned(),
            };
            if !archs.is_empty() {
                found.push_str(&format!(" (architectures: {})", archs.join(", ")));
            }
            Err(ConfigError::UnsupportedArchitecture {
                found,
                supported: supported.iter().map(|f| f.model_type()).collect(),
            })
        }
    }
}

/// Each layer's attention window.
fn sliding_windows(raw: &RawConfig, family: Family, layers: usize) -> Result<Vec<Option<usize>>, ConfigError> {
    let windows = match family {
        Family::Llama => vec![None; layers],
        Family::Mistral | Family::Mixtral => {
            // MistralConfig's default is 4096 when the key is absent; Mixtral's is None.
            let default = if family == Family::Mistral { Some(4096) } else { None };
            let window = raw.sliding_window.unwrap_or(default);
            vec![window; layers]
        }
        Family::Qwen2 | Family::Qwen3 | Family::Qwen2Moe | Family::Qwen3Moe => {
            // `__post_init__`: sliding_window = sliding_window if use_sliding_window else None,
            // then layer_types (when not given) marks layers >= max_window_layers as sliding.
            let window =
                if raw.use_sliding_window.unwrap_or(false) { raw.sliding_window.unwrap_or(Some(4096)) } else { None };
            match &raw.layer_types {
                Some(types) => {
                    if types.len() != layers {
                        let what = format!("has {} entries for {layers} layers", types.len());
                        return Err(invalid("layer_types", what));
                    }
                    types
                        .iter()
                        .map(|t| match t.as_str() {
                            "full_attention" => Ok(None),
                            "sliding_attention" => Ok(window),
                            other => Err(invalid("layer_types", format!("unknown layer type {other:?}"))),
                        })
                        .collect::<Result<Vec<_>, _>>()?
                }
                None => {
                    let first_sliding = raw.max_window_layers.unwrap_or(28);
                    (0..layers).map(|i| if i >= first_sliding { window } else { None }).collect()
                }
            }
        }
    };
    if windows.contains(&Some(0)) {
        return Err(invalid("sliding_window", "must be positive".into()));
    }
    Ok(windows)
}

/// Normalises the RoPE parameters from either spelling.
fn parse_rope(raw: &RawConfig, max_position_embeddings: usize) -> Result<RopeConfig, ConfigError> {
    // transformers 5 (`convert_rope_params_to_dict`): a non-empty legacy `rope_scaling` wins
    // over `rope_parameters`; `rope_theta` and `partial_rotary_factor` fill in what the dict
    // lacks.
    let empty = Map::new();
    let params = match (&raw.rope_scaling, &raw.rope_parameters) {
        (Some(s), _) if !s.is_empty() => s,
        (_, Some(p)) => p,
        _ => &empty,
    };
    let rope_type = match params.get("rope_type").or_else(|| params.get("type")) {
        None | Some(Value::Null) => "default".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(ConfigError::Rope { rope_type: other.to_string(), what: "rope_type is not a string".into() });
        }
    };
    let p = RopeParams { params, rope_type: &rope_type };

    if !params.is_empty() && params.keys().all(|k| k == "full_attention" || k == "sliding_attention") {
        return Err(p.error("per-layer-type RoPE parameters are not supported by these families".into()));
    }

    let theta = match p.f64("rope_theta")? {
        Some(t) => t,
        None => raw.rope_theta.unwrap_or(10_000.0),
    };
    if !(theta.is_finite() && theta > 1.0) {
        return Err(p.error(format!("rope_theta {theta} must be a finite number above 1")));
    }
    let partial_rotary_factor = match p.f64("partial_rotary_factor")? {
        Some(f) => f,
        None => raw.partial_rotary_factor.unwrap_or(1.0),
    };
    if !(partial_rotary_factor > 0.0 && partial_rotary_factor <= 1.0) {
        return Err(p.error(format!("partial_rotary_factor {partial_rotary_factor} is not in (0, 1]")));
    }

    // transformers' `standardize_rope_params` gives a top-level key priority, then the dict,
    // then falls back to max_position_embeddings.
    let original_max = || -> Result<usize, ConfigError> {
        Ok(match raw.original_max_position_embeddings {
            Some(v) => v,
            None => p.usize("original_max_position_embeddings")?.unwrap_or(max_position_embeddings),
        })
    };

    let scaling = match rope_type.as_str() {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: p.factor()? },
        "dynamic" => RopeScaling::Dynamic { factor: p.factor()? },
        "yarn" => {
            let nonzero_or = |v: Option<f64>, default: f64| v.filter(|&x| x != 0.0).unwrap_or(default);
            let original = original_max()?;
            // An explicit null factor is the ratio of the two context lengths (DeepSeek-V3 style),
            // as transformers' `_compute_yarn_parameters` derives it; an absent one is an error.
            let factor = match params.get("factor") {
                Some(Value::Null) if original > 0 => {
                    let f = max_position_embeddings as f64 / original as f64;
                    p.check_factor(f)?;
                    f
                }
                _ => p.factor()?,
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                attention_factor: p.f64("attention_factor")?,
                beta_fast: nonzero_or(p.f64("beta_fast")?, 32.0),
                beta_slow: nonzero_or(p.f64("beta_slow")?, 1.0),
                mscale: p.f64("mscale")?,
                mscale_all_dim: p.f64("mscale_all_dim")?,
                truncate: p.bool("truncate")?.unwrap_or(true),
            }
        }
        "llama3" => RopeScaling::Llama3 {
            factor: p.factor()?,
            original_max_position_embeddings: original_max()?,
            low_freq_factor: p.required_f64("low_freq_factor")?,
            high_freq_factor: p.required_f64("high_freq_factor")?,
        },
        "longrope" => {
            let factor = p.f64("factor")?;
            if let Some(f) = factor {
                p.check_factor(f)?;
            }
            RopeScaling::LongRope {
                short_factor: p.list("short_factor")?,
                long_factor: p.list("long_factor")?,
                factor,
                original_max_position_embeddings: original_max()?,
                attention_factor: p.f64("attention_factor")?,
            }
        }
        _ => {
            let what = format!("unknown rope_type; known: {}", RopeScaling::TYPES.join(", "));
            return Err(p.error(what));
        }
    };
    if let RopeScaling::Llama3 { original_max_position_embeddings: 0, .. }
    | RopeScaling::Yarn { original_max_position_embeddings: 0, .. }
    | RopeScaling::LongRope { original_max_position_embeddings: 0, .. } = scaling
    {
        return Err(p.error("original_max_position_embeddings must be positive".into()));
    }
    Ok(RopeConfig { theta, partial_rotary_factor, scaling })
}

/// Typed access to a RoPE parameter dict, with errors naming the RoPE type.
struct RopeParams<'a> {
    params: &'a Map<String, Value>,
    rope_type: &'a str,
}

impl RopeParams<'_> {
    fn error(&self, what: String) -> ConfigError {
        ConfigError::Rope { rope_type: self.rope_type.to_owned(), what }
    }

    /// A number, or `None` when absent or null.
    fn f64(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.params.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.error(format!("`{key}` is {v}, expected a number"))),
            },
        }
    }

    fn required_f64(&self, key: &str) -> Result<f64, ConfigError> {
        self.f64(key)?.ok_or_else(|| self.error(format!("missing required parameter `{key}`")))
    }

    /// A non-negative integer (an integral float is accepted), or `None` when absent or null.
    fn usize(&self, key: &str) -> Result<Option<usize>, ConfigError> {
        match self.params.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                let n = v.as_u64().or_else(|| v.as_f64().filter(|x| x.fract() == 0.0 && *x >= 0.0).map(|x| x as u64));
                match n.and_then(|n| usize::try_from(n).ok()) {
                    Some(n) => Ok(Some(n)),
                    None => Err(self.error(format!("`{key}` is {v}, expected a non-negative integer"))),
                }
            }
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.params.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.error(format!("`{key}` is {v}, expected a boolean"))),
        }
    }

    fn list(&self, key: &str) -> Result<Vec<f64>, ConfigError> {
        match self.params.get(key) {
            None | Some(Value::Null) => Err(self.error(format!("missing required parameter `{key}`"))),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_f64().ok_or_else(|| self.error(format!("`{key}` holds {v}, expected numbers"))))
                .collect(),
            Some(v) => Err(self.error(format!("`{key}` is {v}, expected a list of numbers"))),
        }
    }

    /// The required `factor`, which must be a positive finite number.
    fn factor(&self) -> Result<f64, ConfigError> {
        let f = self.required_f64("factor")?;
        self.check_factor(f)?;
        Ok(f)
    }

    fn check_factor(&self, f: f64) -> Result<(), ConfigError> {
        if f > 0.0 { Ok(()) } else { Err(self.error(format!("factor {f} must be positive"))) }
    }
}

#[cfg(test)]
mod tests;
