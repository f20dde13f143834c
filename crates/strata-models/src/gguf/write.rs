//! GGUF writer: metadata and tensors into a version 3, little-endian GGUF file.
//!
//! The layout is the one [`super::parse_header`] reads and llama.cpp writes: the header (magic,
//! version, counts, metadata, tensor infos), zero padding to the alignment, then each tensor's
//! bytes, each padded to the alignment. Tensors are given in Hugging Face order (a weight of
//! shape `[n, k]`) and written with the GGUF dimensions reversed (`ne = [k, n]`).

use std::io::{self, Write};
use std::path::Path;

use strata_tensor::Tensor;

use super::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GgufError, MAX_DIMS, MetaArray, MetaValue, ggml_type_info};

/// The bytes of one tensor to write: a tensor's own (shared) storage or an owned buffer.
#[derive(Clone, Debug)]
enum Data {
    Tensor(Tensor),
    Raw(Vec<u8>),
}

#[derive(Clone, Debug)]
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: u32,
    data: Data,
}

impl PendingTensor {
    fn bytes(&self) -> &[u8] {
        match &self.data {
            // `add_tensor` checked that the tensor's bytes are on the CPU.
            Data::Tensor(t) => t.cpu_bytes().unwrap_or_default(),
            Data::Raw(v) => v,
        }
    }
}

/// Builds a GGUF file in memory and writes it out.
///
/// ```
/// use strata_models::gguf::{parse_header, write::GgufWriter};
/// use strata_tensor::{DType, Tensor};
///
/// let mut w = GgufWriter::new();
/// w.set_metadata("general.architecture", "llama");
/// let weight = Tensor::from_f32_as(&[0.5; 64], [2, 32], DType::F16).unwrap();
/// w.add_tensor("blk.0.attn_q.weight", &weight).unwrap();
/// let header = parse_header(&w.to_bytes()).unwrap();
/// assert_eq!(header.tensors()[0].dims(), &[32, 2]);
/// assert_eq!(header.metadata().get_str("general.architecture").unwrap(), "llama");
/// ```
#[derive(Clone, Debug)]
pub struct GgufWriter {
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter::new()
    }
}

impl GgufWriter {
    /// An empty file with the default alignment (32).
    pub fn new() -> GgufWriter {
        GgufWriter { alignment: DEFAULT_ALIGNMENT, metadata: Vec::new(), tensors: Vec::new() }
    }

    /// Sets the data-section alignment and records it as `general.alignment` (a `u32`).
    /// `alignment` must be a power of two.
    pub fn set_alignment(&mut self, alignment: u32) -> Result<(), GgufError> {
        if !alignment.is_power_of_two() {
            return Err(GgufError::BadAlignment { path: "<writer>".into(), alignment: alignment.into() });
        }
        self.alignment = alignment.into();
        self.put(ALIGNMENT_KEY.to_owned(), MetaValue::U32(alignment));
        Ok(())
    }

    /// Sets metadata `key` to `value`, replacing an earlier value in place. Set the alignment
    /// with [`GgufWriter::set_alignment`], not here.
    pub fn set_metadata(&mut self, key: impl Into<String>, value: impl Into<MetaValue>) {
        self.put(key.into(), value.into());
    }

    fn put(&mut self, key: String, value: MetaValue) {
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
    }

