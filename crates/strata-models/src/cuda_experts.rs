//! A device cache of hot experts: how a Mixture-of-Experts model larger than `--max-vram` runs
//! on CUDA when everything but its routed experts fits.
//!
//! `crate::vram::plan_experts` sizes it: every weight but the routed experts stays on the device,
//! the experts stay in page-locked host memory (one copy each, laid out as a slot holds it), and
//! as many device slots as the ceiling leaves room for take them in as the routers pick them. The
//! slots' device tensors ([`CudaMlp`] over [`region_tensor`]s) are made once: every expert of
//! the model has one dtype and shape per matrix and no biases, so they all lie at the same
//! offsets in a slot, and a product runs from a slot as from a resident expert.
//!
//! The layers of such a model route on the host (`CudaMoe::forward_residual`): the router
//! logits come down, the host picks the experts, and [`DeviceExperts::bring`] gives each a slot
//! (an [`ExpertSlots`] table under the `layer-lru` policy: a layer's experts are next needed a token later,
//! so the layer running now is evicted from first), queuing the copies of those that were not
//! there on the copy stream. A copy starts after the compute queued before it (so after the
//! kernels that read the slot's previous expert), and each expert's kernels wait for its own copy
//! ([`DeviceExperts::ready`]), so the copy of the second expert overlaps the products of the
//! first. More experts than slots (a prefill) go in rounds of at most as many as there are slots.
//! The experts run in ascending order either way, so the logits are those of the resident
//! model routed on the host, bit for bit.
//!
//! The host copies are made once, at load, from the checkpoint's own (memory-mapped) pages,
//! which are then released from the resident set. Or, given a directory for images
//! (`--offload-dir`), there are none: each expert is laid out once into an image on disk
//! (`crate::layer_images`, in `experts/`), and [`DeviceExperts::bring`] reads a batch's misses
//! on request, two at a time, into three page-locked staging buffers, queuing each copy as its
//! read lands. Host memory beyond those buffers (`--max-ram`) can hold a tier of the experts
//! read last ([`DeviceExperts::set_host_tier`], a `HostTier` under the device cache's policy):
//! a device miss is copied from there when it is held, and read from disk only when it is not.

use std::path::Path;
use std::sync::{Arc, Mutex};

use strata_kernels::Cuda;
use strata_kernels::cuda::CudaSlice;
use strata_kernels::cuda::pinned::{Pinned, Upload};

use crate::cuda_decoder::CudaMlp;
use crate::cuda_stream::{Placer, host_tier_buffers, staging_buffers};
use crate::layer_images::{HostTier, ImageReader, ImageSpec, LayerImages, STAGING_BUFFERS};
use crate::moe::Mlp;
use crate::store::planner::{ExpertCachePolicy, ExpertSlots};
use crate::vram::{ExpertCacheCounts, cacheable_expert, expert_slot_bytes};
use crate::{Error, Result};

/// The cache: the experts' host copies, the device slots and which expert each holds.
pub(crate) struct DeviceExperts {
    /// Per expert (numbered across the model): its page-locked host copy (none when the experts
    /// are read from images on disk, `State::reader`).
    hosts: Vec<Pinned>,
    /// Bytes of one expert's copy (the same for all).
    len: usize,
    /// Per slot: its device buffer, and an expert's products over it.
    slots: Vec<Arc<CudaSlice<u8>>>,
    mlps: Vec<CudaMlp>,
    /// The experts' images' data file and the largest read of it, when they come from disk.
    images: Option<(std::path::PathBuf, usize)>,
    /// Per expert: its decoder layer, as `(expert, layer)` pairs for the eviction policy.
    layer_of: Vec<(usize, usize)>,
    state: Mutex<State>,
}

