//! Tensors in device memory: uploading a host [`Tensor`] (any dtype, blocks as they are) and
//! reaching the device buffer behind a CUDA tensor.

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use strata_tensor::{CudaStorage, Storage, Tensor};

use crate::{Error, Result};

use super::Cuda;

/// A copy of host tensor `t` in device memory, same dtype and shape (quantized blocks are copied
/// as they are; the kernels read them in place).
pub fn upload_tensor(cuda: &Cuda, t: &Tensor) -> Result<Tensor> {
    let bytes = t.cpu_bytes().map_err(|e| Error::invalid("upload_tensor", e.to_string()))?;
    let buffer = cuda.upload(bytes)?;
    let storage = CudaStorage { ordinal: cuda.ordinal(), buffer: Arc::new(buffer), len: bytes.len() };
    Tensor::from_cuda_storage(storage, t.dtype(), t.shape().clone())
        .map_err(|e| Error::invalid("upload_tensor", e.to_string()))
}

/// The device bytes of a CUDA tensor.
pub fn device_bytes(t: &Tensor) -> Result<&CudaSlice<u8>> {
    match t.storage() {
        Storage::Cuda(c) => c
            .buffer
            .downcast_ref::<CudaSlice<u8>>()
            .ok_or_else(|| Error::invalid("device_bytes", "CUDA storage not allocated by strata-kernels")),
        Storage::Cpu(_) => Err(Error::invalid("device_bytes", "the tensor is in host memory")),
    }
}
