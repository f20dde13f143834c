//! Tidy checks over the source tree, run as ordinary tests (`cargo xtask tidy`).
//!
//! They check what review would otherwise have to remember: every Rust file opens with a `//!`
//! paragraph, every library crate warns on missing docs, each crate depends only on the strata
//! crates DESIGN.md's dependency direction allows, and every dependency of a member crate takes
//! its version from the workspace root, where each is pinned once. Each check is a function that
//! returns the violations it finds, tested on small inputs below and then run on the real tree.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, Item, TableLike};

/// What one workspace member may depend on among the strata crates.
struct Layer {
    /// The package name.
    krate: &'static str,
    /// Strata crates it may depend on.
    may_use: &'static [&'static str],
    /// Strata crates it may depend on only as an optional dependency (behind a feature).
    may_use_optionally: &'static [&'static str],
}

/// Every strata library crate, for the crates that sit above all of them.
const ALL_LIBRARIES: &[&str] =
    &["strata-tensor", "strata-kernels", "strata-nvme", "strata-planner", "strata-store", "strata-models", "strata"];

/// DESIGN.md's dependency direction, one row per workspace member. Nothing points upward:
/// `tensor <- kernels`; `nvme` on nothing of ours; `planner` on nothing or only `tensor` (for
/// dtype sizes); `store <- {tensor, kernels?, nvme, planner}`; `models <- {tensor, kernels?,
/// store}`; `strata <- models` (and `tensor`, so that the facade can name tensor types, see
/// docs/ARCHITECTURE.md); `cli <- strata`. The test crate may use every library; xtask uses the
/// tensor core for `cargo xtask bench`.
const LAYERS: &[Layer] = &[
    Layer { krate: "strata-tensor", may_use: &[], may_use_optionally: &[] },
    Layer { krate: "strata-kernels", may_use: &["strata-tensor"], may_use_optionally: &[] },
    Layer { krate: "strata-nvme", may_use: &[], may_use_optionally: &[] },
    Layer { krate: "strata-planner", may_use: &["strata-tensor"], may_use_optionally: &[] },
    Layer {
        krate: "strata-store",
        may_use: &["strata-tensor", "strata-nvme", "strata-planner"],
        may_use_optionally: &["strata-kernels"],
    },
    Layer {
        krate: "strata-models",
        may_use: &["strata-tensor", "strata-store"],
        may_use_optionally: &["strata-kernels"],
    },
    Layer { krate: "strata", may_use: &["strata-models", "strata-tensor"], may_use_optionally: &[] },
    Layer { krate: "strata-cli", may_use: &["strata"], may_use_optionally: &[] },
    Layer { krate: "strata-tests", may_use: ALL_LIBRARIES, may_use_optionally: &[] },
    Layer { krate: "xtask", may_use: &["strata-tensor"], may_use_optionally: &[] },
];

/// The kinds of dependency table a manifest can have.
const DEPENDENCY_KINDS: &[&str] = &["dependencies", "dev-dependencies", "build-dependencies"];

/// A workspace member: its package name, its directory and its parsed manifest.
struct Member {
    name: String,
    dir: PathBuf,
    manifest: DocumentMut,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace root").to_path_buf()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn parse(path: &Path) -> DocumentMut {
    read(path).parse().unwrap_or_else(|e| panic!("{} is not valid TOML: {e}", path.display()))
}

fn root_manifest() -> DocumentMut {
    parse(&workspace_root().join("Cargo.toml"))
}

/// The workspace members, found by expanding `workspace.members` of the root manifest (literal
/// directories, or `dir/*` for every subdirectory that holds a `Cargo.toml`).
fn members() -> Vec<Member> {
    let root = workspace_root();
    let manifest = root_manifest();
    let patterns = manifest["workspace"]["members"].as_array().expect("workspace.members is an array");
    let mut dirs = Vec::new();
    for pattern in patterns.iter() {
        let pattern = pattern.as_str().expect("workspace.members holds strings");
        match pattern.strip_suffix("/*") {
            Some(parent) => {
                let entries = fs::read_dir(root.join(parent)).expect("a members glob names a directory");
                for entry in entries {
                    let path = entry.expect("directory entry").path();
                    if path.join("Cargo.toml").is_file() {
                        dirs.push(path);
                    }
                }
            }
            None => dirs.push(root.join(pattern)),
        }
    }
    dirs.sort();
    dirs.into_iter()
        .map(|dir| {
            let manifest = parse(&dir.join("Cargo.toml"));
            let name = manifest["package"]["name"].as_str().expect("package.name").to_string();
            Member { name, dir, manifest }
        })
        .collect()
}

