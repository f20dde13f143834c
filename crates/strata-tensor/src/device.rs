//! Where a tensor's bytes live.

use std::fmt;

/// A compute device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// Host memory, computed on by [`crate::cpu`].
    #[default]
    Cpu,
    /// A CUDA device by ordinal. Tensors can live there only in builds with the `cuda` feature.
    Cuda(usize),
}

impl Device {
    /// Whether this build can hold tensors on this device at all.
    pub const fn is_compiled(self) -> bool {
        match self {
            Device::Cpu => true,
            Device::Cuda(_) => cfg!(feature = "cuda"),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}
