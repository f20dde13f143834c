//! The Llama-family decoder shared by Llama, Mistral, Qwen2 and Qwen3.
//!
//! Mirrors transformers' `LlamaForCausalLM` (and the Mistral/Qwen2/Qwen3 variants, which differ
//! only in optional parts): token embedding, then per layer
//! `x += o_proj(attention(rope(norm_qk(q_proj(rmsnorm(x)))), rope(norm_qk(k_proj(..))), v_proj(..)))`
//! and `x += down_proj(silu(gate_proj(rmsnorm(x))) * up_proj(rmsnorm(x)))`, a final RMSNorm and
//! the output head. One attention, one MLP, one RMSNorm and one RoPE serve every family.
//!
//! Mixture-of-Experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) replace the MLP of their sparse
//! layers by a [`MoeLayer`] (router + experts, see [`crate::moe`]); the rest of the layer is the
//! same.

use std::path::Path;

use strata_tensor::Tensor;
use strata_tensor::cpu::{self, AttentionParams};

use crate::context::ContextScaling;
use crate::hparams::Hparams;
use crate::kv_cache::{DEFAULT_BLOCK_LEN, KvCache, RopeUpdate};
use crate::moe::{Mlp, MoeLayer, MoeOptions, RouterTrace, load_moe_layer};
use crate::rope::{RopeScheme, RopeTable};
use crate::{Error, Result};

/// Where weights come from: a safetensors checkpoint, a GGUF file, or (later) the store.
/// Names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`).
pub trait TensorSource {
    /// The tensor called `name`.
    fn tensor(&self, name: &str) -> Result<Tensor>;
    /// Whether a tensor called `name` exists.
    fn contains(&self, name: &str) -> bool;
    /// Where the tensors come from, for error messages.
    fn location(&self) -> &Path;
}

/// A linear layer `y = x W^T + b` with `W` stored `[out, in]` in any dtype.
#[derive(Clone, Debug)]
pub struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Vec<f32>>,
}

impl Linear {
    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.shape().dims()[0]
    }

    /// `out[t, out_features] = x[t, in_features] W^T + b`.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        let n = self.out_features();
        if out.len() == n {
            cpu::matvec(&self.weight, x, out)?;
        } else {
            cpu::matmul(x, &self.weight, out)?;
        }
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(n) {
                cpu::add(row, b)?;
            }
        }
        Ok(())
    }

    /// Bytes of weights and bias.
    pub fn byte_len(&self) -> usize {
        self.weight.byte_len() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
}

/// One decoder layer's weights.
#[derive(Clone, Debug)]
pub struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) q_norm: Option<Vec<f32>>,
    pub(crate) k_norm: Option<Vec<f32>>,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) ffn: Ffn,
}

/// A layer's feed-forward block. One per layer, so the variants' size difference (a few hundred
/// bytes) costs nothing worth a box.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Ffn {
    /// A dense SwiGLU MLP.
    Dense(Mlp),
    /// A sparse Mixture-of-Experts block.
    Moe(MoeLayer),
}

impl Ffn {
    /// Bytes of all its weights.
    pub fn byte_len(&self) -> usize {
        match self {
            Ffn::Dense(mlp) => mlp.byte_len(),
            Ffn::Moe(moe) => moe.byte_len(),
        }
    }
}

/// Which positions' logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Every position: `[tokens, vocab]`.
    All,
    /// Only the last position: `[vocab]`.
    Last,
}

/// A loaded decoder model.
#[derive(Debug)]
pub struct Decoder {
    pub(crate) hp: Hparams,
    pub(crate) embed: Tensor,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Vec<f32>,
    pub(crate) lm_head: Tensor,
    /// The RoPE scheme of caches from [`Decoder::new_cache`]: the checkpoint's, or with the
    /// context scaling set by [`Decoder::set_context_scaling`].
    rope: RopeScheme,
    /// The MoE routing options of every forward pass (see [`Decoder::set_moe_options`]).
    moe: MoeOptions,
}

