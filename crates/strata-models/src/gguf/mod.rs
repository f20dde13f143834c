//! GGUF reader: the header, every metadata value type, tensor infos, and tensors used in place
//! over a memory map.
//!
//! GGUF (llama.cpp's checkpoint format, versions 2 and 3, little-endian) is a header followed by
//! a data section. The header holds the magic `GGUF`, a version, the tensor count and the
//! metadata count (both `u64`), the metadata key/value pairs (typed: integers, floats, bools,
//! strings and arrays of those, arrays nested), and one info per tensor (name, dimensions with
//! the innermost `ne[0]` first, ggml type, offset into the data section). The data section
//! starts at the next multiple of `general.alignment` (32 when absent) after the header.
//!
//! [`parse_header`] validates a whole file held in memory without ever trusting a count or a
//! length read from it: every count is checked against the bytes that remain before anything is
//! allocated, every tensor's byte range is checked against the end of the file, and a bad file
//! gets a typed [`GgufError`] instead of a panic. [`GgufFile::open`] maps a file and hands out
//! its tensors as zero-copy [`Tensor`]s in their block types, in Hugging Face order (the GGUF
//! dimensions reversed: a weight stored as `ne = [k, n]` becomes shape `[n, k]`). A tensor of a
//! ggml type strata cannot compute with (`q5_k`, say) does not stop the rest of the file from
//! loading; asking for that tensor is the error.
//!
//! [`write::GgufWriter`] writes files in the same format (tests and `synth-model` use it).

mod metadata;
mod parse;
pub mod write;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use strata_tensor::{ByteSource, DType, Tensor};

pub use metadata::{MetaArray, MetaValue, Metadata, ValueType};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// The data-section alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// The most dimensions a ggml tensor has.
pub const MAX_DIMS: usize = 4;

/// How deeply metadata arrays may nest (an array of arrays is depth 2). Real files nest at most
/// two levels; the limit keeps a hostile file from exhausting the stack.
pub const MAX_ARRAY_DEPTH: usize = 16;

/// The metadata key that sets the data-section alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// The path shown in errors from [`parse_header`], which has bytes but no file.
const IN_MEMORY: &str = "<memory>";

