//! Tiered weights in the facade: [`OffloadConfig`] (strategy, memory ceilings, prefetch depth,
//! offload directory), the machine's [`HardwareProfile`] (measured once and cached), and the
//! plan a model loads with.
//!
//! With a RAM ceiling set, loading plans the placement first (the planner's strategies, under
//! `max_ram`, for the longest context a request may reach); a plan that streams nothing runs
//! from the memory-mapped checkpoint as usual, one that streams builds the offload pack on first
//! use and runs through the store. Forward passes are then cut into chunks of at most
//! [`DEFAULT_PREFILL_CHUNK`] tokens, the activation size the plan counted.

use std::path::{Path, PathBuf};
use std::time::Instant;

use strata_models::store::nvme::{Streamer, StreamerConfig, Ticket};
use strata_models::store::planner::{
    DEFAULT_EXPERT_CACHE_POLICY, DEFAULT_STRATEGY, ExpertCachePolicy, HardwareProfile, LARGE_DISK_READ, Plan,
    PlanInput, SMALL_DISK_READ, TierBudgets, WeightManifest, Workload, expert_cache_policy_by_name, strategy_by_name,
};
use strata_models::tensor::{DType, Tensor, cpu};

use strata_models::offload::UnitLayout;
use strata_models::store::pack::InvalidPack;
use strata_models::{ContextScaling, OpenedModel};

use crate::{Error, LoadOptions, Result, cache_dir};

/// Tokens per forward pass of a model loaded with a memory ceiling: the activations the plan
/// counts. Longer prompts run chunk by chunk through the KV cache (the same result).
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// Where weights live: the placement strategy, the memory ceilings, how far the store reads
/// ahead, and where the offload pack goes. The default (nothing set) keeps every weight in the
/// memory-mapped checkpoint, with no plan.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OffloadConfig {
    /// A planner strategy: `all-resident`, `stream-all`, `pin-attention` or `cost-model` (the
    /// default).
    pub strategy: Option<String>,
    /// GPU memory ceiling in bytes, with `--device cuda`: the CUDA decoder keeps weights,
    /// KV cache and scratch under it, streaming its last layers (or a MoE model's routed
    /// experts) from host memory when the weights do not fit
    /// (`strata_models::CudaDecoder::new_within`). Refused on the CPU.
    pub max_vram: Option<u64>,
    /// Host memory ceiling in bytes: on the CPU, weights, KV cache, activations and staging
    /// buffers stay under it, or loading fails saying what would fit; on CUDA, the page-locked
    /// host copies of the `max_vram` placement must fit under it (checked at load, before the
    /// device is opened); with `offload_dir`, the staging buffers the images are read into, and
    /// for a device expert cache's experts, a host tier of the experts read last in what is left.
    pub max_ram: Option<u64>,
    /// Streamed units read ahead of compute (`None`: the strategy decides).
    pub prefetch_layers: Option<usize>,
    /// Where the offload pack is built (default: `<strata cache>/offload`).
    pub offload_dir: Option<PathBuf>,
    /// The machine's rates for the cost model (`None`: the cached profile, measured once on
    /// first use; see [`hardware_profile`]).
    pub hardware: Option<HardwareProfile>,
    /// Store the offload pack's matrices in this dtype (a block-quantized one such as q8_0 to
    /// stream fewer bytes); the model then runs from the pack even when nothing streams.
    /// `None`: as the checkpoint stores them.
    pub pack_dtype: Option<DType>,
    /// A MoE model's experts stay in the offload pack and are read when their router picks
    /// them, into a cache of this many bytes in RAM (part of `max_ram`). `None`: experts are
    /// placed like the other weights (and those the plan streams get a cache of
    /// `DEFAULT_EXPERT_CACHE_FACTOR` times a token's experts).
    pub expert_cache: Option<u64>,
    /// The expert cache's eviction policy: `layer-lru` (the default), `lru` or `lfu`; on CUDA
    /// under `max_vram`, the device expert cache's.
    pub expert_cache_policy: Option<String>,
    /// Decode steps read ahead the experts the next MoE layer is guessed to pick
    /// (`strata_models::Decoder::set_expert_prefetch`). Off by default.
    pub expert_prefetch: bool,
}

