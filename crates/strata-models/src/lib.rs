//! strata-models (skeleton)
#![warn(missing_docs)]

pub mod gguf;
pub mod gguf_tokenizer;
