//! strata-store (skeleton)
