//! strata-kernels (skeleton)
