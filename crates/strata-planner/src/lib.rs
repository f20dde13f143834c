//! strata-planner: the pure placement policy.
//!
//! It will turn a weight manifest, tier budgets (VRAM, RAM, NVMe) and a hardware profile into a
//! plan that says where every weight lives and where every piece of work runs, through the
//! `PlacementStrategy` and `ExpertCachePolicy` traits, with built-in strategies and a trace
//! simulator. The planner is a pure function: no I/O, no tensors, no threads. None of it is
//! written yet: this crate is an empty placeholder that later issues fill.
//!
//! Dependencies: no other strata crate, or only strata-tensor (for dtype sizes).
#![warn(missing_docs)]
