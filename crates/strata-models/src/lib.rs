//! strata-models (skeleton)
