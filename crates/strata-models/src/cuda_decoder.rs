//! The Llama-family decoder on a CUDA device: [`CudaDecoder`].
//!
//! The device twin of [`Decoder::forward`] in `decoder.rs`, op for op and in the same order, for
//! every family the CPU decoder runs (Llama, Mistral, Qwen2, Qwen3, from safetensors or GGUF):
//! token embedding, then per layer RMSNorm, the q/k/v projections (with Qwen2's biases), Qwen3's
//! per-head q/k RMSNorm, fused RoPE of q and k, appending k and v to the device KV cache, causal
//! attention over it (with the layer's sliding window), the output projection and residual add,
//! RMSNorm, SwiGLU MLP and residual add; then the final RMSNorm and the output head. Fusions save
//! launches without changing a rounding: q, k and v's weights are uploaded stacked as one
//! projection (at one token its outputs are q, k and v; at more, `copy_cols` takes them apart);
//! the residual adds go into the output and down projections (`linear_add`); and the gate and up
//! weights are uploaded with their rows paired, so that one matvec computes both and applies
//! SwiGLU (`linear_swiglu`); at a few tokens the products after an RMSNorm (q/k/v, gate/up, the
//! head) normalise their activations themselves (`matvec_normed`, in the norm kernel's own order
//! of the sum of squares), so a dense decode layer is 6 launches. The kernels are
//! `strata_kernels::cuda::ops`; each mirrors the `strata_tensor::cpu` op the CPU decoder calls.
//!
//! RoPE follows the CPU decoder's rules: the request's `RopeScheme` (carried by the cache, else
//! the model's) gives the table for the sequence's length after the pass (or its planned
//! length), and when that table differs from the one the cached tokens were computed with, the
//! held tokens are recomputed with the new one (`RopeUpdate::Recompute`, the CPU's default). The
//! CPU's other policy, re-rotating the cached keys, has no device kernel, so a [`CudaKvCache`]
//! always recomputes.
//!
//! Every weight is uploaded once, when the decoder is built: 2-D weights as device tensors in
//! their stored dtype (quantized blocks as they are), norms and biases as f32. Activations live
//! in device buffers reused from call to call; only the token ids, the positions and (when the
//! table changes) RoPE's inverse frequencies go up, and only the logits come down.

use std::borrow::Cow;
use std::path::Path;
use std::sync::{Arc, Mutex};

use strata_kernels::cuda::cudarc::driver::sys::CUevent_flags;
use strata_kernels::cuda::cudarc::driver::{DevicePtr, DevicePtrMut, DriverError};
use strata_kernels::cuda::graph::{GraphRun, GraphStats, LaunchGraph, Recorder};
use strata_kernels::cuda::kv::DeviceKvCache;
use strata_kernels::cuda::ops::{self, LINEAR_MATVEC_TOKENS, LinearScratch, MatvecStore, RopeArgs};
use strata_kernels::cuda::pinned::Pinned;
use strata_kernels::cuda::tensor::{pair_rows, stack_rows, upload_tensor};
use strata_kernels::cuda::{CudaSlice, CudaView, CudaViewMut};
use strata_kernels::{Cuda, Error as KernelError};
use strata_tensor::Tensor;
use strata_tensor::cpu::AttentionParams;

use crate::context::ContextScaling;
use crate::cuda_experts::DeviceExperts;
use crate::cuda_moe::{CudaMoe, MoeInput, MoeScratch};
use crate::cuda_stream::{Placer, SlotSchedule, WeightStream, staging_buffers};
use crate::decoder::{Decoder, Ffn, Linear, shares_bytes};
use crate::hparams::Hparams;
use crate::kv_cache::DEFAULT_BLOCK_LEN;
use crate::layer_images::{ImageReader, ImageSpec, LayerImages};
use crate::moe::{Mlp, MoeOptions, RouterTrace};
use crate::rope::{RopeScheme, RopeTable};
use crate::vram::ExpertCacheCounts;
use crate::vram::VramBudget;
use crate::{Error, Logits, Result};

/// Whether the decoder fuses launches (q/k/v stacked, gate/up paired with SwiGLU, the residual
/// adds in their projections): yes, unless the environment sets `STRATA_CUDA_UNFUSED` (to
/// anything but `0`), read once per process. The results are the same either way; the switch
/// tells a fused path's fault from a kernel's on a machine that cannot rebuild.
fn fused() -> bool {
    static FUSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FUSED.get_or_init(|| std::env::var_os("STRATA_CUDA_UNFUSED").is_none_or(|v| v == "0"))
}

/// Whether a new decoder's products after an RMSNorm normalise their activations themselves
/// ([`CudaDecoder::set_fused_norms`]): with the other fusions ([`fused`]), unless the environment
/// sets `STRATA_CUDA_SEPARATE_NORMS=1`, read once per process.
fn norms_fused_default() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| fused() && std::env::var_os("STRATA_CUDA_SEPARATE_NORMS").is_none_or(|v| v != "1"))
}

/// Whether a new cache's one-token attention merges its key chunks inside the decode launch when
/// they are few (`DeviceKvCache::set_folded_combine`): with the other fusions ([`fused`]), unless
/// the environment sets `STRATA_CUDA_SEPARATE_COMBINE=1`, read once per process.
fn folded_combine_default() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| fused() && std::env::var_os("STRATA_CUDA_SEPARATE_COMBINE").is_none_or(|v| v != "1"))
}

/// Whether a product of `tokens` rows by `w` normalises its activations itself rather than take
/// the rows an RMSNorm launch wrote: when `on` ([`CudaDecoder::set_fused_norms`]), at most
/// [`LINEAR_MATVEC_TOKENS`] tokens, where `ops::fuses_norm` allows it. Bit for bit the same
/// products.
pub(crate) fn fuses_norm(on: bool, w: &Tensor, tokens: usize) -> bool {
    on && tokens <= LINEAR_MATVEC_TOKENS && ops::fuses_norm(w, tokens)
}

/// Whether a new decoder runs its one-token passes as CUDA graphs ([`CudaDecoder::set_graphs`]):
/// when the environment sets `STRATA_CUDA_GRAPHS=1`, read once per process. Off by default until
/// measured on a card.
fn graphs_default() -> bool {
    static GRAPHS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GRAPHS.get_or_init(|| std::env::var_os("STRATA_CUDA_GRAPHS").is_some_and(|v| v == "1"))
}

/// Whether a new decoder routes the one-token passes of its Mixture-of-Experts layers on the
/// device ([`CudaDecoder::set_device_routing`]): yes, unless the environment sets
/// `STRATA_CUDA_HOST_ROUTING=1`, read once per process.
fn device_routing_default() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("STRATA_CUDA_HOST_ROUTING").is_none_or(|v| v != "1"))
}

/// Uploads layer `l` as `place` says (its matrices resident, or laid out in a streamed layer's
/// slot), with its routed experts in the device expert cache `cached` (the cache and the layer's
/// first unit in it) if given.
fn upload_layer(
    c: &Cuda,
    l: &crate::decoder::Layer,
    place: &mut Placer<'_>,
    cached: Option<(Arc<DeviceExperts>, usize)>,
) -> Result<CudaLayer> {
    let from_pack = || {
        Error::Unsupported(
            "this model has weights streamed from the offload pack, which runs on the CPU only for now".into(),
        )
    };
    let (a, f) = (l.attn.resident().ok_or_else(from_pack)?, l.ffn.resident().ok_or_else(from_pack)?);
    let ffn = match &f.ffn {
        Ffn::Dense(mlp) => CudaFfn::Dense(Box::new(CudaMlp::upload(c, mlp, place)?)),
        Ffn::Moe(moe) => CudaFfn::Moe(Box::new(CudaMoe::upload(c, moe, place, cached)?)),
    };
    let qk_norm = match (&a.q_norm, &a.k_norm) {
        (Some(qn), Some(kn)) => Some((c.upload(qn)?, c.upload(kn)?)),
        _ => None,
    };
    Ok(CudaLayer {
        attn_norm: c.upload(&a.norm)?,
        qkv: Qkv::upload(c, &a.q, &a.k, &a.v, place)?,
        o: CudaLinear::upload(c, &a.o, place)?,
        qk_norm,
        ffn_norm: c.upload(&f.norm)?,
        ffn,
    })
}

/// Drops the pages of a streamed layer's matrices from the resident set once they are copied
/// (into its page-locked host copy or its image): read once, a memory-mapped checkpoint's pages
/// would otherwise stay, holding the layer twice.
fn release_layer_pages(l: &crate::decoder::Layer) {
    for w in crate::vram::layer_weights(l).unwrap_or_default() {
        if let Ok(bytes) = w.cpu_bytes() {
            strata_tensor::release_pages(bytes);
        }
    }
}

