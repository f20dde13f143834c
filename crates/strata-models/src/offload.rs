//! Offloaded weights, the model's side: which tensors form which unit of the offload pack,
//! the weight manifest the planner places, and building the pack from a checkpoint.
//!
//! Units follow the decoder's execution order: `embedding` (the token embedding and the final
//! norm: always resident, one row read per token), then per layer `layers.N.attention` (its
//! input norm, q/k/v/o and their biases and norms) and `layers.N.ffn` (its post-attention norm
//! and MLP; for MoE its router and shared expert), `layers.N.experts.E` (a MoE layer's expert
//! `E`: its gate, up and down projections, cut out of fused or stacked tensors if the
//! checkpoint has them), and last `head` (an untied output head). The grouping is derived from
//! the names the decoder actually loads, so a family's optional tensors land in the right unit
//! without a list here.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use strata_store::pack::{self, Pack, PackOptions, SourceKey, TensorSpec, UnitSpec};
use strata_store::planner::{UnitInfo, UnitKind, WeightManifest};
use strata_tensor::{DType, Tensor};

use crate::decoder::{Decoder, TensorSource};
use crate::hparams::Hparams;
use crate::moe::PerExpertSource;
use crate::{Error, Result};

/// The name of the unit holding the embedding and the final norm.
pub const EMBEDDING_UNIT: &str = "embedding";
/// The name of the unit holding an untied output head.
pub const HEAD_UNIT: &str = "head";

/// One unit: a name, what it is, and the checkpoint tensors it holds (Hugging Face names).
#[derive(Clone, Debug, PartialEq)]
pub struct UnitDef {
    /// `embedding`, `layers.3.attention`, `layers.3.ffn`, `layers.3.experts.5` or `head`.
    pub name: String,
    /// What the unit is, for the planner.
    pub kind: UnitKind,
    /// The tensors, in load order.
    pub tensors: Vec<String>,
}

/// Every unit of a model, in execution order.
#[derive(Clone, Debug, PartialEq)]
pub struct UnitLayout {
    /// The units.
    pub units: Vec<UnitDef>,
}

/// The unit name of layer `layer`'s attention block.
pub fn attention_unit(layer: usize) -> String {
    format!("layers.{layer}.attention")
}

/// The unit name of layer `layer`'s FFN: the whole block of a MoE layer; of a dense one, its
/// norm and gate projection (the up and down projections are units of their own).
pub fn ffn_unit(layer: usize) -> String {
    format!("layers.{layer}.ffn")
}

/// The unit name of expert `expert` of MoE layer `layer`.
pub fn expert_unit(layer: usize, expert: usize) -> String {
    format!("layers.{layer}.experts.{expert}")
}

/// The unit name of a dense layer's up projection.
pub fn ffn_up_unit(layer: usize) -> String {
    format!("layers.{layer}.ffn_up")
}

/// The unit name of a dense layer's down projection.
pub fn ffn_down_unit(layer: usize) -> String {
    format!("layers.{layer}.ffn_down")
}

/// Which unit a checkpoint tensor belongs to.
fn unit_of(name: &str) -> (String, UnitKind) {
    if name == "lm_head.weight" {
        return (HEAD_UNIT.to_string(), UnitKind::Head);
    }
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return (EMBEDDING_UNIT.to_string(), UnitKind::Embedding);
    };
    let (layer, rest) = rest.split_once('.').unwrap_or((rest, ""));
    let Ok(layer) = layer.parse::<usize>() else {
        return (EMBEDDING_UNIT.to_string(), UnitKind::Embedding);
    };
    if rest.starts_with("self_attn.") || rest.starts_with("input_layernorm.") {
        return (attention_unit(layer), UnitKind::Attention { layer });
    }
    // A dense MLP is three units (norm and gate, up, down), run one after the other, so that a
    // streamed FFN needs staging buffers of a third of its size. Each expert of a MoE layer is a
    // unit (the names are per expert: see `PerExpertSource`), read when its router picks it.
    if let Some(expert) = expert_index(rest) {
        return (expert_unit(layer, expert), UnitKind::Expert { layer, expert });
    }
    if rest.starts_with("mlp.up_proj.") {
        return (ffn_up_unit(layer), UnitKind::Ffn { layer });
    }
    if rest.starts_with("mlp.down_proj.") {
        return (ffn_down_unit(layer), UnitKind::Ffn { layer });
    }
    (ffn_unit(layer), UnitKind::Ffn { layer })
}

/// The expert a layer's tensor name (after `model.layers.N.`) belongs to:
/// `{mlp,block_sparse_moe}.experts.E.*`.
fn expert_index(rest: &str) -> Option<usize> {
    let (block, rest) = rest.split_once(".experts.")?;
    if block != "mlp" && block != "block_sparse_moe" {
        return None;
    }
    rest.split_once('.')?.0.parse().ok()
}

/// The rank of a unit in execution order.
fn order_key(kind: &UnitKind) -> (usize, usize, usize) {
    match *kind {
        UnitKind::Embedding => (0, 0, 0),
        UnitKind::Attention { layer } => (1, layer, 0),
        UnitKind::Ffn { layer } => (1, layer, 1),
        UnitKind::Expert { layer, expert } => (1, layer, 2 + expert),
        UnitKind::Head => (2, 0, 0),
        UnitKind::Other => (3, 0, 0),
    }
}

