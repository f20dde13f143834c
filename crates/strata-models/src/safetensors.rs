//! The safetensors reader: memory-mapped files, a validating header parser, and [`Checkpoint`],
//! which opens a Hugging Face checkpoint directory (one `model.safetensors`, or a
//! `model.safetensors.index.json` with its shards).
//!
//! A safetensors file is an 8-byte little-endian header length `N`, `N` bytes of JSON mapping
//! tensor names to `{dtype, shape, data_offsets: [begin, end]}` (plus an optional
//! `__metadata__` map of strings), then the data section, which starts at file offset `8 + N`;
//! `data_offsets` are relative to it. [`parse_header`] checks everything a reader relies on
//! before any tensor is touched: the length lies within the file, the JSON is well formed,
//! every dtype is one the format defines, every byte range lies inside the data section with
//! `begin <= end`, no two ranges overlap, and each range is exactly `product(shape) x dtype size`
//! bytes. It never panics, whatever the bytes (a fuzz target holds it to that).
//!
//! Tensors come out as zero-copy [`Tensor`]s over the memory map for F32, F16 and BF16. The
//! data section starts at `8 + N`, which writers pad to a multiple of 8 but nothing forces, so a
//! mapped f32 tensor can be misaligned, and [`Tensor::as_f32`] then fails; callers that need
//! aligned elements use [`Checkpoint::tensor_aligned`] (which copies only when the view is
//! misaligned) or [`Checkpoint::tensor_f32_vec`] (an owned f32 copy, converting f16 and bf16).
//! Dtypes that the format defines but strata does not compute in (I64, F64, F8, ...) parse fine
//! and fail only when that tensor is asked for, with an error naming the file, tensor and dtype.
//!
//! The memory maps assume the files are not modified or truncated while a checkpoint is open,
//! as every memory-mapping reader does.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;
use strata_tensor::{AlignedBytes, ByteSource, CpuStorage, DType, Tensor};

use crate::error::{ByteCount, Error, HeaderError, Result};

/// The name of a single-file checkpoint in a model directory.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The name of a sharded checkpoint's index in a model directory.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The largest header [`parse_header`] accepts (100 MB, as the reference implementation).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// The element types the safetensors format defines, spelled as in the files.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SafeDType {
    /// Boolean, one byte.
    BOOL,
    /// 4-bit float (e2m1), two per byte.
    F4,
    /// 6-bit float (e2m3).
    F6_E2M3,
    /// 6-bit float (e3m2).
    F6_E3M2,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float (e5m2).
    F8_E5M2,
    /// 8-bit float (e4m3).
    F8_E4M3,
    /// 8-bit exponent-only scale (e8m0).
    F8_E8M0,
    /// 8-bit float (e4m3, finite, unsigned zero).
    F8_E4M3FNUZ,
    /// 8-bit float (e5m2, finite, unsigned zero).
    F8_E5M2FNUZ,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE binary32.
    F32,
    /// Complex of two binary32.
    C64,
    /// IEEE binary64.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

impl SafeDType {
    /// Every dtype the format defines.
    pub const ALL: [SafeDType; 22] = [
        SafeDType::BOOL,
        SafeDType::F4,
        SafeDType::F6_E2M3,
        SafeDType::F6_E3M2,
        SafeDType::U8,
        SafeDType::I8,
        SafeDType::F8_E5M2,
        SafeDType::F8_E4M3,
        SafeDType::F8_E8M0,
        SafeDType::F8_E4M3FNUZ,
        SafeDType::F8_E5M2FNUZ,
        SafeDType::I16,
        SafeDType::U16,
        SafeDType::F16,
        SafeDType::BF16,
        SafeDType::I32,
        SafeDType::U32,
        SafeDType::F32,
        SafeDType::C64,
        SafeDType::F64,
        SafeDType::I64,
        SafeDType::U64,
    ];

