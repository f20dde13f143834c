//! Launchers: one module per kernel file, each checking lengths on the host, filling the
//! parameter struct of `kernels/include/<file>.h`, and launching on the compute stream.

mod convert;
mod linear;
mod matvec;
mod norm;

pub use convert::*;
pub use linear::*;
pub use matvec::*;
pub use norm::*;
