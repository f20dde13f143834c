//! `kernels/softmax.cu`: row softmax and argmax, a warp per row (rows up to 1024) and a block per
//! row (longer ones, vocab-sized included), aligned and unaligned rows, ties, NaN and
//! infinities, against `reference::softmax` and `reference::argmax`.

use strata_tensor::cpu::reference;

#[path = "../common/softmax.rs"]
mod common;

use crate::driver::{Arg, build, f32_bytes, f32s, launch, params32, random_f32};

/// The longest row a warp takes (`ops::softmax`'s `WARP_ROW_MAX`).
const WARP_ROW_MAX: usize = 1024;

/// The kernel and launch shape `ops::softmax` / `ops::argmax` pick: eight rows per block of eight
/// warps, or a block per row with about eight elements per thread.
fn shape(rows: usize, row_len: usize, kernels: [&'static str; 2]) -> (&'static str, [u32; 3], u32) {
    if row_len <= WARP_ROW_MAX {
        (kernels[0], [rows.div_ceil(8) as u32, 1, 1], 256)
    } else {
        (kernels[1], [rows as u32, 1, 1], row_len.div_ceil(8).next_multiple_of(32).clamp(32, 1024) as u32)
    }
}

/// `|got - want| <= atol + rtol × |want|` element-wise, NaN matching NaN only.
fn assert_close_nan(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_nan() { g.is_nan() } else { (g - w).abs() <= atol + rtol * w.abs() };
        assert!(ok, "{what}: element {i}: got {g}, want {w}");
    }
}

/// Softmax of `x`'s rows in place, `offset` elements into the buffer (misaligned rows).
fn check_softmax(x: &[f32], row_len: usize, offset: usize) {
    let emu = build("emu_softmax.cpp").expect("checked by the caller");
    let rows = x.len() / row_len;
    let mut want = x.to_vec();
    reference::softmax(&mut want, row_len).unwrap();
    let mut padded = vec![0.5f32; offset];
    padded.extend_from_slice(x);
    let mut buf = f32_bytes(&padded);
    let (kernel, grid, threads) = shape(rows, row_len, ["softmax_warp_f32", "softmax_block_f32"]);
    let p = params32(&[(rows as u32).to_le_bytes(), (row_len as u32).to_le_bytes()]);
    launch(&emu, kernel, grid, threads, 0, &p, &mut [Arg::Buf(&mut buf, 4 * offset)]);
    let got = f32s(&buf);
    assert_eq!(&got[..offset], &padded[..offset], "softmax wrote before its rows");
    assert_close_nan(&format!("{kernel} rows of {row_len}, offset {offset}"), &got[offset..], &want, 1e-9, 2e-5);
}

/// Argmax of `x`'s rows, `offset` elements into the buffer.
fn check_argmax(x: &[f32], row_len: usize, offset: usize) {
    let emu = build("emu_softmax.cpp").expect("checked by the caller");
    let rows = x.len() / row_len;
    let want: Vec<u32> = x.chunks(row_len).map(|r| reference::argmax(r).unwrap() as u32).collect();
    let mut padded = vec![0.5f32; offset];
    padded.extend_from_slice(x);
    let mut buf = f32_bytes(&padded);
    let mut out: Vec<u8> = (0..=rows).flat_map(|_| (u32::MAX - 1).to_le_bytes()).collect();
    let (kernel, grid, threads) = shape(rows, row_len, ["argmax_warp_f32", "argmax_block_f32"]);
    let p = params32(&[(rows as u32).to_le_bytes(), (row_len as u32).to_le_bytes()]);
    launch(&emu, kernel, grid, threads, 0, &p, &mut [Arg::Buf(&mut buf, 4 * offset), Arg::Buf(&mut out, 0)]);
    let got: Vec<u32> = out.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(&got[..rows], &want[..], "{kernel} rows of {row_len}, offset {offset}");
    assert_eq!(got[rows], u32::MAX - 1, "{kernel} wrote past its rows");
}

#[test]
fn emulated_softmax_and_argmax_match_the_reference() {
    if build("emu_softmax.cpp").is_none() {
        return;
    }
    let special = common::SPECIAL_ROWS;
    for offset in [0, 1, 3] {
        for row_len in [4, 8, 32] {
            check_softmax(&special, row_len, offset);
        }
        check_argmax(&special, 4, offset);
        check_argmax(&special, 32, offset);
    }
    // Warp rows (a last block partly used) and block rows, with ties late in each row and a
    // NaN in one.
    for (i, (rows, row_len)) in [(11usize, 7usize), (9, 1000), (3, 1025), (2, 3001), (2, 49152)].into_iter().enumerate()
    {
        let mut x = random_f32(rows * row_len, i as u64, 20.0);
        check_softmax(&x, row_len, 0);
        check_argmax(&x, row_len, 0);
        for r in 0..rows {
            let row = &mut x[r * row_len..][..row_len];
            let m = reference::argmax(row).unwrap();
            row[row_len - 1] = row[m];
            if m > 0 {
                row[m - 1] = row[m];
            }
        }
        x[(rows - 1) * row_len + row_len * 3 / 4] = f32::NAN;
        check_argmax(&x, row_len, 1);
        check_softmax(&x, row_len, 1);
    }
}
