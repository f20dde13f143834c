//! Building the emulators of `kernels/emu/` and launching kernels on them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

pub use strata_kernels::testing::{assert_close, random_f32};

/// The kernel sources.
fn kernels_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels")
}

/// The emulator built from `kernels/emu/<source>` (once per process and source), or `None` with
/// a message when there is no C++ compiler or no kernel sources (a copy of the test binary away
/// from its checkout).
pub fn build(source: &str) -> Option<PathBuf> {
    static BUILT: OnceLock<Mutex<HashMap<String, Option<PathBuf>>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap();
    if let Some(b) = built.get(source) {
        return b.clone();
    }
    let root = kernels_dir();
    let src = root.join("emu").join(source);
    let result = if !src.is_file() {
        println!("skipped: no kernel sources at {} (a copy of this binary away from its checkout)", root.display());
        None
    } else {
        // One binary per process: nextest runs each test in a process of its own, at once.
        let stem = source.trim_end_matches(".cpp");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{stem}-{}", std::process::id()));
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let status = Command::new(&cxx)
            .args(["-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread"])
            .arg("-I")
            .arg(root.join("emu"))
            .arg("-I")
            .arg(root.join("include"))
            .arg("-I")
            .arg(&root)
            .arg(&src)
            .arg("-o")
            .arg(&out)
            .status();
        match status {
            Ok(s) if s.success() => Some(out),
            Ok(s) => panic!("{cxx} failed to build {} ({s})", src.display()),
            Err(e) => {
                println!("skipped: no C++ compiler `{cxx}` to build the kernel emulator ({e})");
                None
            }
        }
    };
    built.insert(source.to_string(), result.clone());
    result
}

/// One pointer argument of a launch.
pub enum Arg<'a> {
    /// A buffer, written back after the launch, passed `offset` bytes in.
    Buf(&'a mut Vec<u8>, usize),
    /// Buffer `i` of this launch again, `offset` bytes in (an in-place call).
    Alias(usize, usize),
    /// A null pointer.
    Null,
    /// A buffer the kernel reaches only through a [`Arg::Table`], not as an argument: loaded and
    /// written back, counted among the buffers.
    Extra(&'a mut Vec<u8>),
    /// A table of the device addresses of these buffers (by index among `Buf` and `Extra`).
    Table(Vec<usize>),
}

/// Runs `kernel` of emulator `emu` (from [`build`]) on a `grid` of blocks of `threads` threads
/// with `smem` bytes of dynamic shared memory, `params` (the parameter struct's bytes as C lays
/// them out) and `args`, as `kernels/emu/driver.h` describes.
pub fn launch(emu: &Path, kernel: &str, grid: [u32; 3], threads: u32, smem: usize, params: &[u8], args: &mut [Arg]) {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let tag = format!("{kernel}-{}-{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let params_file = dir.join(format!("{tag}.params"));
    std::fs::write(&params_file, params).unwrap();
    let mut cmd = Command::new(emu);
    cmd.arg(kernel);
    cmd.args(grid.iter().map(|g| g.to_string()));
    cmd.args([threads.to_string(), "1".into(), "1".into(), smem.to_string()]);
    cmd.arg(&params_file);
    let mut files = Vec::new();
    let mut buffers = 0;
    for arg in args.iter() {
        match arg {
            Arg::Buf(data, offset) => {
                let f = dir.join(format!("{tag}.{buffers}"));
                std::fs::write(&f, &data[..]).unwrap();
                cmd.arg(format!("{}:{offset}", f.display()));
                files.push(f);
                buffers += 1;
            }
            Arg::Alias(i, offset) => {
                cmd.arg(format!("={i}:{offset}"));
            }
            Arg::Null => {
                cmd.arg("null");
            }
            Arg::Extra(data) => {
                let f = dir.join(format!("{tag}.{buffers}"));
                std::fs::write(&f, &data[..]).unwrap();
                cmd.arg(format!("+{}", f.display()));
                files.push(f);
                buffers += 1;
            }
            Arg::Table(list) => {
                cmd.arg(format!("*{}", list.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")));
            }
        }
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{kernel}: {}", String::from_utf8_lossy(&out.stderr));
    let mut files = files.into_iter();
    for arg in args.iter_mut() {
        if let Arg::Buf(data, _) | Arg::Extra(data) = arg {
            let f = files.next().unwrap();
            **data = std::fs::read(&f).unwrap();
            let _ = std::fs::remove_file(f);
        }
    }
    let _ = std::fs::remove_file(params_file);
}

/// Little-endian bytes of f32 values, and back.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
pub fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// The bytes of a parameter struct of 32-bit fields, in order.
pub fn params32(fields: &[[u8; 4]]) -> Vec<u8> {
    fields.concat()
}