    /// The name as written in a header (`"BF16"`, `"F8_E4M3"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            SafeDType::BOOL => "BOOL",
            SafeDType::F4 => "F4",
            SafeDType::F6_E2M3 => "F6_E2M3",
            SafeDType::F6_E3M2 => "F6_E3M2",
            SafeDType::U8 => "U8",
            SafeDType::I8 => "I8",
            SafeDType::F8_E5M2 => "F8_E5M2",
            SafeDType::F8_E4M3 => "F8_E4M3",
            SafeDType::F8_E8M0 => "F8_E8M0",
            SafeDType::F8_E4M3FNUZ => "F8_E4M3FNUZ",
            SafeDType::F8_E5M2FNUZ => "F8_E5M2FNUZ",
            SafeDType::I16 => "I16",
            SafeDType::U16 => "U16",
            SafeDType::F16 => "F16",
            SafeDType::BF16 => "BF16",
            SafeDType::I32 => "I32",
            SafeDType::U32 => "U32",
            SafeDType::F32 => "F32",
            SafeDType::C64 => "C64",
            SafeDType::F64 => "F64",
            SafeDType::I64 => "I64",
            SafeDType::U64 => "U64",
        }
    }

    /// The dtype for a header's dtype string (exact, case-sensitive, as the format specifies).
    pub fn from_name(name: &str) -> Option<SafeDType> {
        SafeDType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bits per element.
    pub const fn bits(self) -> u64 {
        match self {
            SafeDType::F4 => 4,
            SafeDType::F6_E2M3 | SafeDType::F6_E3M2 => 6,
            SafeDType::BOOL
            | SafeDType::U8
            | SafeDType::I8
            | SafeDType::F8_E5M2
            | SafeDType::F8_E4M3
            | SafeDType::F8_E8M0
            | SafeDType::F8_E4M3FNUZ
            | SafeDType::F8_E5M2FNUZ => 8,
            SafeDType::I16 | SafeDType::U16 | SafeDType::F16 | SafeDType::BF16 => 16,
            SafeDType::I32 | SafeDType::U32 | SafeDType::F32 => 32,
            SafeDType::C64 | SafeDType::F64 | SafeDType::I64 | SafeDType::U64 => 64,
        }
    }

    /// The strata dtype this loads as, for the dtypes strata computes in (F32, F16, BF16).
    pub const fn to_dtype(self) -> Option<DType> {
        match self {
            SafeDType::F32 => Some(DType::F32),
            SafeDType::F16 => Some(DType::F16),
            SafeDType::BF16 => Some(DType::BF16),
            _ => None,
        }
    }

    /// The bytes `numel` elements take.
    pub fn bytes_for(self, numel: u64) -> ByteCount {
        match numel.checked_mul(self.bits()) {
            None => ByteCount::Overflow,
            Some(bits) if bits % 8 != 0 => ByteCount::Fractional,
            Some(bits) => ByteCount::Exact(bits / 8),
        }
    }
}

impl fmt::Display for SafeDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's entry in a safetensors header, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Its element type.
    pub dtype: SafeDType,
    /// Its shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// Where its bytes begin, relative to the data section.
    pub begin: usize,
    /// Where its bytes end (exclusive), relative to the data section.
    pub end: usize,
}

impl TensorInfo {
    /// The tensor's size in bytes.
    pub fn byte_len(&self) -> usize {
        self.end - self.begin
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        // Validated in `parse_header`: the product of the non-zero dimensions fits in 64 bits
        // and in `usize`.
        self.shape.iter().product()
    }
}

/// A validated safetensors header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
    data_start: usize,
    data_len: usize,
}

