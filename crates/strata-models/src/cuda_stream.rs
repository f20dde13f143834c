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
//! The host copies are made once, at load, from the checkpoint's own (memory-mapped) pages,
//! which are then released from the resident set (`MADV_PAGEOUT`), so that host memory does not
//! hold the streamed layers twice. Or, given a directory for layer images
//! (`--offload-dir`), there are no host copies: each streamed layer is laid out once into a file
//! there (`crate::layer_images`; at load only the layout is computed when the file is already
//! valid), and an `ImageReader` reads the images in pass order into three page-locked staging
//! buffers on two threads of its own; an upload takes the buffer its layer's image landed in and
//! gives it back at once (the reader's next read into it waits for the copy out).
//! [`WeightStream::set_host_tier`] keeps some of those layers in page-locked host memory after
//! all (what `--max-ram` leaves beyond the staging buffers), each read from its image once, and
//! the reader then cycles through the other layers' images only.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use strata_kernels::Cuda;
use strata_kernels::cuda::CudaSlice;
use strata_kernels::cuda::pinned::{Pinned, Upload};
use strata_kernels::cuda::tensor::{region_tensor, upload_bytes};
use strata_tensor::{DType, Tensor};

use crate::layer_images::{ImageReader, Staging};
use crate::{Error, Result};

pub(crate) use crate::vram::{ALIGN, SLOTS, SlotSchedule, spread};

/// Where [`Placer::put`] puts a weight.
pub(crate) enum Placer<'a> {
    /// In a device buffer of its own.
    Resident,
    /// At the next [`ALIGN`] boundary of a streamed layer: its bytes into the layer's host copy
    /// (when there is one), its tensor over the same place of the slot the layer runs from.
    Staged {
        /// The layer's host copy: its page-locked buffer, a buffer its image on disk is written
        /// from, or none when only the layout is wanted (an image already on disk).
        host: Option<&'a mut [u8]>,
        /// The slot's device buffer.
        slot: &'a Arc<CudaSlice<u8>>,
        /// Bytes laid out so far.
        used: usize,
        /// A hash of what was placed where (offsets, dtypes, shapes), FNV-1a.
        layout: u64,
    },
}

impl<'a> Placer<'a> {
    /// A layer laid out from the start of `slot`, its bytes into `host` if given.
    pub(crate) fn staged(host: Option<&'a mut [u8]>, slot: &'a Arc<CudaSlice<u8>>) -> Placer<'a> {
        Placer::Staged { host, slot, used: 0, layout: 0xcbf2_9ce4_8422_2325 }
    }

    /// The bytes laid out and the layout's hash (zeros for [`Placer::Resident`]).
    pub(crate) fn laid_out(&self) -> (usize, u64) {
        match self {
            Placer::Staged { used, layout, .. } => (*used, *layout),
            Placer::Resident => (0, 0),
        }
    }

    /// A device tensor of `dtype` and shape `dims` holding what `bytes` gives (called only when
    /// the bytes go somewhere: not for a layout alone).
    pub(crate) fn put<'b>(
        &mut self,
        cuda: &Cuda,
        dtype: DType,
        dims: &[usize],
        bytes: impl FnOnce() -> Result<Cow<'b, [u8]>>,
    ) -> Result<Tensor> {
        let len = dtype
            .bytes_for(dims.iter().product())
            .ok_or_else(|| Error::InvalidInput(format!("a {dtype} tensor of shape {dims:?} is not whole blocks")))?;
        match self {
            Placer::Resident => Ok(upload_bytes(cuda, &bytes()?, dtype, dims)?),
            Placer::Staged { host, slot, used, layout } => {
                let at = used.next_multiple_of(ALIGN);
                let end = at + len;
                if host.as_ref().is_some_and(|h| end > h.len()) || end > slot.len() {
                    return Err(Error::InvalidInput(format!(
                        "a streamed layer's weights overflow its {}-byte buffers (internal: the layer's size bound is short)",
                        slot.len()
                    )));
                }
                if let Some(host) = host {
                    let bytes = bytes()?;
                    if bytes.len() != len {
                        return Err(Error::InvalidInput(format!(
                            "{} bytes for a {dtype} tensor of shape {dims:?}, which takes {len}",
                            bytes.len()
                        )));
                    }
                    host[at..end].copy_from_slice(&bytes);
                }
                let words =
                    [at as u64, len as u64, dims.len() as u64].into_iter().chain(dims.iter().map(|&d| d as u64));
                for w in words.chain(dtype.name().bytes().map(u64::from)) {
                    for b in w.to_le_bytes() {
                        *layout = (*layout ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
                    }
                }
                *used = end;
                Ok(region_tensor(cuda, slot, at, dtype, dims)?)
            }
        }
    }

    /// A device copy of host tensor `t`.
    pub(crate) fn tensor(&mut self, cuda: &Cuda, t: &Tensor) -> Result<Tensor> {
        self.put(cuda, t.dtype(), t.shape().dims(), || Ok(Cow::Borrowed(t.cpu_bytes()?)))
    }
}