impl Decoder {
    /// Loads every weight the hyperparameters call for from `src`, checking each tensor's shape.
    pub fn load(hp: Hparams, src: &dyn TensorSource) -> Result<Decoder> {
        let (h, q, kv, inter) = (hp.hidden_size, hp.q_dim(), hp.kv_dim(), hp.intermediate_size);
        let loader = Loader { src };
        let embed = loader.matrix("model.embed_tokens.weight", hp.vocab_size, h)?;
        let lm_head = if hp.tie_embeddings && !src.contains("lm_head.weight") {
            embed.clone()
        } else {
            loader.matrix("lm_head.weight", hp.vocab_size, h)?
        };
        let mut layers = Vec::with_capacity(hp.n_layers);
        for i in 0..hp.n_layers {
            let p = format!("model.layers.{i}");
            let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
                let weight = loader.matrix(&format!("{p}.{name}.weight"), out, inp)?;
                let bias = if bias { Some(loader.vector(&format!("{p}.{name}.bias"), out)?) } else { None };
                Ok(Linear { weight, bias })
            };
            layers.push(Layer {
                attn_norm: loader.vector(&format!("{p}.input_layernorm.weight"), h)?,
                q: linear("self_attn.q_proj", q, h, hp.qkv_bias)?,
                k: linear("self_attn.k_proj", kv, h, hp.qkv_bias)?,
                v: linear("self_attn.v_proj", kv, h, hp.qkv_bias)?,
                o: linear("self_attn.o_proj", h, q, hp.o_bias)?,
                q_norm: if hp.qk_norm {
                    Some(loader.vector(&format!("{p}.self_attn.q_norm.weight"), hp.head_dim)?)
                } else {
                    None
                },
                k_norm: if hp.qk_norm {
                    Some(loader.vector(&format!("{p}.self_attn.k_norm.weight"), hp.head_dim)?)
                } else {
                    None
                },
                ffn_norm: loader.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                ffn: match &hp.moe {
                    Some(moe) if moe.is_sparse(i) => Ffn::Moe(load_moe_layer(&loader, &p, h, moe)?),
                    _ => Ffn::Dense(Mlp::new(
                        linear("mlp.gate_proj", inter, h, hp.mlp_bias)?,
                        linear("mlp.up_proj", inter, h, hp.mlp_bias)?,
                        linear("mlp.down_proj", h, inter, hp.mlp_bias)?,
                    )),
                },
            });
        }
        let norm = loader.vector("model.norm.weight", h)?;
        let rope = hp.rope.clone();
        Ok(Decoder { hp, embed, layers, norm, lm_head, rope, moe: MoeOptions::default() })
    }

    /// The hyperparameters.
    pub fn hparams(&self) -> &Hparams {
        &self.hp
    }

    /// An empty KV cache for this model, with the model's RoPE scheme (its context scaling, if
    /// [`Decoder::set_context_scaling`] set one).
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.hp.n_layers, self.hp.n_kv_heads, self.hp.head_dim, DEFAULT_BLOCK_LEN)
            .with_rope_scheme(self.rope.clone())
    }

    /// An empty KV cache for one request that runs with `scaling` instead of the model's own
    /// RoPE scaling (`None`: the checkpoint's scaling, whatever the model's default is).
    pub fn new_cache_with_scaling(&self, scaling: Option<ContextScaling>) -> Result<KvCache> {
        let scheme = self.hp.rope.with_context_scaling(scaling)?;
        Ok(KvCache::new(self.hp.n_layers, self.hp.n_kv_heads, self.hp.head_dim, DEFAULT_BLOCK_LEN)
            .with_rope_scheme(scheme))
    }

    /// Makes `scaling` the context scaling of every cache [`Decoder::new_cache`] makes from now
    /// on, replacing the checkpoint's RoPE scaling (`None`: back to the checkpoint's).
    pub fn set_context_scaling(&mut self, scaling: Option<ContextScaling>) -> Result<()> {
        self.rope = self.hp.rope.with_context_scaling(scaling)?;
        Ok(())
    }

    /// Makes `options` the Mixture-of-Experts routing of every forward pass from now on
    /// (checked against the model: [`Error::InvalidMoeOptions`] when they do not fit, or when
    /// the model is dense and the options are not the default).
    pub fn set_moe_options(&mut self, options: MoeOptions) -> Result<()> {
        match &self.hp.moe {
            Some(moe) => {
                options.check(moe.num_experts, moe.top_k)?;
            }
            None if options != MoeOptions::default() => {
                return Err(Error::InvalidMoeOptions { what: "the model has no Mixture-of-Experts layers".into() });
            }
            None => {}
        }
        self.moe = options;
        Ok(())
    }

    /// The Mixture-of-Experts routing options.
    pub fn moe_options(&self) -> &MoeOptions {
        &self.moe
    }

    /// The RoPE scheme [`Decoder::new_cache`] gives its caches.
    pub fn rope_scheme(&self) -> &RopeScheme {
        &self.rope
    }

    /// Checks, before any work, that feeding `new_tokens` more tokens through `cache` stays
    /// within the request's `max_capacity` ([`Error::ContextTooLong`] otherwise). A generation
    /// can call it with the prompt length plus the tokens it may generate.
    pub fn check_capacity(&self, cache: &KvCache, new_tokens: usize) -> Result<()> {
        let scheme = cache.rope_scheme().unwrap_or(&self.rope);
        scheme.check_fits(cache.len().saturating_add(new_tokens))
    }

    /// Bytes of all weights (the output head counted once when tied).
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.q, &l.k, &l.v, &l.o].iter().map(|x| x.byte_len()).sum::<usize>()
                    + l.ffn.byte_len()
                    + 4 * (l.attn_norm.len() + l.ffn_norm.len())
            })
            .sum();
        let head = if self.hp.tie_embeddings { 0 } else { self.lm_head.byte_len() };
        self.embed.byte_len() + layers + head + 4 * self.norm.len()
    }

    /// Bytes of weights read to decode one token: every layer, the output head, and one row of
    /// the embedding; of a MoE layer, the router, the shared expert and the active experts
    /// (their mean size times the experts per token of the current [`MoeOptions`], the most
    /// for dynamic top-k).
    pub fn weight_bytes_per_token(&self) -> usize {
        let inactive: usize = self
            .layers
            .iter()
            .map(|l| match &l.ffn {
                Ffn::Dense(_) => 0,
                Ffn::Moe(moe) => {
                    let k = self.moe.active_experts.unwrap_or(moe.router().top_k());
                    moe.byte_len() - moe.active_byte_len(k)
                }
            })
            .sum();
        self.weight_bytes() - inactive - self.embed.byte_len()
            + self.embed.row_bytes()
            + if self.hp.tie_embeddings { self.lm_head.byte_len() } else { 0 }
    }

    /// Runs `ids` (the next tokens of the sequence in `cache`) through the model, appending
    /// their keys and values to `cache`, and returns logits as `which` asks.
    ///
    /// RoPE follows the cache's scheme (else the model's): every position of the sequence uses
    /// the table for the sequence's length after this pass (or the cache's planned length, if
    /// longer: see [`Decoder::plan`]). When that table differs from the one the cached tokens
    /// were computed with, the cache's [`RopeUpdate`] policy applies first: recompute the held
    /// tokens with the new table (the default, exact), or re-rotate the cached keys (cheap,
    /// approximate). A sequence that would pass the request's `max_capacity` is refused before
    /// any work.
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache, which: Logits) -> Result<Vec<f32>> {
        self.forward_traced(ids, cache, which, None)
    }

    /// [`Decoder::forward`], appending what every MoE layer's router saw and chose to `trace`
    /// (router logits `[tokens, n_experts]`, expert token counts, experts per token): feed it to
    /// [`crate::load_balancing_loss`] and [`crate::router_z_loss`]. A dense model leaves it empty.
    pub fn forward_with_router(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        which: Logits,
        trace: &mut RouterTrace,
    ) -> Result<Vec<f32>> {
        self.forward_traced(ids, cache, which, Some(trace))
    }

    fn forward_traced(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        which: Logits,
        trace: Option<&mut RouterTrace>,
    ) -> Result<Vec<f32>> {
        let t = ids.len();
        check_ids(&self.hp, ids)?;
        self.check_capacity(cache, t)?;
        let held = cache.len();
        let rope = cache.rope_scheme().unwrap_or(&self.rope).table((held + t).max(cache.planned_length()));
        let rows = match which {
            Logits::All => t,
            Logits::Last => 1,
        };
        if held > 0 && cache.rope_table().is_some_and(|old| *old != rope) {
            match cache.rope_update() {
                RopeUpdate::Recompute => {
                    let all = recompute_ids(cache.token_ids(), held, ids)?;
                    cache.clear();
                    return self.run(&all, cache, &rope, rows, trace);
                }
                RopeUpdate::Rerotate => cache.rerotate_keys(&rope, self.hp.rope_layout)?,
            }
        }
        self.run(ids, cache, &rope, rows, trace)
    }

    /// Checks that a request may reach `total_len` tokens ([`Error::ContextTooLong`] otherwise,
    /// before any work) and plans `cache` for that length: its RoPE table is the one for
    /// `total_len` tokens from the first pass on, so that a length-dependent scaling does not
    /// change while the request decodes (no recompute, no re-rotation) and cached decoding of
    /// the whole request equals a one-pass forward over it. A generation plans the prompt length
    /// plus the tokens it may generate.
    pub fn plan(&self, cache: &mut KvCache, total_len: usize) -> Result<()> {
        cache.rope_scheme().unwrap_or(&self.rope).check_fits(total_len)?;
        cache.set_planned_length(total_len);
        Ok(())
    }

    /// The forward pass proper: `ids` at the positions after the cache's tokens, RoPE with
    /// `rope`, logits for the last `out_rows` positions, MoE routing recorded in `trace`.
    fn run(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        rope: &RopeTable,
        out_rows: usize,
        mut trace: Option<&mut RouterTrace>,
    ) -> Result<Vec<f32>> {
        let hp = &self.hp;
        let t = ids.len();
        let pos0 = cache.len();
        let positions: Vec<usize> = (pos0..pos0 + t).collect();
        cache.set_rope_table(rope);
        let (h, qd, kvd, inter) = (hp.hidden_size, hp.q_dim(), hp.kv_dim(), hp.intermediate_size);

        let mut x = vec![0f32; t * h];
        cpu::embedding(&self.embed, ids, &mut x)?;
        let mut normed = vec![0f32; t * h];
        let mut q = vec![0f32; t * qd];
        let mut k = vec![0f32; t * kvd];
        let mut v = vec![0f32; t * kvd];
        let mut attn = vec![0f32; t * qd];
        let mut proj = vec![0f32; t * h];
        let mut gate = vec![0f32; t * inter];
        let mut up = vec![0f32; t * inter];
        let mut act = vec![0f32; t * inter];
        let mut qk_scratch = Vec::with_capacity(if hp.qk_norm { t * qd } else { 0 });

        for (li, layer) in self.layers.iter().enumerate() {
            cpu::rms_norm(&x, &layer.attn_norm, hp.rms_norm_eps, &mut normed)?;
            // q, k and v read the same input: one fork-join for the three (k and v are small,
            // and three joins in a row leave threads idle at each barrier).
            let (rq, (rk, rv)) = rayon::join(
                || layer.q.forward(&normed, &mut q),
                || rayon::join(|| layer.k.forward(&normed, &mut k), || layer.v.forward(&normed, &mut v)),
            );
            rq.and(rk).and(rv)?;
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                // Per-head RMSNorm of q and k (Qwen3), through one scratch buffer.
                qk_scratch.clear();
                qk_scratch.extend_from_slice(&q);
                cpu::rms_norm(&qk_scratch, qn, hp.rms_norm_eps, &mut q)?;
                qk_scratch.clear();
                qk_scratch.extend_from_slice(&k);
                cpu::rms_norm(&qk_scratch, kn, hp.rms_norm_eps, &mut k)?;
            }
            cpu::rope_qk(
                &mut q,
                &mut k,
                &positions,
                hp.n_heads,
                hp.n_kv_heads,
                hp.head_dim,
                &rope.inv_freq,
                rope.attention_factor,
                hp.rope_layout,
            )?;
            cache.append(li, &k, &v);

            let params = AttentionParams {
                n_heads: hp.n_heads,
                n_kv_heads: hp.n_kv_heads,
                head_dim: hp.head_dim,
                scale: 1.0 / (hp.head_dim as f32).sqrt(),
                sliding_window: hp.layer_windows[li],
            };
            if pos0 == 0 {
                cpu::attention(&q, &k, &v, 0, &params, &mut attn)?;
            } else if t == 1 {
                let (kb, vb) = cache.blocks(li);
                cpu::attention_decode(&q, &kb, &vb, cache.block_len(), pos0 + 1, &params, &mut attn)?;
            } else {
                let (kc, vc) = cache.contiguous(li);
                cpu::attention(&q, &kc, &vc, pos0, &params, &mut attn)?;
            }
            layer.o.forward(&attn, &mut proj)?;
            cpu::add(&mut x, &proj)?;

            cpu::rms_norm(&x, &layer.ffn_norm, hp.rms_norm_eps, &mut normed)?;
            match &layer.ffn {
                Ffn::Dense(mlp) => {
                    let (rg, ru) =
                        rayon::join(|| mlp.gate.forward(&normed, &mut gate), || mlp.up.forward(&normed, &mut up));
                    rg.and(ru)?;
                    cpu::swiglu(&gate, &up, &mut act)?;
                    mlp.down.forward(&act, &mut proj)?;
                }
                Ffn::Moe(moe) => {
                    let record = trace.as_deref_mut().map(|tr| tr.layer_mut(li));
                    moe.forward(&normed, t, &self.moe, &mut proj, record)?;
                }
            }
            cpu::add(&mut x, &proj)?;
        }

        cache.record_ids(ids);
        let rows = &x[(t - out_rows) * h..];
        let n_rows = out_rows;
        let mut final_normed = vec![0f32; rows.len()];
        cpu::rms_norm(rows, &self.norm, hp.rms_norm_eps, &mut final_normed)?;
        let mut logits = vec![0f32; n_rows * hp.vocab_size];
        if n_rows == 1 {
            cpu::matvec(&self.lm_head, &final_normed, &mut logits)?;
        } else {
            cpu::matmul(&final_normed, &self.lm_head, &mut logits)?;
        }
        Ok(logits)
    }
}