impl Header {
    /// The tensors, by name.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.values()
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the header lists no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The `__metadata__` map (empty when absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The file offset where the data section starts: `8 + header length`.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// The length of the data section: the rest of the file.
    pub fn data_len(&self) -> usize {
        self.data_len
    }
}

/// Parses and validates the header of a safetensors file, given the whole file's bytes.
///
/// Pure and total: any input gives a [`Header`] or a [`HeaderError`], never a panic.
pub fn parse_header(bytes: &[u8]) -> Result<Header, HeaderError> {
    let Some((len_bytes, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(HeaderError::Truncated { len: bytes.len() });
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    if header_len > MAX_HEADER_LEN {
        return Err(HeaderError::HeaderTooLarge { header_len, limit: MAX_HEADER_LEN });
    }
    let json_len = match usize::try_from(header_len) {
        Ok(n) if n <= rest.len() => n,
        _ => return Err(HeaderError::HeaderPastEof { header_len, file_len: bytes.len() }),
    };
    let (json, data) = rest.split_at(json_len);
    let data_start = 8 + json_len;

    let entries = parse_entries(json)?;

    let mut tensors = BTreeMap::new();
    let mut metadata = None;
    for (name, value) in entries {
        if name == "__metadata__" {
            if metadata.is_some() {
                return Err(HeaderError::DuplicateEntry { name });
            }
            metadata = Some(parse_metadata(value)?);
            continue;
        }
        if tensors.contains_key(&name) {
            return Err(HeaderError::DuplicateEntry { name });
        }
        let info = parse_entry(name, value, data.len(), data_start)?;
        tensors.insert(info.name.clone(), info);
    }
    check_overlaps(&tensors)?;

    Ok(Header { tensors, metadata: metadata.unwrap_or_default(), data_start, data_len: data.len() })
}

/// The header's top-level object as a list of entries, keeping duplicate keys (which a map
/// would silently collapse) so that they can be reported.
struct Entries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Entries, D::Error> {
        struct EntriesVisitor;

        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }

        deserializer.deserialize_map(EntriesVisitor)
    }
}

fn parse_entries(json: &[u8]) -> Result<Vec<(String, Value)>, HeaderError> {
    match serde_json::from_slice::<Entries>(json) {
        Ok(Entries(entries)) => Ok(entries),
        Err(e) => Err(HeaderError::InvalidJson { what: e.to_string() }),
    }
}

fn parse_metadata(value: Value) -> Result<BTreeMap<String, String>, HeaderError> {
    let Value::Object(map) = value else {
        return Err(HeaderError::InvalidMetadata { what: format!("expected an object, got {}", kind(&value)) });
    };
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            other => Err(HeaderError::InvalidMetadata { what: format!("value of {k:?} is {}", kind(&other)) }),
        })
        .collect()
}

fn parse_entry(name: String, value: Value, data_len: usize, data_start: usize) -> Result<TensorInfo, HeaderError> {
    let invalid = |tensor: &str, what: String| HeaderError::InvalidEntry { tensor: tensor.to_owned(), what };
    let Value::Object(mut obj) = value else {
        let what = format!("expected an object, got {}", kind(&value));
        return Err(invalid(&name, what));
    };

    let dtype = match obj.remove("dtype") {
        Some(Value::String(s)) => match SafeDType::from_name(&s) {
            Some(d) => d,
            None => return Err(HeaderError::UnknownDType { tensor: name, dtype: s }),
        },
        Some(other) => return Err(invalid(&name, format!("dtype is {}, expected a string", kind(&other)))),
        None => return Err(invalid(&name, "missing dtype".into())),
    };

    let shape_values = match obj.remove("shape") {
        Some(Value::Array(a)) => a,
        Some(other) => return Err(invalid(&name, format!("shape is {}, expected an array", kind(&other)))),
        None => return Err(invalid(&name, "missing shape".into())),
    };
    let mut shape = Vec::with_capacity(shape_values.len());
    for v in &shape_values {
        match v.as_u64().and_then(|d| usize::try_from(d).ok()) {
            Some(d) => shape.push(d),
            None => return Err(invalid(&name, format!("shape dimension {v} is not a non-negative integer"))),
        }
    }

    let offsets = match obj.remove("data_offsets") {
        Some(Value::Array(a)) => a,
        Some(other) => return Err(invalid(&name, format!("data_offsets is {}, expected an array", kind(&other)))),
        None => return Err(invalid(&name, "missing data_offsets".into())),
    };
    let (begin, end) = match offsets.as_slice() {
        [b, e] => match (b.as_u64(), e.as_u64()) {
            (Some(b), Some(e)) => (b, e),
            _ => return Err(invalid(&name, "data_offsets are not non-negative integers".into())),
        },
        _ => return Err(invalid(&name, format!("data_offsets has {} elements, expected 2", offsets.len()))),
    };
    if begin > end {
        return Err(HeaderError::BeginAfterEnd { tensor: name, begin, end });
    }
    let (begin_us, end_us) = match (usize::try_from(begin), usize::try_from(end)) {
        (Ok(b), Ok(e)) if e <= data_len => (b, e),
        _ => return Err(HeaderError::OutOfBounds { tensor: name, begin, end, data_len, data_start }),
    };

    // The product of the non-zero dimensions must fit, so that every partial product computed
    // later (element counts, row counts) fits too, even for shapes with a zero dimension.
    let mut nonzero_product: u64 = 1;
    for &d in shape.iter().filter(|&&d| d != 0) {
        nonzero_product = match nonzero_product.checked_mul(d as u64) {
            Some(p) if usize::try_from(p).is_ok() => p,
            _ => {
                let what = format!("shape {shape:?} has more elements than fit in memory");
                return Err(invalid(&name, what));
            }
        };
    }
    let numel = if shape.contains(&0) { 0 } else { nonzero_product };
    let expected = dtype.bytes_for(numel);
    let got = end - begin;
    if expected != ByteCount::Exact(got) {
        return Err(HeaderError::SizeMismatch { tensor: name, shape, dtype, expected, got });
    }

    Ok(TensorInfo { name, dtype, shape, begin: begin_us, end: end_us })
}

