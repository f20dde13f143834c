//! The GPU tests of strata-kernels, one module per kernel file: each kernel against its CPU
//! reference in strata-tensor on random shapes, plus the typed errors of its launcher. Without a
//! CUDA device every test skips with a message.
//!
//! One test binary rather than one per file: each binary embeds the PTX of every kernel, and the
//! device bundle carries the binaries to the GPU machine.

mod attention;
mod convert;
mod elementwise;
mod gating;
mod linear;
mod matvec;
mod norm;
mod pinned;
mod profile;
mod rope;
mod softmax;
