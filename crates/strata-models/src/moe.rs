//! Mixture-of-Experts: the router, the expert layer, capacity limits, dynamic top-k and the
//! router losses.
//!
//! Mirrors transformers 5's sparse MoE blocks (`MixtralSparseMoeBlock`,
//! `Qwen2MoeSparseMoeBlock`, `Qwen3MoeSparseMoeBlock`): the router is a bias-free linear layer
//! `[n_experts, hidden]` whose logits go through a softmax in f32, the `k` most probable
//! experts are kept (ties to the lower expert index), and their probabilities are divided by
//! their sum when the family renormalises (Mixtral always; Qwen when `norm_topk_prob`). Each
//! expert is a SwiGLU MLP; the layer's output is the routing-weighted sum of the chosen
//! experts' outputs, plus, for Qwen2-MoE, a shared expert scaled by
//! `sigmoid(shared_expert_gate(x))`.
//!
//! The expert computation is grouped by expert: the routing of every token of a pass is known
//! first, then each expert that received tokens runs once, as a matmul over the rows routed
//! to it (a matvec when it got one), and adds its weighted output to those rows. Experts run in
//! ascending index order, as transformers' `index_add_` loop does.
//!
//! Runtime options ([`MoeOptions`]) change the routing at inference: another `k`
//! (`active_experts`), dynamic top-k ([`Routing::DynamicTopK`]) and a capacity limit per expert
//! (`capacity_factor`). [`RouterTrace`] records what the routers saw, from which
//! [`load_balancing_loss`] and [`router_z_loss`] compute the training losses exactly as
//! transformers defines them.
//!
//! Expert weights are kept as one [`Mlp`] per expert whatever the checkpoint layout (one tensor
//! per expert, transformers' fused `gate_up_proj`/`down_proj` stacks, or GGUF's
//! `ffn_*_exps` stacks): stacked tensors are viewed per expert without a copy. An offload pack
//! stores each expert as a unit of its own (`PerExpertSource` shows any layout one tensor per
//! expert and projection), and a layer placed in the store ([`PlacedExperts`]) asks it for the
//! experts its router picked: cached in RAM, or read from the pack while the earlier ones run.

use std::path::Path;
use std::sync::Arc;

use strata_store::{Store, UnitHandle};
use strata_tensor::cpu;
use strata_tensor::{ByteSource, Device, Tensor};

use crate::decoder::{Linear, Loader, TensorSource, UnitSource};
use crate::hparams::MoeHparams;
use crate::{Error, Result};

/// A SwiGLU MLP: `down(silu(gate(x)) * up(x))`. The dense feed-forward block, one expert, or
/// Qwen2-MoE's shared expert.
#[derive(Clone, Debug)]
pub struct Mlp {
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
}

impl Mlp {
    /// Builds an MLP from its three projections (`gate`/`up`: `[inter, hidden]`, `down`:
    /// `[hidden, inter]`).
    pub fn new(gate: Linear, up: Linear, down: Linear) -> Mlp {
        Mlp { gate, up, down }
    }

    /// The hidden width of the MLP (rows of `gate`).
    pub fn intermediate_size(&self) -> usize {
        self.gate.out_features()
    }

    /// Bytes of the three projections.
    pub fn byte_len(&self) -> usize {
        self.gate.byte_len() + self.up.byte_len() + self.down.byte_len()
    }

    /// `out[t, hidden] = down(silu(gate(x)) * up(x))` for `t = x.len() / hidden` rows.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        let hidden = self.down.out_features();
        let rows = out.len() / hidden.max(1);
        let inter = self.intermediate_size();
        let mut gate = vec![0f32; rows * inter];
        let mut up = vec![0f32; rows * inter];
        Linear::forward_many(&[&self.gate, &self.up], x, &mut [&mut gate, &mut up])?;
        let mut act = vec![0f32; rows * inter];
        cpu::swiglu(&gate, &up, &mut act)?;
        self.down.forward(&act, out)
    }
}

/// How a router picks each token's experts.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Routing {
    /// The `k` most probable experts.
    #[default]
    TopK,
    /// Per token, the fewest experts (in descending order of probability) whose probabilities
    /// add up to `p`, at least `min_experts` and at most `k`. `p >= 1` is plain top-k.
    DynamicTopK {
        /// The cumulative probability to reach.
        p: f32,
        /// The fewest experts a token may get.
        min_experts: usize,
    },
}

/// Inference-time routing options of a MoE model (the default is the model's own routing).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MoeOptions {
    /// Plain or dynamic top-k.
    pub routing: Routing,
    /// Experts per token instead of the model's `num_experts_per_tok` (the most, for dynamic
    /// top-k).
    pub active_experts: Option<usize>,
    /// Each expert takes at most `ceil(capacity_factor * tokens * k / n_experts)` tokens of a
    /// forward pass; `None` (or `+inf`) is no limit. See [`route`] for what happens to the
    /// tokens that overflow.
    pub capacity_factor: Option<f32>,
}

