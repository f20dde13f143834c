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

/// The pinned nvdisasm (PyPI) that `cargo xtask kernels --sass` installs into the nvcc venv.
pub const NVDISASM_PACKAGE: &str = "nvidia-cuda-nvdisasm==13.5.37";

/// nvdisasm next to nvcc, or installed into the cached venv.
fn ensure_nvdisasm(nvcc: &Path) -> Result<PathBuf> {
    let beside = nvcc.with_file_name("nvdisasm");
    if beside.is_file() {
        return Ok(beside);
    }
    let venv = cache_dir().join("nvcc-venv");
    let find = || {
        std::fs::read_dir(venv.join("lib"))
            .ok()?
            .flatten()
            .map(|e| e.path().join("site-packages/nvidia/cu13/bin/nvdisasm"))
            .find(|p| p.is_file())
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    ensure!(venv.join("bin/python").exists(), "no venv at {} to install nvdisasm into", venv.display());
    eprintln!("xtask kernels: installing {NVDISASM_PACKAGE} from PyPI into {}", venv.display());
    let status = Command::new(venv.join("bin/python"))
        .args(["-m", "pip", "install", "--progress-bar", "on", NVDISASM_PACKAGE])
        .status()
        .context("running pip install for nvdisasm")?;
    ensure!(status.success(), "pip install {NVDISASM_PACKAGE} failed ({status})");
    find().with_context(|| format!("pip installed nvdisasm, but it is not under {}", venv.display()))
}

/// One SASS instruction line of nvdisasm's output: `/*0a30*/  @P0 OPCODE.MODS operands ;`.
fn sass_instruction(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix("/*")?;
    let (addr, text) = rest.split_once("*/")?;
    if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let text = text.trim();
    (!text.is_empty()).then_some(text)
}

/// The instructions a warp issues per pipeline step in the common case of a block-quantized
/// matvec kernel's main loop, read off its SASS as (dot product, staging): the path from the wait
/// for the step's chunk (`DEPBAR.LE SB0, <stages - 2>`) to the commit of the next chunk's copies
/// (`LDGDEPBAR`), taking every unconditional branch and no conditional one (the fast path: the
/// compiler lays the rare cases out behind branches); the dot product is the part up to its
/// `if`'s end (the first `BSYNC`). `None` when the code does not have that shape.
pub fn main_loop_step(sass: &[&str], depbar: &str) -> Option<(usize, usize)> {
    let wait = format!("DEPBAR.LE SB0, {depbar}");
    let labels: std::collections::HashMap<&str, usize> = sass
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.trim().strip_suffix(':').filter(|n| n.starts_with(".L")).map(|n| (n, i)))
        .collect();
    let mut at = sass.iter().position(|l| l.contains(&wait))?;
    let (mut count, mut dot) = (0, None);
    for _ in 0..sass.len() {
        let line = sass.get(at)?;
        at += 1;
        if dot.is_none() && line.contains("BSYNC") {
            dot = Some(count);
        }
        let Some(text) = sass_instruction(line) else { continue };
        count += 1;
        if text.starts_with("LDGDEPBAR") {
            let dot = dot?;
            return Some((dot, count - dot));
        }
        if let Some(target) = text.strip_prefix("BRA `(").and_then(|t| t.split(')').next()) {
            at = *labels.get(target)?;
        }
    }
    None
}

