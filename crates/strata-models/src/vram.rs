//! Which layers of a model stream into GPU memory under a `--max-vram` ceiling: the pure part of
//! `cuda_stream`, so that it is tested in builds without CUDA too.

use strata_tensor::Tensor;

use crate::decoder::{Decoder, Ffn, Layer};
use crate::kv_cache::DEFAULT_BLOCK_LEN;
use crate::moe::Mlp;
use crate::store::planner::{ExpertCachePolicy, ExpertSlots, LayerLru, uniform_routing_trace};
use crate::{Error, Result};

/// Slots: device buffers the streamed layers take in turn.
/// Byte boundary of each matrix within a streamed layer's buffers.
pub(crate) const ALIGN: usize = 256;

/// Tokens up to which a CUDA pass multiplies weights in place (`ops::LINEAR_MATVEC_TOKENS`);
/// above, prefill decodes each block-quantized weight to f32 for cuBLAS.
pub(crate) const LINEAR_MATVEC_TOKENS: usize = 8;

/// A ceiling on the GPU memory a `CudaDecoder` takes (`CudaDecoder::new_within`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VramBudget {
    /// Bytes: weights, KV cache and scratch together.
    pub max_bytes: u64,
    /// Tokens of the longest request the KV cache is planned for (a longer one is refused).
    pub context_tokens: usize,
    /// Tokens of the largest forward pass (prompts run in chunks of at most this many).
    pub pass_tokens: usize,
}

/// A layer's matrices (the weights that stream; norms and biases stay resident): their bytes,
/// and the bytes they take laid out for streaming (each at an `ALIGN` boundary). `None` for a
/// layer streamed from the offload pack. For a Mixture-of-Experts layer also its routed
/// experts: how many, their matrices' bytes (part of `resident`), and the largest one's laid
/// out as a device expert cache slot holds it.
pub(crate) struct LayerMatrices {
    pub(crate) resident: usize,
    pub(crate) streamed: usize,
    pub(crate) experts: usize,
    pub(crate) expert_bytes: usize,
    pub(crate) expert_slot: usize,
}

/// Whether an expert can go in a device expert cache: no biases (the products of a slot carry no
/// bias of their own).
pub(crate) fn cacheable_expert(m: &Mlp) -> bool {
    m.gate.bias.is_none() && m.up.bias.is_none() && m.down.bias.is_none()
}

/// Bytes an expert takes in a device expert cache slot: its three matrices, each at an
/// [`ALIGN`] boundary (gate and up may be one paired matrix: fewer boundaries, the same bytes).
pub(crate) fn expert_slot_bytes(m: &Mlp) -> usize {
    m.gate.weight.byte_len() + m.up.weight.byte_len() + m.down.weight.byte_len() + 3 * ALIGN
}

/// The matrices of layer `l` (`None` when a part of it is placed in the offload pack): q, k, v
/// and o, then the dense MLP's, or the router's and every routed and shared expert's.
pub(crate) fn layer_weights(l: &Layer) -> Option<Vec<&Tensor>> {
    let (a, f) = (l.attn.resident()?, l.ffn.resident()?);
    fn mlp<'a>(m: &'a Mlp, ws: &mut Vec<&'a Tensor>) {
        ws.extend([&m.gate.weight, &m.up.weight, &m.down.weight]);
    }
    let mut ws: Vec<&Tensor> = vec![&a.q.weight, &a.k.weight, &a.v.weight, &a.o.weight];
    match &f.ffn {
        Ffn::Dense(m) => mlp(m, &mut ws),
        Ffn::Moe(moe) => {
            ws.push(&moe.router().weight.weight);
            for e in moe.resident_experts().unwrap_or(&[]) {
                mlp(e, &mut ws);
            }
            if let Some(s) = moe.shared_expert() {
                mlp(&s.mlp, &mut ws);
                ws.push(&s.gate.weight);
            }
        }
    }
    Some(ws)
}

pub(crate) fn layer_matrices(l: &Layer) -> Option<LayerMatrices> {
    let ws = layer_weights(l)?;
    let (mut experts, mut expert_bytes, mut expert_slot) = (0, 0, 0);
    if let Ffn::Moe(moe) = &l.ffn.resident()?.ffn {
        let routed = moe.resident_experts().unwrap_or(&[]);
        // A device expert cache takes the layer's experts when none has a bias.
        if routed.iter().all(cacheable_expert) {
            experts = routed.len();
            expert_bytes = routed.iter().map(Mlp::byte_len).sum();
            expert_slot = routed.iter().map(expert_slot_bytes).max().unwrap_or(0);
        }
    }
    let resident: usize = ws.iter().map(|w| w.byte_len()).sum();
    Some(LayerMatrices { resident, streamed: resident + ALIGN * ws.len(), experts, expert_bytes, expert_slot })
}