impl MoeOptions {
    /// Checks the options against a model with `n_experts` experts and `top_k` experts per
    /// token, returning the `k` they route with.
    pub fn check(&self, n_experts: usize, top_k: usize) -> Result<usize> {
        let bad = |what: String| Err(Error::InvalidMoeOptions { what });
        let k = self.active_experts.unwrap_or(top_k);
        if k == 0 || k > n_experts {
            return bad(format!("active_experts = {k} is outside 1..={n_experts} (the model's experts)"));
        }
        if let Routing::DynamicTopK { p, min_experts } = self.routing {
            if !p.is_finite() || p <= 0.0 {
                return bad(format!("dynamic top-k threshold p = {p} is not a positive number"));
            }
            if min_experts == 0 || min_experts > k {
                return bad(format!("min_experts = {min_experts} is outside 1..={k} (the active experts)"));
            }
        }
        if let Some(cf) = self.capacity_factor
            && (cf.is_nan() || cf <= 0.0)
        {
            return bad(format!("capacity_factor = {cf} is not a positive number"));
        }
        Ok(k)
    }
}

/// A MoE router: the gate projection and the family's top-k rule.
#[derive(Clone, Debug)]
pub struct Router {
    pub(crate) weight: Linear,
    pub(crate) top_k: usize,
    pub(crate) renormalize: bool,
}

impl Router {
    /// A router over `weight` (`[n_experts, hidden]`, no bias) that keeps `top_k` experts and
    /// renormalises their weights when `renormalize`.
    pub fn new(weight: Linear, top_k: usize, renormalize: bool) -> Router {
        Router { weight, top_k, renormalize }
    }

    /// Experts to choose from.
    pub fn num_experts(&self) -> usize {
        self.weight.out_features()
    }

    /// The model's experts per token.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Whether the chosen experts' weights are divided by their sum.
    pub fn renormalize(&self) -> bool {
        self.renormalize
    }

    /// The router logits `[tokens, n_experts]` of `x` (`[tokens, hidden]`).
    pub fn logits(&self, x: &[f32], tokens: usize) -> Result<Vec<f32>> {
        let mut logits = vec![0f32; tokens * self.num_experts()];
        self.weight.forward(x, &mut logits)?;
        Ok(logits)
    }

    /// Routes the tokens of `logits` with this router's rule and `options` (see [`route`]).
    pub fn route(&self, logits: &[f32], options: &MoeOptions) -> Result<Routes> {
        route(logits, self.num_experts(), self.top_k, self.renormalize, options)
    }
}

/// Where each token of a pass goes: `slots` entries per token, each an expert id and its
/// weight; unused slots (dynamic top-k, or dropped by a full capacity) hold id `u32::MAX` and
/// weight 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Routes {
    /// Slots per token.
    pub slots: usize,
    /// Expert ids, `[tokens, slots]`.
    pub ids: Vec<u32>,
    /// Routing weights, `[tokens, slots]`.
    pub weights: Vec<f32>,
    /// Experts each token uses (its slots holding an expert).
    pub active: Vec<u32>,
    /// Slots moved to another expert because their expert was full.
    pub reassigned: usize,
    /// Slots left empty because no expert the token did not already use had room.
    pub dropped: usize,
}

impl Routes {
    /// Tokens routed.
    pub fn tokens(&self) -> usize {
        self.active.len()
    }

    /// How many tokens each of `n_experts` experts received.
    pub fn expert_counts(&self, n_experts: usize) -> Vec<u32> {
        let mut counts = vec![0u32; n_experts];
        for &id in &self.ids {
            if let Some(c) = counts.get_mut(id as usize) {
                *c += 1;
            }
        }
        counts
    }
}

/// The capacity of each expert for `tokens` tokens routed to `k` experts each among
/// `n_experts`: `ceil(capacity_factor * tokens * k / n_experts)` (computed in f64).
pub fn expert_capacity(capacity_factor: f32, tokens: usize, k: usize, n_experts: usize) -> usize {
    let c = f64::from(capacity_factor) * tokens as f64 * k as f64 / n_experts as f64;
    c.ceil() as usize
}