/// A streamed layer: its page-locked host copy (none when it comes from disk) and its place.
struct StreamedLayer {
    host: Option<Pinned>,
    /// Bytes to copy (the host copy and the slot may be longer).
    len: usize,
    /// Its place among the streamed layers, in pass order (and its image's index on disk).
    pos: usize,
}

/// What the copies need between calls.
struct State {
    /// Which layer each slot holds.
    schedule: SlotSchedule,
    /// Each slot's last upload.
    uploads: Vec<Option<Upload>>,
    /// The layer images read ahead from disk, for the layers without host copies.
    reader: Option<ImageReader<Pinned>>,
}

/// `count` page-locked buffers of `read` bytes for images from disk to land in (an
/// `ImageReader`'s [`crate::layer_images::STAGING_BUFFERS`], or a host tier's), readable by
/// the host at memory speed (their checksums are checked there).
pub(crate) fn staging_buffers(cuda: &Cuda, read: usize, count: usize) -> Result<Vec<Pinned>> {
    (0..count).map(|_| Ok(Pinned::new_readable(cuda, read)?)).collect()
}

/// The `count` buffers of `read` bytes of a host tier of `what` (`staging_buffers`), an
/// allocation failure told as the host tier's, with what it asked for and the way out.
pub(crate) fn host_tier_buffers(cuda: &Cuda, read: usize, count: usize, what: &str) -> Result<Vec<Pinned>> {
    staging_buffers(cuda, read, count).map_err(|e| {
        Error::InvalidInput(format!(
            "cannot allocate the host tier of {count} {what} ({} of page-locked memory, what --max-ram leaves \
             beyond the staging buffers): {e}; give a smaller --max-ram",
            crate::store::planner::format_size(count as u64 * read as u64)
        ))
    })
}

impl Staging for Pinned {
    fn bytes(&mut self) -> Result<&mut [u8]> {
        Ok(self.as_mut_slice()?)
    }
}

/// The streamed layers of a model and the copies that bring them in ([`WeightStream::before`],
/// [`WeightStream::after`]).
pub(crate) struct WeightStream {
    /// Per layer of the model: `Some` when it streams.
    layers: Vec<Option<StreamedLayer>>,
    /// The streamed layers' indices in pass order.
    order: Vec<usize>,
    slots: Vec<Arc<CudaSlice<u8>>>,
    state: Mutex<State>,
    /// Bytes copied per pass.
    bytes_per_pass: usize,
    /// The layer images' data file and the largest read of it, when the layers come from disk.
    images: Option<(std::path::PathBuf, usize)>,
}

impl WeightStream {
    /// [`SLOTS`] device buffers of `slot_bytes` each.
    pub(crate) fn slots(cuda: &Cuda, slot_bytes: usize) -> Result<Vec<Arc<CudaSlice<u8>>>> {
        (0..SLOTS).map(|_| Ok(Arc::new(cuda.zeros::<u8>(slot_bytes.max(1))?))).collect()
    }

