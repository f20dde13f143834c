//! The `strata` command-line tool.
//!
//! It will drive the engine through the commands DESIGN.md's CLI contract fixes (`generate`,
//! `chat`, `logits`, `bench`, `plan`, `pack`), which arrive with the issues that build the parts
//! they need. Today it has no subcommands: it prints its help and its version, and rejects
//! anything else.
//!
//! Dependencies: strata only (the facade); everything below it is reached through it.

use clap::Parser;

/// Run large language models that do not fit in GPU memory, streaming weights from RAM and NVMe.
///
/// No subcommands are implemented yet: `generate`, `chat`, `logits`, `bench`, `plan` and `pack`
/// arrive as the engine grows. For operation benchmarks of the CPU tensor core, run
/// `cargo xtask bench` in the source tree.
#[derive(Debug, Parser)]
#[command(name = "strata", version, arg_required_else_help = true)]
struct Cli {}

fn main() {
    // With no subcommands yet, parsing either prints the help or the version and exits, or
    // reports the unexpected argument and exits with an error.
    let _cli = Cli::parse();
}