/// Routes every token of `logits` (`[tokens, n_experts]`) for a model that keeps `top_k`
/// experts and renormalises their weights when `renormalize`, with `options` applied.
///
/// - Plain top-k ([`cpu::topk_gating`]): softmax, the `k` most probable experts in descending
///   order (ties to the lower index), optionally renormalised.
/// - Dynamic top-k ([`cpu::topk_gating_dynamic`]): per token the fewest experts whose
///   probabilities reach `p`, clamped to `min_experts..=k`; `p >= 1` is plain top-k.
/// - Capacity (`capacity_factor` finite): each expert takes at most
///   [`expert_capacity`]`(cf, tokens, k, n_experts)` slots. Slots are served rank by rank:
///   every token's first choice in token order, then every token's second choice, and so on,
///   so a token's best expert is never taken by another token's lower choice and, within a
///   rank, earlier tokens win. A slot whose expert is full moves to the token's next-best
///   expert (in its full probability ranking, past the experts it chose) that has room; if no
///   such expert has room the slot is dropped. A token whose slots all kept their experts
///   gets exactly the weights of the plain routing; a token with a moved or dropped slot gets
///   the softmax probabilities of the experts it ended with, divided by their sum when the
///   family renormalises (raw probabilities otherwise). A token left with no expert gets no
///   routed output. With no expert full (in particular `cf = +inf`) the result is exactly the
///   plain routing.
pub fn route(
    logits: &[f32],
    n_experts: usize,
    top_k: usize,
    renormalize: bool,
    options: &MoeOptions,
) -> Result<Routes> {
    let k = options.check(n_experts, top_k)?;
    if n_experts == 0 || !logits.len().is_multiple_of(n_experts) {
        return Err(Error::InvalidInput(format!(
            "{} router logits are not a whole number of tokens of {n_experts} experts",
            logits.len()
        )));
    }
    let tokens = logits.len() / n_experts;
    let dynamic = match options.routing {
        Routing::DynamicTopK { p, min_experts } if p < 1.0 => Some((p, min_experts)),
        _ => None,
    };
    let capacity = options.capacity_factor.filter(|cf| cf.is_finite());
    let Some(cf) = capacity else {
        let mut ids = vec![0u32; tokens * k];
        let mut weights = vec![0f32; tokens * k];
        let active = match dynamic {
            None => {
                cpu::topk_gating(logits, n_experts, k, renormalize, &mut ids, &mut weights)?;
                vec![k as u32; tokens]
            }
            Some((p, min_k)) => {
                let mut counts = vec![0u32; tokens];
                cpu::topk_gating_dynamic(
                    logits,
                    n_experts,
                    min_k,
                    k,
                    p,
                    renormalize,
                    &mut ids,
                    &mut weights,
                    &mut counts,
                )?;
                counts
            }
        };
        return Ok(Routes { slots: k, ids, weights, active, reassigned: 0, dropped: 0 });
    };

    // The full ranking of every token (descending probability, ties to the lower index) and
    // the number of experts each token asks for.
    let mut ranking = vec![0u32; tokens * n_experts];
    let mut probs = vec![0f32; tokens * n_experts];
    cpu::topk_gating(logits, n_experts, n_experts, false, &mut ranking, &mut probs)?;
    let wanted: Vec<u32> = match dynamic {
        None => vec![k as u32; tokens],
        Some((p, min_k)) => {
            let (mut ids, mut w, mut counts) = (vec![0u32; tokens * k], vec![0f32; tokens * k], vec![0u32; tokens]);
            cpu::topk_gating_dynamic(logits, n_experts, min_k, k, p, false, &mut ids, &mut w, &mut counts)?;
            counts
        }
    };
    Ok(assign_with_capacity(
        &ranking,
        &probs,
        &wanted,
        n_experts,
        k,
        expert_capacity(cf, tokens, k, n_experts),
        renormalize,
    ))
}

/// The capacity-limited assignment of [`route`]: `ranking`/`probs` are each token's experts
/// and probabilities in descending order (`[tokens, n_experts]`), `wanted[t]` how many of the
/// first it asks for (at most `slots`), `capacity` the slots each expert takes.
fn assign_with_capacity(
    ranking: &[u32],
    probs: &[f32],
    wanted: &[u32],
    n_experts: usize,
    slots: usize,
    capacity: usize,
    renormalize: bool,
) -> Routes {
    let tokens = wanted.len();
    // Per slot: the rank (position in the token's ranking) of the expert it holds, or None.
    let mut held: Vec<Option<usize>> = vec![None; tokens * slots];
    let mut load = vec![0usize; n_experts];
    // The next ranking position a token's overflowing slot may try: past its own choices.
    let mut next: Vec<usize> = wanted.iter().map(|&w| w as usize).collect();
    let (mut reassigned, mut dropped) = (0, 0);
    for rank in 0..slots {
        for t in 0..tokens {
            if rank >= wanted[t] as usize {
                continue;
            }
            let row = &ranking[t * n_experts..][..n_experts];
            let first = row[rank] as usize;
            if load[first] < capacity {
                load[first] += 1;
                held[t * slots + rank] = Some(rank);
                continue;
            }
            // Experts passed over here are full, and loads only grow: the cursor never returns.
            let mut found = None;
            while next[t] < n_experts {
                let r = next[t];
                next[t] += 1;
                let e = row[r] as usize;
                if load[e] < capacity {
                    load[e] += 1;
                    found = Some(r);
                    break;
                }
            }
            match found {
                Some(r) => {
                    held[t * slots + rank] = Some(r);
                    reassigned += 1;
                }
                None => dropped += 1,
            }
        }
    }

    let mut ids = vec![u32::MAX; tokens * slots];
    let mut weights = vec![0f32; tokens * slots];
    let mut active = vec![0u32; tokens];
    for t in 0..tokens {
        let row_ids = &ranking[t * n_experts..][..n_experts];
        let row_probs = &probs[t * n_experts..][..n_experts];
        let (ids, weights) = (&mut ids[t * slots..][..slots], &mut weights[t * slots..][..slots]);
        for (s, rank) in held[t * slots..][..slots].iter().enumerate() {
            if let Some(r) = *rank {
                ids[s] = row_ids[r];
                weights[s] = row_probs[r];
                active[t] += 1;
            }
        }
        if renormalize && active[t] > 0 {
            // Summed in slot order, as the gating ops do, so an untouched token is bit-identical.
            let sum: f32 = weights.iter().sum();
            for w in weights.iter_mut() {
                *w /= sum;
            }
        }
    }
    Routes { slots, ids, weights, active, reassigned, dropped }
}

/// Qwen2-MoE's shared expert: an MLP every token goes through, scaled per token by
/// `sigmoid(gate(x))`.
#[derive(Clone, Debug)]
pub struct SharedExpert {
    pub(crate) mlp: Mlp,
    pub(crate) gate: Linear,
}

impl SharedExpert {
    /// Bytes of the MLP and its gate.
    pub fn byte_len(&self) -> usize {
        self.mlp.byte_len() + self.gate.byte_len()
    }
}

/// Where a MoE layer's experts are.
#[derive(Clone, Debug)]
pub enum Experts {
    /// One [`Mlp`] per expert, in memory.
    Resident(Vec<Mlp>),
    /// In the offload store, one unit per expert.
    Placed(Arc<PlacedExperts>),
}

