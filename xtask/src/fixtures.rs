//! `cargo xtask fixtures [--out DIR] [--venv DIR] [--list] [NAMES...]`: regenerates the reference fixtures in
//! `tests/fixtures` from Hugging Face transformers. It keeps a Python venv with pinned versions of torch,
//! transformers, safetensors and numpy in `$XDG_CACHE_HOME/strata/fixtures-venv` (default
//! `~/.cache/strata/fixtures-venv`), installs them with pip from the default index the first time (about
//! 3 GB), then runs `xtask/fixtures/gen_fixtures.py`, which holds the list of fixtures. Tests and CI only
//! read the committed fixtures and never need Python.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The packages the fixtures are generated with, pinned: the same list as `PINNED` in gen_fixtures.py.
pub const PINNED: [(&str, &str); 4] =
    [("torch", "2.15.0"), ("transformers", "5.24.0"), ("safetensors", "0.8.0"), ("numpy", "2.4.6")];

/// The usage line of `cargo xtask fixtures`.
pub const USAGE: &str = "\
usage: cargo xtask fixtures [--out DIR] [--venv DIR] [--list] [NAMES...]
  regenerates the reference fixtures (all, or only NAMES) with transformers in a cached venv
  --out DIR   output directory (default: tests/fixtures in the workspace)
  --venv DIR  the venv to create or reuse (default: $XDG_CACHE_HOME/strata/fixtures-venv,
              or ~/.cache/strata/fixtures-venv)
  --list      print the fixture names and what each exercises, then exit";

/// What `cargo xtask fixtures` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixturesArgs {
    /// The directory the fixtures are written to, one subdirectory each.
    pub out_dir: PathBuf,
    /// The venv holding the pinned packages; created when missing.
    pub venv: PathBuf,
    /// Only these fixtures; all of them when empty.
    pub names: Vec<String>,
    /// Print the fixture list instead of generating.
    pub list: bool,
    /// Print [`USAGE`] and do nothing else.
    pub help: bool,
}

impl FixturesArgs {
    /// Parses the arguments that follow `fixtures` on the command line; no arguments give the defaults (every
    /// fixture into the workspace's `tests/fixtures`, the venv in the user's cache).
    pub fn parse<I, S>(args: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let (mut out_dir, mut venv) = (None, None);
        let (mut names, mut list, mut help) = (Vec::new(), false, false);
        let mut args = args.into_iter().map(Into::into);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--out" => out_dir = Some(PathBuf::from(args.next().context("--out needs a directory")?)),
                "--venv" => venv = Some(PathBuf::from(args.next().context("--venv needs a directory")?)),
                "--list" => list = true,
                "-h" | "--help" => help = true,
                flag if flag.starts_with('-') => bail!("unknown flag {flag}\n{USAGE}"),
                _ => names.push(arg),
            }
        }
        let venv = match venv {
            Some(venv) => venv,
            None => default_venv_dir(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))?,
        };
        let out_dir = out_dir.unwrap_or_else(|| workspace_root().join("tests").join("fixtures"));
        Ok(Self { out_dir, venv, names, list, help })
    }
}

/// Runs `cargo xtask fixtures`: makes sure the venv has the pinned packages, then runs the generator.
pub fn run(args: &FixturesArgs) -> Result<()> {
    if args.help {
        println!("{USAGE}");
        return Ok(());
    }
    let python = ensure_venv(&args.venv)?;
    let script = workspace_root().join("xtask").join("fixtures").join("gen_fixtures.py");
    let mut command = Command::new(&python);
    command.arg(&script).arg("--out").arg(&args.out_dir).current_dir(workspace_root());
    if args.list {
        command.arg("--list");
    }
    command.args(&args.names);
    let status = command.status().with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    Ok(())
}

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// The default venv location from the values of `XDG_CACHE_HOME` and `HOME`. Per the XDG base directory
/// specification, an empty or relative `XDG_CACHE_HOME` is ignored.
fn default_venv_dir(xdg_cache_home: Option<OsString>, home: Option<OsString>) -> Result<PathBuf> {
    let cache = match xdg_cache_home.map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        _ => match home {
            Some(home) if !home.is_empty() => PathBuf::from(home).join(".cache"),
            _ => bail!("neither XDG_CACHE_HOME nor HOME is set: pass --venv DIR"),
        },
    };
    Ok(cache.join("strata").join("fixtures-venv"))
}

/// Creates the venv if needed and installs the pinned packages unless exactly those versions are present.
/// Returns the venv's Python.
fn ensure_venv(venv: &Path) -> Result<PathBuf> {
    let python = venv.join("bin").join("python");
    if !python.exists() {
        let base = std::env::var_os("STRATA_PYTHON").unwrap_or_else(|| OsString::from("python3"));
        eprintln!("creating a Python venv in {} with {}", venv.display(), base.to_string_lossy());
        run_checked(Command::new(&base).arg("-m").arg("venv").arg(venv), "python3 -m venv")
            .context("creating the fixtures venv needs Python 3 with the venv module (Debian: python3-venv)")?;
    }
    let missing = version_mismatches(&python)?;
    if missing.is_empty() {
        return Ok(python);
    }
    eprintln!("installing torch + transformers into {} (about 3 GB, once): {}", venv.display(), missing.join(", "));
    let specs: Vec<String> = PINNED.iter().map(|(name, version)| format!("{name}=={version}")).collect();
    run_checked(Command::new(&python).args(["-m", "pip", "install"]).args(&specs), "pip install")?;
    let still = version_mismatches(&python)?;
    if !still.is_empty() {
        bail!("after pip install, {} still has {}", venv.display(), still.join(", "));
    }
    Ok(python)
}

