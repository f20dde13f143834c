//! strata-store: executes a plan and is the only crate that moves weights.
//!
//! It will own the offload pack on disk, the buffers of each tier, the prefetch pipeline that
//! streams layer `i + 1..i + N` while layer `i` computes, and the router-aware expert cache;
//! models ask it for a layer's or an expert's weights and get a resident handle. None of that is
//! written yet: this crate is an empty placeholder that later issues fill.
//!
//! Dependencies: strata-tensor, strata-nvme, strata-planner, and strata-kernels only as an
//! optional dependency behind a CUDA feature.
#![warn(missing_docs)]
