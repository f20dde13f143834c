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
use std::sync::Arc;

use strata_store::{Store, UnitHandle};
use strata_tensor::cpu::{self, AttentionParams};
use strata_tensor::{AlignedBytes, CpuStorage, Tensor};

use crate::context::ContextScaling;
use crate::hparams::Hparams;
use crate::kv_cache::{DEFAULT_BLOCK_LEN, KvCache, RopeUpdate};
use crate::moe::{Experts, Mlp, MoeLayer, MoeOptions, NextLayer, PlacedExperts, RouterTrace, load_moe_layer};
use crate::offload::{
    EMBEDDING_UNIT, HEAD_UNIT, UnitLayout, attention_unit, expert_unit, ffn_down_unit, ffn_unit, ffn_up_unit,
};
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

/// A copy of the CPU weight `w` in memory the kernel can back with huge pages
/// ([`AlignedBytes::zeroed_huge`]), the original's pages released ([`strata_tensor::release_pages`]:
/// a memory-mapped file's are read again if anything touches them), for a weight of at least
/// [`strata_tensor::HUGE_PAGE`] bytes; `None` for a smaller one or one not on the CPU.
fn huge_page_copy(w: &Tensor) -> Result<Option<Tensor>> {
    let Ok(bytes) = w.cpu_bytes() else { return Ok(None) };
    if bytes.len() < strata_tensor::HUGE_PAGE {
        return Ok(None);
    }
    let mut copy = AlignedBytes::zeroed_huge(bytes.len());
    copy.as_mut_slice().copy_from_slice(bytes);
    let copy = Tensor::from_storage(CpuStorage::owned(copy), w.dtype(), w.shape().clone())?;
    strata_tensor::release_pages(bytes);
    Ok(Some(copy))
}

/// A linear layer `y = x W^T + b` with `W` stored `[out, in]` in any dtype.
#[derive(Clone, Debug)]
pub struct Linear {
    pub(crate) weight: Tensor,
    /// `weight` rearranged for the CPU kernels ([`Linear::repack_for_cpu`]), which the forward
    /// pass then reads instead: the products are bit for bit the same.
    pub(crate) repacked: Option<cpu::RepackedWeight>,
    pub(crate) bias: Option<Vec<f32>>,
}

impl Linear {
    /// A linear layer of `weight` `[out, in]` and an optional bias.
    pub fn new(weight: Tensor, bias: Option<Vec<f32>>) -> Linear {
        Linear { weight, repacked: None, bias }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.shape().dims()[0]
    }

    /// Repacks a CPU weight of a dtype the CPU kernels read faster rearranged (`q4_0`, `q4_k`:
    /// [`cpu::RepackedWeight`]) and releases the original's pages (a memory-mapped checkpoint's
    /// are read again from the file if anything else needs them): the same memory, faster
    /// products. Other weights of at least [`strata_tensor::HUGE_PAGE`] bytes are copied, as they
    /// are, into memory the kernel can back with huge pages ([`AlignedBytes::zeroed_huge`]), and
    /// the original's pages released the same way: a memory-mapped file is mapped in 4 KiB pages
    /// for the most part, and streaming weights through them costs TLB misses (the `q8_0`
    /// prefill ran about 5% faster copied). Says whether it repacked the weight now.
    pub fn repack_for_cpu(&mut self) -> Result<bool> {
        if self.repacked.is_some() {
            return Ok(false);
        }
        if !cpu::RepackedWeight::supports(self.weight.dtype()) {
            if let Some(copy) = huge_page_copy(&self.weight)? {
                self.weight = copy;
            }
            return Ok(false);
        }
        let Ok(bytes) = self.weight.cpu_bytes() else { return Ok(false) };
        self.repacked = Some(cpu::RepackedWeight::from_tensor(&self.weight)?);
        strata_tensor::release_pages(bytes);
        Ok(true)
    }

    /// `out[t, out_features] = x[t, in_features] W^T + b`.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        let n = self.out_features();
        match (&self.repacked, out.len() == n) {
            (Some(w), true) => w.matvec(x, out)?,
            (Some(w), false) => w.matmul(x, out)?,
            (None, true) => cpu::matvec(&self.weight, x, out)?,
            (None, false) => cpu::matmul(x, &self.weight, out)?,
        }
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(n) {
                cpu::add(row, b)?;
            }
        }
        Ok(())
    }

    /// The weight bytes a product reads (the repacked ones when repacked), if on the CPU.
    fn cpu_bytes(&self) -> Option<&[u8]> {
        match &self.repacked {
            Some(r) => Some(r.bytes()),
            None => self.weight.cpu_bytes().ok(),
        }
    }

    /// Bytes of weights and bias.
    pub fn byte_len(&self) -> usize {
        self.weight.byte_len() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }

    /// `outs[i] = x layers[i]^T + b_i` for layers that read the same `x` (q, k and v; gate and
    /// up). For one token it is one [`cpu::matvec_many`], which quantizes `x` once and splits the
    /// rows of all the layers into one parallel loop; for several tokens, the layers' products
    /// run side by side. The results are those of [`Linear::forward`] on each.
    pub(crate) fn forward_many(layers: &[&Linear], x: &[f32], outs: &mut [&mut [f32]]) -> Result<()> {
        debug_assert_eq!(layers.len(), outs.len());
        if layers.iter().zip(outs.iter()).all(|(l, out)| out.len() == l.out_features()) {
            let mut products: Vec<(cpu::MatvecWeight<'_>, &mut [f32])> = layers
                .iter()
                .zip(outs.iter_mut())
                .map(|(l, out)| {
                    let w =
                        l.repacked.as_ref().map_or(cpu::MatvecWeight::Tensor(&l.weight), cpu::MatvecWeight::Repacked);
                    (w, &mut **out)
                })
                .collect();
            cpu::matvec_many(x, &mut products)?;
            for (l, out) in layers.iter().zip(outs.iter_mut()) {
                if let Some(b) = &l.bias {
                    cpu::add(out, b)?;
                }
            }
            return Ok(());
        }
        match (layers, outs) {
            ([], []) => Ok(()),
            ([l], [out]) => l.forward(x, out),
            ([l, rest @ ..], [out, outs @ ..]) => {
                let (a, b) = cpu::join(|| l.forward(x, out), || Linear::forward_many(rest, x, outs));
                a.and(b)
            }
            _ => unreachable!("as many outputs as layers"),
        }
    }
}

