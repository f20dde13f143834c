//! Row softmax and argmax on the GPU against the CPU reference: short rows (a warp per row)
//! and long ones (a block per row, vocab-sized included), aligned and unaligned rows, ties,
//! NaN and infinities.
#![cfg(feature = "cuda")]

use proptest::prelude::*;
use strata_kernels::cuda::ops;
use strata_kernels::cuda::testing::{device_or_skip, random_f32};
use strata_kernels::{Cuda, Error};
use strata_tensor::cpu::reference;

#[path = "../common/softmax.rs"]
mod common;

/// `|got - want| <= atol + rtol × |want|` element-wise, NaN matching NaN only.
fn assert_close_nan(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_nan() { g.is_nan() } else { (g - w).abs() <= atol + rtol * w.abs() };
        assert!(ok, "{what}: element {i}: got {g}, want {w}");
    }
}

/// Softmax of `x`'s rows on the device (through a view that skips `offset` elements, which
/// misaligns the rows) against the reference.
fn check_softmax(cuda: &Cuda, x: &[f32], row_len: usize, offset: usize) {
    let mut want = x.to_vec();
    reference::softmax(&mut want, row_len).unwrap();
    let mut padded = vec![0.5f32; offset];
    padded.extend_from_slice(x);
    let mut d = cuda.upload(&padded).unwrap();
    ops::softmax(cuda, &mut d.slice_mut(offset..offset + x.len()), row_len).unwrap();
    let got = cuda.download(&d).unwrap();
    assert_eq!(&got[..offset], &padded[..offset], "softmax wrote before its rows");
    let what = format!("softmax rows of {row_len}, offset {offset}");
    assert_close_nan(&what, &got[offset..offset + x.len()], &want, 1e-9, 2e-5);
}

/// Argmax of `x`'s rows on the device against the reference, row by row.
fn check_argmax(cuda: &Cuda, x: &[f32], row_len: usize, offset: usize) {
    let rows = x.len() / row_len;
    let want: Vec<u32> = x.chunks(row_len).map(|r| reference::argmax(r).unwrap() as u32).collect();
    let mut padded = vec![0.5f32; offset];
    padded.extend_from_slice(x);
    let d = cuda.upload(&padded).unwrap();
    let mut out = cuda.upload(&vec![u32::MAX - 1; rows + 1]).unwrap();
    ops::argmax(cuda, &d.slice(offset..offset + x.len()), row_len, &mut out).unwrap();
    let got = cuda.download(&out).unwrap();
    assert_eq!(&got[..rows], &want[..], "argmax rows of {row_len}, offset {offset}");
    assert_eq!(got[rows], u32::MAX - 1, "argmax wrote past its rows");
}

