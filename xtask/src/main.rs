//! cargo xtask

fn main() {}
