//! The block-quantized kernels of `kernels/matvec.cu` run on the CPU, unchanged, through the
//! emulation in `kernels/emu/` (a host thread per CUDA thread, barriers for `__syncthreads` and
//! the warp collectives), against the CPU references. This is what can be checked of those
//! kernels on a machine without a GPU: their arithmetic, indexing and bounds, both the integer
//! (`_i16`) and the float activation paths. Not their speed, nor the timing of their
//! asynchronous copies, which the emulation performs at once (the GPU tests in `tests/gpu/` do
//! that on a device).
//!
//! Needs a C++20 compiler (`CXX`, else `c++`); without one the test says so and passes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use strata_tensor::cpu::reference;
use strata_tensor::{DType, Tensor};

/// The kernels' launch shape (`kernels/include/matvec.h`): warps per block for 1 and 2 tokens,
/// and for 4 and 8; weight rows per warp.
const WARPS_DECODE: usize = 16;
const WARPS: usize = 4;
const ROWS_PER_WARP: usize = 4;

/// Shared memory given to every emulated block: Hopper's opt-in limit, the most any kernel asks.
const SMEM: usize = 227 * 1024;

/// The emulator binary, built once per test run; `None` (with a message) without a compiler.
fn emulator() -> Option<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels");
        if !root.join("emu/matvec_emu.cpp").is_file() {
            println!("skipped: no kernel sources at {} (a copy of this binary away from its checkout)", root.display());
            return None;
        }
        // One binary per process: nextest runs each test in a process of its own, at once.
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("matvec_emu-{}", std::process::id()));
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let status = Command::new(&cxx)
            .args(["-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread", "-rdynamic"])
            .arg("-I")
            .arg(root.join("emu"))
            .arg("-I")
            .arg(root.join("include"))
            .arg("-I")
            .arg(&root)
            .arg(root.join("emu/matvec_emu.cpp"))
            .arg("-o")
            .arg(&out)
            .arg("-ldl")
            .status();
        match status {
            Ok(s) if s.success() => Some(out),
            Ok(s) => panic!("{cxx} failed to build kernels/emu/matvec_emu.cpp ({s})"),
            Err(e) => {
                println!("skipped: no C++ compiler `{cxx}` to build the kernel emulator ({e})");
                None
            }
        }
    })
    .as_deref()
}

