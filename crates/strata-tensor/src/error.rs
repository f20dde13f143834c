//! The tensor core's error type.

use crate::{DType, Device, Shape};

/// Everything that can go wrong in the tensor core. Each variant names the operation and the
/// values involved, so a message points at the problem without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operand's shape is not what the operation needs.
    #[error("{op}: shape mismatch: expected {expected}, got {got}")]
    ShapeMismatch {
        /// The operation.
        op: &'static str,
        /// The shape the operation needed.
        expected: Shape,
        /// The shape it was given.
        got: Shape,
    },
    /// A slice's length does not fit the operation's dimensions.
    #[error("{op}: {what} has {got} elements, expected {expected}")]
    LengthMismatch {
        /// The operation.
        op: &'static str,
        /// Which operand.
        what: &'static str,
        /// The length needed.
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// The operation does not support this dtype.
    #[error("{op}: unsupported dtype {dtype}")]
    UnsupportedDType {
        /// The operation.
        op: &'static str,
        /// The dtype it was given.
        dtype: DType,
    },
    /// A row length is not a whole number of quantization blocks.
    #[error("{op}: a row of {len} elements is not a multiple of the {dtype} block length {block}")]
    NotBlockAligned {
        /// The operation.
        op: &'static str,
        /// The dtype.
        dtype: DType,
        /// The row length.
        len: usize,
        /// The dtype's block length.
        block: usize,
    },
    /// A byte buffer's size does not match the dtype and shape it is declared as.
    #[error("{dtype} tensor of shape {shape} needs {expected} bytes, got {got}")]
    ByteLength {
        /// The dtype.
        dtype: DType,
        /// The shape.
        shape: Shape,
        /// The bytes needed.
        expected: usize,
        /// The bytes given.
        got: usize,
    },
    /// The operation needs its operand on another device.
    #[error("{op}: tensor is on {got}, expected {expected}")]
    WrongDevice {
        /// The operation.
        op: &'static str,
        /// The device needed.
        expected: Device,
        /// The device the tensor is on.
        got: Device,
    },
    /// A CUDA device was asked for but this build has no CUDA support.
    #[error("this build of strata was not compiled with CUDA support (rebuild with `--features cuda`)")]
    CudaNotCompiled,
    /// A parameter is out of its valid range.
    #[error("{op}: {msg}")]
    InvalidArgument {
        /// The operation.
        op: &'static str,
        /// What was wrong.
        msg: String,
    },
}

/// The tensor core's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