/// One dependency entry: which table it is in, the key, the package it names, and the entry.
struct Dependency<'a> {
    table: String,
    key: String,
    package: String,
    entry: &'a Item,
}

impl Dependency<'_> {
    /// Whether it is a normal dependency (`[dependencies]`, target-specific or not), the only
    /// kind that can be optional behind a feature.
    fn is_normal(&self) -> bool {
        self.table == "dependencies" || self.table.ends_with(".dependencies")
    }

    fn flag(&self, name: &str) -> bool {
        self.entry.as_table_like().and_then(|t| t.get(name)).and_then(Item::as_bool).unwrap_or(false)
    }
}

/// Every dependency of a manifest: `[dependencies]`, `[dev-dependencies]`,
/// `[build-dependencies]`, and the same under `[target.'cfg(..)']`.
fn dependencies(manifest: &DocumentMut) -> Vec<Dependency<'_>> {
    let mut tables: Vec<(String, &dyn TableLike)> = Vec::new();
    for kind in DEPENDENCY_KINDS {
        if let Some(t) = manifest.get(kind).and_then(Item::as_table_like) {
            tables.push((kind.to_string(), t));
        }
    }
    if let Some(targets) = manifest.get("target").and_then(Item::as_table_like) {
        for (cfg, target) in targets.iter() {
            for kind in DEPENDENCY_KINDS {
                if let Some(t) = target.get(kind).and_then(Item::as_table_like) {
                    tables.push((format!("target.'{cfg}'.{kind}"), t));
                }
            }
        }
    }
    let mut out = Vec::new();
    for (table, deps) in tables {
        for (key, entry) in deps.iter() {
            let renamed = entry.as_table_like().and_then(|t| t.get("package")).and_then(Item::as_str);
            let package = renamed.unwrap_or(key).to_string();
            out.push(Dependency { table: table.clone(), key: key.to_string(), package, entry });
        }
    }
    out
}

/// Where `krate`'s dependencies on other workspace members break the layer table.
fn layer_violations(krate: &str, manifest: &DocumentMut, workspace: &BTreeSet<String>) -> Vec<String> {
    let Some(layer) = LAYERS.iter().find(|l| l.krate == krate) else {
        return vec![format!("{krate} has no row in LAYERS (tests/tests/tidy.rs): add one that follows DESIGN.md")];
    };
    let mut out = Vec::new();
    for dep in dependencies(manifest) {
        if !workspace.contains(&dep.package) {
            continue;
        }
        let optional_only = layer.may_use_optionally.contains(&dep.package.as_str());
        if !layer.may_use.contains(&dep.package.as_str()) && !optional_only {
            out.push(format!(
                "{krate} depends on {} in [{}], which DESIGN.md's dependency direction does not allow",
                dep.package, dep.table
            ));
        } else if optional_only && !dep.is_normal() {
            out.push(format!("{krate} may depend on {} only optionally, not in [{}]", dep.package, dep.table));
        } else if optional_only && !dep.flag("optional") {
            out.push(format!("{krate} may depend on {} only with `optional = true` (behind a feature)", dep.package));
        }
    }
    out
}

/// Where a member manifest names a dependency without taking it from the workspace root.
fn pinning_violations(krate: &str, manifest: &DocumentMut) -> Vec<String> {
    dependencies(manifest)
        .into_iter()
        .filter(|dep| !dep.flag("workspace"))
        .map(|dep| {
            format!(
                "{krate}: [{}] {} must say `workspace = true` and take its version from the root Cargo.toml",
                dep.table, dep.key
            )
        })
        .collect()
}

