//! The store's error type.
//!
//! One enum for the whole crate. Each variant names the file, the unit or the tensor involved
//! and the limit that was crossed, so a message points at the problem without a debugger.

use std::io;
use std::path::PathBuf;

use strata_tensor::DType;

/// A `Result` with the store's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("open", "write", "rename", ...).
        op: &'static str,
        /// The file or directory it was done to.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A pack manifest could not be encoded.
    #[error("encoding the pack manifest {path}: {source}")]
    ManifestEncode {
        /// The manifest file being written.
        path: PathBuf,
        /// The encoder's error.
        source: serde_json::Error,
    },
    /// A source key was asked for with no files.
    #[error("a source key needs at least one checkpoint file")]
    NoSourceFiles,
    /// The conversion dtype of the pack options differs from the one its source key names.
    #[error("pack options convert to {options:?} but the source key was made for {key:?}")]
    ConvertMismatch {
        /// The conversion dtype in the source key.
        key: Option<DType>,
        /// The conversion dtype in the pack options.
        options: Option<DType>,
    },
    /// A unit name is empty or appears twice in one pack.
    #[error("pack unit name {unit:?} is empty or not unique")]
    DuplicateUnit {
        /// The unit's name.
        unit: String,
    },
    /// A tensor name is empty or appears twice in one unit.
    #[error("unit {unit}: tensor name {tensor:?} is empty or not unique within the unit")]
    DuplicateTensor {
        /// The unit's name.
        unit: String,
        /// The tensor's name.
        tensor: String,
    },
    /// A tensor's element count overflows or is not a whole number of its dtype's blocks.
    #[error("unit {unit}: tensor {tensor} of shape {shape:?} is not a whole number of {dtype} blocks of {block}")]
    BadShape {
        /// The unit's name.
        unit: String,
        /// The tensor's name.
        tensor: String,
        /// The tensor's dtype.
        dtype: DType,
        /// The tensor's shape.
        shape: Vec<usize>,
        /// The dtype's block length.
        block: usize,
    },
    /// A tensor's bytes do not match its shape and dtype.
    #[error("unit {unit}: tensor {tensor} ({dtype}, shape {shape:?}) needs {expected} bytes, got {got}")]
    TensorBytes {
        /// The unit's name.
        unit: String,
        /// The tensor's name.
        tensor: String,
        /// The tensor's dtype.
        dtype: DType,
        /// The tensor's shape.
        shape: Vec<usize>,
        /// The bytes its shape and dtype need.
        expected: usize,
        /// The bytes given.
        got: usize,
    },
    /// Converting a tensor to the pack's dtype failed.
    #[error("unit {unit}: converting tensor {tensor} from {from} to {to}: {source}")]
    Convert {
        /// The unit's name.
        unit: String,
        /// The tensor's name.
        tensor: String,
        /// The stored dtype.
        from: DType,
        /// The pack's dtype.
        to: DType,
        /// The tensor core's error.
        source: strata_tensor::Error,
    },
    /// The offload directory's file system has too little free space for the pack.
    #[error("the pack needs {need} bytes in {path} but only {available} are free")]
    NoSpace {
        /// The directory the pack is built in.
        path: PathBuf,
        /// The bytes the pack's data file needs.
        need: u64,
        /// The bytes free for an unprivileged user.
        available: u64,
    },
    /// A freshly built pack failed its own validation (a bug in the writer, or a file system
    /// that lost the writes).
    #[error("the pack just built in {path} does not open: {reason}")]
    BuildCheck {
        /// The pack's directory.
        path: PathBuf,
        /// Why it does not open.
        reason: String,
    },
    /// A unit index is out of range.
    #[error("unit index {index} is out of range: the pack has {count} units")]
    UnitIndex {
        /// The index asked for.
        index: usize,
        /// The number of units.
        count: usize,
    },
    /// Bytes handed to [`crate::pack::Pack::verify`] are fewer than the unit's checksummed length.
    #[error("unit {unit} of {path}: got {got} bytes, the unit has {expected}")]
    UnitLength {
        /// The unit's name.
        unit: String,
        /// The pack's data file.
        path: PathBuf,
        /// The unit's checksummed length.
        expected: u64,
        /// The bytes given.
        got: u64,
    },
    /// A unit's bytes do not match the checksum recorded when the pack was built.
    #[error("unit {unit} of {path} is corrupt: crc32 {actual:#010x}, the manifest says {expected:#010x}")]
    Checksum {
        /// The unit's name.
        unit: String,
        /// The pack's data file.
        path: PathBuf,
        /// The checksum in the manifest.
        expected: u32,
        /// The checksum of the bytes read.
        actual: u32,
    },
    /// A unit has no tensor of that name.
    #[error("unit {unit} of the offload pack has no tensor {tensor}")]
    TensorNotInUnit {
        /// The unit's name.
        unit: String,
        /// The tensor asked for.
        tensor: String,
    },
    /// A manifest entry cannot be used (a dtype or range the store does not understand).
    #[error("offload pack {path}: {reason}")]
    BadManifest {
        /// The pack's data file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The placement and the pack disagree (a plan made for another model or pack).
    #[error("the placement plan does not fit the offload pack: {reason}")]
    PlanMismatch {
        /// What differs.
        reason: String,
    },
    /// The expert cache cannot do what was asked (too small, or not there).
    #[error("expert cache: {reason}")]
    ExpertCache {
        /// What went wrong.
        reason: String,
    },
    /// A read through the streamer failed.
    #[error(transparent)]
    Stream(#[from] strata_nvme::Error),
    /// A tensor could not be made from a unit's bytes.
    #[error(transparent)]
    Tensor(#[from] strata_tensor::Error),
}

impl Error {
    /// An [`Error::Io`] for `op` on `path`.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}