/// What a model needs on the device under `budget`: the bytes that stay whatever streams
/// (embeddings, head, norms and biases, the KV cache, the scratch of a pass), and per layer the
/// bytes of its matrices resident and laid out for streaming.
pub(crate) fn vram_needs(decoder: &Decoder, budget: &VramBudget) -> Result<VramNeeds> {
    let hp = &decoder.hp;
    let mats: Vec<LayerMatrices> = decoder
        .layers
        .iter()
        .map(|l| {
            layer_matrices(l).ok_or_else(|| {
                Error::Unsupported("--max-vram with weights streamed from the offload pack (CPU only for now)".into())
            })
        })
        .collect::<Result<_>>()?;
    let matrices: usize = mats.iter().map(|m| m.resident).sum();
    let weights = decoder.weight_bytes().saturating_sub(matrices);
    let (t, ctx) = (budget.pass_tokens.max(1), budget.context_tokens.max(1));
    let kv = hp.n_layers * 2 * ctx.next_multiple_of(DEFAULT_BLOCK_LEN) * hp.kv_dim() * 4;
    let (h, qd, kvd, inter) = (hp.hidden_size, hp.q_dim(), hp.kv_dim(), hp.intermediate_size);
    let activations = 4 * t * (4 * h + 3 * qd + 4 * kvd + 3 * inter) + 4 * t * hp.vocab_size;
    // A pass of more than LINEAR_MATVEC_TOKENS tokens decodes each block-quantized weight to f32
    // for cuBLAS: room for the largest (the output head included).
    let dequant = if t > LINEAR_MATVEC_TOKENS {
        let head = decoder.lm_head.resident().map_or(0, |w| w.shape().dims().iter().product::<usize>() * 4);
        let layer_max = decoder
            .layers
            .iter()
            .filter_map(|l| l.ffn.resident())
            .map(|f| match &f.ffn {
                Ffn::Dense(m) => 2 * m.intermediate_size() * h * 4,
                Ffn::Moe(moe) => {
                    moe.resident_experts().and_then(<[_]>::first).map_or(0, |e| 2 * e.intermediate_size() * h * 4)
                }
            })
            .max()
            .unwrap_or(0);
        head.max(layer_max)
    } else {
        0
    };
    // The Mixture-of-Experts scratch, tables and the decoder's small buffers.
    let slack = 32 << 20;
    Ok(VramNeeds {
        weights: weights as u64,
        kv_cache: kv as u64,
        scratch: (activations + dequant + slack) as u64,
        resident: mats.iter().map(|m| m.resident as u64).collect(),
        streamed: mats.iter().map(|m| m.streamed as u64).collect(),
        experts: mats.iter().map(|m| m.expert_bytes as u64).collect(),
        layer_experts: mats.iter().map(|m| m.experts).collect(),
        expert_count: mats.iter().map(|m| m.experts).sum(),
        expert_slot: mats.iter().map(|m| m.expert_slot as u64).max().unwrap_or(0),
        experts_per_token: hp.moe.as_ref().map_or(0, |m| decoder.moe_options().active_experts.unwrap_or(m.top_k)),
    })
}

/// What a device expert cache did: its slots, and the experts asked of it since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ExpertCacheCounts {
    /// Device slots, one expert each.
    pub slots: usize,
    /// Experts found in a slot.
    pub hits: u64,
    /// Experts copied in (from host memory; with images on disk, from the host tier or read
    /// first).
    pub misses: u64,
    /// Bytes those copies moved.
    pub bytes_uploaded: u64,
    /// With the experts read from images on disk: the experts the host tier can hold (0: the
    /// staging buffers alone).
    pub host_slots: usize,
    /// With the experts read from images on disk: misses copied from the host tier.
    pub host_hits: u64,
    /// With the experts read from images on disk: misses read from disk.
    pub disk_reads: u64,
    /// The hit rate the placement expected under uniform routing (`VramReport`'s), when the
    /// cache was placed under a ceiling.
    pub expected_hit_rate: Option<f64>,
}

impl ExpertCacheCounts {
    /// What the cache did after `earlier` (counts it gave before): the counters' differences,
    /// the sizes and the expected rate as now.
    pub fn since(&self, earlier: &ExpertCacheCounts) -> ExpertCacheCounts {
        ExpertCacheCounts {
            hits: self.hits - earlier.hits,
            misses: self.misses - earlier.misses,
            bytes_uploaded: self.bytes_uploaded - earlier.bytes_uploaded,
            host_hits: self.host_hits - earlier.host_hits,
            disk_reads: self.disk_reads - earlier.disk_reads,
            ..*self
        }
    }

    /// Hits over the experts asked for (0 when none were).
    pub fn hit_rate(&self) -> f64 {
        self.hits as f64 / (self.hits + self.misses).max(1) as f64
    }
}

/// What a model needs on the GPU under a [`VramBudget`] ([`vram_report`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VramNeeds {
    /// Weights outside the layers' matrices: embeddings, output head, norms and biases.
    pub weights: u64,
    /// The KV cache of the planned context.
    pub kv_cache: u64,
    /// A pass's activations, the f32 weight a prefill's GEMM decodes into, and slack.
    pub scratch: u64,
    /// Per layer: its matrices' bytes when resident.
    pub resident: Vec<u64>,
    /// Per layer: the buffer its matrices take when streamed (each at a 256-byte boundary).
    pub streamed: Vec<u64>,
    /// Per layer: its routed experts' matrices (part of `resident`; 0 for a dense layer).
    pub experts: Vec<u64>,
    /// Per layer: its routed experts (0 for a dense layer, or one whose experts have biases).
    pub layer_experts: Vec<usize>,
    /// Routed experts in all layers.
    pub expert_count: usize,
    /// Bytes of one device expert cache slot: the largest expert, laid out (0 without experts).
    pub expert_slot: u64,
    /// Experts a token is routed to per MoE layer (the most, with dynamic top-k; 0 for a dense
    /// model).
    pub experts_per_token: usize,
}

impl VramNeeds {
    /// What stays on the device whatever streams.
    pub fn fixed(&self) -> u64 {
        self.weights + self.kv_cache + self.scratch
    }
}

