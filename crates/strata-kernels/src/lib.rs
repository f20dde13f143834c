//! strata-kernels: the CUDA backend.
//!
//! Safe launch wrappers over the hand-written kernels in `kernels/*.cu`, cuBLAS GEMM, device
//! memory, streams and events, and page-locked host buffers for asynchronous uploads. All of it
//! sits behind the `cuda` feature (off by default), so CPU-only builds never need nvcc or a CUDA
//! driver: there, [`cuda_device`] answers [`Error::NotCompiled`].
//!
//! With the feature, the build script compiles every `kernels/*.cu` to PTX for compute_80 and
//! embeds it; the launch-parameter structs of `kernels/include/*.h` reach Rust through bindgen
//! (`cuda::params`). The driver is loaded at run time (cudarc's dynamic loading), so a binary
//! built with CUDA still starts on a machine without a GPU and reports [`Error::NoDevice`].
//!
//! Every kernel has a CPU reference in `strata-tensor` (`strata_tensor::cpu::reference`); the
//! tests in `tests/` compare each kernel with it on random shapes, and skip with a message when
//! no device is present.
//!
//! Dependencies: strata-tensor only.
#![warn(missing_docs)]

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod testing;

/// Everything that can go wrong in the CUDA backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// This build of strata-kernels has no CUDA support.
    #[error("CUDA device {ordinal} was requested, but strata was built without the `cuda` feature")]
    NotCompiled {
        /// The device ordinal that was asked for.
        ordinal: usize,
    },
    /// No usable CUDA device: no driver library, no device with that ordinal, or it failed to
    /// open.
    #[error("no CUDA device {ordinal}: {reason}")]
    NoDevice {
        /// The device ordinal that was asked for.
        ordinal: usize,
        /// Why.
        reason: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA error in {op}: {message}")]
    Driver {
        /// What was being done (a kernel name, "upload", "synchronize", ..).
        op: String,
        /// The driver's error.
        message: String,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS error in {op}: {message}")]
    Blas {
        /// The operation.
        op: String,
        /// The library's error.
        message: String,
    },
    /// Arguments that do not fit together (lengths, shapes, dtypes).
    #[error("{op}: {message}")]
    InvalidArgument {
        /// The operation.
        op: String,
        /// What was wrong.
        message: String,
    },
}

impl Error {
    /// An [`Error::InvalidArgument`].
    pub fn invalid(op: &str, message: impl Into<String>) -> Error {
        Error::InvalidArgument { op: op.to_string(), message: message.into() }
    }
}

/// The result type of strata-kernels.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(feature = "cuda")]
pub use cuda::Cuda;

/// Opens CUDA device `ordinal`.
///
/// Without the `cuda` feature this is always [`Error::NotCompiled`].
#[cfg(not(feature = "cuda"))]
pub fn cuda_device(ordinal: usize) -> Result<std::sync::Arc<NoCuda>> {
    Err(Error::NotCompiled { ordinal })
}

/// Stands in for the CUDA device handle in builds without the `cuda` feature; no value of it
/// can be made.
#[cfg(not(feature = "cuda"))]
#[derive(Debug)]
pub enum NoCuda {}

/// Opens CUDA device `ordinal`: [`Error::NoDevice`] when the driver library is missing or the
/// device cannot be opened.
#[cfg(feature = "cuda")]
pub fn cuda_device(ordinal: usize) -> Result<std::sync::Arc<Cuda>> {
    Cuda::new(ordinal)
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
    fn a_missing_device_is_an_error_not_a_panic() {
        match cuda_device(4096) {
            Err(Error::NoDevice { ordinal, .. }) => assert_eq!(ordinal, 4096),
            Err(e) => panic!("expected NoDevice, got {e}"),
            Ok(_) => panic!("device 4096 cannot exist"),
        }
    }
}