/// A MoE layer's experts in the offload store, one unit each (resident, or cached: read when the
/// router picks it and kept while the store's expert cache has room).
#[derive(Debug)]
pub struct PlacedExperts {
    store: Arc<Store>,
    /// Per expert: its unit.
    units: Vec<usize>,
    /// Per expert: the names of its gate, up and down projections in its unit.
    names: Vec<[String; 3]>,
    hidden: usize,
    inter: usize,
}

impl PlacedExperts {
    /// The experts of one layer: expert `e` is unit `units[e]` of `store`, holding the gate, up
    /// and down projections `names[e]` (`[inter, hidden]`, `[inter, hidden]`, `[hidden, inter]`).
    pub fn new(
        store: Arc<Store>,
        units: Vec<usize>,
        names: Vec<[String; 3]>,
        hidden: usize,
        inter: usize,
    ) -> Result<PlacedExperts> {
        let count = store.pack().manifest().units.len();
        if units.len() != names.len() || units.iter().any(|&u| u >= count) {
            return Err(Error::Unsupported(format!(
                "placed experts: {} units and {} name sets for a pack of {count} units",
                units.len(),
                names.len()
            )));
        }
        Ok(PlacedExperts { store, units, names, hidden, inter })
    }

    /// Expert `e`'s unit in the store.
    pub fn unit(&self, e: usize) -> usize {
        self.units[e]
    }

    /// How many experts.
    pub fn len(&self) -> usize {
        self.units.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    /// The bytes of expert `e`'s unit.
    fn unit_bytes(&self, e: usize) -> usize {
        self.store.pack().manifest().units[self.units[e]].len as usize
    }

    /// Expert `e`'s MLP, viewing `handle`'s bytes.
    fn mlp(&self, e: usize, handle: &UnitHandle) -> Result<Mlp> {
        let source = UnitSource { handle, location: self.store.pack().data_path() };
        let loader = Loader { src: &source };
        let [g, u, d] = &self.names[e];
        let (h, i) = (self.hidden, self.inter);
        Ok(Mlp::new(
            Linear::new(loader.matrix(g, i, h)?, None),
            Linear::new(loader.matrix(u, i, h)?, None),
            Linear::new(loader.matrix(d, h, i)?, None),
        ))
    }
}

/// The MoE layer after the one running, when its experts are placed in the store: a decode
/// step guesses which of them it will pick by running its norm and router on the residual
/// stream as it is now (before this layer's output and the next attention are added), and has
/// the store read them ahead while this layer's experts compute. A guess only moves reads
/// earlier: the next layer routes on its own input, so the results are unchanged.
pub(crate) struct NextLayer<'a> {
    /// The next layer's post-attention norm and its epsilon.
    pub(crate) norm: &'a [f32],
    pub(crate) eps: f32,
    /// Its router.
    pub(crate) router: &'a Router,
    /// Its experts.
    pub(crate) experts: &'a PlacedExperts,
    /// The residual stream now, one token.
    pub(crate) residual: &'a [f32],
}

impl NextLayer<'_> {
    /// Submits the reads of the experts the next layer's router would pick for the residual
    /// stream now (its top `k`, `k` as `options` route).
    fn prefetch(&self, options: &MoeOptions) -> Result<()> {
        let mut normed = vec![0f32; self.residual.len()];
        cpu::rms_norm(self.residual, self.norm, self.eps, &mut normed)?;
        let logits = self.router.logits(&normed, 1)?;
        let n = self.router.num_experts();
        let k = options.active_experts.unwrap_or(self.router.top_k()).min(n);
        let (mut ids, mut weights) = (vec![0u32; k], vec![0f32; k]);
        cpu::topk_gating(&logits, n, k, false, &mut ids, &mut weights)?;
        let units: Vec<usize> = ids.iter().map(|&e| self.experts.unit(e as usize)).collect();
        Ok(self.experts.store.prefetch_experts(&units)?)
    }
}

/// One sparse MoE block: the router, the experts, and an optional shared expert.
#[derive(Clone, Debug)]
pub struct MoeLayer {
    pub(crate) router: Router,
    pub(crate) experts: Experts,
    pub(crate) shared: Option<SharedExpert>,
}

impl MoeLayer {
    /// The router.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The experts, by index, when they are all in memory (`None`: placed in the offload store).
    pub fn resident_experts(&self) -> Option<&[Mlp]> {
        match &self.experts {
            Experts::Resident(e) => Some(e),
            Experts::Placed(_) => None,
        }
    }

    /// Where the experts are.
    pub fn experts(&self) -> &Experts {
        &self.experts
    }

    /// Bytes of every expert together.
    fn experts_byte_len(&self) -> usize {
        match &self.experts {
            Experts::Resident(e) => e.iter().map(Mlp::byte_len).sum(),
            Experts::Placed(p) => (0..p.len()).map(|e| p.unit_bytes(e)).sum(),
        }
    }

    /// The mean bytes of one expert.
    pub fn mean_expert_bytes(&self) -> usize {
        self.experts_byte_len() / self.router.num_experts().max(1)
    }

    /// The shared expert (Qwen2-MoE), if any.
    pub fn shared_expert(&self) -> Option<&SharedExpert> {
        self.shared.as_ref()
    }

