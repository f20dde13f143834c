//! The CPU backend: every operation a decoder model needs.
//!
//! Each operation exists twice with the same signature: a plain scalar version in
//! [`reference`](mod@reference), written for clarity, and the fast version here, multi-threaded with rayon (it
//! uses whatever rayon pool it is called in, so `ThreadPool::install` sets the thread count) and
//! vectorised with `std::arch` behind runtime feature detection ([`Isa`]). Tests compare the two
//! on random shapes, awkward sizes included, with tolerance `abs + |ref| * eps`.
//!
//! Layout conventions: activations are f32 slices, row-major, a token per row. Weights are
//! [`crate::Tensor`]s of any [`crate::DType`], stored `[n_out, n_in]` as in Hugging Face
//! checkpoints. Attention tensors are `[tokens, heads, head_dim]`.

mod attention;
mod bandwidth;
mod elementwise;
mod embedding;
mod gating;
mod matmul;
mod matmul_quant;
mod matvec;
mod matvec_float;
mod matvec_many;
mod matvec_quant;
mod norm;
pub mod reference;
mod rope;
mod simd;
mod softmax;
mod team;
mod vec;

pub use attention::*;
pub use bandwidth::{DEFAULT_BANDWIDTH_BYTES, read_bandwidth, sum_f32};
pub use elementwise::*;
pub use embedding::*;
pub use gating::*;
pub use matmul::*;
pub use matmul_quant::matmul_quantized;
pub use matvec::*;
pub use matvec_many::{MatvecWeight, matvec_many};
pub use matvec_quant::RepackedWeight;
pub use norm::*;
pub use rope::*;
pub use simd::{Isa, isa};
pub use softmax::*;
pub use team::{in_team, join, prefetch_next, with_team};

pub use crate::quant::q8act::{ActQuant, act_quant, set_act_quant};
