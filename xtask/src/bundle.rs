//! `cargo xtask device-bundle [--out DIR]`: everything the GPU machine needs to run strata's GPU
//! tests and benchmarks without Rust, in one folder (default `bundle/`, ignored by git) under
//! 60 MB:
//!
//! - `bin/strata` (the CLI with `--features cuda`), `bin/kernel_bench`, `bin/xtask` (for
//!   `synth-model`), release builds stripped of debug info and symbols;
//! - `tests/*`: the test binaries of strata-kernels and strata-tests' `cuda_models`, built with
//!   `--features cuda --no-run`, stripped of debug info (their symbols kept for backtraces);
//! - `ptx/*.ptx`: the kernels as embedded in those binaries (for inspection with cuobjdump or
//!   ptxas on that machine);
//! - `fixtures/`: the committed test fixtures the tests read (`STRATA_FIXTURES_DIR`);
//! - `run.sh`: runs all of it and writes to `$OUT` a summary, the decode kernel profiles
//!   (`strata bench --kernel-profile`) and the kernel benchmarks, with every other log and JSON
//!   report in one archive, `all.tgz` (some GPU machines return only a few files).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

use crate::{cargo, kernels, workspace_root};

/// The bound, 60 MB: the bundle must fit the GPU machine's transfer (64 MiB) with room
/// to spare.
const MAX_BUNDLE_BYTES: u64 = 60_000_000;

/// The GPU machine's run script, copied into the bundle.
const RUN_SH: &str = include_str!("bundle_run.sh");

/// `cargo xtask device-bundle`.
pub fn run(args: &[String]) -> Result<()> {
    let root = workspace_root();
    let mut out = root.join("bundle");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = PathBuf::from(it.next().context("--out needs a directory")?),
            other => bail!("device-bundle: unknown argument {other:?}"),
        }
    }
    let nvcc = kernels::ensure_nvcc()?;
    eprintln!("device-bundle: nvcc {}", nvcc.display());

    let mut executables = Vec::new();
    // The test binaries, with their names.
    let tests = cargo_json(&[
        "test",
        "--release",
        "--no-run",
        "-p",
        "strata-kernels",
        "-p",
        "strata-tests",
        "--features",
        "strata-kernels/cuda,strata-tests/cuda",
        "--tests",
    ])?;
    for a in &tests {
        // Every strata-kernels test but the CPU emulation of the kernels (`emu`, which builds
        // from the repository's sources), and the CUDA model test of strata-tests (the others
        // need the repository or run on the CPU).
        let kernels = a.package.contains("strata-kernels") && a.name != "emu";
        if a.is_test && (kernels || a.name == "cuda_models") {
            executables.push(("tests", a.name.clone(), a.path.clone()));
        }
    }
    let cli = cargo_json(&["build", "--release", "-p", "strata-cli", "--features", "cuda", "--bin", "strata"])?;
    let bench =
        cargo_json(&["build", "--release", "-p", "strata-kernels", "--features", "cuda", "--example", "kernel_bench"])?;
    let xtask = cargo_json(&["build", "--release", "-p", "xtask", "--bin", "xtask"])?;
    for (set, name) in [(&cli, "strata"), (&bench, "kernel_bench"), (&xtask, "xtask")] {
        let a = set.iter().find(|a| a.name == name).with_context(|| format!("cargo built no executable `{name}`"))?;
        executables.push(("bin", name.to_string(), a.path.clone()));
    }

    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("removing the old {}", out.display()))?;
    }
    for sub in ["bin", "tests", "ptx"] {
        std::fs::create_dir_all(out.join(sub))?;
    }
    for (sub, name, path) in &executables {
        let dst = out.join(sub).join(name);
        std::fs::copy(path, &dst).with_context(|| format!("copying {}", path.display()))?;
        // Debug info is most of a release binary's size; the GPU machine needs none of it. The
        // test binaries keep their symbols, for readable backtraces of a failing test; the
        // tools (bin/) lose them too.
        let strip = if *sub == "tests" { "--strip-debug" } else { "--strip-all" };
        let status = Command::new("strip").arg(strip).arg(&dst).status().context("running strip")?;
        ensure!(status.success(), "strip failed on {}", dst.display());
    }
    for ptx in newest_ptx(&root.join("target/release/build"))? {
        std::fs::copy(&ptx, out.join("ptx").join(ptx.file_name().unwrap()))?;
    }
    copy_dir(&root.join("tests/fixtures"), &out.join("fixtures"))?;
    let run_sh = out.join("run.sh");
    std::fs::write(&run_sh, RUN_SH)?;
    let status = Command::new("chmod").arg("+x").arg(&run_sh).status()?;
    ensure!(status.success(), "chmod failed");

    let size = dir_size(&out)?;
    eprintln!("device-bundle: {} ({:.1} MB): {} executables", out.display(), size as f64 / 1e6, executables.len());
    for (sub, name, _) in &executables {
        eprintln!("  {sub}/{name}");
    }
    ensure!(size <= MAX_BUNDLE_BYTES, "the bundle is {size} bytes, over the {MAX_BUNDLE_BYTES}-byte limit");
    eprintln!("device-bundle: run it on the GPU machine with `bash bundle/run.sh` (OUT=dir for the reports)");
    Ok(())
}

/// An executable cargo built.
struct Artifact {
    /// The target's name.
    name: String,
    /// The package id (holds the package name).
    package: String,
    /// The executable.
    path: PathBuf,
    /// Whether it is a test harness.
    is_test: bool,
}

/// Runs cargo with `--message-format=json` and returns each executable it built.
fn cargo_json(args: &[&str]) -> Result<Vec<Artifact>> {
    let line = format!("cargo {}", args.join(" "));
    eprintln!("\n==> {line}");
    let output = cargo()
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    ensure!(output.status.success(), "`{line}` failed ({})", output.status);
    let mut found = Vec::new();
    for l in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else { continue };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = v["executable"].as_str() else { continue };
        found.push(Artifact {
            name: v["target"]["name"].as_str().unwrap_or_default().to_string(),
            package: v["package_id"].as_str().unwrap_or_default().to_string(),
            path: PathBuf::from(exe),
            is_test: v["profile"]["test"].as_bool().unwrap_or(false),
        });
    }
    Ok(found)
}

/// The `.ptx` files of the most recent strata-kernels build script run.
fn newest_ptx(build: &Path) -> Result<Vec<PathBuf>> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(build).with_context(|| format!("reading {}", build.display()))?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let out = entry.path().join("out");
        if !name.starts_with("strata-kernels-") || !out.join("kernels.rs").is_file() {
            continue;
        }
        let t = out.join("kernels.rs").metadata()?.modified()?;
        if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
            best = Some((t, out));
        }
    }
    let (_, dir) = best.context("no strata-kernels build output with PTX found")?;
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "ptx"))
        .collect();
    v.sort();
    Ok(v)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))?.flatten() {
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let p = entry.path();
        total += if p.is_dir() { dir_size(&p)? } else { entry.metadata()?.len() };
    }
    Ok(total)
}