impl OffloadConfig {
    /// Whether anything is set, so that loading plans the placement.
    pub fn is_active(&self) -> bool {
        self.strategy.is_some()
            || self.max_vram.is_some()
            || self.max_ram.is_some()
            || self.prefetch_layers.is_some()
            || self.offload_dir.is_some()
            || self.pack_dtype.is_some()
            || self.expert_cache.is_some()
            || self.expert_cache_policy.is_some()
    }

    /// Whether anything but `max_vram` (and the expert cache's policy) is set: the flags that
    /// place the CPU's tiers (RAM and disk). `max_vram` alone is the CUDA decoder's to place
    /// under.
    pub fn places_cpu_tiers(&self) -> bool {
        // The expert cache's policy alone places nothing: it is the CPU cache's or the GPU's.
        OffloadConfig { max_vram: None, expert_cache_policy: None, ..self.clone() }.is_active()
    }

    /// Whether a flag that only the CPU's placement takes is set: anything but the two ceilings,
    /// the offload directory and the expert cache's policy. On CUDA, `max_vram` places the
    /// weights, `max_ram` bounds the page-locked host memory that placement takes (checked at
    /// load, before the device is opened), and `offload_dir` is where the layers it streams are
    /// read from (layer images) rather than kept in host memory.
    pub fn sets_cpu_placement(&self) -> bool {
        OffloadConfig { max_vram: None, max_ram: None, expert_cache_policy: None, offload_dir: None, ..self.clone() }
            .is_active()
    }

    /// Checks the expert cache settings against a model whose MoE layers run `experts_per_token`
    /// experts per token (0: a dense model, which has none to cache).
    pub fn check_experts(&self, experts_per_token: usize) -> Result<()> {
        self.expert_policy()?;
        if self.expert_cache.is_some() && experts_per_token == 0 {
            return Err(Error::InvalidInput(
                "--expert-cache: the model is dense (it has no Mixture-of-Experts layers to cache experts of)".into(),
            ));
        }
        Ok(())
    }

    /// The expert cache's eviction policy, by [`OffloadConfig::expert_cache_policy`]'s name.
    pub fn expert_policy(&self) -> Result<Box<dyn ExpertCachePolicy>> {
        Ok(expert_cache_policy_by_name(self.expert_cache_policy.as_deref().unwrap_or(DEFAULT_EXPERT_CACHE_POLICY))?)
    }

    /// The offload directory: the configured one or `<strata cache>/offload`.
    pub fn offload_dir(&self) -> PathBuf {
        self.offload_dir.clone().unwrap_or_else(|| cache_dir().join("offload"))
    }

    /// Plans `manifest` under this configuration for requests of up to `context_tokens` tokens,
    /// for a model whose MoE layers run `experts_per_token` experts per token (0: dense).
    pub fn plan(
        &self,
        manifest: &WeightManifest,
        hardware: &HardwareProfile,
        context_tokens: usize,
        experts_per_token: usize,
    ) -> Result<Plan> {
        if self.max_vram.is_some() {
            return Err(Error::InvalidInput(
                "--max-vram: plans here place the CPU's tiers (RAM and disk); under a GPU ceiling, `--device cuda \
                 --max-vram SIZE` places the weights when it loads the model"
                    .into(),
            ));
        }
        let name = self.strategy.as_deref().unwrap_or(DEFAULT_STRATEGY);
        let strategy = strategy_by_name(name)?;
        self.check_experts(experts_per_token)?;
        let input = PlanInput {
            manifest,
            budgets: TierBudgets { vram: None, ram: self.max_ram },
            hardware,
            workload: Workload { context_tokens, batch_tokens: batch_tokens(context_tokens) },
            prefetch_depth: self.prefetch_layers,
            process_ram: process_ram(hardware.threads),
            expert_cache: self.expert_cache,
            experts_per_token,
            expert_cache_policy: self.expert_cache_policy.as_deref().unwrap_or(DEFAULT_EXPERT_CACHE_POLICY),
        };
        Ok(strategy.plan(&input)?)
    }
}

