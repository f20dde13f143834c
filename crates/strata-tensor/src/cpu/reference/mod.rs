//! Scalar reference implementations of every CPU operation.
//!
//! Written for clarity, not speed: one element at a time, in the order the math is written,
//! with no threads and no SIMD. The fast versions in [`crate::cpu`] have the same signatures and
//! are tested against these.

mod attention;
mod elementwise;
mod embedding;
mod gating;
mod matmul;
mod matmul_quant;
mod matvec;
mod matvec_float;
mod matvec_quant;
mod norm;
mod rope;
mod softmax;

pub use attention::*;
pub use elementwise::*;
pub use embedding::*;
pub use gating::*;
pub use matmul::*;
pub use matmul_quant::*;
pub use matvec::*;
pub use norm::*;
pub use rope::*;
pub use softmax::*;
