//! GGUF metadata: the value types, values, arrays, and the key/value table with typed getters.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::GgufError;

/// A metadata value type id, as GGUF numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueType {
    /// `uint8` (0).
    U8,
    /// `int8` (1).
    I8,
    /// `uint16` (2).
    U16,
    /// `int16` (3).
    I16,
    /// `uint32` (4).
    U32,
    /// `int32` (5).
    I32,
    /// `float32` (6).
    F32,
    /// `bool` (7): one byte, 0 or 1.
    Bool,
    /// `string` (8): a `u64` byte length and UTF-8 bytes.
    String,
    /// `array` (9): an element type, a `u64` count and the elements.
    Array,
    /// `uint64` (10).
    U64,
    /// `int64` (11).
    I64,
    /// `float64` (12).
    F64,
}

impl ValueType {
    /// Every value type, in id order.
    pub const ALL: [ValueType; 13] = [
        ValueType::U8,
        ValueType::I8,
        ValueType::U16,
        ValueType::I16,
        ValueType::U32,
        ValueType::I32,
        ValueType::F32,
        ValueType::Bool,
        ValueType::String,
        ValueType::Array,
        ValueType::U64,
        ValueType::I64,
        ValueType::F64,
    ];

    /// The type for a GGUF type id.
    pub fn from_id(id: u32) -> Option<ValueType> {
        ValueType::ALL.get(usize::try_from(id).ok()?).copied()
    }

    /// The GGUF type id.
    pub const fn id(self) -> u32 {
        self as u32
    }

    /// A short name (`u32`, `string`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            ValueType::U8 => "u8",
            ValueType::I8 => "i8",
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::F32 => "f32",
            ValueType::Bool => "bool",
            ValueType::String => "string",
            ValueType::Array => "array",
            ValueType::U64 => "u64",
            ValueType::I64 => "i64",
            ValueType::F64 => "f64",
        }
    }

    /// The fewest bytes one value of this type occupies in a file: its width for scalars, the
    /// length prefix for strings, element type and count for arrays.
    pub(super) const fn min_encoded_len(self) -> u64 {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
            ValueType::Array => 12,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `float32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// `string`.
    String(String),
    /// `array` of one element type.
    Array(MetaArray),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float64`.
    F64(f64),
}

impl MetaValue {
    /// The value's type.
    pub fn value_type(&self) -> ValueType {
        match self {
            MetaValue::U8(_) => ValueType::U8,
            MetaValue::I8(_) => ValueType::I8,
            MetaValue::U16(_) => ValueType::U16,
            MetaValue::I16(_) => ValueType::I16,
            MetaValue::U32(_) => ValueType::U32,
            MetaValue::I32(_) => ValueType::I32,
            MetaValue::F32(_) => ValueType::F32,
            MetaValue::Bool(_) => ValueType::Bool,
            MetaValue::String(_) => ValueType::String,
            MetaValue::Array(_) => ValueType::Array,
            MetaValue::U64(_) => ValueType::U64,
            MetaValue::I64(_) => ValueType::I64,
            MetaValue::F64(_) => ValueType::F64,
        }
    }

    /// A description for error messages: `u32 7`, `string`, `array of 3 f32`.
    pub fn describe(&self) -> String {
        match self {
            MetaValue::Array(a) => format!("array of {} {}", a.len(), a.element_type()),
            MetaValue::String(_) => "string".to_owned(),
            MetaValue::Bool(b) => format!("bool {b}"),
            other => match (other.as_i128(), other.as_f64()) {
                (Some(i), _) => format!("{} {i}", other.value_type()),
                (None, Some(x)) => format!("{} {x}", other.value_type()),
                (None, None) => other.value_type().to_string(),
            },
        }
    }

