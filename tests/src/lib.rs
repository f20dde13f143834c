//! strata-tests: cross-crate tests and the repository's tidy checks.
//!
//! Tests that span several strata crates live in `tests/tests/*.rs`, and committed fixtures will
//! live in `tests/fixtures/`. `tests/tests/tidy.rs` holds the tidy checks, ordinary `#[test]`s
//! over the source tree: every module opens with a `//!` paragraph, every library crate warns on
//! missing docs, each crate depends only on the strata crates DESIGN.md allows, and third-party
//! versions are pinned once in the workspace root. This library itself holds no code yet.
//!
//! Dependencies: any strata crate (it sits above all of them and nothing depends on it).
#![warn(missing_docs)]
