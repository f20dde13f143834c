//! The linear layer `y = x Wᵀ` for any weight dtype: the dequantizing matvec for a few tokens
//! (decode), a cuBLAS f32 GEMM over the dequantized weight for more (prefill).

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use strata_tensor::{DType, Tensor};

use crate::cuda::{Cuda, check_len, grown};
use crate::{Error, Result};

use super::convert::{dequantize, device_matrix};
use super::elementwise::swiglu_pairs;
use super::matvec::{MATVEC_MAX_TOKENS, matvec, matvec_add, matvec_swiglu};

/// Up to this many tokens [`linear`] runs the matvec kernels, which read the weight once per
/// [`MATVEC_MAX_TOKENS`] tokens; above it, the dequantized weight goes through a GEMM.
pub const LINEAR_MATVEC_TOKENS: usize = MATVEC_MAX_TOKENS;

/// The f32 copy of a weight that [`linear`] dequantizes into before a GEMM, kept between calls
/// and grown on demand (one per stream of work: calls that share it are ordered on the compute
/// stream, so the next dequantization waits for the previous GEMM).
#[derive(Debug, Default)]
pub struct LinearScratch {
    weights: Option<CudaSlice<f32>>,
}

impl LinearScratch {
    /// An empty scratch; the first GEMM-path call allocates it.
    pub fn new() -> LinearScratch {
        LinearScratch { weights: None }
    }

    /// Floats the scratch holds now.
    pub fn capacity(&self) -> usize {
        self.weights.as_ref().map_or(0, |b| b.len())
    }

    /// A buffer of at least `len` floats.
    fn weights(&mut self, cuda: &Cuda, len: usize) -> Result<&mut CudaSlice<f32>> {
        grown(cuda, &mut self.weights, len, len)
    }
}

/// `y = x Wᵀ`: `w` a `[n, k]` device tensor of any dtype, `x` `[tokens, k]` and `y` `[tokens, n]`
/// f32. The CUDA twin of `strata_tensor::cpu::reference::matmul`.
///
/// Up to [`LINEAR_MATVEC_TOKENS`] tokens this is [`matvec`]; above, an f32 weight goes straight to
/// cuBLAS and any other is first dequantized into `scratch` ([`dequantize`], exact), so the GEMM
/// multiplies the same f32 values the CPU does, accumulating in f32 (no TF32).
pub fn linear<X, Y>(cuda: &Cuda, w: &Tensor, x: &X, y: &mut Y, tokens: usize, scratch: &mut LinearScratch) -> Result<()>
where
    X: DevicePtr<f32>,
    Y: DevicePtrMut<f32>,
{
    if tokens <= LINEAR_MATVEC_TOKENS {
        return matvec(cuda, w, x, y, tokens);
    }
    gemm(cuda, w, x, y, tokens, scratch, false)
}

/// `y += x Wᵀ`: [`linear`] with its outputs added to `y`'s values (a residual connection fused
/// into its projection): [`matvec_add`] up to [`LINEAR_MATVEC_TOKENS`] tokens, the GEMM with
/// cuBLAS's beta = 1 above.
pub fn linear_add<X, Y>(
    cuda: &Cuda,
    w: &Tensor,
    x: &X,
    y: &mut Y,
    tokens: usize,
    scratch: &mut LinearScratch,
) -> Result<()>
where
    X: DevicePtr<f32>,
    Y: DevicePtrMut<f32>,
{
    if tokens <= LINEAR_MATVEC_TOKENS {
        return matvec_add(cuda, w, x, y, tokens);
    }
    gemm(cuda, w, x, y, tokens, scratch, true)
}

/// SwiGLU of a product, `out = silu(x Gᵀ) * (x Uᵀ)`, for `w` the gate and up weights' rows in
/// groups of four ([`matvec_swiglu`]'s layout, from
/// [`pair_rows`](crate::cuda::tensor::pair_rows)): [`matvec_swiglu`] up to
/// [`LINEAR_MATVEC_TOKENS`] tokens (one launch), above the GEMM into `products` (`[tokens, n]`)
/// then [`swiglu_pairs`] into `out` (`[tokens, n / 2]`).
pub fn linear_swiglu<X, P, Y>(
    cuda: &Cuda,
    w: &Tensor,
    x: &X,
    products: &mut P,
    out: &mut Y,
    tokens: usize,
    scratch: &mut LinearScratch,
) -> Result<()>
where
    X: DevicePtr<f32>,
    P: DevicePtrMut<f32> + DevicePtr<f32>,
    Y: DevicePtrMut<f32>,
{
    if tokens <= LINEAR_MATVEC_TOKENS {
        return matvec_swiglu(cuda, w, x, out, tokens);
    }
    let n = w.shape().dims().first().copied().unwrap_or(0);
    if !n.is_multiple_of(4) {
        return Err(Error::invalid(
            "linear_swiglu",
            format!("{n} rows are not groups of four paired gate and up rows"),
        ));
    }
    gemm(cuda, w, x, products, tokens, scratch, false)?;
    swiglu_pairs(cuda, products, out, tokens, n / 2)
}

/// The GEMM path of [`linear`] (`add`: of [`linear_add`]).
fn gemm<X, Y>(
    cuda: &Cuda,
    w: &Tensor,
    x: &X,
    y: &mut Y,
    tokens: usize,
    scratch: &mut LinearScratch,
    add: bool,
) -> Result<()>
where
    X: DevicePtr<f32>,
    Y: DevicePtrMut<f32>,
{
    let op = if add { "linear_add" } else { "linear" };
    let (n, k, bytes) = device_matrix(op, cuda, w)?;
    check_len(op, "x", x.len(), tokens * k)?;
    check_len(op, "y", y.len(), tokens * n)?;
    let blas = cuda.blas()?;
    let shape = (tokens, n, k);
    if w.dtype() == DType::F32 {
        // SAFETY: the bytes of an f32 tensor are its n * k floats, and the buffer starts on a
        // 16-byte boundary (checked by device_matrix).
        let weights = unsafe { bytes.transmute::<f32>(n * k) }
            .ok_or_else(|| Error::invalid(op, "the weight's buffer is shorter than its shape"))?;
        return if add {
            blas.matmul_f32_add(cuda, x, &weights, y, shape)
        } else {
            blas.matmul_f32(cuda, x, &weights, y, shape)
        };
    }
    let weights = scratch.weights(cuda, n * k)?;
    dequantize(cuda, w, weights)?;
    if add { blas.matmul_f32_add(cuda, x, weights, y, shape) } else { blas.matmul_f32(cuda, x, weights, y, shape) }
}
