//! Row-wise softmax and argmax (`kernels/softmax.cu`).

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

use crate::cuda::params::SoftmaxParams;
use crate::cuda::{Cuda, check_len, ptr, ptr_mut};
use crate::{Error, Result};

/// Rows up to this long take a warp each (eight rows per block); longer ones a block each.
const WARP_ROW_MAX: usize = 1024;

/// The kernel (`kernels[0]` takes a warp per row, `kernels[1]` a block) and launch shape for
/// `rows` rows of `row_len`.
fn row_launch(rows: usize, row_len: usize, kernels: [&'static str; 2]) -> (&'static str, LaunchConfig) {
    if row_len <= WARP_ROW_MAX {
        let warps = 8;
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(warps) as u32, 1, 1),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        (kernels[0], cfg)
    } else {
        // About eight elements per thread before the block is full at 1024 threads.
        let threads = row_len.div_ceil(8).next_multiple_of(32).clamp(32, 1024) as u32;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        (kernels[1], cfg)
    }
}

/// The number of rows of `len` elements split into rows of `row_len`, checked as
/// `strata_tensor::cpu::softmax` checks it (`row_len` 0 only with no elements).
fn rows_of(op: &str, len: usize, row_len: usize) -> Result<usize> {
    if row_len == 0 {
        if len == 0 {
            return Ok(0);
        }
        return Err(Error::invalid(op, format!("row_len is 0 for {len} elements")));
    }
    if !len.is_multiple_of(row_len) {
        return Err(Error::invalid(op, format!("{len} elements are not a whole number of rows of {row_len}")));
    }
    let rows = len / row_len;
    if rows > i32::MAX as usize || row_len > u32::MAX as usize {
        return Err(Error::invalid(op, format!("{rows} rows of {row_len}: too many for one launch")));
    }
    Ok(rows)
}

/// Softmax in place over each row of `row_len` elements of `x` (`x.len()` a multiple of
/// `row_len`), with the row maximum subtracted first. The CUDA twin of
/// `strata_tensor::cpu::reference::softmax`, special values included: a row containing NaN or
/// `+inf`, or of only `-inf`, becomes all NaN; `-inf` in an otherwise finite row gives 0.
pub fn softmax<X: DevicePtrMut<f32>>(cuda: &Cuda, x: &mut X, row_len: usize) -> Result<()> {
    let rows = rows_of("softmax", x.len(), row_len)?;
    if rows == 0 {
        return Ok(());
    }
    let p = SoftmaxParams { rows: rows as u32, row_len: row_len as u32 };
    let (kernel, cfg) = row_launch(rows, row_len, ["softmax_warp_f32", "softmax_block_f32"]);
    let ptrs = [ptr_mut(cuda, x)];
    // SAFETY: x holds rows * row_len floats (checked above); the kernel touches the rows below
    // `rows` only.
    unsafe { cuda.launch("softmax", kernel, cfg, &p, &ptrs) }
}

/// The index of the first maximum of each row of `row_len` elements of `x`, into `out` (one per
/// row; `out` may be longer). NaN counts as larger than every number, so a row with NaN gives
/// the index of its first NaN. The CUDA twin of `strata_tensor::cpu::reference::argmax` applied
/// to each row.
pub fn argmax<X, O>(cuda: &Cuda, x: &X, row_len: usize, out: &mut O) -> Result<()>
where
    X: DevicePtr<f32>,
    O: DevicePtrMut<u32>,
{
    let rows = rows_of("argmax", x.len(), row_len)?;
    check_len("argmax", "out", out.len(), rows)?;
    if rows == 0 {
        return Ok(());
    }
    let p = SoftmaxParams { rows: rows as u32, row_len: row_len as u32 };
    let (kernel, cfg) = row_launch(rows, row_len, ["argmax_warp_f32", "argmax_block_f32"]);
    let ptrs = [ptr(cuda, x), ptr_mut(cuda, out)];
    // SAFETY: x holds rows * row_len floats and out at least rows indices (checked above); the
    // kernel reads the rows below `rows` and writes out[row] for those only.
    unsafe { cuda.launch("softmax", kernel, cfg, &p, &ptrs) }
}