/// A placement under a GPU ceiling, as `strata plan --max-vram` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct VramReport {
    /// The sizes it was made from.
    pub needs: VramNeeds,
    /// Per layer: whether it streams from host memory.
    pub streamed: Vec<bool>,
    /// Slots of the device expert cache (0: none): a Mixture-of-Experts model that does not fit
    /// keeps its routed experts in page-locked host memory and this many on the device, copied
    /// in as the routers pick them (`plan_experts`); no layer streams then.
    pub expert_slots: usize,
    /// With an expert cache: its hit rate under uniform routing and `layer-lru`, simulated
    /// (`uniform_hit_rate`). A trained router is rarely uniform; this is what the slots give
    /// when nothing is predictable.
    pub expected_expert_hit_rate: Option<f64>,
}

impl VramReport {
    /// Bytes of the device buffers the streamed layers take turns in, or of the expert cache's
    /// slots (0 when nothing streams).
    pub fn buffer_bytes(&self) -> u64 {
        if self.expert_slots > 0 {
            return self.expert_slots as u64 * self.needs.expert_slot;
        }
        let largest = self.needs.streamed.iter().zip(&self.streamed).filter(|(_, s)| **s).map(|(b, _)| *b).max();
        largest.map_or(0, |b| SLOTS as u64 * b)
    }

    /// Bytes copied to the device per forward pass: the streamed layers' matrices. With an
    /// expert cache it depends on the routing: see [`VramReport::expected_expert_upload`].
    pub fn uploaded_per_pass(&self) -> u64 {
        self.needs.resident.iter().zip(&self.streamed).filter(|(_, s)| **s).map(|(b, _)| *b).sum()
    }

    /// With an expert cache: the bytes a decoded token is expected to copy in at
    /// [`VramReport::expected_expert_hit_rate`], each MoE layer's routed experts (of their mean
    /// size) times the misses.
    pub fn expected_expert_upload(&self) -> Option<u64> {
        let hit = self.expected_expert_hit_rate?;
        let k = self.needs.experts_per_token as f64;
        let per_token: f64 = (self.needs.experts.iter().zip(&self.needs.layer_experts))
            .filter(|(_, n)| **n > 0)
            .map(|(bytes, n)| k * *bytes as f64 / *n as f64)
            .sum();
        Some((per_token * (1.0 - hit)).round() as u64)
    }

    /// Bytes of page-locked host memory the placement takes: a host copy of each streamed layer's
    /// matrices, laid out as its device buffer takes them, or of each routed expert under a
    /// device expert cache (0 when everything is resident). `--max-ram` bounds them on CUDA.
    pub fn host_bytes(&self) -> u64 {
        if self.expert_slots > 0 {
            return self.needs.expert_count as u64 * self.needs.expert_slot;
        }
        self.needs.streamed.iter().zip(&self.streamed).filter(|(_, s)| **s).map(|(b, _)| *b).sum()
    }

    /// [`VramReport::host_bytes`], or with `from_disk` (the streamed layers, or the routed
    /// experts under a device expert cache, read from images on disk: `crate::layer_images`) the
    /// staging buffers those reads land in: three of the largest image's read.
    pub fn host_bytes_with(&self, from_disk: bool) -> u64 {
        if !from_disk {
            return self.host_bytes();
        }
        self.image_read().map_or(0, |read| crate::layer_images::STAGING_BUFFERS as u64 * read)
    }

    /// The read of the largest image, were the streamed layers (or the routed experts under a
    /// device expert cache) read from disk: a staging or host tier buffer's size. `None` when
    /// nothing streams.
    fn image_read(&self) -> Option<u64> {
        let largest = if self.expert_slots > 0 {
            Some(self.needs.expert_slot)
        } else {
            self.needs.streamed.iter().zip(&self.streamed).filter(|(_, s)| **s).map(|(b, _)| *b).max()
        };
        largest.map(|b| b.next_multiple_of(crate::layer_images::IMAGE_ALIGN as u64))
    }

    /// The units that stream: the streamed layers, or the routed experts under a device expert
    /// cache.
    fn streamed_units(&self) -> usize {
        if self.expert_slots > 0 { self.needs.expert_count } else { self.streamed.iter().filter(|&&s| s).count() }
    }

    /// With the streamed layers, or the routed experts under a device expert cache, read from
    /// images on disk: how many of them a host tier keeps (`CudaDecoder::set_host_tier`) in the
    /// page-locked memory `max_ram` leaves beyond the staging buffers
    /// ([`VramReport::host_bytes_with`]), each in a buffer of the largest image's read; at most
    /// all of them. 0 when nothing streams, or without a ceiling.
    pub fn host_tier_units(&self, max_ram: Option<u64>) -> usize {
        let (Some(max_ram), Some(read)) = (max_ram, self.image_read()) else { return 0 };
        let spare = max_ram.saturating_sub(self.host_bytes_with(true));
        usize::try_from(spare / read.max(1)).unwrap_or(usize::MAX).min(self.streamed_units())
    }

    /// Bytes of a host tier of `units` layers or experts ([`VramReport::host_tier_units`]).
    pub fn host_tier_bytes(&self, units: usize) -> u64 {
        units as u64 * self.image_read().unwrap_or(0)
    }

