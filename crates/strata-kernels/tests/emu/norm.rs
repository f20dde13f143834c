//! `kernels/rmsnorm.cu`: rows of aligned whole float4s and others, out of place and in place,
//! against `reference::rms_norm`; the same bits at every block size (`kernels/include/norm.cuh`'s
//! order of the sum of squares); the quantizing kernel's records.

use strata_tensor::cpu::reference;

use crate::driver::{Arg, assert_close, build, f32_bytes, f32s, launch, params32, random_f32};
use crate::matvec::{quantize_x, record_bytes};

/// Threads per row as `ops::rms_norm` and `ops::rms_norm_actq` launch both kernels: a float4 per
/// thread below 64 rows, eight from 64 rows on; 32 to 1024.
fn launcher_threads(cols: usize, rows: usize) -> u32 {
    let per_thread = if rows >= 64 { 8 } else { 1 };
    cols.div_ceil(4).div_ceil(per_thread).next_multiple_of(32).clamp(32, 1024) as u32
}

/// `rmsnorm_f32` of `rows` rows of `x` with weight `w` and `eps`, as `ops::rms_norm` launches it.
pub fn emulated_rms_norm(x: &[f32], w: &[f32], rows: usize, eps: f32) -> Vec<f32> {
    let emu = build("emu_rmsnorm.cpp").expect("checked by the caller");
    let cols = w.len();
    let p = params32(&[(rows as u32).to_le_bytes(), (cols as u32).to_le_bytes(), eps.to_le_bytes()]);
    let (mut xb, mut wb) = (f32_bytes(x), f32_bytes(w));
    let mut out = f32_bytes(&vec![f32::NAN; x.len()]);
    let mut args = [Arg::Buf(&mut xb, 0), Arg::Buf(&mut wb, 0), Arg::Buf(&mut out, 0)];
    launch(&emu, "rmsnorm_f32", [rows as u32, 1, 1], launcher_threads(cols, rows), 0, &p, &mut args);
    f32s(&out)
}

/// Runs `rmsnorm_f32` on a block of `threads` per row. `offset` floats into the buffers (a view
/// that is not 16-byte aligned when odd); in place when `inplace`.
fn run(x: &[f32], w: &[f32], rows: usize, offset: usize, inplace: bool, threads: u32) -> Vec<f32> {
    let emu = build("emu_rmsnorm.cpp").expect("checked by the caller");
    let cols = w.len();
    let p = params32(&[(rows as u32).to_le_bytes(), (cols as u32).to_le_bytes(), 1e-5f32.to_le_bytes()]);
    let mut xb = f32_bytes(x);
    let mut wb = f32_bytes(w);
    let mut out = f32_bytes(&vec![f32::NAN; x.len()]);
    if inplace {
        let mut args = [Arg::Buf(&mut xb, 4 * offset), Arg::Buf(&mut wb, 0), Arg::Alias(0, 4 * offset)];
        launch(&emu, "rmsnorm_f32", [rows as u32, 1, 1], threads, 0, &p, &mut args);
        return f32s(&xb)[offset..].to_vec();
    }
    let mut args = [Arg::Buf(&mut xb, 4 * offset), Arg::Buf(&mut wb, 0), Arg::Buf(&mut out, 4 * offset)];
    launch(&emu, "rmsnorm_f32", [rows as u32, 1, 1], threads, 0, &p, &mut args);
    f32s(&out)[offset..].to_vec()
}

#[test]
fn emulated_rms_norm_matches_the_reference_on_both_paths() {
    if build("emu_rmsnorm.cpp").is_none() {
        return;
    }
    // Long rows (8192, 8200), unaligned rows (offset 1), rows of a length not a multiple of 4,
    // tiny rows.
    for (rows, cols, offset) in
        [(3usize, 8192usize, 0usize), (2, 8200, 0), (2, 1024, 1), (5, 4, 0), (3, 1030, 0), (4, 7, 0)]
    {
        let x = random_f32(rows * cols + offset, cols as u64, 2.0);
        let w = random_f32(cols, 7, 1.5);
        let mut want = vec![0f32; rows * cols];
        reference::rms_norm(&x[offset..], &w, 1e-5, &mut want).unwrap();
        // The launcher's threads, and 256 (two or more float4 per thread).
        for threads in [launcher_threads(cols, rows), 256] {
            for inplace in [false, true] {
                let what =
                    format!("rms_norm {rows} x {cols} at offset {offset}, {threads} threads, in place: {inplace}");
                assert_close(&what, &run(&x, &w, rows, offset, inplace, threads), &want, 1e-5, 1e-5);
            }
        }
    }
}