/// The reader of the streamed layers' images in `dir` (`layer_images`), written first if they
/// are missing or laid out otherwise: each streamed layer of `hosts` (its bytes and layout hash,
/// in pass order) placed again into a host buffer, and the file written from it.
fn layer_image_reader(
    c: &Cuda,
    decoder: &Decoder,
    hosts: &[Option<(Option<Pinned>, usize, u64)>],
    slots: &[Arc<CudaSlice<u8>>],
    dir: &Path,
) -> Result<ImageReader<Pinned>> {
    let streamed: Vec<(usize, usize, u64)> = hosts
        .iter()
        .enumerate()
        .filter_map(|(li, h)| h.as_ref().map(|(_, used, layout)| (li, *used, *layout)))
        .collect();
    let specs: Vec<ImageSpec> =
        streamed.iter().map(|&(layer, len, layout)| ImageSpec { layer, len: len as u64, layout }).collect();
    let mut fill = |i: usize, bytes: &mut [u8]| -> Result<()> {
        let (li, len, layout) = streamed[i];
        let mut place = Placer::staged(Some(bytes), &slots[SlotSchedule::slot_of(i)]);
        // Routed experts of a streamed layer are in it (a device expert cache streams none).
        upload_layer(c, &decoder.layers[li], &mut place, None)?;
        release_layer_pages(&decoder.layers[li]);
        if place.laid_out() != (len, layout) {
            return Err(Error::InvalidInput(format!(
                "layer {li} laid out differently for its image (internal: placement must be deterministic)"
            )));
        }
        Ok(())
    };
    let images = LayerImages::open_or_build(dir, &specs, "layer images", &mut fill)?;
    let buffers = staging_buffers(c, images.largest_read(), crate::layer_images::STAGING_BUFFERS)?;
    ImageReader::new(Arc::new(images), buffers)
}

/// A linear layer on the device: the weight in its stored dtype, the bias in f32.
pub(crate) struct CudaLinear {
    weight: Tensor,
    bias: Option<CudaSlice<f32>>,
}

impl CudaLinear {
    pub(crate) fn upload(cuda: &Cuda, l: &Linear, place: &mut Placer<'_>) -> Result<CudaLinear> {
        let weight = place.tensor(cuda, &l.weight)?;
        let bias = l.bias.as_deref().map(|b| cuda.upload(b)).transpose()?;
        Ok(CudaLinear { weight, bias })
    }

    /// `y = x W^T + b` for `tokens` rows.
    pub(crate) fn forward(
        &self,
        cuda: &Cuda,
        x: &impl DevicePtr<f32>,
        y: &mut impl DevicePtrMut<f32>,
        tokens: usize,
        scratch: &mut LinearScratch,
    ) -> Result<()> {
        self.forward_q(cuda, x, None, y, tokens, scratch)
    }

    /// Whether a product of `tokens` rows takes activations quantized by the norm before it
    /// ([`CudaLinear::forward_q`]).
    fn takes_actq(&self, tokens: usize) -> bool {
        takes_actq(&self.weight, tokens)
    }

    /// [`CudaLinear::forward`], given `x` also quantized to two digits (`xq`, from
    /// `ops::rms_norm_actq`), which the matvec of a block-quantized weight takes rather than
    /// quantizing `x` in each of its blocks: the same result, bit for bit.
    fn forward_q(
        &self,
        cuda: &Cuda,
        x: &impl DevicePtr<f32>,
        xq: Option<&CudaView<'_, u8>>,
        y: &mut impl DevicePtrMut<f32>,
        tokens: usize,
        scratch: &mut LinearScratch,
    ) -> Result<()> {
        match xq {
            Some(xq) if self.takes_actq(tokens) => {
                ops::matvec_actq(cuda, &self.weight, xq, y, tokens, MatvecStore::Write)?
            }
            _ => ops::linear(cuda, &self.weight, x, y, tokens, scratch)?,
        }
        if let Some(b) = &self.bias {
            ops::add_bias(cuda, y, b, tokens)?;
        }
        Ok(())
    }

    /// Whether a product of `tokens` rows normalises its activations itself ([`fuses_norm`]).
    pub(crate) fn fuses_norm(&self, on: bool, tokens: usize) -> bool {
        fuses_norm(on, &self.weight, tokens)
    }

    /// `y = rms_norm(x) W^T + b` for `tokens` rows, the product normalising its activations
    /// itself (`ops::matvec_normed`; only where [`fuses_norm`] allows it): bit for bit
    /// [`rms_norm`] then [`CudaLinear::forward`].
    pub(crate) fn forward_normed(
        &self,
        cuda: &Cuda,
        x: &impl DevicePtr<f32>,
        norm: &CudaSlice<f32>,
        eps: f32,
        y: &mut impl DevicePtrMut<f32>,
        tokens: usize,
    ) -> Result<()> {
        ops::matvec_normed(cuda, &self.weight, x, norm, eps, y, tokens, MatvecStore::Write)?;
        if let Some(b) = &self.bias {
            ops::add_bias(cuda, y, b, tokens)?;
        }
        Ok(())
    }
}

/// RMSNorm of `rows` rows of `x` into `out`; given `xq`, the rows also quantized there to two
/// digits for the products after the norm (`ops::rms_norm_actq`: the same `out`, bit for bit).
fn rms_norm(
    cuda: &Cuda,
    x: &CudaView<'_, f32>,
    w: &CudaSlice<f32>,
    eps: f32,
    rows: usize,
    out: &mut CudaViewMut<'_, f32>,
    xq: Option<&mut CudaViewMut<'_, u8>>,
) -> Result<()> {
    match xq {
        Some(xq) => ops::rms_norm_actq(cuda, x, w, eps, rows, out, xq)?,
        None => ops::rms_norm(cuda, x, w, eps, rows, out)?,
    }
    Ok(())
}

/// Whether a product of `tokens` rows by `w` runs the integer matvec, which can take activations
/// the norm before it quantized (`ops::rms_norm_actq`, then `ops::matvec_actq`): a block-quantized
/// weight, at most [`LINEAR_MATVEC_TOKENS`] tokens, fusions on ([`fused`]).
fn takes_actq(w: &Tensor, tokens: usize) -> bool {
    fused() && tokens <= LINEAR_MATVEC_TOKENS && w.dtype().is_quantized()
}

/// A SwiGLU MLP on the device (the dense feed-forward block, a Mixture-of-Experts expert or
/// shared expert): gate and up ([`GateUp`]), then down.
pub(crate) struct CudaMlp {
    gate_up: GateUp,
    down: CudaLinear,
    /// The intermediate width (rows of gate).
    pub(crate) inter: usize,
}

impl CudaMlp {
    pub(crate) fn upload(cuda: &Cuda, mlp: &Mlp, place: &mut Placer<'_>) -> Result<CudaMlp> {
        Ok(CudaMlp {
            gate_up: GateUp::upload(cuda, &mlp.gate, &mlp.up, place)?,
            down: CudaLinear::upload(cuda, &mlp.down, place)?,
            inter: mlp.intermediate_size(),
        })
    }

    /// `silu(x G^T) * (x U^T)` into `act` (`tokens` rows of `inter`), the products in
    /// `products` (`2 tokens inter` floats at least).
    #[allow(clippy::too_many_arguments)]
    fn activate(
        &self,
        cuda: &Cuda,
        x: &impl DevicePtr<f32>,
        xq: Option<&CudaView<'_, u8>>,
        tokens: usize,
        products: &mut CudaSlice<f32>,
        act: &mut CudaViewMut<'_, f32>,
        work: &mut LinearScratch,
    ) -> Result<()> {
        let n = tokens * self.inter;
        let mut products = products.slice_mut(..2 * n);
        match &self.gate_up {
            GateUp::Paired(w) => match xq {
                Some(xq) if takes_actq(w, tokens) => ops::matvec_actq(cuda, w, xq, act, tokens, MatvecStore::Swiglu)?,
                _ => ops::linear_swiglu(cuda, w, x, &mut products, act, tokens, work)?,
            },
            GateUp::Split { gate, up } => {
                let (mut g, mut u) = products.split_at_mut(n);
                gate.forward_q(cuda, x, xq, &mut g, tokens, work)?;
                up.forward_q(cuda, x, xq, &mut u, tokens, work)?;
                ops::swiglu(cuda, &g, &u, act)?;
            }
        }
        Ok(())
    }

    /// The paired gate/up weight and the down weight, when the MLP has its weights so (gate and up
    /// paired, no biases): what a Mixture-of-Experts launch over many experts takes
    /// (`ops::ExpertWeights`).
    pub(crate) fn paired(&self) -> Option<(&Tensor, &Tensor)> {
        match (&self.gate_up, &self.down.bias) {
            (GateUp::Paired(w), None) => Some((w, &self.down.weight)),
            _ => None,
        }
    }

