//! RMSNorm (`kernels/rmsnorm.cu`).

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

use crate::cuda::params::{RmsNormParams, STRATA_NORM_MAX_COLS};
use crate::cuda::{Cuda, check_len, ptr, ptr_mut};
use crate::{Error, Result};

/// `out[r, :] = x[r, :] * rsqrt(mean(x[r, :]²) + eps) * w` for `rows = x.len() / w.len()` rows.
/// The CUDA twin of `strata_tensor::cpu::rms_norm`.
pub fn rms_norm<X, W, O>(cuda: &Cuda, x: &X, w: &W, eps: f32, rows: usize, out: &mut O) -> Result<()>
where
    X: DevicePtr<f32>,
    W: DevicePtr<f32>,
    O: DevicePtrMut<f32>,
{
    let cols = w.len();
    check_cols("rms_norm", cols)?;
    check_len("rms_norm", "x", x.len(), rows * cols)?;
    check_len("rms_norm", "out", out.len(), rows * cols)?;
    // SAFETY: x and out hold rows * cols floats and w holds cols, checked above.
    unsafe { launch(cuda, "rmsnorm_f32", &[ptr(cuda, x), ptr(cuda, w), ptr_mut(cuda, out)], rows, cols, eps) }
}

/// [`rms_norm`] in place: `x[r, :] = x[r, :] * rsqrt(mean(x[r, :]²) + eps) * w` (each element is
/// read and written by the same thread, so in place is safe).
pub fn rms_norm_inplace<X, W>(cuda: &Cuda, x: &mut X, w: &W, eps: f32, rows: usize) -> Result<()>
where
    X: DevicePtrMut<f32>,
    W: DevicePtr<f32>,
{
    let cols = w.len();
    check_cols("rms_norm_inplace", cols)?;
    check_len("rms_norm_inplace", "x", x.len(), rows * cols)?;
    let xp = ptr_mut(cuda, x);
    // SAFETY: x holds rows * cols floats and w holds cols, checked above; the kernel reads and
    // writes each element from the same thread.
    unsafe { launch(cuda, "rmsnorm_f32", &[xp, ptr(cuda, w), xp], rows, cols, eps) }
}

/// [`rms_norm`] that also quantizes each output row to two digits into `xq` (`rows` records of
/// `cols` activations, [`actq_bytes`](super::actq_bytes)), bit for bit as
/// [`quantize_acts`](super::quantize_acts) would quantize `out`: the activations of the next
/// products ([`matvec_actq`](super::matvec_actq)) quantized in the norm's launch rather than in
/// every block of each product. `cols` must be a multiple of 32.
pub fn rms_norm_actq<X, W, O, Q>(
    cuda: &Cuda,
    x: &X,
    w: &W,
    eps: f32,
    rows: usize,
    out: &mut O,
    xq: &mut Q,
) -> Result<()>
where
    X: DevicePtr<f32>,
    W: DevicePtr<f32>,
    O: DevicePtrMut<f32>,
    Q: DevicePtrMut<u8>,
{
    const OP: &str = "rms_norm_actq";
    let cols = w.len();
    check_cols(OP, cols)?;
    check_len(OP, "x", x.len(), rows * cols)?;
    check_len(OP, "out", out.len(), rows * cols)?;
    check_len(OP, "xq", xq.len(), super::actq_bytes(rows, cols))?;
    if !cols.is_multiple_of(32) {
        return Err(Error::invalid(OP, format!("rows of {cols} are not whole blocks of 32 to quantize")));
    }
    let ptrs = [ptr(cuda, x), ptr(cuda, w), ptr_mut(cuda, out), ptr_mut(cuda, xq)];
    super::matvec::check_actq_aligned(OP, ptrs[3])?;
    // SAFETY: x and out hold rows * cols floats, w cols and xq rows records, checked above.
    unsafe { launch(cuda, "rmsnorm_f32_actq", &ptrs, rows, cols, eps) }
}

/// Launches of at least this many rows take blocks of fewer threads, several float4s each.
const MANY_ROWS: usize = 64;

/// Float4s per thread the kernels keep in registers between the sum of squares and the scaling
/// (`RMSNORM_VECS` of `kernels/rmsnorm.cu`).
const KEPT: usize = 8;

/// Threads per block (per row) of both RMSNorm kernels for `rows` rows of `cols`.
///
/// - Few rows (a decode step's one): a float4 per thread, up to 4096 columns (a 2048-wide row:
///   512 threads, whose 16 warps then quantize its 64 blocks of 32 four each in
///   `rms_norm_actq`), 1024 above: the most loads in flight for the one block, the shortest
///   reductions.
/// - [`MANY_ROWS`] or more: [`KEPT`] float4s per thread (32 to 1024 threads). The kernels take
///   about 64 registers a thread, so a block of 1024 fills an SM's register file: one row per
///   SM at a time, whose loads stop while it reduces. A 8192-wide row on 256 threads lets four
///   blocks share an SM, each loading while another reduces.
///
/// The sum of squares goes in an order that does not depend on the count
/// (`kernels/include/norm.cuh`), so any count gives the same bits.
fn threads(cols: usize, rows: usize) -> u32 {
    let per_thread = if rows >= MANY_ROWS { KEPT } else { 1 };
    cols.div_ceil(4).div_ceil(per_thread).next_multiple_of(32).clamp(32, 1024) as u32
}

/// Refuses rows longer than the kernels' sum of squares takes (`STRATA_NORM_MAX_COLS`: one float of
/// shared memory per 128 columns).
fn check_cols(op: &str, cols: usize) -> Result<()> {
    if cols > STRATA_NORM_MAX_COLS as usize {
        return Err(Error::invalid(op, format!("rows of {cols} floats; at most {STRATA_NORM_MAX_COLS}")));
    }
    Ok(())
}

/// Launches `kernel` (`rmsnorm_f32` over `[x, w, out]`, `rmsnorm_f32_actq` over `[x, w, out,
/// xq]`): one block of [`threads`] per row.
///
/// # Safety
/// `x` and `out` must hold `rows * cols` floats, `w` `cols`, and `xq` `rows` records.
unsafe fn launch(cuda: &Cuda, kernel: &'static str, ptrs: &[u64], rows: usize, cols: usize, eps: f32) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let p = RmsNormParams { rows: rows as u32, cols: cols as u32, eps };
    let cfg =
        LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads(cols, rows), 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the caller guarantees the buffers' lengths.
    unsafe { cuda.launch("rmsnorm", kernel, cfg, &p, ptrs) }
}

#[cfg(test)]
mod tests {
    use super::threads;

    #[test]
    fn a_row_gets_a_float4_per_thread_up_to_1024_threads() {
        for rows in [1, 2, 63] {
            assert_eq!(threads(1, rows), 32);
            assert_eq!(threads(128, rows), 32);
            assert_eq!(threads(2048, rows), 512);
            assert_eq!(threads(4100, rows), 1024);
            assert_eq!(threads(8192, rows), 1024);
            assert_eq!(threads(100_000, rows), 1024);
        }
    }

    #[test]
    fn many_rows_get_eight_float4_per_thread() {
        for rows in [64, 16384] {
            assert_eq!(threads(1, rows), 32);
            assert_eq!(threads(2048, rows), 64);
            assert_eq!(threads(4100, rows), 160);
            assert_eq!(threads(8192, rows), 256);
            assert_eq!(threads(32768, rows), 1024);
            assert_eq!(threads(100_000, rows), 1024);
        }
    }
}
