//! strata-models: model families and everything a forward pass needs above the tensor ops.
//!
//! It will parse `config.json` and GGUF metadata, read safetensors and GGUF checkpoints, compute
//! RoPE scaling, and hold the KV cache, attention, MLP, the MoE router and expert layer, and the
//! model families built from them. It asks strata-store for weights and never touches files or
//! io_uring itself. None of that is written yet: this crate is an empty placeholder that later
//! issues fill.
//!
//! Dependencies: strata-tensor, strata-store, and strata-kernels only as an optional dependency
//! behind a CUDA feature.
#![warn(missing_docs)]