/// RAM a process running a model holds besides what the plan places, for each worker thread
/// (its stack, its malloc arena, the matmul scratch it keeps).
pub const THREAD_RAM: u64 = 4 << 20;

/// RAM a process running a model holds besides what the plan places, whatever the threads: its
/// code and libraries, the tokenizer, the heap. The CLI holds about 33 MB when it plans.
pub const PROCESS_RAM: u64 = 40 << 20;

/// What the process holds outside the plan's weights, cache, activations and staging, counted
/// against `max_ram`: `PROCESS_RAM` plus `THREAD_RAM` per worker thread. A fixed figure, so
/// that the same request always gets the same plan. With TinyLlama-1.1B on 2 threads the CLI
/// held 51 MB besides the plan at its peak, against 48 MiB reserved.
pub fn process_ram(threads: usize) -> u64 {
    PROCESS_RAM + THREAD_RAM * threads as u64
}

/// Tokens per forward pass of a model planned for requests of up to `context_tokens` tokens:
/// [`DEFAULT_PREFILL_CHUNK`], or fewer when no request can be that long.
pub(crate) fn batch_tokens(context_tokens: usize) -> usize {
    DEFAULT_PREFILL_CHUNK.min(context_tokens.max(1))
}

/// A placement planned without loading the weights ([`plan_placement`]).
#[derive(Clone, Debug)]
pub struct PlacementReport {
    /// The plan.
    pub plan: Plan,
    /// The units it places.
    pub manifest: WeightManifest,
    /// The machine's rates the plan used.
    pub hardware: HardwareProfile,
    /// The context (tokens of KV cache) reserved.
    pub context_tokens: usize,
}

/// Plans the placement of an opened model: its units, and the plan for the longest request
/// allowed (by `max_context`, else the context scaling's `max_capacity`, else the model's
/// trained context), which it also returns.
pub(crate) fn plan_opened(
    opened: &OpenedModel,
    config: &OffloadConfig,
    scaling: Option<ContextScaling>,
    max_context: Option<usize>,
    pool: &rayon::ThreadPool,
) -> Result<(UnitLayout, Plan, usize)> {
    let (layout, _, plan, _, context) = plan_opened_full(opened, config, scaling, max_context, pool)?;
    Ok((layout, plan, context))
}

fn plan_opened_full(
    opened: &OpenedModel,
    config: &OffloadConfig,
    scaling: Option<ContextScaling>,
    max_context: Option<usize>,
    pool: &rayon::ThreadPool,
) -> Result<(UnitLayout, WeightManifest, Plan, HardwareProfile, usize)> {
    // The plan reserves the KV cache for the longest request allowed.
    let scheme = opened.hparams.rope.with_context_scaling(scaling)?.with_limit(max_context);
    let context = scheme.max_capacity().unwrap_or(opened.hparams.max_position_embeddings);
    let k = opened.hparams.moe.as_ref().map_or(0, |m| m.top_k);
    // Settings that cannot work are refused before the machine is measured.
    config.check_experts(k)?;
    let hardware = match &config.hardware {
        Some(h) => h.clone(),
        None => hardware_profile(&config.offload_dir(), pool.current_num_threads())?,
    };
    let layout = opened.layout()?;
    let manifest = opened.manifest(&layout, config.pack_dtype)?;
    let plan = config.plan(&manifest, &hardware, context, k)?;
    Ok((layout, manifest, plan, hardware, context))
}

/// Plans where the weights of the model at `spec` would live under `options` (its placement,
/// context scaling and threads), without loading them.
pub fn plan_placement(spec: impl AsRef<Path>, options: &LoadOptions) -> Result<PlacementReport> {
    let opened = strata_models::open(&spec.as_ref().to_string_lossy())?;
    let pool = thread_pool(options.threads)?;
    let scaling = match &options.context_scaling {
        Some(c) => Some(c.resolve(opened.hparams.rope.trained_context())?),
        None => None,
    };
    let (_, manifest, plan, hardware, context_tokens) =
        plan_opened_full(&opened, &options.offload, scaling, options.max_context, &pool)?;
    Ok(PlacementReport { plan, manifest, hardware, context_tokens })
}