    /// The stream of `layers` (per layer of the model: its host copy and the bytes it holds, for
    /// the streamed ones), taking `slots` in turn: streamed layer `j` runs from slot `j % SLOTS`.
    /// Layers without a host copy come from `reader`, which reads their images in pass order.
    pub(crate) fn new(
        layers: Vec<Option<(Option<Pinned>, usize)>>,
        slots: Vec<Arc<CudaSlice<u8>>>,
        reader: Option<ImageReader<Pinned>>,
    ) -> WeightStream {
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
        let images = reader.as_ref().map(|r| (r.images().path().to_path_buf(), r.images().largest_read()));
        let uploads = (0..slots.len()).map(|_| None).collect();
        let state = Mutex::new(State { schedule: SlotSchedule::new(order.len()), uploads, reader });
        WeightStream { layers, order, slots, state, bytes_per_pass, images }
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

    /// The layer images' data file and the largest read of it, when the streamed layers are
    /// read from disk.
    pub(crate) fn images(&self) -> Option<(&std::path::Path, usize)> {
        self.images.as_ref().map(|(p, r)| (p.as_path(), *r))
    }

    /// With the layers read from images: the streamed layers that are (those without a host
    /// copy) and the bytes a pass reads of them, whole 4096-byte blocks. `None` otherwise.
    pub(crate) fn read_per_pass(&self) -> Option<(usize, usize)> {
        self.images.as_ref()?;
        let read: Vec<usize> = self
            .layers
            .iter()
            .flatten()
            .filter(|l| l.host.is_none())
            .map(|l| l.len.next_multiple_of(crate::layer_images::IMAGE_ALIGN))
            .collect();
        Some((read.len(), read.iter().sum()))
    }

    /// With the layers read from images: keeps as many of them as `bytes` of page-locked
    /// memory hold (each in a buffer of the largest image's read; spread evenly over the pass)
    /// in host memory, read from their images once now, and reads only the others pass by
    /// pass. Returns the layers kept. Replaces no host copy: call it once, on a stream whose
    /// layers all come from disk.
    pub(crate) fn set_host_tier(&mut self, cuda: &Cuda, bytes: u64) -> Result<usize> {
        let Some(&(_, read)) = self.images.as_ref() else {
            return Err(Error::InvalidInput(
                "a host tier of streamed layers needs them read from layer images (--offload-dir)".into(),
            ));
        };
        let n = self.order.len();
        let count = usize::try_from(bytes / read.max(1) as u64).unwrap_or(usize::MAX).min(n);
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let Some(reader) = &state.reader else { return Ok(0) };
        if count == 0 {
            return Ok(0);
        }
        if self.layers.iter().flatten().any(|l| l.host.is_some()) {
            return Err(Error::InvalidInput("the streamed layers' host tier is set once (internal)".into()));
        }
        let images = reader.shared_images();
        let kept = spread(count, n);
        // Everything that can fail comes before any change: the copies, read and checked, and
        // the new reader's staging buffers.
        let mut copies = host_tier_buffers(cuda, read, kept.len(), "streamed layers")?;
        for (&pos, host) in kept.iter().zip(&mut copies) {
            images.read_into(pos, host.as_mut_slice()?)?;
        }
        let rest: Vec<usize> = (0..n).filter(|p| !kept.contains(p)).collect();
        let reader = if rest.is_empty() {
            None
        } else {
            let buffers = staging_buffers(cuda, read, crate::layer_images::STAGING_BUFFERS)?;
            Some(ImageReader::cycling(images, buffers, rest)?)
        };
        // The copies queued from the old reader's buffers finish before they go.
        cuda.synchronize()?;
        state.reader = reader;
        for (pos, host) in kept.iter().zip(copies) {
            self.layers[self.order[*pos]].as_mut().expect("order lists streamed layers").host = Some(host);
        }
        Ok(count)
    }

    /// Queues the upload of streamed layer `pos` into its slot, after the compute queued so far:
    /// from its host copy, or from the staging buffer its image was read into (which goes back to
    /// the reader, whose next read into it waits for this copy).
    fn upload(&self, cuda: &Cuda, state: &mut State, pos: usize) -> Result<()> {
        let layer = self.layers[self.order[pos]].as_ref().expect("order lists streamed layers");
        let slot = SlotSchedule::slot_of(pos);
        let upload = match self.upload_from(cuda, layer, &mut state.reader, slot) {
            Ok(upload) => upload,
            Err(e) => {
                // The slot's contents are unknown now: whoever runs from it next uploads again.
                state.schedule.forget(slot);
                return Err(e);
            }
        };
        state.uploads[slot] = Some(upload);
        Ok(())
    }

    /// Queues the copy of `layer` into `slot`, from its host copy or its image on disk.
    fn upload_from(
        &self,
        cuda: &Cuda,
        layer: &StreamedLayer,
        reader: &mut Option<ImageReader<Pinned>>,
        slot: usize,
    ) -> Result<Upload> {
        Ok(match (&layer.host, reader) {
            (Some(host), _) => cuda.upload_async_shared(host, layer.len, &self.slots[slot])?,
            (None, Some(reader)) => {
                let staged = reader.take(layer.pos)?;
                let upload = cuda.upload_async_shared(&staged, layer.len, &self.slots[slot]);
                reader.give_back(staged);
                upload?
            }
            (None, None) => {
                return Err(Error::InvalidInput(format!(
                    "streamed layer {} has neither a host copy nor an image on disk (internal)",
                    self.order[layer.pos]
                )));
            }
        })
    }

    /// Before layer `li`'s kernels: when it streams, the compute stream waits for its weights
    /// (queuing their upload first if its slot holds another layer).
    pub(crate) fn before(&self, cuda: &Cuda, li: usize) -> Result<()> {
        let Some(layer) = &self.layers[li] else { return Ok(()) };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = state.schedule.before(layer.pos) {
            self.upload(cuda, &mut state, pos)?;
        }
        let upload = state.uploads[SlotSchedule::slot_of(layer.pos)].as_ref().expect("every slot's layer was uploaded");
        Ok(cuda.wait_upload(upload)?)
    }

    /// Once layer `li`'s kernels are queued: when it streams, queues the upload of the streamed
    /// layer [`SLOTS`] places later (cyclically) into the same slot, to run after them.
    pub(crate) fn after(&self, cuda: &Cuda, li: usize) -> Result<()> {
        let Some(layer) = &self.layers[li] else { return Ok(()) };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match state.schedule.after(layer.pos) {
            Some(next) => self.upload(cuda, &mut state, next),
            None => Ok(()),
        }
    }

    /// Queues the first pass's uploads (one per slot).
    pub(crate) fn prime(&self, cuda: &Cuda) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for pos in state.schedule.prime() {
            self.upload(cuda, &mut state, pos)?;
        }
        Ok(())
    }
}