    /// With a host tier of `units` in front of the images: the share of the reads it saves.
    /// For streamed layers, exactly the share of them it keeps; for the experts of a device
    /// expert cache, the share of the device's misses it is expected to hold when the routers
    /// pick uniformly (simulated, as [`VramReport::expected_expert_hit_rate`]). `None` when
    /// nothing streams.
    pub fn expected_host_tier_hit_rate(&self, units: usize) -> Option<f64> {
        if self.expert_slots > 0 {
            let (_, share) = uniform_tier_hit_rates(
                &self.needs.layer_experts,
                self.needs.experts_per_token,
                self.expert_slots,
                units,
            );
            return Some(share);
        }
        let layers = self.streamed_units();
        (layers > 0).then(|| units.min(layers) as f64 / layers as f64)
    }

    /// Bytes the placement takes on the device: what stays, the resident layers (less their
    /// routed experts under an expert cache) and the buffers.
    pub fn device_bytes(&self) -> u64 {
        let kept: u64 = self.needs.resident.iter().zip(&self.streamed).filter(|(_, s)| !**s).map(|(b, _)| *b).sum();
        let offloaded: u64 = if self.expert_slots > 0 { self.needs.experts.iter().sum() } else { 0 };
        self.needs.fixed() + kept - offloaded + self.buffer_bytes()
    }
}

/// [`plan_vram`] with the sizes it was made from.
pub fn vram_report(decoder: &Decoder, budget: &VramBudget) -> Result<VramReport> {
    let needs = vram_needs(decoder, budget)?;
    let n = needs.resident.len();
    let all = needs.fixed() + needs.resident.iter().sum::<u64>();
    if all > budget.max_bytes
        && let Some(slots) = plan_experts(&needs, budget.max_bytes)
    {
        let hit = uniform_hit_rate(&needs.layer_experts, needs.experts_per_token, slots);
        return Ok(VramReport {
            needs,
            streamed: vec![false; n],
            expert_slots: slots,
            expected_expert_hit_rate: Some(hit),
        });
    }
    let streamed =
        plan_layers(needs.fixed(), &needs.resident, &needs.streamed, budget.max_bytes).map_err(|e| {
            match (e, needs.expert_count > 0 && needs.expert_slot > 0) {
                (Error::InvalidInput(msg), true) => {
                    let base = all - needs.experts.iter().sum::<u64>();
                    Error::InvalidInput(format!(
                        "{msg}; with its {} routed experts in host memory and a device cache of one, it needs {}",
                        needs.expert_count,
                        size(base + needs.expert_slot)
                    ))
                }
                (e, _) => e,
            }
        })?;
    Ok(VramReport { needs, streamed, expert_slots: 0, expected_expert_hit_rate: None })
}

/// Which of `decoder`'s layers stream into GPU memory under `budget` (per layer; none when
/// everything fits, or when a device expert cache takes the routed experts instead:
/// [`VramReport::expert_slots`]), as `CudaDecoder::new_within` places them. An error says what
/// would fit when nothing does.
pub fn plan_vram(decoder: &Decoder, budget: &VramBudget) -> Result<Vec<bool>> {
    Ok(vram_report(decoder, budget)?.streamed)
}

/// The slots of a device expert cache under `budget` bytes, for a model that does not fit
/// whole: everything but the routed experts stays on the device, and the experts get every
/// whole slot the rest leaves, at most one per expert. `None` when the model has no routed
/// experts or not even one slot fits (then layers stream, [`plan_layers`]). A cache beats
/// streaming layers whole: a token copies at most the experts it was routed to and missed,
/// never the others.
pub(crate) fn plan_experts(needs: &VramNeeds, budget: u64) -> Option<usize> {
    if needs.expert_count == 0 || needs.expert_slot == 0 {
        return None;
    }
    let base = needs.fixed() + needs.resident.iter().sum::<u64>() - needs.experts.iter().sum::<u64>();
    let room = budget.checked_sub(base)?;
    let slots = (room / needs.expert_slot) as usize;
    (slots >= 1).then_some(slots.min(needs.expert_count))
}

/// Tokens of the uniform routing trace [`uniform_hit_rate`] simulates (after as many again to
/// warm the cache).
const SIMULATED_TOKENS: usize = 512;

/// The hit rate of a device expert cache of `slots` slots under `layer-lru`, for layers of
/// `layer_experts` routed experts (0: a layer without) and `k` experts a token per layer, when
/// the routers pick uniformly at random: a seeded trace of [`SIMULATED_TOKENS`] decoded tokens
/// replayed through the policy after as many to warm the cache up.
pub(crate) fn uniform_hit_rate(layer_experts: &[usize], k: usize, slots: usize) -> f64 {
    uniform_tier_hit_rates(layer_experts, k, slots, 0).0
}

/// [`uniform_hit_rate`] with a host tier of `host` experts in front of images on disk
/// (`crate::layer_images::HostTier`, under `layer-lru` too, serving the device's misses and
/// evicting what the device holds first): the device's hit rate, and the share of its misses
/// the tier holds (0 without a tier).
pub(crate) fn uniform_tier_hit_rates(layer_experts: &[usize], k: usize, slots: usize, host: usize) -> (f64, f64) {
    tier_hit_rates(layer_experts, k, slots, host, true)
}

