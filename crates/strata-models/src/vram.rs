//! Which layers of a model stream into GPU memory under a `--max-vram` ceiling: the pure part of
//! `cuda_stream`, so that it is tested in builds without CUDA too.

use strata_tensor::Tensor;

use crate::decoder::{Decoder, Ffn, Layer};
use crate::kv_cache::DEFAULT_BLOCK_LEN;
use crate::moe::Mlp;
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
/// layer streamed from the offload pack.
pub(crate) struct LayerMatrices {
    pub(crate) resident: usize,
    pub(crate) streamed: usize,
}

pub(crate) fn layer_matrices(l: &Layer) -> Option<LayerMatrices> {
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
    let resident: usize = ws.iter().map(|w| w.byte_len()).sum();
    Some(LayerMatrices { resident, streamed: resident + ALIGN * ws.len() })
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
    })
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
}

impl VramNeeds {
    /// What stays on the device whatever streams.
    pub fn fixed(&self) -> u64 {
        self.weights + self.kv_cache + self.scratch
    }
}

/// A placement under a GPU ceiling, as `strata plan --max-vram` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VramReport {
    /// The sizes it was made from.
    pub needs: VramNeeds,
    /// Per layer: whether it streams from host memory.
    pub streamed: Vec<bool>,
}

impl VramReport {
    /// Bytes of the device buffers the streamed layers take turns in (0 when none stream).
    pub fn buffer_bytes(&self) -> u64 {
        let largest = self.needs.streamed.iter().zip(&self.streamed).filter(|(_, s)| **s).map(|(b, _)| *b).max();
        largest.map_or(0, |b| SLOTS as u64 * b)
    }

    /// Bytes copied to the device per forward pass: the streamed layers' matrices.
    pub fn uploaded_per_pass(&self) -> u64 {
        self.needs.resident.iter().zip(&self.streamed).filter(|(_, s)| **s).map(|(b, _)| *b).sum()
    }

    /// Bytes the placement takes on the device: what stays, the resident layers and the buffers.
    pub fn device_bytes(&self) -> u64 {
        let kept: u64 = self.needs.resident.iter().zip(&self.streamed).filter(|(_, s)| !**s).map(|(b, _)| *b).sum();
        self.needs.fixed() + kept + self.buffer_bytes()
    }
}

/// [`plan_vram`] with the sizes it was made from.
pub fn vram_report(decoder: &Decoder, budget: &VramBudget) -> Result<VramReport> {
    let needs = vram_needs(decoder, budget)?;
    let streamed = plan_layers(needs.fixed(), &needs.resident, &needs.streamed, budget.max_bytes)?;
    Ok(VramReport { needs, streamed })
}

/// Which of `decoder`'s layers stream into GPU memory under `budget` (per layer; none when
/// everything fits): `plan_layers` over the model's sizes, as `CudaDecoder::new_within`
/// places it. An error says what would fit when nothing does.
pub fn plan_vram(decoder: &Decoder, budget: &VramBudget) -> Result<Vec<bool>> {
    Ok(vram_report(decoder, budget)?.streamed)
}

pub(crate) const SLOTS: usize = 2;

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
    fn too_few_layers_to_stream_is_an_error() {
        let err = plan_layers(0, &[10; 3], &[10; 3], 20).unwrap_err().to_string();
        assert!(err.contains("too few to stream"), "{err}");
    }
}
