//! Helpers for the kernel tests: one shared device per test binary (or a message and a skip
//! when there is none), and (from [`crate::testing`]) the tolerance rule of STYLE.md and the
//! tests' random inputs.

use std::sync::{Arc, OnceLock};

use super::Cuda;

static DEVICE: OnceLock<Option<Arc<Cuda>>> = OnceLock::new();

/// Device 0, or `None` after printing why the calling test skips.
pub fn device_or_skip(test: &str) -> Option<Arc<Cuda>> {
    let dev = DEVICE.get_or_init(|| match Cuda::new(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("no CUDA device, GPU tests skip: {e}");
            None
        }
    });
    if dev.is_none() {
        eprintln!("skipping {test}: no CUDA device");
    }
    dev.clone()
}

pub use crate::testing::{assert_close, random_f32};
