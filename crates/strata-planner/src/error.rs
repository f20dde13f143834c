//! The planner's error enum: bad sizes, unknown strategy names, inconsistent manifests or
//! hardware profiles, and plans that do not fit their budgets (with what would fit).

use crate::plan::Tier;

/// Everything that can go wrong while parsing planner inputs or making a plan.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// A size string (a `--max-ram` value, for instance) could not be parsed.
    #[error("invalid size {input:?}: {reason}")]
    InvalidSize {
        /// The string as given.
        input: String,
        /// What was wrong with it.
        reason: String,
    },
    /// No built-in strategy has this name.
    #[error("unknown placement strategy {name:?}; the strategies are {known}")]
    UnknownStrategy {
        /// The name as given.
        name: String,
        /// The known names, comma separated.
        known: String,
    },
    /// No built-in expert cache policy has this name.
    #[error("unknown expert cache policy {name:?}; the policies are {known}")]
    UnknownExpertCachePolicy {
        /// The name as given.
        name: String,
        /// The known names, comma separated.
        known: String,
    },
    /// The plan needs more memory in a tier than its budget allows.
    #[error("the plan does not fit in {tier}: {what}")]
    DoesNotFit {
        /// The strategy that was asked for the plan.
        strategy: String,
        /// The fewest bytes of the tier that the strategy needs.
        needed: u64,
        /// The tier's budget in bytes.
        budget: u64,
        /// The tier that is short.
        tier: Tier,
        /// What the bytes are made of and how short the budget is, in words.
        what: String,
    },
    /// A hardware profile holds a rate that cannot be used (zero, negative, NaN or infinite).
    #[error("hardware profile: {field} must be a finite rate above 0 GB/s, got {value}")]
    InvalidHardware {
        /// The field, for instance `disk_read_gb_s` or `matvec_gb_s[q8_0]`.
        field: String,
        /// The value found there.
        value: f64,
    },
    /// A weight manifest contradicts itself (a layer index past `n_layers`, for instance).
    #[error("weight manifest, unit {unit:?}: {reason}")]
    InvalidManifest {
        /// The unit's name.
        unit: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A strategy asked for a placement the planner cannot carry out (streaming the embedding,
    /// or a placement list that does not match the manifest).
    #[error("invalid placement: {reason}")]
    InvalidPlacement {
        /// What is wrong, naming the unit.
        reason: String,
    },
    /// The prefetch depth asked for is deeper than the planner models.
    #[error("prefetch depth {depth} is above the deepest the planner models ({max})")]
    PrefetchTooDeep {
        /// The depth asked for.
        depth: usize,
        /// `MAX_PREFETCH_DEPTH`.
        max: usize,
    },
    /// A byte count does not fit in 64 bits.
    #[error("{what} is larger than 2^64 - 1 bytes")]
    Overflow {
        /// The quantity that overflowed, in words.
        what: String,
    },
}