    /// `y = down(silu(gate(x)) * up(x))` for `tokens` rows; `products` and `act` are scratch of at
    /// least `2 tokens inter` and `tokens inter` floats.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        cuda: &Cuda,
        x: &impl DevicePtr<f32>,
        y: &mut impl DevicePtrMut<f32>,
        tokens: usize,
        products: &mut CudaSlice<f32>,
        act: &mut CudaSlice<f32>,
        work: &mut LinearScratch,
    ) -> Result<()> {
        let mut act = act.slice_mut(..tokens * self.inter);
        self.activate(cuda, x, None, tokens, products, &mut act, work)?;
        self.down.forward(cuda, &act, y, tokens, work)
    }

    /// The paired gate/up weight when a product of `tokens` rows by it normalises its
    /// activations itself ([`fuses_norm`] with `on`).
    pub(crate) fn normed_gate_up(&self, on: bool, tokens: usize) -> Option<&Tensor> {
        match &self.gate_up {
            GateUp::Paired(w) if fuses_norm(on, w, tokens) => Some(w),
            _ => None,
        }
    }

    /// `y = down(silu(gate(rms_norm(x))) * up(rms_norm(x)))` for `tokens` rows, the paired gate/up
    /// product normalising its activations itself (only where [`CudaMlp::normed_gate_up`] says
    /// so): bit for bit the norm's launch then [`CudaMlp::forward`]. `act` is scratch of at least
    /// `tokens inter` floats.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_normed(
        &self,
        cuda: &Cuda,
        x: &impl DevicePtr<f32>,
        norm: &CudaSlice<f32>,
        eps: f32,
        y: &mut impl DevicePtrMut<f32>,
        tokens: usize,
        act: &mut CudaSlice<f32>,
        work: &mut LinearScratch,
    ) -> Result<()> {
        let w = self.normed_gate_up(true, tokens).ok_or_else(|| {
            Error::Unsupported("this MLP's gate and up products cannot normalise their activations".into())
        })?;
        let mut a = act.slice_mut(..tokens * self.inter);
        ops::matvec_normed(cuda, w, x, norm, eps, &mut a, tokens, MatvecStore::Swiglu)?;
        self.down.forward(cuda, &a, y, tokens, work)
    }

    /// `resid += down(act)`: the down projection of activations already in `act` (`tokens` rows of
    /// `inter`), fused with the residual add as [`CudaMlp::forward_residual`] does.
    fn down_residual(
        &self,
        cuda: &Cuda,
        act: &CudaSlice<f32>,
        resid: &mut impl DevicePtrMut<f32>,
        proj: &mut (impl DevicePtrMut<f32> + DevicePtr<f32>),
        tokens: usize,
        work: &mut LinearScratch,
    ) -> Result<()> {
        residual(cuda, &self.down, &act.slice(..tokens * self.inter), resid, proj, tokens, work)
    }

    /// `resid += down(silu(gate(x)) * up(x))`, the down projection fused with the residual add
    /// ([`residual`]; `proj` is its scratch when down has a bias); gate and up take `x` as the
    /// two-digit records `xq` where they can ([`CudaLinear::forward_q`]).
    #[allow(clippy::too_many_arguments)]
    fn forward_residual(
        &self,
        cuda: &Cuda,
        x: &impl DevicePtr<f32>,
        xq: Option<&CudaView<'_, u8>>,
        resid: &mut impl DevicePtrMut<f32>,
        proj: &mut (impl DevicePtrMut<f32> + DevicePtr<f32>),
        tokens: usize,
        products: &mut CudaSlice<f32>,
        act: &mut CudaSlice<f32>,
        work: &mut LinearScratch,
    ) -> Result<()> {
        let mut act = act.slice_mut(..tokens * self.inter);
        self.activate(cuda, x, xq, tokens, products, &mut act, work)?;
        residual(cuda, &self.down, &act, resid, proj, tokens, work)
    }
}

/// A decoder layer's feed-forward block on the device.
enum CudaFfn {
    Dense(Box<CudaMlp>),
    Moe(Box<CudaMoe>),
}

/// One decoder layer's weights on the device.
struct CudaLayer {
    attn_norm: CudaSlice<f32>,
    qkv: Qkv,
    o: CudaLinear,
    /// Qwen3's per-head query and key norms.
    qk_norm: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
    ffn_norm: CudaSlice<f32>,
    ffn: CudaFfn,
}

/// The query, key and value projections on the device.
enum Qkv {
    /// Their rows one after the other ([`stack_rows`]), with their biases likewise: one
    /// product per pass, whose outputs at one token are q, k and v one after the other.
    Stacked(CudaLinear),
    /// Apart (q, k, v), when their dtypes differ or only some have a bias (or fusions are off:
    /// [`fused`]).
    Split(Box<[CudaLinear; 3]>),
}

impl Qkv {
    fn upload(cuda: &Cuda, q: &Linear, k: &Linear, v: &Linear, place: &mut Placer<'_>) -> Result<Qkv> {
        let all = [q, k, v];
        let same_dtype = all.iter().all(|l| l.weight.dtype() == q.weight.dtype());
        let biases: Option<Vec<&[f32]>> = all.iter().map(|l| l.bias.as_deref()).collect();
        let no_bias = all.iter().all(|l| l.bias.is_none());
        if !fused() || !same_dtype || (biases.is_none() && !no_bias) {
            let mut up = |l: &Linear| CudaLinear::upload(cuda, l, place);
            return Ok(Qkv::Split(Box::new([up(q)?, up(k)?, up(v)?])));
        }
        let parts = [&q.weight, &k.weight, &v.weight];
        let rows: usize = parts.iter().map(|w| w.shape().dims().first().copied().unwrap_or(0)).sum();
        let cols = q.weight.shape().dims().last().copied().unwrap_or(0);
        let weight = place.put(cuda, q.weight.dtype(), &[rows, cols], || Ok(Cow::Owned(stack_rows(&parts)?.0)))?;
        let bias = biases.map(|b| cuda.upload(&b.concat())).transpose()?;
        Ok(Qkv::Stacked(CudaLinear { weight, bias }))
    }

    /// Whether any of the products takes quantized activations ([`CudaLinear::forward_q`]).
    fn takes_actq(&self, tokens: usize) -> bool {
        match self {
            Qkv::Stacked(l) => l.takes_actq(tokens),
            Qkv::Split(parts) => parts.iter().any(|l| l.takes_actq(tokens)),
        }
    }
}

/// The MLP's gate and up projections on the device.
enum GateUp {
    /// Their rows paired ([`pair_rows`]): SwiGLU of one product, in one launch when decoding.
    Paired(Tensor),
    /// Apart, when either has a bias or their dtypes differ (or fusions are off: [`fused`]).
    Split { gate: CudaLinear, up: CudaLinear },
}

impl GateUp {
    fn upload(cuda: &Cuda, gate: &Linear, up: &Linear, place: &mut Placer<'_>) -> Result<GateUp> {
        let (g, u) = (&gate.weight, &up.weight);
        let pairable = fused()
            && gate.bias.is_none()
            && up.bias.is_none()
            && g.dtype() == u.dtype()
            && g.shape() == u.shape()
            && g.shape().dims().first().is_some_and(|n| n % 2 == 0);
        if pairable {
            let dims = [2 * g.shape().dims()[0], g.shape().dims()[1]];
            return Ok(GateUp::Paired(place.put(cuda, g.dtype(), &dims, || Ok(Cow::Owned(pair_rows(g, u)?)))?));
        }
        let gate = CudaLinear::upload(cuda, gate, place)?;
        Ok(GateUp::Split { gate, up: CudaLinear::upload(cuda, up, place)? })
    }

    /// Whether either product takes quantized activations ([`CudaLinear::forward_q`]).
    fn takes_actq(&self, tokens: usize) -> bool {
        match self {
            GateUp::Paired(w) => takes_actq(w, tokens),
            GateUp::Split { gate, up } => gate.takes_actq(tokens) || up.takes_actq(tokens),
        }
    }
}

/// A decoder model whose weights live on a CUDA device and whose forward pass runs there.
pub struct CudaDecoder {
    cuda: Arc<Cuda>,
    hp: Hparams,
    embed: Tensor,
    layers: Vec<CudaLayer>,
    norm: CudaSlice<f32>,
    /// The output head: the embedding's device tensor again when the checkpoint ties them.
    lm_head: Tensor,
    /// The RoPE scheme of caches from [`CudaDecoder::new_cache`].
    rope: RopeScheme,
    /// The Mixture-of-Experts routing options (the CPU decoder's when this one was built).
    moe: MoeOptions,
    weight_bytes: usize,
    weight_bytes_per_token: usize,
    scratch: Mutex<Scratch>,
    /// Whether one-token passes run as one graph launch ([`CudaDecoder::set_graphs`]).
    graphs: std::sync::atomic::AtomicBool,
    /// Whether Mixture-of-Experts layers route one-token passes on the device
    /// ([`CudaDecoder::set_device_routing`]).
    device_routing: std::sync::atomic::AtomicBool,
    /// Whether products after an RMSNorm normalise their activations themselves
    /// ([`CudaDecoder::set_fused_norms`]).
    fused_norms: std::sync::atomic::AtomicBool,
    /// The layers streamed from host memory, if any ([`CudaDecoder::new_within`]).
    stream: Option<WeightStream>,
    /// The device cache of the routed experts kept in host memory, if any
    /// ([`CudaDecoder::new_within`]).
    experts: Option<Arc<DeviceExperts>>,
    /// The host's time queuing one-token passes: nanoseconds and passes
    /// ([`CudaDecoder::decode_host_time`]).
    host_ns: std::sync::atomic::AtomicU64,
    host_passes: std::sync::atomic::AtomicU64,
    /// The ceiling the weights were placed under.
    budget: Option<VramBudget>,
    /// The device expert cache's hit rate the placement expected under uniform routing.
    expected_expert_hit_rate: Option<f64>,
}