/// Where the weights of the model at `spec` go under the GPU ceiling `options.offload.max_vram`
/// on CUDA, as loading it with `--device cuda` places them (`strata_models::vram_report`): what
/// stays on the device, which layers stream from host memory, and, under
/// `options.offload.max_ram`, whether the host copies fit (an error says what they need). Needs
/// no GPU; reads the checkpoint's headers and maps its weights.
pub fn plan_vram_placement(spec: impl AsRef<Path>, options: &LoadOptions) -> Result<VramPlacementReport> {
    let Some(max_vram) = options.offload.max_vram else {
        return Err(Error::InvalidInput("plan_vram_placement needs a GPU ceiling (max_vram)".into()));
    };
    let mut decoder = strata_models::open(&spec.as_ref().to_string_lossy())?.load()?.decoder;
    decoder.set_max_context(options.max_context);
    let budget = crate::model::vram_budget(&decoder, Some(max_vram)).expect("a ceiling was given");
    let report = strata_models::vram_report(&decoder, &budget)?;
    let images = layer_images_dir(&options.offload, spec.as_ref())?;
    check_host_ceiling(&report, max_vram, options.offload.max_ram, images.is_some())?;
    let host_tier = if images.is_some() { report.host_tier_units(options.offload.max_ram) } else { 0 };
    Ok(VramPlacementReport {
        budget,
        report,
        layers: decoder.hparams().n_layers,
        max_ram: options.offload.max_ram,
        images,
        host_tier,
    })
}

/// Where a CUDA placement's streamed layers are read from: the directory of the layer images of
/// the checkpoint at `checkpoint` under `--offload-dir`, when one is given (`None`: they stay in
/// page-locked host memory).
pub(crate) fn layer_images_dir(offload: &OffloadConfig, checkpoint: &Path) -> Result<Option<PathBuf>> {
    let Some(dir) = &offload.offload_dir else { return Ok(None) };
    Ok(Some(strata_models::layer_images::images_dir(dir, checkpoint)?))
}

/// Checks a CUDA placement against the host memory ceiling `max_ram`: the page-locked host
/// copies it keeps (of its streamed layers, or of its routed experts under a device expert
/// cache: `VramReport::host_bytes`) must fit. Checked before anything is allocated.
pub(crate) fn check_host_ceiling(
    report: &strata_models::VramReport,
    max_vram: u64,
    max_ram: Option<u64>,
    from_disk: bool,
) -> Result<()> {
    let Some(max_ram) = max_ram else { return Ok(()) };
    let host = report.host_bytes_with(from_disk);
    if host <= max_ram {
        return Ok(());
    }
    let size = strata_models::store::planner::format_size;
    let layers = report.streamed.iter().filter(|&&s| s).count();
    let (what, hint) = match (report.expert_slots > 0, from_disk) {
        (true, false) => (
            format!("its {} routed experts", report.needs.expert_count),
            "or --offload-dir to read the experts from disk",
        ),
        (true, true) => (
            format!("the staging buffers of {} routed experts read from disk", report.needs.expert_count),
            "(the buffers hold one expert each)",
        ),
        (false, false) => {
            (format!("{layers} streamed layers"), "or --offload-dir to read the streamed layers from disk")
        }
        (false, true) => (
            format!("the staging buffers of {layers} layers read from disk"),
            "(the buffers hold the largest streamed layer each)",
        ),
    };
    Err(Error::InvalidInput(format!(
        "--max-ram {}: under --max-vram {} the model keeps {} in page-locked host memory ({what}); give --max-ram \
         at least that, or more --max-vram, {hint}",
        size(max_ram),
        size(max_vram),
        size(host),
    )))
}

