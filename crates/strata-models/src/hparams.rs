//! Hyperparameters of a decoder model, independent of the file they came from.
//!
//! config.json (safetensors checkpoints) and GGUF metadata both convert into [`Hparams`]; the
//! model code reads only this. [`MoeHparams`] holds the Mixture-of-Experts shape.

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
    /// The Mixture-of-Experts shape (`None` for dense models).
    pub moe: Option<MoeHparams>,
}

/// The Mixture-of-Experts shape of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeHparams {
    /// Experts per MoE layer.
    pub num_experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Each expert's MLP width.
    pub expert_intermediate_size: usize,
    /// Whether the chosen experts' weights are divided by their sum (Mixtral always; Qwen's
    /// `norm_topk_prob`).
    pub norm_topk_prob: bool,
    /// The shared expert's MLP width (Qwen2-MoE).
    pub shared_expert_intermediate_size: Option<usize>,
    /// Per layer, whether it is a MoE layer (else a dense MLP of `intermediate_size`).
    pub sparse_layers: Vec<bool>,
    /// Whether the checkpoint uses Mixtral's tensor names (`block_sparse_moe`, `w1/w2/w3`).
    pub mixtral_names: bool,
}

impl MoeHparams {
    /// The MoE shape a config describes, with each family's defaults for absent keys (those of
    /// transformers' `MixtralConfig`, `Qwen2MoeConfig` and `Qwen3MoeConfig`), or `None` for a
    /// dense family (or a Qwen MoE config with `num_experts = 0`, which transformers builds
    /// with dense MLPs only).
    ///
    /// Mixtral: every layer is MoE, experts `intermediate_size` wide, weights always
    /// renormalised. Qwen2-MoE and Qwen3-MoE: layer `i` is MoE when it is not in
    /// `mlp_only_layers` and `(i + 1) % decoder_sparse_step == 0`; experts
    /// `moe_intermediate_size` wide; `norm_topk_prob` (default false) decides the
    /// renormalisation; Qwen2-MoE adds a shared expert.
    pub fn from_config(cfg: &ModelConfig) -> Result<Option<MoeHparams>> {
        let m = &cfg.moe;
        let layers = cfg.num_hidden_layers;
        let (num_experts, top_k, inter, norm, shared, sparse, mixtral_names) = match cfg.family {
            Family::Mixtral => (
                m.num_experts.unwrap_or(8),
                m.num_experts_per_tok.unwrap_or(2),
                cfg.intermediate_size,
                true,
                None,
                vec![true; layers],
                true,
            ),
            Family::Qwen2Moe | Family::Qwen3Moe => {
                let qwen2 = cfg.family == Family::Qwen2Moe;
                let num_experts = m.num_experts.unwrap_or(if qwen2 { 60 } else { 128 });
                let step = m.decoder_sparse_step.unwrap_or(1);
                if step == 0 {
                    return Err(Error::Unsupported("decoder_sparse_step = 0 (transformers divides by it)".into()));
                }
                let sparse: Vec<bool> = (0..layers)
                    .map(|i| num_experts > 0 && !m.mlp_only_layers.contains(&i) && (i + 1) % step == 0)
                    .collect();
                (
                    num_experts,
                    m.num_experts_per_tok.unwrap_or(if qwen2 { 4 } else { 8 }),
                    m.moe_intermediate_size.unwrap_or(if qwen2 { 1408 } else { 768 }),
                    m.norm_topk_prob.unwrap_or(false),
                    qwen2.then(|| m.shared_expert_intermediate_size.unwrap_or(5632)),
                    sparse,
                    false,
                )
            }
            Family::Llama | Family::Mistral | Family::Qwen2 | Family::Qwen3 => return Ok(None),
        };
        if !sparse.contains(&true) {
            return Ok(None);
        }
        if top_k == 0 || top_k > num_experts {
            return Err(Error::Unsupported(format!(
                "num_experts_per_tok = {top_k} is outside 1..={num_experts} (num_experts)"
            )));
        }
        if inter == 0 || shared == Some(0) {
            return Err(Error::Unsupported("an expert MLP width of 0".into()));
        }
        Ok(Some(MoeHparams {
            num_experts,
            top_k,
            expert_intermediate_size: inter,
            norm_topk_prob: norm,
            shared_expert_intermediate_size: shared,
            sparse_layers: sparse,
            mixtral_names,
        }))
    }

    /// Whether layer `i` is a MoE layer.
    pub fn is_sparse(&self, i: usize) -> bool {
        self.sparse_layers.get(i).copied().unwrap_or(false)
    }
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
            moe: MoeHparams::from_config(cfg)?,
        })
    }
}
