//! strata-store: executes a plan and is the only crate that moves weights.
//!
//! It owns the offload pack on disk ([`pack`]: the checkpoint repacked into one file of 4 KiB
//! aligned units with a checksummed manifest), the resident units in RAM, the prefetch pipeline
//! that streams unit `i + 1..i + N` while unit `i` computes, and the expert cache (MoE experts
//! read when a router picks them and kept while there is room); models ask it for a unit's or an
//! expert's weights and get a resident handle.
//!
//! Dependencies: strata-tensor, strata-nvme, strata-planner, and strata-kernels only as an
//! optional dependency behind a CUDA feature.
#![warn(missing_docs)]

pub mod error;
mod experts;
pub mod pack;
mod store;

pub use error::{Error, Result};
pub use experts::{ExpertCacheConfig, ExpertCacheStats, ExpertFetch};
pub use store::{Residency, Store, StoreStats, UnitHandle};
/// The streamer, re-exported for the layers above (which may not depend on it directly).
pub use strata_nvme as nvme;
/// The planner, re-exported for the layers above (which may not depend on it directly).
pub use strata_planner as planner;
