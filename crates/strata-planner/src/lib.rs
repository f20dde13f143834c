//! strata-planner: the pure placement policy.
//!
//! It turns a weight manifest (the model's units: embedding, attention blocks, FFNs, experts,
//! head), tier budgets and a hardware profile into a plan: which units stay resident in RAM,
//! which are streamed from the offload pack on disk through a ring of staging buffers, how deep
//! the prefetch is, how much memory each tier holds and how long a token should take. Strategies
//! implement the `PlacementStrategy` trait; `strategy_by_name` finds the built-in ones. The
//! planner is a pure function: no I/O, no tensors, no threads, and the same input gives the
//! same plan.
//!
//! Dependencies: no other strata crate (dtypes are plain strings here).
#![warn(missing_docs)]

mod error;
mod expert_cache;
mod hardware;
mod manifest;
mod plan;
mod size;
mod strategy;
mod timing;

pub use error::PlanError;
pub use expert_cache::{
    CacheSimulation, DEFAULT_EXPERT_CACHE_POLICY, EXPERT_CACHE_POLICIES, ExpertCachePolicy, ExpertSlots, LayerLru, Lfu,
    Lru, LruHitCurve, expert_cache_policy_by_name, simulate_expert_cache, uniform_routing_trace,
};
pub use hardware::{HardwareProfile, LARGE_DISK_READ, SMALL_DISK_READ, TierBudgets, Workload};
pub use manifest::{UnitInfo, UnitKind, WeightManifest};
pub use plan::{MemoryUse, Placement, Plan, Tier, TokenTime};
pub use size::{format_size, parse_size};
pub use strategy::{
    AllResident, CostModel, DEFAULT_EXPERT_CACHE_FACTOR, DEFAULT_STRATEGY, MAPPED_SLACK_BYTES, MAX_AUTO_PREFETCH_DEPTH,
    MAX_PREFETCH_DEPTH, PAGE_BYTES, PIN_ATTENTION_DEPTH, PinAttention, PlacementStrategy, PlanInput, STRATEGY_NAMES,
    StreamAll, mapped_ram, strategy_by_name,
};
