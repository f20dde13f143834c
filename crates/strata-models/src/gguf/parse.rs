//! The GGUF header parser: a bounds-checked little-endian cursor over the whole file.

use std::collections::HashMap;
use std::path::Path;

use super::metadata::{MetaArray, MetaValue, Metadata, ValueType};
use super::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, GgufError, GgufHeader, MAX_ARRAY_DEPTH, MAX_DIMS, TensorInfo,
    ggml_type_info,
};

/// A little-endian cursor over the file's bytes that checks every read against the end.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn truncated(&self, what: String, needed: u64) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_owned(),
            offset: self.pos as u64,
            what,
            needed,
            available: self.remaining(),
        }
    }

    /// The next `n` bytes; `what` describes them for the error when they run past the end.
    fn take(&mut self, n: u64, what: impl FnOnce() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.truncated(what(), n));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: impl FnOnce() -> String) -> Result<[u8; N], GgufError> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A count of items of at least `min_len` bytes each, rejected when the rest of the file
    /// could not hold that many.
    fn count(&mut self, min_len: u64, what: impl Fn() -> String) -> Result<usize, GgufError> {
        let offset = self.pos as u64;
        let count = self.u64(|| format!("the count of {}", what()))?;
        let fits = count.checked_mul(min_len).is_some_and(|needed| needed <= self.remaining());
        if !fits {
            return Err(GgufError::CountPastEof {
                path: self.path.to_owned(),
                offset,
                what: what(),
                count,
                available: self.remaining(),
            });
        }
        // The count fits in the remaining bytes (min_len >= 1), hence in usize.
        Ok(count as usize)
    }

    fn string(&mut self, what: impl Fn() -> String) -> Result<String, GgufError> {
        let len = self.u64(|| format!("the length of {}", what()))?;
        let offset = self.pos as u64;
        let bytes = self.take(len, &what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::InvalidUtf8 {
            path: self.path.to_owned(),
            offset,
            what: what(),
        })
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<MetaValue, GgufError> {
        let what = || format!("the value of metadata key {key:?}");
        Ok(match ty {
            ValueType::U8 => MetaValue::U8(u8::from_le_bytes(self.array(what)?)),
            ValueType::I8 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            ValueType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => MetaValue::U32(u32::from_le_bytes(self.array(what)?)),
            ValueType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => MetaValue::U64(u64::from_le_bytes(self.array(what)?)),
            ValueType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => {
                let offset = self.pos as u64;
                let [b] = self.array(what)?;
                MetaValue::Bool(self.bool(b, offset, key)?)
            }
            ValueType::String => MetaValue::String(self.string(|| format!("the string value of {key:?}"))?),
            ValueType::Array => MetaValue::Array(self.meta_array(key, depth + 1)?),
        })
    }

    fn bool(&self, b: u8, offset: u64, key: &str) -> Result<bool, GgufError> {
        match b {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(GgufError::InvalidBool { path: self.path.to_owned(), offset, key: key.to_owned(), value }),
        }
    }

    fn value_type(&mut self, key: &str) -> Result<ValueType, GgufError> {
        let offset = self.pos as u64;
        let type_id = self.u32(|| format!("the value type of metadata key {key:?}"))?;
        ValueType::from_id(type_id).ok_or_else(|| GgufError::UnknownValueType {
            path: self.path.to_owned(),
            offset,
            key: key.to_owned(),
            type_id,
        })
    }

    /// An array at nesting `depth` (1 for a top-level value).
    fn meta_array(&mut self, key: &str, depth: usize) -> Result<MetaArray, GgufError> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(GgufError::ArrayTooDeep {
                path: self.path.to_owned(),
                offset: self.pos as u64,
                key: key.to_owned(),
            });
        }
        let ty = self.value_type(key)?;
        let n = self.count(ty.min_encoded_len(), || format!("array elements ({ty}) of metadata key {key:?}"))?;
        let what = || format!("the {ty} elements of metadata key {key:?}");
        // Fixed-width elements: the count was checked against the remaining bytes, so `take`
        // succeeds and the vector holds no more elements than the file has bytes.
        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                let raw = self.take((n * size_of::<$t>()) as u64, what)?;
                MetaArray::$variant(
                    raw.chunks_exact(size_of::<$t>()).map(|c| <$t>::from_le_bytes(c.try_into().unwrap())).collect(),
                )
            }};
        }
        Ok(match ty {
            ValueType::U8 => MetaArray::U8(self.take(n as u64, what)?.to_vec()),
            ValueType::I8 => fixed!(I8, i8),
            ValueType::U16 => fixed!(U16, u16),
            ValueType::I16 => fixed!(I16, i16),
            ValueType::U32 => fixed!(U32, u32),
            ValueType::I32 => fixed!(I32, i32),
            ValueType::F32 => fixed!(F32, f32),
            ValueType::U64 => fixed!(U64, u64),
            ValueType::I64 => fixed!(I64, i64),
            ValueType::F64 => fixed!(F64, f64),
            ValueType::Bool => {
                let offset = self.pos as u64;
                let raw = self.take(n as u64, what)?;
                let mut out = Vec::with_capacity(n);
                for (i, &b) in raw.iter().enumerate() {
                    out.push(self.bool(b, offset + i as u64, key)?);
                }
                MetaArray::Bool(out)
            }
            ValueType::String => {
                let mut out = Vec::with_capacity(n);
                for i in 0..n {
                    out.push(self.string(|| format!("string {i} of metadata key {key:?}"))?);
                }
                MetaArray::String(out)
            }
            ValueType::Array => {
                let mut out = Vec::with_capacity(n);
                for _ in 0..n {
                    out.push(self.meta_array(key, depth + 1)?);
                }
                MetaArray::Array(out)
            }
        })
    }
}

