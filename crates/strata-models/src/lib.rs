//! strata-models: everything that turns a model on disk into computation. It reads Hugging Face
//! checkpoints (safetensors, single or sharded) and `config.json`, resolves model specs (paths
//! or model ids in the local Hugging Face cache), computes RoPE tables for every scaling type
//! (with per-request context scaling), holds the paged KV cache and the decoder, and the MoE
//! router and expert layer ([`moe`]) of the Mixtral and Qwen MoE families.
//!
//! With the `cuda` feature, `CudaDecoder` runs the same decoder on a CUDA device through
//! `strata-kernels`.
//!
//! It sits above the tensor core and the weight store: it may depend on `strata-tensor`,
//! `strata-store` and, optionally, `strata-kernels`, and nothing below it depends on it.
#![warn(missing_docs)]

pub mod config;
pub mod context;
#[cfg(feature = "cuda")]
pub mod cuda_decoder;
#[cfg(feature = "cuda")]
mod cuda_experts;
#[cfg(feature = "cuda")]
mod cuda_moe;
#[cfg(feature = "cuda")]
mod cuda_stream;
mod decoder;
mod error;
pub mod gguf;
pub mod gguf_model;
pub mod gguf_tokenizer;
mod hparams;
mod kv_cache;
pub mod layer_images;
mod load;
pub mod moe;
pub mod offload;
pub mod output;
pub mod resolve;
pub mod rope;
pub mod safetensors;
mod vram;

pub use config::ModelConfig;
pub use context::{ContextScaling, ScalingAlgorithm};
#[cfg(feature = "cuda")]
pub use cuda_decoder::{CudaDecoder, CudaKvCache};
pub use decoder::{Decoder, Ffn, Linear, Logits, Slot, TensorSource};
pub use error::{ByteCount, ConfigError, Error, HeaderError, Result};
pub use hparams::{Hparams, MoeHparams};
pub use kv_cache::{DEFAULT_BLOCK_LEN, KvCache, RopeUpdate};
pub use load::{LoadedModel, OpenedModel, TokenizerSource, load, load_dir, load_gguf, open, open_dir, open_gguf};
pub use moe::{
    LayerRecord, Mlp, MoeLayer, MoeOptions, Router, RouterTrace, Routing, load_balancing_loss, router_z_loss,
};
pub use resolve::{ModelSource, resolve_model};
pub use rope::{RopeScheme, RopeTable};
pub use safetensors::Checkpoint;
/// The KV cache a [`CudaDecoder`] fills, in device memory.
#[cfg(feature = "cuda")]
pub use strata_kernels::cuda::kv::DeviceKvCache;
/// The weight store (and through it the planner and the streamer), re-exported for the facade.
pub use strata_store as store;
/// The tensor core, re-exported for the facade.
pub use strata_tensor as tensor;
pub use vram::{ExpertCacheCounts, VramBudget, VramNeeds, VramReport, plan_vram, vram_report};
