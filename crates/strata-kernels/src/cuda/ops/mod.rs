//! Launchers: one module per kernel file, each checking lengths on the host, filling the
//! parameter struct of `kernels/include/<file>.h`, and launching on the compute stream.

mod attention;
mod norm;

pub use attention::*;
pub use norm::*;
