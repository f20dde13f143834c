//! Tests for model resolution against a fake Hugging Face cache in a temporary directory. The
//! cache root is passed explicitly, so no test touches the process environment.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use strata_models::resolve::{ModelSource, hub_cache_dir, resolve_model_in};
use strata_models::{Error, resolve_model};

/// Creates `models--org--name/snapshots/<rev>/` for each revision, each with the given files,
/// and returns the repo directory.
fn fake_repo(cache: &Path, id: &str, revs: &[(&str, &[&str])]) -> PathBuf {
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    for (rev, files) in revs {
        let snap = repo.join("snapshots").join(rev);
        fs::create_dir_all(&snap).unwrap();
        for f in *files {
            fs::write(snap.join(f), "{}").unwrap();
        }
    }
    repo
}

fn set_main(repo: &Path, rev: &str) {
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs").join("main"), rev).unwrap();
}

fn set_mtime(dir: &Path, secs: u64) {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    fs::File::open(dir).unwrap().set_modified(t).unwrap();
}

/// The error for `spec`, checking that it names the spec and lists where it looked.
fn not_found(spec: &str, cache: Option<&Path>) -> (String, Vec<PathBuf>) {
    match resolve_model_in(spec, cache) {
        Err(Error::ModelNotFound { spec: s, what, searched }) => {
            assert_eq!(s, spec);
            (what, searched)
        }
        other => panic!("expected ModelNotFound for {spec}, got {other:?}"),
    }
}

#[test]
fn existing_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ckpt");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("config.json"), "{}").unwrap();
    let gguf = tmp.path().join("model.Q4_1.GGUF");
    fs::write(&gguf, "GGUF").unwrap();

    let spec = dir.to_str().unwrap();
    assert_eq!(resolve_model_in(spec, None).unwrap(), ModelSource::Dir(dir.clone()));
    assert_eq!(resolve_model(spec).unwrap().path(), dir);
    assert_eq!(resolve_model_in(gguf.to_str().unwrap(), None).unwrap(), ModelSource::Gguf(gguf.clone()));

    let (what, _) = not_found(tmp.path().to_str().unwrap(), None);
    assert!(what.contains("has no config.json"), "{what}");
    let (what, _) = not_found(dir.join("config.json").to_str().unwrap(), None);
    assert!(what.contains("not a .gguf file"), "{what}");
}

#[test]
fn model_id_uses_refs_main() {
    let cache = tempfile::tempdir().unwrap();
    let repo = fake_repo(cache.path(), "org/tiny", &[("aaa", &["config.json"]), ("bbb", &["config.json"])]);
    set_main(&repo, "aaa\n");
    let got = resolve_model_in("org/tiny", Some(cache.path())).unwrap();
    assert_eq!(got, ModelSource::Dir(repo.join("snapshots").join("aaa")));

    set_main(&repo, "ccc");
    let (what, searched) = not_found("org/tiny", Some(cache.path()));
    assert!(what.contains("names revision ccc"), "{what}");
    assert!(searched.contains(&repo.join("refs").join("main")), "{searched:?}");
}

#[test]
fn model_id_with_one_snapshot_or_the_newest() {
    let cache = tempfile::tempdir().unwrap();
    let repo = fake_repo(cache.path(), "org/one", &[("only", &["config.json", "model.safetensors"])]);
    assert_eq!(
        resolve_model_in("org/one", Some(cache.path())).unwrap(),
        ModelSource::Dir(repo.join("snapshots").join("only"))
    );

    let repo = fake_repo(cache.path(), "org/many", &[("old", &["config.json"]), ("new", &["config.json"])]);
    set_mtime(&repo.join("snapshots").join("new"), 2_000_000_000);
    set_mtime(&repo.join("snapshots").join("old"), 1_000_000_000);
    assert_eq!(
        resolve_model_in("org/many", Some(cache.path())).unwrap(),
        ModelSource::Dir(repo.join("snapshots").join("new"))
    );
    set_mtime(&repo.join("snapshots").join("old"), 2_100_000_000);
    assert_eq!(
        resolve_model_in("org/many", Some(cache.path())).unwrap(),
        ModelSource::Dir(repo.join("snapshots").join("old"))
    );

    // A model id without an organisation.
    let repo = fake_repo(cache.path(), "gpt2", &[("r", &["config.json"])]);
    assert_eq!(resolve_model_in("gpt2", Some(cache.path())).unwrap().path(), repo.join("snapshots").join("r"));
}

#[test]
fn gguf_snapshots() {
    let cache = tempfile::tempdir().unwrap();
    let repo = fake_repo(cache.path(), "org/m-GGUF", &[("r", &["m.Q4_1.gguf", "README.md"])]);
    let snap = repo.join("snapshots").join("r");
    assert_eq!(
        resolve_model_in("org/m-GGUF", Some(cache.path())).unwrap(),
        ModelSource::Gguf(snap.join("m.Q4_1.gguf"))
    );

    fs::write(snap.join("m.Q8_0.gguf"), "GGUF").unwrap();
    let (what, _) = not_found("org/m-GGUF", Some(cache.path()));
    assert!(what.contains("several .gguf files") && what.contains("m.Q8_0.gguf"), "{what}");

    fake_repo(cache.path(), "org/empty", &[("r", &["README.md"])]);
    let (what, _) = not_found("org/empty", Some(cache.path()));
    assert!(what.contains("neither config.json nor a .gguf file"), "{what}");
}

#[test]
fn nothing_matches() {
    let cache = tempfile::tempdir().unwrap();
    let (what, searched) = not_found("org/absent", Some(cache.path()));
    assert!(what.contains("not in the Hugging Face cache"), "{what}");
    assert_eq!(searched, [PathBuf::from("org/absent"), cache.path().join("models--org--absent")]);
    let err = resolve_model_in("org/absent", Some(cache.path())).unwrap_err().to_string();
    assert!(err.contains("org/absent") && err.contains(&cache.path().display().to_string()), "{err}");

    let (what, _) = not_found("org/absent", None);
    assert!(what.contains("HF_HUB_CACHE"), "{what}");
    let (what, searched) = not_found("./no/such/dir", Some(cache.path()));
    assert!(what.contains("not a model id"), "{what}");
    assert_eq!(searched, [PathBuf::from("./no/such/dir")]);

    fs::create_dir_all(cache.path().join("models--org--nosnap").join("snapshots")).unwrap();
    let (what, _) = not_found("org/nosnap", Some(cache.path()));
    assert!(what.contains("holds no snapshot"), "{what}");
}

#[test]
fn cache_location_follows_huggingface_hub() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| OsString::from(v))
    };
    assert_eq!(hub_cache_dir(env(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h")])), Some(PathBuf::from("/c")));
    assert_eq!(hub_cache_dir(env(&[("HUGGINGFACE_HUB_CACHE", "/old")])), Some(PathBuf::from("/old")));
    assert_eq!(hub_cache_dir(env(&[("HF_HOME", "/h"), ("HOME", "/home/u")])), Some(PathBuf::from("/h/hub")));
    assert_eq!(
        hub_cache_dir(env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/u")])),
        Some(PathBuf::from("/x/huggingface/hub"))
    );
    assert_eq!(hub_cache_dir(env(&[("HOME", "/home/u")])), Some(PathBuf::from("/home/u/.cache/huggingface/hub")));
    assert_eq!(
        hub_cache_dir(env(&[("HF_HUB_CACHE", ""), ("HOME", "/u")])),
        Some(PathBuf::from("/u/.cache/huggingface/hub"))
    );
    assert_eq!(hub_cache_dir(env(&[])), None);
}