impl Drop for CudaDecoder {
    fn drop(&mut self) {
        // Uploads into the streamed layers' buffers or the expert cache's slots may still run on
        // the copy stream: they must finish before the buffers and their host copies go.
        if self.stream.is_some() || self.experts.is_some() {
            let _ = self.cuda.copy_stream().synchronize();
        }
    }
}

impl std::fmt::Debug for CudaDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDecoder").field("device", &self.cuda).field("hparams", &self.hp).finish_non_exhaustive()
    }
}

impl CudaDecoder {
    /// Opens CUDA device `ordinal` and uploads `decoder`'s weights to it.
    pub fn open(decoder: &Decoder, ordinal: usize) -> Result<CudaDecoder> {
        CudaDecoder::new(decoder, Cuda::new(ordinal)?)
    }

    /// Opens CUDA device `ordinal` and places `decoder`'s weights under `budget`
    /// ([`CudaDecoder::new_within`]).
    pub fn open_within(
        decoder: &Decoder,
        ordinal: usize,
        budget: Option<VramBudget>,
        images: Option<&Path>,
    ) -> Result<CudaDecoder> {
        CudaDecoder::new_within(decoder, Cuda::new(ordinal)?, budget, images)
    }

    /// Uploads every weight of `decoder` to `cuda`, once, and takes its RoPE scheme (with the
    /// context scaling it was given, if any). The CPU decoder is left as it was.
    pub fn new(decoder: &Decoder, cuda: Arc<Cuda>) -> Result<CudaDecoder> {
        CudaDecoder::build(decoder, cuda, &vec![false; decoder.layers.len()], 0, None)
    }

    /// [`CudaDecoder::new`] under a ceiling on the GPU memory it takes (`None`: none): when the
    /// weights, the KV cache of `budget.context_tokens` tokens and the scratch of a pass of
    /// `budget.pass_tokens` tokens do not fit in `budget.max_bytes`, a Mixture-of-Experts model
    /// whose other weights fit keeps its routed experts in page-locked host memory and as many as
    /// fit in a device cache (`cuda_experts`); otherwise the last layers' weights stay in
    /// page-locked host memory and stream into two device buffers pass by pass (`cuda_stream`),
    /// as few layers as make it fit (an even number, at least 4). An error says what would fit
    /// when even that does not. The ceiling covers what strata allocates, not the driver's own
    /// context.
    ///
    /// With `images` (a directory under the offload directory: `layer_images::images_dir`), the
    /// streamed layers' weights are not kept in host memory: they are laid out once into a file
    /// of layer images there (written on first use) and read from it pass by pass into three
    /// page-locked staging buffers, ahead of their uploads (`layer_images`). Routed experts
    /// under a device expert cache likewise: one image each (in `experts/`), read on each miss.
    pub fn new_within(
        decoder: &Decoder,
        cuda: Arc<Cuda>,
        budget: Option<VramBudget>,
        images: Option<&Path>,
    ) -> Result<CudaDecoder> {
        let (streamed, expert_slots, expected) = match budget {
            None => (vec![false; decoder.layers.len()], 0, None),
            Some(b) => {
                let report = crate::vram::vram_report(decoder, &b)?;
                (report.streamed, report.expert_slots, report.expected_expert_hit_rate)
            }
        };
        let moe_streamed = decoder
            .layers
            .iter()
            .zip(&streamed)
            .filter(|(l, s)| **s && matches!(l.ffn.resident().map(|f| &f.ffn), Some(Ffn::Moe(_))))
            .count();
        if moe_streamed > 0 {
            eprintln!(
                "strata: --max-vram streams {moe_streamed} Mixture-of-Experts layers whole: every expert is copied \
                 to the GPU each pass (what stays on the device leaves no room for one expert in a cache)"
            );
        }
        let mut d = CudaDecoder::build(decoder, cuda, &streamed, expert_slots, images)?;
        d.budget = budget;
        d.expected_expert_hit_rate = expected;
        Ok(d)
    }

    /// [`CudaDecoder::new`] with the routed experts kept in page-locked host memory and a device
    /// cache of `slots` of them, whatever the memory: what [`CudaDecoder::new_within`] does for a
    /// Mixture-of-Experts model under a tight ceiling, chosen directly (tests, benches).
    pub fn new_expert_cached(decoder: &Decoder, cuda: Arc<Cuda>, slots: usize) -> Result<CudaDecoder> {
        CudaDecoder::new_expert_cached_from(decoder, cuda, slots, None)
    }

    /// [`CudaDecoder::new_expert_cached`] with the routed experts read from images in `images`
    /// (a directory, written on first use) on each miss rather than kept in host memory, when
    /// given ([`CudaDecoder::new_within`]).
    pub fn new_expert_cached_from(
        decoder: &Decoder,
        cuda: Arc<Cuda>,
        slots: usize,
        images: Option<&Path>,
    ) -> Result<CudaDecoder> {
        if slots == 0 {
            return Err(Error::InvalidInput("a device expert cache needs at least one slot".into()));
        }
        CudaDecoder::build(decoder, cuda, &vec![false; decoder.layers.len()], slots, images)
    }

    /// The device expert cache's slots and counts so far, when the routed experts stay in host
    /// memory ([`CudaDecoder::new_within`]).
    pub fn expert_cache(&self) -> Option<ExpertCacheCounts> {
        let counts = self.experts.as_ref().map(|c| c.counts())?;
        Some(ExpertCacheCounts { expected_hit_rate: self.expected_expert_hit_rate, ..counts })
    }

    /// Makes the device expert cache evict by `policy` (`layer-lru` by default) rather than by
    /// the one it has, forgetting what its slots hold and its counts: for a decoder just built.
    /// Nothing to do without a cache. The host tier (if any) starts over too, under a policy of
    /// the same kind.
    pub fn set_expert_cache_policy(&self, policy: Box<dyn crate::store::planner::ExpertCachePolicy>) -> Result<()> {
        match &self.experts {
            Some(c) => c.set_policy(policy),
            None => Ok(()),
        }
    }

    /// For streamed layers, or a device expert cache's experts, read from images on disk: keeps
    /// some in up to `bytes` of page-locked host memory (the host tier, beyond the staging
    /// buffers), each in a buffer of the largest image's read, and returns how many. The layers
    /// kept are read from their images once, now, and then never from disk (spread evenly over
    /// the pass, so the others' reads are too; set once); the experts kept are those read last,
    /// under a policy of the device cache's kind, so that a miss held there is copied without a
    /// read. An error when they do not come from disk; nothing to do when nothing streams
    /// (`Ok(0)`).
    pub fn set_host_tier(&mut self, bytes: u64) -> Result<usize> {
        if let Some(stream) = &mut self.stream {
            return stream.set_host_tier(&self.cuda, bytes);
        }
        match &self.experts {
            Some(c) => c.set_host_tier(&self.cuda, bytes),
            None => Ok(0),
        }
    }

    /// With streamed layers read from images on disk: those without a host copy (not in the
    /// host tier) and the bytes a pass reads of them. `None` otherwise.
    pub fn streamed_read_per_pass(&self) -> Option<(usize, usize)> {
        self.stream.as_ref().and_then(WeightStream::read_per_pass)
    }

    /// [`CudaDecoder::new`] with the layers `streamed` marks kept in page-locked host memory and
    /// streamed into the device pass by pass, whatever the memory: what
    /// [`CudaDecoder::new_within`] does under a tight ceiling, chosen directly (tests, benches).
    /// The marked count must be a positive multiple of 2.
    pub fn new_streaming(decoder: &Decoder, cuda: Arc<Cuda>, streamed: &[bool]) -> Result<CudaDecoder> {
        CudaDecoder::new_streaming_from(decoder, cuda, streamed, None)
    }

    /// [`CudaDecoder::new_streaming`] with the streamed layers read from layer images in
    /// `images` (a directory, written on first use) rather than kept in host memory, when given
    /// ([`CudaDecoder::new_within`]).
    pub fn new_streaming_from(
        decoder: &Decoder,
        cuda: Arc<Cuda>,
        streamed: &[bool],
        images: Option<&Path>,
    ) -> Result<CudaDecoder> {
        let k = streamed.iter().filter(|&&s| s).count();
        if streamed.len() != decoder.layers.len() || k == 0 || !k.is_multiple_of(crate::vram::SLOTS) {
            return Err(Error::InvalidInput(format!(
                "stream a positive multiple of {} of the model's {} layers (asked: {k} of {})",
                crate::vram::SLOTS,
                decoder.layers.len(),
                streamed.len()
            )));
        }
        CudaDecoder::build(decoder, cuda, streamed, 0, images)
    }

