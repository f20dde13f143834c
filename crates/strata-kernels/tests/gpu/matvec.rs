//! The dequantizing matvec on the GPU against the CPU references, for every weight dtype, on
//! awkward shapes and token counts.
#![cfg(feature = "cuda")]

use proptest::prelude::*;
use strata_kernels::cuda::ops;
use strata_kernels::cuda::tensor::upload_tensor;
use strata_kernels::cuda::testing::{device_or_skip, random_f32};
use strata_kernels::{Cuda, Error};
use strata_tensor::cpu::reference;
use strata_tensor::{DType, Tensor};

/// Column counts to try for `dtype`: whole blocks, including counts that end a chunk of the
/// kernel's pipeline early and ones that span more than one activation tile (for one token and
/// for several); any count for floats.
fn column_counts(dtype: DType) -> Vec<usize> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => vec![1, 7, 8, 36, 520, 4100],
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => vec![32, 96, 32 * 37, 32 * 150, 32 * 300],
        DType::Q4K | DType::Q6K => vec![256, 256 * 3, 256 * 17, 256 * 36],
    }
}

/// A random `[n, k]` weight of `dtype` on the host (quantized from uniform values in [-1, 1)).
fn weight(dtype: DType, n: usize, k: usize, seed: u64) -> Tensor {
    Tensor::from_f32_as(&random_f32(n * k, seed, 1.0), [n, k], dtype).unwrap()
}

/// `y[t, r]` within `1e-5 + 1e-4 * sum_c |w[r, c] x[t, c]|` of `want`: the GPU and the CPU sum
/// the same f32 products in different orders.
fn assert_matches(what: &str, got: &[f32], want: &[f32], w: &[f32], x: &[f32], n: usize, k: usize) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &v)) in got.iter().zip(want).enumerate() {
        let (t, r) = (i / n, i % n);
        let magnitude: f32 = (0..k).map(|c| (w[r * k + c] * x[t * k + c]).abs()).sum();
        let tol = 1e-5 + 1e-4 * magnitude;
        assert!((g - v).abs() <= tol, "{what}: y[{t}, {r}] = {g}, want {v} (tolerance {tol})");
    }
}

/// The GPU matvec of weight `w` with `tokens` random activations against `reference::matmul`
/// (x as `[tokens, k]`).
fn check(cuda: &Cuda, w: &Tensor, dw: &Tensor, wf: &[f32], tokens: usize, seed: u64) {
    let (n, k) = (w.shape().dims()[0], w.shape().dims()[1]);
    let x = random_f32(tokens * k, seed ^ 0x5eed, 2.0);
    let mut want = vec![0f32; tokens * n];
    reference::matmul(&x, w, &mut want).unwrap();
    let dx = cuda.upload(&x).unwrap();
    let mut dy = cuda.upload(&vec![f32::NAN; tokens * n]).unwrap();
    ops::matvec(cuda, dw, &dx, &mut dy, tokens).unwrap();
    let got = cuda.download(&dy).unwrap();
    let what = format!("matvec {} n={n} k={k} tokens={tokens}", w.dtype());
    assert_matches(&what, &got, &want, wf, &x, n, k);
}