/// The pinned packages whose installed version differs, as "name found (want pinned)".
fn version_mismatches(python: &Path) -> Result<Vec<String>> {
    let names: Vec<&str> = PINNED.iter().map(|(name, _)| *name).collect();
    let probe = format!(
        "import importlib.metadata as m\nfor n in {names:?}:\n    try:\n        print(n, m.version(n))\n    \
         except m.PackageNotFoundError:\n        print(n, '-')\n"
    );
    let output =
        Command::new(python).arg("-c").arg(probe).output().with_context(|| format!("running {}", python.display()))?;
    if !output.status.success() {
        bail!("{} could not list its packages: {}", python.display(), String::from_utf8_lossy(&output.stderr));
    }
    Ok(mismatches(&String::from_utf8_lossy(&output.stdout)))
}

/// Compares the probe's "name version" lines (version "-" when absent) against [`PINNED`].
fn mismatches(probe_output: &str) -> Vec<String> {
    PINNED
        .iter()
        .filter_map(|(name, want)| {
            let found = probe_output
                .lines()
                .filter_map(|line| line.split_once(' '))
                .find(|(n, _)| n == name)
                .map_or("-", |(_, version)| version.trim());
            (found != *want).then(|| {
                let found = if found == "-" { "missing" } else { found };
                format!("{name} {found} (want {want})")
            })
        })
        .collect()
}

/// Runs a command with inherited output and fails, naming it `what`, when it does not exit successfully.
fn run_checked(command: &mut Command, what: &str) -> Result<()> {
    let status = command.status().with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_match_the_generator() {
        let script = std::fs::read_to_string(workspace_root().join("xtask/fixtures/gen_fixtures.py")).unwrap();
        let line = script.lines().find(|l| l.starts_with("PINNED = ")).expect("gen_fixtures.py defines PINNED");
        for (name, version) in PINNED {
            assert!(line.contains(&format!("\"{name}\": \"{version}\"")), "{name}=={version} missing from {line}");
        }
        assert_eq!(line.matches(':').count(), PINNED.len(), "gen_fixtures.py pins other packages: {line}");
    }

    #[test]
    fn venv_dir_follows_xdg_then_home() {
        let check = |xdg: Option<&str>, home: Option<&str>, want: Option<&str>| {
            let got = default_venv_dir(xdg.map(OsString::from), home.map(OsString::from)).ok();
            assert_eq!(got, want.map(PathBuf::from), "XDG_CACHE_HOME={xdg:?} HOME={home:?}");
        };
        check(Some("/x/cache"), Some("/home/u"), Some("/x/cache/strata/fixtures-venv"));
        check(Some("relative"), Some("/home/u"), Some("/home/u/.cache/strata/fixtures-venv"));
        check(Some(""), Some("/home/u"), Some("/home/u/.cache/strata/fixtures-venv"));
        check(None, Some("/home/u"), Some("/home/u/.cache/strata/fixtures-venv"));
        check(None, None, None);
        check(Some(""), Some(""), None);
    }

    #[test]
    fn version_probe_output_is_compared_exactly() {
        let all = "torch 2.15.0\ntransformers 5.24.0\nsafetensors 0.8.0\nnumpy 2.4.6\n";
        assert!(mismatches(all).is_empty());
        let off = "torch 2.15.1\ntransformers 5.24.0\nsafetensors -\nnumpy 2.4.6\n";
        assert_eq!(mismatches(off), ["torch 2.15.1 (want 2.15.0)", "safetensors missing (want 0.8.0)"]);
        assert_eq!(mismatches("").len(), PINNED.len());
    }

    #[test]
    fn parses_flags_and_names() {
        let args = FixturesArgs::parse(["--out", "/tmp/f", "llama_tied", "--venv", "/v", "qwen2_bias"]).unwrap();
        assert_eq!(args.out_dir, PathBuf::from("/tmp/f"));
        assert_eq!(args.venv, PathBuf::from("/v"));
        assert_eq!(args.names, ["llama_tied", "qwen2_bias"]);
        assert!(!args.list);
        assert!(FixturesArgs::parse(["--list"]).unwrap().list);
        assert!(FixturesArgs::parse(["-h"]).unwrap().help);
        assert!(FixturesArgs::parse(["--out"]).is_err());
        assert!(FixturesArgs::parse(["--bogus"]).is_err());
        let defaults = FixturesArgs::parse(Vec::<String>::new()).unwrap();
        assert!(defaults.out_dir.ends_with("tests/fixtures"));
        assert!(defaults.names.is_empty());
    }
}