    /// Adds a tensor in its dtype and shape (Hugging Face order), sharing its bytes until the
    /// file is written.
    pub fn add_tensor(&mut self, name: impl Into<String>, tensor: &Tensor) -> Result<(), GgufError> {
        let name = name.into();
        let bad = |what: String| GgufError::BadTensorInfo { path: "<writer>".into(), tensor: name.clone(), what };
        let dims = tensor.shape().dims();
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(bad(format!("{} dimensions (ggml tensors have 1 to {MAX_DIMS})", dims.len())));
        }
        if let Err(source) = tensor.cpu_bytes() {
            return Err(GgufError::Tensor { path: "<writer>".into(), tensor: name, source });
        }
        self.tensors.push(PendingTensor {
            name,
            dims: dims.iter().rev().map(|&d| d as u64).collect(),
            ggml_type: tensor.dtype().ggml_type(),
            data: Data::Tensor(tensor.clone()),
        });
        Ok(())
    }

    /// Adds a tensor from raw parts: `dims` in GGUF order (innermost first) and any ggml type
    /// id, including ones strata cannot compute with. When ggml defines the type, `data` must be
    /// exactly the tensor's size; for an unknown type id it is written as given.
    pub fn add_raw_tensor(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ggml_type: u32,
        data: Vec<u8>,
    ) -> Result<(), GgufError> {
        let name = name.into();
        let bad = |what: String| GgufError::BadTensorInfo { path: "<writer>".into(), tensor: name.clone(), what };
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(bad(format!("{} dimensions (ggml tensors have 1 to {MAX_DIMS})", dims.len())));
        }
        if let Some((type_name, block_len, block_bytes)) = ggml_type_info(ggml_type) {
            let numel = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let expected = numel.filter(|_| dims[0].is_multiple_of(block_len)).map(|n| n / block_len * block_bytes);
            if expected != Some(data.len() as u64) {
                return Err(bad(format!("{} bytes do not fit {type_name} dimensions {dims:?}", data.len())));
            }
        }
        self.tensors.push(PendingTensor { name, dims: dims.to_vec(), ggml_type, data: Data::Raw(data) });
        Ok(())
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// Writes the file to `out`.
    pub fn write_to(&self, mut out: impl Write) -> io::Result<()> {
        let mut header = Vec::new();
        header.extend_from_slice(&super::GGUF_MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut header, key);
            header.extend_from_slice(&value.value_type().id().to_le_bytes());
            put_value(&mut header, value);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_string(&mut header, &t.name);
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&t.ggml_type.to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + t.bytes().len() as u64).next_multiple_of(self.alignment);
        }
        let padded = (header.len() as u64).next_multiple_of(self.alignment);
        header.resize(padded as usize, 0);
        out.write_all(&header)?;
        let zeros = vec![0u8; self.alignment as usize];
        for t in &self.tensors {
            let bytes = t.bytes();
            out.write_all(bytes)?;
            let pad = (bytes.len() as u64).next_multiple_of(self.alignment) - bytes.len() as u64;
            out.write_all(&zeros[..pad as usize])?;
        }
        out.flush()
    }

    /// Writes the file to `path` through a temporary file in the same directory, renamed into
    /// place once complete, so an interrupted write never leaves a truncated file at `path` (a
    /// special file such as a named pipe is written in place: see [`crate::output`]).
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<(), GgufError> {
        let path = path.as_ref();
        crate::output::write_replacing(path, |out| self.write_to(out))
            .map_err(|source| GgufError::Io { path: path.to_owned(), source })
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &MetaValue) {
    match value {
        MetaValue::U8(v) => out.push(*v),
        MetaValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::Bool(v) => out.push(u8::from(*v)),
        MetaValue::String(s) => put_string(out, s),
        MetaValue::Array(a) => put_array(out, a),
        MetaValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}

fn put_array(out: &mut Vec<u8>, array: &MetaArray) {
    out.extend_from_slice(&array.element_type().id().to_le_bytes());
    out.extend_from_slice(&(array.len() as u64).to_le_bytes());
    macro_rules! fixed {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match array {
        MetaArray::U8(v) => out.extend_from_slice(v),
        MetaArray::I8(v) => fixed!(v),
        MetaArray::U16(v) => fixed!(v),
        MetaArray::I16(v) => fixed!(v),
        MetaArray::U32(v) => fixed!(v),
        MetaArray::I32(v) => fixed!(v),
        MetaArray::F32(v) => fixed!(v),
        MetaArray::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        MetaArray::String(v) => v.iter().for_each(|s| put_string(out, s)),
        MetaArray::Array(v) => v.iter().for_each(|a| put_array(out, a)),
        MetaArray::U64(v) => fixed!(v),
        MetaArray::I64(v) => fixed!(v),
        MetaArray::F64(v) => fixed!(v),
    }
}
