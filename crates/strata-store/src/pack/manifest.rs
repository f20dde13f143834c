//! The pack manifest and the layout of units in the data file.
//!
//! [`plan`] turns the caller's units into the manifest's layout (every offset and length, the
//! checksums still zero) before a byte is written, validating every tensor on the way; the
//! writer then fills in the checksums. [`PackManifest::check`] is the inverse guard: a manifest
//! read from disk is only trusted once every offset, length and dtype in it is consistent.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use strata_tensor::DType;

use super::key::SourceKey;
use super::{TENSOR_ALIGN, UNIT_ALIGN, UnitSpec};
use crate::{Error, Result};

/// The manifest format this version of strata writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The manifest of a pack, stored as JSON next to its data file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackManifest {
    /// The manifest format, [`FORMAT_VERSION`] when written by this strata.
    pub format_version: u32,
    /// The source checkpoint the pack was built from.
    pub key: SourceKey,
    /// The units, in file order.
    pub units: Vec<PackUnit>,
    /// The length of the data file in bytes: the end of the last unit's padded range.
    pub data_len: u64,
}

/// One unit of the pack: a contiguous, 4096-byte-aligned range of the data file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackUnit {
    /// The caller's name for the unit, such as `layers.3.attention`.
    pub name: String,
    /// The unit's offset in the data file, a multiple of [`UNIT_ALIGN`].
    pub offset: u64,
    /// The bytes the checksum covers: up to the end of the last tensor. The unit occupies
    /// [`PackUnit::padded_len`] bytes of the file.
    pub len: u64,
    /// The CRC-32 (IEEE) of the unit's first `len` bytes.
    pub crc32: u32,
    /// The unit's tensors, in the caller's order.
    pub tensors: Vec<PackTensor>,
}

/// One tensor inside a unit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackTensor {
    /// The caller's name for the tensor.
    pub name: String,
    /// The stored dtype, as [`DType::name`] spells it.
    pub dtype: String,
    /// The shape.
    pub shape: Vec<usize>,
    /// The offset within the unit, a multiple of [`TENSOR_ALIGN`].
    pub offset: u64,
    /// The length in bytes.
    pub len: u64,
}

impl PackUnit {
    /// The unit's length rounded up to [`UNIT_ALIGN`]: the bytes it occupies in the data file.
    pub fn padded_len(&self) -> u64 {
        self.len.next_multiple_of(UNIT_ALIGN)
    }

    /// The tensor called `name`, if the unit has one.
    pub fn tensor(&self, name: &str) -> Option<&PackTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

impl PackTensor {
    /// The stored dtype. A manifest that passed [`PackManifest::check`] always has one.
    pub fn dtype(&self) -> Option<DType> {
        DType::from_name(&self.dtype)
    }

    /// The tensor's byte range within its unit.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset as usize..(self.offset + self.len) as usize
    }
}

impl PackManifest {
    /// Checks that the layout is consistent: units in order, aligned, not overlapping and inside
    /// `data_len`; tensors aligned, inside their unit, with lengths matching their shapes and
    /// known dtypes; unit names unique. Returns what is wrong, in words.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !self.data_len.is_multiple_of(UNIT_ALIGN) {
            return Err(format!("data_len {} is not a multiple of {UNIT_ALIGN}", self.data_len));
        }
        let mut names = HashSet::new();
        let mut end = 0u64;
        for u in &self.units {
            if !names.insert(u.name.as_str()) {
                return Err(format!("unit name {:?} appears twice", u.name));
            }
            if !u.offset.is_multiple_of(UNIT_ALIGN) || u.offset < end {
                return Err(format!("unit {} at offset {} is misaligned or overlaps the one before", u.name, u.offset));
            }
            end = u.offset.checked_add(u.padded_len()).filter(|&e| e <= self.data_len).ok_or_else(|| {
                format!("unit {} ({} bytes at {}) ends past data_len {}", u.name, u.len, u.offset, self.data_len)
            })?;
            let mut tensor_end = 0u64;
            for t in &u.tensors {
                let dtype =
                    t.dtype().ok_or_else(|| format!("unit {}: tensor {} has dtype {:?}", u.name, t.name, t.dtype))?;
                let expected = numel(&t.shape).and_then(|n| dtype.bytes_for(n));
                if expected.map(|e| e as u64) != Some(t.len) {
                    return Err(format!(
                        "unit {}: tensor {} has {} bytes for shape {:?}",
                        u.name, t.name, t.len, t.shape
                    ));
                }
                if !t.offset.is_multiple_of(TENSOR_ALIGN) || t.offset < tensor_end {
                    return Err(format!(
                        "unit {}: tensor {} at {} is misaligned or overlaps",
                        u.name, t.name, t.offset
                    ));
                }
                tensor_end = t.offset + t.len;
            }
            if tensor_end != u.len {
                return Err(format!("unit {} has len {} but its last tensor ends at {tensor_end}", u.name, u.len));
            }
        }
        if end != self.data_len {
            return Err(format!("the units end at {end} but data_len is {}", self.data_len));
        }
        Ok(())
    }
}