/// What [`plan_vram_placement`] found.
#[derive(Clone, Debug)]
pub struct VramPlacementReport {
    /// The ceiling, the planned context and pass size.
    pub budget: strata_models::VramBudget,
    /// The sizes and the layers that stream.
    pub report: strata_models::VramReport,
    /// Decoder layers.
    pub layers: usize,
    /// The host memory ceiling it was checked against (`--max-ram`), if any.
    pub max_ram: Option<u64>,
    /// Where the streamed layers are read from (the layer images' directory under
    /// `--offload-dir`), or `None`: from page-locked host copies.
    pub images: Option<PathBuf>,
    /// With the streamed layers, or the routed experts of a device expert cache, read from
    /// images: how many of them the host tier keeps in what `max_ram` leaves beyond the staging
    /// buffers (`VramReport::host_tier_units`; 0: none).
    pub host_tier: usize,
}

/// What [`pack_model`] did.
#[derive(Clone, Debug)]
pub struct PackReport {
    /// The pack's directory.
    pub dir: PathBuf,
    /// Units in the pack.
    pub units: usize,
    /// Bytes of the data file.
    pub bytes: u64,
    /// Why it was built now (no pack yet, an interrupted build, a changed checkpoint...);
    /// `None` when a valid pack was already there.
    pub built_because: Option<String>,
}

/// Builds the offload pack of the model at `spec` in `offload_dir` (or finds it there), its
/// matrices converted to `pack_dtype` if given, calling `progress(done_bytes, total_bytes, unit)` as it writes.
pub fn pack_model(
    spec: impl AsRef<Path>,
    offload_dir: &Path,
    pack_dtype: Option<DType>,
    mut progress: impl FnMut(u64, u64, &str),
) -> Result<PackReport> {
    let opened = strata_models::open(&spec.as_ref().to_string_lossy())?;
    let layout = opened.layout()?;
    let pack =
        opened.pack(&layout, offload_dir, pack_dtype, &mut |p| progress(p.done_bytes, p.total_bytes, &p.unit))?;
    Ok(PackReport {
        dir: pack.dir().to_path_buf(),
        units: pack.manifest().units.len(),
        bytes: pack.manifest().data_len,
        built_because: match pack.origin() {
            strata_models::store::pack::PackOrigin::Built { reason: InvalidPack::Absent } => Some("first build".into()),
            strata_models::store::pack::PackOrigin::Built { reason } => Some(reason.to_string()),
            strata_models::store::pack::PackOrigin::Opened => None,
        },
    })
}

/// A rayon pool of `threads` threads (`None`: one per core).
pub(crate) fn thread_pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    let mut builder = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("strata-cpu-{i}"));
    if let Some(n) = threads {
        builder = builder.num_threads(n);
    }
    builder.build().map_err(|e| Error::Runtime(format!("cannot start the CPU thread pool: {e}")))
}

/// Measures the sequential read rate of the disk under `dir` now, in GB/s (see
/// [`probe_hardware`]).
pub fn measure_disk_read(dir: &Path) -> Result<f64> {
    probe_disk(dir, [DISK_PROBE_READ]).map(|[rate]| rate)
}

/// [`measure_disk_read`] in reads of `read_bytes` (rounded up to 4 KiB, between 8 MiB and
/// 128 MiB) instead of 8 MiB: the rate a store issuing reads of that size can get (larger
/// reads may run faster). Returns the rate and the read size used.
pub fn measure_disk_read_sized(dir: &Path, read_bytes: usize) -> Result<(f64, usize)> {
    let unit = read_bytes.next_multiple_of(4096).clamp(DISK_PROBE_READ, DISK_PROBE_BYTES / 4);
    let [rate] = probe_disk(dir, [unit])?;
    Ok((rate, unit))
}

/// Where the hardware profile is cached.
pub fn hardware_profile_path() -> PathBuf {
    cache_dir().join("hardware.json")
}

/// The cached hardware profile, if one was measured for `threads` threads by this strata (a
/// profile without the disk's large-read rate is from an older one, and is measured again).
pub fn cached_hardware_profile(threads: usize) -> Result<Option<HardwareProfile>> {
    let path = hardware_profile_path();
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    Ok(usable_profile(&text, threads))
}

