//! Mixture-of-Experts blocks on a CUDA device: [`CudaMoe`], the device twin of
//! [`MoeLayer::forward`].
//!
//! Two ways, the same experts and the same arithmetic:
//!
//! - **On the device** (a decode step: one token, no router trace asked for). The router's logits
//!   go through top-k gating on the device (`ops::topk_gating`, or its dynamic-k twin), whose
//!   expert ids and weights stay there; one launch computes every chosen expert's gate/up product
//!   with SwiGLU and one its down product, each slot's weights looked up by its id in a device
//!   table (`ops::matvec_experts`); one launch adds the slots' outputs weighted, in the order of
//!   the experts' indices, and a shared expert's gated output, to the residual stream
//!   (`ops::moe_combine`). Nothing waits for the
//!   device, so a decode step of a MoE model can be one CUDA graph too. Capacity limits cannot
//!   bind a single token (every expert takes at least one token), so they need nothing here. The
//!   device's softmax differs from the CPU's by a few ulp in the weights. A token whose router
//!   gives NaN probabilities gets NaN outputs (the host path's error needs a synchronisation).
//!   It takes experts whose gate and up weights are paired and of one dtype and shape, with
//!   no biases ([`CudaMoe::upload`] builds the tables then), at most 256 experts and 32 per token.
//!   With the decoder's fused norms the block takes the residual stream itself
//!   ([`MoeInput::Raw`]): the router, the experts' gate/up and a shared expert's products each
//!   normalise it as they stage it, so the norm before the block is not launched.
//! - **On the host** (prefill, router traces, and models the device way does not take). Routing
//!   runs with the CPU's own rule ([`moe::route`]), so capacity limits, dynamic top-k and the
//!   router trace behave exactly as on the CPU: the router logits come down (tokens x experts
//!   floats, one copy per MoE layer and pass, which waits for the device), and the routes go up as
//!   one list of token indices and one of weights. Then, as `MoeLayer::forward` does, each expert
//!   with tokens runs once over all of them (their rows gathered when the pass has more than one
//!   token), and its outputs are added to the block's output weighted, expert by expert in index
//!   order (`o += y * w`).
//!
//! Either way a shared expert's output is added scaled by the sigmoid of its gate, and the block's
//! output is added to the residual stream. Experts streamed from an offload pack are refused when
//! the decoder is built. Under a GPU ceiling the experts may stay in host memory, in a device
//! expert cache (`cuda_experts`): such a layer always routes on the host, and its experts run
//! from the slots the cache brings them into, in the same order.

use std::sync::Arc;

use strata_kernels::Cuda;
use strata_kernels::cuda::CudaSlice;
use strata_kernels::cuda::cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use strata_kernels::cuda::ops::{self, ExpertWeights, LinearScratch, MatvecStore};
use strata_kernels::cuda::params::{STRATA_GATING_MAX_EXPERTS, STRATA_GATING_MAX_K};

use crate::cuda_decoder::{CudaLinear, CudaMlp};
use crate::cuda_experts::DeviceExperts;
use crate::cuda_stream::Placer;
use crate::moe::{self, LayerRecord, Mlp, MoeLayer, MoeOptions, Routing};
use crate::{Error, Result};

