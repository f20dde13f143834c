//! [`Tensor`]: a dtype, a shape and storage on some device.

use std::sync::Arc;

use crate::{AlignedBytes, ByteSource, CpuStorage, DType, Device, Error, Result, Shape, Storage, quant};

/// A contiguous row-major tensor. Cloning is cheap: the bytes are shared.
///
/// Block-quantized tensors are stored row by row, each row a whole number of blocks, so the
/// innermost dimension must be a multiple of the dtype's block length.
#[derive(Clone, Debug)]
pub struct Tensor {
    storage: Storage,
    shape: Shape,
    dtype: DType,
}

impl Tensor {
    /// A tensor over existing CPU storage, checking that its length fits `dtype` and `shape`.
    pub fn from_storage(storage: CpuStorage, dtype: DType, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        let expected = row_bytes_checked("Tensor::from_storage", dtype, shape.last_dim())? * shape.rows();
        let got = storage.bytes().len();
        if got != expected {
            return Err(Error::ByteLength { dtype, shape, expected, got });
        }
        Ok(Tensor { storage: Storage::Cpu(storage), shape, dtype })
    }

    /// A tensor over CUDA device storage (allocated by `strata-kernels`), checking that its
    /// length fits `dtype` and `shape`.
    #[cfg(feature = "cuda")]
    pub fn from_cuda_storage(storage: crate::CudaStorage, dtype: DType, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        let expected = row_bytes_checked("Tensor::from_cuda_storage", dtype, shape.last_dim())? * shape.rows();
        if storage.len != expected {
            return Err(Error::ByteLength { dtype, shape, expected, got: storage.len });
        }
        Ok(Tensor { storage: Storage::Cuda(storage), shape, dtype })
    }

    /// A zero-copy tensor over `len` bytes at `offset` of `source` (a memory map, say).
    pub fn from_source(
        source: Arc<dyn ByteSource>,
        offset: usize,
        len: usize,
        dtype: DType,
        shape: impl Into<Shape>,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let available = source.bytes().len();
        let storage = CpuStorage::view(source, offset, len).ok_or_else(|| Error::InvalidArgument {
            op: "Tensor::from_source",
            msg: format!(
                "byte range {offset}..{} is outside a source of {available} bytes",
                offset.saturating_add(len)
            ),
        })?;
        Tensor::from_storage(storage, dtype, shape)
    }

    /// An f32 tensor holding a copy of `data`.
    pub fn from_f32(data: &[f32], shape: impl Into<Shape>) -> Result<Tensor> {
        Tensor::from_storage(CpuStorage::owned(AlignedBytes::copy_from(bytemuck::cast_slice(data))), DType::F32, shape)
    }

    /// A tensor of `dtype` holding `data` converted (floats) or quantized (block types) row by row.
    pub fn from_f32_as(data: &[f32], shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
        let shape = shape.into();
        if data.len() != shape.numel() {
            return Err(Error::LengthMismatch {
                op: "Tensor::from_f32_as",
                what: "data",
                expected: shape.numel(),
                got: data.len(),
            });
        }
        let cols = shape.last_dim();
        let row_bytes = row_bytes_checked("Tensor::from_f32_as", dtype, cols)?;
        let mut bytes = AlignedBytes::zeroed(row_bytes * shape.rows());
        if cols > 0 {
            for (src, dst) in data.chunks_exact(cols).zip(bytes.as_mut_slice().chunks_exact_mut(row_bytes)) {
                quant::quantize_row(dtype, src, dst)?;
            }
        }
        Tensor::from_storage(CpuStorage::owned(bytes), dtype, shape)
    }