/// One decoder layer's attention block: its input norm, the q/k/v/o projections and the
/// optional per-head q/k norms (one unit of the offload pack).
#[derive(Clone, Debug)]
pub struct Attention {
    pub(crate) norm: Vec<f32>,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) q_norm: Option<Vec<f32>>,
    pub(crate) k_norm: Option<Vec<f32>>,
}

impl Attention {
    fn byte_len(&self) -> usize {
        [&self.q, &self.k, &self.v, &self.o].iter().map(|x| x.byte_len()).sum::<usize>() + 4 * self.norm.len()
    }
}

/// One decoder layer's feed-forward block: its post-attention norm and the dense MLP or the
/// Mixture-of-Experts block (one unit of the offload pack).
#[derive(Clone, Debug)]
pub struct FeedForward {
    pub(crate) norm: Vec<f32>,
    pub(crate) ffn: Ffn,
}

impl FeedForward {
    fn byte_len(&self) -> usize {
        self.ffn.byte_len() + 4 * self.norm.len()
    }
}

/// A layer's feed-forward block.
// One per layer, built once: the variants' size difference costs a few hundred bytes per layer,
// and boxing either would add an indirection to every forward pass for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
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

/// Weights held in memory for the model's lifetime, or a unit of the store read on each use.
#[derive(Clone, Debug)]
pub enum Slot<T> {
    /// In memory.
    Resident(T),
    /// Streamed: the store's unit index.
    Streamed(usize),
}

impl<T> Slot<T> {
    /// The weights, if resident.
    pub fn resident(&self) -> Option<&T> {
        match self {
            Slot::Resident(t) => Some(t),
            Slot::Streamed(_) => None,
        }
    }
}

/// One decoder layer's weights.
#[derive(Clone, Debug)]
pub struct Layer {
    pub(crate) attn: Slot<Attention>,
    pub(crate) ffn: FfnSlot,
    /// A MoE layer's experts when they are units of the store of their own (the FFN unit then
    /// holds the norm, the router and the shared expert).
    pub(crate) experts: Option<Arc<PlacedExperts>>,
}

/// Where a layer's feed-forward block lives.
// One per layer, built once (as for `Ffn`): boxing a variant would add an indirection to every
// forward pass for a few hundred bytes per layer.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum FfnSlot {
    /// The whole block, resident or streamed as one unit.
    Whole(Slot<FeedForward>),
    /// A dense MLP streamed in three units of the offload pack, run one after the other so that
    /// only one of them needs a staging buffer at a time.
    Split(SplitMlp),
}

/// A dense MLP whose parts are placed one by one.
#[derive(Clone, Debug)]
pub struct SplitMlp {
    /// The post-attention norm and the gate projection.
    pub(crate) gate: Slot<(Vec<f32>, Linear)>,
    /// The up projection.
    pub(crate) up: Slot<Linear>,
    /// The down projection.
    pub(crate) down: Slot<Linear>,
}