struct State {
    table: ExpertSlots<Box<dyn ExpertCachePolicy>>,
    /// Per slot: its last copy.
    uploads: Vec<Option<Upload>>,
    bytes_uploaded: u64,
    /// The experts' images on disk, read on request, and the host tier in front of them, when
    /// they have no host copies.
    disk: Option<(ImageReader<Pinned>, HostTier<Pinned>)>,
    /// The eviction policy's name (the host tier evicts by a policy of the same kind).
    policy: &'static str,
}

/// The dtype and shape of an expert's three matrices: what must be the same for every expert of
/// a cache (which has no biases, [`cacheable_expert`]).
fn layout_key(m: &Mlp) -> Vec<(strata_tensor::DType, Vec<usize>)> {
    [&m.gate, &m.up, &m.down].iter().map(|l| (l.weight.dtype(), l.weight.shape().dims().to_vec())).collect()
}

impl DeviceExperts {
    /// A cache of `slots` slots for the routed experts of `layers` (per layer of the model: its
    /// experts when they go in the cache), evicting by `policy`. Returns the cache and, per
    /// layer, the number of its first expert in it.
    pub(crate) fn new(
        cuda: &Cuda,
        layers: &[Option<&[Mlp]>],
        slots: usize,
        mut policy: Box<dyn ExpertCachePolicy>,
        images: Option<&Path>,
    ) -> Result<(DeviceExperts, Vec<Option<usize>>)> {
        let mut offsets = Vec::with_capacity(layers.len());
        let mut experts: Vec<(usize, &Mlp)> = Vec::new();
        for (li, l) in layers.iter().enumerate() {
            offsets.push(l.map(|es| {
                let first = experts.len();
                experts.extend(es.iter().map(|e| (li, e)));
                first
            }));
        }
        let Some(&(_, template)) = experts.first() else {
            return Err(Error::InvalidInput("a device expert cache for a model without routed experts".into()));
        };
        if slots == 0 {
            return Err(Error::InvalidInput("a device expert cache of no slots".into()));
        }
        let key = layout_key(template);
        if let Some((li, _)) = experts.iter().find(|(_, e)| layout_key(e) != key || !cacheable_expert(e)) {
            return Err(Error::Unsupported(format!(
                "a device expert cache needs experts of one dtype and shape, without biases; layer {li}'s differ \
                 from layer {}'s first",
                experts[0].0
            )));
        }
        let bytes = expert_slot_bytes(template);
        let slots: Vec<Arc<CudaSlice<u8>>> =
            (0..slots.min(experts.len())).map(|_| Ok(Arc::new(cuda.zeros::<u8>(bytes)?))).collect::<Result<_>>()?;
        // Each slot's products, laid out as every expert is (the template's bytes are not copied).
        let mut mlps = Vec::with_capacity(slots.len());
        let (mut len, mut template_layout) = (None, 0);
        for slot in &slots {
            let mut place = Placer::staged(None, slot);
            mlps.push(CudaMlp::upload(cuda, template, &mut place)?);
            let laid_out = place.laid_out();
            (len, template_layout) = (Some(laid_out.0), laid_out.1);
        }
        let len = len.expect("at least one slot");
        let mut hosts = Vec::with_capacity(experts.len());
        let reader = match images {
            Some(dir) => Some(expert_image_reader(cuda, &experts, &slots[0], (len, template_layout), dir)?),
            None => None,
        };
        for &(li, e) in experts.iter().filter(|_| reader.is_none()) {
            let mut host = Pinned::new(cuda, bytes)?;
            let mut place = Placer::staged(Some(host.as_mut_slice()?), &slots[0]);
            CudaMlp::upload(cuda, e, &mut place)?;
            let (used, _) = place.laid_out();
            if used != len {
                return Err(Error::InvalidInput(format!(
                    "an expert of layer {li} lays out in {used} bytes, the first in {len} (internal: experts of one \
                     shape must lay out alike)"
                )));
            }
            hosts.push(host);
            release_pages(e);
        }
        let layer_of: Vec<(usize, usize)> = experts.iter().enumerate().map(|(u, &(li, _))| (u, li)).collect();
        policy.set_layers(&layer_of);
        let images = reader.as_ref().map(|r| (r.images().path().to_path_buf(), r.images().largest_read()));
        let name = policy.name();
        let disk = match reader {
            Some(reader) => Some((reader, HostTier::new(Vec::new(), policy_like(name, &layer_of)?))),
            None => None,
        };
        let state = State {
            table: ExpertSlots::new(slots.len(), policy),
            uploads: (0..slots.len()).map(|_| None).collect(),
            bytes_uploaded: 0,
            disk,
            policy: name,
        };
        Ok((DeviceExperts { hosts, len, slots, mlps, images, layer_of, state: Mutex::new(state) }, offsets))
    }