/// A row normalises to the same bits whatever the block's size (32 to 1024 threads): the sum of
/// squares goes in one order (`norm.cuh`), which the products that normalise their own
/// activations share. Aligned and unaligned rows, lengths not a multiple of 4 or of 128, more
/// runs of 128 columns than a warp has lanes, in place and not.
#[test]
fn emulated_rms_norm_gives_the_same_bits_at_every_block_size() {
    if build("emu_rmsnorm.cpp").is_none() {
        return;
    }
    for (rows, cols, offset) in [(2usize, 2048usize, 0usize), (1, 5000, 0), (2, 4100, 1), (3, 130, 0), (2, 7, 0)] {
        let mut x = random_f32(rows * cols + offset, cols as u64 ^ 0x51, 3.0);
        for (i, v) in x.iter_mut().enumerate() {
            // Magnitudes over many octaves, so that the order of the additions shows.
            *v *= [1.0, 1e3, 1e-3, 17.0][i % 4];
        }
        let w = random_f32(cols, 5, 1.5);
        for inplace in [false, true] {
            let want = run(&x, &w, rows, offset, inplace, 1024);
            for threads in [32, 64, 96, 256, 512] {
                let got = run(&x, &w, rows, offset, inplace, threads);
                for (i, (g, v)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        v.to_bits(),
                        "{rows} x {cols} offset {offset} in place {inplace}: {threads} threads give out[{i}] = {g}, 1024 \
                         give {v}"
                    );
                }
            }
        }
    }
}

/// `rmsnorm_f32_actq`: the same outputs as `rmsnorm_f32`, bit for bit, and each row quantized to
/// two digits exactly as `matvec_quantize_x` quantizes those outputs (the record the integer
/// matvec kernels copy), on the register path, the striding path and a row of one block, with the
/// launchers' threads per row (the same for both kernels, so the same sum of squares).
#[test]
fn emulated_rms_norm_quantizes_its_rows_as_the_matvec_does() {
    if build("emu_rmsnorm.cpp").is_none() || build("emu_matvec.cpp").is_none() {
        return;
    }
    let emu = build("emu_rmsnorm.cpp").unwrap();
    for (rows, cols) in [(3usize, 2048usize), (2, 8224), (1, 32), (64, 2048), (64, 8224)] {
        let mut x = random_f32(rows * cols, cols as u64 ^ 0xac, 2.0);
        for (b, xs) in x.chunks_mut(32).enumerate() {
            xs[(b * 5) % 32] *= 40.0;
        }
        let w = random_f32(cols, 11, 1.5);
        let threads = launcher_threads(cols, rows);
        let plain = run(&x, &w, rows, 0, false, threads);
        let p = params32(&[(rows as u32).to_le_bytes(), (cols as u32).to_le_bytes(), 1e-5f32.to_le_bytes()]);
        let (mut xb, mut wb) = (f32_bytes(&x), f32_bytes(&w));
        let mut out = f32_bytes(&vec![f32::NAN; x.len()]);
        let mut xq = vec![0xA5u8; rows * record_bytes(cols)];
        let mut args = [Arg::Buf(&mut xb, 0), Arg::Buf(&mut wb, 0), Arg::Buf(&mut out, 0), Arg::Buf(&mut xq, 0)];
        // Both as the launchers launch them: the same threads per row.
        launch(&emu, "rmsnorm_f32_actq", [rows as u32, 1, 1], threads, 0, &p, &mut args);
        let out = f32s(&out);
        for (i, (&g, &v)) in out.iter().zip(&plain).enumerate() {
            assert_eq!(g.to_bits(), v.to_bits(), "{rows} x {cols}: out[{i}] = {g}, want {v}");
        }
        let want = quantize_x(&out, rows, cols, 3);
        assert!(xq == want, "{rows} x {cols}: the records differ from matvec_quantize_x's");
    }
}
