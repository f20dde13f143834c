//! [`Model`]: a loaded model with its tokenizer, a thread pool, and the generation loop.
//!
//! A model runs on the CPU or, in builds with the `cuda` feature, on a CUDA device
//! ([`LoadOptions::device`]); both sit behind the same API, dispatched over a closed enum. The
//! KV cache of a sequence ([`Cache`]) lives on the model's device. Sampling runs on the host
//! over the logits the forward pass returns.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use strata_models::store::planner::Plan;
use strata_models::tensor::Device;
use strata_models::tensor::profile::KernelProfile;
use strata_models::{Decoder, KvCache, Logits, MoeHparams, RouterTrace, TokenizerSource};

use crate::chat::{ChatMessage, ChatTemplate};
use crate::moe::RouterStats;
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{TextStream, Tokenizer};
use crate::{Error, Result};

/// The KV cache length a `--max-vram` placement plans for when no `max_context` is given (at
/// most the model's trained context).
pub const VRAM_CONTEXT: usize = 4096;

/// Tokens per forward pass under `--max-vram`: prompts run in chunks of it, so the pass's
/// scratch is bounded (`strata_models::VramBudget::pass_tokens`).
pub const VRAM_PASS_TOKENS: usize = 512;

/// Bytes of each copy of [`Model::upload_bandwidth`].
#[cfg(feature = "cuda")]
const UPLOAD_PROBE_BYTES: usize = 256 << 20;

/// The GPU ceiling `max_vram` as the CUDA decoder places `decoder` under it: the KV cache for
/// the decoder's `max_context`, else [`VRAM_CONTEXT`] tokens at most, passes of
/// [`VRAM_PASS_TOKENS`].
pub(crate) fn vram_budget(
    decoder: &strata_models::Decoder,
    max_vram: Option<u64>,
) -> Option<strata_models::VramBudget> {
    max_vram.map(|max_bytes| {
        let trained = decoder.rope_scheme().trained_context();
        let context_tokens = decoder.max_context().unwrap_or(VRAM_CONTEXT.min(trained));
        strata_models::VramBudget { max_bytes, context_tokens, pass_tokens: VRAM_PASS_TOKENS }
    })
}

/// How to load a model.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Worker threads for the CPU backend (`None`: one per core).
    pub threads: Option<usize>,
    /// Where the model runs: the CPU (the default) or a CUDA device. CUDA needs a build with the
    /// `cuda` feature; without it, loading fails with [`Error::CudaNotCompiled`].
    pub device: Device,
    /// RoPE context scaling that overrides the checkpoint's own (`None`: the checkpoint's).
    pub context_scaling: Option<crate::ContextScalingConfig>,
    /// The longest request, prompt plus generated tokens, with the checkpoint's own RoPE: a
    /// longer one is refused before any work (`ContextTooLong`). Under a memory ceiling
    /// the plan reserves the KV cache for this length. `None`: no cap beyond the context
    /// scaling's `max_capacity` (and a plan reserves that, or the model's trained context).
    pub max_context: Option<usize>,
    /// Where the weights live (memory ceilings, streaming from the offload pack). The default
    /// keeps every weight in the memory-mapped checkpoint.
    pub offload: crate::OffloadConfig,
    /// Mixture-of-Experts routing (`None`: the model's own). A dense model refuses any config but
    /// the default ([`Error::NotMixtureOfExperts`]).
    pub moe: Option<crate::MoeConfig>,
}

/// Whether this build of strata can run models on `device`: always for the CPU; for a CUDA
/// device only in builds with the `cuda` feature ([`Error::CudaNotCompiled`] otherwise). Opens
/// nothing: a missing GPU shows when the model is loaded.
pub fn check_device(device: Device) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(_) if cfg!(feature = "cuda") => Ok(()),
        Device::Cuda(_) => Err(Error::CudaNotCompiled { device }),
    }
}