/// Everything that can go wrong reading a GGUF file. Each variant names the file (`<memory>` for
/// [`parse_header`]) and, where there is one, the byte offset, metadata key or tensor involved.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened, sized or mapped.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("{}: not a GGUF file: it starts with {found:02x?}, not the magic \"GGUF\"", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// The first four bytes.
        found: [u8; 4],
    },
    /// A GGUF version other than 2 and 3 (version 1 used 32-bit counts and is not read).
    #[error("{}: GGUF version {version} is not supported (strata reads versions 2 and 3)", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version read (little-endian).
        version: u32,
    },
    /// A big-endian GGUF file: its version reads byte-swapped.
    #[error("{}: big-endian GGUF (version {version}) is not supported: strata reads little-endian files", path.display())]
    BigEndian {
        /// The file.
        path: PathBuf,
        /// The version, read big-endian.
        version: u32,
    },
    /// The file ends inside something the header says is there.
    #[error("{}: truncated: {what} at offset {offset} needs {needed} bytes but only {available} remain", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Where the read started.
        offset: u64,
        /// What was being read.
        what: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes left in the file from `offset`.
        available: u64,
    },
    /// A count read from the file (tensors, metadata entries, array elements) is larger than the
    /// rest of the file could hold. Checked before anything is allocated.
    #[error("{}: {what} at offset {offset}: a count of {count} cannot fit in the {available} bytes left", path.display())]
    CountPastEof {
        /// The file.
        path: PathBuf,
        /// Where the count was read.
        offset: u64,
        /// What is being counted.
        what: String,
        /// The count read.
        count: u64,
        /// Bytes left in the file after the count.
        available: u64,
    },
    /// A string is not valid UTF-8.
    #[error("{}: {what} at offset {offset} is not valid UTF-8", path.display())]
    InvalidUtf8 {
        /// The file.
        path: PathBuf,
        /// Where the string's bytes start.
        offset: u64,
        /// Which string.
        what: String,
    },
    /// A metadata value type id outside the GGUF specification.
    #[error("{}: metadata key {key:?}: unknown value type {type_id} at offset {offset}", path.display())]
    UnknownValueType {
        /// The file.
        path: PathBuf,
        /// Where the type id was read.
        offset: u64,
        /// The metadata key.
        key: String,
        /// The type id read.
        type_id: u32,
    },
    /// A bool stored as something other than 0 or 1.
    #[error("{}: metadata key {key:?}: bool byte {value} at offset {offset} is neither 0 nor 1", path.display())]
    InvalidBool {
        /// The file.
        path: PathBuf,
        /// Where the byte was read.
        offset: u64,
        /// The metadata key.
        key: String,
        /// The byte read.
        value: u8,
    },
    /// Arrays nested deeper than [`MAX_ARRAY_DEPTH`].
    #[error("{}: metadata key {key:?}: arrays nested deeper than {MAX_ARRAY_DEPTH} at offset {offset}", path.display())]
    ArrayTooDeep {
        /// The file.
        path: PathBuf,
        /// Where the innermost array starts.
        offset: u64,
        /// The metadata key.
        key: String,
    },
    /// The same metadata key twice.
    #[error("{}: metadata key {key:?} appears twice", path.display())]
    DuplicateKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// `general.alignment` is zero or not a power of two.
    #[error("{}: general.alignment {alignment} is not a power of two", path.display())]
    BadAlignment {
        /// The file.
        path: PathBuf,
        /// The alignment read.
        alignment: u64,
    },
    /// A tensor info that cannot describe a tensor: no or too many dimensions, an element count
    /// that overflows, or an innermost dimension that is not a whole number of blocks.
    #[error("{}: tensor {tensor:?}: {what}", path.display())]
    BadTensorInfo {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        what: String,
    },
    /// The same tensor name twice.
    #[error("{}: tensor {tensor:?} appears twice", path.display())]
    DuplicateTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// A tensor offset that is not a multiple of the file's alignment.
    #[error("{}: tensor {tensor:?}: offset {offset} is not a multiple of the alignment {alignment}", path.display())]
    MisalignedTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The offset, relative to the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// A tensor whose bytes (or, for a type of unknown size, whose start) lie past the end of
    /// the file.
    #[error("{}: tensor {tensor:?}: bytes {start}..{end} are outside the file of {file_len} bytes", path.display())]
    TensorOutOfBounds {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The absolute start offset (saturated at `u64::MAX` on overflow).
        start: u64,
        /// The absolute end offset (saturated at `u64::MAX` on overflow).
        end: u64,
        /// The file's length.
        file_len: u64,
    },
    /// Two tensors whose byte ranges overlap.
    #[error("{}: tensors {tensor:?} and {other:?} overlap", path.display())]
    TensorOverlap {
        /// The file.
        path: PathBuf,
        /// One tensor.
        tensor: String,
        /// The tensor it overlaps.
        other: String,
    },
    /// A tensor of a ggml type strata does not support (reported only when that tensor is asked
    /// for).
    #[error("{}: tensor {tensor:?} has ggml type {type_name} (id {ggml_type}), which strata does not support", path.display())]
    UnsupportedType {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The ggml type id.
        ggml_type: u32,
        /// The type's ggml name, or `"unknown"`.
        type_name: &'static str,
    },
    /// No tensor of that name.
    #[error("{}: no tensor named {tensor:?}", path.display())]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The name asked for.
        tensor: String,
    },
    /// A metadata key that is not in the file.
    #[error("{}: metadata key {key:?} is missing", path.display())]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A metadata value of a different type (or out of range for the type asked for).
    #[error("{}: metadata key {key:?} holds {found}, expected {expected}", path.display())]
    WrongType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What the caller asked for.
        expected: &'static str,
        /// What the file holds.
        found: String,
    },
    /// The tensor core rejected a tensor's bytes.
    #[error("{}: tensor {tensor:?}: {source}", path.display())]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The tensor core's error.
        #[source]
        source: strata_tensor::Error,
    },
    /// The tokenizer described by the metadata cannot be built.
    #[error("{}: tokenizer: {what}", path.display())]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// What ggml knows about a type id: its name, elements per block and bytes per block. Covers
/// every type ggml defines, so a tensor's size is known (and bounds-checked) even when strata
/// cannot compute with it.
pub(crate) fn ggml_type_info(id: u32) -> Option<(&'static str, u64, u64)> {
    Some(match id {
        0 => ("f32", 1, 4),
        1 => ("f16", 1, 2),
        2 => ("q4_0", 32, 18),
        3 => ("q4_1", 32, 20),
        6 => ("q5_0", 32, 22),
        7 => ("q5_1", 32, 24),
        8 => ("q8_0", 32, 34),
        9 => ("q8_1", 32, 36),
        10 => ("q2_k", 256, 84),
        11 => ("q3_k", 256, 110),
        12 => ("q4_k", 256, 144),
        13 => ("q5_k", 256, 176),
        14 => ("q6_k", 256, 210),
        15 => ("q8_k", 256, 292),
        16 => ("iq2_xxs", 256, 66),
        17 => ("iq2_xs", 256, 74),
        18 => ("iq3_xxs", 256, 98),
        19 => ("iq1_s", 256, 50),
        20 => ("iq4_nl", 32, 18),
        21 => ("iq3_s", 256, 110),
        22 => ("iq2_s", 256, 82),
        23 => ("iq4_xs", 256, 136),
        24 => ("i8", 1, 1),
        25 => ("i16", 1, 2),
        26 => ("i32", 1, 4),
        27 => ("i64", 1, 8),
        28 => ("f64", 1, 8),
        29 => ("iq1_m", 256, 56),
        30 => ("bf16", 1, 2),
        34 => ("tq1_0", 256, 54),
        35 => ("tq2_0", 256, 66),
        39 => ("mxfp4", 32, 17),
        _ => return None,
    })
}

