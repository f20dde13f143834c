//! Models from GGUF files: hyperparameters from metadata, tensors by their GGUF names.
//!
//! Supports the `llama` architecture (Llama 2/3, Mistral, SmolLM2 and other files converted as
//! Llama), including its Mixture-of-Experts form (Mixtral): `{arch}.expert_count` experts per
//! layer, `{arch}.expert_used_count` per token, the router in `blk.N.ffn_gate_inp` and the
//! experts stacked in `blk.N.ffn_{gate,up,down}_exps` (`[E, I, H]`, `[E, I, H]`, `[E, H, I]`
//! in row-major order), which strata views per expert without a copy. llama.cpp's converter permutes the rows of `attn_q` and `attn_k` within each head so
//! that ggml's interleaved RoPE (pairs `2i, 2i+1`) equals Hugging Face's rotate-half RoPE on the
//! original weights. transformers undoes that permutation when it loads a GGUF; strata instead
//! keeps the weights as stored (zero-copy, still quantized) and applies RoPE in the interleaved
//! layout, which gives the same attention scores.
//!
//! RoPE scaling comes from the metadata llama.cpp's converter writes:
//! `{arch}.rope.scaling.type` (`none`, `linear`, `yarn`), `{arch}.rope.scaling.factor` (or the
//! older `{arch}.rope.scale_linear`), `{arch}.rope.scaling.original_context_length`, and for YaRN
//! `{arch}.rope.scaling.yarn_beta_fast` / `yarn_beta_slow` and an attention factor in
//! `{arch}.rope.scaling.attn_factor` or `yarn_attn_factor` (the converter stores transformers'
//! `attention_factor` there). Llama 3.1 scaling has no metadata: the converter bakes it into a
//! `rope_freqs.weight` tensor of per-frequency divisors, which becomes
//! [`RopeScaling::FreqDivisors`].

use std::path::Path;

use strata_tensor::Tensor;
use strata_tensor::cpu::RopeLayout;

use crate::config::{Family, RopeConfig, RopeScaling};
use crate::decoder::TensorSource;
use crate::gguf::{GgufError, GgufFile};
use crate::hparams::{Hparams, MoeHparams};
use crate::rope::RopeScheme;
use crate::{Error, Result};

/// The GGUF name of a tensor called `hf_name` in a Hugging Face checkpoint. GGUF's stacked
/// expert tensors answer to strata's stacked names
/// `model.layers.N.{mlp,block_sparse_moe}.experts.{gate,up,down}_proj.weight` (see
/// [`crate::moe`]).
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
        // Mixture-of-Experts: the router under either block name, and the experts as stacks.
        "block_sparse_moe.gate" | "mlp.gate" => "ffn_gate_inp",
        "block_sparse_moe.experts.gate_proj" | "mlp.experts.gate_proj" => "ffn_gate_exps",
        "block_sparse_moe.experts.up_proj" | "mlp.experts.up_proj" => "ffn_up_exps",
        "block_sparse_moe.experts.down_proj" | "mlp.experts.down_proj" => "ffn_down_exps",
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
    let context_length = usize_key("context_length")?;
    let scaling = rope_scaling_from_gguf(file, arch, context_length)?;
    let rope = RopeConfig { theta, partial_rotary_factor: rotary_dim as f64 / head_dim as f64, scaling };
    let rope = RopeScheme::new(&rope, head_dim, context_length)?;
    let eos = meta.opt_u64("tokenizer.ggml.eos_token_id")?.map(|v| v as u32);
    let eot = meta.opt_u64("tokenizer.ggml.eot_token_id")?.map(|v| v as u32);
    let mut eos_token_ids: Vec<u32> = eos.into_iter().chain(eot).collect();
    eos_token_ids.dedup();
    let intermediate_size = usize_key("feed_forward_length")?;
    let moe = moe_from_gguf(file, arch, n_layers, intermediate_size)?;
    Ok(Hparams {
        family: if moe.is_some() { Family::Mixtral } else { Family::Llama },
        vocab_size,
        hidden_size: hidden,
        intermediate_size,
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
        rope,
        rope_layout: RopeLayout::Interleaved,
        max_position_embeddings: context_length,
        bos_token_id: meta.opt_u64("tokenizer.ggml.bos_token_id")?.map(|v| v as u32),
        eos_token_ids,
        moe,
    })
}