/// The fewest bytes a metadata entry occupies: key length, value type, a one-byte value.
const MIN_KV_LEN: u64 = 8 + 4 + 1;
/// The fewest bytes a tensor info occupies: name length, dimension count, one dimension, type,
/// offset.
const MIN_TENSOR_INFO_LEN: u64 = 8 + 4 + 8 + 4 + 8;

pub(super) fn parse(bytes: &[u8], path: &Path) -> Result<GgufHeader, GgufError> {
    let mut cur = Cursor { bytes, pos: 0, path };
    let magic: [u8; 4] = cur.array(|| "the magic".to_owned())?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic { path: path.to_owned(), found: magic });
    }
    let version = cur.u32(|| "the version".to_owned())?;
    match version {
        2 | 3 => {}
        v if matches!(v.swap_bytes(), 1..=3) => {
            return Err(GgufError::BigEndian { path: path.to_owned(), version: v.swap_bytes() });
        }
        v => return Err(GgufError::UnsupportedVersion { path: path.to_owned(), version: v }),
    }
    let tensor_count_offset = cur.pos as u64;
    let tensor_count = cur.u64(|| "the tensor count".to_owned())?;
    let kv_count = cur.count(MIN_KV_LEN, || "metadata entries".to_owned())?;
    // A first, cheap check of the tensor count against everything after the counts; the
    // precise one follows the metadata.
    check_tensor_count(&cur, tensor_count, tensor_count_offset)?;

    let mut entries = Vec::with_capacity(kv_count);
    let mut index = HashMap::with_capacity(kv_count);
    for i in 0..kv_count {
        let key = cur.string(|| format!("the key of metadata entry {i}"))?;
        let ty = cur.value_type(&key)?;
        let value = cur.value(ty, &key, 0)?;
        if index.insert(key.clone(), entries.len()).is_some() {
            return Err(GgufError::DuplicateKey { path: path.to_owned(), key });
        }
        entries.push((key, value));
    }
    let metadata = Metadata { path: path.to_owned(), entries, index };

    let alignment = match metadata.opt_u32(ALIGNMENT_KEY)? {
        None => DEFAULT_ALIGNMENT,
        Some(a) if a.is_power_of_two() => a.into(),
        Some(a) => return Err(GgufError::BadAlignment { path: path.to_owned(), alignment: a.into() }),
    };

    check_tensor_count(&cur, tensor_count, tensor_count_offset)?;
    let tensor_count = tensor_count as usize;
    let mut tensors = Vec::with_capacity(tensor_count);
    let mut tensor_index = HashMap::with_capacity(tensor_count);
    for i in 0..tensor_count {
        let info = tensor_info(&mut cur, i)?;
        if tensor_index.insert(info.name.clone(), tensors.len()).is_some() {
            return Err(GgufError::DuplicateTensor { path: path.to_owned(), tensor: info.name });
        }
        tensors.push(info);
    }

    let data_offset = (cur.pos as u64).next_multiple_of(alignment);
    check_tensor_ranges(&tensors, data_offset, alignment, bytes.len() as u64, path)?;
    Ok(GgufHeader { version, metadata, tensors, tensor_index, alignment, data_offset })
}