    fn build(
        decoder: &Decoder,
        cuda: Arc<Cuda>,
        streamed: &[bool],
        expert_slots: usize,
        images: Option<&Path>,
    ) -> Result<CudaDecoder> {
        let c = &*cuda;
        let from_pack = || {
            Error::Unsupported(
                "this model has weights streamed from the offload pack, which runs on the CPU only for now".into(),
            )
        };
        let embed = upload_tensor(c, &decoder.embed)?;
        let head = decoder.lm_head.resident().ok_or_else(from_pack)?;
        let lm_head = if shares_bytes(&decoder.embed, head) { embed.clone() } else { upload_tensor(c, head)? };
        // The streamed layers' device buffers: sized for the largest of them.
        let bounds: Vec<usize> = decoder
            .layers
            .iter()
            .map(|l| Ok(crate::vram::layer_matrices(l).ok_or_else(from_pack)?.streamed))
            .collect::<Result<_>>()?;
        let slot_bytes = bounds.iter().zip(streamed).filter(|(_, s)| **s).map(|(b, _)| *b).max();
        let slots = match slot_bytes {
            Some(bytes) => WeightStream::slots(c, bytes)?,
            None => Vec::new(),
        };
        // The routed experts kept in host memory, with a device cache of `expert_slots`.
        let (experts, expert_offsets) = if expert_slots > 0 {
            let routed: Vec<Option<&[Mlp]>> = decoder
                .layers
                .iter()
                .map(|l| match l.ffn.resident().map(|f| &f.ffn) {
                    Some(Ffn::Moe(moe)) => {
                        moe.resident_experts().filter(|es| es.iter().all(crate::vram::cacheable_expert))
                    }
                    _ => None,
                })
                .collect();
            let policy = crate::store::planner::expert_cache_policy_by_name("layer-lru")?;
            let (cache, offsets) = DeviceExperts::new(c, &routed, expert_slots, policy, images)?;
            (Some(Arc::new(cache)), offsets)
        } else {
            (None, vec![None; decoder.layers.len()])
        };
        // Per layer, for the streamed ones: the page-locked host copy (none when it streams from
        // disk), the bytes laid out and the layout's hash.
        let mut hosts: Vec<Option<(Option<Pinned>, usize, u64)>> = Vec::with_capacity(decoder.layers.len());
        let mut layers = Vec::with_capacity(decoder.layers.len());
        for (li, l) in decoder.layers.iter().enumerate() {
            let mut host = if streamed[li] && images.is_none() { Some(Pinned::new(c, bounds[li])?) } else { None };
            let pos = hosts.iter().filter(|h| h.is_some()).count();
            let mut place = if streamed[li] {
                let host = host.as_mut().map(Pinned::as_mut_slice).transpose()?;
                Placer::staged(host, &slots[SlotSchedule::slot_of(pos)])
            } else {
                Placer::Resident
            };
            let cached = experts.as_ref().zip(expert_offsets[li]).map(|(cache, first)| (cache.clone(), first));
            layers.push(upload_layer(c, l, &mut place, cached)?);
            let (used, layout) = place.laid_out();
            if streamed[li] && images.is_none() {
                release_layer_pages(l);
            }
            hosts.push(streamed[li].then_some((host, used, layout)));
        }
        let norm = c.upload(&decoder.norm)?;
        let stream = if slots.is_empty() {
            None
        } else {
            let reader = match images {
                Some(dir) => Some(layer_image_reader(c, decoder, &hosts, &slots, dir)?),
                None => None,
            };
            let hosts = hosts.into_iter().map(|h| h.map(|(host, used, _)| (host, used))).collect();
            let stream = WeightStream::new(hosts, slots, reader);
            stream.prime(c)?;
            Some(stream)
        };
        c.synchronize()?;
        Ok(CudaDecoder {
            hp: decoder.hp.clone(),
            embed,
            layers,
            norm,
            lm_head,
            rope: decoder.rope_scheme().clone(),
            weight_bytes: decoder.weight_bytes(),
            weight_bytes_per_token: decoder.weight_bytes_per_token(),
            moe: *decoder.moe_options(),
            scratch: Mutex::new(Scratch::new()),
            graphs: graphs_default().into(),
            device_routing: device_routing_default().into(),
            fused_norms: norms_fused_default().into(),
            host_ns: 0.into(),
            host_passes: 0.into(),
            stream,
            experts,
            budget: None,
            expected_expert_hit_rate: None,
            cuda,
        })
    }

    /// Layers whose weights stream from host memory pass by pass ([`CudaDecoder::new_within`]).
    pub fn streamed_layers(&self) -> usize {
        self.stream.as_ref().map_or(0, WeightStream::streamed_layers)
    }

    /// Bytes copied from host memory to the device per forward pass (the streamed layers'
    /// weights; 0 when every weight is resident).
    pub fn streamed_bytes_per_pass(&self) -> usize {
        self.stream.as_ref().map_or(0, WeightStream::bytes_per_pass)
    }

    /// Where the streamed layers, or the routed experts of a device expert cache, are read from
    /// when from disk: the images' data file and the largest read of it
    /// ([`CudaDecoder::new_within`]'s `images`).
    pub fn layer_images(&self) -> Option<(&Path, usize)> {
        self.stream.as_ref().and_then(WeightStream::images).or_else(|| self.experts.as_ref().and_then(|e| e.images()))
    }

    /// The ceiling the decoder was placed under ([`CudaDecoder::new_within`]).
    pub fn vram_budget(&self) -> Option<VramBudget> {
        self.budget
    }

