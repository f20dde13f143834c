//! strata-nvme: the weight streamer that reads offloaded weights from NVMe.
//!
//! It will submit `O_DIRECT` reads through io_uring into aligned (and, with CUDA, page-locked)
//! buffers with a bounded queue depth, hand out completion tickets, and fall back to `pread`
//! where io_uring or `O_DIRECT` is unavailable. None of that is written yet: this crate is an
//! empty placeholder that later issues fill.
//!
//! Dependencies: no other strata crate. strata-store is its only user.
#![warn(missing_docs)]