/// The Mixture-of-Experts shape of a llama-architecture GGUF: `{arch}.expert_count` experts
/// (absent or 0: a dense model) and `{arch}.expert_used_count` per token, every layer sparse,
/// weights renormalised as Mixtral does, experts `{arch}.expert_feed_forward_length` wide when
/// given, else `feed_forward_length`.
fn moe_from_gguf(file: &GgufFile, arch: &str, n_layers: usize, ffn: usize) -> Result<Option<MoeHparams>> {
    let meta = file.metadata();
    let key = |k: &str| format!("{arch}.{k}");
    let experts = meta.opt_u64(&key("expert_count"))?.unwrap_or(0) as usize;
    if experts == 0 {
        return Ok(None);
    }
    let used = match meta.opt_u64(&key("expert_used_count"))? {
        Some(k) => k as usize,
        None => {
            return Err(Error::Unsupported(format!(
                "{}: {} is set but {} is missing",
                file.path().display(),
                key("expert_count"),
                key("expert_used_count")
            )));
        }
    };
    if used == 0 || used > experts {
        return Err(Error::Unsupported(format!(
            "{}: {} = {used} is outside 1..={experts}",
            file.path().display(),
            key("expert_used_count")
        )));
    }
    let inter = meta.opt_u64(&key("expert_feed_forward_length"))?.map_or(ffn, |v| v as usize);
    Ok(Some(MoeHparams {
        num_experts: experts,
        top_k: used,
        expert_intermediate_size: inter,
        norm_topk_prob: true,
        shared_expert_intermediate_size: None,
        sparse_layers: vec![true; n_layers],
        mixtral_names: true,
    }))
}