/// The product of a shape's dimensions, or `None` on overflow.
pub(crate) fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// The dtype a tensor is stored as: `convert` for a 2-D tensor whose rows are whole blocks of
/// both its own dtype and `convert`, its own dtype otherwise.
pub fn target_dtype(dtype: DType, shape: &[usize], convert: Option<DType>) -> DType {
    match (convert, shape) {
        (Some(to), &[_, cols]) if cols.is_multiple_of(to.block_len()) && cols.is_multiple_of(dtype.block_len()) => to,
        _ => dtype,
    }
}

/// The layout of `units` with `convert` applied: every unit and tensor placed, checksums zero.
/// Validates every tensor (names unique, data length equal to shape times dtype size).
pub(crate) fn plan(units: &[UnitSpec<'_>], convert: Option<DType>) -> Result<(Vec<PackUnit>, u64)> {
    let mut unit_names = HashSet::new();
    let mut out = Vec::with_capacity(units.len());
    let mut offset = 0u64;
    for u in units {
        if u.name.is_empty() || !unit_names.insert(u.name.as_str()) {
            return Err(Error::DuplicateUnit { unit: u.name.clone() });
        }
        let mut tensor_names = HashSet::new();
        let mut tensors = Vec::with_capacity(u.tensors.len());
        let mut pos = 0u64;
        for t in &u.tensors {
            if t.name.is_empty() || !tensor_names.insert(t.name.as_str()) {
                return Err(Error::DuplicateTensor { unit: u.name.clone(), tensor: t.name.clone() });
            }
            let bad_shape = || Error::BadShape {
                unit: u.name.clone(),
                tensor: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                block: t.dtype.block_len(),
            };
            let n = numel(&t.shape).ok_or_else(bad_shape)?;
            let expected = t.dtype.bytes_for(n).ok_or_else(bad_shape)?;
            if expected != t.data.len() {
                return Err(Error::TensorBytes {
                    unit: u.name.clone(),
                    tensor: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    expected,
                    got: t.data.len(),
                });
            }
            let dtype = target_dtype(t.dtype, &t.shape, convert);
            // The target's size exists: a converted tensor's rows are whole target blocks.
            let len = dtype.bytes_for(n).ok_or_else(bad_shape)? as u64;
            let at = pos.next_multiple_of(TENSOR_ALIGN);
            tensors.push(PackTensor {
                name: t.name.clone(),
                dtype: dtype.name().to_owned(),
                shape: t.shape.clone(),
                offset: at,
                len,
            });
            pos = at + len;
        }
        let unit = PackUnit { name: u.name.clone(), offset, len: pos, crc32: 0, tensors };
        offset += unit.padded_len();
        out.push(unit);
    }
    Ok((out, offset))
}

/// Whether two unit lists have the same layout (names, dtypes, shapes, offsets), checksums aside.
pub(crate) fn same_layout(a: &[PackUnit], b: &[PackUnit]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.name == y.name && x.offset == y.offset && x.len == y.len && x.tensors == y.tensors)
}