/// [`uniform_tier_hit_rates`], the tier evicting what the device holds first or not (`prefer`).
fn tier_hit_rates(layer_experts: &[usize], k: usize, slots: usize, host: usize, prefer: bool) -> (f64, f64) {
    let layers: Vec<(usize, usize)> = layer_experts.iter().filter(|&&n| n > 0).map(|&n| (n, n)).collect();
    if layers.is_empty() || k == 0 || slots == 0 {
        return (0.0, 0.0);
    }
    let trace = uniform_routing_trace(&layers, k, 2 * SIMULATED_TOKENS, 0x5eed);
    let mut layer_of = Vec::new();
    for (li, &(n, _)) in layers.iter().enumerate() {
        let first = layer_of.len();
        layer_of.extend((first..first + n).map(|u| (u, li)));
    }
    let policy = || {
        let mut policy = LayerLru::default();
        policy.set_layers(&layer_of);
        Box::new(policy)
    };
    let mut tiers = [ExpertSlots::new(slots, policy()), ExpertSlots::new(host, policy())];
    let serve = |[device, tier]: &mut [ExpertSlots<Box<LayerLru>>; 2], batches: &[Vec<usize>]| {
        for batch in batches {
            let served = device.serve(batch);
            let misses: Vec<usize> =
                batch.iter().zip(&served).filter(|(_, s)| !matches!(s, Some((_, false)))).map(|(&u, _)| u).collect();
            tier.serve_preferring(&misses, |u| prefer && device.holds(u));
        }
        (device.counts(), tier.counts())
    };
    let (warm_up, counted) = trace.split_at(trace.len() / 2);
    let (device_warm, tier_warm) = serve(&mut tiers, warm_up);
    let (d, t) = serve(&mut tiers, counted);
    let rate = |hits: u64, accesses: u64| if accesses == 0 { 0.0 } else { hits as f64 / accesses as f64 };
    (
        rate(d.hits - device_warm.hits, d.accesses() - device_warm.accesses()),
        rate(t.hits - tier_warm.hits, t.accesses() - tier_warm.accesses()),
    )
}

pub(crate) const SLOTS: usize = 2;

/// `held` of `n` places (at most all), spread evenly: the streamed layers a host tier keeps, so
/// that the reads of the others spread over the pass.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn spread(held: usize, n: usize) -> Vec<usize> {
    let held = held.min(n);
    (0..n).filter(|&p| (p + 1) * held / n > p * held / n).collect()
}

/// Which layers stream, given the bytes that stay on the device whatever happens (`fixed`), each
/// layer's weight bytes if resident (`resident`) and the buffer a streamed layer needs
/// (`streamed`, at least its resident bytes), under `budget` bytes: `None` for none; else the
/// last `k` layers, `k` the smallest even count from 4 up for which `fixed`, the resident layers
/// and [`SLOTS`] buffers of the largest streamed layer fit. An error says what the least
/// streaming plan needs when none fits.
pub(crate) fn plan_layers(fixed: u64, resident: &[u64], streamed: &[u64], budget: u64) -> Result<Vec<bool>> {
    let n = resident.len();
    debug_assert_eq!(streamed.len(), n);
    if fixed + resident.iter().sum::<u64>() <= budget {
        return Ok(vec![false; n]);
    }
    let need = |k: usize| {
        let kept: u64 = resident[..n - k].iter().sum();
        let slot = streamed[n - k..].iter().copied().max().unwrap_or(0);
        fixed + kept + SLOTS as u64 * slot
    };
    let mut least: Option<(usize, u64)> = None;
    for k in (2 * SLOTS..=n).step_by(SLOTS) {
        let bytes = need(k);
        if bytes <= budget {
            return Ok((0..n).map(|i| i >= n - k).collect());
        }
        if least.is_none_or(|(_, b)| bytes < b) {
            least = Some((k, bytes));
        }
    }
    let all: u64 = fixed + resident.iter().sum::<u64>();
    Err(Error::InvalidInput(match least {
        Some((k, bytes)) => format!(
            "--max-vram {}: the model needs {} on the GPU with every layer resident, and at least {} streaming \
             {k} of its {n} layers from host memory ({} that stays on the device: embeddings, head, norms, the KV \
             cache and scratch; plus {SLOTS} layer buffers)",
            size(budget),
            size(all),
            size(bytes),
            size(fixed),
        ),
        None => format!(
            "--max-vram {}: the model needs {} on the GPU, and its {n} layers are too few to stream (streaming \
             takes at least {})",
            size(budget),
            size(all),
            2 * SLOTS,
        ),
    }))
}

/// Which streamed layer each of the [`SLOTS`] device buffers holds, and so which uploads a pass
/// queues: the order of `cuda_stream::WeightStream`, apart from the copies themselves. Streamed
/// layers are numbered by their place in a pass (`pos`); layer `pos` always runs from slot
/// `pos % SLOTS`.
#[derive(Debug)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct SlotSchedule {
    streamed: usize,
    /// Per slot: the streamed layer it holds, or will once its last upload completes.
    holds: Vec<Option<usize>>,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl SlotSchedule {
    /// The schedule of `streamed` layers (a multiple of [`SLOTS`]), nothing uploaded yet.
    pub(crate) fn new(streamed: usize) -> SlotSchedule {
        debug_assert!(streamed.is_multiple_of(SLOTS), "{streamed} streamed layers");
        SlotSchedule { streamed, holds: vec![None; SLOTS.min(streamed)] }
    }

    /// The slot streamed layer `pos` runs from.
    pub(crate) fn slot_of(pos: usize) -> usize {
        pos % SLOTS
    }

    /// The uploads that make the first pass's first layers ready: one per slot.
    pub(crate) fn prime(&mut self) -> Vec<usize> {
        (0..self.holds.len()).inspect(|&pos| self.holds[Self::slot_of(pos)] = Some(pos)).collect()
    }

    /// Before streamed layer `pos` runs: `Some(pos)` when it must be uploaded first, its slot
    /// holding another layer (the first pass unprimed, a pass that stopped on an error).
    pub(crate) fn before(&mut self, pos: usize) -> Option<usize> {
        let slot = Self::slot_of(pos);
        if self.holds[slot] == Some(pos) {
            return None;
        }
        self.holds[slot] = Some(pos);
        Some(pos)
    }

    /// Once streamed layer `pos`'s kernels are queued: the layer to upload into its slot behind
    /// them, [`SLOTS`] places later in the pass (cyclically: the next pass's first ones); `None`
    /// when that is `pos` itself (as many slots as streamed layers: each keeps its own).
    pub(crate) fn after(&mut self, pos: usize) -> Option<usize> {
        let next = (pos + SLOTS) % self.streamed;
        if next == pos {
            return None;
        }
        self.holds[Self::slot_of(pos)] = Some(next);
        Some(next)
    }

    /// The upload [`SlotSchedule::before`] or [`SlotSchedule::after`] asked for into `slot`
    /// failed (a read from disk, a copy): the slot holds no layer known, so the next layer to run
    /// from it uploads its own.
    pub(crate) fn forget(&mut self, slot: usize) {
        self.holds[slot] = None;
    }
}