    /// Runs each one-token pass (a decode step) as one CUDA graph launch rather than 6-7 kernel
    /// launches per layer, or not: the same kernels with the same arguments, so the same logits
    /// bit for bit, with less launch overhead. A model with Mixture-of-Experts layers takes graphs
    /// when they route on the device ([`CudaDecoder::set_device_routing`]); a pass that records a
    /// router trace is never a graph. The graph is kept and updated from step to step
    /// (`strata_kernels::cuda::graph`). Off by default unless `STRATA_CUDA_GRAPHS=1`. Should a
    /// graph fail to build or launch, the pass's kernels are launched one by one instead, and
    /// graphs stay off for this decoder.
    pub fn set_graphs(&self, on: bool) {
        self.graphs.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Routes the one-token passes of Mixture-of-Experts layers on the device (the default), or on
    /// the host (`cuda_moe`'s documentation): on the device no pass waits for the router, and the
    /// chosen experts' products take one launch each; the weights come from the device's softmax,
    /// within a few ulp of the CPU's. `STRATA_CUDA_HOST_ROUTING=1` makes the host the default. A
    /// pass of several tokens, or one that records a router trace, routes on the host either way,
    /// as do models whose experts the device way does not take.
    pub fn set_device_routing(&self, on: bool) {
        self.device_routing.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Lets the products after an RMSNorm normalise their activations themselves (the default,
    /// with the other fusions), or not: the q/k/v product, a dense block's paired gate/up product
    /// and the output head, at up to 8 tokens where `ops::fuses_norm` allows (float weights;
    /// block-quantized ones at one or two tokens on rows within a tile), each block computing the
    /// row's scale in the norm kernel's own order, so the logits are the same bit for bit and a
    /// decode layer takes two launches fewer. `STRATA_CUDA_SEPARATE_NORMS=1` makes separate norm
    /// launches the default.
    pub fn set_fused_norms(&self, on: bool) {
        self.fused_norms.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The host's time spent queuing one-token passes (decode steps) so far, and their count:
    /// from the pass's start to its last launch queued, before it waits for the logits. Against a
    /// step's wall time it says who bounds decode: when the two are close, the device waits for
    /// the host to queue its kernels.
    pub fn decode_host_time(&self) -> (std::time::Duration, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (std::time::Duration::from_nanos(self.host_ns.load(Relaxed)), self.host_passes.load(Relaxed))
    }

    /// What the decode graph has done so far (`None` before the first graphed pass).
    pub fn graph_stats(&self) -> Option<GraphStats> {
        let guard = self.scratch.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        guard.graph.as_ref().map(LaunchGraph::stats)
    }

    /// The hyperparameters.
    pub fn hparams(&self) -> &Hparams {
        &self.hp
    }

    /// The device.
    pub fn cuda(&self) -> &Arc<Cuda> {
        &self.cuda
    }

    /// The device's name as the driver gives it.
    pub fn device_name(&self) -> Result<String> {
        Ok(self.cuda.name()?)
    }

    /// An empty device KV cache for this model, with the model's RoPE scheme (it allocates as
    /// the sequence grows). The twin of [`Decoder::new_cache`].
    pub fn new_cache(&self) -> Result<CudaKvCache> {
        self.cache_with(self.rope.clone())
    }

    /// An empty device KV cache for one request that runs with `scaling` instead of the model's
    /// own RoPE scaling (`None`: the checkpoint's). The twin of
    /// [`Decoder::new_cache_with_scaling`].
    pub fn new_cache_with_scaling(&self, scaling: Option<ContextScaling>) -> Result<CudaKvCache> {
        self.cache_with(self.hp.rope.with_context_scaling(scaling)?)
    }

    fn cache_with(&self, scheme: RopeScheme) -> Result<CudaKvCache> {
        let hp = &self.hp;
        let kv = DeviceKvCache::new(&self.cuda, hp.n_layers, hp.n_kv_heads, hp.head_dim, DEFAULT_BLOCK_LEN)?;
        kv.set_folded_combine(folded_combine_default());
        Ok(CudaKvCache { kv, rope_scheme: Some(scheme), planned_length: 0, rotated_with: None, ids: Vec::new() })
    }

    /// Makes `scaling` the context scaling of every cache [`CudaDecoder::new_cache`] makes from
    /// now on (`None`: back to the checkpoint's). The twin of [`Decoder::set_context_scaling`].
    pub fn set_context_scaling(&mut self, scaling: Option<ContextScaling>) -> Result<()> {
        self.rope = self.hp.rope.with_context_scaling(scaling)?;
        Ok(())
    }

    /// The RoPE scheme [`CudaDecoder::new_cache`] gives its caches.
    pub fn rope_scheme(&self) -> &RopeScheme {
        &self.rope
    }

    /// Checks, before any work, that feeding `new_tokens` more tokens through `cache` stays
    /// within the request's `max_capacity`. The twin of [`Decoder::check_capacity`].
    pub fn check_capacity(&self, cache: &CudaKvCache, new_tokens: usize) -> Result<()> {
        let scheme = cache.rope_scheme().unwrap_or(&self.rope);
        scheme.check_fits(cache.len().saturating_add(new_tokens))
    }

    /// Checks that a request may reach `total_len` tokens and plans `cache` for that length (its
    /// RoPE table is the one for `total_len` from the first pass on). The twin of
    /// [`Decoder::plan`].
    pub fn plan(&self, cache: &mut CudaKvCache, total_len: usize) -> Result<()> {
        cache.rope_scheme().unwrap_or(&self.rope).check_fits(total_len)?;
        if let Some(b) = self.budget
            && total_len > b.context_tokens
        {
            return Err(Error::InvalidInput(format!(
                "a request of {total_len} tokens: --max-vram placed the weights for a KV cache of {} tokens \
                 (--max-capacity N plans for longer requests, LoadOptions::max_context from Rust)",
                b.context_tokens
            )));
        }
        cache.planned_length = total_len;
        Ok(())
    }

    /// Bytes of all weights (the output head counted once when tied), as [`Decoder::weight_bytes`].
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Bytes of weights read to decode one token, as [`Decoder::weight_bytes_per_token`].
    pub fn weight_bytes_per_token(&self) -> usize {
        self.weight_bytes_per_token
    }

    /// Device memory in use now, in bytes: total minus free as the driver reports them, so it
    /// counts everything on the device (this process's context, weights, caches and buffers, and
    /// any other process's allocations).
    pub fn device_memory_used(&self) -> Result<usize> {
        let (free, total) = self.cuda.memory()?;
        Ok(total.saturating_sub(free))
    }

    /// The device's memory bandwidth in bytes per second, measured with device-to-device copies
    /// (see [`copy_bandwidth`]): the bound a CUDA decode is compared with.
    pub fn memory_bandwidth(&self) -> Result<f64> {
        copy_bandwidth(&self.cuda, COPY_BANDWIDTH_BYTES, 5)
    }

    /// Runs `ids` (the next tokens of the sequence in `cache`) through the model on the device,
    /// appending their keys and values to `cache`, and returns logits as `which` asks: the
    /// device twin of [`Decoder::forward`], with the same checks, errors and RoPE rules (a table
    /// change recomputes the held tokens).
    pub fn forward(&self, ids: &[u32], cache: &mut CudaKvCache, which: Logits) -> Result<Vec<f32>> {
        self.forward_traced(ids, cache, which, None)
    }

    /// [`CudaDecoder::forward`], recording every Mixture-of-Experts layer's router logits and
    /// routing in `trace` when given, as [`Decoder::forward_with_router`] does on the CPU.
    pub fn forward_traced(
        &self,
        ids: &[u32],
        cache: &mut CudaKvCache,
        which: Logits,
        trace: Option<&mut RouterTrace>,
    ) -> Result<Vec<f32>> {
        let t = ids.len();
        crate::decoder::check_ids(&self.hp, ids)?;
        self.check_capacity(cache, t)?;
        let held = cache.len();
        let rope = cache.rope_scheme().unwrap_or(&self.rope).table((held + t).max(cache.planned_length()));
        let rows = match which {
            Logits::All => t,
            Logits::Last => 1,
        };
        if held > 0 && cache.rope_table().is_some_and(|old| *old != rope) {
            let all = crate::decoder::recompute_ids(cache.token_ids(), held, ids)?;
            cache.clear();
            return self.run(&all, cache, &rope, rows, trace);
        }
        self.run(ids, cache, &rope, rows, trace)
    }

    /// The forward pass proper: `ids` at the positions after the cache's tokens, RoPE with
    /// `rope`, logits for the last `out_rows` positions. Mirrors `Decoder::run` op for op.
    fn run(
        &self,
        ids: &[u32],
        cache: &mut CudaKvCache,
        rope: &RopeTable,
        out_rows: usize,
        mut trace: Option<&mut RouterTrace>,
    ) -> Result<Vec<f32>> {
        let started = std::time::Instant::now();
        let hp = &self.hp;
        let t = ids.len();
        let pos0 = cache.len();
        let end = u32::try_from(pos0 + t)
            .map_err(|_| Error::InvalidInput(format!("position {} does not fit in 32 bits", pos0 + t)))?;
        // The ids, then their positions: one upload.
        let host: Vec<u32> = ids.iter().copied().chain(pos0 as u32..end).collect();
        cache.rotated_with = Some(rope.clone());
        let (h, qd, kvd, vocab) = (hp.hidden_size, hp.q_dim(), hp.kv_dim(), hp.vocab_size);

        let cuda = &*self.cuda;
        let mut guard = self.scratch.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        guard.reserve(cuda, hp, t, out_rows)?;
        guard.set_rope(cuda, rope)?;
        let Scratch { buffers, logits, linear: work, inv_freq, moe: moe_scratch, graph, .. } = &mut *guard;
        let s = buffers.as_mut().expect("reserved above");
        let logits = logits.as_mut().expect("reserved above");
        cuda.upload_into(&host, &mut s.ids_positions)?;
        // A decode step whose launches need no host round trip (dense layers, and MoE layers
        // routed on the device): its launches recorded, then queued as one graph.
        let on_device = self.device_routing.load(std::sync::atomic::Ordering::Relaxed);
        let graphed = t == 1
            && trace.is_none()
            && self.stream.is_none()
            && self.graphs.load(std::sync::atomic::Ordering::Relaxed)
            // A profile times launches one by one.
            && !cuda.profiling()
            && self.layers.iter().all(|l| match &l.ffn {
                CudaFfn::Dense(_) => true,
                CudaFfn::Moe(moe) => on_device && moe.routes_on_device(1, &self.moe),
            });
        let recorder = if graphed { Some(Recorder::start(cuda)?) } else { None };
        let ids_d = s.ids_positions.slice(..t);
        let positions_d = s.ids_positions.slice(t..2 * t);
        let kv = &mut cache.kv;

        ops::embedding(cuda, &self.embed, &ids_d, t, &mut s.x.slice_mut(..t * h))?;
        // Where the products after a norm take two-digit activations and do not normalise their
        // own, the norm writes them too (`rms_norm_actq`), once for all the products and their
        // blocks.
        let actq_ok = h.is_multiple_of(32) && t <= LINEAR_MATVEC_TOKENS;
        let norms = self.fused_norms.load(std::sync::atomic::Ordering::Relaxed);
        let actq_len = if actq_ok { ops::actq_bytes(t, h) } else { 0 };
        for (li, layer) in self.layers.iter().enumerate() {
            // A streamed layer's weights: the next upload into the slot the layer before used
            // (its kernels are queued), then the wait for this layer's own.
            if let Some(stream) = &self.stream {
                if li > 0 {
                    stream.after(cuda, li - 1)?;
                }
                stream.before(cuda, li)?;
            }
            let mut normed = s.normed.slice_mut(..t * h);
            let x = s.x.slice(..t * h);
            let width = qd + 2 * kvd;
            let mut qkv = s.qkv.slice_mut(..t * width);
            // The stacked q/k/v product normalises its activations itself where it can; else the
            // norm's launch writes them (and their two-digit records where the products take
            // them).
            let normed_qkv = match &layer.qkv {
                Qkv::Stacked(l) if fuses_norm(norms, &l.weight, t) => Some(l),
                _ => None,
            };
            let qkv_q = actq_ok && normed_qkv.is_none() && layer.qkv.takes_actq(t);
            match normed_qkv {
                Some(l) => l.forward_normed(cuda, &x, &layer.attn_norm, hp.rms_norm_eps, &mut qkv, t)?,
                None => {
                    let mut xq = qkv_q.then(|| s.xq.slice_mut(..actq_len));
                    rms_norm(cuda, &x, &layer.attn_norm, hp.rms_norm_eps, t, &mut normed, xq.as_mut())?;
                }
            }
            let xq = s.xq.slice(..actq_len);
            let xq = qkv_q.then_some(&xq);
            let (mut q, mut k, mut v) = (s.q.slice_mut(..t * qd), s.k.slice_mut(..t * kvd), s.v.slice_mut(..t * kvd));
            let one_stacked = match &layer.qkv {
                Qkv::Split(parts) => {
                    let [lq, lk, lv] = &**parts;
                    lq.forward_q(cuda, &normed, xq, &mut q, t, work)?;
                    lk.forward_q(cuda, &normed, xq, &mut k, t, work)?;
                    lv.forward_q(cuda, &normed, xq, &mut v, t, work)?;
                    false
                }
                Qkv::Stacked(l) => {
                    if normed_qkv.is_none() {
                        l.forward_q(cuda, &normed, xq, &mut qkv, t, work)?;
                    }
                    if t > 1 {
                        ops::copy_cols(cuda, &qkv, &mut q, t, width, 0, qd)?;
                        ops::copy_cols(cuda, &qkv, &mut k, t, width, qd, kvd)?;
                        ops::copy_cols(cuda, &qkv, &mut v, t, width, qd + kvd, kvd)?;
                    }
                    t == 1
                }
            };
            // One token's stacked q, k and v lie one after the other: used where they are.
            let mut kv_part;
            let (mut q, mut k, v) = if one_stacked {
                let q_part;
                (q_part, kv_part) = qkv.split_at_mut(qd);
                let (k_part, v_part) = kv_part.split_at_mut(kvd);
                (q_part, k_part, v_part)
            } else {
                (q, k, v)
            };
            if let Some((qn, kn)) = &layer.qk_norm {
                // Per-head RMSNorm of q and k (Qwen3): one row per token and head.
                ops::rms_norm_inplace(cuda, &mut q, qn, hp.rms_norm_eps, t * hp.n_heads)?;
                ops::rms_norm_inplace(cuda, &mut k, kn, hp.rms_norm_eps, t * hp.n_kv_heads)?;
            }
            let args = RopeArgs {
                tokens: t,
                n_heads: hp.n_heads,
                n_kv_heads: hp.n_kv_heads,
                head_dim: hp.head_dim,
                attention_factor: rope.attention_factor,
                layout: hp.rope_layout,
            };
            match inv_freq.as_ref() {
                // RoPE and the KV append in one launch (k rotated on its way into the cache).
                Some(inv_freq) if fused() => {
                    kv.append_rotated(cuda, li, &mut q, &k, &v, &positions_d, inv_freq, &args)?
                }
                Some(inv_freq) => {
                    ops::rope_qk::<f32, _, _, _, _>(cuda, &mut q, &mut k, &positions_d, inv_freq, &args)?;
                    kv.append(cuda, li, &k, &v, t)?;
                }
                None => kv.append(cuda, li, &k, &v, t)?,
            }

            let params = AttentionParams {
                n_heads: hp.n_heads,
                n_kv_heads: hp.n_kv_heads,
                head_dim: hp.head_dim,
                scale: 1.0 / (hp.head_dim as f32).sqrt(),
                sliding_window: hp.layer_windows[li],
            };
            let mut attn = s.attn.slice_mut(..t * qd);
            ops::attention(cuda, kv, li, &q, t, &params, &mut attn)?;
            residual(cuda, &layer.o, &attn, &mut s.x.slice_mut(..t * h), &mut s.proj.slice_mut(..t * h), t, work)?;

            // A dense block whose paired gate/up product normalises its activations itself:
            // that product, then down with the residual add.
            if let CudaFfn::Dense(mlp) = &layer.ffn
                && let Some(w) = mlp.normed_gate_up(norms, t)
            {
                let mut act = s.act.slice_mut(..t * mlp.inter);
                let x = s.x.slice(..t * h);
                ops::matvec_normed(cuda, w, &x, &layer.ffn_norm, hp.rms_norm_eps, &mut act, t, MatvecStore::Swiglu)?;
                let (mut x, mut proj) = (s.x.slice_mut(..t * h), s.proj.slice_mut(..t * h));
                mlp.down_residual(cuda, &s.act, &mut x, &mut proj, t, work)?;
                continue;
            }
            // A MoE block routed on the device whose products all normalise their activations:
            // the residual stream itself goes in.
            if let CudaFfn::Moe(moe) = &layer.ffn
                && trace.is_none()
                && on_device
                && moe.routes_on_device(t, &self.moe)
                && moe.fuses_norm(norms)
            {
                let input: MoeInput<'_, CudaView<'_, f32>> =
                    MoeInput::Raw { norm: &layer.ffn_norm, eps: hp.rms_norm_eps };
                let mut x = s.x.slice_mut(..t * h);
                moe.forward_on_device(cuda, input, &mut x, h, &self.moe, moe_scratch, work)?;
                continue;
            }
            let ffn_q = actq_ok && matches!(&layer.ffn, CudaFfn::Dense(mlp) if mlp.gate_up.takes_actq(t));
            let mut xq = ffn_q.then(|| s.xq.slice_mut(..actq_len));
            rms_norm(cuda, &s.x.slice(..t * h), &layer.ffn_norm, hp.rms_norm_eps, t, &mut normed, xq.as_mut())?;
            let xq = s.xq.slice(..actq_len);
            let xq = ffn_q.then_some(&xq);
            let mut x = s.x.slice_mut(..t * h);
            match &layer.ffn {
                CudaFfn::Dense(mlp) => {
                    let mut proj = s.proj.slice_mut(..t * h);
                    let (products, act) = (&mut s.gate_up, &mut s.act);
                    mlp.forward_residual(cuda, &normed, xq, &mut x, &mut proj, t, products, act, work)?;
                }
                CudaFfn::Moe(moe) => {
                    let record = trace.as_deref_mut().map(|tr| tr.layer_mut(li));
                    moe.forward_residual(cuda, &normed, &mut x, t, h, &self.moe, on_device, moe_scratch, work, record)?;
                }
            }
        }

        if let Some(stream) = &self.stream {
            stream.after(cuda, self.layers.len() - 1)?;
        }
        cache.ids.extend_from_slice(ids);
        let rows = s.x.slice((t - out_rows) * h..t * h);
        let mut final_normed = s.normed.slice_mut(..out_rows * h);
        let mut logits = logits.slice_mut(..out_rows * vocab);
        if fuses_norm(norms, &self.lm_head, out_rows) {
            let (w, norm, eps) = (&self.lm_head, &self.norm, hp.rms_norm_eps);
            ops::matvec_normed(cuda, w, &rows, norm, eps, &mut logits, out_rows, MatvecStore::Write)?;
        } else {
            let head_q = h.is_multiple_of(32) && takes_actq(&self.lm_head, out_rows);
            let mut xq = head_q.then(|| s.xq.slice_mut(..ops::actq_bytes(out_rows, h)));
            rms_norm(cuda, &rows, &self.norm, hp.rms_norm_eps, out_rows, &mut final_normed, xq.as_mut())?;
            match xq {
                Some(xq) => ops::matvec_actq(cuda, &self.lm_head, &xq, &mut logits, out_rows, MatvecStore::Write)?,
                None => ops::linear(cuda, &self.lm_head, &final_normed, &mut logits, out_rows, work)?,
            }
        }
        if let Some(recorder) = recorder {
            let (launches, retired) = recorder.finish();
            if let GraphRun::Replayed(e) = LaunchGraph::run(graph, cuda, launches)? {
                // The kernels were queued one by one; stay off graphs from now on.
                self.graphs.store(false, std::sync::atomic::Ordering::Relaxed);
                eprintln!("strata: CUDA graphs turned off for this model: the decode step's graph failed ({e})");
            }
            drop(retired);
        }
        if t == 1 {
            use std::sync::atomic::Ordering::Relaxed;
            self.host_ns.fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
            self.host_passes.fetch_add(1, Relaxed);
        }
        Ok(cuda.download(&logits)?)
    }
}

/// `x += a W^T + b`, the residual connection of a projection: fused into the projection's launch
/// (the product rounded, then added, as the unfused ops round it) when it has no bias; else the
/// projection into `proj`, its bias, then the add (the CPU's order of roundings).
fn residual(
    cuda: &Cuda,
    l: &CudaLinear,
    a: &impl DevicePtr<f32>,
    x: &mut impl DevicePtrMut<f32>,
    proj: &mut (impl DevicePtrMut<f32> + DevicePtr<f32>),
    tokens: usize,
    scratch: &mut LinearScratch,
) -> Result<()> {
    if fused() && l.bias.is_none() {
        return Ok(ops::linear_add(cuda, &l.weight, a, x, tokens, scratch)?);
    }
    l.forward(cuda, a, proj, tokens, scratch)?;
    Ok(ops::add(cuda, x, proj)?)
}

/// One request's state on the device: the key/value blocks of every layer
/// ([`DeviceKvCache`]) and what the CPU's `KvCache` carries besides them: the request's RoPE
/// scheme, its planned length, the token ids held, and the RoPE table their keys were computed
/// with. Made by [`CudaDecoder::new_cache`].
pub struct CudaKvCache {
    kv: DeviceKvCache,
    rope_scheme: Option<RopeScheme>,
    planned_length: usize,
    rotated_with: Option<RopeTable>,
    ids: Vec<u32>,
}

impl std::fmt::Debug for CudaKvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKvCache")
            .field("kv", &self.kv)
            .field("rope_scheme", &self.rope_scheme)
            .field("planned_length", &self.planned_length)
            .finish_non_exhaustive()
    }
}

impl CudaKvCache {
    /// The request's RoPE scheme, if the cache carries one.
    pub fn rope_scheme(&self) -> Option<&RopeScheme> {
        self.rope_scheme.as_ref()
    }

    /// The planned total length (0: none; see [`CudaDecoder::plan`]).
    pub fn planned_length(&self) -> usize {
        self.planned_length
    }

    /// The ids of the tokens held.
    pub fn token_ids(&self) -> &[u32] {
        &self.ids
    }

    /// The table the cached keys are rotated with (`None` before the first forward pass).
    pub fn rope_table(&self) -> Option<&RopeTable> {
        self.rotated_with.as_ref()
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.kv.len()
    }

    /// Whether the cache holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.kv.is_empty()
    }

    /// Tokens per block.
    pub fn block_len(&self) -> usize {
        self.kv.block_len()
    }

    /// Device bytes of all key and value blocks.
    pub fn allocated_bytes(&self) -> usize {
        self.kv.allocated_bytes()
    }

    /// Drops every token and block (and the tokens' ids and RoPE table; the scheme and the plan
    /// stay), as `KvCache::clear` does.
    pub fn clear(&mut self) {
        self.kv.clear();
        self.rotated_with = None;
        self.ids.clear();
    }

    /// The key/value blocks themselves.
    pub fn device_cache(&self) -> &DeviceKvCache {
        &self.kv
    }
}

/// The activation buffers of a forward pass, sized for the longest call so far and reused.
struct Scratch {
    /// Tokens every buffer of `buffers` has room for.
    tokens: usize,
    buffers: Option<Buffers>,
    /// Rows of the vocabulary `logits` has room for (1 while only the last position is asked
    /// for).
    logits_rows: usize,
    logits: Option<CudaSlice<f32>>,
    /// What the linear layers keep between calls (dequantized weights for GEMMs).
    linear: LinearScratch,
    /// RoPE's inverse frequencies on the device (`None` when no dimension rotates), and the
    /// host values they hold.
    inv_freq: Option<CudaSlice<f32>>,
    inv_freq_host: Vec<f32>,
    /// The Mixture-of-Experts blocks' buffers.
    moe: MoeScratch,
    /// The graph of the last one-token pass ([`CudaDecoder::set_graphs`]).
    graph: Option<LaunchGraph>,
}

/// The per-token device buffers; each holds `tokens` rows.
struct Buffers {
    /// The pass's token ids, then their positions.
    ids_positions: CudaSlice<u32>,
    x: CudaSlice<f32>,
    normed: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    proj: CudaSlice<f32>,
    /// The stacked q/k/v products ([`Qkv::Stacked`]).
    qkv: CudaSlice<f32>,
    /// The gate and up products, one after the other (or paired, [`GateUp::Paired`]).
    gate_up: CudaSlice<f32>,
    act: CudaSlice<f32>,
    /// The normed activations quantized to two digits for the products after a norm, up to
    /// [`LINEAR_MATVEC_TOKENS`] rows (`ops::rms_norm_actq`).
    xq: CudaSlice<u8>,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            tokens: 0,
            buffers: None,
            logits_rows: 0,
            logits: None,
            linear: LinearScratch::new(),
            inv_freq: None,
            inv_freq_host: Vec::new(),
            moe: MoeScratch::default(),
            graph: None,
        }
    }

    /// Makes `rope`'s inverse frequencies the device's, uploading them only when they changed.
    fn set_rope(&mut self, cuda: &Cuda, rope: &RopeTable) -> Result<()> {
        if rope.inv_freq.is_empty() {
            self.inv_freq = None;
        } else if self.inv_freq.is_none() || self.inv_freq_host != rope.inv_freq {
            self.inv_freq = Some(cuda.upload(&rope.inv_freq)?);
        }
        self.inv_freq_host.clone_from(&rope.inv_freq);
        Ok(())
    }

    /// Makes room for `t` tokens and `rows` rows of logits, reallocating what is smaller. The
    /// old buffers are freed before the new ones are allocated, so that peak memory holds one
    /// set, not two.
    fn reserve(&mut self, cuda: &Cuda, hp: &Hparams, t: usize, rows: usize) -> Result<()> {
        if self.buffers.is_none() || self.tokens < t {
            self.buffers = None;
            let (h, qd, kvd, inter) = (hp.hidden_size, hp.q_dim(), hp.kv_dim(), hp.intermediate_size);
            let f = |n: usize| cuda.zeros::<f32>(t * n);
            self.buffers = Some(Buffers {
                ids_positions: cuda.zeros::<u32>(2 * t)?,
                x: f(h)?,
                normed: f(h)?,
                q: f(qd)?,
                k: f(kvd)?,
                v: f(kvd)?,
                attn: f(qd)?,
                proj: f(h)?,
                qkv: f(qd + 2 * kvd)?,
                gate_up: f(2 * inter)?,
                act: f(inter)?,
                xq: cuda.zeros::<u8>(ops::actq_bytes(t.min(LINEAR_MATVEC_TOKENS), h).max(16))?,
            });
            self.tokens = t;
        }
        if self.logits.is_none() || self.logits_rows < rows {
            self.logits = None;
            self.logits = Some(cuda.zeros::<f32>(rows * hp.vocab_size)?);
            self.logits_rows = rows;
        }
        Ok(())
    }
}

