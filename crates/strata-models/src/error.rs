//! The crate's error type.
//!
//! Every failure that concerns a file names the file, and every failure that concerns a tensor
//! names the tensor. Parsers that work on bytes or strings ([`crate::safetensors::parse_header`],
//! [`crate::config::ModelConfig::from_json_str`]) return their own finer error
//! ([`HeaderError`], [`ConfigError`]); the file-level readers wrap it with the path.

use std::fmt;
use std::path::PathBuf;

use crate::safetensors::SafeDType;

/// Everything that can go wrong while reading checkpoints, configs and resolving models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a file or directory.
    #[error("{}: {error}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
    /// A safetensors file whose header is malformed.
    #[error("{}: {error}", .path.display())]
    Header {
        /// The safetensors file.
        path: PathBuf,
        /// What is wrong with the header, naming the tensor where one is concerned.
        error: HeaderError,
    },
    /// A tensor was asked for that the checkpoint does not hold.
    #[error("tensor {tensor} not found in checkpoint {}", .checkpoint.display())]
    TensorNotFound {
        /// The checkpoint: a directory, or a single safetensors file.
        checkpoint: PathBuf,
        /// The tensor's name.
        tensor: String,
    },
    /// A tensor stored in a dtype the safetensors format defines but strata does not compute in.
    #[error(
        "{}: tensor {tensor} has dtype {dtype}, which strata cannot load (supported: F32, F16, BF16)",
        .path.display()
    )]
    UnsupportedDType {
        /// The safetensors file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// Its dtype.
        dtype: SafeDType,
    },
    /// A tensor's bytes could not be turned into a [`strata_tensor::Tensor`].
    #[error("{}: tensor {tensor}: {error}", .path.display())]
    Tensor {
        /// The safetensors file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The tensor core's error.
        error: strata_tensor::Error,
    },
    /// A `model.safetensors.index.json` that is not a valid shard index.
    #[error("{}: invalid shard index{}: {what}", .path.display(), DisplayTensor(.tensor.as_deref()))]
    Index {
        /// The index file.
        path: PathBuf,
        /// The tensor concerned, if any.
        tensor: Option<String>,
        /// What is wrong.
        what: String,
    },
    /// A shard index maps a tensor to a file that does not exist.
    #[error("{}: tensor {tensor} is mapped to shard {}, which does not exist", .index.display(), .shard.display())]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The missing shard.
        shard: PathBuf,
        /// A tensor mapped to it.
        tensor: String,
    },
    /// A shard index maps a tensor to a shard whose header does not list it.
    #[error("{}: tensor {tensor} is listed in {} but absent from this shard", .shard.display(), .index.display())]
    TensorNotInShard {
        /// The index file.
        index: PathBuf,
        /// The shard.
        shard: PathBuf,
        /// The tensor's name.
        tensor: String,
    },
    /// A directory with neither `model.safetensors` nor `model.safetensors.index.json`.
    #[error("no safetensors checkpoint in {}: expected model.safetensors or model.safetensors.index.json", .dir.display())]
    NoCheckpoint {
        /// The directory.
        dir: PathBuf,
    },
    /// A `config.json` that strata cannot use.
    #[error("{}: {error}", .path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        error: ConfigError,
    },
    /// A weight has a different shape than the model's configuration implies.
    #[error("{}: tensor {tensor} has shape {got:?}, but the model's configuration needs {expected:?}", .path.display())]
    TensorShape {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },
    /// A GGUF file that is malformed or lacks what the model needs.
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    /// A tensor operation failed while running the model.
    #[error(transparent)]
    Compute(#[from] strata_tensor::Error),
    /// The weight store failed: the offload pack, a streamed read, a corrupt unit.
    #[error(transparent)]
    Store(#[from] strata_store::Error),
    /// The placement of the weights does not fit the memory budgets (or is invalid).
    #[error(transparent)]
    Plan(#[from] strata_store::planner::PlanError),
    /// The CUDA backend failed: no device, a driver or cuBLAS error, or arguments a kernel
    /// refused.
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Cuda(#[from] strata_kernels::Error),
    /// A caller's input is invalid (empty or out-of-vocabulary ids, say).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A request would run past the longest sequence its context scaling allows. Raised before
    /// any work, with the cache untouched.
    #[error(
        "the sequence would reach {tokens} tokens, past max_capacity {max_capacity}: shorten the prompt or the \
         generation, or raise max_capacity"
    )]
    ContextTooLong {
        /// The sequence length the request would reach (tokens held plus tokens fed).
        tokens: usize,
        /// The longest sequence allowed.
        max_capacity: usize,
    },
    /// A context-scaling request that cannot be honoured (bad capacities, an unknown algorithm,
    /// an algorithm the model's RoPE cannot take).
    #[error("invalid context scaling: {what}")]
    InvalidContextScaling {
        /// What is wrong.
        what: String,
    },
    /// Mixture-of-Experts options that the model cannot take (an active-expert count outside its
    /// experts, a bad dynamic top-k threshold or capacity factor, MoE options on a dense model).
    #[error("invalid MoE options: {what}")]
    InvalidMoeOptions {
        /// What is wrong.
        what: String,
    },
    /// The model needs something this version of strata does not implement.
    #[error("{0}")]
    Unsupported(String),
    /// A model spec that is neither a usable path nor a model id in the local Hugging Face cache.
    #[error("cannot resolve model {spec:?}: {what} (looked in: {})", DisplayPaths(.searched))]
    ModelNotFound {
        /// The spec as given.
        spec: String,
        /// Why nothing matched.
        what: String,
        /// The paths examined, in order.
        searched: Vec<PathBuf>,
    },
}

/// What is wrong with a safetensors header. Produced by [`crate::safetensors::parse_header`],
/// which sees only bytes; [`Error::Header`] adds the file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The file is shorter than the 8-byte header length.
    #[error("file of {len} bytes is too short for the 8-byte header length")]
    Truncated {
        /// The file's length.
        len: usize,
    },
    /// The header length points past the end of the file.
    #[error("header length {header_len} runs past the end of the {file_len}-byte file")]
    HeaderPastEof {
        /// The header length the file declares.
        header_len: u64,
        /// The file's length.
        file_len: usize,
    },
    /// The header is larger than strata accepts.
    #[error("header length {header_len} exceeds the limit of {limit} bytes")]
    HeaderTooLarge {
        /// The header length the file declares.
        header_len: u64,
        /// The limit.
        limit: u64,
    },
    /// The header is not well-formed JSON, or not a JSON object.
    #[error("header is not valid JSON: {what}")]
    InvalidJson {
        /// The parser's message, with line and column.
        what: String,
    },
    /// A key appears twice in the header.
    #[error("duplicate entry {name:?} in the header")]
    DuplicateEntry {
        /// The repeated key.
        name: String,
    },
    /// `__metadata__` is not a map of strings to strings.
    #[error("__metadata__ is not a map of strings: {what}")]
    InvalidMetadata {
        /// What is wrong.
        what: String,
    },
    /// A tensor entry is missing a field or has one of the wrong type.
    #[error("tensor {tensor}: {what}")]
    InvalidEntry {
        /// The tensor's name.
        tensor: String,
        /// What is wrong.
        what: String,
    },
    /// A dtype string the safetensors format does not define.
    #[error("tensor {tensor}: unknown dtype {dtype:?}")]
    UnknownDType {
        /// The tensor's name.
        tensor: String,
        /// The dtype string found.
        dtype: String,
    },
    /// `data_offsets` with begin after end.
    #[error("tensor {tensor}: data_offsets [{begin}, {end}] begin after their end")]
    BeginAfterEnd {
        /// The tensor's name.
        tensor: String,
        /// The begin offset.
        begin: u64,
        /// The end offset.
        end: u64,
    },
    /// A tensor's byte range runs past the data section.
    #[error(
        "tensor {tensor}: data_offsets [{begin}, {end}] run past the {data_len}-byte data section (which starts at file offset {data_start})"
    )]
    OutOfBounds {
        /// The tensor's name.
        tensor: String,
        /// The begin offset, relative to the data section.
        begin: u64,
        /// The end offset, relative to the data section.
        end: u64,
        /// The data section's length.
        data_len: usize,
        /// Where the data section starts in the file.
        data_start: usize,
    },
    /// Two tensors claim some of the same bytes.
    #[error("tensor {tensor}: data_offsets [{begin}, {end}] overlap tensor {other} at [{other_begin}, {other_end}]")]
    Overlap {
        /// The later tensor (by begin offset).
        tensor: String,
        /// Its begin offset.
        begin: u64,
        /// Its end offset.
        end: u64,
        /// The tensor it overlaps.
        other: String,
        /// That tensor's begin offset.
        other_begin: u64,
        /// That tensor's end offset.
        other_end: u64,
    },
    /// A byte range whose length does not match the shape and dtype.
    #[error("tensor {tensor}: shape {shape:?} of {dtype} needs {expected} bytes, but data_offsets span {got}")]
    SizeMismatch {
        /// The tensor's name.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
        /// Its dtype.
        dtype: SafeDType,
        /// The bytes the shape and dtype need.
        expected: ByteCount,
        /// The bytes the offsets span.
        got: u64,
    },
}