/// Puts special values into some rows of `x`: NaN, +inf, all -inf, some -inf, huge equal
/// values, and ties with the maximum.
fn sprinkle(x: &mut [f32], row_len: usize, seed: u64) {
    let rows = x.len() / row_len;
    for r in 0..rows {
        let row = &mut x[r * row_len..][..row_len];
        let at = (seed as usize).wrapping_add(r * 7919) % row_len;
        match (seed as usize + r) % 8 {
            0 => row[at] = f32::NAN,
            1 => row[at] = f32::INFINITY,
            2 => row.fill(f32::NEG_INFINITY),
            3 => {
                for v in row.iter_mut().step_by(3) {
                    *v = f32::NEG_INFINITY;
                }
            }
            4 => row.fill(1000.0),
            5 => {
                let m = reference::argmax(row).unwrap();
                let v = row[m];
                row[at] = v;
                row[(at + row_len / 2) % row_len] = v;
            }
            _ => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn softmax_matches_the_reference(rows in 1usize..7, row_len in 1usize..3000, spread in 0.1f32..40.0,
                                     offset in 0usize..2, special: bool, seed: u64) {
        let Some(cuda) = device_or_skip("softmax_matches_the_reference") else { return Ok(()) };
        let mut x = random_f32(rows * row_len, seed, spread);
        if special {
            sprinkle(&mut x, row_len, seed);
        }
        check_softmax(&cuda, &x, row_len, offset);
    }

    #[test]
    fn argmax_matches_the_reference(rows in 1usize..7, row_len in 1usize..3000, offset in 0usize..2,
                                    special: bool, seed: u64) {
        let Some(cuda) = device_or_skip("argmax_matches_the_reference") else { return Ok(()) };
        let mut x = random_f32(rows * row_len, seed, 3.0);
        if special {
            sprinkle(&mut x, row_len, seed);
        }
        check_argmax(&cuda, &x, row_len, offset);
    }
}

#[test]
fn vocab_sized_rows() {
    let Some(cuda) = device_or_skip("vocab_sized_rows") else { return };
    for (i, row_len) in [49152usize, 128256, 151936, 50257, 1025, 1024, 32, 31].into_iter().enumerate() {
        let mut x = random_f32(3 * row_len, i as u64, 20.0);
        check_softmax(&cuda, &x, row_len, 0);
        check_argmax(&cuda, &x, row_len, 0);
        // Ties with the maximum late in each row, a NaN late in one row.
        for r in 0..3 {
            let row = &mut x[r * row_len..][..row_len];
            let m = reference::argmax(row).unwrap();
            row[row_len - 1] = row[m];
            if m > 0 {
                row[m - 1] = row[m];
            }
        }
        x[2 * row_len + row_len * 3 / 4] = f32::NAN;
        check_argmax(&cuda, &x, row_len, 0);
        check_argmax(&cuda, &x, row_len, 1);
        check_softmax(&cuda, &x, row_len, 1);
    }
}

#[test]
fn special_rows() {
    let Some(cuda) = device_or_skip("special_rows") else { return };
    let x = common::SPECIAL_ROWS;
    for offset in 0..4 {
        check_softmax(&cuda, &x, 4, offset);
        check_argmax(&cuda, &x, 4, offset);
        check_softmax(&cuda, &x, 32, offset);
        check_argmax(&cuda, &x, 32, offset);
        check_softmax(&cuda, &x, 8, offset);
    }
}

#[test]
fn many_short_rows() {
    let Some(cuda) = device_or_skip("many_short_rows") else { return };
    // More rows than one block's eight warps, a last block only partly used.
    for (rows, row_len) in [(1001usize, 7usize), (4099, 64), (77, 1000)] {
        let x = random_f32(rows * row_len, rows as u64, 10.0);
        check_softmax(&cuda, &x, row_len, 0);
        check_argmax(&cuda, &x, row_len, 0);
    }
}

#[test]
fn bad_shapes_are_typed_errors() {
    let Some(cuda) = device_or_skip("bad_shapes_are_typed_errors") else { return };
    let mut x = cuda.zeros::<f32>(10).unwrap();
    let mut out = cuda.zeros::<u32>(4).unwrap();
    let invalid = |r: strata_kernels::Result<()>, needle: &str| match r {
        Err(Error::InvalidArgument { message, .. }) => assert!(message.contains(needle), "{message}"),
        other => panic!("expected InvalidArgument about {needle:?}, got {other:?}"),
    };
    invalid(ops::softmax(&cuda, &mut x, 3), "whole number of rows");
    invalid(ops::softmax(&cuda, &mut x, 0), "row_len is 0");
    invalid(ops::argmax(&cuda, &x, 4, &mut out), "whole number of rows");
    invalid(ops::argmax(&cuda, &x, 2, &mut out), "out holds 4");
    ops::argmax(&cuda, &x, 5, &mut out).unwrap();
    ops::softmax(&cuda, &mut x.slice_mut(0..0), 0).unwrap();
    ops::argmax(&cuda, &x.slice(0..0), 7, &mut out).unwrap();
}