/// The profile in `text` if it was measured for `threads` threads by this strata and is valid.
fn usable_profile(text: &str, threads: usize) -> Option<HardwareProfile> {
    serde_json::from_str::<HardwareProfile>(text)
        .ok()
        .filter(|p| p.threads == threads && p.disk_read_large_gb_s.is_some() && p.validate().is_ok())
}

/// The machine's profile for `threads` threads: the cached one, or measured now (a few
/// seconds, said on stderr; the offload directory's disk is the one measured) and cached.
pub fn hardware_profile(offload_dir: &Path, threads: usize) -> Result<HardwareProfile> {
    if let Some(p) = cached_hardware_profile(threads)? {
        return Ok(p);
    }
    eprintln!("measuring this machine once for the placement planner (disk, memory, matvec per dtype)...");
    let p = probe_hardware(offload_dir, threads)?;
    save_hardware_profile(&p)?;
    eprintln!(
        "  disk {:.2} GB/s, memory {:.1} GB/s; saved to {}",
        p.disk_read_gb_s,
        p.memory_gb_s,
        hardware_profile_path().display()
    );
    Ok(p)
}

/// Writes `profile` to the cache.
pub fn save_hardware_profile(profile: &HardwareProfile) -> Result<()> {
    let path = hardware_profile_path();
    let io = |error: std::io::Error| Error::Io { path: path.clone(), error };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let text =
        serde_json::to_string_pretty(profile).map_err(|e| Error::Runtime(format!("encoding the profile: {e}")))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

/// Bytes of the file the disk probe reads.
const DISK_PROBE_BYTES: usize = 512 << 20;
/// Bytes of each matrix the matvec probe multiplies.
const MATVEC_PROBE_BYTES: usize = 64 << 20;

/// Measures the machine: the sequential read rate of the disk under `dir` through the
/// streamer (`O_DIRECT` where it works, so the page cache does not flatter it) in reads of
/// [`SMALL_DISK_READ`] and of [`LARGE_DISK_READ`] bytes, the memory read bandwidth with
/// `threads` threads, and the bytes of weights per second a matvec consumes in each dtype.
pub fn probe_hardware(dir: &Path, threads: usize) -> Result<HardwareProfile> {
    let sizes = [SMALL_DISK_READ as usize, LARGE_DISK_READ as usize];
    let [disk_read_gb_s, large] = probe_disk(dir, sizes)?;
    let pool = thread_pool(Some(threads))?;
    pool.install(|| {
        let memory_gb_s = crate::memory_read_bandwidth() / 1e9;
        let mut matvec_gb_s = std::collections::BTreeMap::new();
        for dtype in
            [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4K, DType::Q6K]
        {
            matvec_gb_s.insert(dtype.name().to_string(), probe_matvec(dtype)?);
        }
        Ok(HardwareProfile {
            disk_read_gb_s,
            disk_read_large_gb_s: Some(large),
            memory_gb_s,
            matvec_gb_s,
            host_to_device_gb_s: None,
            threads,
        })
    })
}

/// The smallest read size of the disk probe.
const DISK_PROBE_READ: usize = SMALL_DISK_READ as usize;

/// Writes a file of [`DISK_PROBE_BYTES`] under `dir`, then reads it back whole once for each
/// size in `units`, in reads of that many bytes (a multiple of 4 KiB; the last one shorter)
/// with four in flight; GB/s of each read-back.
fn probe_disk<const N: usize>(dir: &Path, units: [usize; N]) -> Result<[f64; N]> {
    std::fs::create_dir_all(dir).map_err(|error| Error::Io { path: dir.to_path_buf(), error })?;
    let path = dir.join(format!("disk-probe-{}.tmp", std::process::id()));
    let io = |error: std::io::Error| Error::Io { path: path.clone(), error };
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).map_err(io)?;
        let chunk: Vec<u8> = (0..8 << 20).map(|i: usize| ((i * 2654435761) >> 13) as u8).collect();
        for _ in 0..DISK_PROBE_BYTES / chunk.len() {
            f.write_all(&chunk).map_err(io)?;
        }
        f.sync_all().map_err(io)?;
    }
    let read_back = |unit: usize| -> Result<f64> {
        let config = StreamerConfig { queue_depth: 4, buffer_bytes: unit, buffers: 5, ..StreamerConfig::default() };
        let streamer = Streamer::open(&path, config)?;
        let start = Instant::now();
        let mut tickets = std::collections::VecDeque::new();
        for offset in (0..DISK_PROBE_BYTES).step_by(unit) {
            if tickets.len() == 4 {
                let t: Ticket = tickets.pop_front().expect("four in flight");
                drop(t.wait()?);
            }
            let t = streamer.read(offset as u64, unit.min(DISK_PROBE_BYTES - offset))?;
            tickets.push_back(t);
        }
        for t in tickets {
            drop(t.wait()?);
        }
        Ok(DISK_PROBE_BYTES as f64 / start.elapsed().as_secs_f64() / 1e9)
    };
    let mut rates = [0.0; N];
    let result = units.iter().zip(&mut rates).try_for_each(|(&unit, rate)| read_back(unit).map(|r| *rate = r));
    let _ = std::fs::remove_file(&path);
    result.map(|()| rates)
}