    /// Evicts by `policy` from now on. The slots are forgotten (each expert asked next is copied
    /// in again) and the counts start over: for a decoder just built.
    pub(crate) fn set_policy(&self, mut policy: Box<dyn ExpertCachePolicy>) -> Result<()> {
        policy.set_layers(&self.layer_of);
        let name = policy.name();
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, tier)) = &mut guard.disk {
            tier.reset(policy_like(name, &self.layer_of)?);
        }
        guard.table = ExpertSlots::new(self.slots.len(), policy);
        guard.bytes_uploaded = 0;
        guard.policy = name;
        Ok(())
    }

    /// With the experts read from images on disk: gives them a host tier of as many experts as
    /// `bytes` of page-locked memory hold (at most all of them; replacing any tier it had), and
    /// returns that count. An error without images.
    pub(crate) fn set_host_tier(&self, cuda: &Cuda, bytes: u64) -> Result<usize> {
        let Some(&(_, read)) = self.images.as_ref() else {
            return Err(Error::InvalidInput(
                "a host tier of experts needs the experts read from images on disk (--offload-dir)".into(),
            ));
        };
        let count = usize::try_from(bytes / read.max(1) as u64).unwrap_or(usize::MAX).min(self.layer_of.len());
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let name = guard.policy;
        let Some((_, tier)) = &mut guard.disk else { unreachable!("images come with a reader") };
        // The old tier's buffers go first, so that the two are never held at once.
        *tier = HostTier::new(Vec::new(), policy_like(name, &self.layer_of)?);
        let buffers = host_tier_buffers(cuda, read, count, "experts")?;
        *tier = HostTier::new(buffers, policy_like(name, &self.layer_of)?);
        Ok(count)
    }

    /// The experts' images' data file and the largest read of it, when they are read from disk.
    pub(crate) fn images(&self) -> Option<(&Path, usize)> {
        self.images.as_ref().map(|(p, r)| (p.as_path(), *r))
    }

    /// Slots.
    pub(crate) fn slots(&self) -> usize {
        self.slots.len()
    }

    /// A slot for each of `units` (distinct experts, at most [`DeviceExperts::slots`]), in order,
    /// queuing the copies of those not in one already; each slot's kernels must first
    /// [`DeviceExperts::ready`] it.
    pub(crate) fn bring(&self, cuda: &Cuda, units: &[usize]) -> Result<Vec<usize>> {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *guard;
        // No more experts than slots: each gets one.
        let assigned: Vec<(usize, bool)> =
            state.table.serve(units).into_iter().map(|s| s.expect("no more experts than slots")).collect();
        let (misses, miss_slots): (Vec<usize>, Vec<usize>) =
            units.iter().zip(&assigned).filter(|(_, a)| a.1).map(|(&u, &(slot, _))| (u, slot)).unzip();
        let (uploads, bytes_uploaded) = (&mut state.uploads, &mut state.bytes_uploaded);
        let mut copy = |at: usize, src: &Pinned| -> Result<()> {
            let slot = miss_slots[at];
            uploads[slot] = Some(cuda.upload_async_shared(src, self.len, &self.slots[slot])?);
            *bytes_uploaded += self.len as u64;
            Ok(())
        };
        let table = &state.table;
        let copied = match &mut state.disk {
            // From the host tier, or read (two at a time, in the order they are copied) and kept,
            // the tier giving up first what the device holds (the misses among them now).
            Some((reader, tier)) => tier.fetch(reader, &misses, |u| table.holds(u), copy),
            None => misses.iter().enumerate().try_for_each(|(at, &unit)| copy(at, &self.hosts[unit])),
        };
        if let Err(e) = copied {
            // No slot of this batch's misses may pass for its expert's weights now: the next ask
            // for them copies again.
            for slot in miss_slots {
                state.table.forget(slot);
            }
            return Err(e);
        }
        Ok(assigned.into_iter().map(|(slot, _)| slot).collect())
    }

    /// Makes the compute stream wait for `slot`'s last copy before what is queued next.
    pub(crate) fn ready(&self, cuda: &Cuda, slot: usize) -> Result<()> {
        let guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &guard.uploads[slot] {
            Some(upload) => Ok(cuda.wait_upload(upload)?),
            None => Ok(()),
        }
    }

    /// The products of the expert in `slot`.
    pub(crate) fn mlp(&self, slot: usize) -> &CudaMlp {
        &self.mlps[slot]
    }

    /// The counts so far.
    pub(crate) fn counts(&self) -> ExpertCacheCounts {
        let guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (host_slots, tier) = match &guard.disk {
            Some((_, tier)) => (tier.slots(), tier.counts()),
            None => (0, Default::default()),
        };
        ExpertCacheCounts {
            slots: self.slots.len(),
            hits: guard.table.counts().hits,
            misses: guard.table.counts().misses,
            bytes_uploaded: guard.bytes_uploaded,
            host_slots,
            host_hits: tier.hits,
            disk_reads: tier.reads,
            expected_hit_rate: None,
        }
    }
}

