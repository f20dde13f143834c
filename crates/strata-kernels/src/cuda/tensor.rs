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

/// The rows of host tensors `gate` and `up` (one dtype, one shape `[n, k]`, `n` even) in groups of
/// four, gate rows 2j and 2j + 1 then up rows 2j and 2j + 1: the bytes of the `[2n, k]` weight of
/// [`matvec_swiglu`](super::ops::matvec_swiglu) and [`linear_swiglu`](super::ops::linear_swiglu).
/// Rows are copied as they are (quantized blocks included).
pub fn pair_rows(gate: &Tensor, up: &Tensor) -> Result<Vec<u8>> {
    const OP: &str = "pair_rows";
    if gate.dtype() != up.dtype() || gate.shape() != up.shape() {
        return Err(Error::invalid(
            OP,
            format!("gate {} {} and up {} {} differ", gate.dtype(), gate.shape(), up.dtype(), up.shape()),
        ));
    }
    let n = match gate.shape().dims() {
        &[n, _] if n % 2 == 0 => n,
        _ => return Err(Error::invalid(OP, format!("gate and up are {}, not [n, k] with n even", gate.shape()))),
    };
    fn host(t: &Tensor) -> Result<&[u8]> {
        t.cpu_bytes().map_err(|e| Error::invalid(OP, e.to_string()))
    }
    let (g, u, rb) = (host(gate)?, host(up)?, gate.row_bytes());
    let mut out = Vec::with_capacity(g.len() + u.len());
    for j in (0..n).step_by(2) {
        out.extend_from_slice(&g[j * rb..(j + 2) * rb]);
        out.extend_from_slice(&u[j * rb..(j + 2) * rb]);
    }
    Ok(out)
}

/// A device tensor of `gate` and `up`'s rows paired as [`pair_rows`] pairs them: `[2n, k]`, their
/// dtype.
pub fn upload_paired(cuda: &Cuda, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let bytes = pair_rows(gate, up)?;
    let buffer = cuda.upload(&bytes)?;
    let storage = CudaStorage { ordinal: cuda.ordinal(), buffer: Arc::new(buffer), len: bytes.len() };
    let dims = gate.shape().dims();
    Tensor::from_cuda_storage(storage, gate.dtype(), [2 * dims[0], dims[1]])
        .map_err(|e| Error::invalid("upload_paired", e.to_string()))
}

/// A device tensor of the rows of host tensors `parts` one after the other (one dtype and one
/// column count; q, k and v's weights as one `[n_q + n_k + n_v, k]` projection), rows copied as
/// they are.
pub fn upload_stacked(cuda: &Cuda, parts: &[&Tensor]) -> Result<Tensor> {
    const OP: &str = "upload_stacked";
    let first = parts.first().ok_or_else(|| Error::invalid(OP, "no tensors to stack"))?;
    let cols = |t: &Tensor| match t.shape().dims() {
        &[_, k] => Some(k),
        _ => None,
    };
    let mut bytes = Vec::new();
    let mut rows = 0;
    for t in parts {
        if t.dtype() != first.dtype() || cols(t).is_none() || cols(t) != cols(first) {
            return Err(Error::invalid(
                OP,
                format!("{} {} does not stack under {} {}", t.dtype(), t.shape(), first.dtype(), first.shape()),
            ));
        }
        bytes.extend_from_slice(t.cpu_bytes().map_err(|e| Error::invalid(OP, e.to_string()))?);
        rows += t.shape().dims()[0];
    }
    let buffer = cuda.upload(&bytes)?;
    let storage = CudaStorage { ordinal: cuda.ordinal(), buffer: Arc::new(buffer), len: bytes.len() };
    let k = cols(first).expect("checked above");
    Tensor::from_cuda_storage(storage, first.dtype(), [rows, k]).map_err(|e| Error::invalid(OP, e.to_string()))
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

#[cfg(test)]
mod tests {
    use strata_tensor::DType;

    use super::*;

    #[test]
    fn pair_rows_puts_two_gate_rows_then_two_up_rows() {
        for dtype in [DType::F32, DType::Q4K] {
            let k = 256;
            let rows = |base: f32| -> Vec<f32> { (0..4 * k).map(|i| base + (i / k) as f32).collect() };
            let gate = Tensor::from_f32_as(&rows(10.0), [4, k], dtype).unwrap();
            let up = Tensor::from_f32_as(&rows(20.0), [4, k], dtype).unwrap();
            let paired = pair_rows(&gate, &up).unwrap();
            let rb = gate.row_bytes();
            let row = |t: &Tensor, i: usize| t.cpu_bytes().unwrap()[i * rb..(i + 1) * rb].to_vec();
            let want: Vec<u8> = [row(&gate, 0), row(&gate, 1), row(&up, 0), row(&up, 1)]
                .into_iter()
                .chain([row(&gate, 2), row(&gate, 3), row(&up, 2), row(&up, 3)])
                .flatten()
                .collect();
            assert_eq!(paired, want, "{dtype}");
        }
        let gate = Tensor::from_f32(&[0.0; 6], [3, 2]).unwrap();
        let err = pair_rows(&gate, &gate).unwrap_err().to_string();
        assert!(err.contains("n even"), "{err}");
        let up = Tensor::from_f32(&[0.0; 8], [4, 2]).unwrap();
        let err = pair_rows(&up, &Tensor::from_f32(&[0.0; 8], [2, 4]).unwrap()).unwrap_err().to_string();
        assert!(err.contains("differ"), "{err}");
    }
}
