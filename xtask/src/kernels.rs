//! `cargo xtask kernels`: makes sure nvcc is here (installing the pinned CUDA 13.0 compiler
//! from PyPI into a cached venv when none is found), compiles every `kernels/*.cu` to PTX for
//! compute_80 exactly as the build script does, and prints each kernel's registers, shared
//! memory, stack frame and spills for sm_90 (`ptxas -v`).
//!
//! nvcc is looked for as strata-kernels' build script looks for it: `NVCC`, `CUDA_HOME/bin/nvcc`,
//! `PATH`, then `<cache>/nvcc-venv` (cache: `STRATA_CACHE`, `XDG_CACHE_HOME/strata`,
//! `~/.cache/strata`). The venv is where this command installs it, so the build script finds
//! it afterwards with no environment set.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// The pinned nvcc packages (DESIGN.md): one CUDA 13.0 release, so the PTX loads on the GPU
/// machines' driver.
pub const NVCC_PACKAGES: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
];

/// strata's cache directory, as the facade and the build script compute it.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = env::var_os("STRATA_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(d).join("strata");
    }
    env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from).join(".cache").join("strata")
}

/// nvcc in the cached venv, if installed.
fn venv_nvcc(venv: &Path) -> Option<PathBuf> {
    std::fs::read_dir(venv.join("lib"))
        .ok()?
        .flatten()
        .map(|e| e.path().join("site-packages/nvidia/cu13/bin/nvcc"))
        .find(|p| p.is_file())
}

/// nvcc from the environment or the cache, without installing anything.
pub fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = env::var_os("CUDA_HOME") {
        let p = PathBuf::from(home).join("bin/nvcc");
        if p.is_file() {
            return Some(p);
        }
    }
    if let Some(p) =
        env::var_os("PATH").and_then(|path| env::split_paths(&path).map(|d| d.join("nvcc")).find(|p| p.is_file()))
    {
        return Some(p);
    }
    venv_nvcc(&cache_dir().join("nvcc-venv"))
}

/// nvcc, installing the pinned one into the cached venv when none is found.
pub fn ensure_nvcc() -> Result<PathBuf> {
    if let Some(p) = find_nvcc() {
        return Ok(p);
    }
    let venv = cache_dir().join("nvcc-venv");
    eprintln!("xtask kernels: no nvcc found; installing the pinned CUDA 13.0 nvcc from PyPI into {}", venv.display());
    if !venv.join("bin/python").exists() {
        let status =
            Command::new("python3").args(["-m", "venv"]).arg(&venv).status().context("running python3 -m venv")?;
        ensure!(status.success(), "python3 -m venv {} failed ({status})", venv.display());
    }
    let status = Command::new(venv.join("bin/python"))
        .args(["-m", "pip", "install", "--progress-bar", "on"])
        .args(NVCC_PACKAGES)
        .status()
        .context("running pip install for nvcc")?;
    ensure!(status.success(), "pip install {} failed ({status})", NVCC_PACKAGES.join(" "));
    venv_nvcc(&venv)
        .with_context(|| format!("pip installed the nvcc packages, but no nvcc is under {}", venv.display()))
}

/// Per-kernel resource usage read off `ptxas -v`.
#[derive(Debug, Default, PartialEq)]
pub struct Usage {
    /// The (mangled or extern "C") kernel name.
    pub kernel: String,
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory per block in bytes.
    pub shared: u32,
    /// Stack frame bytes per thread.
    pub stack: u32,
    /// Bytes of spill stores + loads per thread.
    pub spills: u32,
}