// The pass size above which prefill decodes weights to f32 for cuBLAS, as `vram` counts it.
const _: () = assert!(LINEAR_MATVEC_TOKENS == crate::vram::LINEAR_MATVEC_TOKENS);

/// The host-to-device copy rate from page-locked memory, in bytes per second: `bytes` copied
/// from a pinned buffer to a device buffer on the copy stream, `reps` times after one warm-up
/// copy, timed on the host around each copy and its completion, the median taken. What the
/// streamed layers of a model placed under `--max-vram` come through (PCIe or NVLink-C2C).
pub fn upload_bandwidth(cuda: &Cuda, bytes: usize, reps: usize) -> Result<f64> {
    let n = bytes.max(1);
    let src = Pinned::new(cuda, n)?;
    let dst = cuda.zeros::<u8>(n)?;
    let copy = || -> Result<f64> {
        let start = std::time::Instant::now();
        let upload = cuda.upload_async_shared(&src, n, &dst)?;
        cuda.copy_stream().synchronize().map_err(|e| KernelError::Driver {
            op: "upload_bandwidth: synchronize".into(),
            message: format!("{e:?}"),
        })?;
        drop(upload);
        Ok(start.elapsed().as_secs_f64())
    };
    copy()?;
    let mut secs = (0..reps.max(1)).map(|_| copy()).collect::<Result<Vec<f64>>>()?;
    secs.sort_by(f64::total_cmp);
    Ok(n as f64 / secs[secs.len() / 2].max(1e-9))
}