/// Uniform values in `[-scale, scale)` from a xorshift stream.
fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Runs `kernel` on weight `w` and `tokens` rows of `x` (the kernel's token count at least
/// `tokens`) on `blocks` emulated blocks, as the launcher would; returns y for `tokens + 1`
/// rows, the last of which the kernel must leave at its sentinel.
fn run(kernel: &str, w: &Tensor, x: &[f32], tokens: usize, blocks: usize, threads: usize) -> Vec<f32> {
    let emu = emulator().expect("checked by the caller");
    let (n, k) = (w.shape().dims()[0], w.shape().dims()[1]);
    assert_eq!(x.len(), tokens * k);
    let bytes = w.cpu_bytes().unwrap();
    let mut input = Vec::new();
    input.extend((n as u32).to_le_bytes());
    input.extend((k as u32).to_le_bytes());
    input.extend((w.row_bytes() as u64).to_le_bytes());
    input.extend((bytes.len() as u64).to_le_bytes());
    input.extend((tokens as u32).to_le_bytes());
    input.extend((x.len() as u32).to_le_bytes());
    input.extend((((tokens + 1) * n) as u32).to_le_bytes());
    input.extend_from_slice(bytes);
    input.extend(x.iter().flat_map(|v| v.to_le_bytes()));
    input.extend((0..tokens * n).flat_map(|_| f32::NAN.to_le_bytes()));
    input.extend((0..n).flat_map(|_| (-7f32).to_le_bytes()));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let tag = format!("{kernel}-{n}x{k}-{tokens}-{}", std::process::id());
    let (inp, outp) = (dir.join(format!("{tag}.in")), dir.join(format!("{tag}.out")));
    std::fs::write(&inp, &input).unwrap();
    let out = Command::new(emu)
        .args([kernel, &blocks.to_string(), &threads.to_string(), &SMEM.to_string()])
        .arg(&inp)
        .arg(&outp)
        .output()
        .unwrap();
    assert!(out.status.success(), "{kernel} {n}x{k} tokens={tokens}: {}", String::from_utf8_lossy(&out.stderr));
    let y = std::fs::read(&outp).unwrap();
    let _ = (std::fs::remove_file(&inp), std::fs::remove_file(&outp));
    y.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// Every block-quantized kernel, both activation paths (the float one at 1 and 2 tokens), on shapes that end a pipeline chunk
/// early, leave a partial group of rows, span several activation tiles, and need more than one
/// pass of the persistent grid over the rows; activations with an outlier per block of 32. The
/// integer kernels quantize x as the CPU's decode path does, so they match `reference::matvec`
/// (the same integers) up to the order of f32 sums: within 1e-6 of the sum of |w x| (1e-7 was
/// seen), where a quantization off by one unit in a block moves it by up to 3e-5. The float
/// kernels match `reference::matmul` within the GPU tests' 1e-4.
#[test]
fn emulated_quantized_matvec_kernels_match_the_cpu_references() {
    if emulator().is_none() {
        return;
    }
    let dtypes = [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4K, DType::Q6K];
    for (i, dtype) in dtypes.into_iter().enumerate() {
        let bl = dtype.block_len();
        // (rows, columns): one block; several chunks with a short last one; more than one
        // activation tile at one token (8192 columns).
        let shapes = [(5, bl), (70, bl * (2304 / bl) + bl), (9, 8448)];
        for (n, k) in shapes {
            let seed = (i * 7919 + n * 31 + k) as u64;
            let w = Tensor::from_f32_as(&random(n * k, seed, 1.0), [n, k], dtype).unwrap();
            let wf = w.to_f32_vec().unwrap();
            for tokens in [1usize, 2, 3, 8] {
                let t = tokens.next_power_of_two();
                let mut x = random(tokens * k, seed ^ 0x5eed, 2.0);
                for (b, xs) in x.chunks_mut(32).enumerate() {
                    xs[(b * 7) % 32] *= 30.0;
                }
                // The references, token by token.
                let (mut two, mut float) = (vec![0f32; tokens * n], vec![0f32; tokens * n]);
                for tok in 0..tokens {
                    let xt = &x[tok * k..(tok + 1) * k];
                    reference::matvec(&w, xt, &mut two[tok * n..(tok + 1) * n]).unwrap();
                }
                reference::matmul(&x, &w, &mut float).unwrap();
                let warps = if t <= 2 { WARPS_DECODE } else { WARPS };
                // Two blocks at most: the warps' groups of rows then take several rounds.
                let blocks = n.div_ceil(ROWS_PER_WARP).div_ceil(warps).min(2);
                for (suffix, want, relative) in [("_i16", &two, 1e-6), ("", &float, 1e-4)] {
                    if suffix.is_empty() && t > 2 {
                        continue; // the float kernels take 1 or 2 tokens
                    }
                    let kernel = format!("matvec_{}{suffix}_t{t}", dtype.name());
                    let got = run(&kernel, &w, &x, tokens, blocks, warps * 32);
                    assert!(got[tokens * n..].iter().all(|&v| v == -7.0), "{kernel}: wrote past token {tokens}");
                    for (j, (&g, &v)) in got.iter().zip(want.iter()).enumerate() {
                        let (tok, r) = (j / n, j % n);
                        let (wr, xt) = (&wf[r * k..(r + 1) * k], &x[tok * k..(tok + 1) * k]);
                        let magnitude: f32 = wr.iter().zip(xt).map(|(a, b)| (a * b).abs()).sum();
                        let tol = 1e-5 + relative * magnitude;
                        assert!(
                            (g - v).abs() <= tol,
                            "{kernel} {n}x{k} tokens={tokens}: y[{tok}, {r}] = {g}, want {v} (tolerance {tol})"
                        );
                    }
                }
            }
        }
    }
}

/// The float kernels (f32, f16, bf16; vector rows of a multiple of 16 bytes and element-by-element
/// ones) against `reference::matmul`, one block per 16 rows as the launcher grids them.
#[test]
fn emulated_float_matvec_kernels_match_the_cpu_reference() {
    if emulator().is_none() {
        return;
    }
    for (i, dtype) in [DType::F32, DType::F16, DType::BF16].into_iter().enumerate() {
        for (n, k) in [(7, 36), (21, 520), (3, 4100), (5, 9)] {
            let seed = (i * 104_729 + n * 31 + k) as u64;
            let w = Tensor::from_f32_as(&random(n * k, seed, 1.0), [n, k], dtype).unwrap();
            let wf = w.to_f32_vec().unwrap();
            let vector = (k * dtype.block_bytes()).is_multiple_of(16);
            for tokens in [1usize, 2, 3, 8] {
                let t = tokens.next_power_of_two();
                let x = random(tokens * k, seed ^ 0x5eed, 2.0);
                let mut want = vec![0f32; tokens * n];
                reference::matmul(&x, &w, &mut want).unwrap();
                let kernel = format!("matvec_{}{}_t{t}", dtype.name(), if vector { "" } else { "_scalar" });
                let got = run(&kernel, &w, &x, tokens, n.div_ceil(WARPS * ROWS_PER_WARP), WARPS * 32);
                assert!(got[tokens * n..].iter().all(|&v| v == -7.0), "{kernel}: wrote past token {tokens}");
                for (j, (&g, &v)) in got.iter().zip(&want).enumerate() {
                    let (tok, r) = (j / n, j % n);
                    let magnitude: f32 = (0..k).map(|c| (wf[r * k + c] * x[tok * k + c]).abs()).sum();
                    let tol = 1e-5 + 1e-4 * magnitude;
                    assert!((g - v).abs() <= tol, "{kernel} {n}x{k} tokens={tokens}: y[{tok}, {r}] = {g}, want {v}");
                }
            }
        }
    }
}