/// The weight bytes per second of a matvec over a [`MATVEC_PROBE_BYTES`] matrix in `dtype`
/// (the fastest of five, after a warm-up: other work on the machine only slows a run down, and
/// the profile is measured once and kept, so one busy moment must not stay in it).
fn probe_matvec(dtype: DType) -> Result<f64> {
    let cols = 4096;
    let row_bytes = dtype.bytes_for(cols).ok_or_else(|| Error::Runtime(format!("{} rows of {cols}", dtype.name())))?;
    let rows = MATVEC_PROBE_BYTES / row_bytes;
    let values: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 5000.0).collect();
    let w = Tensor::from_f32_as(&values, [rows, cols], dtype)?;
    drop(values);
    let x: Vec<f32> = (0..cols).map(|i| (i % 13) as f32 / 13.0).collect();
    let mut y = vec![0f32; rows];
    cpu::matvec(&w, &x, &mut y)?;
    let mut times = Vec::with_capacity(5);
    for _ in 0..5 {
        let start = Instant::now();
        cpu::matvec(&w, &x, &mut y)?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(w.byte_len() as f64 / times[0] / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_profile_this_strata_measured_for_the_thread_count_is_used() {
        let current = r#"{"disk_read_gb_s": 1.5, "disk_read_large_gb_s": 2.5, "memory_gb_s": 20.0,
            "matvec_gb_s": {"q8_0": 10.0}, "host_to_device_gb_s": null, "threads": 2}"#;
        let profile = usable_profile(current, 2).unwrap();
        assert_eq!(profile.disk_read_large_gb_s, Some(2.5));
        assert!(usable_profile(current, 4).is_none(), "measured for 2 threads");
        // An older strata's profile (no large-read rate) is measured again.
        let old = current.replace(r#""disk_read_large_gb_s": 2.5,"#, "");
        assert!(usable_profile(&old, 2).is_none());
        assert!(usable_profile(&current.replace("1.5", "0.0"), 2).is_none(), "invalid");
        assert!(usable_profile("{", 2).is_none(), "unreadable");
    }

    #[test]
    fn the_disk_probe_reads_in_the_size_asked_for_within_its_limits() {
        let dir = tempfile::tempdir().unwrap();
        // The last read of an odd size is shorter. (A size above 128 MiB is read as 128 MiB.)
        for (asked, used) in [(0, 8 << 20), (99_000_000, 99_000_000usize.next_multiple_of(4096))] {
            let (rate, read) = measure_disk_read_sized(dir.path(), asked).unwrap();
            assert_eq!(read, used, "asked {asked}");
            assert!(rate > 0.0 && rate.is_finite(), "{rate}");
        }
        // The probe file is gone.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
