//! Layers whose weights stay in page-locked host memory and stream into GPU memory pass by pass:
//! how a model larger than `--max-vram` runs on CUDA.
//!
//! `crate::vram::plan_vram` decides which layers stream: none when everything fits under the
//! ceiling, else the last `k` layers, `k` the smallest even count (at least 4) for which the
//! resident part, the fixed part (embeddings, head, norms and biases, the KV cache of the planned
//! context, the pass's scratch) and two layer buffers fit. Each streamed layer's matrices are laid out at
//! 256-byte boundaries in a page-locked host buffer of their own ([`Placer::Staged`]); two device
//! buffers (slots) take them in turn, streamed layer `j` always the slot `j % 2`, so its device
//! tensors ([`region_tensor`]) are made once and every kernel launch is as for a resident layer.
//!
//! [`WeightStream`] orders the copies: before a streamed layer's kernels the compute stream waits
//! for its upload; once they are queued, the upload of the streamed layer two places later in the
//! pass (cyclically: the first ones of the next pass) into the same slot is queued on the copy
//! stream, after them. So the copy of one layer overlaps the compute of the one before it, and
//! the first streamed layers of the next pass copy while the head, the sampling and the resident
//! layers run. Each slot records which layer it holds or will hold; a layer that finds its slot
//! holding another (the first pass, a pass that stopped on an error) queues its own upload. With
//! as many slots as streamed layers (tests), each slot keeps its layer and nothing is copied again.
//!
//! The host copies are made once, at load, beside the checkpoint's own (memory-mapped) pages:
//! host memory holds the streamed layers twice.

use std::sync::{Arc, Mutex};

use strata_kernels::Cuda;
use strata_kernels::cuda::CudaSlice;
use strata_kernels::cuda::pinned::{Pinned, Upload};
use strata_kernels::cuda::tensor::{region_tensor, upload_bytes};
use strata_tensor::{DType, Tensor};

use crate::{Error, Result};

pub(crate) use crate::vram::{ALIGN, SLOTS, SlotSchedule};

/// Where [`Placer::put`] puts a weight.
pub(crate) enum Placer<'a> {
    /// In a device buffer of its own.
    Resident,
    /// At the next [`ALIGN`] boundary of a streamed layer: its bytes into the layer's host copy,
    /// its tensor over the same place of the slot the layer runs from.
    Staged {
        /// The layer's page-locked host copy.
        host: &'a mut [u8],
        /// The slot's device buffer.
        slot: &'a Arc<CudaSlice<u8>>,
        /// Bytes laid out so far.
        used: usize,
    },
}

impl Placer<'_> {
    /// A device tensor of `dtype` and shape `dims` holding `bytes`.
    pub(crate) fn put(&mut self, cuda: &Cuda, bytes: &[u8], dtype: DType, dims: &[usize]) -> Result<Tensor> {
        match self {
            Placer::Resident => Ok(upload_bytes(cuda, bytes, dtype, dims)?),
            Placer::Staged { host, slot, used } => {
                let at = used.next_multiple_of(ALIGN);
                let end = at + bytes.len();
                if end > host.len() || end > slot.len() {
                    return Err(Error::InvalidInput(format!(
                        "a streamed layer's weights overflow its {}-byte buffers (internal: the layer's size bound is short)",
                        host.len().min(slot.len())
                    )));
                }
                host[at..end].copy_from_slice(bytes);
                *used = end;
                Ok(region_tensor(cuda, slot, at, dtype, dims)?)
            }
        }
    }

    /// A device copy of host tensor `t`.
    pub(crate) fn tensor(&mut self, cuda: &Cuda, t: &Tensor) -> Result<Tensor> {
        let bytes = t.cpu_bytes()?;
        self.put(cuda, bytes, t.dtype(), t.shape().dims())
    }
}

/// A streamed layer: its page-locked host copy and the slot it runs from.
struct StreamedLayer {
    host: Pinned,
    /// Bytes to copy (the host copy and the slot may be longer).
    len: usize,
    /// Its place among the streamed layers, in pass order.
    pos: usize,
}