    /// The projections of the experts held in memory and of the shared expert, for
    /// [`crate::Decoder::repack_for_cpu`]: nothing of experts placed in the store.
    pub(crate) fn resident_linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut linears = Vec::new();
        if let Experts::Resident(experts) = &mut self.experts {
            for e in experts {
                linears.extend([&mut e.gate, &mut e.up, &mut e.down]);
            }
        }
        if let Some(shared) = &mut self.shared {
            linears.extend([&mut shared.mlp.gate, &mut shared.mlp.up, &mut shared.mlp.down]);
        }
        linears
    }

    /// Bytes of the router, every expert and the shared expert.
    pub fn byte_len(&self) -> usize {
        self.router.weight.byte_len() + self.experts_byte_len() + self.shared.as_ref().map_or(0, SharedExpert::byte_len)
    }

    /// Bytes one token reads with `k` experts active: the router, the shared expert and `k`
    /// experts of average size.
    pub fn active_byte_len(&self, k: usize) -> usize {
        self.router.weight.byte_len()
            + self.shared.as_ref().map_or(0, SharedExpert::byte_len)
            + self.experts_byte_len() * k / self.router.num_experts().max(1)
    }

    /// Runs the block over `x` (`[tokens, hidden]`) into `out` (`[tokens, hidden]`, overwritten),
    /// routing with `options`. When `record` is given, the router logits and the routing are
    /// appended to it.
    pub fn forward(
        &self,
        x: &[f32],
        tokens: usize,
        options: &MoeOptions,
        out: &mut [f32],
        record: Option<&mut LayerRecord>,
    ) -> Result<()> {
        self.forward_ahead(x, tokens, options, out, record, None)
    }

    /// [`MoeLayer::forward`], and, for one token whose experts are placed in the store, the
    /// reads of the experts `next` is expected to ask for submitted once this layer's own are.
    pub(crate) fn forward_ahead(
        &self,
        x: &[f32],
        tokens: usize,
        options: &MoeOptions,
        out: &mut [f32],
        record: Option<&mut LayerRecord>,
        next: Option<NextLayer<'_>>,
    ) -> Result<()> {
        let hidden = out.len() / tokens.max(1);
        let logits = self.router.logits(x, tokens)?;
        let routes = self.router.route(&logits, options)?;
        let next = next.filter(|_| tokens == 1);
        self.experts_forward(x, hidden, &routes, out, next.map(|n| (n, options)))?;
        if let Some(shared) = &self.shared {
            let mut y = vec![0f32; tokens * hidden];
            let mut g = vec![0f32; tokens];
            let (ry, rg) = cpu::join(|| shared.mlp.forward(x, &mut y), || shared.gate.forward(x, &mut g));
            ry.and(rg)?;
            for ((o, y), g) in out.chunks_exact_mut(hidden).zip(y.chunks_exact(hidden)).zip(&g) {
                let s = 1.0 / (1.0 + (-g).exp());
                for (o, y) in o.iter_mut().zip(y) {
                    *o += s * y;
                }
            }
        }
        if let Some(record) = record {
            record.append(&logits, &routes, self.router.num_experts());
        }
        Ok(())
    }

    /// The routed experts' weighted sum, grouped by expert: each expert with tokens runs once
    /// over all of them, in ascending expert order. Placed experts are fetched from the store
    /// together (the reads of the later ones overlap the compute of the earlier ones) and each
    /// is released once it ran.
    fn experts_forward(
        &self,
        x: &[f32],
        hidden: usize,
        routes: &Routes,
        out: &mut [f32],
        next: Option<(NextLayer<'_>, &MoeOptions)>,
    ) -> Result<()> {
        out.fill(0.0);
        let n_experts = self.router.num_experts();
        let mut groups: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n_experts];
        for (i, (&id, &w)) in routes.ids.iter().zip(&routes.weights).enumerate() {
            if let Some(group) = groups.get_mut(id as usize) {
                group.push((i / routes.slots, w));
            }
        }
        let used: Vec<usize> = (0..n_experts).filter(|&e| !groups[e].is_empty()).collect();
        let mut rows = Vec::new();
        let mut y = Vec::new();
        let mut run = |expert: &Mlp, group: &[(usize, f32)]| -> Result<()> {
            rows.clear();
            for &(t, _) in group {
                rows.extend_from_slice(&x[t * hidden..][..hidden]);
            }
            y.clear();
            y.resize(group.len() * hidden, 0.0);
            expert.forward(&rows, &mut y)?;
            for (&(t, w), y) in group.iter().zip(y.chunks_exact(hidden)) {
                for (o, y) in out[t * hidden..][..hidden].iter_mut().zip(y) {
                    *o += y * w;
                }
            }
            Ok(())
        };
        match &self.experts {
            Experts::Resident(experts) => {
                for &e in &used {
                    run(&experts[e], &groups[e])?;
                }
            }
            Experts::Placed(placed) => {
                let units: Vec<usize> = used.iter().map(|&e| placed.unit(e)).collect();
                let mut fetch = placed.store.fetch_experts(&units)?;
                if let Some((next, options)) = next {
                    next.prefetch(options)?;
                }
                for &e in &used {
                    let handle = fetch.next_expert().expect("one handle per expert asked for")?;
                    let mlp = placed.mlp(e, &handle)?;
                    // The weights view the handle's buffer; both go before the next expert is
                    // taken, so a small cache can reuse the buffer.
                    drop(handle);
                    run(&mlp, &groups[e])?;
                }
            }
        }
        Ok(())
    }
}

