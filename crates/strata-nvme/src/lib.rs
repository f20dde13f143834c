//! strata-nvme (skeleton)
