//! strata: run large language models on your own hardware, correct to the reference logits.
//!
//! The facade over the workspace: [`Model::from_pretrained`] loads a checkpoint (a directory
//! with config.json and safetensors, or a model id in the local Hugging Face cache),
//! [`Model::logits`] runs ids through it, and [`Model::generate`] / [`Model::generate_text`]
//! sample new tokens with [`SamplingParams`], streaming them as they arrive.
//!
//! Depends on `strata-models` (and through it the tensor core), never on the store or the
//! kernels directly.
#![warn(missing_docs)]

mod error;
mod model;
pub mod sampling;
mod tokenizer;

pub use error::{Error, Result};
pub use model::{GenerateOptions, Generation, LoadOptions, LogitsMode, Model, StopReason};
pub use sampling::{Sampler, SamplingParams};
pub use strata_models::KvCache;
pub use tokenizer::{TextStream, Tokenizer};