/// What one MoE layer's router saw over the passes a [`RouterTrace`] recorded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerRecord {
    /// The decoder layer.
    pub layer: usize,
    /// Experts of the layer.
    pub n_experts: usize,
    /// Router logits, `[tokens, n_experts]`, in the order the tokens were run.
    pub logits: Vec<f32>,
    /// Tokens each expert received (after capacity limits).
    pub expert_counts: Vec<u64>,
    /// Experts each token used.
    pub active: Vec<u32>,
    /// Slots moved to another expert by capacity limits.
    pub reassigned: usize,
    /// Slots dropped by capacity limits.
    pub dropped: usize,
}

impl LayerRecord {
    pub(crate) fn append(&mut self, logits: &[f32], routes: &Routes, n_experts: usize) {
        self.n_experts = n_experts;
        self.logits.extend_from_slice(logits);
        self.expert_counts.resize(n_experts, 0);
        for (c, n) in self.expert_counts.iter_mut().zip(routes.expert_counts(n_experts)) {
            *c += u64::from(n);
        }
        self.active.extend_from_slice(&routes.active);
        self.reassigned += routes.reassigned;
        self.dropped += routes.dropped;
    }

    /// Tokens recorded.
    pub fn tokens(&self) -> usize {
        self.active.len()
    }
}

/// The routers' records of every MoE layer, over the forward passes run with it
/// ([`crate::Decoder::forward_with_router`]): each pass appends its tokens, so a prompt run in
/// one pass and the same prompt run token by token through the cache give the same statistics.
/// A pass that recomputes the cache (a RoPE table change) records the recomputed tokens again.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouterTrace {
    /// One record per MoE layer, in layer order.
    pub layers: Vec<LayerRecord>,
}

impl RouterTrace {
    /// An empty trace.
    pub fn new() -> RouterTrace {
        RouterTrace::default()
    }

    /// The record of decoder layer `layer`, created on first use.
    pub(crate) fn layer_mut(&mut self, layer: usize) -> &mut LayerRecord {
        let i = match self.layers.iter().position(|r| r.layer == layer) {
            Some(i) => i,
            None => {
                self.layers.push(LayerRecord { layer, ..LayerRecord::default() });
                self.layers.sort_by_key(|r| r.layer);
                self.layers.iter().position(|r| r.layer == layer).expect("just inserted")
            }
        };
        &mut self.layers[i]
    }

    /// The mean number of experts per token, over every recorded token of every layer (the
    /// figure dynamic top-k reports); 0 for an empty trace.
    pub fn mean_experts_per_token(&self) -> f64 {
        let tokens: usize = self.layers.iter().map(LayerRecord::tokens).sum();
        let experts: u64 = self.layers.iter().flat_map(|l| &l.active).map(|&a| u64::from(a)).sum();
        if tokens == 0 { 0.0 } else { experts as f64 / tokens as f64 }
    }
}

/// The Switch Transformer load-balancing loss exactly as transformers'
/// `load_balancing_loss_func` computes it with no attention mask, over the router logits of
/// every layer of `trace` concatenated: per row, softmax over the `num_experts` experts and the
/// `top_k` most probable ones (plain top-k, whatever routing the pass used);
/// `f_e` = (times expert `e` was selected) / rows, `P_e` = (sum of its probabilities) / rows,
/// and the loss is `num_experts * sum_e f_e * P_e`. It is not multiplied by
/// `router_aux_loss_coef` (transformers' `outputs.aux_loss` is not either). Accumulated in
/// f64. An empty trace gives 0, as transformers does for no router logits.
pub fn load_balancing_loss(trace: &RouterTrace, num_experts: usize, top_k: usize) -> Result<f32> {
    if trace.layers.iter().all(|l| l.logits.is_empty()) {
        return Ok(0.0);
    }
    let mut selected = vec![0f64; num_experts];
    let mut prob_sum = vec![0f64; num_experts];
    let mut rows = 0usize;
    for layer in &trace.layers {
        if layer.n_experts != num_experts {
            return Err(Error::InvalidInput(format!(
                "layer {} has {} experts, not {num_experts}",
                layer.layer, layer.n_experts
            )));
        }
        let t = layer.logits.len() / num_experts;
        let mut ids = vec![0u32; t * top_k];
        let mut w = vec![0f32; t * top_k];
        cpu::topk_gating(&layer.logits, num_experts, top_k, false, &mut ids, &mut w)?;
        for &id in &ids {
            selected[id as usize] += 1.0;
        }
        let mut probs = layer.logits.clone();
        cpu::softmax(&mut probs, num_experts)?;
        for row in probs.chunks_exact(num_experts) {
            for (s, &p) in prob_sum.iter_mut().zip(row) {
                *s += f64::from(p);
            }
        }
        rows += t;
    }
    let rows = rows as f64;
    let loss: f64 = selected.iter().zip(&prob_sum).map(|(f, p)| (f / rows) * (p / rows)).sum();
    Ok((loss * num_experts as f64) as f32)
}

/// The router z-loss of ST-MoE: the mean over every recorded token of every layer of
/// `logsumexp(router logits)^2` (not multiplied by any coefficient). Accumulated in f64; an
/// empty trace gives 0.
pub fn router_z_loss(trace: &RouterTrace) -> f32 {
    let mut sum = 0f64;
    let mut rows = 0usize;
    for layer in &trace.layers {
        if layer.n_experts == 0 {
            continue;
        }
        for row in layer.logits.chunks_exact(layer.n_experts) {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let lse = max + row.iter().map(|&v| (f64::from(v) - max).exp()).sum::<f64>().ln();
            sum += lse * lse;
            rows += 1;
        }
    }
    if rows == 0 { 0.0 } else { (sum / rows as f64) as f32 }
}