    /// The value of any integer type, widened.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v.into(),
            MetaValue::I8(v) => v.into(),
            MetaValue::U16(v) => v.into(),
            MetaValue::I16(v) => v.into(),
            MetaValue::U32(v) => v.into(),
            MetaValue::I32(v) => v.into(),
            MetaValue::U64(v) => v.into(),
            MetaValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value of a float type, widened.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The array, if this is one.
    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A metadata array: elements of one type, stored unboxed.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaArray {
    /// `uint8` elements.
    U8(Vec<u8>),
    /// `int8` elements.
    I8(Vec<i8>),
    /// `uint16` elements.
    U16(Vec<u16>),
    /// `int16` elements.
    I16(Vec<i16>),
    /// `uint32` elements.
    U32(Vec<u32>),
    /// `int32` elements.
    I32(Vec<i32>),
    /// `float32` elements.
    F32(Vec<f32>),
    /// `bool` elements.
    Bool(Vec<bool>),
    /// `string` elements.
    String(Vec<String>),
    /// Nested arrays (each may have its own element type).
    Array(Vec<MetaArray>),
    /// `uint64` elements.
    U64(Vec<u64>),
    /// `int64` elements.
    I64(Vec<i64>),
    /// `float64` elements.
    F64(Vec<f64>),
}

impl MetaArray {
    /// The element type.
    pub fn element_type(&self) -> ValueType {
        match self {
            MetaArray::U8(_) => ValueType::U8,
            MetaArray::I8(_) => ValueType::I8,
            MetaArray::U16(_) => ValueType::U16,
            MetaArray::I16(_) => ValueType::I16,
            MetaArray::U32(_) => ValueType::U32,
            MetaArray::I32(_) => ValueType::I32,
            MetaArray::F32(_) => ValueType::F32,
            MetaArray::Bool(_) => ValueType::Bool,
            MetaArray::String(_) => ValueType::String,
            MetaArray::Array(_) => ValueType::Array,
            MetaArray::U64(_) => ValueType::U64,
            MetaArray::I64(_) => ValueType::I64,
            MetaArray::F64(_) => ValueType::F64,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
            MetaArray::Array(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements of an integer array, widened, or `None` for other element types.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        fn widen<T: Copy + Into<i64>>(v: &[T]) -> Vec<i64> {
            v.iter().map(|&x| x.into()).collect()
        }
        Some(match self {
            MetaArray::U8(v) => widen(v),
            MetaArray::I8(v) => widen(v),
            MetaArray::U16(v) => widen(v),
            MetaArray::I16(v) => widen(v),
            MetaArray::U32(v) => widen(v),
            MetaArray::I32(v) => widen(v),
            MetaArray::I64(v) => v.clone(),
            MetaArray::U64(v) => v.iter().map(|&x| i64::try_from(x).ok()).collect::<Option<Vec<_>>>()?,
            _ => return None,
        })
    }
}

/// The metadata of a GGUF file: key/value pairs in file order, with lookup by key and typed
/// getters whose errors name the key (and the file).
#[derive(Clone, Debug)]
pub struct Metadata {
    pub(super) path: PathBuf,
    pub(super) entries: Vec<(String, MetaValue)>,
    pub(super) index: HashMap<String, usize>,
}

impl Metadata {
    /// The entries in file order.
    pub fn entries(&self) -> &[(String, MetaValue)] {
        &self.entries
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The file the metadata came from (`<memory>` for [`parse_header`](super::parse_header)).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// The value of `key`, or [`GgufError::MissingKey`].
    pub fn require(&self, key: &str) -> Result<&MetaValue, GgufError> {
        self.get(key).ok_or_else(|| GgufError::MissingKey { path: self.path.clone(), key: key.to_owned() })
    }

    fn wrong_type(&self, key: &str, expected: &'static str, found: &MetaValue) -> GgufError {
        GgufError::WrongType { path: self.path.clone(), key: key.to_owned(), expected, found: found.describe() }
    }

    fn integer<T: TryFrom<i128>>(&self, key: &str, expected: &'static str) -> Result<Option<T>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                v.as_i128().and_then(|i| T::try_from(i).ok()).map(Some).ok_or_else(|| self.wrong_type(key, expected, v))
            }
        }
    }

    fn required<T>(&self, key: &str, value: Result<Option<T>, GgufError>) -> Result<T, GgufError> {
        value?.ok_or_else(|| GgufError::MissingKey { path: self.path.clone(), key: key.to_owned() })
    }

    /// `key` as a `u32`: any integer type whose value fits. `None` when absent; an error naming
    /// the key when it holds something else.
    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>, GgufError> {
        self.integer(key, "an integer that fits in u32")
    }

    /// `key` as a `u64`: any integer type whose value fits.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.integer(key, "an integer that fits in u64")
    }

    /// `key` as an `i64`: any integer type whose value fits.
    pub fn opt_i64(&self, key: &str) -> Result<Option<i64>, GgufError> {
        self.integer(key, "an integer that fits in i64")
    }

    /// `key` as an `f32` (stored as `f32`, or as `f64` and narrowed).
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        Ok(self.opt_f64(key)?.map(|x| x as f32))
    }