/// The ids a recompute runs when the RoPE table changes: the `held` tokens of the cache (whose ids
/// it must know) followed by the new `ids`.
pub(crate) fn recompute_ids(known: &[u32], held: usize, ids: &[u32]) -> Result<Vec<u32>> {
    if known.len() != held {
        return Err(Error::Unsupported(format!(
            "the RoPE table changed but the cache knows {} of its {held} tokens, so it cannot recompute them \
             (keys were appended without their ids; use RopeUpdate::Rerotate)",
            known.len()
        )));
    }
    Ok([known, ids].concat())
}

/// Checks the ids of a forward pass before any work: at least one, each inside the vocabulary.
/// Checked up front, not only by the embedding, so that a recompute never drops a cache for a
/// bad id and no id outside the table reaches a device kernel.
pub(crate) fn check_ids(hp: &Hparams, ids: &[u32]) -> Result<()> {
    if ids.is_empty() {
        return Err(Error::InvalidInput("forward needs at least one token".into()));
    }
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= hp.vocab_size) {
        return Err(Error::InvalidInput(format!("token id {bad} is outside the vocabulary of {}", hp.vocab_size)));
    }
    Ok(())
}

/// Fetches tensors from a source and checks their shapes.
pub(crate) struct Loader<'a> {
    pub(crate) src: &'a dyn TensorSource,
}