/// How a checkpoint stores one MoE layer's experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExpertLayout {
    /// One tensor per expert and projection (what `save_pretrained` writes).
    PerExpert,
    /// transformers' in-memory layout: `experts.gate_up_proj [E, 2I, H]` (gate rows first) and
    /// `experts.down_proj [E, H, I]`.
    Fused,
    /// Separate stacks `experts.{gate,up,down}_proj.weight` (`[E, I, H]`, `[E, I, H]`,
    /// `[E, H, I]`): the GGUF `ffn_{gate,up,down}_exps` tensors.
    Stacked,
}

/// The per-expert tensor names of a family: (gate, up, down).
fn expert_names(mixtral: bool) -> [&'static str; 3] {
    if mixtral { ["w1", "w3", "w2"] } else { ["gate_proj", "up_proj", "down_proj"] }
}

/// Loads the MoE block of the layer whose tensors start with `p` (`model.layers.N`).
///
/// The block lives under `{p}.block_sparse_moe` (Mixtral checkpoints) or `{p}.mlp` (Qwen, and
/// transformers 5's in-memory Mixtral layout); the experts in any [`ExpertLayout`].
///
/// With `placed`, the experts are those (in the offload store) and only the router and the
/// shared expert come from `loader`.
pub(crate) fn load_moe_layer(
    loader: &Loader<'_>,
    p: &str,
    hidden: usize,
    moe: &MoeHparams,
    placed: Option<&Arc<PlacedExperts>>,
) -> Result<MoeLayer> {
    let (e, inter) = (moe.num_experts, moe.expert_intermediate_size);
    let prefixes: &[&str] = if moe.mixtral_names { &["block_sparse_moe", "mlp"] } else { &["mlp"] };
    let block = prefixes
        .iter()
        .map(|m| format!("{p}.{m}"))
        .find(|b| loader.contains(&format!("{b}.gate.weight")))
        .unwrap_or_else(|| format!("{p}.{}", prefixes[0]));
    let router = Linear::new(loader.matrix(&format!("{block}.gate.weight"), e, hidden)?, None);
    let router = Router::new(router, moe.top_k, moe.norm_topk_prob);

    let shared = load_shared_expert(loader, &block, hidden, moe)?;
    if let Some(placed) = placed {
        if placed.len() != e {
            return Err(Error::Unsupported(format!("{block}: {} placed experts for a router of {e}", placed.len())));
        }
        return Ok(MoeLayer { router, experts: Experts::Placed(Arc::clone(placed)), shared });
    }
    let names = expert_names(moe.mixtral_names);
    let layout = if loader.contains(&format!("{block}.experts.0.{}.weight", names[0])) {
        ExpertLayout::PerExpert
    } else if loader.contains(&format!("{block}.experts.gate_up_proj")) {
        ExpertLayout::Fused
    } else if loader.contains(&format!("{block}.experts.gate_proj.weight")) {
        ExpertLayout::Stacked
    } else {
        // Report the name of the layout save_pretrained writes.
        ExpertLayout::PerExpert
    };
    let linear = |weight: Tensor| Linear::new(weight, None);
    let experts = match layout {
        ExpertLayout::PerExpert => (0..e)
            .map(|i| {
                let name = |n: &str| format!("{block}.experts.{i}.{n}.weight");
                Ok(Mlp::new(
                    linear(loader.matrix(&name(names[0]), inter, hidden)?),
                    linear(loader.matrix(&name(names[1]), inter, hidden)?),
                    linear(loader.matrix(&name(names[2]), hidden, inter)?),
                ))
            })
            .collect::<Result<Vec<_>>>()?,
        ExpertLayout::Fused => {
            let gate_up = loader.shaped(&format!("{block}.experts.gate_up_proj"), &[e, 2 * inter, hidden])?;
            let down = loader.shaped(&format!("{block}.experts.down_proj"), &[e, hidden, inter])?;
            let (gate_up, down) = (StackedRows::new(gate_up)?, StackedRows::new(down)?);
            (0..e)
                .map(|i| {
                    Ok(Mlp::new(
                        linear(gate_up.rows(i * 2 * inter, inter)?),
                        linear(gate_up.rows(i * 2 * inter + inter, inter)?),
                        linear(down.rows(i * hidden, hidden)?),
                    ))
                })
                .collect::<Result<Vec<_>>>()?
        }
        ExpertLayout::Stacked => {
            let stack = |n: &str, rows: usize, cols: usize| {
                StackedRows::new(loader.shaped(&format!("{block}.experts.{n}.weight"), &[e, rows, cols])?)
            };
            let (gate, up, down) = (
                stack("gate_proj", inter, hidden)?,
                stack("up_proj", inter, hidden)?,
                stack("down_proj", hidden, inter)?,
            );
            (0..e)
                .map(|i| {
                    Ok(Mlp::new(
                        linear(gate.rows(i * inter, inter)?),
                        linear(up.rows(i * inter, inter)?),
                        linear(down.rows(i * hidden, hidden)?),
                    ))
                })
                .collect::<Result<Vec<_>>>()?
        }
    };

    Ok(MoeLayer { router, experts: Experts::Resident(experts), shared })
}