impl HeaderError {
    /// The tensor the error concerns, if any.
    pub fn tensor(&self) -> Option<&str> {
        match self {
            HeaderError::InvalidEntry { tensor, .. }
            | HeaderError::UnknownDType { tensor, .. }
            | HeaderError::BeginAfterEnd { tensor, .. }
            | HeaderError::OutOfBounds { tensor, .. }
            | HeaderError::Overlap { tensor, .. }
            | HeaderError::SizeMismatch { tensor, .. } => Some(tensor),
            HeaderError::DuplicateEntry { name } => Some(name),
            HeaderError::Truncated { .. }
            | HeaderError::HeaderPastEof { .. }
            | HeaderError::HeaderTooLarge { .. }
            | HeaderError::InvalidJson { .. }
            | HeaderError::InvalidMetadata { .. } => None,
        }
    }
}

/// A byte count that may not exist: the size a shape needs can overflow, or be a fraction of a
/// byte for sub-byte dtypes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteCount {
    /// A whole number of bytes.
    Exact(u64),
    /// The element count times the dtype's bits overflows 64 bits.
    Overflow,
    /// The element count times the dtype's bits is not a multiple of 8.
    Fractional,
}

impl fmt::Display for ByteCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ByteCount::Exact(n) => write!(f, "{n}"),
            ByteCount::Overflow => f.write_str("more than 2^64"),
            ByteCount::Fractional => f.write_str("a fractional number of"),
        }
    }
}