/// Checks that no two non-empty byte ranges share a byte.
fn check_overlaps(tensors: &BTreeMap<String, TensorInfo>) -> Result<(), HeaderError> {
    let mut ranges: Vec<&TensorInfo> = tensors.values().filter(|t| t.begin < t.end).collect();
    ranges.sort_by_key(|t| (t.begin, t.end));
    let mut furthest: Option<&TensorInfo> = None;
    for t in ranges {
        if let Some(prev) = furthest
            && t.begin < prev.end
        {
            return Err(HeaderError::Overlap {
                tensor: t.name.clone(),
                begin: t.begin as u64,
                end: t.end as u64,
                other: prev.name.clone(),
                other_begin: prev.begin as u64,
                other_end: prev.end as u64,
            });
        }
        if furthest.is_none_or(|p| t.end > p.end) {
            furthest = Some(t);
        }
    }
    Ok(())
}

/// A short description of a JSON value's kind, for error messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A read-only memory map of a file, as a [`ByteSource`] that tensors view without copying.
/// Crate-private: only the checkpoint readers, which state the no-modification contract in
/// their documentation, create maps.
pub(crate) struct MmapSource(memmap2::Mmap);

impl MmapSource {
    /// Maps `file` read-only.
    ///
    /// The map assumes the file is neither modified nor truncated while mapped (see the module
    /// documentation).
    pub(crate) fn map(file: &File) -> std::io::Result<MmapSource> {
        // SAFETY: a file mapping is only sound while no one modifies or truncates the file; this
        // is the documented contract of checkpoint readers (model files are read-only inputs),
        // the same one every mmap-based loader relies on. The map is read-only, so this process
        // never writes through it.
        let map = unsafe { memmap2::Mmap::map(file) }?;
        Ok(MmapSource(map))
    }
}

impl ByteSource for MmapSource {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for MmapSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MmapSource({} bytes)", self.0.len())
    }
}

/// One memory-mapped safetensors file with its validated header.
pub struct SafetensorsFile {
    path: PathBuf,
    source: Arc<MmapSource>,
    header: Header,
}

impl SafetensorsFile {
    /// Opens, maps and validates the file at `path`. The file is memory-mapped: it must not be
    /// modified or truncated while this value (or a tensor viewing it) is alive.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        let path = path.as_ref().to_path_buf();
        let io_err = |error| Error::Io { path: path.clone(), error };
        let file = File::open(&path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if len < 8 {
            // Too short to hold the header length; an empty file cannot be mapped at all.
            let error = HeaderError::Truncated { len: len as usize };
            return Err(Error::Header { path, error });
        }
        let source = MmapSource::map(&file).map_err(io_err)?;
        let header = parse_header(source.bytes()).map_err(|error| Error::Header { path: path.clone(), error })?;
        Ok(SafetensorsFile { path, source: Arc::new(source), header })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The header entry of tensor `name`.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.header
            .get(name)
            .ok_or_else(|| Error::TensorNotFound { checkpoint: self.path.clone(), tensor: name.to_owned() })
    }