/// A fresh policy of the kind named `name` (an [`ExpertCachePolicy::name`]), its layers set.
fn policy_like(name: &str, layer_of: &[(usize, usize)]) -> Result<Box<dyn ExpertCachePolicy>> {
    let mut policy = crate::store::planner::expert_cache_policy_by_name(name)?;
    policy.set_layers(layer_of);
    Ok(policy)
}

/// Drops the pages of an expert's matrices from the resident set once they are copied (a
/// memory-mapped checkpoint's pages would otherwise hold the expert twice).
fn release_pages(e: &Mlp) {
    for w in [&e.gate.weight, &e.up.weight, &e.down.weight] {
        if let Ok(bytes) = w.cpu_bytes() {
            strata_tensor::release_pages(bytes);
        }
    }
}

/// The reader of the routed experts' images in `dir/experts` (`crate::layer_images`: one image
/// per expert, laid out as a slot holds it, `len` bytes with the layout hash of the template),
/// written first if they are missing or laid out otherwise; it reads the experts asked for.
fn expert_image_reader(
    cuda: &Cuda,
    experts: &[(usize, &Mlp)],
    slot: &Arc<CudaSlice<u8>>,
    (len, layout): (usize, u64),
    dir: &Path,
) -> Result<ImageReader<Pinned>> {
    let dir = dir.join("experts");
    let specs: Vec<ImageSpec> =
        experts.iter().map(|&(layer, _)| ImageSpec { layer, len: len as u64, layout }).collect();
    let mut fill = |i: usize, bytes: &mut [u8]| -> Result<()> {
        let (li, e) = experts[i];
        let mut place = Placer::staged(Some(bytes), slot);
        CudaMlp::upload(cuda, e, &mut place)?;
        release_pages(e);
        if place.laid_out() != (len, layout) {
            return Err(Error::InvalidInput(format!(
                "an expert of layer {li} lays out unlike the first (internal: experts of one shape must lay out alike)"
            )));
        }
        Ok(())
    };
    let images = LayerImages::open_or_build(&dir, &specs, "expert images", &mut fill)?;
    let buffers = staging_buffers(cuda, images.largest_read(), STAGING_BUFFERS)?;
    ImageReader::on_request(Arc::new(images), buffers)
}