/// What is wrong with a `config.json`. Produced by
/// [`crate::config::ModelConfig::from_json_str`]; [`Error::Config`] adds the file.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// Not valid JSON, or a field of the wrong type.
    #[error("invalid config JSON: {what}")]
    InvalidJson {
        /// The parser's message, with line and column.
        what: String,
    },
    /// The config names an architecture strata does not run.
    #[error("unsupported architecture {found}; supported: {}", .supported.join(", "))]
    UnsupportedArchitecture {
        /// The `model_type` (and `architectures`) found.
        found: String,
        /// The `model_type`s strata supports.
        supported: Vec<&'static str>,
    },
    /// A field the architecture needs is absent or null.
    #[error("missing required field `{field}`")]
    MissingField {
        /// The field's name.
        field: &'static str,
    },
    /// A field with a value strata cannot use.
    #[error("field `{field}`: {what}")]
    InvalidField {
        /// The field's name.
        field: &'static str,
        /// What is wrong.
        what: String,
    },
    /// RoPE parameters that are incomplete or malformed.
    #[error("RoPE parameters (rope_type {rope_type:?}): {what}")]
    Rope {
        /// The RoPE type as written.
        rope_type: String,
        /// What is wrong.
        what: String,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Formats an optional tensor name as " (tensor NAME)", or nothing.
struct DisplayTensor<'a>(Option<&'a str>);

impl fmt::Display for DisplayTensor<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(t) => write!(f, " (tensor {t})"),
            None => Ok(()),
        }
    }
}

/// Formats a list of paths for an error message.
struct DisplayPaths<'a>(&'a [PathBuf]);

impl fmt::Display for DisplayPaths<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("nowhere");
        }
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}", p.display())?;
        }
        Ok(())
    }
}