/// `cargo xtask kernels --sass`: compiles kernels/matvec.cu to PTX as the build script does, then
/// to sm_90 code as the driver would, disassembles it, and prints the instructions per weight of
/// the block-quantized kernels' main loop (one token, both activation paths; eight tokens, the
/// integer path): the issue rate these kernels need, a measure that needs no GPU.
pub fn sass(root: &Path) -> Result<()> {
    let nvcc = ensure_nvcc()?;
    let ptxas = nvcc.with_file_name("ptxas");
    let nvdisasm = ensure_nvdisasm(&nvcc)?;
    let tmp = env::temp_dir().join(format!("strata-sass-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let (ptx, cubin) = (tmp.join("matvec.ptx"), tmp.join("matvec.cubin"));
    let run = |cmd: &mut Command, what: &str| -> Result<Vec<u8>> {
        let out = cmd.output().with_context(|| format!("running {what}"))?;
        ensure!(out.status.success(), "{what} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        Ok(out.stdout)
    };
    run(
        Command::new(&nvcc)
            .args(["--ptx", "-arch=compute_80", "-O3", "-std=c++17", "-I"])
            .arg(root.join("kernels/include"))
            .arg("-o")
            .arg(&ptx)
            .arg(root.join("kernels/matvec.cu")),
        "nvcc",
    )?;
    run(Command::new(&ptxas).args(["-arch=sm_90", "-O3"]).arg(&ptx).arg("-o").arg(&cubin), "ptxas")?;
    let sass = String::from_utf8(run(Command::new(&nvdisasm).arg("-c").arg(&cubin), "nvdisasm")?)?;
    let _ = std::fs::remove_dir_all(&tmp);
    let mut functions: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    let mut current = None;
    for line in sass.lines() {
        if let Some(name) = line.strip_prefix(".text.").and_then(|l| l.strip_suffix(':')) {
            current = Some(name);
        } else if let Some(name) = current {
            functions.entry(name).or_default().push(line);
        }
    }
    println!("main loop of kernels/matvec.cu (sm_90): instructions per warp and step, weights per lane and step,");
    println!("instructions per weight");
    println!(
        "{:<7} {:>26}  {:>26}  {:>26}",
        "dtype", "1 token, f32 path", "1 token, integer path", "8 tokens, integer path"
    );
    // Weights a lane covers per step (four rows): a block of 32 (q8_0: half a block), or an
    // eighth of a super-block of 256 (the integer path of q4_k and q6_k at up to four tokens: a
    // quarter). The pipeline waits for all but STAGES - 2 steps: 4 (q6_k: 3) stages for one
    // token, 3 for eight.
    for (dtype, per_step, per_step_i16, depbar) in [
        ("q4_0", 128, 128, "0x2"),
        ("q4_1", 128, 128, "0x2"),
        ("q8_0", 64, 64, "0x2"),
        ("q4_k", 128, 256, "0x2"),
        ("q6_k", 128, 256, "0x1"),
    ] {
        let mut cells = Vec::new();
        for (kernel, depbar, per_step) in [
            (format!("matvec_{dtype}_t1"), depbar, per_step),
            (format!("matvec_{dtype}_i16_t1"), depbar, per_step_i16),
            (format!("matvec_{dtype}_i16_t8"), "0x1", per_step),
        ] {
            let code = functions.get(kernel.as_str()).with_context(|| format!("no kernel {kernel} in the SASS"))?;
            let (dot, stage) = main_loop_step(code, depbar)
                .with_context(|| format!("{kernel}: no main loop of the expected shape in the SASS"))?;
            cells.push(format!("{dot}+{stage} / {per_step} = {:.2}/w", (dot + stage) as f64 / per_step as f64));
        }
        println!("{dtype:<7} {:>26}  {:>26}  {:>26}", cells[0], cells[1], cells[2]);
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

    #[test]
    fn finds_the_main_loop_step_in_sass() {
        let sass = [
            "        /*0100*/                   MOV R1, c[0x0][0x28] ;",
            "        /*0110*/                   DEPBAR.LE SB0, 0x2 ;",
            "        /*0120*/               @P0 BRA `(.L_x_2) ;",
            "        /*0130*/                   IDP.4A.S8.S8 R2, R3, R4, RZ ;",
            ".L_x_2:",
            "        /*0140*/                   BSYNC B0 ;",
            "        /*0150*/                   IADD3 R5, R5, 0x1, RZ ;",
            "        /*0160*/                   LDGSTS.E.BYPASS.128 [R6+0x5000], desc[UR8][R8.64] ;",
            "        /*0170*/              @!P1 BRA `(.L_x_3) ;",
            "        /*0180*/                   BRA `(.L_x_4) ;",
            ".L_x_3:",
            "        /*0190*/                   NOP ;",
            ".L_x_4:",
            "        /*01a0*/                   LDGDEPBAR ;",
        ];
        // Dot: the wait, the branch, the IDP; staging: BSYNC, IADD3, LDGSTS, the two branches
        // (the conditional one not taken), the commit; the NOP jumped over.
        assert_eq!(main_loop_step(&sass, "0x2"), Some((3, 6)));
        assert_eq!(main_loop_step(&sass, "0x1"), None);
        assert_eq!(sass_instruction(sass[3]), Some("IDP.4A.S8.S8 R2, R3, R4, RZ ;"));
        assert_eq!(sass_instruction(".L_x_2:"), None);
    }
}
