//! strata-store: executes a plan and is the only crate that moves weights.
//!
//! It owns the offload pack on disk ([`pack`]: the checkpoint repacked into one file of 4 KiB
//! aligned units with a checksummed manifest), and will own the buffers of each tier, the
//! prefetch pipeline that streams layer `i + 1..i + N` while layer `i` computes, and the
//! router-aware expert cache; models ask it for a layer's or an expert's weights and get a
//! resident handle. Only the pack is written so far.
//!
//! Dependencies: strata-tensor, strata-nvme, strata-planner, and strata-kernels only as an
//! optional dependency behind a CUDA feature.
#![warn(missing_docs)]

pub mod error;
pub mod pack;
mod store;

pub use error::{Error, Result};
pub use store::{Residency, Store, StoreStats, UnitHandle};
/// The streamer, re-exported for the layers above (which may not depend on it directly).
pub use strata_nvme as nvme;
/// The planner, re-exported for the layers above (which may not depend on it directly).
pub use strata_planner as planner;
