//! Launchers: one module per kernel file, each checking lengths on the host, filling the
//! parameter struct of `kernels/include/<file>.h`, and launching on the compute stream.

mod attention;
mod elementwise;
mod gating;
mod norm;
mod rope;
mod softmax;

pub use attention::*;
pub use elementwise::*;
pub use gating::*;
pub use norm::*;
pub use rope::*;
pub use softmax::*;
