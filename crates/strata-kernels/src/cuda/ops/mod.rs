//! Launchers: one module per kernel file, each checking lengths on the host, filling the
//! parameter struct of `kernels/include/<file>.h`, and launching on the compute stream.

mod attention;
mod convert;
mod elementwise;
mod gating;
mod linear;
mod matvec;
mod norm;
mod rope;
mod softmax;

pub use attention::*;
pub use convert::*;
pub use elementwise::*;
pub use gating::*;
pub use linear::*;
pub use matvec::*;
pub use norm::*;
pub use rope::*;
pub use softmax::*;
