//! Hyperparameters of a decoder model, independent of the file they came from.
//!
//! config.json (safetensors checkpoints) and GGUF metadata both convert into [`Hparams`]; the
//! model code reads only this.

use strata_tensor::cpu::RopeLayout;

use crate::config::{Family, ModelConfig};
use crate::rope::RopeScheme;
use crate::{Error, Result};

/// Everything the decoder needs to know about a model's shape.
#[derive(Clone, Debug)]
pub struct Hparams {
    /// The family.
    pub family: Family,
    /// Vocabulary size (rows of the embedding and the output head).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (fewer than `n_heads` with grouped-query attention).
    pub n_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f32,
    /// Whether q, k and v projections have biases.
    pub qkv_bias: bool,
    /// Whether the attention output projection has a bias.
    pub o_bias: bool,
    /// Whether the MLP projections have biases.
    pub mlp_bias: bool,
    /// Whether queries and keys are RMS-normalised per head before RoPE.
    pub qk_norm: bool,
    /// Whether the output head shares the embedding matrix.
    pub tie_embeddings: bool,
    /// The attention window of each layer (`None`: full causal attention).
    pub layer_windows: Vec<Option<usize>>,
    /// RoPE: the configured scaling, as a table for any sequence length.
    pub rope: RopeScheme,
    /// Which elements RoPE pairs.
    pub rope_layout: RopeLayout,
    /// The context length the model was trained for.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token, if the model has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
}

impl Hparams {
    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// The hyperparameters of a Hugging Face checkpoint's config.json.
    pub fn from_config(cfg: &ModelConfig) -> Result<Hparams> {
        if cfg.family.is_moe() {
            return Err(Error::Unsupported(format!(
                "{} (Mixture-of-Experts) models are not supported yet",
                cfg.family.model_type()
            )));
        }
        if cfg.hidden_act != "silu" {
            return Err(Error::Unsupported(format!(
                "activation {:?}: strata's MLP implements silu (SwiGLU) only",
                cfg.hidden_act
            )));
        }
        let rope = RopeScheme::new(&cfg.rope, cfg.head_dim, cfg.max_position_embeddings)?;
        Ok(Hparams {
            family: cfg.family,
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            n_layers: cfg.num_hidden_layers,
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            rms_norm_eps: cfg.rms_norm_eps as f32,
            qkv_bias: cfg.attention_bias.qkv,
            o_bias: cfg.attention_bias.o,
            mlp_bias: cfg.mlp_bias,
            qk_norm: cfg.qk_norm,
            tie_embeddings: cfg.tie_word_embeddings,
            layer_windows: cfg.sliding_windows.clone(),
            rope,
            rope_layout: RopeLayout::RotateHalf,
            max_position_embeddings: cfg.max_position_embeddings,
            bos_token_id: cfg.bos_token_id,
            eos_token_ids: cfg.eos_token_ids.clone(),
        })
    }
}
