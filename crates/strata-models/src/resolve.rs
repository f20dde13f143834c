//! Model resolution: turns the `--model` spec of the CLI contract into something on disk.
//!
//! A spec is tried, in order, as
//! 1. a path: a directory holding `config.json` (a Hugging Face checkpoint), or a `.gguf` file;
//! 2. a model id (`org/name`, or a bare `name`) in the local Hugging Face hub cache, the
//!    directory `models--org--name` under `$HF_HUB_CACHE`, else `$HF_HOME/hub`, where
//!    `HF_HOME` defaults to `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`
//!    (the rules of `huggingface_hub`). The snapshot is the revision `refs/main` names when
//!    that file exists, else the only directory under `snapshots/`; with several snapshots
//!    and no `refs/main`, the most recently modified one (ties broken by name, so the choice
//!    is deterministic). A snapshot with `config.json` is a checkpoint directory; one without
//!    it but with exactly one `.gguf` file resolves to that file.
//!
//! Nothing is downloaded. Failures say which paths were examined.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::error::{Error, Result};

/// Where a model lives on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face checkpoint directory (it holds `config.json`).
    Dir(PathBuf),
    /// A GGUF file.
    Gguf(PathBuf),
}

impl ModelSource {
    /// The directory or file.
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Dir(p) | ModelSource::Gguf(p) => p,
        }
    }
}

/// Resolves `spec` as a path, else as a model id in the local Hugging Face cache found through
/// the process environment (see the module documentation).
pub fn resolve_model(spec: &str) -> Result<ModelSource> {
    let cache = hub_cache_dir(|name| std::env::var_os(name));
    resolve_model_in(spec, cache.as_deref())
}

/// The Hugging Face hub cache directory according to the environment variables `var` reads:
/// `HF_HUB_CACHE` (or its older name `HUGGINGFACE_HUB_CACHE`), else `HF_HOME/hub`, where
/// `HF_HOME` defaults to `XDG_CACHE_HOME/huggingface`, else `HOME/.cache/huggingface`.
/// `None` when none of these is set.
pub fn hub_cache_dir(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(cache) = set("HF_HUB_CACHE").or_else(|| set("HUGGINGFACE_HUB_CACHE")) {
        return Some(cache);
    }
    let home = set("HF_HOME")
        .or_else(|| set("XDG_CACHE_HOME").map(|x| x.join("huggingface")))
        .or_else(|| set("HOME").map(|h| h.join(".cache").join("huggingface")))?;
    Some(home.join("hub"))
}

/// Resolves `spec` as a path, else as a model id in the hub cache rooted at `cache` (the
/// directory holding `models--*`; `None` when there is no cache to look in).
pub fn resolve_model_in(spec: &str, cache: Option<&Path>) -> Result<ModelSource> {
    let mut searched = Vec::new();
    let not_found =
        |what: String, searched: Vec<PathBuf>| Error::ModelNotFound { spec: spec.to_owned(), what, searched };

    let path = Path::new(spec);
    searched.push(path.to_path_buf());
    if path.is_dir() {
        if path.join("config.json").is_file() {
            return Ok(ModelSource::Dir(path.to_path_buf()));
        }
        return Err(not_found(format!("directory {} has no config.json", path.display()), searched));
    }
    if path.is_file() {
        if is_gguf(path) {
            return Ok(ModelSource::Gguf(path.to_path_buf()));
        }
        let what = format!("{} is a file but not a .gguf file", path.display());
        return Err(not_found(what, searched));
    }

    let Some(repo) = repo_dir_name(spec) else {
        return Err(not_found("no such file or directory, and not a model id (org/name)".into(), searched));
    };
    let Some(cache) = cache else {
        let what = "no such path, and no Hugging Face cache is configured (set HF_HUB_CACHE or HF_HOME)".into();
        return Err(not_found(what, searched));
    };
    let repo = cache.join(repo);
    searched.push(repo.clone());
    if !repo.is_dir() {
        return Err(not_found("no such path, and the model is not in the Hugging Face cache".into(), searched));
    }

    let snapshot = match pick_snapshot(&repo, &mut searched) {
        Ok(s) => s,
        Err(what) => return Err(not_found(what, searched)),
    };
    searched.push(snapshot.clone());
    if snapshot.join("config.json").is_file() {
        return Ok(ModelSource::Dir(snapshot));
    }
    let ggufs = match list_dir(&snapshot) {
        Ok(entries) => entries.into_iter().filter(|p| p.is_file() && is_gguf(p)).collect::<Vec<_>>(),
        Err(e) => return Err(Error::Io { path: snapshot, error: e }),
    };
    match ggufs.as_slice() {
        [one] => Ok(ModelSource::Gguf(one.clone())),
        [] => Err(not_found(
            format!("snapshot {} has neither config.json nor a .gguf file", snapshot.display()),
            searched,
        )),
        many => {
            let names: Vec<String> =
                many.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect();
            let what = format!(
                "snapshot {} has several .gguf files ({}); pass the path of one",
                snapshot.display(),
                names.join(", ")
            );
            Err(not_found(what, searched))
        }
    }
}

/// Whether `path` names a `.gguf` file (by extension, any case).
fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The cache directory name for a model id: `org/name` -> `models--org--name`, `name` ->
/// `models--name`. `None` when `spec` is not a model id.
fn repo_dir_name(spec: &str) -> Option<String> {
    let valid_part = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let parts: Vec<&str> = spec.split('/').collect();
    match parts.as_slice() {
        [name] if valid_part(name) => Some(format!("models--{name}")),
        [org, name] if valid_part(org) && valid_part(name) => Some(format!("models--{org}--{name}")),
        _ => None,
    }
}

/// The snapshot directory to use in a cached repo, or why there is none.
fn pick_snapshot(repo: &Path, searched: &mut Vec<PathBuf>) -> std::result::Result<PathBuf, String> {
    let snapshots = repo.join("snapshots");
    let main_ref = repo.join("refs").join("main");
    if main_ref.is_file() {
        searched.push(main_ref.clone());
        let rev = std::fs::read_to_string(&main_ref).map_err(|e| format!("cannot read {}: {e}", main_ref.display()))?;
        let rev = rev.trim();
        if rev.is_empty() || rev.contains(['/', '\\']) || rev == "." || rev == ".." {
            return Err(format!("{} holds {rev:?}, not a revision", main_ref.display()));
        }
        let dir = snapshots.join(rev);
        if dir.is_dir() {
            return Ok(dir);
        }
        return Err(format!("{} names revision {rev}, but {} does not exist", main_ref.display(), dir.display()));
    }

    searched.push(snapshots.clone());
    let entries = list_dir(&snapshots).map_err(|e| format!("cannot list {}: {e}", snapshots.display()))?;
    let mut dirs: Vec<(SystemTime, PathBuf)> = entries
        .into_iter()
        .filter(|p| p.is_dir())
        .map(|p| {
            let modified = p.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            (modified, p)
        })
        .collect();
    // Most recently modified last; equal times are ordered by name.
    dirs.sort();
    match dirs.pop() {
        Some((_, dir)) => Ok(dir),
        None => Err(format!("{} holds no snapshot", snapshots.display())),
    }
}

/// The entries of a directory, sorted by path.
fn list_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut entries = std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<std::io::Result<Vec<_>>>()?;
    entries.sort();
    Ok(entries)
}