/// The ggml name of a type id (`q4_k`), or `"unknown"`.
pub fn ggml_type_name(id: u32) -> &'static str {
    ggml_type_info(id).map_or("unknown", |(name, _, _)| name)
}

/// One tensor's entry in the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    name: String,
    dims: Vec<u64>,
    ggml_type: u32,
    offset: u64,
    byte_len: Option<u64>,
}

impl TensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The dimensions as GGUF stores them, innermost (`ne[0]`) first.
    pub fn dims(&self) -> &[u64] {
        &self.dims
    }

    /// The shape in Hugging Face (row-major, outermost first) order: the GGUF dimensions
    /// reversed, so a weight with `ne = [k, n]` has shape `[n, k]`. Every dimension fits in
    /// `usize`: the parser checked the element count.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// The number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The ggml type id.
    pub fn ggml_type(&self) -> u32 {
        self.ggml_type
    }

    /// The ggml type's name, or `"unknown"`.
    pub fn ggml_type_name(&self) -> &'static str {
        ggml_type_name(self.ggml_type)
    }

    /// The strata dtype, if strata supports the ggml type.
    pub fn dtype(&self) -> Option<DType> {
        DType::from_ggml_type(self.ggml_type)
    }

    /// The offset of the tensor's bytes from the start of the data section.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The size in bytes, when ggml defines the type.
    pub fn byte_len(&self) -> Option<u64> {
        self.byte_len
    }
}

/// A parsed and validated GGUF header.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    version: u32,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl GgufHeader {
    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// The tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of the tensor called `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The data-section alignment (`general.alignment`, or 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The absolute file offset where the data section starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }
}

/// Parses and validates the header of a GGUF file held entirely in `bytes`: magic, version,
/// metadata, tensor infos, and every tensor's byte range against `bytes.len()`. Never panics and
/// never allocates more than a small multiple of `bytes.len()`, whatever the input.
pub fn parse_header(bytes: &[u8]) -> Result<GgufHeader, GgufError> {
    parse::parse(bytes, Path::new(IN_MEMORY))
}

/// A read-only memory map of a GGUF file, shared by the tensors that view it.
struct MmapSource(memmap2::Mmap);

impl ByteSource for MmapSource {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// An open GGUF file: the validated header over a memory map, with zero-copy tensors.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<MmapSource>,
    header: GgufHeader,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.header.version)
            .field("metadata", &self.header.metadata.len())
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps the file at `path` and validates its header (see [`parse_header`]).
    ///
    /// The file must not be modified while this value or any tensor from it is alive: the
    /// tensors read the mapped pages directly.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let io = |source| GgufError::Io { path: path.to_owned(), source };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process. Its contents are only
        // defined while no one truncates or rewrites the file; checkpoints are written once and
        // then only read, and the requirement is documented on `open`. Every access goes through
        // the bounds-checked parser and `Tensor::from_source`, so a file shorter than its header
        // claims is an error, not an out-of-bounds read.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let header = parse::parse(&map, path)?;
        Ok(GgufFile { path: path.to_owned(), map: Arc::new(MmapSource(map)), header })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The validated header.
    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    /// The metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.header.metadata
    }

    /// The tensor infos in file order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    /// The info of the tensor called `name`, or [`GgufError::MissingTensor`].
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.header
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor { path: self.path.clone(), tensor: name.to_owned() })
    }

    /// The raw bytes of the tensor called `name`, for any type ggml defines (including ones
    /// strata cannot compute with).
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], GgufError> {
        let info = self.tensor_info(name)?;
        let (start, len) = self.byte_range(info)?;
        Ok(&self.map.0[start..start + len])
    }

    /// The tensor called `name` as a zero-copy [`Tensor`] over the map, in its stored dtype and
    /// in Hugging Face order (see [`TensorInfo::shape`]).
    pub fn tensor(&self, name: &str) -> Result<Tensor, GgufError> {
        let info = self.tensor_info(name)?;
        let dtype = info.dtype().ok_or_else(|| self.unsupported(info))?;
        let (start, len) = self.byte_range(info)?;
        let source: Arc<dyn ByteSource> = self.map.clone();
        Tensor::from_source(source, start, len, dtype, info.shape()).map_err(|source| GgufError::Tensor {
            path: self.path.clone(),
            tensor: info.name.clone(),
            source,
        })
    }

    fn unsupported(&self, info: &TensorInfo) -> GgufError {
        GgufError::UnsupportedType {
            path: self.path.clone(),
            tensor: info.name.clone(),
            ggml_type: info.ggml_type,
            type_name: info.ggml_type_name(),
        }
    }

    /// The absolute byte range of a tensor whose type ggml defines. The parser checked that it
    /// lies inside the file, so both numbers fit in `usize`.
    fn byte_range(&self, info: &TensorInfo) -> Result<(usize, usize), GgufError> {
        let len = info.byte_len.ok_or_else(|| self.unsupported(info))?;
        Ok(((self.header.data_offset + info.offset) as usize, len as usize))
    }
}

#[cfg(test)]
mod tests;