/// Whether `version` is an exact release, `x.y.z` (optionally `=x.y.z`), as the root pins them.
fn is_full_version(version: &str) -> bool {
    let parts: Vec<&str> = version.trim_start_matches('=').split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Where the root's `[workspace.dependencies]` has an entry that is neither a path to one of our
/// crates nor a full version.
fn root_pin_violations(root: &DocumentMut) -> Vec<String> {
    let deps = root["workspace"]["dependencies"].as_table_like().expect("[workspace.dependencies]");
    let mut out = Vec::new();
    for (name, entry) in deps.iter() {
        let (version, path) = match entry.as_table_like() {
            Some(t) => (t.get("version").and_then(Item::as_str), t.get("path").and_then(Item::as_str)),
            None => (entry.as_str(), None),
        };
        match (version, path) {
            (_, Some(_)) => {}
            (Some(v), None) if is_full_version(v) => {}
            (Some(v), None) => out.push(format!("workspace dependency {name} = \"{v}\": pin a full x.y.z version")),
            (None, None) => out.push(format!("workspace dependency {name} has neither a version nor a path")),
        }
    }
    out
}

/// Whether a Rust source file opens with a `//!` doc comment on its first line.
fn starts_with_module_doc(text: &str) -> bool {
    text.lines().next().is_some_and(|line| line.starts_with("//!"))
}

/// Every `.rs` file under `dir`, skipping build output, hidden directories and `fixtures/`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries {
        let path = entry.expect("directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if path.is_dir() {
            if name != "target" && name != "fixtures" && !name.starts_with('.') {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

fn assert_none(what: &str, violations: Vec<String>) {
    assert!(violations.is_empty(), "{what}:\n  {}", violations.join("\n  "));
}

#[test]
fn every_rust_file_starts_with_a_module_doc() {
    let root = workspace_root();
    let mut files = Vec::new();
    for dir in ["crates", "xtask", "tests"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 10, "found only {} Rust files: is the walk broken?", files.len());
    let violations = files
        .iter()
        .filter(|f| !starts_with_module_doc(&read(f)))
        .map(|f| format!("{}: the first line must be a `//!` paragraph", f.strip_prefix(&root).unwrap_or(f).display()))
        .collect();
    assert_none("files without a module doc", violations);
}

#[test]
fn every_library_crate_warns_on_missing_docs() {
    let violations = members()
        .iter()
        .map(|m| m.dir.join("src/lib.rs"))
        .filter(|lib| lib.is_file())
        .filter(|lib| {
            let text = read(lib);
            !text.contains("#![warn(missing_docs)]") && !text.contains("#![deny(missing_docs)]")
        })
        .map(|lib| format!("{}: add #![warn(missing_docs)]", lib.display()))
        .collect();
    assert_none("library crates without the missing_docs lint", violations);
}

#[test]
fn every_member_has_a_row_in_the_layer_table() {
    let members: BTreeSet<String> = members().into_iter().map(|m| m.name).collect();
    let rows: BTreeSet<String> = LAYERS.iter().map(|l| l.krate.to_string()).collect();
    assert_eq!(members, rows, "LAYERS must list exactly the workspace members");
    for lib in ALL_LIBRARIES {
        assert!(members.contains(*lib), "ALL_LIBRARIES names {lib}, which is not a workspace member");
    }
}

#[test]
fn dependencies_follow_the_layers() {
    let members = members();
    let names: BTreeSet<String> = members.iter().map(|m| m.name.clone()).collect();
    let violations = members.iter().flat_map(|m| layer_violations(&m.name, &m.manifest, &names)).collect();
    assert_none("dependencies that break DESIGN.md's dependency direction", violations);
}

#[test]
fn versions_are_pinned_once_in_the_root() {
    let mut violations = root_pin_violations(&root_manifest());
    for m in members() {
        violations.extend(pinning_violations(&m.name, &m.manifest));
    }
    assert_none("dependencies not pinned once in the root Cargo.toml", violations);
}

/// The checks themselves, on small manifests: each must catch what it claims to.
mod checks {
    use super::*;

    fn workspace() -> BTreeSet<String> {
        LAYERS.iter().map(|l| l.krate.to_string()).collect()
    }

    fn layer_check(krate: &str, manifest: &str, expected: &[&str]) {
        let doc: DocumentMut = manifest.parse().expect("test manifest parses");
        let got = layer_violations(krate, &doc, &workspace());
        assert_eq!(got.len(), expected.len(), "{krate}: {got:#?}");
        for (g, e) in got.iter().zip(expected) {
            assert!(g.contains(e), "expected a violation mentioning {e:?}, got {g:?}");
        }
    }

    #[test]
    fn allowed_dependencies_pass() {
        layer_check("strata-kernels", "[dependencies]\nstrata-tensor.workspace = true\nrayon = \"1\"\n", &[]);
        layer_check(
            "strata-store",
            "[dependencies]\nstrata-nvme = { workspace = true }\nstrata-kernels = { workspace = true, optional = true }\n",
            &[],
        );
        layer_check(
            "strata-models",
            "[target.'cfg(unix)'.dependencies]\nstrata-kernels = { workspace = true, optional = true }\n",
            &[],
        );
    }

    #[test]
    fn upward_dependencies_are_caught_in_every_table() {
        layer_check("strata-tensor", "[dependencies]\nstrata-kernels.workspace = true\n", &["strata-kernels"]);
        layer_check("strata-nvme", "[dev-dependencies]\nstrata-tensor.workspace = true\n", &["dev-dependencies"]);
        layer_check("strata-planner", "[build-dependencies.strata-store]\nworkspace = true\n", &["strata-store"]);
        layer_check(
            "strata-cli",
            "[target.'cfg(unix)'.dependencies]\nstrata-models.workspace = true\n",
            &["strata-models"],
        );
        layer_check(
            "strata",
            "[dependencies]\nstore = { package = \"strata-store\", workspace = true }\n",
            &["strata-store"],
        );
    }

    #[test]
    fn optional_only_dependencies_must_be_optional() {
        layer_check("strata-store", "[dependencies]\nstrata-kernels.workspace = true\n", &["optional = true"]);
        layer_check("strata-models", "[dev-dependencies]\nstrata-kernels.workspace = true\n", &["only optionally"]);
    }

    #[test]
    fn unknown_crates_need_a_row() {
        layer_check("strata-new", "[dependencies]\n", &["no row in LAYERS"]);
    }

    #[test]
    fn dependencies_must_come_from_the_workspace() {
        let doc: DocumentMut =
            "[dependencies]\na.workspace = true\nb = \"1.0\"\n[dev-dependencies]\nc = { version = \"1\" }\n[target.x.dependencies]\nd = { workspace = false }\n"
                .parse()
                .unwrap();
        let got = pinning_violations("k", &doc);
        assert_eq!(got.len(), 3, "{got:#?}");
        assert!(got[0].contains("[dependencies] b"), "{got:#?}");
        assert!(got[1].contains("[dev-dependencies] c"), "{got:#?}");
        assert!(got[2].contains("[target.'x'.dependencies] d"), "{got:#?}");
    }

    #[test]
    fn root_versions_must_be_full() {
        let doc: DocumentMut = "[workspace.dependencies]\nours = { path = \"crates/ours\" }\na = \"1.2.3\"\nb = { version = \"=0.4.5\", features = [\"x\"] }\nc = \"1.2\"\nd = { version = \"^1.2.3\" }\ne = { git = \"https://example.invalid/e\" }\n"
            .parse()
            .unwrap();
        let got = root_pin_violations(&doc);
        assert_eq!(got.len(), 3, "{got:#?}");
        assert!(got[0].contains("c = \"1.2\""), "{got:#?}");
        assert!(got[1].contains("d = \"^1.2.3\""), "{got:#?}");
        assert!(got[2].contains("e has neither"), "{got:#?}");
    }

    #[test]
    fn module_docs_must_be_on_the_first_line() {
        assert!(starts_with_module_doc("//! What this is.\n\nfn f() {}\n"));
        assert!(!starts_with_module_doc("\n//! What this is.\n"));
        assert!(!starts_with_module_doc("/// An item doc.\nfn f() {}\n"));
        assert!(!starts_with_module_doc("// A plain comment.\n"));
        assert!(!starts_with_module_doc(""));
    }
}