/// How a sequence of ids is run to produce logits at every position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsMode {
    /// One forward pass over all ids (prefill).
    OnePass,
    /// One id at a time through the KV cache (decode).
    Decode,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// How to pick each token.
    pub sampling: SamplingParams,
    /// Stop at an end-of-sequence token (the model's, from its config or GGUF metadata).
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> GenerateOptions {
        GenerateOptions { max_new_tokens: 128, sampling: SamplingParams::default(), stop_at_eos: true }
    }
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence token was produced (it is not part of the output).
    Eos,
    /// `max_new_tokens` were produced.
    MaxTokens,
    /// The callback asked to stop.
    Callback,
}

/// The outcome of [`Model::generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// The new token ids (without the prompt, without a final EOS).
    pub tokens: Vec<u32>,
    /// Why it stopped.
    pub stop: StopReason,
    /// Time spent on the prompt (prefill).
    pub prefill_time: Duration,
    /// Time spent producing tokens after the first.
    pub decode_time: Duration,
}

/// Where a model computes.
enum Backend {
    /// [`Decoder::forward`] on the CPU thread pool.
    Cpu,
    /// The same decoder on a CUDA device, weights uploaded once.
    #[cfg(feature = "cuda")]
    Cuda(Box<strata_models::CudaDecoder>),
}

/// The KV cache of one sequence, on the device of the model that made it ([`Model::new_cache`]).
#[derive(Debug)]
pub struct Cache {
    inner: CacheInner,
    device: Device,
}

#[derive(Debug)]
enum CacheInner {
    Cpu(KvCache),
    #[cfg(feature = "cuda")]
    Cuda(strata_models::CudaKvCache),
}

impl Cache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        match &self.inner {
            CacheInner::Cpu(c) => c.len(),
            #[cfg(feature = "cuda")]
            CacheInner::Cuda(c) => c.len(),
        }
    }

    /// Whether the cache holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes allocated for keys and values (host or device memory, wherever the cache lives).
    pub fn allocated_bytes(&self) -> usize {
        match &self.inner {
            CacheInner::Cpu(c) => c.allocated_bytes(),
            #[cfg(feature = "cuda")]
            CacheInner::Cuda(c) => c.allocated_bytes(),
        }
    }

    /// Drops every token.
    pub fn clear(&mut self) {
        match &mut self.inner {
            CacheInner::Cpu(c) => c.clear(),
            #[cfg(feature = "cuda")]
            CacheInner::Cuda(c) => c.clear(),
        }
    }

    /// The device the cache lives on.
    pub fn device(&self) -> Device {
        self.device
    }
}

/// A loaded model ready to run.
pub struct Model {
    /// The weights on the host: the CPU backend computes with them; with CUDA they give the
    /// hyperparameters and weight sizes (the weights are usually views of the memory-mapped
    /// checkpoint, so keeping them costs page cache, not a copy).
    decoder: Decoder,
    backend: Backend,
    device: Device,
    tokenizer: Option<Tokenizer>,
    chat_template: Option<String>,
    pool: rayon::ThreadPool,
    source: PathBuf,
    /// The placement the model loaded with, when an [`crate::OffloadConfig`] asked for one.
    plan: Option<Plan>,
    /// Forward passes are cut into chunks of at most this many tokens (with a plan: the
    /// activations it counted).
    chunk: Option<usize>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("source", &self.source)
            .field("device", &self.device)
            .field("hparams", self.decoder.hparams())
            .finish()
    }
}

