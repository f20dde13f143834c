//! SwiGLU, residual add, bias add and the f16/bf16 casts on the GPU against the CPU reference
//! (or exact host arithmetic), on lengths that are and are not multiples of four and on buffers
//! that do and do not start 16-byte aligned (the kernels' float4 and scalar paths).
#![cfg(feature = "cuda")]

use half::{bf16, f16};
use proptest::prelude::*;
use strata_kernels::cuda::ops;
use strata_kernels::cuda::testing::{assert_close, device_or_skip, random_f32};
use strata_kernels::{Error, Result};
use strata_tensor::cpu::reference;

#[path = "../common/moe.rs"]
mod moe;
use moe::Combine;

/// Asserts an [`Error::InvalidArgument`] whose message contains `needle`.
fn assert_invalid(r: Result<()>, needle: &str) {
    match r {
        Err(Error::InvalidArgument { message, .. }) => assert!(message.contains(needle), "{message}"),
        other => panic!("expected InvalidArgument about {needle:?}, got {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// `offset` elements are skipped at the start of every buffer: 0 keeps the float4 path, 1 to
    /// 3 force the scalar one.
    #[test]
    fn swiglu_matches_the_reference(n in 0usize..5000, offset in 0usize..4, seed: u64) {
        let Some(cuda) = device_or_skip("swiglu_matches_the_reference") else { return Ok(()) };
        let mut gate = random_f32(n + offset, seed, 12.0);
        if n > 3 {
            // Saturated and extreme gates: exp overflows to inf, silu goes to -0 and to the gate.
            gate[offset] = -100.0;
            gate[offset + 1] = 100.0;
            gate[offset + 2] = -88.5;
        }
        let up = random_f32(n + offset, seed ^ 1, 3.0);
        let mut want = vec![0f32; n];
        reference::swiglu(&gate[offset..], &up[offset..], &mut want).unwrap();
        let dg = cuda.upload(&gate).unwrap();
        let du = cuda.upload(&up).unwrap();
        let mut dout = cuda.zeros::<f32>(n + offset).unwrap();
        ops::swiglu(&cuda, &dg.slice(offset..offset + n), &du.slice(offset..offset + n), &mut dout.slice_mut(offset..offset + n)).unwrap();
        let got = cuda.download(&dout).unwrap();
        assert_close("swiglu", &got[offset..offset + n], &want, 1e-30, 2e-6);
    }

    #[test]
    fn add_matches_the_reference_exactly(n in 0usize..5000, offset in 0usize..4, seed: u64) {
        let Some(cuda) = device_or_skip("add_matches_the_reference_exactly") else { return Ok(()) };
        let acc = random_f32(n + offset, seed, 5.0);
        let x = random_f32(n + offset, seed ^ 1, 5.0);
        let mut want = acc[offset..].to_vec();
        reference::add(&mut want, &x[offset..]).unwrap();
        let mut dacc = cuda.upload(&acc).unwrap();
        let dx = cuda.upload(&x).unwrap();
        ops::add(&cuda, &mut dacc.slice_mut(offset..offset + n), &dx.slice(offset..offset + n)).unwrap();
        let got = cuda.download(&dacc).unwrap();
        prop_assert_eq!(&got[..offset], &acc[..offset]);
        prop_assert_eq!(&got[offset..], &want[..]);
    }

    #[test]
    fn add_bias_matches_host_arithmetic(rows in 0usize..40, cols in 1usize..700, seed: u64) {
        let Some(cuda) = device_or_skip("add_bias_matches_host_arithmetic") else { return Ok(()) };
        let y = random_f32(rows * cols + 5, seed, 5.0);
        let bias = random_f32(cols, seed ^ 1, 5.0);
        let mut want = y.clone();
        for (i, v) in want[..rows * cols].iter_mut().enumerate() {
            *v += bias[i % cols];
        }
        let mut dy = cuda.upload(&y).unwrap();
        let db = cuda.upload(&bias).unwrap();
        ops::add_bias(&cuda, &mut dy, &db, rows).unwrap();
        prop_assert_eq!(cuda.download(&dy).unwrap(), want);
    }

    #[test]
    fn casts_round_to_nearest_even(n in 0usize..3000, offset in 0usize..4, seed: u64) {
        let Some(cuda) = device_or_skip("casts_round_to_nearest_even") else { return Ok(()) };
        let mut x = random_f32(n + offset, seed, 4.0);
        // Scale some values across the whole f16 range, and some into its subnormals.
        for (i, v) in x.iter_mut().enumerate() {
            *v *= [1.0, 1e-6, 3e4, 1e-3][i % 4];
        }
        check_casts(&cuda, &x, offset);
    }
}

/// Casts `x[offset..]` on the device to f16 and bf16 and compares the bits with the half
/// crate's round-to-nearest-even conversion (NaN only as NaN).
fn check_casts(cuda: &strata_kernels::Cuda, x: &[f32], offset: usize) {
    let n = x.len() - offset;
    let dx = cuda.upload(x).unwrap();
    let view = dx.slice(offset..offset + n);
    let mut h = cuda.upload(&vec![f16::ZERO; n + offset]).unwrap();
    ops::cast_f32_to(cuda, &view, &mut h.slice_mut(offset..offset + n)).unwrap();
    let mut b = cuda.upload(&vec![bf16::ZERO; n + offset]).unwrap();
    ops::cast_f32_to(cuda, &view, &mut b.slice_mut(offset..offset + n)).unwrap();
    let (h, b) = (cuda.download(&h).unwrap(), cuda.download(&b).unwrap());
    for (i, &v) in x[offset..].iter().enumerate() {
        let (got_h, got_b) = (h[offset + i], b[offset + i]);
        if v.is_nan() {
            assert!(got_h.is_nan() && got_b.is_nan(), "element {i}: NaN became {got_h} / {got_b}");
        } else {
            assert_eq!(got_h.to_bits(), f16::from_f32(v).to_bits(), "f16 of element {i} = {v:e}");
            assert_eq!(got_b.to_bits(), bf16::from_f32(v).to_bits(), "bf16 of element {i} = {v:e}");
        }
    }
}

#[test]
fn casts_of_special_values() {
    let Some(cuda) = device_or_skip("casts_of_special_values") else { return };
    let x = [
        0.0f32,
        -0.0,
        1.0,
        1.0 + 2f32.powi(-11),       // halfway between f16 1 and 1 + 2^-10: rounds to even (1)
        1.0 + 3.0 * 2f32.powi(-11), // halfway: rounds to even (1 + 2^-9)
        1.0 + 2f32.powi(-8),        // halfway for bf16
        65504.0,
        65519.0,
        65520.0, // rounds to f16 inf
        -1e6,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e-8,   // below half the smallest f16 subnormal: 0
        3e-8,   // f16 subnormal
        6.0e-5, // f16 subnormal, just under the smallest normal
        f32::MIN_POSITIVE,
        1e-40, // f32 subnormal
        f32::MAX,
        3.4e38,
    ];
    for offset in 0..4 {
        let mut padded = vec![7.0f32; offset];
        padded.extend_from_slice(&x);
        check_casts(&cuda, &padded, offset);
    }
}

#[test]
fn large_lengths_stride_over_the_grid() {
    let Some(cuda) = device_or_skip("large_lengths_stride_over_the_grid") else { return };
    // More than 65535 blocks x 256 threads x 4 elements: every thread loops.
    let n = 65535 * 256 * 4 + 4 * 1000 + 3;
    let gate = random_f32(n, 1, 8.0);
    let up = random_f32(n, 2, 2.0);
    let mut want = vec![0f32; n];
    reference::swiglu(&gate, &up, &mut want).unwrap();
    let dg = cuda.upload(&gate).unwrap();
    let du = cuda.upload(&up).unwrap();
    let mut dout = cuda.zeros::<f32>(n).unwrap();
    ops::swiglu(&cuda, &dg, &du, &mut dout).unwrap();
    assert_close("swiglu", &cuda.download(&dout).unwrap(), &want, 1e-30, 2e-6);
    let mut dacc = cuda.upload(&gate).unwrap();
    ops::add(&cuda, &mut dacc, &du).unwrap();
    let sum: Vec<f32> = gate.iter().zip(&up).map(|(a, b)| a + b).collect();
    assert_eq!(cuda.download(&dacc).unwrap(), sum);
}

#[test]
fn mismatched_lengths_are_typed_errors() {
    let Some(cuda) = device_or_skip("mismatched_lengths_are_typed_errors") else { return };
    let a = cuda.zeros::<f32>(10).unwrap();
    let b = cuda.zeros::<f32>(9).unwrap();
    let mut out = cuda.zeros::<f32>(10).unwrap();
    assert_invalid(ops::swiglu(&cuda, &a, &b, &mut out), "up holds 9");
    assert_invalid(ops::swiglu(&cuda, &a, &a, &mut out.slice_mut(0..9)), "out holds 9");
    assert_invalid(ops::add(&cuda, &mut out, &b), "x holds 9");
    assert_invalid(ops::add_bias(&cuda, &mut out, &cuda.zeros::<f32>(4).unwrap(), 3), "12 needed");
    let mut h = cuda.upload(&[f16::ZERO; 9]).unwrap();
    assert_invalid(ops::cast_f32_to(&cuda, &a, &mut h), "out holds 9");
    assert_invalid(ops::swiglu_pairs(&cuda, &a, &mut out, 1, 3), "odd");
    assert_invalid(ops::swiglu_pairs(&cuda, &b, &mut out, 1, 6), "12 needed");
    assert_invalid(ops::copy_cols(&cuda, &a, &mut out, 2, 5, 3, 3), "columns 3 + 3 of rows of 5");
    assert_invalid(ops::copy_cols(&cuda, &a, &mut out, 3, 5, 0, 2), "15 needed");
    let idx = cuda.upload(&[0u32, 1, 1]).unwrap();
    assert_invalid(ops::gather_rows(&cuda, &a, 5, &idx, &[0, 1, 5], &mut out, 2), "row index 5 out of 5 rows");
    assert_invalid(ops::scatter_add_rows(&cuda, &a, &idx, &[0, 1, 1], &a, &mut out, 5, 2), "row index 1 given twice");
    assert_invalid(ops::add_sigmoid_scaled(&cuda, &a, &b.slice(0..1), &mut out, 2, 5), "g holds 1");
    // Empty operands are fine and touch nothing.
    ops::swiglu(&cuda, &a.slice(0..0), &b.slice(0..0), &mut out.slice_mut(0..0)).unwrap();
    ops::add_bias(&cuda, &mut out, &a.slice(0..0), 3).unwrap();
    ops::add_bias(&cuda, &mut out, &a, 0).unwrap();
}

/// `copy_cols` packs the chosen columns of each row (q, k and v out of a stacked projection),
/// and writes nothing past them.
#[test]
fn copy_cols_takes_columns_apart() {
    let Some(cuda) = device_or_skip("copy_cols_takes_columns_apart") else { return };
    let (rows, src_cols) = (9, 2560);
    let src = random_f32(rows * src_cols, 3, 1.0);
    let dsrc = cuda.upload(&src).unwrap();
    for (col0, cols) in [(0, 2048), (2048, 256), (2304, 256), (5, 1)] {
        let mut dst = cuda.upload(&vec![-7f32; rows * cols + 1]).unwrap();
        ops::copy_cols(&cuda, &dsrc, &mut dst, rows, src_cols, col0, cols).unwrap();
        let got = cuda.download(&dst).unwrap();
        let want: Vec<f32> = src.chunks(src_cols).flat_map(|r| r[col0..col0 + cols].to_vec()).collect();
        assert_eq!(&got[..rows * cols], &want[..], "columns {col0} + {cols}");
        assert_eq!(got[rows * cols], -7.0, "columns {col0} + {cols}: wrote past dst");
    }
}

/// The Mixture-of-Experts dispatch on the card: gathering rows, adding weighted rows back, and a
/// sigmoid-scaled add, against the CPU's arithmetic (`expf` may differ in its last bit).
#[test]
fn moe_dispatch_matches_the_cpu() {
    let Some(cuda) = device_or_skip("moe_dispatch_matches_the_cpu") else { return };
    let (tokens, cols) = (9usize, 2048usize);
    let idx: Vec<u32> = vec![8, 1, 2, 7, 4];
    let n = idx.len();
    let src = random_f32(tokens * cols, 1, 2.0);
    let (dsrc, didx) = (cuda.upload(&src).unwrap(), cuda.upload(&idx).unwrap());
    let mut rows = cuda.zeros::<f32>(n * cols).unwrap();
    ops::gather_rows(&cuda, &dsrc, tokens, &didx, &idx, &mut rows, cols).unwrap();
    let want: Vec<f32> = idx.iter().flat_map(|&r| src[r as usize * cols..][..cols].to_vec()).collect();
    assert_eq!(cuda.download(&rows).unwrap(), want);

    let (y, w) = (random_f32(n * cols, 2, 3.0), random_f32(n, 3, 1.0));
    let mut want = src.clone();
    for (i, &r) in idx.iter().enumerate() {
        for (o, y) in want[r as usize * cols..][..cols].iter_mut().zip(&y[i * cols..][..cols]) {
            *o += y * w[i];
        }
    }
    let mut out = cuda.upload(&src).unwrap();
    let (dy, dw) = (cuda.upload(&y).unwrap(), cuda.upload(&w).unwrap());
    ops::scatter_add_rows(&cuda, &dy, &didx, &idx, &dw, &mut out, tokens, cols).unwrap();
    assert_eq!(cuda.download(&out).unwrap(), want);

    let (y, g) = (random_f32(tokens * cols, 4, 3.0), random_f32(tokens, 5, 6.0));
    let mut want = src.clone();
    for ((o, y), g) in want.chunks_exact_mut(cols).zip(y.chunks_exact(cols)).zip(&g) {
        let s = 1.0 / (1.0 + (-g).exp());
        for (o, y) in o.iter_mut().zip(y) {
            *o += s * y;
        }
    }
    let mut out = cuda.upload(&src).unwrap();
    let (dy, dg) = (cuda.upload(&y).unwrap(), cuda.upload(&g).unwrap());
    ops::add_sigmoid_scaled(&cuda, &dy, &dg, &mut out, tokens, cols).unwrap();
    assert_close("add_sigmoid_scaled", &cuda.download(&out).unwrap(), &want, 1e-6, 1e-6);
}

/// `moe_combine` on the card: each token's used slots weighted and added in ascending order of
/// expert index from zero, then a shared expert's gated output, written or added to the residual
/// stream, bit for bit the CPU's arithmetic (what zeroing the output, `scatter_add_rows` expert by
/// expert and `add_sigmoid_scaled` give; `expf` may differ in its last bit, so the shared case is
/// checked within 1e-6); a token without a used slot gets NaN; bad shapes are typed errors.
#[test]
fn moe_combine_adds_the_experts_in_index_order() {
    let Some(cuda) = device_or_skip("moe_combine_adds_the_experts_in_index_order") else { return };
    let (slots, cols, experts) = (4usize, 2050usize, 8u32);
    let ids: Vec<u32> = vec![7, 2, 5, 0, 3, u32::MAX, 1, 8, u32::MAX, u32::MAX, u32::MAX, u32::MAX];
    let tokens = ids.len() / slots;
    let (ys, w, x0) = (
        random_f32(tokens * slots * cols, 11, 3.0),
        random_f32(tokens * slots, 12, 1.0),
        random_f32(tokens * cols, 13, 5.0),
    );
    let (dys, dids, dw) = (cuda.upload(&ys).unwrap(), cuda.upload(&ids).unwrap(), cuda.upload(&w).unwrap());
    let (shared_y, shared_g) = (random_f32(tokens * cols, 14, 2.0), random_f32(tokens, 15, 4.0));
    let (dsy, dsg) = (cuda.upload(&shared_y).unwrap(), cuda.upload(&shared_g).unwrap());
    let (sy, sg) = (dsy.slice(..), dsg.slice(..));
    for (residual, shared) in [(false, false), (true, false), (true, true)] {
        let combine = Combine {
            ids: &ids,
            w: &w,
            ys: &ys,
            slots,
            experts,
            cols,
            shared: shared.then_some((&shared_y[..], &shared_g[..])),
        };
        let want = combine.reference(&x0, residual);
        let mut out = cuda.upload(&x0).unwrap();
        let with = shared.then_some((&sy, &sg));
        ops::moe_combine(&cuda, &dys, &dids, &dw, with, &mut out, tokens, slots, experts as usize, cols, residual)
            .unwrap();
        for (j, (g, v)) in cuda.download(&out).unwrap().iter().zip(&want).enumerate() {
            let same = match (v.is_nan(), shared) {
                (true, _) => g.is_nan(),
                (false, false) => g.to_bits() == v.to_bits(),
                (false, true) => (g - v).abs() <= 1e-6 * (1.0 + v.abs()),
            };
            assert!(same, "residual={residual} shared={shared}: out[{j}] = {g}, want {v}");
        }
    }
    let mut out = cuda.zeros::<f32>(tokens * cols).unwrap();
    let combine = |out: &mut _, tokens, slots| {
        ops::moe_combine(&cuda, &dys, &dids, &dw, None, out, tokens, slots, 8, cols, false)
    };
    assert_invalid(combine(&mut out, tokens, 33), "slots");
    assert_invalid(combine(&mut out, tokens + 1, slots), "ids");
    let short = dsg.slice(..tokens - 1);
    let r = ops::moe_combine(&cuda, &dys, &dids, &dw, Some((&sy, &short)), &mut out, tokens, slots, 8, cols, false);
    assert_invalid(r, "gate");
}
