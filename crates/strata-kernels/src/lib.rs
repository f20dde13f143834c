//! strata-kernels: the CUDA backend.
//!
//! It will hold safe launch wrappers over the hand-written kernels in `kernels/*.cu`, cuBLAS
//! calls, and device memory management, all behind the `cuda` feature (off by default), so that
//! CPU-only builds never need nvcc or a CUDA driver. None of the backend is written yet. What
//! exists is the entry point, [`cuda_device`], which answers with a typed error in every build:
//! [`Error::NotCompiled`] without the `cuda` feature and [`Error::NotImplemented`] with it.
//!
//! Dependencies: strata-tensor only.
#![warn(missing_docs)]

/// Everything that can go wrong when asking for the CUDA backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// This build of strata-kernels has no CUDA support.
    #[error("CUDA device {ordinal} was requested, but strata was built without the `cuda` feature")]
    NotCompiled {
        /// The device ordinal that was asked for.
        ordinal: usize,
    },
    /// This build has the `cuda` feature, but the CUDA backend is not implemented yet.
    #[error("CUDA device {ordinal} was requested, but the CUDA backend is not implemented yet")]
    NotImplemented {
        /// The device ordinal that was asked for.
        ordinal: usize,
    },
}

/// The result type of strata-kernels.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A handle on an opened CUDA device.
///
/// No value of this type can be made yet: [`cuda_device`] returns an error in every build until
/// the CUDA backend is written.
#[derive(Debug)]
pub struct CudaDevice {
    ordinal: usize,
}

impl CudaDevice {
    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
}

/// Opens CUDA device `ordinal`.
///
/// Without the `cuda` feature this is always [`Error::NotCompiled`].
#[cfg(not(feature = "cuda"))]
pub fn cuda_device(ordinal: usize) -> Result<CudaDevice> {
    Err(Error::NotCompiled { ordinal })
}

/// Opens CUDA device `ordinal`.
///
/// The backend is not written yet, so this is always [`Error::NotImplemented`].
#[cfg(feature = "cuda")]
pub fn cuda_device(ordinal: usize) -> Result<CudaDevice> {
    Err(Error::NotImplemented { ordinal })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn without_the_feature_cuda_is_not_compiled() {
        let err = cuda_device(3).unwrap_err();
        assert_eq!(err, Error::NotCompiled { ordinal: 3 });
        assert!(err.to_string().contains("without the `cuda` feature"), "{err}");
    }

    #[test]
    #[cfg(feature = "cuda")]
    fn with_the_feature_cuda_is_not_implemented_yet() {
        let err = cuda_device(3).unwrap_err();
        assert_eq!(err, Error::NotImplemented { ordinal: 3 });
        assert!(err.to_string().contains("not implemented yet"), "{err}");
    }
}