/// A source that remembers which tensors the decoder asked for.
struct Recording<'a> {
    inner: &'a dyn TensorSource,
    names: RefCell<Vec<String>>,
}

impl TensorSource for Recording<'_> {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        let mut names = self.names.borrow_mut();
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
        self.inner.tensor(name)
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn location(&self) -> &Path {
        self.inner.location()
    }
}

impl UnitLayout {
    /// The units of the model `hp` describes, from the tensors the decoder loads from `src`.
    pub fn of(hp: &Hparams, src: &dyn TensorSource) -> Result<UnitLayout> {
        let per_expert = per_expert(hp, src);
        let recording = Recording { inner: &per_expert, names: RefCell::new(Vec::new()) };
        Decoder::load(hp.clone(), &recording)?;
        let mut units: Vec<UnitDef> = Vec::new();
        for name in recording.names.into_inner() {
            let (unit, kind) = unit_of(&name);
            match units.iter_mut().find(|u| u.name == unit) {
                Some(u) => u.tensors.push(name),
                None => units.push(UnitDef { name: unit, kind, tensors: vec![name] }),
            }
        }
        units.sort_by_key(|u| order_key(&u.kind));
        Ok(UnitLayout { units })
    }

    /// The unit called `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.units.iter().position(|u| u.name == name)
    }

    /// The weight manifest for the planner: each unit's bytes in `src` (stored as the pack
    /// would store them with `convert`), the bytes a decode step reads from it, and the model's
    /// KV and activation bytes per token.
    pub fn manifest(&self, hp: &Hparams, src: &dyn TensorSource, convert: Option<DType>) -> Result<WeightManifest> {
        let src = per_expert(hp, src);
        let mut units = Vec::with_capacity(self.units.len());
        for u in &self.units {
            let mut bytes = 0u64;
            let mut largest = (0u64, DType::F32);
            let mut per_token = 0u64;
            for name in &u.tensors {
                let t = src.tensor(name)?;
                let dims = t.shape().dims();
                let dtype = pack::target_dtype(t.dtype(), dims, convert);
                let numel: usize = dims.iter().product();
                let len = dtype.bytes_for(numel).unwrap_or(t.byte_len()) as u64;
                // Each tensor starts on a cache line inside its unit.
                bytes += len.next_multiple_of(pack::TENSOR_ALIGN);
                if len > largest.0 {
                    largest = (len, dtype);
                }
                // One row of an untied embedding is read per token.
                let rows = dims.first().copied().unwrap_or(1).max(1) as u64;
                per_token += if name == "model.embed_tokens.weight" && !hp.tie_embeddings { len / rows } else { len };
            }
            if let (UnitKind::Expert { .. }, Some(moe)) = (u.kind, &hp.moe) {
                // A token reads an expert with probability k / E on average.
                per_token = per_token * moe.top_k as u64 / moe.num_experts.max(1) as u64;
            }
            units.push(UnitInfo {
                name: u.name.clone(),
                kind: u.kind,
                bytes,
                dtype: largest.1.name().to_string(),
                bytes_per_token: per_token,
            });
        }
        let (h, q, kv, inter) = (hp.hidden_size, hp.q_dim(), hp.kv_dim(), hp.intermediate_size);
        Ok(WeightManifest {
            units,
            n_layers: hp.n_layers,
            // Keys and values, f32, every layer.
            kv_bytes_per_token: (hp.n_layers * 2 * kv * 4) as u64,
            // The forward pass's f32 buffers per token: residual, norm, q, k, v, attention out,
            // projection, and the MLP's gate, up and activation.
            activation_bytes_per_token: (4 * (3 * h + 2 * q + 2 * kv + 3 * inter)) as u64,
        })
    }

    /// The units as the packer takes them: each tensor's stored bytes in `src`. The tensors
    /// must outlive the specs, so they are returned alongside.
    fn tensors(&self, hp: &Hparams, src: &dyn TensorSource) -> Result<Vec<Vec<(String, Tensor)>>> {
        let src = per_expert(hp, src);
        self.units
            .iter()
            .map(|u| u.tensors.iter().map(|n| Ok((n.clone(), src.tensor(n)?))).collect::<Result<Vec<_>>>())
            .collect()
    }
}

/// `src` with a MoE model's experts one tensor per expert and projection ([`PerExpertSource`]).
fn per_expert<'a>(hp: &'a Hparams, src: &'a dyn TensorSource) -> PerExpertSource<'a> {
    PerExpertSource::new(src, hp.moe.as_ref(), hp.hidden_size)
}

