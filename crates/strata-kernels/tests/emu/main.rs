//! Kernels of `kernels/*.cu` run on the CPU, unchanged, through the emulation in `kernels/emu/`
//! (a host thread per CUDA thread, barriers for `__syncthreads` and the warp collectives, one copy
//! of shared memory per block), against the CPU references. This is what can be checked of them
//! on a machine without a GPU: their arithmetic, indexing and bounds. Not their speed, nor the
//! timing of asynchronous copies, which the emulation performs at once (the GPU tests in
//! `tests/gpu/` run the same kernels on a device).
//!
//! Each launch mirrors its launcher in `cuda::ops` (grid, block, shared memory, parameters).
//! Needs a C++20 compiler (`CXX`, else `c++`); without one the tests say so and pass.

mod attention;
mod convert;
mod driver;
mod elementwise;
mod gating;
mod matvec;
mod norm;
mod rope;
mod softmax;