fn check_tensor_count(cur: &Cursor<'_>, count: u64, offset: u64) -> Result<(), GgufError> {
    let fits = count.checked_mul(MIN_TENSOR_INFO_LEN).is_some_and(|needed| needed <= cur.remaining());
    if fits {
        Ok(())
    } else {
        Err(GgufError::CountPastEof {
            path: cur.path.to_owned(),
            offset,
            what: "tensor infos".to_owned(),
            count,
            available: cur.remaining(),
        })
    }
}

fn tensor_info(cur: &mut Cursor<'_>, i: usize) -> Result<TensorInfo, GgufError> {
    let name = cur.string(|| format!("the name of tensor {i}"))?;
    let bad = |what: String| GgufError::BadTensorInfo { path: cur.path.to_owned(), tensor: name.clone(), what };
    let n_dims = cur.u32(|| format!("the dimension count of tensor {name:?}"))?;
    if n_dims == 0 || n_dims as usize > MAX_DIMS {
        return Err(bad(format!("{n_dims} dimensions (ggml tensors have 1 to {MAX_DIMS})")));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for d in 0..n_dims {
        dims.push(cur.u64(|| format!("dimension {d} of tensor {name:?}"))?);
    }
    let ggml_type = cur.u32(|| format!("the type of tensor {name:?}"))?;
    let offset = cur.u64(|| format!("the offset of tensor {name:?}"))?;

    // ggml holds element counts in i64; anything larger cannot be a real tensor. Zero
    // dimensions count as one here, so that no partial product of the dimensions, in any order
    // (a row count, say), overflows either.
    let nonzero_product = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d.max(1)))
        .filter(|&n| n <= i64::MAX as u64 && usize::try_from(n).is_ok())
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow the element count")))?;
    let numel: u64 = dims.iter().product();
    let byte_len = match ggml_type_info(ggml_type) {
        None => None,
        Some((type_name, block_len, block_bytes)) => {
            if !dims[0].is_multiple_of(block_len) {
                return Err(bad(format!(
                    "innermost dimension {} is not a multiple of the {type_name} block length {block_len}",
                    dims[0]
                )));
            }
            // The same bound in bytes: no row size, or product of row sizes, overflows later.
            nonzero_product
                .div_ceil(block_len)
                .checked_mul(block_bytes)
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| bad(format!("dimensions {dims:?} overflow the byte size")))?;
            Some(numel / block_len * block_bytes)
        }
    };
    Ok(TensorInfo { name, dims, ggml_type, offset, byte_len })
}

fn check_tensor_ranges(
    tensors: &[TensorInfo],
    data_offset: u64,
    alignment: u64,
    file_len: u64,
    path: &Path,
) -> Result<(), GgufError> {
    let mut ranges = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        if !t.offset.is_multiple_of(alignment) {
            return Err(GgufError::MisalignedTensor {
                path: path.to_owned(),
                tensor: t.name.clone(),
                offset: t.offset,
                alignment,
            });
        }
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.byte_len.unwrap_or(0)));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => {
                if end > start {
                    ranges.push((start, end, i));
                }
            }
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    path: path.to_owned(),
                    tensor: t.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_len,
                });
            }
        }
    }
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        let ((_, end_a, a), (start_b, _, b)) = (pair[0], pair[1]);
        if end_a > start_b {
            return Err(GgufError::TensorOverlap {
                path: path.to_owned(),
                tensor: tensors[a].name.clone(),
                other: tensors[b].name.clone(),
            });
        }
    }
    Ok(())
}