/// The RoPE scaling a GGUF file's metadata (and `rope_freqs.weight`) describes.
fn rope_scaling_from_gguf(file: &GgufFile, arch: &str, context_length: usize) -> Result<RopeScaling> {
    let meta = file.metadata();
    let key = |k: &str| format!("{arch}.rope.{k}");
    let unsupported = |what: String| Error::Unsupported(format!("{}: {what}", file.path().display()));
    let positive = |name: &str, v: f64| -> Result<f64> {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(unsupported(format!("{name} = {v} is not a positive number")))
        }
    };
    let factor = match meta.opt_f64(&key("scaling.factor"))? {
        Some(f) => Some(positive(&key("scaling.factor"), f)?),
        None => match meta.opt_f64(&key("scale_linear"))? {
            Some(f) => Some(positive(&key("scale_linear"), f)?),
            None => None,
        },
    };
    let kind = match meta.opt_str(&key("scaling.type"))? {
        Some(kind) => kind,
        // Files older than `rope.scaling.type` said linear scaling with `rope.scale_linear` alone.
        None if factor.is_some_and(|f| f != 1.0) => "linear",
        None => "none",
    };
    let divisors = match file.header().tensor_info("rope_freqs.weight") {
        Some(_) => Some(GgufFile::tensor(file, "rope_freqs.weight")?.to_f32_vec()?),
        None => None,
    };
    let scaling = match kind {
        "none" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: factor.unwrap_or(1.0) },
        "yarn" => {
            if let Some(ext) = meta.opt_f64(&key("scaling.yarn_ext_factor"))?
                && ext != 1.0
            {
                return Err(unsupported(format!("YaRN extrapolation mix {ext} (only 1, standard YaRN, is supported)")));
            }
            let attn = meta.opt_f64(&key("scaling.attn_factor"))?;
            let attention_factor = match attn {
                Some(a) => Some(a),
                None => meta.opt_f64(&key("scaling.yarn_attn_factor"))?,
            };
            let original =
                meta.opt_u64(&key("scaling.original_context_length"))?.map_or(context_length, |v| v as usize);
            if original == 0 {
                return Err(unsupported(format!("{} is 0", key("scaling.original_context_length"))));
            }
            let beta = |name: &str, default: f64| -> Result<f64> {
                Ok(meta.opt_f64(&key(name))?.filter(|&b| b != 0.0).unwrap_or(default))
            };
            RopeScaling::Yarn {
                factor: factor.unwrap_or(context_length as f64 / original as f64),
                original_max_position_embeddings: original,
                attention_factor,
                beta_fast: beta("scaling.yarn_beta_fast", 32.0)?,
                beta_slow: beta("scaling.yarn_beta_slow", 1.0)?,
                mscale: None,
                mscale_all_dim: None,
                truncate: true,
            }
        }
        other => return Err(unsupported(format!("GGUF RoPE scaling {other:?} is not supported (none, linear, yarn)"))),
    };
    match (divisors, scaling) {
        (None, scaling) => Ok(scaling),
        (Some(d), RopeScaling::Default) => {
            Ok(RopeScaling::FreqDivisors { divisors: d.into_iter().map(f64::from).collect() })
        }
        (Some(_), other) => Err(unsupported(format!(
            "rope_freqs.weight together with RoPE scaling {:?} is not supported",
            other.rope_type()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::write::GgufWriter;
    use std::sync::Arc;
    use strata_store::planner::UnitKind;
    use strata_store::{ExpertCacheConfig, Residency, Store};

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
        assert_eq!(
            gguf_tensor_name("model.layers.1.block_sparse_moe.gate.weight").unwrap(),
            "blk.1.ffn_gate_inp.weight"
        );
        assert_eq!(gguf_tensor_name("model.layers.1.mlp.gate.weight").unwrap(), "blk.1.ffn_gate_inp.weight");
        assert_eq!(
            gguf_tensor_name("model.layers.2.block_sparse_moe.experts.down_proj.weight").unwrap(),
            "blk.2.ffn_down_exps.weight"
        );
    }

    /// The RoPE scaling of a minimal llama GGUF (context 64, head_dim 8) with `edit` applied.
    fn scaling_of(edit: impl FnOnce(&mut GgufWriter)) -> Result<RopeScaling> {
        let mut w = GgufWriter::new();
        w.set_metadata("general.architecture", "llama");
        w.set_metadata("llama.context_length", 64u32);
        w.set_metadata("llama.embedding_length", 16u32);
        w.set_metadata("llama.attention.head_count", 2u32);
        w.set_metadata("llama.block_count", 1u32);
        w.set_metadata("llama.vocab_size", 10u32);
        w.set_metadata("llama.feed_forward_length", 8u32);
        w.set_metadata("llama.attention.layer_norm_rms_epsilon", 1e-5f32);
        edit(&mut w);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        w.write_file(&path).unwrap();
        let file = GgufFile::open(&path).unwrap();
        let hp = hparams_from_gguf(&file)?;
        Ok(hp.rope.scaling().clone())
    }

    #[test]
    fn rope_scaling_metadata() {
        assert_eq!(scaling_of(|_| {}).unwrap(), RopeScaling::Default);
        let linear = scaling_of(|w| {
            w.set_metadata("llama.rope.scaling.type", "linear");
            w.set_metadata("llama.rope.scaling.factor", 4.0f32);
        });
        assert_eq!(linear.unwrap(), RopeScaling::Linear { factor: 4.0 });
        // Older files: `rope.scale_linear` alone.
        let old = scaling_of(|w| w.set_metadata("llama.rope.scale_linear", 2.0f32));
        assert_eq!(old.unwrap(), RopeScaling::Linear { factor: 2.0 });
        let yarn = scaling_of(|w| {
            w.set_metadata("llama.rope.scaling.type", "yarn");
            w.set_metadata("llama.rope.scaling.factor", 4.0f32);
            w.set_metadata("llama.rope.scaling.original_context_length", 16u32);
            w.set_metadata("llama.rope.scaling.yarn_beta_fast", 8.0f32);
            w.set_metadata("llama.rope.scaling.attn_factor", 1.5f32);
        });
        match yarn.unwrap() {
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 16,
                attention_factor: Some(1.5),
                beta_fast: 8.0,
                beta_slow: 1.0,
                ..
            } => {}
            other => panic!("unexpected {other:?}"),
        }
        let divisors = scaling_of(|w| {
            w.add_tensor("rope_freqs.weight", &Tensor::from_f32(&[1.0, 2.0, 4.0, 4.0], vec![4]).unwrap()).unwrap();
        });
        assert_eq!(divisors.unwrap(), RopeScaling::FreqDivisors { divisors: vec![1.0, 2.0, 4.0, 4.0] });
    }

    /// llama.cpp's permutation of `attn_q`/`attn_k` rows for `heads` heads of `rows / heads`:
    /// within each head, row `2i` takes the original row `i` and row `2i + 1` the original
    /// row `i + head_dim / 2`, so interleaved RoPE on the permuted weights equals rotate-half RoPE
    /// on the original ones.
    fn permute_qk(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
        let head_dim = w.len() / cols / heads;
        let mut out = vec![0f32; w.len()];
        for h in 0..heads {
            for i in 0..head_dim / 2 {
                for (dst, src) in [(2 * i, i), (2 * i + 1, i + head_dim / 2)] {
                    let (d, s) = ((h * head_dim + dst) * cols, (h * head_dim + src) * cols);
                    out[d..d + cols].copy_from_slice(&w[s..s + cols]);
                }
            }
        }
        out
    }

    /// A Mixtral GGUF written from the `mixtral_moe` safetensors fixture (llama architecture,
    /// `expert_count` / `expert_used_count`, the router as `ffn_gate_inp`, the experts stacked in
    /// `ffn_{gate,up,down}_exps`) gives the same logits as the checkpoint it came from.
    #[test]
    fn a_mixtral_gguf_matches_its_safetensors_checkpoint() {
        use crate::decoder::{Decoder, Logits};
        use crate::safetensors::Checkpoint;
        use strata_tensor::DType;

        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mixtral_moe");
        let cfg = crate::ModelConfig::from_dir(&dir).unwrap();
        let want_hp = Hparams::from_config(&cfg).unwrap();
        let moe = want_hp.moe.clone().unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        let (h, hd, e, inter) = (cfg.hidden_size, cfg.head_dim, moe.num_experts, moe.expert_intermediate_size);
        let f32_of = |name: &str| ckpt.tensor_f32_vec(name).unwrap();
        let tensor = |data: &[f32], shape: Vec<usize>| Tensor::from_f32(data, shape).unwrap();

        // The experts' gate and up stacks in `gate_up` (f32, or q4_0: rows of 32), the rest in f32.
        let tmp = tempfile::tempdir().unwrap();
        let write = |gate_up: DType, file_name: &str, used: u32| {
            let mut w = GgufWriter::new();
            w.set_metadata("general.architecture", "llama");
            w.set_metadata("llama.context_length", cfg.max_position_embeddings as u32);
            w.set_metadata("llama.embedding_length", h as u32);
            w.set_metadata("llama.attention.head_count", cfg.num_attention_heads as u32);
            w.set_metadata("llama.attention.head_count_kv", cfg.num_key_value_heads as u32);
            w.set_metadata("llama.attention.key_length", hd as u32);
            w.set_metadata("llama.rope.dimension_count", hd as u32);
            w.set_metadata("llama.rope.freq_base", cfg.rope.theta as f32);
            w.set_metadata("llama.block_count", cfg.num_hidden_layers as u32);
            w.set_metadata("llama.vocab_size", cfg.vocab_size as u32);
            w.set_metadata("llama.feed_forward_length", cfg.intermediate_size as u32);
            w.set_metadata("llama.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps as f32);
            w.set_metadata("llama.expert_count", e as u32);
            w.set_metadata("llama.expert_used_count", used);
            for name in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] {
                let t = ckpt.tensor_aligned(name).unwrap();
                w.add_tensor(gguf_tensor_name(name).unwrap(), &t).unwrap();
            }
            for i in 0..cfg.num_hidden_layers {
                let p = format!("model.layers.{i}");
                for module in [
                    "input_layernorm",
                    "post_attention_layernorm",
                    "self_attn.v_proj",
                    "self_attn.o_proj",
                    "block_sparse_moe.gate",
                ] {
                    let name = format!("{p}.{module}.weight");
                    w.add_tensor(gguf_tensor_name(&name).unwrap(), &ckpt.tensor_aligned(&name).unwrap()).unwrap();
                }
                for (module, heads) in [("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads)] {
                    let name = format!("{p}.self_attn.{module}.weight");
                    let permuted = permute_qk(&f32_of(&name), heads, h);
                    w.add_tensor(gguf_tensor_name(&name).unwrap(), &tensor(&permuted, vec![heads * hd, h])).unwrap();
                }
                for (stacked, per_expert, rows, cols) in
                    [("gate_proj", "w1", inter, h), ("up_proj", "w3", inter, h), ("down_proj", "w2", h, inter)]
                {
                    let data: Vec<f32> = (0..e)
                        .flat_map(|x| f32_of(&format!("{p}.block_sparse_moe.experts.{x}.{per_expert}.weight")))
                        .collect();
                    let name = gguf_tensor_name(&format!("{p}.block_sparse_moe.experts.{stacked}.weight")).unwrap();
                    let dtype = if stacked == "down_proj" { DType::F32 } else { gate_up };
                    w.add_tensor(name, &Tensor::from_f32_as(&data, vec![e, rows, cols], dtype).unwrap()).unwrap();
                }
            }
            let path = tmp.path().join(file_name);
            w.write_file(&path).unwrap();
            path
        };
        let path = write(DType::F32, "mixtral.gguf", moe.top_k as u32);

        let file = GgufFile::open(&path).unwrap();
        let hp = hparams_from_gguf(&file).unwrap();
        assert_eq!(hp.family, Family::Mixtral);
        assert_eq!(hp.moe.as_ref(), Some(&moe));
        let gguf = Decoder::load(hp, &file).unwrap();
        let st = Decoder::load(want_hp, &ckpt).unwrap();
        let ids = [5u32, 17, 90, 3, 44, 61, 2, 78];
        let a = gguf.forward(&ids, &mut gguf.new_cache(), Logits::All).unwrap();
        let b = st.forward(&ids, &mut st.new_cache(), Logits::All).unwrap();
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "GGUF vs safetensors: {diff}");

        // With the gate and up stacks in q4_0, repacking for the CPU kernels reaches the resident
        // experts (gate and up of each expert of each layer): the same logits, bit for bit.
        let quantized = write(DType::Q4_0, "mixtral-q4_0.gguf", moe.top_k as u32);
        let qfile = GgufFile::open(&quantized).unwrap();
        let plain = Decoder::load(hparams_from_gguf(&qfile).unwrap(), &qfile).unwrap();
        let mut repacked = Decoder::load(hparams_from_gguf(&qfile).unwrap(), &qfile).unwrap();
        assert_eq!(repacked.repack_for_cpu().unwrap(), cfg.num_hidden_layers * e * 2);
        for which in [Logits::All, Logits::Last] {
            let want = plain.forward(&ids, &mut plain.new_cache(), which).unwrap();
            let got = repacked.forward(&ids, &mut repacked.new_cache(), which).unwrap();
            assert_eq!(got, want, "{which:?}");
        }

        // Packed for offloading, each expert is a unit of its own, cut out of the stacks; run
        // from an expert cache of two experts, the logits are the same bit for bit.
        let layout = crate::offload::UnitLayout::of(&gguf.hp, &file).unwrap();
        let experts: Vec<_> = layout.units.iter().filter(|u| matches!(u.kind, UnitKind::Expert { .. })).collect();
        assert_eq!(experts.len(), cfg.num_hidden_layers * e);
        assert_eq!(
            experts[1].tensors,
            ["w1", "w3", "w2"].map(|n| format!("model.layers.0.block_sparse_moe.experts.1.{n}.weight"))
        );
        let pack =
            crate::offload::ensure_pack(&gguf.hp, &layout, &file, &path, &tmp.path().join("packs"), None, &mut |_| {})
                .unwrap();
        let residency: Vec<Residency> = layout
            .units
            .iter()
            .map(|u| if matches!(u.kind, UnitKind::Expert { .. }) { Residency::Cached } else { Residency::Resident })
            .collect();
        let largest = pack.manifest().units.iter().map(|u| u.padded_len()).max().unwrap();
        let config = ExpertCacheConfig { bytes: 2 * largest, policy: Box::new(strata_store::planner::Lru::default()) };
        let store = Store::open_with_experts(pack, &residency, 1, Some(config), |_, _| {}).unwrap();
        let placed = Decoder::load_placed(gguf.hp.clone(), Arc::new(store), &layout).unwrap();
        let c = placed.forward(&ids, &mut placed.new_cache(), Logits::All).unwrap();
        assert_eq!(c, a, "experts from the cache");
        let mut cache = placed.new_cache();
        let stepped: Vec<f32> =
            ids.iter().flat_map(|&id| placed.forward(&[id], &mut cache, Logits::Last).unwrap()).collect();
        let mut cache = gguf.new_cache();
        let want: Vec<f32> =
            ids.iter().flat_map(|&id| gguf.forward(&[id], &mut cache, Logits::Last).unwrap()).collect();
        assert_eq!(stepped, want, "decode with experts from the cache");
        let stats = placed.store().unwrap().expert_cache_stats().unwrap();
        assert!(stats.misses > 0 && stats.evictions > 0, "{stats:?}");
        // A bad expert_used_count is refused.
        let bad = write(DType::F32, "mixtral-bad.gguf", 9);
        let err = hparams_from_gguf(&GgufFile::open(&bad).unwrap()).unwrap_err();
        assert!(err.to_string().contains("outside 1..=8"), "{err}");
    }

    #[test]
    fn unsupported_rope_metadata_is_refused() {
        let err = |edit: &dyn Fn(&mut GgufWriter)| scaling_of(edit).unwrap_err().to_string();
        let e = err(&|w| w.set_metadata("llama.rope.scaling.type", "longrope"));
        assert!(e.contains("\"longrope\" is not supported"), "{e}");
        let e = err(&|w| {
            w.set_metadata("llama.rope.scaling.type", "yarn");
            w.set_metadata("llama.rope.scaling.yarn_ext_factor", 0.5f32);
        });
        assert!(e.contains("extrapolation mix 0.5"), "{e}");
        let e = err(&|w| {
            w.set_metadata("llama.rope.scaling.type", "linear");
            w.set_metadata("llama.rope.scaling.factor", 2.0f32);
            w.add_tensor("rope_freqs.weight", &Tensor::from_f32(&[1.0, 2.0], vec![2]).unwrap()).unwrap();
        });
        assert!(e.contains("rope_freqs.weight together with"), "{e}");
        let e = err(&|w| w.set_metadata("llama.rope.scaling.factor", -1.0f32));
        assert!(e.contains("not a positive number"), "{e}");
        // Divisors of the wrong length are refused when the scheme is built.
        let e = err(&|w| {
            w.add_tensor("rope_freqs.weight", &Tensor::from_f32(&[1.0, 2.0, 3.0], vec![3]).unwrap()).unwrap();
        });
        assert!(e.contains("3 divisors for 4 rotated pairs"), "{e}");
    }
}
