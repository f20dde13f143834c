//! strata's tensor core: element types, shapes, tensors, devices and the CPU backend.
//!
//! This crate sits at the bottom of the workspace and depends on no other strata crate. It
//! defines [`DType`] (f32, f16, bf16 and the GGUF/ggml block-quantized types, bit-identical to
//! ggml so that a GGUF tensor is used in place), [`Shape`], [`Tensor`] with its storage as a
//! closed enum over devices, and [`cpu`]: every operation a decoder model needs, each as a plain
//! scalar reference (`cpu::reference`) and a fast multi-threaded SIMD version with the same
//! signature, which tests compare. [`paged`] is the block bookkeeping that the paged key/value
//! caches of the CPU (strata-models) and of CUDA (strata-kernels) share.
//!
//! The tensor core never does I/O: bytes come from the caller (an owned buffer, or a memory map
//! held by whoever opened the file).
#![warn(missing_docs)]

pub mod cpu;
mod device;
mod dtype;
mod error;
pub mod paged;
pub mod profile;
pub mod quant;
mod shape;
mod storage;
mod tensor;

pub use device::Device;
pub use dtype::DType;
pub use error::{Error, Result};
pub use shape::Shape;
pub use storage::{AlignedBytes, ByteSource, CpuStorage, HUGE_PAGE, Storage, release_pages};
pub use tensor::Tensor;

#[cfg(feature = "cuda")]
pub use storage::CudaStorage;
