//! `cargo xtask fuzz TARGET SECONDS`: runs a cargo-fuzz target from `fuzz/` for a fixed time
//! and reports how many inputs libFuzzer executed.
//!
//! The machines have only the stable toolchain, so the run sets `RUSTC_BOOTSTRAP=1` (cargo-fuzz
//! needs nightly-only flags) and installs cargo-fuzz with `cargo install cargo-fuzz --locked`
//! when it is missing. Seed inputs committed under `fuzz/seeds/TARGET/` are copied into the
//! working corpus `fuzz/corpus/TARGET/` (not committed) before the run, and a dictionary at
//! `fuzz/dicts/TARGET.dict` is passed to libFuzzer when one exists. A crash fails the command;
//! libFuzzer leaves the crashing input under `fuzz/artifacts/TARGET/`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Runs fuzz target `target` for `seconds` seconds and prints libFuzzer's execution count.
pub fn run(target: &str, seconds: u64) -> Result<()> {
    let root = repo_root();
    let fuzz_dir = root.join("fuzz");
    let source = fuzz_dir.join("fuzz_targets").join(format!("{target}.rs"));
    if !source.is_file() {
        bail!("no fuzz target {target:?}: expected {}", source.display());
    }
    ensure_cargo_fuzz()?;
    seed_corpus(&fuzz_dir, target)?;

    let mut args = vec!["fuzz".to_owned(), "run".to_owned(), target.to_owned(), "--".to_owned()];
    args.push(format!("-max_total_time={seconds}"));
    let dict = fuzz_dir.join("dicts").join(format!("{target}.dict"));
    if dict.is_file() {
        args.push(format!("-dict={}", dict.display()));
    }

    eprintln!("running: RUSTC_BOOTSTRAP=1 cargo {}", args.join(" "));
    let mut child = Command::new("cargo")
        .args(&args)
        .current_dir(&root)
        .env("RUSTC_BOOTSTRAP", "1")
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run cargo fuzz")?;

    // libFuzzer reports on stderr: echo it as it comes and keep the execution count.
    let mut execs = None;
    let stderr = child.stderr.take().context("cargo fuzz's stderr was not captured")?;
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading cargo fuzz's output")?;
        eprintln!("{line}");
        if let Some(n) = parse_exec_count(&line) {
            execs = Some(n);
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    if !status.success() {
        bail!(
            "fuzz target {target} failed ({status}); a crashing input, if any, is under {}",
            fuzz_dir.join("artifacts").join(target).display()
        );
    }
    match execs {
        Some(n) => println!("fuzz target {target}: {n} executions in {seconds} s, no crash"),
        None => println!("fuzz target {target}: finished without a crash (libFuzzer reported no execution count)"),
    }
    Ok(())
}

/// The repository root: the parent of this crate's directory.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the repository root").to_path_buf()
}

/// Installs cargo-fuzz unless `cargo fuzz` already runs.
fn ensure_cargo_fuzz() -> Result<()> {
    let present = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    eprintln!("cargo-fuzz is not installed; running `cargo install cargo-fuzz --locked`");
    let status = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .status()
        .context("cannot run cargo install")?;
    if !status.success() {
        bail!("`cargo install cargo-fuzz --locked` failed ({status})");
    }
    Ok(())
}

/// Copies the committed seeds of `target` into its working corpus directory.
fn seed_corpus(fuzz_dir: &Path, target: &str) -> Result<()> {
    let seeds = fuzz_dir.join("seeds").join(target);
    if !seeds.is_dir() {
        return Ok(());
    }
    let corpus = fuzz_dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    for entry in std::fs::read_dir(&seeds).with_context(|| format!("reading {}", seeds.display()))? {
        let path = entry?.path();
        if let Some(name) = path.file_name().filter(|_| path.is_file()) {
            std::fs::copy(&path, corpus.join(name)).with_context(|| format!("copying seed {}", path.display()))?;
        }
    }
    Ok(())
}

/// The execution count in a libFuzzer line: `Done 123456 runs in 60 second(s)`, or a status
/// line such as `#123456\tpulse ...` / `#123456\tDONE ...`.
fn parse_exec_count(line: &str) -> Option<u64> {
    if let Some(rest) = line.strip_prefix("Done ") {
        return rest.split_whitespace().next()?.parse().ok();
    }
    let rest = line.strip_prefix('#')?;
    let (count, _) = rest.split_once(char::is_whitespace)?;
    count.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::parse_exec_count;

    #[test]
    fn exec_counts_are_read_from_libfuzzer_output() {
        assert_eq!(parse_exec_count("Done 1234567 runs in 121 second(s)"), Some(1234567));
        assert_eq!(parse_exec_count("#262144\tpulse  cov: 812 ft: 2301 corp: 301/12Kb exec/s: 87381"), Some(262144));
        assert_eq!(parse_exec_count("#9876543\tDONE   cov: 900 ft: 2500 corp: 400/20Kb exec/s: 80000"), Some(9876543));
        assert_eq!(parse_exec_count("INFO: Seed: 12345"), None);
        assert_eq!(parse_exec_count("#include"), None);
    }
}