impl Model {
    /// Loads a model from a checkpoint directory (config.json + safetensors, tokenizer.json if
    /// present), a GGUF file, or a model id found in the local Hugging Face cache, onto
    /// `options.device`. A CUDA device is checked before anything is read: without the `cuda`
    /// feature it is [`Error::CudaNotCompiled`].
    pub fn from_pretrained(spec: impl AsRef<Path>, options: LoadOptions) -> Result<Model> {
        let spec = spec.as_ref();
        check_device(options.device)?;
        let opened = strata_models::open(&spec.to_string_lossy())?;
        // MoE settings are checked against the model before any weight is read.
        let moe = match &options.moe {
            Some(config) => Some(config.options_for(opened.path(), opened.hparams.moe.as_ref())?),
            None => None,
        };
        let pool = crate::offload::thread_pool(options.threads)?;
        let scaling = match &options.context_scaling {
            Some(config) => Some(config.resolve(opened.hparams.rope.trained_context())?),
            None => None,
        };
        if options.max_context == Some(0) {
            return Err(Error::InvalidInput("max_context must be at least 1 token".into()));
        }
        // An unknown expert cache policy is refused whatever else is set.
        options.offload.expert_policy()?;
        // A GPU ceiling alone is the CUDA decoder's to place under (layers streamed from host
        // memory); the CPU's placement flags plan the CPU's tiers.
        if options.offload.max_vram.is_some() && options.device == Device::Cpu {
            return Err(Error::InvalidInput(
                "--max-vram is a ceiling on GPU memory: it needs --device cuda (--max-ram bounds host memory)".into(),
            ));
        }
        // On CUDA, --max-vram places the weights and --max-ram bounds the host memory that takes;
        // the other placement flags place the CPU's tiers.
        if options.device != Device::Cpu && options.offload.offload_dir.is_some() && options.offload.max_vram.is_none()
        {
            return Err(Error::InvalidInput(format!(
                "--offload-dir with {}: it is where the layers --max-vram streams are read from; give --max-vram \
                 (without it every weight is on the GPU)",
                options.device
            )));
        }
        if options.device != Device::Cpu && options.offload.sets_cpu_placement() {
            return Err(Error::Unsupported(format!(
                "--strategy, --prefetch-layers, --pack-dtype and --expert-cache place the CPU's tiers (RAM and \
                 disk): with {}, --max-vram places the weights, --max-ram bounds the host memory they take and \
                 --offload-dir is where the layers --max-vram streams are read from",
                options.device
            )));
        }
        let (loaded, plan) = if options.device == Device::Cpu && options.offload.places_cpu_tiers() {
            let dir = options.offload.offload_dir();
            let (layout, plan, context) =
                crate::offload::plan_opened(&opened, &options.offload, scaling.clone(), options.max_context, &pool)?;
            let name = opened.path().display().to_string();
            let mut shown = 0u64;
            let mut pack_progress = |p: &strata_models::store::pack::Progress| {
                // One line per tenth of the pack on stderr.
                let step = p.total_bytes.div_ceil(10).max(1);
                if p.done_bytes >= shown + step || (p.done_bytes == p.total_bytes && shown < p.total_bytes) {
                    shown = p.done_bytes;
                    eprintln!(
                        "packing {name} into {}: {:.0}% ({})",
                        dir.display(),
                        100.0 * p.done_bytes as f64 / p.total_bytes.max(1) as f64,
                        p.unit
                    );
                }
            };
            let convert = options.offload.pack_dtype;
            let policy = options.offload.expert_policy()?;
            let loaded = opened.load_placed(&plan, &layout, &dir, convert, policy, &mut pack_progress, |_, _| {})?;
            (loaded, Some((plan, context)))
        } else {
            (opened.load()?, None)
        };
        // Forward passes of a planned model stay within the activations the plan counted.
        #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
        let mut chunk = plan.as_ref().map(|&(_, context)| crate::offload::batch_tokens(context));
        let plan = plan.map(|(plan, _)| plan);
        let tokenizer = match loaded.tokenizer {
            Some(TokenizerSource::Json(p)) => Some(Tokenizer::from_file(&p)?),
            Some(TokenizerSource::Built(t)) => Some(Tokenizer::from_inner(*t)),
            None => None,
        };
        let mut decoder = loaded.decoder;
        if options.device == Device::Cpu && decoder.store().is_none() {
            // Weights of the memory-mapped checkpoint that the CPU kernels read faster
            // rearranged (q4_0, q4_k) are repacked once: the same bytes, the same logits.
            decoder.repack_for_cpu()?;
        }
        if scaling.is_some() {
            decoder.set_context_scaling(scaling)?;
        }
        decoder.set_max_context(options.max_context);
        decoder.set_expert_prefetch(options.offload.expert_prefetch);
        if let Some(moe) = moe {
            decoder.set_moe_options(moe)?;
        }
        let backend = match options.device {
            Device::Cpu => Backend::Cpu,
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => {
                let budget = vram_budget(&decoder, options.offload.max_vram);
                let from_disk = options.offload.offload_dir.is_some();
                let (mut images, mut host_tier) = (None, 0);
                if let Some(b) = &budget {
                    chunk = Some(b.pass_tokens);
                    let report = strata_models::vram_report(&decoder, b)?;
                    // The host memory the placement keeps, against --max-ram, before any allocation.
                    crate::offload::check_host_ceiling(&report, b.max_bytes, options.offload.max_ram, from_disk)?;
                    if let Some(dir) = options
                        .offload
                        .offload_dir
                        .as_deref()
                        .filter(|_| report.streamed.contains(&true) || report.expert_slots > 0)
                    {
                        let (dir, removed) = strata_models::layer_images::prepare_images_dir(dir, &loaded.path)?;
                        for old in removed {
                            eprintln!(
                                "strata: removed the layer images of an older version of the checkpoint: {}",
                                old.display()
                            );
                        }
                        images = Some(dir);
                        // Layers or experts kept in what --max-ram leaves beyond the staging buffers.
                        host_tier = report.host_tier_units(options.offload.max_ram);
                    }
                }
                let mut cuda = strata_models::CudaDecoder::open_within(&decoder, ordinal, budget, images.as_deref())?;
                if options.offload.expert_cache_policy.is_some() {
                    // The device expert cache's (and its host tier's).
                    cuda.set_expert_cache_policy(options.offload.expert_policy()?)?;
                }
                if host_tier > 0 {
                    let read = cuda.layer_images().map_or(0, |(_, read)| read as u64);
                    let what = if cuda.streamed_layers() > 0 { "streamed layers" } else { "experts read last" };
                    let kept = cuda.set_host_tier(host_tier as u64 * read)?;
                    eprintln!(
                        "strata: {kept} {what} from disk stay in host memory ({} page-locked, under --max-ram)",
                        strata_models::store::planner::format_size(kept as u64 * read)
                    );
                }
                Backend::Cuda(Box::new(cuda))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(Error::CudaNotCompiled { device: options.device }),
        };
        Ok(Model {
            decoder,
            backend,
            device: options.device,
            tokenizer,
            chat_template: loaded.chat_template,
            pool,
            source: loaded.path,
            plan,
            chunk,
        })
    }

    /// The placement plan the model loaded with (`None` without an [`crate::OffloadConfig`]).
    pub fn placement(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }

    /// The offload store's counters and I/O path, for a model with streamed weights.
    pub fn store(&self) -> Option<&std::sync::Arc<strata_models::store::Store>> {
        self.decoder.store()
    }

    /// The device the model runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The device's name as its driver gives it ("NVIDIA H100 80GB HBM3"), for a model on a
    /// CUDA device; `None` on the CPU.
    pub fn device_name(&self) -> Result<Option<String>> {
        match &self.backend {
            Backend::Cpu => Ok(None),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => Ok(Some(d.device_name()?)),
        }
    }

    /// The decoder (hyperparameters, weight sizes). Its weights are the host copy: on CUDA the
    /// forward pass runs on the device's.
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// The tokenizer, if the checkpoint has one.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// The model's Jinja chat template, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Where the model was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The number of worker threads.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Runs `f` inside this model's thread pool.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// A fresh KV cache on the model's device (empty: it allocates as the sequence grows).
    pub fn new_cache(&self) -> Result<Cache> {
        let inner = match &self.backend {
            Backend::Cpu => CacheInner::Cpu(self.decoder.new_cache()),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => CacheInner::Cuda(d.new_cache()?),
        };
        Ok(Cache { inner, device: self.device })
    }

    /// Fixes the RoPE table of the request in `cache` for a sequence of `total_len` tokens, after
    /// checking that it fits the context scaling's `max_capacity` (before any work). With a
    /// length-driven scaling, a planned request decodes token by token with the same angles as a
    /// one-pass forward of the whole sequence, and never recomputes its cache.
    pub fn plan(&self, cache: &mut Cache, total_len: usize) -> Result<()> {
        match (&self.backend, &mut cache.inner) {
            (Backend::Cpu, CacheInner::Cpu(c)) => Ok(self.decoder.plan(c, total_len)?),
            #[cfg(feature = "cuda")]
            (Backend::Cuda(d), CacheInner::Cuda(c)) => Ok(d.plan(c, total_len)?),
            #[cfg(feature = "cuda")]
            (_, _) => Err(Error::InvalidInput(format!(
                "a KV cache on {} cannot be planned by a model on {}",
                cache.device, self.device
            ))),
        }
    }

    /// Logits at every position of `ids`, `[ids.len(), vocab]` row-major. Both modes plan the
    /// request for `ids.len()` tokens, so they compute the same function.
    pub fn logits(&self, ids: &[u32], mode: LogitsMode) -> Result<Vec<f32>> {
        self.logits_traced(ids, mode, None)
    }

    /// [`Model::logits`] of a Mixture-of-Experts model, with what its routers did over every
    /// token ([`RouterStats`]: the auxiliary load-balancing loss a fine-tuning loop adds, the
    /// z-loss, tokens per expert and layer, mean experts per token). Both modes see the same
    /// tokens, so they give the same statistics (up to rounding, and to capacity limits, which
    /// apply per forward pass). A dense model is [`Error::NotMixtureOfExperts`].
    pub fn logits_with_router(&self, ids: &[u32], mode: LogitsMode) -> Result<(Vec<f32>, RouterStats)> {
        self.moe_shape("router statistics")?;
        let mut trace = RouterTrace::new();
        let logits = self.logits_traced(ids, mode, Some(&mut trace))?;
        Ok((logits, self.router_stats(&trace)?))
    }

    /// [`Model::step`], appending what every MoE layer's router saw and chose to `trace`
    /// (a dense model leaves it empty): a generation or training loop can record many steps and
    /// condense them with [`Model::router_stats`].
    pub fn step_with_router(&self, ids: &[u32], cache: &mut Cache, trace: &mut RouterTrace) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        self.forward_traced(ids, cache, Logits::Last, Some(trace))
    }