impl FfnSlot {
    /// The block, if resident as a whole.
    pub fn resident(&self) -> Option<&FeedForward> {
        match self {
            FfnSlot::Whole(slot) => slot.resident(),
            FfnSlot::Split(_) => None,
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
    pub(crate) lm_head: Slot<Tensor>,
    /// The store streamed units come from (`None`: every weight is resident).
    pub(crate) store: Option<Arc<Store>>,
    /// The RoPE scheme of caches from [`Decoder::new_cache`]: the checkpoint's, or with the
    /// context scaling set by [`Decoder::set_context_scaling`].
    rope: RopeScheme,
    /// The MoE routing options of every forward pass (see [`Decoder::set_moe_options`]).
    moe: MoeOptions,
    /// Whether decode steps read the next MoE layer's guessed experts ahead (see
    /// [`Decoder::set_expert_prefetch`]).
    expert_prefetch: bool,
}

impl Decoder {
    /// Loads every weight the hyperparameters call for from `src`, checking each tensor's shape.
    pub fn load(hp: Hparams, src: &dyn TensorSource) -> Result<Decoder> {
        let loader = Loader { src };
        let embed = loader.matrix("model.embed_tokens.weight", hp.vocab_size, hp.hidden_size)?;
        let lm_head = if hp.tie_embeddings && !src.contains("lm_head.weight") {
            embed.clone()
        } else {
            loader.matrix("lm_head.weight", hp.vocab_size, hp.hidden_size)?
        };
        let mut layers = Vec::with_capacity(hp.n_layers);
        for i in 0..hp.n_layers {
            layers.push(Layer {
                attn: Slot::Resident(load_attention(&hp, i, &loader)?),
                ffn: FfnSlot::Whole(Slot::Resident(load_ffn(&hp, i, &loader, None)?)),
                experts: None,
            });
        }
        let norm = loader.vector("model.norm.weight", hp.hidden_size)?;
        let rope = hp.rope.clone();
        Ok(Decoder {
            hp,
            embed,
            layers,
            norm,
            lm_head: Slot::Resident(lm_head),
            store: None,
            rope,
            moe: MoeOptions::default(),
            expert_prefetch: false,
        })
    }

    /// Loads a model whose weights live in `store`, grouped into units as `layout` says: the
    /// store's resident units become the decoder's resident weights (views of the store's
    /// buffers), its streamed units are read on each use. The layout must be the one the store's
    /// pack was built with (from a checkpoint that [`Decoder::load`] accepted, so shapes hold).
    pub fn load_placed(hp: Hparams, store: Arc<Store>, layout: &UnitLayout) -> Result<Decoder> {
        let unit = |name: &str| {
            store.unit_index(name).ok_or_else(|| {
                Error::Unsupported(format!(
                    "the offload pack {} has no unit {name}",
                    store.pack().data_path().display()
                ))
            })
        };
        let (embed, norm) = match place(&store, unit(EMBEDDING_UNIT)?, |l| {
            Ok((
                l.matrix("model.embed_tokens.weight", hp.vocab_size, hp.hidden_size)?,
                l.vector("model.norm.weight", hp.hidden_size)?,
            ))
        })? {
            Slot::Resident(globals) => globals,
            Slot::Streamed(_) => {
                return Err(Error::Unsupported(
                    "the embedding unit must be resident (one row of it is read per token)".into(),
                ));
            }
        };
        let lm_head = match layout.index(HEAD_UNIT) {
            None => Slot::Resident(embed.clone()),
            Some(_) => place(&store, unit(HEAD_UNIT)?, |l| l.matrix("lm_head.weight", hp.vocab_size, hp.hidden_size))?,
        };
        let mut layers = Vec::with_capacity(hp.n_layers);
        for i in 0..hp.n_layers {
            let attn = place(&store, unit(&attention_unit(i))?, |l| load_attention(&hp, i, l))?;
            let experts = placed_experts(&hp, i, &store, layout)?;
            let ffn = match (layout.index(&ffn_up_unit(i)), layout.index(&ffn_down_unit(i))) {
                (Some(_), Some(_)) => {
                    let parts = [unit(&ffn_unit(i))?, unit(&ffn_up_unit(i))?, unit(&ffn_down_unit(i))?];
                    if parts.iter().any(|u| store.streamed_units().contains(u)) {
                        FfnSlot::Split(SplitMlp {
                            gate: place(&store, parts[0], |l| load_norm_and_gate(&hp, i, l))?,
                            up: place(&store, parts[1], |l| load_mlp_part(&hp, i, MlpPart::Up, l))?,
                            down: place(&store, parts[2], |l| load_mlp_part(&hp, i, MlpPart::Down, l))?,
                        })
                    } else {
                        // All three resident: one block, as if loaded from the checkpoint.
                        let handles = parts.map(|u| store.acquire(u)).into_iter().collect::<Result<Vec<_>, _>>()?;
                        let sources: Vec<UnitSource<'_>> = handles
                            .iter()
                            .map(|handle| UnitSource { handle, location: store.pack().data_path() })
                            .collect();
                        let chain = Chain(sources.iter().map(|s| s as &dyn TensorSource).collect());
                        FfnSlot::Whole(Slot::Resident(load_ffn(&hp, i, &Loader { src: &chain }, None)?))
                    }
                }
                _ => FfnSlot::Whole(place(&store, unit(&ffn_unit(i))?, |l| load_ffn(&hp, i, l, experts.as_ref()))?),
            };
            layers.push(Layer { attn, ffn, experts });
        }
        let rope = hp.rope.clone();
        Ok(Decoder {
            hp,
            embed,
            layers,
            norm,
            lm_head,
            store: Some(store),
            rope,
            moe: MoeOptions::default(),
            expert_prefetch: false,
        })
    }

    /// Repacks the resident projection weights the CPU kernels read faster rearranged
    /// ([`Linear::repack_for_cpu`]: `q4_0` and `q4_k`) of the attention blocks, dense MLPs and
    /// MoE experts (shared ones included), in parallel, and returns how many it repacked; the
    /// other large ones, and a resident output head (with the embedding when they are one
    /// tensor), are copied into huge pages as they are. Logits stay bit for bit the same; the original tensors stay valid (for a CUDA
    /// upload, say) but leave the resident set.
    pub fn repack_for_cpu(&mut self) -> Result<usize> {
        use rayon::prelude::*;
        if let Slot::Resident(head) = &mut self.lm_head {
            let tied = matches!((head.cpu_bytes(), self.embed.cpu_bytes()), (Ok(h), Ok(e)) if std::ptr::eq(h, e));
            if let Some(copy) = huge_page_copy(head)? {
                if tied {
                    self.embed = copy.clone();
                }
                *head = copy;
            }
        }
        let mut linears: Vec<&mut Linear> = Vec::new();
        for layer in &mut self.layers {
            if let Slot::Resident(a) = &mut layer.attn {
                linears.extend([&mut a.q, &mut a.k, &mut a.v, &mut a.o]);
            }
            match &mut layer.ffn {
                FfnSlot::Whole(Slot::Resident(FeedForward { ffn: Ffn::Dense(mlp), .. })) => {
                    linears.extend([&mut mlp.gate, &mut mlp.up, &mut mlp.down]);
                }
                FfnSlot::Whole(Slot::Resident(FeedForward { ffn: Ffn::Moe(moe), .. })) => {
                    linears.extend(moe.resident_linears_mut());
                }
                _ => {}
            }
        }
        linears.into_par_iter().map(|l| l.repack_for_cpu().map(usize::from)).try_reduce(|| 0, |a, b| Ok(a + b))
    }

    /// The store the streamed weights come from, for an offloaded model.
    pub fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    /// A dense MLP placed in three units ([`SplitMlp`]): `proj = down(silu(gate(n)) * up(n))`
    /// with `n` the normed `x`, each projection fetched just before it runs and released after,
    /// so a streamed part holds one staging buffer at a time. The same operations in the same
    /// order as the whole block, so the same result bit for bit.
    fn split_mlp(
        &self,
        mlp: &SplitMlp,
        li: usize,
        x: &[f32],
        normed: &mut [f32],
        [gate, up, act]: [&mut [f32]; 3],
        proj: &mut [f32],
    ) -> Result<()> {
        let hp = &self.hp;
        self.with_slot(
            &mlp.gate,
            |l| load_norm_and_gate(hp, li, l),
            |(norm, gate_proj)| {
                cpu::rms_norm(x, norm, hp.rms_norm_eps, normed)?;
                gate_proj.forward(normed, gate)
            },
        )?;
        self.with_slot(&mlp.up, |l| load_mlp_part(hp, li, MlpPart::Up, l), |w| w.forward(normed, up))?;
        cpu::swiglu(gate, up, act)?;
        self.with_slot(&mlp.down, |l| load_mlp_part(hp, li, MlpPart::Down, l), |w| w.forward(act, proj))
    }

    /// Runs `run` on the weights of `slot`: at once if resident, else on weights `build` makes
    /// from the streamed unit, which goes back to the store's ring when `run` returns.
    fn with_slot<T>(
        &self,
        slot: &Slot<T>,
        build: impl FnOnce(&Loader<'_>) -> Result<T>,
        run: impl FnOnce(&T) -> Result<()>,
    ) -> Result<()> {
        match slot {
            Slot::Resident(t) => run(t),
            Slot::Streamed(unit) => run(&self.fetch(*unit, build)?),
        }
    }

    /// Builds streamed weights from unit `unit` of the store with `build`. The weights view the
    /// unit's buffer, which returns to the store's ring when they are dropped.
    fn fetch<T>(&self, unit: usize, build: impl FnOnce(&Loader<'_>) -> Result<T>) -> Result<T> {
        let store = self.store.as_ref().expect("a decoder with streamed weights has a store");
        build_from(store, unit, build)
    }

    /// Whether a decode step reads ahead the experts the next MoE layer is guessed to pick (its
    /// norm and router run on the residual stream before this layer's FFN), while this layer's
    /// experts compute. Only experts in the store's expert cache are read ahead; a guess never
    /// changes the results. Off by default: a wrong guess costs disk reads, and on the
    /// synthetic Mixtral-shape model of docs/BENCHMARKS.md (random weights) two of three guesses
    /// were wrong.
    pub fn set_expert_prefetch(&mut self, on: bool) {
        self.expert_prefetch = on;
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
        let scheme = self.rope.with_context_scaling(scaling)?;
        Ok(KvCache::new(self.hp.n_layers, self.hp.n_kv_heads, self.hp.head_dim, DEFAULT_BLOCK_LEN)
            .with_rope_scheme(scheme))
    }

    /// Makes `scaling` the context scaling of every cache [`Decoder::new_cache`] makes from now
    /// on, replacing the checkpoint's RoPE scaling (`None`: back to the checkpoint's).
    pub fn set_context_scaling(&mut self, scaling: Option<ContextScaling>) -> Result<()> {
        self.rope = self.rope.with_context_scaling(scaling)?;
        Ok(())
    }

    /// Caps every request of this model at `limit` tokens, prompt plus generated (`None`: no cap
    /// beyond the context scaling's `max_capacity`): a longer one is refused before any work
    /// with [`Error::ContextTooLong`]. A plan under a memory ceiling reserves the KV cache for it.
    pub fn set_max_context(&mut self, limit: Option<usize>) {
        self.rope = self.rope.with_limit(limit);
    }

    /// The longest request this model accepts, prompt plus generated tokens (`None`: no cap).
    pub fn max_context(&self) -> Option<usize> {
        self.rope.max_capacity()
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

    /// Bytes of all weights (the output head counted once when tied), resident or streamed.
    pub fn weight_bytes(&self) -> usize {
        let streamed = |unit: usize| self.store.as_ref().map_or(0, |s| s.pack().manifest().units[unit].len as usize);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let attn = match &l.attn {
                    Slot::Resident(a) => a.byte_len(),
                    Slot::Streamed(u) => streamed(*u),
                };
                let ffn = match &l.ffn {
                    FfnSlot::Whole(Slot::Resident(f)) => f.byte_len(),
                    FfnSlot::Whole(Slot::Streamed(u)) => streamed(*u),
                    FfnSlot::Split(m) => {
                        let gate = match &m.gate {
                            Slot::Resident((norm, gate)) => 4 * norm.len() + gate.byte_len(),
                            Slot::Streamed(u) => streamed(*u),
                        };
                        let linear = |slot: &Slot<Linear>| match slot {
                            Slot::Resident(l) => l.byte_len(),
                            Slot::Streamed(u) => streamed(*u),
                        };
                        gate + linear(&m.up) + linear(&m.down)
                    }
                };
                attn + ffn
            })
            .sum();
        self.embed.byte_len() + layers + self.head_bytes_untied() + 4 * self.norm.len()
    }

    /// Bytes of the output head when it is not the embedding matrix (0 when tied).
    fn head_bytes_untied(&self) -> usize {
        match &self.lm_head {
            Slot::Resident(t) if self.hp.tie_embeddings && shares_bytes(t, &self.embed) => 0,
            Slot::Resident(t) => t.byte_len(),
            Slot::Streamed(u) => self.store.as_ref().map_or(0, |s| s.pack().manifest().units[*u].len as usize),
        }
    }

    /// Bytes of weights read to decode one token: every layer, the output head, and one row of
    /// the embedding; of a MoE layer, the router, the shared expert and the active experts
    /// (their mean size times the experts per token of the current [`MoeOptions`], the most
    /// for dynamic top-k).
    pub fn weight_bytes_per_token(&self) -> usize {
        let head_is_embed = self.head_bytes_untied() == 0;
        let inactive: usize = self
            .layers
            .iter()
            .map(|l| match l.ffn.resident().map(|f| &f.ffn) {
                Some(Ffn::Moe(moe)) => {
                    let k = self.moe.active_experts.unwrap_or(moe.router().top_k());
                    moe.byte_len() - moe.active_byte_len(k)
                }
                _ => 0,
            })
            .sum();
        self.weight_bytes() - inactive - self.embed.byte_len()
            + self.embed.row_bytes()
            + if head_is_embed { self.embed.byte_len() } else { 0 }
    }

    /// Bytes one more active expert per token adds to [`Decoder::weight_bytes_per_token`]: the
    /// mean expert size of each resident MoE layer, summed over those layers (0 for a dense
    /// model). A token that uses `m` experts per layer instead of `k` reads
    /// `weight_bytes_per_token() - (k - m) * bytes_per_active_expert()`.
    pub fn bytes_per_active_expert(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match l.ffn.resident().map(|f| &f.ffn) {
                Some(Ffn::Moe(moe)) => moe.mean_expert_bytes(),
                _ => 0,
            })
            .sum()
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
    /// `rope`, logits for the last `out_rows` positions, MoE routing recorded in `trace`. A decode
    /// step (one token) runs as a [`cpu::with_team`]: its ~4 matvecs per layer are short, and
    /// keeping the pool's workers spinning between them saves each its wake-up.
    fn run(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        rope: &RopeTable,
        out_rows: usize,
        trace: Option<&mut RouterTrace>,
    ) -> Result<Vec<f32>> {
        if ids.len() == 1 {
            cpu::with_team(|| self.run_steps(ids, cache, rope, out_rows, trace))
        } else {
            self.run_steps(ids, cache, rope, out_rows, trace)
        }
    }

    /// [`Decoder::run`]'s body.
    fn run_steps(
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
        let mut attn_out = vec![0f32; t * qd];
        let mut proj = vec![0f32; t * h];
        let mut gate = vec![0f32; t * inter];
        let mut up = vec![0f32; t * inter];
        let mut act = vec![0f32; t * inter];
        let mut qk_scratch = Vec::with_capacity(if hp.qk_norm { t * qd } else { 0 });

        for (li, layer) in self.layers.iter().enumerate() {
            let mut streamed_attn = None;
            let attn = match &layer.attn {
                Slot::Resident(a) => a,
                Slot::Streamed(unit) => &*streamed_attn.insert(self.fetch(*unit, |l| load_attention(hp, li, l))?),
            };
            cpu::rms_norm(&x, &attn.norm, hp.rms_norm_eps, &mut normed)?;
            // q, k and v read the same input: one parallel loop for the three (k and v are small,
            // and three loops in a row leave threads idle at each barrier).
            Linear::forward_many(&[&attn.q, &attn.k, &attn.v], &normed, &mut [&mut q, &mut k, &mut v])?;
            prefetch_next(&[&attn.o]);
            if let (Some(qn), Some(kn)) = (&attn.q_norm, &attn.k_norm) {
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

            // The last layer's outputs reach only the logits: once its keys and values are in the
            // cache, only the rows whose logits are asked for go on through attention, `o` and the
            // feed-forward block (all rows when a router trace records every token's routing).
            let r = if li + 1 == self.layers.len() && trace.is_none() { out_rows } else { t };
            let skip = t - r;
            let params = AttentionParams {
                n_heads: hp.n_heads,
                n_kv_heads: hp.n_kv_heads,
                head_dim: hp.head_dim,
                scale: 1.0 / (hp.head_dim as f32).sqrt(),
                sliding_window: hp.layer_windows[li],
            };
            let (q_rows, attn_rows) = (&q[skip * qd..], &mut attn_out[..r * qd]);
            if pos0 == 0 {
                cpu::attention(q_rows, &k, &v, skip, &params, attn_rows)?;
            } else if t == 1 {
                let (kb, vb) = cache.blocks(li);
                cpu::attention_decode(q_rows, &kb, &vb, cache.block_len(), pos0 + 1, &params, attn_rows)?;
            } else {
                let (kc, vc) = cache.contiguous(li);
                cpu::attention(q_rows, &kc, &vc, pos0 + skip, &params, attn_rows)?;
            }
            let (x_rows, proj_rows, normed_rows) = (&mut x[skip * h..], &mut proj[..r * h], &mut normed[..r * h]);
            attn.o.forward(attn_rows, proj_rows)?;
            if let FfnSlot::Whole(Slot::Resident(FeedForward { ffn: Ffn::Dense(mlp), .. })) = &layer.ffn {
                prefetch_next(&[&mlp.gate, &mlp.up]);
            }
            cpu::add(x_rows, proj_rows)?;
            // A streamed unit's buffer goes back to the store's ring before the next is asked for.
            drop(streamed_attn);

            let [gate_rows, up_rows, act_rows] = [&mut gate, &mut up, &mut act].map(|b| &mut b[..r * inter]);
            let streamed_ffn;
            let ffn = match &layer.ffn {
                FfnSlot::Whole(Slot::Resident(f)) => f,
                FfnSlot::Whole(Slot::Streamed(unit)) => {
                    streamed_ffn = self.fetch(*unit, |l| load_ffn(hp, li, l, layer.experts.as_ref()))?;
                    &streamed_ffn
                }
                FfnSlot::Split(mlp) => {
                    self.split_mlp(mlp, li, x_rows, normed_rows, [gate_rows, up_rows, act_rows], proj_rows)?;
                    cpu::add(x_rows, proj_rows)?;
                    continue;
                }
            };
            cpu::rms_norm(x_rows, &ffn.norm, hp.rms_norm_eps, normed_rows)?;
            match &ffn.ffn {
                Ffn::Dense(mlp) => {
                    Linear::forward_many(&[&mlp.gate, &mlp.up], normed_rows, &mut [gate_rows, up_rows])?;
                    prefetch_next(&[&mlp.down]);
                    cpu::swiglu(gate_rows, up_rows, act_rows)?;
                    mlp.down.forward(act_rows, proj_rows)?;
                    if let Some(Slot::Resident(next)) = self.layers.get(li + 1).map(|l| &l.attn) {
                        prefetch_next(&[&next.q, &next.k, &next.v]);
                    }
                }
                Ffn::Moe(moe) => {
                    let record = trace.as_deref_mut().map(|tr| tr.layer_mut(li));
                    let next = self.next_moe_layer(li, x_rows);
                    moe.forward_ahead(normed_rows, r, &self.moe, proj_rows, record, next)?;
                }
            }
            cpu::add(x_rows, proj_rows)?;
        }

        cache.record_ids(ids);
        let rows = &x[(t - out_rows) * h..];
        let n_rows = out_rows;
        let mut final_normed = vec![0f32; rows.len()];
        cpu::rms_norm(rows, &self.norm, hp.rms_norm_eps, &mut final_normed)?;
        let mut logits = vec![0f32; n_rows * hp.vocab_size];
        let streamed_head;
        let lm_head = match &self.lm_head {
            Slot::Resident(t) => t,
            Slot::Streamed(unit) => {
                streamed_head = self.fetch(*unit, |l| l.matrix("lm_head.weight", hp.vocab_size, hp.hidden_size))?;
                &streamed_head
            }
        };
        if n_rows == 1 {
            cpu::matvec(lm_head, &final_normed, &mut logits)?;
        } else {
            cpu::matmul(&final_normed, lm_head, &mut logits)?;
        }
        Ok(logits)
    }
}

impl Decoder {
    /// Layer `li + 1` as a [`NextLayer`] over the residual stream `x`, when reading ahead is on,
    /// its feed-forward block is resident and its experts are placed in the store.
    fn next_moe_layer<'a>(&'a self, li: usize, x: &'a [f32]) -> Option<NextLayer<'a>> {
        if !self.expert_prefetch {
            return None;
        }
        let FeedForward { norm, ffn: Ffn::Moe(moe) } = self.layers.get(li + 1)?.ffn.resident()? else { return None };
        let Experts::Placed(experts) = moe.experts() else { return None };
        Some(NextLayer { norm, eps: self.hp.rms_norm_eps, router: moe.router(), experts, residual: x })
    }
}

/// Hints the decode team (when there is one) at the weights of the next product.
fn prefetch_next(layers: &[&Linear]) {
    if cpu::in_team() {
        // A few parts at most (q, k and v): on the stack, as this runs four times a layer.
        let mut parts: [&[u8]; 3] = [&[]; 3];
        let mut n = 0;
        for bytes in layers.iter().filter_map(|l| l.cpu_bytes()).take(parts.len()) {
            parts[n] = bytes;
            n += 1;
        }
        cpu::prefetch_next(&parts[..n]);
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

/// Loads layer `i`'s attention block.
fn load_attention(hp: &Hparams, i: usize, loader: &Loader<'_>) -> Result<Attention> {
    let (h, q, kv) = (hp.hidden_size, hp.q_dim(), hp.kv_dim());
    let p = format!("model.layers.{i}");
    let qk_norm = |name: &str| -> Result<Option<Vec<f32>>> {
        if hp.qk_norm {
            Ok(Some(loader.vector(&format!("{p}.self_attn.{name}.weight"), hp.head_dim)?))
        } else {
            Ok(None)
        }
    };
    Ok(Attention {
        norm: loader.vector(&format!("{p}.input_layernorm.weight"), h)?,
        q: loader.linear(&format!("{p}.self_attn.q_proj"), q, h, hp.qkv_bias)?,
        k: loader.linear(&format!("{p}.self_attn.k_proj"), kv, h, hp.qkv_bias)?,
        v: loader.linear(&format!("{p}.self_attn.v_proj"), kv, h, hp.qkv_bias)?,
        o: loader.linear(&format!("{p}.self_attn.o_proj"), h, q, hp.o_bias)?,
        q_norm: qk_norm("q_norm")?,
        k_norm: qk_norm("k_norm")?,
    })
}

/// Loads layer `i`'s feed-forward block: a dense MLP, or the MoE block of a sparse layer (with
/// `placed` for its experts when they are units of the store of their own).
fn load_ffn(hp: &Hparams, i: usize, loader: &Loader<'_>, placed: Option<&Arc<PlacedExperts>>) -> Result<FeedForward> {
    let p = format!("model.layers.{i}");
    let ffn = match &hp.moe {
        Some(moe) if moe.is_sparse(i) => Ffn::Moe(load_moe_layer(loader, &p, hp.hidden_size, moe, placed)?),
        _ => Ffn::Dense(Mlp::new(
            load_mlp_part(hp, i, MlpPart::Gate, loader)?,
            load_mlp_part(hp, i, MlpPart::Up, loader)?,
            load_mlp_part(hp, i, MlpPart::Down, loader)?,
        )),
    };
    Ok(FeedForward { norm: load_ffn_norm(hp, i, loader)?, ffn })
}

/// One projection of a dense MLP.
#[derive(Clone, Copy)]
enum MlpPart {
    Gate,
    Up,
    Down,
}

/// Layer `i`'s dense MLP projection `part`.
fn load_mlp_part(hp: &Hparams, i: usize, part: MlpPart, loader: &Loader<'_>) -> Result<Linear> {
    let (h, inter) = (hp.hidden_size, hp.intermediate_size);
    let (name, out, inp) = match part {
        MlpPart::Gate => ("gate_proj", inter, h),
        MlpPart::Up => ("up_proj", inter, h),
        MlpPart::Down => ("down_proj", h, inter),
    };
    loader.linear(&format!("model.layers.{i}.mlp.{name}"), out, inp, hp.mlp_bias)
}

/// Layer `i`'s post-attention norm.
fn load_ffn_norm(hp: &Hparams, i: usize, loader: &Loader<'_>) -> Result<Vec<f32>> {
    loader.vector(&format!("model.layers.{i}.post_attention_layernorm.weight"), hp.hidden_size)
}

/// The first unit of a split MLP: layer `i`'s post-attention norm and gate projection.
fn load_norm_and_gate(hp: &Hparams, i: usize, loader: &Loader<'_>) -> Result<(Vec<f32>, Linear)> {
    Ok((load_ffn_norm(hp, i, loader)?, load_mlp_part(hp, i, MlpPart::Gate, loader)?))
}

/// Whether two tensors are views of the same bytes as the same matrix (a tied output head).
pub(crate) fn shares_bytes(a: &Tensor, b: &Tensor) -> bool {
    match (a.cpu_bytes(), b.cpu_bytes()) {
        (Ok(x), Ok(y)) => {
            std::ptr::eq(x.as_ptr(), y.as_ptr())
                && x.len() == y.len()
                && a.dtype() == b.dtype()
                && a.shape() == b.shape()
        }
        _ => false,
    }
}

/// Layer `i`'s experts when `layout` gives each a unit of its own (`None`: a dense layer, or
/// experts kept in the layer's FFN unit). The unit's tensors are the gate, up and down
/// projections, in the order the decoder loaded them.
fn placed_experts(
    hp: &Hparams,
    i: usize,
    store: &Arc<Store>,
    layout: &UnitLayout,
) -> Result<Option<Arc<PlacedExperts>>> {
    let Some(moe) = hp.moe.as_ref().filter(|m| m.is_sparse(i)) else { return Ok(None) };
    if layout.index(&expert_unit(i, 0)).is_none() {
        return Ok(None);
    }
    let mut units = Vec::with_capacity(moe.num_experts);
    let mut names = Vec::with_capacity(moe.num_experts);
    for e in 0..moe.num_experts {
        let name = expert_unit(i, e);
        let def = layout.index(&name).map(|k| &layout.units[k]);
        let (Some(def), Some(unit)) = (def, store.unit_index(&name)) else {
            return Err(Error::Unsupported(format!(
                "the offload pack {} has no unit {name}",
                store.pack().data_path().display()
            )));
        };
        let [g, u, d] = def.tensors.as_slice() else {
            return Err(Error::Unsupported(format!(
                "unit {name} holds {} tensors, not an expert's 3",
                def.tensors.len()
            )));
        };
        units.push(unit);
        names.push([g.clone(), u.clone(), d.clone()]);
    }
    let placed = PlacedExperts::new(Arc::clone(store), units, names, hp.hidden_size, moe.expert_intermediate_size)?;
    Ok(Some(Arc::new(placed)))
}

/// Unit `unit` of `store` as a slot: a streamed unit stays one; a resident unit's weights are
/// built by `build` (views of the store's buffer).
fn place<T>(store: &Store, unit: usize, build: impl FnOnce(&Loader<'_>) -> Result<T>) -> Result<Slot<T>> {
    if store.streamed_units().contains(&unit) {
        return Ok(Slot::Streamed(unit));
    }
    Ok(Slot::Resident(build_from(store, unit, build)?))
}

/// Builds weights from unit `unit` of `store` with `build` (waiting for it if it streams).
fn build_from<T>(store: &Store, unit: usize, build: impl FnOnce(&Loader<'_>) -> Result<T>) -> Result<T> {
    let handle = store.acquire(unit)?;
    build(&Loader { src: &UnitSource { handle: &handle, location: store.pack().data_path() } })
}

/// The tensors of one unit of the store, by their checkpoint names.
pub(crate) struct UnitSource<'a> {
    pub(crate) handle: &'a UnitHandle,
    pub(crate) location: &'a Path,
}

impl TensorSource for UnitSource<'_> {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        Ok(self.handle.tensor(name)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.handle.contains(name)
    }

    fn location(&self) -> &Path {
        self.location
    }
}

/// Several sources as one: a tensor comes from the first that has it.
struct Chain<'a>(Vec<&'a dyn TensorSource>);

impl TensorSource for Chain<'_> {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        match self.0.iter().find(|s| s.contains(name)) {
            Some(s) => s.tensor(name),
            None => self.0[0].tensor(name),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|s| s.contains(name))
    }

    fn location(&self) -> &Path {
        self.0[0].location()
    }
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

    /// A linear layer `name.weight` `[out, inp]`, with `name.bias` if `bias`.
    pub(crate) fn linear(&self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let weight = self.matrix(&format!("{name}.weight"), out, inp)?;
        let bias = if bias { Some(self.vector(&format!("{name}.bias"), out)?) } else { None };
        Ok(Linear::new(weight, bias))
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
    pub(crate) fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use strata_tensor::DType;

    /// A `q8_0` linear layer `[n, k]` of deterministic weights.
    fn q8_linear(n: usize, k: usize) -> Linear {
        let values: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 2003) as f32 / 1001.0 - 1.0) * 0.3).collect();
        Linear::new(Tensor::from_f32_as(&values, [n, k], DType::Q8_0).unwrap(), None)
    }

    #[test]
    fn large_weights_not_repacked_are_copied_into_huge_pages_unchanged() {
        // 2048 x 1024 q8_0 is 2.125 MiB, above HUGE_PAGE; 64 x 1024 stays as it is.
        let x: Vec<f32> = (0..1024).map(|i| (i as f32 * 0.37).sin()).collect();
        for (n, copied) in [(2048, true), (64, false)] {
            let mut l = q8_linear(n, 1024);
            let before = l.weight.cpu_bytes().unwrap().to_vec();
            let old_ptr = l.weight.cpu_bytes().unwrap().as_ptr();
            let mut want = vec![0f32; n];
            l.forward(&x, &mut want).unwrap();
            assert!(!l.repack_for_cpu().unwrap(), "q8_0 is copied, not repacked");
            let bytes = l.weight.cpu_bytes().unwrap();
            assert_eq!(bytes, before.as_slice());
            assert_eq!(l.weight.dtype(), DType::Q8_0);
            assert_eq!(l.weight.shape().dims(), [n, 1024]);
            if copied {
                assert_ne!(bytes.as_ptr(), old_ptr);
                assert_eq!(bytes.as_ptr() as usize % strata_tensor::HUGE_PAGE, 0, "a mapping of its own");
            } else {
                assert_eq!(bytes.as_ptr(), old_ptr);
            }
            let mut got = vec![0f32; n];
            l.forward(&x, &mut got).unwrap();
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}