impl Loader<'_> {
    /// Whether the source has a tensor called `name`.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.src.contains(name)
    }

    fn get(&self, name: &str) -> Result<Tensor> {
        if !self.src.contains(name) {
            return Err(Error::TensorNotFound {
                checkpoint: self.src.location().to_path_buf(),
                tensor: name.to_string(),
            });
        }
        self.src.tensor(name)
    }

    /// A weight of shape `dims`, kept in its stored dtype.
    pub(crate) fn shaped(&self, name: &str, dims: &[usize]) -> Result<Tensor> {
        let t = self.get(name)?;
        if t.shape().dims() != dims {
            return Err(self.shape_error(name, dims.to_vec(), &t));
        }
        Ok(t)
    }

    /// A 2-D weight `[rows, cols]`, kept in its stored dtype.
    pub(crate) fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Tensor> {
        let t = self.get(name)?;
        if t.shape().dims() != [rows, cols] {
            return Err(self.shape_error(name, vec![rows, cols], &t));
        }
        Ok(t)
    }

    /// A 1-D weight converted to f32 (norms, biases).
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.get(name)?;
        if t.shape().dims() != [len] {
            return Err(self.shape_error(name, vec![len], &t));
        }
        Ok(t.to_f32_vec()?)
    }

    fn shape_error(&self, name: &str, expected: Vec<usize>, t: &Tensor) -> Error {
        Error::TensorShape {
            path: self.src.location().to_path_buf(),
            tensor: name.to_string(),
            expected,
            got: t.shape().dims().to_vec(),
        }
    }
}