    /// The statistics of a trace recorded on this model ([`Model::step_with_router`]), with the
    /// auxiliary loss over the `k` the model routes with (its own, or
    /// [`crate::MoeConfig::active_experts`]). A dense model is [`Error::NotMixtureOfExperts`].
    pub fn router_stats(&self, trace: &RouterTrace) -> Result<RouterStats> {
        let moe = self.moe_shape("router statistics")?;
        let k = self.decoder.moe_options().active_experts.unwrap_or(moe.top_k);
        RouterStats::from_trace(trace, moe.num_experts, k)
    }

    /// The model's MoE shape, or [`Error::NotMixtureOfExperts`] saying that `what` needs one.
    fn moe_shape(&self, what: &str) -> Result<&MoeHparams> {
        self.decoder
            .hparams()
            .moe
            .as_ref()
            .ok_or_else(|| Error::NotMixtureOfExperts { model: self.source.clone(), what: what.into() })
    }

    /// [`Model::logits`], recording the routing in `trace` when given.
    fn logits_traced(&self, ids: &[u32], mode: LogitsMode, mut trace: Option<&mut RouterTrace>) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        let mut cache = self.new_cache()?;
        self.plan(&mut cache, ids.len())?;
        match mode {
            LogitsMode::OnePass => self.forward_traced(ids, &mut cache, Logits::All, trace),
            LogitsMode::Decode => {
                let mut out = Vec::with_capacity(ids.len() * self.decoder.hparams().vocab_size);
                for &id in ids {
                    out.extend(self.forward_traced(&[id], &mut cache, Logits::Last, trace.as_deref_mut())?);
                }
                Ok(out)
            }
        }
    }

    /// One forward step: feeds `ids` through the cache and returns the last position's logits.
    pub fn step(&self, ids: &[u32], cache: &mut Cache) -> Result<Vec<f32>> {
        self.forward_cached(ids, cache, Logits::Last)
    }

    /// Device memory in use now, in bytes, for a model on a CUDA device: total minus free as the
    /// driver reports them (this process's weights, caches and buffers, its CUDA context, and
    /// any other process's allocations). `None` on the CPU.
    pub fn device_memory_used(&self) -> Result<Option<usize>> {
        match &self.backend {
            Backend::Cpu => Ok(None),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => Ok(Some(d.device_memory_used()?)),
        }
    }

    /// On CUDA under `--max-vram`: the layers whose weights stream from host memory pass by pass,
    /// and the bytes they copy per pass. `None` when none stream (and on the CPU).
    pub fn gpu_streamed(&self) -> Option<(usize, usize)> {
        match &self.backend {
            Backend::Cpu => None,
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => (d.streamed_layers() > 0).then(|| (d.streamed_layers(), d.streamed_bytes_per_pass())),
        }
    }

    /// On CUDA under `--max-vram` with `--offload-dir`, for streamed layers: those read from disk
    /// every pass (the ones not kept in the host tier `--max-ram` leaves room for) and the bytes
    /// a pass reads. `None` otherwise.
    pub fn gpu_streamed_reads(&self) -> Option<(usize, usize)> {
        match &self.backend {
            Backend::Cpu => None,
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => d.streamed_read_per_pass(),
        }
    }

    /// On CUDA under `--max-vram` with `--offload-dir`: the images the streamed layers (or the
    /// routed experts of a device expert cache) are read from (the data file) and the largest
    /// read of it. `None` otherwise.
    pub fn gpu_layer_images(&self) -> Option<(PathBuf, usize)> {
        match &self.backend {
            Backend::Cpu => None,
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => d.layer_images().map(|(p, r)| (p.to_path_buf(), r)),
        }
    }

    /// On CUDA under `--max-vram`, for a Mixture-of-Experts model whose routed experts stay off
    /// the device: what the device expert cache did so far (its slots, hits, misses and bytes
    /// copied; with the experts read from disk, its host tier and the reads; the hit rate the
    /// placement expected). `None` otherwise (and on the CPU).
    pub fn gpu_expert_cache(&self) -> Option<crate::ExpertCacheCounts> {
        match &self.backend {
            Backend::Cpu => None,
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => d.expert_cache(),
        }
    }

    /// The host's time spent queuing the GPU's decode steps (one-token passes) so far, and their
    /// count (`strata_models::cuda_decoder::CudaDecoder::decode_host_time`): against a step's wall
    /// time, whether the device waits for the host. `None` on the CPU.
    pub fn gpu_decode_host_time(&self) -> Option<(std::time::Duration, u64)> {
        match &self.backend {
            Backend::Cpu => None,
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => Some(d.decode_host_time()),
        }
    }

    /// The host-to-device copy rate from page-locked memory in bytes per second, measured now
    /// (256 MiB copies, the median of 5): what layers streamed into GPU memory are bounded by.
    /// `None` on the CPU.
    pub fn upload_bandwidth(&self) -> Result<Option<f64>> {
        match &self.backend {
            Backend::Cpu => Ok(None),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => {
                Ok(Some(strata_models::cuda_decoder::upload_bandwidth(d.cuda(), UPLOAD_PROBE_BYTES, 5)?))
            }
        }
    }

    /// Runs `work` with every kernel the model's GPU launches timed one by one, and returns what
    /// it returned with each kernel's launches and GPU time (most time first). `None` on the
    /// CPU, where `work` runs as usual. Decode steps then launch their kernels one by one, not as
    /// a CUDA graph, and each launch costs two timing events more on the host: compare the
    /// kernels' time with a pass timed without a profile. cuBLAS GEMMs and copies are not counted.
    pub fn profile_kernels<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<(T, Option<KernelProfile>)> {
        match &self.backend {
            Backend::Cpu => Ok((work()?, None)),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => {
                let cuda = d.cuda();
                cuda.start_profile();
                let out = work();
                // Stopped whatever `work` returned.
                let profile = cuda.finish_profile().map_err(strata_models::Error::from);
                Ok((out?, profile?))
            }
        }
    }

    /// The memory bandwidth a decode on this model's device is bounded by, in bytes per second,
    /// measured now. CPU: reading a large buffer with every thread of the model's pool
    /// ([`crate::memory_read_bandwidth`]). CUDA: device-to-device copies, counting bytes read
    /// plus bytes written (`strata_models::cuda_decoder::copy_bandwidth`).
    pub fn memory_bandwidth(&self) -> Result<f64> {
        match &self.backend {
            Backend::Cpu => Ok(self.install(crate::memory_read_bandwidth)),
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => Ok(d.memory_bandwidth()?),
        }
    }

    /// Runs `ids` through the backend with `cache`, which must live on the model's device.
    pub(crate) fn forward_cached(&self, ids: &[u32], cache: &mut Cache, which: Logits) -> Result<Vec<f32>> {
        self.check_ids(ids)?;
        self.forward(ids, cache, which)
    }

    /// Runs `ids` through the backend with `cache`, which must live on the model's device.
    fn forward(&self, ids: &[u32], cache: &mut Cache, which: Logits) -> Result<Vec<f32>> {
        self.forward_traced(ids, cache, which, None)
    }

    /// [`Model::forward`], recording every MoE layer's routing in `trace` when given (over every
    /// chunk of a chunked pass).
    fn forward_traced(
        &self,
        ids: &[u32],
        cache: &mut Cache,
        which: Logits,
        mut trace: Option<&mut RouterTrace>,
    ) -> Result<Vec<f32>> {
        let mismatch = |cache_device: Device| {
            Error::InvalidInput(format!(
                "a KV cache on {cache_device} cannot be used by a model on {}: make it with this model's new_cache",
                self.device
            ))
        };
        if cache.device != self.device {
            return Err(mismatch(cache.device));
        }
        let cpu_forward = |piece: &[u32], c: &mut KvCache, trace: Option<&mut RouterTrace>| match trace {
            Some(trace) => self.decoder.forward_with_router(piece, c, which, trace),
            None => self.decoder.forward(piece, c, which),
        };
        match (&self.backend, &mut cache.inner) {
            (Backend::Cpu, CacheInner::Cpu(c)) => match self.chunk {
                Some(chunk) if ids.len() > chunk => self.install(|| {
                    // Chunk by chunk through the cache: the activations the plan counted.
                    let mut out = Vec::new();
                    let pieces = ids.len().div_ceil(chunk);
                    for (i, piece) in ids.chunks(chunk).enumerate() {
                        let logits = cpu_forward(piece, c, trace.as_deref_mut())?;
                        if which == Logits::All || i + 1 == pieces {
                            out.extend(logits);
                        }
                    }
                    Ok(out)
                }),
                _ => self.install(|| Ok(cpu_forward(ids, c, trace)?)),
            },
            #[cfg(feature = "cuda")]
            (Backend::Cuda(d), CacheInner::Cuda(c)) => match self.chunk {
                // Under a GPU ceiling: chunk by chunk, within the scratch it placed for.
                Some(chunk) if ids.len() > chunk => {
                    let mut out = Vec::new();
                    let pieces = ids.len().div_ceil(chunk);
                    for (i, piece) in ids.chunks(chunk).enumerate() {
                        let logits = d.forward_traced(piece, c, which, trace.as_deref_mut())?;
                        if which == Logits::All || i + 1 == pieces {
                            out.extend(logits);
                        }
                    }
                    Ok(out)
                }
                _ => Ok(d.forward_traced(ids, c, which, trace)?),
            },
            #[cfg(feature = "cuda")]
            (_, _) => Err(mismatch(cache.device)),
        }
    }

    /// Generates from prompt ids, calling `on_token` with each new id as soon as it exists;
    /// returning `ControlFlow::Break` stops early.
    pub fn generate(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(Error::InvalidInput("the prompt is empty: give at least one token".into()));
        }
        options.sampling.check()?;
        let eos = &self.decoder.hparams().eos_token_ids;
        let mut sampler = Sampler::new(options.sampling.clone());
        let mut cache = self.new_cache()?;
        // The whole request is checked against the context limit, and its RoPE table fixed,
        // before the prompt runs.
        self.plan(&mut cache, prompt.len().saturating_add(options.max_new_tokens))?;
        let mut history = prompt.to_vec();
        let mut tokens = Vec::new();
        let start = Instant::now();
        let mut logits = self.step(prompt, &mut cache)?;
        let prefill_time = start.elapsed();
        let decode_start = Instant::now();
        let mut stop = StopReason::MaxTokens;
        for i in 0..options.max_new_tokens {
            let id = sampler.sample(&mut logits, &history);
            if options.stop_at_eos && eos.contains(&id) {
                stop = StopReason::Eos;
                break;
            }
            tokens.push(id);
            history.push(id);
            if on_token(id).is_break() {
                stop = StopReason::Callback;
                break;
            }
            if i + 1 < options.max_new_tokens {
                logits = self.step(&[id], &mut cache)?;
            }
        }
        Ok(Generation { tokens, stop, prefill_time, decode_time: decode_start.elapsed() })
    }

    /// Generates from a text prompt, calling `on_text` with each new piece of text as soon as it
    /// is complete (a multi-byte character split across tokens is held back until whole).
    pub fn generate_text(
        &self,
        prompt: &str,
        options: &GenerateOptions,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| Error::NoTokenizer { model: self.source.clone() })?;
        let ids = tok.encode(prompt, true)?;
        self.generate_ids_text(&ids, options, on_text)
    }

    /// The token ids of a conversation rendered with the model's chat template, ending with the
    /// opening of the assistant's turn (special tokens come from the template, so none are added).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| Error::NoTokenizer { model: self.source.clone() })?;
        let source =
            self.chat_template.as_deref().ok_or_else(|| Error::NoChatTemplate { model: self.source.clone() })?;
        let hp = self.decoder.hparams();
        let name = |id: Option<u32>| id.and_then(|id| tok.inner().id_to_token(id)).unwrap_or_default();
        let template = ChatTemplate::new(source, &name(hp.bos_token_id), &name(hp.eos_token_ids.first().copied()))?;
        let text = template.render(messages, true)?;
        tok.encode(&text, false)
    }

    /// Generates from token ids, calling `on_text` with each new piece of text as soon as it is
    /// complete (a multi-byte character split across tokens is held back until whole).
    pub fn generate_ids_text(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| Error::NoTokenizer { model: self.source.clone() })?;
        let mut stream = TextStream::new(tok);
        let mut failure = None;
        let generation = self.generate(prompt, options, |id| match stream.push(id) {
            Ok(text) => {
                if !text.is_empty() {
                    on_text(&text);
                }
                ControlFlow::Continue(())
            }
            Err(e) => {
                failure = Some(e);
                ControlFlow::Break(())
            }
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        let rest = stream.finish()?;
        if !rest.is_empty() {
            on_text(&rest);
        }
        Ok(generation)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.decoder.hparams().vocab_size;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::InvalidInput(format!("token id {bad} is outside the vocabulary of {vocab} tokens")));
        }
        if ids.is_empty() {
            return Err(Error::InvalidInput("no token ids given".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_is_always_available() {
        assert!(check_device(Device::Cpu).is_ok());
    }

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn without_the_cuda_feature_a_cuda_device_is_a_typed_error() {
        let err = check_device(Device::Cuda(0)).unwrap_err();
        assert!(matches!(err, Error::CudaNotCompiled { device: Device::Cuda(0) }), "{err}");
        // Refused before the model is looked for: this path does not exist.
        let options = LoadOptions { device: Device::Cuda(1), ..LoadOptions::default() };
        let err = Model::from_pretrained("/nonexistent/strata-model", options).unwrap_err();
        assert!(matches!(err, Error::CudaNotCompiled { device: Device::Cuda(1) }), "{err}");
        assert!(err.to_string().contains("built without CUDA"), "{err}");
        assert!(err.to_string().starts_with("cuda:1 was requested"), "{err}");
    }
}
