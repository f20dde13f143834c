//! strata: run large language models that do not fit in accelerator memory.
//!
//! This is the facade users depend on. It will offer `Model::from_pretrained`, the `MoeConfig`,
//! `OffloadConfig` and `ContextScalingConfig` objects, the tokenizer and chat template, sampling,
//! and `generate`/`stream`. None of that is written yet: this crate is an empty placeholder that
//! later issues fill. Today the working part of strata is the CPU tensor core, `strata-tensor`.
//!
//! Dependencies: strata-models, and strata-tensor so that the facade can name tensor types
//! (`DType`, `Device`) in its configuration without going through strata-models.
#![warn(missing_docs)]
