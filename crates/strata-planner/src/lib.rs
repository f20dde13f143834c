//! strata-planner (skeleton)
