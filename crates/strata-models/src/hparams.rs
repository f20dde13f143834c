//! Hyperparameters of a decoder model, independent of the file they came from.
//!
//! config.json (safetensors checkpoints) and GGUF metadata both convert into [`Hparams`]; the
//! model code reads only this.

use strata_tensor::cpu::RopeLayout;

/// A supported model family. All share one decoder implementation; the family decides
/// optional parts (biases, q/k norms) and tensor names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Llama 2/3, TinyLlama, SmolLM2.
    Llama,
    /// Mistral (sliding-window attention).
    Mistral,
    /// Qwen2 (q/k/v biases).
    Qwen2,
    /// Qwen3 (q/k RMSNorm, explicit head_dim).
    Qwen3,
}

impl Family {
    /// The `model_type` string of config.json.
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }
}

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
    /// Whether queries and keys are RMS-normalised per head before RoPE.
    pub qk_norm: bool,
    /// Whether the output head shares the embedding matrix.
    pub tie_embeddings: bool,
    /// The attention window of each layer (`None`: full causal attention).
    pub layer_windows: Vec<Option<usize>>,
    /// RoPE inverse frequencies (one per rotated pair).
    pub rope_inv_freq: Vec<f32>,
    /// Factor applied to RoPE's cos and sin (1 unless a scaling type asks otherwise).
    pub rope_attention_factor: f32,
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
}
