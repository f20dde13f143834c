//! Mixture-of-Experts blocks on a CUDA device: [`CudaMoe`], the device twin of
//! [`MoeLayer::forward`].
//!
//! Routing runs on the host with the CPU's own rule ([`moe::route`]), so capacity limits, dynamic
//! top-k and the router trace behave exactly as on the CPU: the router logits come down (tokens x
//! experts floats, one copy per MoE layer and pass, which waits for the device), and the routes go
//! up as one list of token indices and one of weights. Then, as `MoeLayer::forward` does, each
//! expert with tokens runs once over all of them (their rows gathered when the pass has more than
//! one token), its outputs are added to the block's output weighted, expert by expert in index
//! order (`o += y * w`), a shared expert's output is added scaled by the sigmoid of its gate, and
//! the block's output is added to the residual stream. Every weight stays in device memory: experts
//! streamed from an offload pack are refused when the decoder is built.

use strata_kernels::Cuda;
use strata_kernels::cuda::CudaSlice;
use strata_kernels::cuda::cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use strata_kernels::cuda::ops::{self, LinearScratch};

use crate::Result;
use crate::cuda_decoder::{CudaLinear, CudaMlp};
use crate::moe::{self, LayerRecord, MoeLayer, MoeOptions};

/// One MoE block on the device: the router, every expert, and the shared expert with its gate.
pub(crate) struct CudaMoe {
    router: CudaLinear,
    n_experts: usize,
    top_k: usize,
    renormalize: bool,
    experts: Vec<CudaMlp>,
    shared: Option<(CudaMlp, CudaLinear)>,
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
}

/// `buf`, reallocated (zeroed) when it holds fewer than `len` elements.
fn grown<'a, T: DeviceRepr + ValidAsZeroBits>(
    cuda: &Cuda,
    buf: &'a mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<&'a mut CudaSlice<T>> {
    if buf.as_ref().is_none_or(|b| b.len() < len) {
        *buf = None;
        *buf = Some(cuda.zeros::<T>(len.max(1))?);
    }
    Ok(buf.as_mut().expect("allocated above"))
}

impl CudaMoe {
    /// Uploads `moe`'s router, experts and shared expert.
    pub(crate) fn upload(cuda: &Cuda, moe: &MoeLayer) -> Result<CudaMoe> {
        let router = moe.router();
        let shared = match moe.shared_expert() {
            Some(s) => Some((CudaMlp::upload(cuda, &s.mlp)?, CudaLinear::upload(cuda, &s.gate)?)),
            None => None,
        };
        Ok(CudaMoe {
            router: CudaLinear::upload(cuda, &router.weight)?,
            n_experts: router.num_experts(),
            top_k: router.top_k(),
            renormalize: router.renormalize(),
            experts: moe.experts().iter().map(|e| CudaMlp::upload(cuda, e)).collect::<Result<_>>()?,
            shared,
        })
    }

    /// Runs the block over `normed` (`tokens` rows of `hidden`) and adds its output to `x` (the
    /// residual stream, the same rows), routing with `options`; appends the router logits and the
    /// routing to `record` when given.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_residual(
        &self,
        cuda: &Cuda,
        normed: &impl DevicePtr<f32>,
        x: &mut impl DevicePtrMut<f32>,
        tokens: usize,
        hidden: usize,
        options: &MoeOptions,
        scratch: &mut MoeScratch,
        work: &mut LinearScratch,
        record: Option<&mut LayerRecord>,
    ) -> Result<()> {
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
        let inter = self.experts.iter().map(|m| m.inter).chain(self.shared.iter().map(|(m, _)| m.inter)).max();
        let inter = inter.unwrap_or(0);
        let products = grown(cuda, &mut scratch.products, 2 * t * inter)?;
        let act = grown(cuda, &mut scratch.act, t * inter)?;
        let y = grown(cuda, &mut scratch.y, t * h)?;
        let rows = grown(cuda, &mut scratch.rows, t * h)?;
        let (idx_d, w_d) = (scratch.idx.as_ref().expect("grown above"), scratch.weights.as_ref().expect("grown above"));
        let mut at = 0;
        for (expert, group) in self.experts.iter().zip(&groups) {
            let n = group.len();
            if n == 0 {
                continue;
            }
            let (idx, w) = (idx_d.slice(at..at + n), w_d.slice(at..at + n));
            let idx_list = &idx_host[at..at + n];
            at += n;
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
}
