//! strata: run large language models on your own hardware, correct to the reference logits.
//!
//! The facade over the workspace: [`Model::from_pretrained`] loads a checkpoint (a directory
//! with config.json and safetensors, or a model id in the local Hugging Face cache),
//! [`Model::logits`] runs ids through it, and [`Model::generate`] / [`Model::generate_text`]
//! sample new tokens with [`SamplingParams`], streaming them as they arrive. A model runs on the
//! CPU or, built with the `cuda` feature, on a CUDA device ([`LoadOptions::device`]). A
//! Mixture-of-Experts model routes as [`MoeConfig`] says, and reports what its routers did
//! ([`Model::logits_with_router`]).
//!
//! Depends on `strata-models` (and through it the tensor core), never on the store or the
//! kernels directly.
#![warn(missing_docs)]

mod chat;
mod default_model;
mod error;
mod model;
mod moe;
mod offload;
mod perplexity;
pub mod sampling;
mod scaling;
mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use default_model::{DEFAULT_MODEL_FILE, DEFAULT_MODEL_PACKAGE, cache_dir, default_model};
pub use error::{Error, Result};
pub use model::{
    Cache, GenerateOptions, Generation, LoadOptions, LogitsMode, Model, StopReason, VRAM_CONTEXT, VRAM_PASS_TOKENS,
    check_device,
};
pub use moe::{LayerStats, MoeConfig, RouterStats};
pub use offload::{
    DEFAULT_PREFILL_CHUNK, OffloadConfig, PackReport, PlacementReport, VramPlacementReport, cached_hardware_profile,
    hardware_profile, hardware_profile_path, measure_disk_read, measure_disk_read_sized, pack_model, plan_placement,
    plan_vram_placement, probe_hardware, process_ram, save_hardware_profile,
};
pub use perplexity::{DEFAULT_PERPLEXITY_CHUNK, Perplexity};
pub use sampling::{Sampler, SamplingParams};
pub use scaling::{ContextScalingConfig, DEFAULT_DYNAMIC_EXPANSION};
/// What a device expert cache did on CUDA ([`Model::gpu_expert_cache`]).
pub use strata_models::ExpertCacheCounts;
pub use strata_models::KvCache;
pub use strata_models::ScalingAlgorithm;
/// Writing an output file whole (through a temporary file renamed into place), never replacing a
/// special file such as `/dev/null` or a named pipe.
pub use strata_models::output::write_replacing;
/// The placement planner's types (plans, budgets, sizes, the hardware profile).
pub use strata_models::store::planner;
/// The weight store's counters.
pub use strata_models::store::{Store, StoreStats};
/// How the CPU quantizes activations for products with block-quantized weights: two 8-bit digits
/// per value (the default, logits closest to the float model) or one (as llama.cpp: faster
/// prefill). A process-wide choice, made with [`set_act_quant`] before a model runs.
pub use strata_models::tensor::cpu::{ActQuant, act_quant, set_act_quant};
/// The GPU time of each kernel over a stretch of work ([`Model::profile_kernels`]).
pub use strata_models::tensor::profile::{KernelProfile, KernelTime};
/// Where a model runs ([`LoadOptions::device`]).
pub use strata_models::tensor::{DType, Device};
/// A Mixture-of-Experts model's routing rule ([`MoeConfig::routing`]) and the routers' record
/// over a run ([`Model::step_with_router`]).
pub use strata_models::{RouterTrace, Routing};
pub use tokenizer::{TextStream, Tokenizer};

/// This machine's memory read bandwidth in bytes per second, measured with every thread of the
/// current rayon pool (run it inside [`Model::install`] to use the model's threads): the bound
/// a CPU decode is compared with.
pub fn memory_read_bandwidth() -> f64 {
    strata_models::tensor::cpu::read_bandwidth(strata_models::tensor::cpu::DEFAULT_BANDWIDTH_BYTES, 15)
}