#[test]
fn matvec_matches_matmul_for_every_dtype_and_shape() {
    let Some(cuda) = device_or_skip("matvec_matches_matmul_for_every_dtype_and_shape") else { return };
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        for k in column_counts(dtype) {
            for n in [1, 7, 33, 1000] {
                if n * k > 5_000_000 {
                    continue;
                }
                let seed = (i * 1_000_003 + n * 31 + k * 7) as u64;
                let w = weight(dtype, n, k, seed);
                let dw = upload_tensor(&cuda, &w).unwrap();
                let wf = w.to_f32_vec().unwrap();
                for tokens in [1, 3, 8, 9, 17] {
                    check(&cuda, &w, &dw, &wf, tokens, seed + tokens as u64);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn matvec_matches_matmul_on_random_shapes(
        dtype in prop::sample::select(DType::ALL.to_vec()),
        n in 1usize..300,
        blocks in 1usize..40,
        tokens in 1usize..20,
        seed in any::<u64>(),
    ) {
        let Some(cuda) = device_or_skip("matvec_matches_matmul_on_random_shapes") else { return Ok(()) };
        // Float rows take any length: step by 3 so that most are not a multiple of 16 bytes.
        let k = blocks * if dtype.is_quantized() { dtype.block_len() } else { 3 };
        let w = weight(dtype, n, k, seed);
        let dw = upload_tensor(&cuda, &w).unwrap();
        check(&cuda, &w, &dw, &w.to_f32_vec().unwrap(), tokens, seed);
    }
}

/// Against `reference::matvec` (the CPU decode path), which quantizes x to two 8-bit digits per
/// value for block-quantized weights: each value within one unit `max|x_b| / 32512` of its block,
/// so the tolerance adds `sum_b unit_b * sum_{c in b} |w[r, c]|`.
#[test]
fn matvec_matches_the_cpu_decode_path() {
    let Some(cuda) = device_or_skip("matvec_matches_the_cpu_decode_path") else { return };
    for dtype in DType::ALL {
        let (n, k) = (77, if dtype.block_len() == 256 { 1024 } else { 992 });
        let w = weight(dtype, n, k, 11);
        let wf = w.to_f32_vec().unwrap();
        let x = random_f32(k, 12, 3.0);
        let mut want = vec![0f32; n];
        reference::matvec(&w, &x, &mut want).unwrap();
        let dw = upload_tensor(&cuda, &w).unwrap();
        let mut dy = cuda.zeros::<f32>(n).unwrap();
        ops::matvec(&cuda, &dw, &cuda.upload(&x).unwrap(), &mut dy, 1).unwrap();
        let got = cuda.download(&dy).unwrap();
        for r in 0..n {
            let row = &wf[r * k..(r + 1) * k];
            let magnitude: f32 = row.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
            let rounding: f32 = if dtype.is_quantized() {
                row.chunks(32)
                    .zip(x.chunks(32))
                    .map(|(ws, xs)| {
                        let unit = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 32512.0;
                        unit * ws.iter().map(|v| v.abs()).sum::<f32>()
                    })
                    .sum()
            } else {
                0.0
            };
            let tol = 1e-5 + 1e-4 * magnitude + 1.01 * rounding;
            assert!((got[r] - want[r]).abs() <= tol, "{dtype} row {r}: {} vs {} (tolerance {tol})", got[r], want[r]);
        }
    }
}

/// Activations from 1e-15 to 1e11 in magnitude: the kernels that scale x internally stay within
/// f32 rounding of the reference (relative tolerance only).
#[test]
fn matvec_keeps_precision_for_large_and_tiny_activations() {
    let Some(cuda) = device_or_skip("matvec_keeps_precision_for_large_and_tiny_activations") else { return };
    let (n, k) = (40, 512);
    for dtype in DType::ALL {
        let w = weight(dtype, n, k, 21);
        let wf = w.to_f32_vec().unwrap();
        let dw = upload_tensor(&cuda, &w).unwrap();
        for scale in [1e-15f32, 1e6, 1e11] {
            for tokens in [1, 2, 5] {
                let x: Vec<f32> = random_f32(tokens * k, 22, 1.0).iter().map(|v| v * scale).collect();
                let mut want = vec![0f32; tokens * n];
                reference::matmul(&x, &w, &mut want).unwrap();
                let mut dy = cuda.zeros::<f32>(tokens * n).unwrap();
                ops::matvec(&cuda, &dw, &cuda.upload(&x).unwrap(), &mut dy, tokens).unwrap();
                let got = cuda.download(&dy).unwrap();
                for (i, (&g, &v)) in got.iter().zip(&want).enumerate() {
                    let (t, r) = (i / n, i % n);
                    let magnitude: f32 = (0..k).map(|c| (wf[r * k + c] * x[t * k + c]).abs()).sum();
                    let tol = 1e-4 * magnitude;
                    assert!(
                        (g - v).abs() <= tol,
                        "{dtype} x*{scale} tokens={tokens}: y[{t}, {r}] = {g}, want {v} ({tol})"
                    );
                }
            }
        }
    }
}

/// Views at odd offsets (no alignment of x or y) and outputs outside `tokens * n` left alone.
#[test]
fn matvec_takes_views_and_writes_only_its_outputs() {
    let Some(cuda) = device_or_skip("matvec_takes_views_and_writes_only_its_outputs") else { return };
    let (n, k, tokens) = (45, 512, 3);
    for dtype in [DType::F16, DType::Q4_0, DType::Q6K] {
        let w = weight(dtype, n, k, 5);
        let x = random_f32(tokens * k + 1, 6, 1.0);
        let mut want = vec![0f32; tokens * n];
        reference::matmul(&x[1..], &w, &mut want).unwrap();
        let dw = upload_tensor(&cuda, &w).unwrap();
        let dx = cuda.upload(&x).unwrap();
        let mut dy = cuda.upload(&vec![-7f32; tokens * n + 2]).unwrap();
        {
            let mut view = dy.slice_mut(1..tokens * n + 1);
            ops::matvec(&cuda, &dw, &dx.slice(1..), &mut view, tokens).unwrap();
        }
        let got = cuda.download(&dy).unwrap();
        assert_eq!((got[0], got[tokens * n + 1]), (-7.0, -7.0), "{dtype}: wrote outside its view");
        assert_matches(&format!("{dtype} views"), &got[1..=tokens * n], &want, &w.to_f32_vec().unwrap(), &x[1..], n, k);
    }
}

#[test]
fn matvec_rejects_bad_arguments() {
    let Some(cuda) = device_or_skip("matvec_rejects_bad_arguments") else { return };
    let w = weight(DType::Q8_0, 4, 64, 1);
    let dw = upload_tensor(&cuda, &w).unwrap();
    let x = cuda.zeros::<f32>(128).unwrap();
    let mut y = cuda.zeros::<f32>(8).unwrap();
    let is_invalid =
        |e: &Error, needle: &str| matches!(e, Error::InvalidArgument { .. }) && e.to_string().contains(needle);

    let err = ops::matvec(&cuda, &dw, &x, &mut y, 3).unwrap_err();
    assert!(is_invalid(&err, "192 needed"), "{err}");
    let err = ops::matvec(&cuda, &dw, &x, &mut cuda.zeros::<f32>(7).unwrap(), 2).unwrap_err();
    assert!(is_invalid(&err, "8 needed"), "{err}");
    let err = ops::matvec(&cuda, &w, &x, &mut y, 1).unwrap_err();
    assert!(is_invalid(&err, "host memory"), "{err}");
    let flat = upload_tensor(&cuda, &w.reshape([256]).unwrap()).unwrap();
    let err = ops::matvec(&cuda, &flat, &x, &mut y, 1).unwrap_err();
    assert!(is_invalid(&err, "2-D"), "{err}");
    // No tokens: nothing to do, not an error.
    ops::matvec(&cuda, &dw, &x, &mut y, 0).unwrap();
}
