//! Models from GGUF files: hyperparameters from metadata, tensors by their GGUF names.
//!
//! Supports the `llama` architecture (Llama 2/3, Mistral, SmolLM2 and other files converted as
//! Llama). llama.cpp's converter permutes the rows of `attn_q` and `attn_k` within each head so
//! that ggml's interleaved RoPE (pairs `2i, 2i+1`) equals Hugging Face's rotate-half RoPE on the
//! original weights. transformers undoes that permutation when it loads a GGUF; strata instead
//! keeps the weights as stored (zero-copy, still quantized) and applies RoPE in the interleaved
//! layout, which gives the same attention scores.

use std::path::Path;

use strata_tensor::Tensor;
use strata_tensor::cpu::RopeLayout;

use crate::config::{Family, RopeConfig, RopeScaling};
use crate::decoder::TensorSource;
use crate::gguf::{GgufError, GgufFile};
use crate::hparams::Hparams;
use crate::rope::rope_table;
use crate::{Error, Result};

/// The GGUF name of a tensor called `hf_name` in a Hugging Face checkpoint.
pub fn gguf_tensor_name(hf_name: &str) -> Option<String> {
    let fixed = match hf_name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let gguf_module = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{gguf_module}.{suffix}"))
}

impl TensorSource for GgufFile {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        let gguf_name = gguf_tensor_name(name)
            .ok_or_else(|| Error::Unsupported(format!("no GGUF name is known for tensor {name}")))?;
        Ok(GgufFile::tensor(self, &gguf_name)?)
    }

    fn contains(&self, name: &str) -> bool {
        gguf_tensor_name(name).is_some_and(|g| self.header().tensor_info(&g).is_some())
    }

    fn location(&self) -> &Path {
        self.path()
    }
}

/// The hyperparameters of a GGUF model from its metadata.
pub fn hparams_from_gguf(file: &GgufFile) -> Result<Hparams> {
    let meta = file.metadata();
    let arch = meta.get_str("general.architecture")?;
    if arch != "llama" {
        return Err(Error::Unsupported(format!(
            "{}: GGUF architecture {arch:?} is not supported (supported: llama)",
            file.path().display()
        )));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let usize_key = |k: &str| -> Result<usize, GgufError> { Ok(meta.get_u64(&key(k))? as usize) };
    let hidden = usize_key("embedding_length")?;
    let n_heads = usize_key("attention.head_count")?;
    let n_kv_heads = meta.opt_u64(&key("attention.head_count_kv"))?.map_or(n_heads, |v| v as usize);
    let head_dim = meta.opt_u64(&key("attention.key_length"))?.map_or(hidden / n_heads.max(1), |v| v as usize);
    let rotary_dim = meta.opt_u64(&key("rope.dimension_count"))?.map_or(head_dim, |v| v as usize);
    let n_layers = usize_key("block_count")?;
    let vocab_size = match meta.opt_u64(&key("vocab_size"))? {
        Some(v) => v as usize,
        None => file.tensor_info("token_embd.weight")?.shape()[0],
    };
    let theta = meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10000.0);
    let scaling = match meta.opt_str(&key("rope.scaling.type"))? {
        None | Some("none") => RopeScaling::Default,
        Some("linear") => RopeScaling::Linear { factor: meta.get_f64(&key("rope.scaling.factor"))? },
        Some(other) => {
            return Err(Error::Unsupported(format!(
                "{}: GGUF RoPE scaling {other:?} is not supported yet",
                file.path().display()
            )));
        }
    };
    let rope = RopeConfig { theta, partial_rotary_factor: rotary_dim as f64 / head_dim as f64, scaling };
    let table = rope_table(&rope, head_dim)?;
    let eos = meta.opt_u64("tokenizer.ggml.eos_token_id")?.map(|v| v as u32);
    let eot = meta.opt_u64("tokenizer.ggml.eot_token_id")?.map(|v| v as u32);
    let mut eos_token_ids: Vec<u32> = eos.into_iter().chain(eot).collect();
    eos_token_ids.dedup();
    Ok(Hparams {
        family: Family::Llama,
        vocab_size,
        hidden_size: hidden,
        intermediate_size: usize_key("feed_forward_length")?,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim,
        rms_norm_eps: meta.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
        qkv_bias: file.header().tensor_info("blk.0.attn_q.bias").is_some(),
        o_bias: file.header().tensor_info("blk.0.attn_output.bias").is_some(),
        mlp_bias: false,
        qk_norm: false,
        tie_embeddings: file.header().tensor_info("output.weight").is_none(),
        layer_windows: vec![None; n_layers],
        rope_inv_freq: table.inv_freq,
        rope_attention_factor: table.attention_factor,
        rope_layout: RopeLayout::Interleaved,
        max_position_embeddings: usize_key("context_length")?,
        bos_token_id: meta.opt_u64("tokenizer.ggml.bos_token_id")?.map(|v| v as u32),
        eos_token_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_gguf() {
        assert_eq!(gguf_tensor_name("model.embed_tokens.weight").unwrap(), "token_embd.weight");
        assert_eq!(gguf_tensor_name("model.layers.12.self_attn.q_proj.weight").unwrap(), "blk.12.attn_q.weight");
        assert_eq!(gguf_tensor_name("model.layers.0.self_attn.k_proj.bias").unwrap(), "blk.0.attn_k.bias");
        assert_eq!(gguf_tensor_name("model.layers.3.mlp.down_proj.weight").unwrap(), "blk.3.ffn_down.weight");
        assert_eq!(
            gguf_tensor_name("model.layers.3.post_attention_layernorm.weight").unwrap(),
            "blk.3.ffn_norm.weight"
        );
        assert!(gguf_tensor_name("model.layers.3.mlp.experts.0.w1.weight").is_none());
    }
}
