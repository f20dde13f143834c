//! `cargo xtask`: strata's task runner (the alias lives in `.cargo/config.toml`).
//!
//! Commands: `test` (formatting, clippy, every test: what CI runs), `tidy` (the tidy checks in
//! tests/tests/tidy.rs), `bench` (CPU op microbenchmarks in release; `--peers` runs strata,
//! llama.cpp and mistral.rs on the same GGUF files), `fixtures` (reference logits from
//! transformers), `synth-model` (random-weight checkpoints of real shapes, safetensors or GGUF),
//! `fuzz`, `corpus` (a public-domain novel for perplexity), `kernels` (nvcc from PyPI when missing; PTX and a per-kernel register report) and
//! `device-bundle` (GPU test binaries, CLI, PTX and a run script for a machine without Rust).
//!
//! Dependencies: strata-tensor (the bench's ops, synth-model's quantization). Few third-party
//! crates: anyhow, rayon, gemm (the bench's reference GEMM), half and serde_json.

mod bench;
mod bundle;
mod corpus;
mod fixtures;
mod fuzz;
mod kernels;
mod peers;
mod synth;

use std::env;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail, ensure};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  test                        cargo fmt --check, clippy -D warnings, then every test (nextest when installed)
  tidy                        the tidy checks: module docs, dependency direction, pinned versions
  fixtures [--out DIR] [--venv DIR] [--list] [NAMES...]
                              regenerate the reference fixtures in tests/fixtures with transformers
                              (installs pinned torch + transformers into a cached venv once)
  synth-model --shape NAME --dtype D --out PATH [--layers N] [--format safetensors|gguf]
                              write a random-weight checkpoint of a real model's shape for benchmarks
                              (shapes: tinyllama-1.1b, llama-3-8b, smollm2-135m, mixtral-8x7b; safetensors: f32, f16, bf16
                              into the directory PATH; gguf, or PATH ending in .gguf: also q8_0, q4_0, q4_1,
                              q4_k, q6_k)
  kernels [--sass]            install the pinned nvcc (PyPI, cached venv) if none is found, compile every
                              kernels/*.cu to PTX, and print each kernel's registers and shared memory (sm_90);
                              --sass: the instructions per weight of the one-token quantized matvec main loop
                              (installs the pinned nvdisasm from PyPI)
  device-bundle [--out DIR]   build the GPU test binaries, the CLI, kernel_bench, PTX and run.sh into one
                              folder (default bundle/) to run on a GPU machine with no Rust
  corpus                      fetch a long public-domain text for perplexity (Pride and Prejudice, from the
                              Debian package r-cran-janeaustenr) and print its path
  fuzz [TARGET] [SECONDS]     run a cargo-fuzz target (default safetensors_header, 600 s) and print the exec count
  bench [--threads N] [--json]
                              CPU op microbenchmarks in release: memory bandwidth, decode matvec per dtype,
                              f32 prefill matmul next to the gemm crate (N threads, default 2)
  bench --peers [--threads N] [--files FILE.gguf...] [--rounds N] [--int8] [--json]
                              strata against llama.cpp and mistral.rs on the same GGUF files (installs them
                              into $XDG_CACHE_HOME/strata/peers once): prefill 128 and decode 64 tokens,
                              best of N rounds and paired per-round ratios; --int8: also strata with
                              --act-quant int8; --json: JSON on stdout, the table on stderr
  bench --offload [--file FILE.gguf] [--max-ram SIZE] [--threads N] [--rounds N] [--json]
                                  [--llama-no-repack] [--llama-minutes N]
                              decode with --max-ram (default a third of the file, synthetic TinyLlama q8_0) against
                              the disk bound, the stream-all depth-0 baseline and llama.cpp in a memory cgroup";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line, without a backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    let rest = args.get(1..).unwrap_or_default();
    match args.first().map(String::as_str) {
        Some("test") => {
            no_arguments("test", rest)?;
            test()
        }
        Some("tidy") => {
            no_arguments("tidy", rest)?;
            step(&["test", "-p", "strata-tests", "--test", "tidy"])
        }
        Some("bench") if rest.iter().any(|a| a == "--peers") => peers::run(rest),
        Some("bench") if rest.iter().any(|a| a == "--offload") => peers::offload::run(rest),
        Some("bench") => bench(rest),
        Some("fuzz") => {
            let target = rest.first().map(String::as_str).unwrap_or("safetensors_header");
            let seconds = match rest.get(1) {
                Some(s) => s.parse().with_context(|| format!("seconds must be a number, got {s:?}"))?,
                None => 600,
            };
            fuzz::run(target, seconds)
        }
        Some("synth-model") => synth_model(rest),
        Some("kernels") => match rest {
            [] => kernels::run(&workspace_root()),
            [flag] if flag == "--sass" => kernels::sass(&workspace_root()),
            _ => bail!("kernels takes no arguments but --sass, got {rest:?}"),
        },
        Some("device-bundle") => bundle::run(rest),
        Some("corpus") => {
            no_arguments("corpus", rest)?;
            corpus::run()
        }
        Some("fixtures") => fixtures::run(&fixtures::FixturesArgs::parse(rest)?),
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            Ok(())
        }
        None => bail!("no command given\n\n{USAGE}"),
        Some(other) => bail!("unknown command `{other}`\n\n{USAGE}"),
    }
}

fn no_arguments(command: &str, rest: &[String]) -> Result<()> {
    ensure!(rest.is_empty(), "`cargo xtask {command}` takes no arguments, got {rest:?}");
    Ok(())
}

/// The workspace root (xtask sits one level below it).
fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask/ sits in the workspace root").to_path_buf()
}

/// A `cargo` command run from the workspace root, with the cargo that started xtask.
fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `cargo <args>`, failing with the step's command line if it fails.
fn step(args: &[&str]) -> Result<()> {
    let line = format!("cargo {}", args.join(" "));
    eprintln!("\n==> {line}");
    // No step reads standard input.
    let status =
        cargo().args(args).stdin(Stdio::null()).status().with_context(|| format!("could not start `{line}`"))?;
    ensure!(status.success(), "step failed: `{line}` ({status})");
    Ok(())
}

/// Whether `cargo nextest` is installed.
fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The features that turn on CUDA in every crate that has it.
const CUDA_FEATURES: &str = "strata-kernels/cuda,strata-models/cuda,strata/cuda,strata-cli/cuda,strata-tests/cuda";

/// The same for the packages whose tests run with the feature (the GPU parts skip without a
/// device).
const CUDA_TEST_FEATURES: &str = "strata-kernels/cuda,strata-tests/cuda";

/// What CI runs: formatting, lints, then every test, stopping at the first failing step.
fn test() -> Result<()> {
    step(&["fmt", "--all", "--", "--check"])?;
    step(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    // The CUDA code builds without a GPU: clippy and the tests (whose GPU parts skip) run with
    // the feature too when nvcc is here (`cargo xtask kernels` installs it; CI runs that first).
    let cuda = kernels::find_nvcc().is_some();
    if cuda {
        step(&["clippy", "--workspace", "--features", CUDA_FEATURES, "--all-targets", "--", "-D", "warnings"])?;
    } else {
        eprintln!("\nno nvcc found: the `cuda` feature is not checked (run `cargo xtask kernels` to install it)");
    }
    if has_nextest() {
        // nextest does not run doctests, so they run first (its summary then closes the output).
        step(&["test", "--workspace", "--doc"])?;
        step(&["nextest", "run", "--workspace"])?;
        if cuda {
            // The emulation tests (`strata-kernels/tests/emu`) do not use the feature, so the
            // first pass has run them already: they take about six minutes on two cores.
            step(&[
                "nextest",
                "run",
                "-p",
                "strata-kernels",
                "-p",
                "strata-tests",
                "--features",
                CUDA_TEST_FEATURES,
                "-E",
                "not binary(emu)",
            ])?;
        }
    } else {
        eprintln!(
            "\ncargo-nextest is not installed, so the tests run under `cargo test` \
             (install it with `cargo install cargo-nextest --locked`)"
        );
        step(&["test", "--workspace"])?;
        if cuda {
            step(&["test", "-p", "strata-kernels", "-p", "strata-tests", "--features", CUDA_TEST_FEATURES])?;
        }
    }
    eprintln!("\nxtask test: all steps passed");
    Ok(())
}

/// Runs the benchmarks, first rebuilding xtask in release when this is a debug build.
fn bench(args: &[String]) -> Result<()> {
    let opts = bench::Options::parse(args)?;
    if cfg!(debug_assertions) {
        let mut cmd = cargo();
        cmd.args(["run", "--release", "--quiet", "-p", "xtask"]);
        cmd.arg("--").arg("bench").args(opts.to_args());
        eprintln!("xtask bench: building and running in release");
        let status = cmd.status().context("could not start `cargo run --release -p xtask`")?;
        ensure!(status.success(), "the release bench failed ({status})");
        return Ok(());
    }
    bench::run(&opts)
}

/// `synth-model --shape NAME --dtype D --out PATH [--layers N] [--format F]`.
fn synth_model(args: &[String]) -> Result<()> {
    let (mut shape, mut dtype, mut out, mut layers, mut format) = (None, None, None, None, None);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--shape" => shape = Some(value()?.clone()),
            "--dtype" => dtype = Some(value()?.clone()),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--format" => format = Some(synth::Format::from_name(value()?)?),
            "--layers" => {
                let v = value()?;
                layers = Some(v.parse().with_context(|| format!("--layers must be a number, got {v:?}"))?);
            }
            other => bail!("unknown synth-model argument {other:?}"),
        }
    }
    let shape = shape.context("synth-model needs --shape")?;
    let out = out.context("synth-model needs --out PATH")?;
    synth::run(&shape, dtype.as_deref().unwrap_or("bf16"), layers, format, &out).map(drop)
}
