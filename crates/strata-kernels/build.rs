//! Build script for strata-kernels.
//!
//! Without the `cuda` feature it does nothing: CPU-only builds never need nvcc. With it, it
//! compiles every `kernels/*.cu` to PTX for compute_80 (which the driver loads on sm_80 and
//! sm_90), turns the launch-parameter structs of `kernels/include/*.h` into Rust with bindgen,
//! and writes `$OUT_DIR/kernels.rs`: the PTX of each file, embedded deflate-compressed (PTX is
//! text that compresses about fivefold, and every binary that links the crate carries all of it;
//! `cuda::kernel_ptx` inflates a file's on first use).
//!
//! nvcc is found through `NVCC`, then `CUDA_HOME/bin/nvcc`, then `PATH`, then the venv that
//! `cargo xtask kernels` installs into strata's cache (the pinned CUDA 13.0 nvcc from PyPI).

fn main() {
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=STRATA_CACHE");
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::env;
    use std::fs;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    pub fn build() {
        let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
        let kernels = manifest.join("../../kernels");
        let include = kernels.join("include");
        let out = PathBuf::from(env::var("OUT_DIR").unwrap());
        println!("cargo:rerun-if-changed={}", kernels.display());
        println!("cargo:rerun-if-changed={}", include.display());

        let sources = files_with_ext(&kernels, "cu");
        let headers = files_with_ext(&include, "h");
        for f in sources.iter().chain(&headers) {
            println!("cargo:rerun-if-changed={}", f.display());
        }

        let nvcc = find_nvcc().unwrap_or_else(|| {
            panic!(
                "strata-kernels: the `cuda` feature needs nvcc to compile kernels/*.cu to PTX, and none was \
                 found (looked at $NVCC, $CUDA_HOME/bin/nvcc, PATH and strata's cache). Run `cargo xtask kernels` \
                 to install the pinned nvcc from PyPI, or set NVCC."
            )
        });

        // Compile every file at once: nvcc is slow, and the files are independent.
        let children: Vec<_> = sources
            .iter()
            .map(|src| {
                let stem = src.file_stem().unwrap().to_str().unwrap().to_string();
                let ptx = out.join(format!("{stem}.ptx"));
                let child = Command::new(&nvcc)
                    .args(["--ptx", "-arch=compute_80", "-O3", "-std=c++17"])
                    .arg("-I")
                    .arg(&include)
                    .arg("-o")
                    .arg(&ptx)
                    .arg(src)
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap_or_else(|e| panic!("strata-kernels: cannot run {}: {e}", nvcc.display()));
                (stem, src.clone(), child)
            })
            .collect();
        let mut modules = String::from(
            "/// The PTX of every kernel file, by file stem: deflate-compressed, and its length.\n\
             pub(crate) const MODULES: &[(&str, &[u8], usize)] = &[\n",
        );
        for (stem, src, child) in children {
            let output = child.wait_with_output().unwrap();
            if !output.status.success() {
                panic!(
                    "strata-kernels: nvcc failed on {}:\n{}",
                    src.display(),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            let ptx = fs::read(out.join(format!("{stem}.ptx"))).unwrap();
            fs::write(out.join(format!("{stem}.ptx.z")), miniz_oxide::deflate::compress_to_vec(&ptx, 6)).unwrap();
            modules.push_str(&format!(
                "    ({stem:?}, include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{stem}.ptx.z\")), {}),\n",
                ptx.len()
            ));
        }
        modules.push_str("];\n");
        fs::write(out.join("kernels.rs"), modules).unwrap();

        // One umbrella header so bindgen sees every parameter struct once.
        let mut umbrella = String::new();
        let mut structs = Vec::new();
        for h in &headers {
            umbrella.push_str(&format!("#include \"{}\"\n", h.display()));
            structs.extend(struct_names(&fs::read_to_string(h).unwrap()));
        }
        let mut builder = bindgen::Builder::default()
            .header_contents("strata_params.h", &umbrella)
            .clang_arg(format!("-I{}", include.display()))
            .derive_default(true)
            .derive_debug(true)
            .derive_copy(true)
            .derive_partialeq(true)
            .layout_tests(false)
            .use_core()
            .generate_comments(true);
        for s in &structs {
            builder = builder.allowlist_type(s);
        }
        builder = builder.allowlist_var("STRATA_.*");
        let bindings = builder.generate().expect("strata-kernels: bindgen failed on kernels/include/*.h");
        let mut text = bindings.to_string();
        // Every parameter struct is passed to a kernel by value.
        for s in &structs {
            text.push_str(&format!("// SAFETY: a plain C struct of numbers, laid out by bindgen as C lays it out.\nunsafe impl cudarc::driver::DeviceRepr for {s} {{}}\n"));
        }
        fs::write(out.join("params.rs"), text).unwrap();
    }

    /// The names of the `typedef struct { .. } Name;` declarations in a header.
    fn struct_names(src: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut in_typedef = false;
        for line in src.lines() {
            let l = line.trim();
            if l.starts_with("typedef struct") {
                in_typedef = true;
            }
            if in_typedef && l.starts_with('}') {
                let name = l.trim_start_matches('}').trim().trim_end_matches(';').trim();
                if !name.is_empty() {
                    names.push(name.to_string());
                }
                in_typedef = false;
            }
        }
        names
    }

    fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == ext))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// nvcc from `NVCC`, `CUDA_HOME`, `PATH`, or the cached venv of `cargo xtask kernels`.
    fn find_nvcc() -> Option<PathBuf> {
        if let Some(p) = env::var_os("NVCC") {
            return Some(PathBuf::from(p));
        }
        if let Some(home) = env::var_os("CUDA_HOME") {
            let p = PathBuf::from(home).join("bin/nvcc");
            if p.exists() {
                return Some(p);
            }
        }
        if let Some(path) = env::var_os("PATH") {
            for dir in env::split_paths(&path) {
                let p = dir.join("nvcc");
                if p.is_file() {
                    return Some(p);
                }
            }
        }
        let cache = env::var_os("STRATA_CACHE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("strata")))
            .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/strata")))?;
        let lib = cache.join("nvcc-venv/lib");
        for entry in fs::read_dir(lib).ok()?.flatten() {
            let p = entry.path().join("site-packages/nvidia/cu13/bin/nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
        None
    }
}