/// Parses ptxas' verbose report into one [`Usage`] per kernel.
pub fn parse_ptxas(report: &str) -> Vec<Usage> {
    let mut out: Vec<Usage> = Vec::new();
    let number_before = |line: &str, unit: &str| -> u32 {
        line.split(',')
            .find(|part| part.contains(unit))
            .and_then(|part| part.split_whitespace().find_map(|w| w.parse::<u32>().ok()))
            .unwrap_or(0)
    };
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            out.push(Usage { kernel: rest.split('\'').next().unwrap_or("").to_string(), ..Usage::default() });
        } else if let Some(u) = out.last_mut() {
            if line.contains("bytes stack frame") {
                u.stack = number_before(line, "stack frame");
                u.spills = number_before(line, "spill stores") + number_before(line, "spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                u.registers = number_before(line, "registers");
                u.shared = number_before(line, "smem");
            }
        }
    }
    out
}

/// The kernel sources, sorted.
pub fn sources(root: &Path) -> Result<Vec<PathBuf>> {
    let dir = root.join("kernels");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    v.sort();
    Ok(v)
}

/// `cargo xtask kernels`.
pub fn run(root: &Path) -> Result<()> {
    let nvcc = ensure_nvcc()?;
    let version = Command::new(&nvcc).arg("--version").output().context("running nvcc --version")?;
    let version = String::from_utf8_lossy(&version.stdout);
    eprintln!("xtask kernels: {} ({})", nvcc.display(), version.lines().last().unwrap_or("unknown version").trim());
    let include = root.join("kernels/include");
    let tmp = env::temp_dir().join(format!("strata-kernels-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let mut failed = Vec::new();
    println!("{:<40} {:>5} {:>7} {:>6} {:>6}", "kernel (sm_90)", "regs", "smem B", "stack", "spill");
    for src in sources(root)? {
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        // The PTX the build script embeds.
        let ptx = Command::new(&nvcc)
            .args(["--ptx", "-arch=compute_80", "-O3", "-std=c++17", "-I"])
            .arg(&include)
            .arg("-o")
            .arg(tmp.join(format!("{stem}.ptx")))
            .arg(&src)
            .output()
            .with_context(|| format!("running nvcc on {}", src.display()))?;
        if !ptx.status.success() {
            eprintln!("{}:\n{}", src.display(), String::from_utf8_lossy(&ptx.stderr));
            failed.push(stem);
            continue;
        }
        // sm_90 machine code, for the resource report.
        let cubin = Command::new(&nvcc)
            .args(["-cubin", "-arch=sm_90", "-O3", "-std=c++17", "-Xptxas", "-v", "-I"])
            .arg(&include)
            .arg("-o")
            .arg(tmp.join(format!("{stem}.cubin")))
            .arg(&src)
            .output()
            .with_context(|| format!("running nvcc -cubin on {}", src.display()))?;
        let report = String::from_utf8_lossy(&cubin.stderr);
        if !cubin.status.success() {
            eprintln!("{}:\n{report}", src.display());
            failed.push(stem);
            continue;
        }
        for u in parse_ptxas(&report) {
            println!(
                "{:<40} {:>5} {:>7} {:>6} {:>6}",
                format!("{stem}.cu: {}", u.kernel),
                u.registers,
                u.shared,
                u.stack,
                u.spills
            );
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    if !failed.is_empty() {
        bail!("nvcc failed on: {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_ptxas_report() {
        let report = "\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'rmsnorm_f32' for 'sm_90'
ptxas info    : Function properties for rmsnorm_f32
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 18 registers, used 0 barriers, 128 bytes smem, 380 bytes cmem[0]
ptxas info    : Compiling entry function 'swiglu_f32' for 'sm_90'
ptxas info    : Function properties for swiglu_f32
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers, 380 bytes cmem[0]
";
        let u = parse_ptxas(report);
        assert_eq!(
            u,
            vec![
                Usage { kernel: "rmsnorm_f32".into(), registers: 18, shared: 128, stack: 8, spills: 8 },
                Usage { kernel: "swiglu_f32".into(), registers: 10, shared: 0, stack: 0, spills: 0 },
            ]
        );
    }

    #[test]
    fn the_pins_are_one_cuda_release() {
        assert!(NVCC_PACKAGES.iter().all(|p| p.contains("==13.0.")), "{NVCC_PACKAGES:?}");
    }
}