/// The checkpoint files a pack is keyed by: a GGUF file itself, or a directory's config.json
/// and safetensors files.
pub fn checkpoint_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path).map_err(|error| Error::Io { path: path.to_path_buf(), error })?;
    let mut files = Vec::new();
    for entry in entries {
        let p = entry.map_err(|error| Error::Io { path: path.to_path_buf(), error })?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name == "config.json" || name.ends_with(".safetensors") || name == "model.safetensors.index.json" {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// The strata version and unit layout a pack was built for, part of its key.
fn layout_tag(layout: &UnitLayout) -> String {
    format!("strata {} units {}", env!("CARGO_PKG_VERSION"), layout.units.len())
}

/// Builds (or reuses) the offload pack of the checkpoint at `checkpoint` (`src` reads its
/// tensors; `hp` describes the model) in `offload_dir`, optionally converting matrices to `convert`, reporting progress.
pub fn ensure_pack(
    hp: &Hparams,
    layout: &UnitLayout,
    src: &dyn TensorSource,
    checkpoint: &Path,
    offload_dir: &Path,
    convert: Option<DType>,
    progress: &mut dyn FnMut(&pack::Progress),
) -> Result<Pack> {
    let key = SourceKey::for_files(&checkpoint_files(checkpoint)?, &layout_tag(layout), convert)?;
    let tensors = layout.tensors(hp, src)?;
    let mut specs = Vec::with_capacity(tensors.len());
    for (u, ts) in layout.units.iter().zip(&tensors) {
        let mut spec = UnitSpec { name: u.name.clone(), tensors: Vec::with_capacity(ts.len()) };
        for (name, t) in ts {
            spec.tensors.push(TensorSpec {
                name: name.clone(),
                dtype: t.dtype(),
                shape: t.shape().dims().to_vec(),
                data: t.cpu_bytes()?,
            });
        }
        specs.push(spec);
    }
    Ok(pack::ensure_pack(offload_dir, &key, &specs, &PackOptions { convert }, progress)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_map_to_units() {
        let cases = [
            ("model.embed_tokens.weight", EMBEDDING_UNIT, UnitKind::Embedding),
            ("model.norm.weight", EMBEDDING_UNIT, UnitKind::Embedding),
            ("lm_head.weight", HEAD_UNIT, UnitKind::Head),
            ("model.layers.3.input_layernorm.weight", "layers.3.attention", UnitKind::Attention { layer: 3 }),
            ("model.layers.3.self_attn.q_proj.bias", "layers.3.attention", UnitKind::Attention { layer: 3 }),
            ("model.layers.12.self_attn.k_norm.weight", "layers.12.attention", UnitKind::Attention { layer: 12 }),
            ("model.layers.3.post_attention_layernorm.weight", "layers.3.ffn", UnitKind::Ffn { layer: 3 }),
            ("model.layers.3.mlp.gate_proj.weight", "layers.3.ffn", UnitKind::Ffn { layer: 3 }),
            ("model.layers.3.mlp.up_proj.weight", "layers.3.ffn_up", UnitKind::Ffn { layer: 3 }),
            ("model.layers.3.mlp.up_proj.bias", "layers.3.ffn_up", UnitKind::Ffn { layer: 3 }),
            ("model.layers.3.mlp.down_proj.weight", "layers.3.ffn_down", UnitKind::Ffn { layer: 3 }),
            ("model.layers.3.mlp.shared_expert.down_proj.weight", "layers.3.ffn", UnitKind::Ffn { layer: 3 }),
            ("model.layers.3.mlp.gate.weight", "layers.3.ffn", UnitKind::Ffn { layer: 3 }),
            // Each expert is a unit; a fused or stacked tensor (seen per expert when packing)
            // would stay in the FFN unit.
            (
                "model.layers.3.mlp.experts.5.up_proj.weight",
                "layers.3.experts.5",
                UnitKind::Expert { layer: 3, expert: 5 },
            ),
            (
                "model.layers.0.block_sparse_moe.experts.7.w2.weight",
                "layers.0.experts.7",
                UnitKind::Expert { layer: 0, expert: 7 },
            ),
            ("model.layers.2.mlp.experts.gate_up_proj", "layers.2.ffn", UnitKind::Ffn { layer: 2 }),
            ("model.layers.2.mlp.experts.gate_proj.weight", "layers.2.ffn", UnitKind::Ffn { layer: 2 }),
            ("model.layers.2.mlp.shared_expert_gate.weight", "layers.2.ffn", UnitKind::Ffn { layer: 2 }),
        ];
        for (tensor, unit, kind) in cases {
            assert_eq!(unit_of(tensor), (unit.to_string(), kind), "{tensor}");
        }
    }

    #[test]
    fn execution_order() {
        let mut kinds = vec![
            UnitKind::Head,
            UnitKind::Ffn { layer: 1 },
            UnitKind::Expert { layer: 0, expert: 1 },
            UnitKind::Attention { layer: 1 },
            UnitKind::Ffn { layer: 0 },
            UnitKind::Embedding,
            UnitKind::Attention { layer: 0 },
        ];
        kinds.sort_by_key(order_key);
        assert_eq!(
            kinds,
            [
                UnitKind::Embedding,
                UnitKind::Attention { layer: 0 },
                UnitKind::Ffn { layer: 0 },
                UnitKind::Expert { layer: 0, expert: 1 },
                UnitKind::Attention { layer: 1 },
                UnitKind::Ffn { layer: 1 },
                UnitKind::Head,
            ]
        );
    }
}
