//! RMSNorm (`kernels/rmsnorm.cu`).

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

use crate::cuda::params::RmsNormParams;
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
    check_len("rms_norm", "x", x.len(), rows * cols)?;
    check_len("rms_norm", "out", out.len(), rows * cols)?;
    // SAFETY: x and out hold rows * cols floats and w holds cols, checked above.
    unsafe { launch(cuda, [ptr(cuda, x), ptr(cuda, w), ptr_mut(cuda, out)], rows, cols, eps) }
}

/// [`rms_norm`] in place: `x[r, :] = x[r, :] * rsqrt(mean(x[r, :]²) + eps) * w` (each element is
/// read and written by the same thread, so in place is safe).
pub fn rms_norm_inplace<X, W>(cuda: &Cuda, x: &mut X, w: &W, eps: f32, rows: usize) -> Result<()>
where
    X: DevicePtrMut<f32>,
    W: DevicePtr<f32>,
{
    let cols = w.len();
    check_len("rms_norm_inplace", "x", x.len(), rows * cols)?;
    let xp = ptr_mut(cuda, x);
    // SAFETY: x holds rows * cols floats and w holds cols, checked above; the kernel reads and
    // writes each element from the same thread.
    unsafe { launch(cuda, [xp, ptr(cuda, w), xp], rows, cols, eps) }
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
    check_len(OP, "x", x.len(), rows * cols)?;
    check_len(OP, "out", out.len(), rows * cols)?;
    check_len(OP, "xq", xq.len(), super::actq_bytes(rows, cols))?;
    if !cols.is_multiple_of(32) {
        return Err(Error::invalid(OP, format!("rows of {cols} are not whole blocks of 32 to quantize")));
    }
    if rows == 0 {
        return Ok(());
    }
    let p = RmsNormParams { rows: rows as u32, cols: cols as u32, eps };
    // 32 warps: a decode step's one row is one block, whose warps then quantize its blocks of 32
    // (a 2048-wide row: two each, one after the other).
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    let ptrs = [ptr(cuda, x), ptr(cuda, w), ptr_mut(cuda, out), ptr_mut(cuda, xq)];
    if ptrs[3] % 16 != 0 {
        return Err(Error::invalid(OP, "xq is not 16-byte aligned (the matvec copies it in 16-byte pieces)"));
    }
    // SAFETY: x and out hold rows * cols floats, w cols and xq rows records, checked above.
    unsafe { cuda.launch("rmsnorm", "rmsnorm_f32_actq", cfg, &p, &ptrs) }
}

/// Launches `rmsnorm_f32` over `[x, w, out]`: one 256-thread block per row.
///
/// # Safety
/// `x` and `out` must hold `rows * cols` floats and `w` `cols`.
unsafe fn launch(cuda: &Cuda, ptrs: [u64; 3], rows: usize, cols: usize, eps: f32) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let p = RmsNormParams { rows: rows as u32, cols: cols as u32, eps };
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the caller guarantees the buffers' lengths.
    unsafe { cuda.launch("rmsnorm", "rmsnorm_f32", cfg, &p, &ptrs) }
}