    /// The raw little-endian bytes of tensor `name`, whatever its dtype.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.info(name)?;
        let start = self.header.data_start + info.begin;
        Ok(&self.source.bytes()[start..start + info.byte_len()])
    }

    /// Tensor `name` as a zero-copy view of the mapped file. F32, F16 and BF16 only; the view
    /// may be misaligned for its element type (see [`SafetensorsFile::tensor_aligned`]).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self.info(name)?;
        let dtype = self.loadable_dtype(info)?;
        let source: Arc<dyn ByteSource> = self.source.clone();
        Tensor::from_source(source, self.header.data_start + info.begin, info.byte_len(), dtype, info.shape.clone())
            .map_err(|error| self.tensor_error(name, error))
    }

    /// Tensor `name` with its elements aligned for their type: the zero-copy view when it is
    /// aligned (the usual case), else an owned, aligned copy.
    pub fn tensor_aligned(&self, name: &str) -> Result<Tensor> {
        let view = self.tensor(name)?;
        let bytes = view.cpu_bytes().map_err(|error| self.tensor_error(name, error))?;
        let align = view.dtype().block_bytes();
        if (bytes.as_ptr() as usize).is_multiple_of(align) {
            return Ok(view);
        }
        let storage = CpuStorage::owned(AlignedBytes::copy_from(bytes));
        Tensor::from_storage(storage, view.dtype(), view.shape().clone())
            .map_err(|error| self.tensor_error(name, error))
    }

    /// Tensor `name` converted to an owned `Vec<f32>` (from F32, F16 or BF16), in row-major
    /// order. Works whatever the alignment of the mapped bytes.
    pub fn tensor_f32_vec(&self, name: &str) -> Result<Vec<f32>> {
        self.tensor(name)?.to_f32_vec().map_err(|error| self.tensor_error(name, error))
    }

    fn loadable_dtype(&self, info: &TensorInfo) -> Result<DType> {
        info.dtype.to_dtype().ok_or_else(|| Error::UnsupportedDType {
            path: self.path.clone(),
            tensor: info.name.clone(),
            dtype: info.dtype,
        })
    }

    fn tensor_error(&self, name: &str, error: strata_tensor::Error) -> Error {
        Error::Tensor { path: self.path.clone(), tensor: name.to_owned(), error }
    }
}

impl fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.header.len())
            .field("data_len", &self.header.data_len)
            .finish()
    }
}

/// A Hugging Face checkpoint: one safetensors file, or a sharded set described by
/// `model.safetensors.index.json`, opened and validated as a whole.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    index: Option<PathBuf>,
    files: Vec<SafetensorsFile>,
    /// Tensor name -> index into `files`.
    tensors: BTreeMap<String, usize>,
}