/// `bytes` as a person reads it, in the decimal units the size flags take: "1.06 GB", "613.4 MB".
fn size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 { format!("{:.2} GB", b / 1e9) } else { format!("{:.1} MB", b / 1e6) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_streams_when_everything_fits() {
        assert_eq!(plan_layers(100, &[10; 8], &[11; 8], 180).unwrap(), vec![false; 8]);
    }

    #[test]
    fn the_last_layers_stream_in_even_counts_of_at_least_four() {
        // 8 layers of 10: 180 all resident. Streaming k costs 100 + 10 (8 - k) + 2 x 11.
        let plan = |budget| plan_layers(100, &[10; 8], &[11; 8], budget);
        // 179 < 180: streaming 4 needs 162.
        assert_eq!(plan(179).unwrap(), [false, false, false, false, true, true, true, true]);
        assert_eq!(plan(162).unwrap(), [false, false, false, false, true, true, true, true]);
        // 161: 6 layers (142).
        assert_eq!(plan(161).unwrap(), [false, false, true, true, true, true, true, true]);
        // 122: all 8.
        assert_eq!(plan(122).unwrap(), vec![true; 8]);
        // 121: not even all 8 fit; the error names the least plan.
        let err = plan(121).unwrap_err().to_string();
        assert!(err.contains("streaming 8 of its 8 layers"), "{err}");
    }

    #[test]
    fn an_odd_layer_count_keeps_one_layer_resident_at_least() {
        let plan = plan_layers(0, &[10; 7], &[10; 7], 30).unwrap();
        assert_eq!(plan, [false, true, true, true, true, true, true]);
        assert!(plan_layers(0, &[10; 7], &[10; 7], 29).is_err());
    }

    #[test]
    fn the_largest_streamed_layer_sizes_the_slots() {
        // The last layer is the largest: the slots take its size whatever k is. Streaming 4
        // needs 20 kept + 2 x 40 = 100 (not 20 + 2 x 10); streaming all 6, 80.
        let resident = [10, 10, 10, 10, 10, 40];
        assert_eq!(plan_layers(0, &resident, &resident, 85).unwrap(), vec![true; 6]);
        assert_eq!(plan_layers(0, &resident, &resident, 89).unwrap(), vec![true; 6]);
        assert_eq!(plan_layers(0, &resident, &resident, 90).unwrap(), vec![false; 6]);
    }

    /// Runs passes over `k` streamed layers through the schedule, with a model of the slots'
    /// contents (an upload lands at once): every layer finds its own weights in its slot. A
    /// pass may stop after `stop` layers (an error) before its layer runs. Returns the uploads
    /// per pass.
    fn run_passes(k: usize, passes: &[Option<usize>]) -> Vec<usize> {
        let mut s = SlotSchedule::new(k);
        let mut slots = vec![usize::MAX; SLOTS.min(k)];
        for pos in s.prime() {
            slots[SlotSchedule::slot_of(pos)] = pos;
        }
        let mut counts = Vec::new();
        for stop in passes {
            let mut uploads = 0;
            for pos in 0..k {
                if let Some(p) = s.before(pos) {
                    slots[SlotSchedule::slot_of(p)] = p;
                    uploads += 1;
                }
                if *stop == Some(pos) {
                    break;
                }
                assert_eq!(slots[SlotSchedule::slot_of(pos)], pos, "layer {pos} of {k} reads another's weights");
                if let Some(p) = s.after(pos) {
                    slots[SlotSchedule::slot_of(p)] = p;
                    uploads += 1;
                }
            }
            counts.push(uploads);
        }
        counts
    }

    #[test]
    fn every_streamed_layer_runs_on_its_own_weights() {
        // Each pass copies every streamed layer once, the first pass's first two primed.
        assert_eq!(run_passes(4, &[None, None, None]), [4, 4, 4]);
        assert_eq!(run_passes(8, &[None, None]), [8, 8]);
        // Two layers, two slots: primed once, never copied again.
        assert_eq!(run_passes(2, &[None, None]), [0, 0]);
        // Passes that stop on an error (after a layer's wait, before its kernels) leave the next
        // ones correct: the layers that find another's weights in their slot copy their own.
        for stop in 0..6 {
            let counts = run_passes(6, &[None, Some(stop), None, None]);
            assert_eq!(counts[3], 6, "stop at {stop}: back to one copy per layer: {counts:?}");
        }
    }

    #[test]
    fn a_failed_upload_is_done_again_not_trusted() {
        let mut s = SlotSchedule::new(4);
        s.prime();
        assert_eq!(s.before(0), None);
        // Behind layer 0, layer 2's upload into slot 0 fails: the pass goes on to layer 1.
        assert_eq!(s.after(0), Some(2));
        s.forget(SlotSchedule::slot_of(2));
        assert_eq!(s.before(1), None);
        assert_eq!(s.after(1), Some(3));
        // Layer 2 finds its slot unknown and uploads its own weights.
        assert_eq!(s.before(2), Some(2));
        // A failed upload asked before a layer runs is done again by the next try.
        s.forget(SlotSchedule::slot_of(2));
        assert_eq!(s.before(2), Some(2));
        assert_eq!(s.before(2), None);
    }

    /// Sizes of a model of `layers` MoE layers of 100 bytes each, 80 of them in 8 experts of 10
    /// (slots of 12), with `fixed` bytes that stay.
    fn moe_needs(layers: usize, fixed: u64) -> VramNeeds {
        VramNeeds {
            weights: fixed,
            kv_cache: 0,
            scratch: 0,
            resident: vec![100; layers],
            streamed: vec![110; layers],
            experts: vec![80; layers],
            layer_experts: vec![8; layers],
            expert_count: 8 * layers,
            expert_slot: 12,
            experts_per_token: 2,
        }
    }

    #[test]
    fn routed_experts_get_the_slots_the_rest_leaves() {
        let needs = moe_needs(4, 50);
        // 50 + 4 x 20 = 130 stays; each 12 bytes more is a slot.
        assert_eq!(plan_experts(&needs, 129), None);
        assert_eq!(plan_experts(&needs, 141), None);
        assert_eq!(plan_experts(&needs, 142), Some(1));
        assert_eq!(plan_experts(&needs, 153), Some(1));
        assert_eq!(plan_experts(&needs, 154), Some(2));
        assert_eq!(plan_experts(&needs, 130 + 12 * 20 + 11), Some(20));
        // Never more slots than experts.
        assert_eq!(plan_experts(&needs, 10_000), Some(32));
        // A dense model has no experts to cache.
        let dense = VramNeeds {
            experts: vec![0; 4],
            layer_experts: vec![0; 4],
            expert_count: 0,
            expert_slot: 0,
            experts_per_token: 0,
            ..moe_needs(4, 50)
        };
        assert_eq!(plan_experts(&dense, 10_000), None);
    }

    #[test]
    fn a_report_with_an_expert_cache_counts_its_slots_not_the_experts() {
        let report = VramReport {
            needs: moe_needs(4, 50),
            streamed: vec![false; 4],
            expert_slots: 5,
            expected_expert_hit_rate: Some(0.25),
        };
        assert_eq!(report.buffer_bytes(), 60);
        assert_eq!(report.uploaded_per_pass(), 0);
        // 50 fixed + 4 x (100 - 80) resident + 5 x 12.
        assert_eq!(report.device_bytes(), 50 + 80 + 60);
        // A token: 2 experts of 10 bytes in each of 4 layers, three quarters of them copied.
        assert_eq!(report.expected_expert_upload(), Some(60));
    }

    #[test]
    fn the_uniform_hit_rate_grows_with_the_slots_to_all() {
        let layers = [8, 8, 0, 8, 8];
        let rates: Vec<f64> =
            [1, 2, 4, 8, 9, 16, 24, 31, 32].iter().map(|&s| uniform_hit_rate(&layers, 2, s)).collect();
        println!("hit rates at 1, 2, 4, 8, 9, 16, 24, 31, 32 slots of 32 experts: {rates:.3?}");
        assert!(rates.windows(2).all(|w| w[0] <= w[1]), "{rates:?}");
        // Every expert in a slot: every access hits once warm.
        assert_eq!(rates[rates.len() - 1], 1.0);
        // Fewer slots than a layer's 2 experts plus one: the current layer's own are evicted.
        assert!(rates[0] < 0.05, "{rates:?}");
        // One slot per expert but one: most hits.
        assert!(rates[7] > 0.9, "{rates:?}");
        // Half the experts: about what a quarter of each layer's picks being a repeat gives, at
        // least the share cached under layer-lru's choice of what to keep.
        assert!(rates[5] > 0.35 && rates[5] < 0.75, "{rates:?}");
        assert_eq!(uniform_hit_rate(&[0, 0], 2, 4), 0.0);
        assert_eq!(uniform_hit_rate(&layers, 2, 0), 0.0);
    }

    #[test]
    fn a_host_tier_takes_what_max_ram_leaves_beyond_the_staging_buffers() {
        let mut needs = moe_needs(4, 50);
        needs.expert_slot = 5000;
        let report = VramReport { needs, streamed: vec![false; 4], expert_slots: 5, expected_expert_hit_rate: None };
        // Each expert reads 8192 bytes; the staging buffers take three.
        assert_eq!(report.host_bytes_with(true), 3 * 8192);
        assert_eq!(report.host_tier_units(None), 0);
        assert_eq!(report.host_tier_units(Some(3 * 8192)), 0);
        assert_eq!(report.host_tier_units(Some(1000)), 0);
        assert_eq!(report.host_tier_units(Some(5 * 8192 - 1)), 1);
        assert_eq!(report.host_tier_units(Some(13 * 8192)), 10);
        assert_eq!(report.host_tier_bytes(10), 10 * 8192);
        // Never more than every expert.
        assert_eq!(report.host_tier_units(Some(1 << 40)), 32);
        // Streamed layers: a buffer is the largest one's read (9000 bytes, so 12288).
        let mut needs = moe_needs(4, 50);
        needs.streamed = vec![10, 5000, 6000, 9000];
        let layers = VramReport {
            needs,
            streamed: vec![false, true, true, true],
            expert_slots: 0,
            expected_expert_hit_rate: None,
        };
        assert_eq!(layers.host_bytes_with(true), 3 * 12288);
        assert_eq!(layers.host_tier_units(Some(3 * 12288 + 2 * 12288)), 2);
        assert_eq!(layers.host_tier_units(Some(1 << 40)), 3, "at most every streamed layer");
        assert_eq!(layers.host_tier_bytes(2), 2 * 12288);
        assert_eq!(layers.expected_host_tier_hit_rate(2), Some(2.0 / 3.0));
        // Nothing streams: no tier.
        let resident = VramReport { streamed: vec![false; 4], ..layers };
        assert_eq!(resident.host_tier_units(Some(1 << 40)), 0);
        assert_eq!(resident.expected_host_tier_hit_rate(2), None);
    }

    #[test]
    fn a_host_tier_holds_more_of_the_misses_as_it_grows() {
        let layers = [8, 8, 0, 8, 8];
        // A device of 8 slots of 32 experts, tiers from none to every expert.
        let shares: Vec<f64> =
            [0, 4, 8, 16, 24, 32].iter().map(|&h| uniform_tier_hit_rates(&layers, 2, 8, h).1).collect();
        println!("host tier shares of the misses at 0, 4, 8, 16, 24, 32 experts: {shares:.3?}");
        assert_eq!(shares[0], 0.0);
        assert!(shares.windows(2).all(|w| w[0] <= w[1]), "{shares:?}");
        // Every expert in the tier: every device miss is held once warm.
        assert_eq!(shares[5], 1.0);
        // The device's own rate does not depend on the tier.
        let device = uniform_hit_rate(&layers, 2, 8);
        assert!([0, 4, 32].iter().all(|&h| uniform_tier_hit_rates(&layers, 2, 8, h).0 == device));
        // The device and a tier of 16 hold together more than the device alone, and less than a
        // device of 24: the tier gives up what the device holds first, but may still hold some.
        let together = device + (1.0 - device) * shares[3];
        assert!(together > device && together <= uniform_hit_rate(&layers, 2, 24) + 1e-9, "{together}");
    }

    #[test]
    fn expert_cache_counts_since_earlier_ones_subtract_the_counters() {
        let earlier = ExpertCacheCounts {
            slots: 4,
            hits: 3,
            misses: 5,
            bytes_uploaded: 50,
            host_hits: 1,
            disk_reads: 4,
            ..Default::default()
        };
        let now = ExpertCacheCounts {
            hits: 13,
            misses: 15,
            bytes_uploaded: 150,
            host_hits: 6,
            disk_reads: 9,
            host_slots: 7,
            expected_hit_rate: Some(0.5),
            ..earlier
        };
        let d = now.since(&earlier);
        assert_eq!(
            d,
            ExpertCacheCounts {
                slots: 4,
                hits: 10,
                misses: 10,
                bytes_uploaded: 100,
                host_slots: 7,
                host_hits: 5,
                disk_reads: 5,
                expected_hit_rate: Some(0.5)
            }
        );
        assert_eq!(d.hit_rate(), 0.5);
        assert_eq!(ExpertCacheCounts::default().hit_rate(), 0.0);
    }

    #[test]
    fn a_host_tier_spreads_the_layers_it_keeps_over_the_pass() {
        assert_eq!(spread(0, 6), Vec::<usize>::new());
        assert_eq!(spread(1, 6), [5]);
        assert_eq!(spread(2, 6), [2, 5]);
        assert_eq!(spread(3, 6), [1, 3, 5]);
        assert_eq!(spread(4, 6), [1, 2, 4, 5]);
        assert_eq!(spread(6, 6), [0, 1, 2, 3, 4, 5]);
        assert_eq!(spread(9, 6), [0, 1, 2, 3, 4, 5]);
        for n in 1..20 {
            for held in 0..=n {
                assert_eq!(spread(held, n).len(), held, "{held} of {n}");
            }
        }
    }

    #[test]
    fn a_host_tier_that_gives_up_what_the_device_holds_first_holds_more_misses() {
        // Layers of 8 experts, top-2; devices of a quarter and a half of the experts, tiers of an
        // eighth to three quarters. Printed: the share of the accesses read from disk.
        for layers in [4, 32] {
            let experts = vec![8; layers];
            let n = 8 * layers;
            for slots in [n / 4, n / 2] {
                for host in [n / 8, n / 4, n / 2, 3 * n / 4] {
                    let disk = |prefer| {
                        let (device, tier) = tier_hit_rates(&experts, 2, slots, host, prefer);
                        (1.0 - device) * (1.0 - tier)
                    };
                    let (recency, preferring) = (disk(false), disk(true));
                    println!(
                        "{layers} x 8 experts, device {slots}, tier {host}: read from disk {recency:.3} by recency \
                         alone, {preferring:.3} giving up the device's first ({:.0}% fewer)",
                        100.0 * (1.0 - preferring / recency)
                    );
                    assert!(preferring < recency, "{layers} layers, {slots} slots, {host} in the tier");
                }
            }
        }
    }

    #[test]
    fn too_few_layers_to_stream_is_an_error() {
        let err = plan_layers(0, &[10; 3], &[10; 3], 20).unwrap_err().to_string();
        assert!(err.contains("too few to stream"), "{err}");
    }
}