/// Bytes of each buffer of the bandwidth measurement (two are allocated).
pub const COPY_BANDWIDTH_BYTES: usize = 1 << 30;

/// The device's memory bandwidth in bytes per second: copies `bytes` from one device buffer to
/// another (`cuMemcpyDtoDAsync` on the compute stream), `reps` times timed with events after
/// one warm-up copy, and divides the bytes moved (read plus written, `2 × bytes`) by the median
/// time. A copy is the plainest streaming access there is, so this is what a memory-bound
/// kernel can hope to reach, a little under the datasheet figure.
///
/// `bytes` shrinks (halving, down to 64 MiB) when two buffers of it would take more than three
/// quarters of the free memory.
pub fn copy_bandwidth(cuda: &Cuda, bytes: usize, reps: usize) -> Result<f64> {
    let driver =
        |op: &'static str| move |e: DriverError| KernelError::Driver { op: op.to_string(), message: format!("{e:?}") };
    let (free, _) = cuda.memory()?;
    let mut n = bytes.max(1);
    while n > (64 << 20) && 2 * n > free / 4 * 3 {
        n /= 2;
    }
    let src = cuda.zeros::<u8>(n)?;
    let mut dst = cuda.zeros::<u8>(n)?;
    let stream = cuda.stream();
    stream.memcpy_dtod(&src, &mut dst).map_err(driver("copy_bandwidth: memcpy_dtod"))?;
    let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let mut ms = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let start = stream.record_event(timing).map_err(driver("copy_bandwidth: record_event"))?;
        stream.memcpy_dtod(&src, &mut dst).map_err(driver("copy_bandwidth: memcpy_dtod"))?;
        let stop = stream.record_event(timing).map_err(driver("copy_bandwidth: record_event"))?;
        ms.push(start.elapsed_ms(&stop).map_err(driver("copy_bandwidth: elapsed_ms"))?);
    }
    ms.sort_by(f32::total_cmp);
    let median = f64::from(ms[ms.len() / 2]);
    if median <= 0.0 {
        return Err(KernelError::Driver {
            op: "copy_bandwidth".into(),
            message: format!("a {n}-byte copy timed at {median} ms"),
        }
        .into());
    }
    Ok(2.0 * n as f64 / (median * 1e-3))
}
