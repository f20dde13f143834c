//! Dequantization and embedding gather (`kernels/convert.cu`): rows of a device weight tensor of
//! any dtype decoded to f32, bit-identical to the CPU's `Tensor::to_f32_vec`.

use cudarc::driver::{CudaView, DevicePtr, DevicePtrMut, LaunchConfig};
use strata_tensor::{DType, Storage, Tensor};

use crate::cuda::params::ConvertParams;
use crate::cuda::tensor::device_bytes;
use crate::cuda::{Cuda, check_len, ptr, ptr_mut};
use crate::{Error, Result};

/// A device weight tensor seen as `[n, k]`: its shape and its bytes, after checking that it is
/// 2-D, lives on `cuda`'s device, and starts on a 16-byte boundary (the kernels' wide loads rely
/// on it; `upload_tensor` allocations always do).
pub(crate) fn device_matrix<'a>(op: &str, cuda: &Cuda, w: &'a Tensor) -> Result<(usize, usize, CudaView<'a, u8>)> {
    let dims = w.shape().dims();
    if dims.len() != 2 {
        return Err(Error::invalid(op, format!("the weight must be 2-D [n, k], got shape {}", w.shape())));
    }
    match w.storage() {
        Storage::Cuda(s) if s.ordinal == cuda.ordinal() => {}
        Storage::Cuda(s) => {
            return Err(Error::invalid(
                op,
                format!("the weight is on cuda:{}, the launch on cuda:{}", s.ordinal, cuda.ordinal()),
            ));
        }
        Storage::Cpu(_) => {
            return Err(Error::invalid(op, "the weight is in host memory: upload it with upload_tensor first"));
        }
    }
    let bytes = device_bytes(w)?;
    check_len(op, "the weight's device buffer", bytes.len(), w.byte_len())?;
    if ptr(cuda, &bytes) % 16 != 0 {
        return Err(Error::invalid(op, "the weight's device buffer is not 16-byte aligned"));
    }
    Ok((dims[0], dims[1], bytes))
}

/// The kernel of `kernels/convert.cu` for `dtype`, and its elements per thread (4, or 1 for float
/// rows whose length is not a multiple of 4).
fn convert_kernel(dtype: DType, k: usize) -> (&'static str, usize) {
    let vector = k.is_multiple_of(4);
    match (dtype, vector) {
        (DType::F32, true) => ("convert_f32", 4),
        (DType::F32, false) => ("convert_f32_scalar", 1),
        (DType::F16, true) => ("convert_f16", 4),
        (DType::F16, false) => ("convert_f16_scalar", 1),
        (DType::BF16, true) => ("convert_bf16", 4),
        (DType::BF16, false) => ("convert_bf16_scalar", 1),
        // Block-quantized rows are whole blocks of 32 or 256.
        (DType::Q8_0, _) => ("convert_q8_0", 4),
        (DType::Q4_0, _) => ("convert_q4_0", 4),
        (DType::Q4_1, _) => ("convert_q4_1", 4),
        (DType::Q4K, _) => ("convert_q4_k", 4),
        (DType::Q6K, _) => ("convert_q6_k", 4),
    }
}

/// Launches the decoding of `rows` output rows of `table` (`[vocab, k]`), row `i` from row
/// `ids[i]` when `ids` is given, else from row `i`.
fn convert(
    cuda: &Cuda,
    table: &Tensor,
    bytes: &CudaView<'_, u8>,
    ids: Option<u64>,
    rows: usize,
    out: u64,
) -> Result<()> {
    let (vocab, k) = (table.shape().dims()[0], table.shape().dims()[1]);
    if rows == 0 || k == 0 {
        return Ok(());
    }
    let (kernel, per_thread) = convert_kernel(table.dtype(), k);
    let p = ConvertParams {
        rows: rows as u64,
        cols: u32::try_from(k).map_err(|_| Error::invalid("convert", format!("rows of {k} elements are too long")))?,
        row_bytes: table.row_bytes() as u64,
        vocab: vocab as u64,
        gather: ids.is_some() as u32,
    };
    let groups = rows * (k / per_thread);
    // A grid-stride loop covers anything past 2^16 blocks of 256 threads.
    let blocks = groups.div_ceil(256).clamp(1, 1 << 16) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let ptrs = [ptr(cuda, bytes), ids.unwrap_or(0), out];
    // SAFETY: the caller checked that `out` holds rows * k floats and `ids` (when given) `rows`
    // ids; the table's buffer holds vocab * row_bytes bytes (checked by device_matrix), and the
    // kernel reads a row only for an id below vocab.
    unsafe { cuda.launch("convert", kernel, cfg, &p, &ptrs) }
}

/// `out = w` as f32, row-major (`n * k` values): the whole `[n, k]` device tensor `w` of any dtype
/// decoded exactly as `Tensor::to_f32_vec` decodes it on the CPU.
pub fn dequantize<O>(cuda: &Cuda, w: &Tensor, out: &mut O) -> Result<()>
where
    O: DevicePtrMut<f32>,
{
    let op = "dequantize";
    let (n, k, bytes) = device_matrix(op, cuda, w)?;
    check_len(op, "out", out.len(), n * k)?;
    let out = ptr_mut(cuda, out);
    convert(cuda, w, &bytes, None, n, out)
}

/// `out[i, :] = table[ids[i], :]` as f32 for `i < n_ids`: the embedding lookup of
/// `strata_tensor::cpu::reference::embedding` on a `[vocab, dim]` device table of any dtype.
///
/// The ids are validated on the host before upload in normal use; here they are device data, so
/// the kernel checks each one and writes a row of NaNs for an id at or above `vocab`, reading
/// nothing out of bounds (the NaNs make the bad id loud downstream).
pub fn embedding<I, O>(cuda: &Cuda, table: &Tensor, ids: &I, n_ids: usize, out: &mut O) -> Result<()>
where
    I: DevicePtr<u32>,
    O: DevicePtrMut<f32>,
{
    let op = "embedding";
    let (_, dim, bytes) = device_matrix(op, cuda, table)?;
    check_len(op, "ids", ids.len(), n_ids)?;
    check_len(op, "out", out.len(), n_ids * dim)?;
    let ids = ptr(cuda, ids);
    let out = ptr_mut(cuda, out);
    convert(cuda, table, &bytes, Some(ids), n_ids, out)
}