/// The shared expert (Qwen2-MoE) of the MoE block `block`, if the model has one.
fn load_shared_expert(
    loader: &Loader<'_>,
    block: &str,
    hidden: usize,
    moe: &MoeHparams,
) -> Result<Option<SharedExpert>> {
    let Some(s) = moe.shared_expert_intermediate_size else { return Ok(None) };
    let linear = |weight: Tensor| Linear::new(weight, None);
    let name = |n: &str| format!("{block}.shared_expert.{n}.weight");
    let mlp = Mlp::new(
        linear(loader.matrix(&name("gate_proj"), s, hidden)?),
        linear(loader.matrix(&name("up_proj"), s, hidden)?),
        linear(loader.matrix(&name("down_proj"), hidden, s)?),
    );
    let gate = linear(loader.matrix(&format!("{block}.shared_expert_gate.weight"), 1, hidden)?);
    Ok(Some(SharedExpert { mlp, gate }))
}

/// A checkpoint whose MoE experts read one tensor per expert and projection, whatever its
/// layout: `{block}.experts.{e}.{gate,up,down}.weight` (with the family's names: `w1`, `w3`,
/// `w2` for Mixtral) are the checkpoint's own tensors, or row views of its fused or stacked
/// ones. Every other name passes through (every name, for a dense model). The offload pack is
/// built through it, so each expert is a unit of its own.
pub(crate) struct PerExpertSource<'a> {
    inner: &'a dyn TensorSource,
    moe: Option<&'a MoeHparams>,
    hidden: usize,
}

impl<'a> PerExpertSource<'a> {
    /// `inner` seen per expert, for a model of `moe`'s shape (`None`: dense) with hidden size
    /// `hidden`.
    pub(crate) fn new(inner: &'a dyn TensorSource, moe: Option<&'a MoeHparams>, hidden: usize) -> PerExpertSource<'a> {
        PerExpertSource { inner, moe, hidden }
    }

    /// For a per-expert name the checkpoint lacks: the stacked tensor that holds it, its shape
    /// `[E, rows, cols]`, and the expert's rows in it (`start`, `count`).
    fn stacked(&self, name: &str) -> Option<(String, [usize; 3], usize, usize)> {
        let moe = self.moe?;
        let (block, rest) = name.split_once(".experts.")?;
        let (e, rest) = rest.split_once('.')?;
        let e: usize = e.parse().ok()?;
        let projection = rest.strip_suffix(".weight")?;
        let part = expert_names(moe.mixtral_names).iter().position(|n| *n == projection)?;
        let (n, h, i) = (moe.num_experts, self.hidden, moe.expert_intermediate_size);
        if e >= n || !(block.ends_with(".mlp") || block.ends_with(".block_sparse_moe")) {
            return None;
        }
        let fused = format!("{block}.experts.gate_up_proj");
        if self.inner.contains(&fused) {
            return Some(match part {
                0 => (fused, [n, 2 * i, h], e * 2 * i, i),
                1 => (fused, [n, 2 * i, h], e * 2 * i + i, i),
                _ => (format!("{block}.experts.down_proj"), [n, h, i], e * h, h),
            });
        }
        let (stack, dims, rows) = match part {
            0 => ("gate_proj", [n, i, h], i),
            1 => ("up_proj", [n, i, h], i),
            _ => ("down_proj", [n, h, i], h),
        };
        let stacked = format!("{block}.experts.{stack}.weight");
        self.inner.contains(&stacked).then(|| (stacked, dims, e * rows, rows))
    }
}

impl TensorSource for PerExpertSource<'_> {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        if self.inner.contains(name) {
            return self.inner.tensor(name);
        }
        match self.stacked(name) {
            Some((stacked, dims, start, count)) => {
                let loader = Loader { src: self.inner };
                StackedRows::new(loader.shaped(&stacked, &dims)?)?.rows(start, count)
            }
            None => self.inner.tensor(name),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name) || self.stacked(name).is_some()
    }

    fn location(&self) -> &Path {
        self.inner.location()
    }
}

/// A tensor stacked along its first dimension, cut into zero-copy row views.
struct StackedRows {
    source: Arc<dyn ByteSource>,
    tensor: Tensor,
}

/// The bytes of a host tensor, as a byte source other tensors can view.
struct TensorBytes(Tensor);

impl ByteSource for TensorBytes {
    fn bytes(&self) -> &[u8] {
        // Only host tensors are wrapped (checked in `StackedRows::new`).
        self.0.cpu_bytes().unwrap_or(&[])
    }
}

impl StackedRows {
    fn new(tensor: Tensor) -> Result<StackedRows> {
        if tensor.device() != Device::Cpu {
            return Err(Error::Unsupported("stacked expert tensors must be in host memory".into()));
        }
        Ok(StackedRows { source: Arc::new(TensorBytes(tensor.clone())), tensor })
    }

    /// Rows `start..start + n` of the tensor seen as `[rows, last_dim]`, as a `[n, last_dim]`
    /// tensor sharing the bytes.
    fn rows(&self, start: usize, n: usize) -> Result<Tensor> {
        let rb = self.tensor.row_bytes();
        let cols = self.tensor.shape().last_dim();
        Ok(Tensor::from_source(self.source.clone(), start * rb, n * rb, self.tensor.dtype(), [n, cols])?)
    }
}

#[cfg(test)]
mod tests;