/// The streamed layers of a model and the copies that bring them in ([`WeightStream::before`],
/// [`WeightStream::after`]).
pub(crate) struct WeightStream {
    /// Per layer of the model: `Some` when it streams.
    layers: Vec<Option<StreamedLayer>>,
    /// The streamed layers' indices in pass order.
    order: Vec<usize>,
    slots: Vec<Arc<CudaSlice<u8>>>,
    /// Which layer each slot holds ([`SlotSchedule`]), and each slot's last upload.
    state: Mutex<(SlotSchedule, Vec<Option<Upload>>)>,
    /// Bytes copied per pass.
    bytes_per_pass: usize,
}

impl WeightStream {
    /// [`SLOTS`] device buffers of `slot_bytes` each.
    pub(crate) fn slots(cuda: &Cuda, slot_bytes: usize) -> Result<Vec<Arc<CudaSlice<u8>>>> {
        (0..SLOTS).map(|_| Ok(Arc::new(cuda.zeros::<u8>(slot_bytes.max(1))?))).collect()
    }

    /// The stream of `layers` (per layer of the model: its host copy and the bytes it holds, for
    /// the streamed ones), taking `slots` in turn: streamed layer `j` runs from slot `j % SLOTS`.
    pub(crate) fn new(layers: Vec<Option<(Pinned, usize)>>, slots: Vec<Arc<CudaSlice<u8>>>) -> WeightStream {
        let mut order = Vec::new();
        let mut bytes_per_pass = 0;
        let layers = layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                l.map(|(host, len)| {
                    order.push(i);
                    bytes_per_pass += len;
                    StreamedLayer { host, len, pos: order.len() - 1 }
                })
            })
            .collect();
        let state = Mutex::new((SlotSchedule::new(order.len()), (0..slots.len()).map(|_| None).collect()));
        WeightStream { layers, order, slots, state, bytes_per_pass }
    }

    /// Layers that stream.
    pub(crate) fn streamed_layers(&self) -> usize {
        self.order.len()
    }

    /// Bytes copied to the device per forward pass (none after the first with as many slots as
    /// streamed layers: each stays in its own).
    pub(crate) fn bytes_per_pass(&self) -> usize {
        if self.order.len() <= self.slots.len() { 0 } else { self.bytes_per_pass }
    }

    /// Queues the upload of streamed layer `pos` into its slot, after the compute queued so far.
    fn upload(&self, cuda: &Cuda, uploads: &mut [Option<Upload>], pos: usize) -> Result<()> {
        let layer = self.layers[self.order[pos]].as_ref().expect("order lists streamed layers");
        let slot = SlotSchedule::slot_of(pos);
        uploads[slot] = Some(cuda.upload_async_shared(&layer.host, layer.len, &self.slots[slot])?);
        Ok(())
    }

    /// Before layer `li`'s kernels: when it streams, the compute stream waits for its weights
    /// (queuing their upload first if its slot holds another layer).
    pub(crate) fn before(&self, cuda: &Cuda, li: usize) -> Result<()> {
        let Some(layer) = &self.layers[li] else { return Ok(()) };
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (schedule, uploads) = &mut *guard;
        if let Some(pos) = schedule.before(layer.pos) {
            self.upload(cuda, uploads, pos)?;
        }
        let upload = uploads[SlotSchedule::slot_of(layer.pos)].as_ref().expect("every slot's layer was uploaded");
        Ok(cuda.wait_upload(upload)?)
    }

    /// Once layer `li`'s kernels are queued: when it streams, queues the upload of the streamed
    /// layer [`SLOTS`] places later (cyclically) into the same slot, to run after them.
    pub(crate) fn after(&self, cuda: &Cuda, li: usize) -> Result<()> {
        let Some(layer) = &self.layers[li] else { return Ok(()) };
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (schedule, uploads) = &mut *guard;
        match schedule.after(layer.pos) {
            Some(next) => self.upload(cuda, uploads, next),
            None => Ok(()),
        }
    }

    /// Queues the first pass's uploads (one per slot).
    pub(crate) fn prime(&self, cuda: &Cuda) -> Result<()> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (schedule, uploads) = &mut *guard;
        for pos in schedule.prime() {
            self.upload(cuda, uploads, pos)?;
        }
        Ok(())
    }
}