/// The activations of a MoE block routed on the device: the rows the RMSNorm before it wrote, or
/// the residual stream itself, which every product of the block normalises with the norm's
/// weight and epsilon as it stages it (`ops::matvec_normed`: bit for bit the same products).
pub(crate) enum MoeInput<'a, N> {
    Normed(&'a N),
    Raw { norm: &'a CudaSlice<f32>, eps: f32 },
}

impl<N> Clone for MoeInput<'_, N> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<N> Copy for MoeInput<'_, N> {}

/// One MoE block on the device: the router, every expert, and the shared expert with its gate.
pub(crate) struct CudaMoe {
    router: CudaLinear,
    n_experts: usize,
    top_k: usize,
    renormalize: bool,
    /// The experts on the device (empty when they are in a device expert cache).
    experts: Vec<CudaMlp>,
    /// The device expert cache the experts are in, and the number of this layer's first there
    /// (`cuda_experts`): the layer then routes on the host.
    cached: Option<(Arc<DeviceExperts>, usize)>,
    /// The experts' intermediate width (the widest).
    inter: usize,
    shared: Option<(CudaMlp, CudaLinear)>,
    /// The experts' weights as device tables, for routing on the device; `None` when the experts
    /// do not allow it (see the module's documentation) or are in a device expert cache.
    tables: Option<ExpertTables>,
}

/// Every expert's paired gate/up weight and its down weight, as tables of device addresses.
struct ExpertTables {
    gate_up: ExpertWeights,
    down: ExpertWeights,
    /// The intermediate width (rows of one expert's gate).
    inter: usize,
}

impl ExpertTables {
    /// The tables of `experts`, or `None` when one of them is not paired, has a bias, or differs
    /// from the others in dtype or shape, or the router is wider than top-k gating takes.
    fn new(cuda: &Cuda, experts: &[CudaMlp]) -> Result<Option<ExpertTables>> {
        if experts.is_empty() || experts.len() > STRATA_GATING_MAX_EXPERTS as usize {
            return Ok(None);
        }
        let Some(pairs) = experts.iter().map(CudaMlp::paired).collect::<Option<Vec<_>>>() else {
            return Ok(None);
        };
        let (first_gu, first_down) = pairs[0];
        let alike =
            |a: &strata_tensor::Tensor, b: &strata_tensor::Tensor| a.dtype() == b.dtype() && a.shape() == b.shape();
        if !pairs.iter().all(|(gu, d)| alike(gu, first_gu) && alike(d, first_down)) {
            return Ok(None);
        }
        let gate_up: Vec<_> = pairs.iter().map(|(gu, _)| (*gu).clone()).collect();
        let down: Vec<_> = pairs.iter().map(|(_, d)| (*d).clone()).collect();
        Ok(Some(ExpertTables {
            gate_up: ExpertWeights::new(cuda, &gate_up)?,
            down: ExpertWeights::new(cuda, &down)?,
            inter: experts[0].inter,
        }))
    }
}

/// The device buffers of the MoE blocks, grown on demand and reused from pass to pass.
#[derive(Default)]
pub(crate) struct MoeScratch {
    logits: Option<CudaSlice<f32>>,
    out: Option<CudaSlice<f32>>,
    rows: Option<CudaSlice<f32>>,
    products: Option<CudaSlice<f32>>,
    act: Option<CudaSlice<f32>>,
    y: Option<CudaSlice<f32>>,
    gate: Option<CudaSlice<f32>>,
    idx: Option<CudaSlice<u32>>,
    weights: Option<CudaSlice<f32>>,
    counts: Option<CudaSlice<u32>>,
}

/// `buf`, replaced (zeroed) when it holds fewer than `len` elements; the old one is kept while a
/// decode graph being recorded may still use it (`strata_kernels::cuda::grown`).
fn grown<'a, T: DeviceRepr + ValidAsZeroBits + 'static>(
    cuda: &Cuda,
    buf: &'a mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<&'a mut CudaSlice<T>> {
    Ok(strata_kernels::cuda::grown(cuda, buf, len.max(1), len.max(1))?)
}

impl CudaMoe {
    /// Uploads `moe`'s router, experts and shared expert; with `cached`, the experts stay in that
    /// device expert cache (from its expert number `cached.1` on) and only the rest is uploaded.
    pub(crate) fn upload(
        cuda: &Cuda,
        moe: &MoeLayer,
        place: &mut Placer<'_>,
        cached: Option<(Arc<DeviceExperts>, usize)>,
    ) -> Result<CudaMoe> {
        let router = moe.router();
        let shared = match moe.shared_expert() {
            Some(s) => Some((CudaMlp::upload(cuda, &s.mlp, place)?, CudaLinear::upload(cuda, &s.gate, place)?)),
            None => None,
        };
        let resident = moe.resident_experts().ok_or_else(|| {
            Error::Unsupported("a MoE layer whose experts are in the offload store does not run on CUDA".into())
        })?;
        let experts: Vec<CudaMlp> = match cached {
            Some(_) => Vec::new(),
            None => resident.iter().map(|e| CudaMlp::upload(cuda, e, place)).collect::<Result<_>>()?,
        };
        Ok(CudaMoe {
            router: CudaLinear::upload(cuda, &router.weight, place)?,
            n_experts: router.num_experts(),
            top_k: router.top_k(),
            renormalize: router.renormalize(),
            tables: if cached.is_some() { None } else { ExpertTables::new(cuda, &experts)? },
            inter: resident.iter().map(Mlp::intermediate_size).max().unwrap_or(0),
            experts,
            cached,
            shared,
        })
    }

    /// Whether a pass routed on the device can take the residual stream itself, every product
    /// of the block normalising its activations ([`MoeInput::Raw`], when `on`: the decoder's
    /// fused norms): the router, the experts' gate/up and a shared expert's gate/up and gate.
    pub(crate) fn fuses_norm(&self, on: bool) -> bool {
        let Some(tables) = &self.tables else { return false };
        let shared = match &self.shared {
            Some((mlp, gate)) => mlp.normed_gate_up(on, 1).is_some() && gate.fuses_norm(on, 1),
            None => true,
        };
        on && self.router.fuses_norm(on, 1) && ops::fuses_norm(tables.gate_up.first(), 1) && shared
    }

    /// Whether a pass of `tokens` tokens routed with `options`, with no router trace, routes on
    /// the device (when the decoder lets it).
    pub(crate) fn routes_on_device(&self, tokens: usize, options: &MoeOptions) -> bool {
        tokens == 1
            && self.tables.is_some()
            && options.check(self.n_experts, self.top_k).is_ok_and(|k| k <= STRATA_GATING_MAX_K as usize)
    }

    /// Runs the block over `normed` (`tokens` rows of `hidden`) and adds its output to `x` (the
    /// residual stream, the same rows), routing with `options`: on the device when `on_device`
    /// and [`CudaMoe::routes_on_device`] allow it (never with a `record`), else on the host;
    /// appends the router logits and the routing to `record` when given.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_residual(
        &self,
        cuda: &Cuda,
        normed: &impl DevicePtr<f32>,
        x: &mut (impl DevicePtrMut<f32> + DevicePtr<f32>),
        tokens: usize,
        hidden: usize,
        options: &MoeOptions,
        on_device: bool,
        scratch: &mut MoeScratch,
        work: &mut LinearScratch,
        record: Option<&mut LayerRecord>,
    ) -> Result<()> {
        if on_device && record.is_none() && self.routes_on_device(tokens, options) {
            return self.forward_on_device(cuda, MoeInput::Normed(normed), x, hidden, options, scratch, work);
        }
        let (t, h, e) = (tokens, hidden, self.n_experts);
        let logits_d = grown(cuda, &mut scratch.logits, t * e)?;
        let mut logits_view = logits_d.slice_mut(..t * e);
        self.router.forward(cuda, normed, &mut logits_view, t, work)?;
        let logits = cuda.download(&logits_view)?;
        let routes = moe::route(&logits, e, self.top_k, self.renormalize, options)?;

        // Each expert's tokens and weights, in token order, as `MoeLayer::forward` groups them;
        // all experts' lists one after the other, uploaded at once.
        let mut groups: Vec<Vec<(u32, f32)>> = vec![Vec::new(); e];
        for (i, (&id, &w)) in routes.ids.iter().zip(&routes.weights).enumerate() {
            if let Some(group) = groups.get_mut(id as usize) {
                group.push(((i / routes.slots) as u32, w));
            }
        }
        let idx_host: Vec<u32> = groups.iter().flatten().map(|&(t, _)| t).collect();
        let w_host: Vec<f32> = groups.iter().flatten().map(|&(_, w)| w).collect();
        let slots = idx_host.len();
        cuda.upload_into(&idx_host, grown(cuda, &mut scratch.idx, slots)?)?;
        cuda.upload_into(&w_host, grown(cuda, &mut scratch.weights, slots)?)?;

        let out = grown(cuda, &mut scratch.out, t * h)?;
        let mut out = out.slice_mut(..t * h);
        cuda.memset_zero(&mut out)?;
        let inter = self.shared.as_ref().map_or(self.inter, |(m, _)| m.inter.max(self.inter));
        let products = grown(cuda, &mut scratch.products, 2 * t * inter)?;
        let act = grown(cuda, &mut scratch.act, t * inter)?;
        let y = grown(cuda, &mut scratch.y, t * h)?;
        let rows = grown(cuda, &mut scratch.rows, t * h)?;
        let (idx_d, w_d) = (scratch.idx.as_ref().expect("grown above"), scratch.weights.as_ref().expect("grown above"));
        // The experts with tokens, in ascending order; each one's tokens start at `starts[e]` of
        // the lists. From a device expert cache they come in rounds of at most its slots.
        let used: Vec<usize> = (0..e).filter(|&i| !groups[i].is_empty()).collect();
        let starts: Vec<usize> = groups.iter().scan(0, |at, g| Some(std::mem::replace(at, *at + g.len()))).collect();
        let round_len = self.cached.as_ref().map_or(used.len(), |(c, _)| c.slots()).max(1);
        for round in used.chunks(round_len) {
            let slots = match &self.cached {
                Some((cache, first)) => {
                    let units: Vec<usize> = round.iter().map(|&i| first + i).collect();
                    cache.bring(cuda, &units)?
                }
                None => Vec::new(),
            };
            for (j, &i) in round.iter().enumerate() {
                let expert = match &self.cached {
                    Some((cache, _)) => {
                        cache.ready(cuda, slots[j])?;
                        cache.mlp(slots[j])
                    }
                    None => &self.experts[i],
                };
                let (at, n) = (starts[i], groups[i].len());
                let (idx, w) = (idx_d.slice(at..at + n), w_d.slice(at..at + n));
                let idx_list = &idx_host[at..at + n];
                let mut y_rows = y.slice_mut(..n * h);
                if t == 1 {
                    // One token: the expert reads the normed row where it is.
                    expert.forward(cuda, normed, &mut y_rows, 1, products, act, work)?;
                } else {
                    let mut gathered = rows.slice_mut(..n * h);
                    ops::gather_rows(cuda, normed, t, &idx, idx_list, &mut gathered, h)?;
                    expert.forward(cuda, &gathered, &mut y_rows, n, products, act, work)?;
                }
                ops::scatter_add_rows(cuda, &y_rows, &idx, idx_list, &w, &mut out, t, h)?;
            }
        }
        if let Some((mlp, gate)) = &self.shared {
            let mut y_rows = y.slice_mut(..t * h);
            mlp.forward(cuda, normed, &mut y_rows, t, products, act, work)?;
            let g = grown(cuda, &mut scratch.gate, t)?;
            let mut g = g.slice_mut(..t);
            gate.forward(cuda, normed, &mut g, t, work)?;
            ops::add_sigmoid_scaled(cuda, &y_rows, &g, &mut out, t, h)?;
        }
        if let Some(record) = record {
            record.append(&logits, &routes, e);
        }
        Ok(ops::add(cuda, x, &out)?)
    }

    /// [`CudaMoe::forward_residual`] of one token, routed on the device (the module's
    /// documentation): router, gating, the chosen experts' gate/up and down products in one
    /// launch each, and their weighted sum added to `x`; a shared expert as on the host path.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_on_device<N, X>(
        &self,
        cuda: &Cuda,
        input: MoeInput<'_, N>,
        x: &mut X,
        h: usize,
        options: &MoeOptions,
        scratch: &mut MoeScratch,
        work: &mut LinearScratch,
    ) -> Result<()>
    where
        N: DevicePtr<f32>,
        X: DevicePtrMut<f32> + DevicePtr<f32>,
    {
        let tables = self.tables.as_ref().expect("routes_on_device checked");
        let (e, inter) = (self.n_experts, tables.inter);
        let k = options.check(e, self.top_k)?;
        let logits = grown(cuda, &mut scratch.logits, e)?;
        let mut logits = logits.slice_mut(..e);
        match input {
            MoeInput::Normed(n) => self.router.forward(cuda, n, &mut logits, 1, work)?,
            MoeInput::Raw { norm, eps } => self.router.forward_normed(cuda, &*x, norm, eps, &mut logits, 1)?,
        }
        let mut ids = grown(cuda, &mut scratch.idx, k)?.slice_mut(..k);
        let mut weights = grown(cuda, &mut scratch.weights, k)?.slice_mut(..k);
        match options.routing {
            Routing::DynamicTopK { p, min_experts } if p < 1.0 => {
                let mut counts = grown(cuda, &mut scratch.counts, 1)?.slice_mut(..1);
                let (ids, weights, renorm) = (&mut ids, &mut weights, self.renormalize);
                ops::topk_gating_dynamic(cuda, &logits, e, min_experts, k, p, renorm, ids, weights, &mut counts)?
            }
            _ => ops::topk_gating(cuda, &logits, e, k, self.renormalize, &mut ids, &mut weights)?,
        }
        let mut act = grown(cuda, &mut scratch.act, k * inter)?.slice_mut(..k * inter);
        let swiglu = MatvecStore::Swiglu;
        match input {
            MoeInput::Normed(n) => ops::matvec_experts(cuda, &tables.gate_up, &ids, n, true, &mut act, swiglu)?,
            MoeInput::Raw { norm, eps } => {
                ops::matvec_experts_normed(cuda, &tables.gate_up, &ids, &*x, norm, eps, &mut act, swiglu)?
            }
        }
        let mut ys = grown(cuda, &mut scratch.y, k * h)?.slice_mut(..k * h);
        ops::matvec_experts(cuda, &tables.down, &ids, &act, false, &mut ys, MatvecStore::Write)?;
        // A shared expert's output and gate, which the combine adds after the routed experts'.
        if let Some((mlp, gate)) = &self.shared {
            let mut y = grown(cuda, &mut scratch.rows, h)?.slice_mut(..h);
            let mut g = grown(cuda, &mut scratch.gate, 1)?.slice_mut(..1);
            let act = grown(cuda, &mut scratch.act, mlp.inter)?;
            match input {
                MoeInput::Normed(n) => {
                    let products = grown(cuda, &mut scratch.products, 2 * mlp.inter)?;
                    mlp.forward(cuda, n, &mut y, 1, products, act, work)?;
                    gate.forward(cuda, n, &mut g, 1, work)?;
                }
                MoeInput::Raw { norm, eps } => {
                    mlp.forward_normed(cuda, &*x, norm, eps, &mut y, 1, act, work)?;
                    gate.forward_normed(cuda, &*x, norm, eps, &mut g, 1)?;
                }
            }
        }
        let shared = self.shared.as_ref().and(scratch.rows.as_ref().zip(scratch.gate.as_ref()));
        let shared = shared.map(|(y, g)| (y.slice(..h), g.slice(..1)));
        let shared = shared.as_ref().map(|(y, g)| (y, g));
        Ok(ops::moe_combine(cuda, &ys, &ids, &weights, shared, x, 1, k, e, h, true)?)
    }
}