    /// `key` as an `f64` (stored as `f32` or `f64`).
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.wrong_type(key, "a float", v)),
        }
    }

    /// `key` as a `bool`.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong_type(key, "a bool", v)),
        }
    }

    /// `key` as a string.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.wrong_type(key, "a string", v)),
        }
    }

    /// `key` as an array of any element type.
    pub fn opt_array(&self, key: &str) -> Result<Option<&MetaArray>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_array().map(Some).ok_or_else(|| self.wrong_type(key, "an array", v)),
        }
    }

    /// `key` as an array of strings.
    pub fn opt_str_array(&self, key: &str) -> Result<Option<&[String]>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(MetaArray::String(v))) => Ok(Some(v)),
            Some(v) => Err(self.wrong_type(key, "an array of strings", v)),
        }
    }

    /// `key` as an array of `f32`.
    pub fn opt_f32_array(&self, key: &str) -> Result<Option<&[f32]>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(MetaArray::F32(v))) => Ok(Some(v)),
            Some(v) => Err(self.wrong_type(key, "an array of f32", v)),
        }
    }

    /// `key` as an array of integers of any integer element type, widened to `i64`.
    pub fn opt_int_array(&self, key: &str) -> Result<Option<Vec<i64>>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_array().and_then(MetaArray::to_i64_vec) {
                Some(ints) => Ok(Some(ints)),
                None => Err(self.wrong_type(key, "an array of integers", v)),
            },
        }
    }

    /// `key` as a `u32`, which must be present.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        self.required(key, self.opt_u32(key))
    }

    /// `key` as a `u64`, which must be present.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.required(key, self.opt_u64(key))
    }

    /// `key` as an `i64`, which must be present.
    pub fn get_i64(&self, key: &str) -> Result<i64, GgufError> {
        self.required(key, self.opt_i64(key))
    }

    /// `key` as an `f32`, which must be present.
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        self.required(key, self.opt_f32(key))
    }

    /// `key` as an `f64`, which must be present.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.required(key, self.opt_f64(key))
    }

    /// `key` as a `bool`, which must be present.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        self.required(key, self.opt_bool(key))
    }

    /// `key` as a string, which must be present.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.required(key, self.opt_str(key))
    }

    /// `key` as an array, which must be present.
    pub fn get_array(&self, key: &str) -> Result<&MetaArray, GgufError> {
        self.required(key, self.opt_array(key))
    }

    /// `key` as an array of strings, which must be present.
    pub fn get_str_array(&self, key: &str) -> Result<&[String], GgufError> {
        self.required(key, self.opt_str_array(key))
    }

    /// `key` as an array of `f32`, which must be present.
    pub fn get_f32_array(&self, key: &str) -> Result<&[f32], GgufError> {
        self.required(key, self.opt_f32_array(key))
    }

    /// `key` as an array of integers, which must be present.
    pub fn get_int_array(&self, key: &str) -> Result<Vec<i64>, GgufError> {
        self.required(key, self.opt_int_array(key))
    }

    /// `general.architecture` (`llama`, `qwen2`, ...).
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }
}

macro_rules! scalar_from {
    ($($t:ty => $variant:ident),* $(,)?) => {$(
        impl From<$t> for MetaValue {
            fn from(v: $t) -> MetaValue {
                MetaValue::$variant(v)
            }
        }
        impl From<Vec<$t>> for MetaArray {
            fn from(v: Vec<$t>) -> MetaArray {
                MetaArray::$variant(v)
            }
        }
        impl From<Vec<$t>> for MetaValue {
            fn from(v: Vec<$t>) -> MetaValue {
                MetaValue::Array(MetaArray::$variant(v))
            }
        }
    )*};
}

scalar_from!(
    u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
    bool => Bool, String => String, u64 => U64, i64 => I64, f64 => F64,
);

impl From<&str> for MetaValue {
    fn from(v: &str) -> MetaValue {
        MetaValue::String(v.to_owned())
    }
}

impl From<Vec<&str>> for MetaValue {
    fn from(v: Vec<&str>) -> MetaValue {
        MetaValue::Array(MetaArray::String(v.into_iter().map(str::to_owned).collect()))
    }
}

impl From<MetaArray> for MetaValue {
    fn from(v: MetaArray) -> MetaValue {
        MetaValue::Array(v)
    }
}

impl From<Vec<MetaArray>> for MetaArray {
    fn from(v: Vec<MetaArray>) -> MetaArray {
        MetaArray::Array(v)
    }
}
