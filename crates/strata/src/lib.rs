//! strata (skeleton)