impl Checkpoint {
    /// Opens a checkpoint: a directory holding `model.safetensors` (preferred when both exist,
    /// as transformers does) or `model.safetensors.index.json` plus its shards, or the path of
    /// a single `.safetensors` file. Every file is mapped and its header validated now; for a
    /// sharded checkpoint, every index entry is checked against its shard's header. The files
    /// are memory-mapped: they must not be modified or truncated while the checkpoint (or a
    /// tensor viewing it) is alive.
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref().to_path_buf();
        if path.is_file() {
            return Checkpoint::single(path.clone(), path);
        }
        let single = path.join(SINGLE_FILE);
        if single.is_file() {
            return Checkpoint::single(path, single);
        }
        let index = path.join(INDEX_FILE);
        if index.is_file() {
            return Checkpoint::sharded(path, index);
        }
        if !path.is_dir() {
            let error = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory");
            return Err(Error::Io { path, error });
        }
        Err(Error::NoCheckpoint { dir: path })
    }

    fn single(path: PathBuf, file: PathBuf) -> Result<Checkpoint> {
        let file = SafetensorsFile::open(file)?;
        let tensors = file.header.tensors.keys().map(|k| (k.clone(), 0)).collect();
        Ok(Checkpoint { path, index: None, files: vec![file], tensors })
    }

    fn sharded(dir: PathBuf, index: PathBuf) -> Result<Checkpoint> {
        let weight_map = read_index(&index)?;

        // Open each shard once, in order of first appearance by tensor name.
        let mut shard_ids: HashMap<String, usize> = HashMap::new();
        let mut files = Vec::new();
        let mut tensors = BTreeMap::new();
        for (tensor, shard) in weight_map {
            let id = match shard_ids.get(&shard) {
                Some(&id) => id,
                None => {
                    let shard_path = dir.join(&shard);
                    if !shard_path.is_file() {
                        return Err(Error::MissingShard { index, shard: shard_path, tensor });
                    }
                    files.push(SafetensorsFile::open(&shard_path)?);
                    shard_ids.insert(shard, files.len() - 1);
                    files.len() - 1
                }
            };
            let file: &SafetensorsFile = &files[id];
            if file.header.get(&tensor).is_none() {
                return Err(Error::TensorNotInShard { index, shard: file.path.clone(), tensor });
            }
            tensors.insert(tensor, id);
        }
        Ok(Checkpoint { path: dir, index: Some(index), files, tensors })
    }

    /// The checkpoint's path: its directory, or the single file it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The shard index, for a sharded checkpoint.
    pub fn index_path(&self) -> Option<&Path> {
        self.index.as_deref()
    }

    /// The safetensors files, each opened once.
    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }

    /// The tensor names, sorted. For a sharded checkpoint these are the index's entries.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the checkpoint holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Whether the checkpoint holds tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The file holding tensor `name`.
    pub fn file_of(&self, name: &str) -> Result<&SafetensorsFile> {
        match self.tensors.get(name) {
            Some(&id) => Ok(&self.files[id]),
            None => Err(Error::TensorNotFound { checkpoint: self.path.clone(), tensor: name.to_owned() }),
        }
    }

    /// The header entry (dtype, shape, byte range) of tensor `name`.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.file_of(name)?.info(name)
    }

    /// Tensor `name` as a zero-copy view of its mapped file (F32, F16, BF16). The view may be
    /// misaligned for its element type, in which case [`Tensor::as_f32`] fails on it: use
    /// [`Checkpoint::tensor_aligned`] or [`Checkpoint::tensor_f32_vec`] when that matters.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        self.file_of(name)?.tensor(name)
    }

    /// Tensor `name` with aligned elements: zero-copy when the mapped bytes are aligned (the
    /// usual case: writers pad the header to 8 bytes), else an owned aligned copy.
    pub fn tensor_aligned(&self, name: &str) -> Result<Tensor> {
        self.file_of(name)?.tensor_aligned(name)
    }

    /// Tensor `name` as an owned `Vec<f32>` (converted from F16 or BF16), whatever the
    /// alignment of the mapped bytes.
    pub fn tensor_f32_vec(&self, name: &str) -> Result<Vec<f32>> {
        self.file_of(name)?.tensor_f32_vec(name)
    }
}

/// Reads a shard index's `weight_map`, checking that every shard is a plain file name in the
/// index's directory.
fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read(path).map_err(|error| Error::Io { path: path.to_path_buf(), error })?;
    let invalid = |tensor: Option<&str>, what: String| Error::Index {
        path: path.to_path_buf(),
        tensor: tensor.map(str::to_owned),
        what,
    };
    let value: Value = serde_json::from_slice(&text).map_err(|e| invalid(None, format!("not valid JSON: {e}")))?;
    let Some(map) = value.get("weight_map") else {
        return Err(invalid(None, "missing weight_map".into()));
    };
    let Value::Object(map) = map else {
        return Err(invalid(None, format!("weight_map is {}, expected an object", kind(map))));
    };
    let mut weight_map = BTreeMap::new();
    for (tensor, shard) in map {
        let Value::String(shard) = shard else {
            return Err(invalid(Some(tensor), format!("shard is {}, expected a file name", kind(shard))));
        };
        let mut components = Path::new(shard).components();
        if !matches!((components.next(), components.next()), (Some(Component::Normal(_)), None)) {
            return Err(invalid(
                Some(tensor),
                format!("shard {shard:?} is not a file name in the checkpoint directory"),
            ));
        }
        weight_map.insert(tensor.clone(), shard.clone());
    }
    Ok(weight_map)
}
