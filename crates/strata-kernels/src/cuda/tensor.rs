//! Tensors in device memory: uploading a host [`Tensor`] (any dtype, blocks as they are) and
//! reaching the device buffer behind a CUDA tensor.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaView};
use strata_tensor::{CudaStorage, DType, Shape, Storage, Tensor};

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

/// A device tensor of `dtype` and shape `dims` holding `bytes` (its whole storage, blocks as they
/// are), in a buffer of its own.
pub fn upload_bytes(cuda: &Cuda, bytes: &[u8], dtype: DType, dims: &[usize]) -> Result<Tensor> {
    let buffer = cuda.upload(bytes)?;
    let storage = CudaStorage { ordinal: cuda.ordinal(), buffer: Arc::new(buffer), len: bytes.len() };
    Tensor::from_cuda_storage(storage, dtype, dims.to_vec()).map_err(|e| Error::invalid("upload_bytes", e.to_string()))
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
    let (bytes, dtype, dims) = stack_rows(parts)?;
    let buffer = cuda.upload(&bytes)?;
    let storage = CudaStorage { ordinal: cuda.ordinal(), buffer: Arc::new(buffer), len: bytes.len() };
    Tensor::from_cuda_storage(storage, dtype, dims).map_err(|e| Error::invalid("upload_stacked", e.to_string()))
}

/// The bytes of host tensors `parts`' rows one after the other (one dtype and one column count),
/// with the dtype and the `[rows, k]` shape of the stacked weight [`upload_stacked`] uploads.
pub fn stack_rows(parts: &[&Tensor]) -> Result<(Vec<u8>, DType, [usize; 2])> {
    const OP: &str = "stack_rows";
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
    let k = cols(first).expect("checked above");
    Ok((bytes, first.dtype(), [rows, k]))
}

/// A tensor's bytes at an offset inside a larger device buffer that others share (a streamed
/// layer's weights in the buffer it is uploaded into before each pass): what
/// [`region_tensor`] puts in a tensor's storage.
struct DeviceRegion {
    buffer: Arc<CudaSlice<u8>>,
    offset: usize,
}

/// A device tensor of `dtype` and shape `dims` whose bytes are `buffer`'s from `offset` on (a
/// multiple of 16): it allocates and copies nothing, and reads whatever the buffer holds when a
/// kernel runs. The buffer must hold the tensor's bytes.
pub fn region_tensor(
    cuda: &Cuda,
    buffer: &Arc<CudaSlice<u8>>,
    offset: usize,
    dtype: DType,
    dims: &[usize],
) -> Result<Tensor> {
    const OP: &str = "region_tensor";
    let shape = Shape::new(dims.to_vec());
    let len = dtype
        .bytes_for(shape.last_dim())
        .and_then(|row| row.checked_mul(shape.rows()))
        .ok_or_else(|| Error::invalid(OP, format!("{dtype} {shape} has no whole byte length")))?;
    if !offset.is_multiple_of(16) || offset.checked_add(len).is_none_or(|end| end > buffer.len()) {
        return Err(Error::invalid(
            OP,
            format!("{len} bytes at offset {offset} of a {}-byte buffer (offsets are multiples of 16)", buffer.len()),
        ));
    }
    let region = DeviceRegion { buffer: Arc::clone(buffer), offset };
    let storage = CudaStorage { ordinal: cuda.ordinal(), buffer: Arc::new(region), len };
    Tensor::from_cuda_storage(storage, dtype, shape).map_err(|e| Error::invalid(OP, e.to_string()))
}

/// The device bytes of a CUDA tensor: its own buffer, or its region of a shared one
/// ([`region_tensor`]).
pub fn device_bytes(t: &Tensor) -> Result<CudaView<'_, u8>> {
    const OP: &str = "device_bytes";
    match t.storage() {
        Storage::Cuda(c) => {
            if let Some(buffer) = c.buffer.downcast_ref::<CudaSlice<u8>>() {
                return Ok(buffer.slice(..c.len.min(buffer.len())));
            }
            match c.buffer.downcast_ref::<DeviceRegion>() {
                Some(r) => Ok(r.buffer.slice(r.offset..r.offset + c.len)),
                None => Err(Error::invalid(OP, "CUDA storage not allocated by strata-kernels")),
            }
        }
        Storage::Cpu(_) => Err(Error::invalid(OP, "the tensor is in host memory")),
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
