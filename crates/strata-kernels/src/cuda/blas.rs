//! cuBLAS GEMM: `y[t, n] = x[t, k] · w[n, k]ᵀ` with f32, f16 or bf16 operands and an f32
//! result, accumulated in f32 (no TF32: results are comparable with the CPU's f32).
//!
//! Both operands have the same dtype (cuBLAS's `GemmEx` rule); the caller casts activations to
//! the weight's dtype or dequantizes the weight to f32 ([`super::ops::dequantize`]).

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, result as blas_result, sys as blas_sys};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use crate::{Error, Result};

use super::{Cuda, check_len};

/// The operand dtype of a GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmDtype {
    /// 32-bit floats.
    F32,
    /// IEEE half floats.
    F16,
    /// bfloat16.
    Bf16,
}

impl GemmDtype {
    fn cuda(self) -> blas_sys::cudaDataType_t {
        match self {
            GemmDtype::F32 => blas_sys::cudaDataType_t::CUDA_R_32F,
            GemmDtype::F16 => blas_sys::cudaDataType_t::CUDA_R_16F,
            GemmDtype::Bf16 => blas_sys::cudaDataType_t::CUDA_R_16BF,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            GemmDtype::F32 => 4,
            GemmDtype::F16 | GemmDtype::Bf16 => 2,
        }
    }
}

/// A cuBLAS handle bound to the compute stream.
pub struct Blas {
    inner: CudaBlas,
}

// SAFETY: the handle is only used through `&Blas` on the stream it was created for, and cuBLAS
// handles may be used from any thread as long as calls are not concurrent; strata's callers
// serialise on the compute stream.
unsafe impl Sync for Blas {}
// SAFETY: as above.
unsafe impl Send for Blas {}

impl Blas {
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<Blas> {
        let inner = CudaBlas::new(stream.clone())
            .map_err(|e| Error::Blas { op: "create".into(), message: format!("{e:?}") })?;
        Ok(Blas { inner })
    }

    /// `y[t, n] = x[t, k] · w[n, k]ᵀ`, `x` and `w` of `dtype` (given as bytes), `y` f32.
    pub fn matmul<X, W, Y>(
        &self,
        cuda: &Cuda,
        dtype: GemmDtype,
        x: &X,
        w: &W,
        y: &mut Y,
        (t, n, k): (usize, usize, usize),
    ) -> Result<()>
    where
        X: DevicePtr<u8>,
        W: DevicePtr<u8>,
        Y: DevicePtrMut<f32>,
    {
        let op = "gemm";
        check_len(op, "x", x.len(), t * k * dtype.size())?;
        check_len(op, "w", w.len(), n * k * dtype.size())?;
        check_len(op, "y", y.len(), t * n)?;
        let stream = cuda.stream();
        let (xp, _a) = x.device_ptr(stream);
        let (wp, _b) = w.device_ptr(stream);
        let (yp, _c) = y.device_ptr_mut(stream);
        // SAFETY: the lengths were checked above against t, n and k.
        unsafe { self.gemm(dtype, xp, wp, yp, (t, n, k), 0.0) }
    }

    /// [`Blas::matmul`] with f32 operands given as f32 buffers: `y[t, n] = x[t, k] · w[n, k]ᵀ`.
    pub fn matmul_f32<X, W, Y>(&self, cuda: &Cuda, x: &X, w: &W, y: &mut Y, shape: (usize, usize, usize)) -> Result<()>
    where
        X: DevicePtr<f32>,
        W: DevicePtr<f32>,
        Y: DevicePtrMut<f32>,
    {
        self.f32_gemm(cuda, x, w, y, shape, 0.0)
    }

    /// `y[t, n] += x[t, k] · w[n, k]ᵀ` with f32 operands (cuBLAS's beta = 1).
    pub fn matmul_f32_add<X, W, Y>(
        &self,
        cuda: &Cuda,
        x: &X,
        w: &W,
        y: &mut Y,
        shape: (usize, usize, usize),
    ) -> Result<()>
    where
        X: DevicePtr<f32>,
        W: DevicePtr<f32>,
        Y: DevicePtrMut<f32>,
    {
        self.f32_gemm(cuda, x, w, y, shape, 1.0)
    }

    /// `y = x wᵀ + beta y` with f32 operands, the lengths checked.
    fn f32_gemm<X, W, Y>(
        &self,
        cuda: &Cuda,
        x: &X,
        w: &W,
        y: &mut Y,
        (t, n, k): (usize, usize, usize),
        beta: f32,
    ) -> Result<()>
    where
        X: DevicePtr<f32>,
        W: DevicePtr<f32>,
        Y: DevicePtrMut<f32>,
    {
        let op = "gemm";
        check_len(op, "x", x.len(), t * k)?;
        check_len(op, "w", w.len(), n * k)?;
        check_len(op, "y", y.len(), t * n)?;
        let stream = cuda.stream();
        let (xp, _a) = x.device_ptr(stream);
        let (wp, _b) = w.device_ptr(stream);
        let (yp, _c) = y.device_ptr_mut(stream);
        // SAFETY: the lengths were checked above against t, n and k.
        unsafe { self.gemm(GemmDtype::F32, xp, wp, yp, (t, n, k), beta) }
    }

    /// The GEMM on raw device addresses: `y = x wᵀ + beta y`.
    ///
    /// # Safety
    /// `x` must hold `t * k` and `w` `n * k` elements of `dtype`, `y` `t * n` floats.
    unsafe fn gemm(
        &self,
        dtype: GemmDtype,
        xp: u64,
        wp: u64,
        yp: u64,
        (t, n, k): (usize, usize, usize),
        beta: f32,
    ) -> Result<()> {
        let op = "gemm";
        if t == 0 || n == 0 || k == 0 {
            return Ok(());
        }
        let to_i32 = |v: usize| i32::try_from(v).map_err(|_| Error::invalid(op, format!("dimension {v} too large")));
        let (ti, ni, ki) = (to_i32(t)?, to_i32(n)?, to_i32(k)?);
        let alpha = 1f32;
        // Column-major view: yᵀ[n, t] = (w as [k, n])ᵀ · (x as [k, t]).
        // SAFETY: the caller guarantees the buffers hold the elements the leading dimensions and
        // m, n, k reach.
        unsafe {
            blas_result::gemm_ex(
                *self.inner.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                ni,
                ti,
                ki,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                dtype.cuda(),
                ki,
                xp as *const _,
                dtype.cuda(),
                ki,
                (&beta) as *const f32 as *const _,
                yp as *mut _,
                blas_sys::cudaDataType_t::CUDA_R_32F,
                ni,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::Blas { op: op.into(), message: format!("{e:?}") })
    }
}