    /// A tensor of zero bytes (zeros for every dtype).
    pub fn zeros(shape: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
        let shape = shape.into();
        let row_bytes = row_bytes_checked("Tensor::zeros", dtype, shape.last_dim())?;
        Tensor::from_storage(CpuStorage::owned(AlignedBytes::zeroed(row_bytes * shape.rows())), dtype, shape)
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device holding the bytes.
    pub fn device(&self) -> Device {
        self.storage.device()
    }

    /// The storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    /// The size in bytes.
    pub fn byte_len(&self) -> usize {
        self.storage.len()
    }

    /// Bytes per row (the innermost dimension).
    pub fn row_bytes(&self) -> usize {
        self.dtype.bytes_for(self.shape.last_dim()).expect("checked at construction")
    }

    /// The bytes, for a tensor in host memory.
    pub fn cpu_bytes(&self) -> Result<&[u8]> {
        match &self.storage {
            Storage::Cpu(c) => Ok(c.bytes()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => {
                Err(Error::WrongDevice { op: "Tensor::cpu_bytes", expected: Device::Cpu, got: self.device() })
            }
        }
    }

    /// The bytes of row `i` (of the tensor viewed as `[rows, last_dim]`).
    pub fn row(&self, i: usize) -> Result<&[u8]> {
        let rows = self.shape.rows();
        if i >= rows {
            return Err(Error::InvalidArgument {
                op: "Tensor::row",
                msg: format!("row {i} out of range for shape {}", self.shape),
            });
        }
        let rb = self.row_bytes();
        Ok(&self.cpu_bytes()?[i * rb..(i + 1) * rb])
    }

    /// The elements of an f32 tensor in host memory, without a copy.
    pub fn as_f32(&self) -> Result<&[f32]> {
        if self.dtype != DType::F32 {
            return Err(Error::UnsupportedDType { op: "Tensor::as_f32", dtype: self.dtype });
        }
        bytemuck::try_cast_slice(self.cpu_bytes()?).map_err(|e| Error::InvalidArgument {
            op: "Tensor::as_f32",
            msg: format!("f32 bytes not viewable in place: {e}"),
        })
    }

    /// All elements as f32 (converted or dequantized).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let cols = self.shape.last_dim();
        let mut out = vec![0f32; self.numel()];
        if cols == 0 {
            return Ok(out);
        }
        let rb = self.row_bytes();
        for (src, dst) in self.cpu_bytes()?.chunks_exact(rb).zip(out.chunks_exact_mut(cols)) {
            quant::dequantize_row(self.dtype, src, dst)?;
        }
        Ok(out)
    }

    /// A copy converted to `dtype` (through f32).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        Tensor::from_f32_as(&self.to_f32_vec()?, self.shape.clone(), dtype)
    }

    /// The same bytes seen with another shape of the same element count and row alignment.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.numel() != self.numel() {
            return Err(Error::ShapeMismatch { op: "Tensor::reshape", expected: self.shape.clone(), got: shape });
        }
        row_bytes_checked("Tensor::reshape", self.dtype, shape.last_dim())?;
        Ok(Tensor { storage: self.storage.clone(), shape, dtype: self.dtype })
    }
}

fn row_bytes_checked(op: &'static str, dtype: DType, cols: usize) -> Result<usize> {
    dtype.bytes_for(cols).ok_or(Error::NotBlockAligned { op, dtype, len: cols, block: dtype.block_len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip_and_views() {
        let data: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let t = Tensor::from_f32(&data, [3, 4]).unwrap();
        assert_eq!(t.as_f32().unwrap(), &data[..]);
        assert_eq!(t.row(1).unwrap(), bytemuck::cast_slice::<f32, u8>(&data[4..8]));
        assert!(t.row(3).is_err());
        let r = t.reshape([4, 3]).unwrap();
        assert_eq!(r.to_f32_vec().unwrap(), data);
        assert!(t.reshape([5, 3]).is_err());
    }

    #[test]
    fn length_is_checked() {
        let src: Arc<dyn ByteSource> = Arc::new(vec![0u8; 100]);
        assert!(Tensor::from_source(src.clone(), 0, 68, DType::Q8_0, [2, 32]).is_ok());
        assert!(matches!(Tensor::from_source(src.clone(), 0, 67, DType::Q8_0, [2, 32]), Err(Error::ByteLength { .. })));
        assert!(matches!(
            Tensor::from_source(src.clone(), 0, 34, DType::Q8_0, [1, 31]),
            Err(Error::NotBlockAligned { .. })
        ));
        assert!(Tensor::from_source(src, 90, 34, DType::Q8_0, [1, 32]).is_err());
    }

    #[test]
    fn half_conversions() {
        let data = [1.0f32, -2.5, 0.125, 65504.0];
        for dtype in [DType::F16, DType::BF16] {
            let t = Tensor::from_f32_as(&data, [4], dtype).unwrap();
            assert_eq!(t.byte_len(), 8);
            assert_eq!(t.to_f32_vec().unwrap()[..3], data[..3]);
        }
    }
}
