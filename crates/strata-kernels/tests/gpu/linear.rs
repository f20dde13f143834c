//! The linear layer (matvec for a few tokens, dequantize + cuBLAS f32 GEMM for more) and the
//! cuBLAS GEMM itself, against the CPU reference.
#![cfg(feature = "cuda")]

use strata_kernels::cuda::blas::GemmDtype;
use strata_kernels::cuda::ops::{self, LINEAR_MATVEC_TOKENS, LinearScratch};
use strata_kernels::cuda::tensor::{upload_paired, upload_tensor};
use strata_kernels::cuda::testing::{device_or_skip, random_f32};
use strata_tensor::cpu::reference;
use strata_tensor::{DType, Tensor};

/// `y[t, r]` within `1e-5 + 1e-4 * sum_c |w[r, c] x[t, c]|` of `want` (f32 sums in another
/// order; cuBLAS's f32 GEMM does not use TF32).
fn assert_matches(what: &str, got: &[f32], want: &[f32], w: &[f32], x: &[f32], n: usize, k: usize) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &v)) in got.iter().zip(want).enumerate() {
        let (t, r) = (i / n, i % n);
        let magnitude: f32 = (0..k).map(|c| (w[r * k + c] * x[t * k + c]).abs()).sum();
        let tol = 1e-5 + 1e-4 * magnitude;
        assert!((g - v).abs() <= tol, "{what}: y[{t}, {r}] = {g}, want {v} (tolerance {tol})");
    }
}

#[test]
fn linear_matches_matmul_on_both_paths_for_every_dtype() {
    let Some(cuda) = device_or_skip("linear_matches_matmul_on_both_paths_for_every_dtype") else { return };
    let mut scratch = LinearScratch::new();
    for dtype in DType::ALL {
        for (n, k) in [(33, 512), (130, 768)] {
            let w = Tensor::from_f32_as(&random_f32(n * k, (n + k) as u64, 1.0), [n, k], dtype).unwrap();
            let wf = w.to_f32_vec().unwrap();
            let dw = upload_tensor(&cuda, &w).unwrap();
            for tokens in [1, LINEAR_MATVEC_TOKENS, LINEAR_MATVEC_TOKENS + 1, 17, 64] {
                let x = random_f32(tokens * k, tokens as u64, 2.0);
                let mut want = vec![0f32; tokens * n];
                reference::matmul(&x, &w, &mut want).unwrap();
                let mut dy = cuda.upload(&vec![f32::NAN; tokens * n]).unwrap();
                ops::linear(&cuda, &dw, &cuda.upload(&x).unwrap(), &mut dy, tokens, &mut scratch).unwrap();
                let what = format!("linear {dtype} [{n}, {k}] tokens={tokens}");
                assert_matches(&what, &cuda.download(&dy).unwrap(), &want, &wf, &x, n, k);
            }
        }
    }
    // The scratch held the largest dequantized weight, and no f32 weight needed it.
    assert_eq!(scratch.capacity(), 130 * 768);
}

/// `linear_add` adds to y what `linear` writes: bit for bit on the matvec path (the product is
/// rounded, then added); on the GEMM path (cuBLAS's beta = 1, which may pick another algorithm)
/// within `assert_matches`'s tolerance of the product plus an ulp of the sum.
#[test]
fn linear_add_adds_what_linear_writes_on_both_paths() {
    let Some(cuda) = device_or_skip("linear_add_adds_what_linear_writes_on_both_paths") else { return };
    let mut scratch = LinearScratch::new();
    for dtype in DType::ALL {
        let (n, k) = (70, 512);
        let w = Tensor::from_f32_as(&random_f32(n * k, 5, 1.0), [n, k], dtype).unwrap();
        let (dw, wf) = (upload_tensor(&cuda, &w).unwrap(), w.to_f32_vec().unwrap());
        for tokens in [1, 3, LINEAR_MATVEC_TOKENS + 1, 40] {
            let xh = random_f32(tokens * k, tokens as u64, 2.0);
            let x = cuda.upload(&xh).unwrap();
            let y0 = random_f32(tokens * n, 11, 50.0);
            let mut plain = cuda.upload(&vec![f32::NAN; tokens * n]).unwrap();
            ops::linear(&cuda, &dw, &x, &mut plain, tokens, &mut scratch).unwrap();
            let plain = cuda.download(&plain).unwrap();
            let mut dy = cuda.upload(&y0).unwrap();
            ops::linear_add(&cuda, &dw, &x, &mut dy, tokens, &mut scratch).unwrap();
            let got = cuda.download(&dy).unwrap();
            for (i, (&g, (&a, &p))) in got.iter().zip(y0.iter().zip(&plain)).enumerate() {
                let want = a + p;
                let what = format!("linear_add {dtype} [{n}, {k}] tokens={tokens}: y[{i}] = {g}, want {a} + {p}");
                if tokens <= LINEAR_MATVEC_TOKENS {
                    assert_eq!(g.to_bits(), want.to_bits(), "{what}");
                } else {
                    let (t, r) = (i / n, i % n);
                    let magnitude: f32 = (0..k).map(|c| (wf[r * k + c] * xh[t * k + c]).abs()).sum();
                    let tol = 1e-5 + 1e-4 * magnitude + f32::EPSILON * want.abs();
                    assert!((g - want).abs() <= tol, "{what} (tolerance {tol})");
                }
            }
        }
    }
}

/// `linear_swiglu` on paired gate and up rows is `linear` of each, then `swiglu`: bit for bit on
/// the matvec path (one launch), within `assert_matches`'s tolerance through SwiGLU on the GEMM
/// path (cuBLAS may sum the paired weight in another order).
#[test]
fn linear_swiglu_of_paired_rows_is_two_linears_and_swiglu() {
    let Some(cuda) = device_or_skip("linear_swiglu_of_paired_rows_is_two_linears_and_swiglu") else { return };
    let mut scratch = LinearScratch::new();
    for dtype in DType::ALL {
        let (n, k) = (70, 512);
        let gate = Tensor::from_f32_as(&random_f32(n * k, 21, 1.0), [n, k], dtype).unwrap();
        let up = Tensor::from_f32_as(&random_f32(n * k, 22, 1.0), [n, k], dtype).unwrap();
        let (dg, du) = (upload_tensor(&cuda, &gate).unwrap(), upload_tensor(&cuda, &up).unwrap());
        let paired = upload_paired(&cuda, &gate, &up).unwrap();
        assert_eq!(paired.shape().dims(), &[2 * n, k]);
        let (gf, uf) = (gate.to_f32_vec().unwrap(), up.to_f32_vec().unwrap());
        for tokens in [1, 2, LINEAR_MATVEC_TOKENS, LINEAR_MATVEC_TOKENS + 1, 33] {
            let xh = random_f32(tokens * k, tokens as u64, 2.0);
            let x = cuda.upload(&xh).unwrap();
            let (mut g, mut u) = (cuda.zeros::<f32>(tokens * n).unwrap(), cuda.zeros::<f32>(tokens * n).unwrap());
            ops::linear(&cuda, &dg, &x, &mut g, tokens, &mut scratch).unwrap();
            ops::linear(&cuda, &du, &x, &mut u, tokens, &mut scratch).unwrap();
            let mut want = cuda.zeros::<f32>(tokens * n).unwrap();
            ops::swiglu(&cuda, &g, &u, &mut want).unwrap();
            let (gh, uh, want) =
                (cuda.download(&g).unwrap(), cuda.download(&u).unwrap(), cuda.download(&want).unwrap());
            let mut products = cuda.zeros::<f32>(2 * tokens * n).unwrap();
            let mut out = cuda.upload(&vec![f32::NAN; tokens * n + 1]).unwrap();
            ops::linear_swiglu(&cuda, &paired, &x, &mut products, &mut out, tokens, &mut scratch).unwrap();
            let got = cuda.download(&out).unwrap();
            assert!(got[tokens * n].is_nan(), "{dtype} tokens={tokens}: wrote past the outputs");
            for (i, (&o, &w)) in got.iter().zip(&want).enumerate() {
                let what = format!("linear_swiglu {dtype} [{n}, {k}] tokens={tokens}: out[{i}] = {o}, want {w}");
                if tokens <= LINEAR_MATVEC_TOKENS {
                    assert_eq!(o.to_bits(), w.to_bits(), "{what}");
                } else {
                    // Each product within assert_matches's tolerance; silu's slope is at most
                    // 1.1 and silu(g) at most |g|, so an error eg in g and eu in u move the
                    // output by at most 1.1 |u| eg + |g| eu (and their product).
                    let (t, r) = (i / n, i % n);
                    let xt = &xh[t * k..(t + 1) * k];
                    let magnitude =
                        |w: &[f32]| -> f32 { w[r * k..(r + 1) * k].iter().zip(xt).map(|(a, b)| (a * b).abs()).sum() };
                    let (eg, eu) = (1e-5 + 1e-4 * magnitude(&gf), 1e-5 + 1e-4 * magnitude(&uf));
                    let tol = 1.1 * uh[i].abs() * eg + (gh[i].abs() + eg) * eu + 1e-6 * w.abs();
                    assert!((o - w).abs() <= tol, "{what} (tolerance {tol})");
                }
            }
        }
    }
}

#[test]
fn linear_rejects_short_buffers_on_the_gemm_path() {
    let Some(cuda) = device_or_skip("linear_rejects_short_buffers_on_the_gemm_path") else { return };
    let w = Tensor::from_f32_as(&random_f32(8 * 64, 1, 1.0), [8, 64], DType::Q8_0).unwrap();
    let dw = upload_tensor(&cuda, &w).unwrap();
    let x = cuda.zeros::<f32>(20 * 64 - 1).unwrap();
    let mut y = cuda.zeros::<f32>(20 * 8).unwrap();
    let err = ops::linear(&cuda, &dw, &x, &mut y, 20, &mut LinearScratch::new()).unwrap_err();
    assert!(err.to_string().contains("1280 needed"), "{err}");
}

/// `Blas::matmul` (operands as bytes) and `Blas::matmul_f32` against the CPU, f32 and f16.
#[test]
fn blas_matmul_matches_the_reference() {
    let Some(cuda) = device_or_skip("blas_matmul_matches_the_reference") else { return };
    let blas = cuda.blas().unwrap();
    let (t, n, k) = (19, 45, 70);
    let x = random_f32(t * k, 1, 1.0);
    let wv = random_f32(n * k, 2, 1.0);
    let w = Tensor::from_f32(&wv, [n, k]).unwrap();
    let mut want = vec![0f32; t * n];
    reference::matmul(&x, &w, &mut want).unwrap();

    let (dx, dw) = (cuda.upload(&x).unwrap(), cuda.upload(&wv).unwrap());
    let mut dy = cuda.zeros::<f32>(t * n).unwrap();
    blas.matmul_f32(&cuda, &dx, &dw, &mut dy, (t, n, k)).unwrap();
    assert_matches("matmul_f32", &cuda.download(&dy).unwrap(), &want, &wv, &x, n, k);

    let bytes = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    let (bx, bw) = (cuda.upload(&bytes(&x)).unwrap(), cuda.upload(&bytes(&wv)).unwrap());
    let mut dy = cuda.zeros::<f32>(t * n).unwrap();
    blas.matmul(&cuda, GemmDtype::F32, &bx, &bw, &mut dy, (t, n, k)).unwrap();
    assert_matches("matmul f32 bytes", &cuda.download(&dy).unwrap(), &want, &wv, &x, n, k);

    // f16 operands: compare with the reference on the f16-rounded inputs.
    let h = |v: &[f32]| v.iter().map(|f| half::f16::from_f32(*f)).collect::<Vec<_>>();
    let (hx, hw) = (h(&x), h(&wv));
    let (rx, rw): (Vec<f32>, Vec<f32>) =
        (hx.iter().map(|v| v.to_f32()).collect(), hw.iter().map(|v| v.to_f32()).collect());
    let mut want16 = vec![0f32; t * n];
    reference::matmul(&rx, &Tensor::from_f32(&rw, [n, k]).unwrap(), &mut want16).unwrap();
    let hb = |v: &[half::f16]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    let (bx, bw) = (cuda.upload(&hb(&hx)).unwrap(), cuda.upload(&hb(&hw)).unwrap());
    let mut dy = cuda.zeros::<f32>(t * n).unwrap();
    blas.matmul(&cuda, GemmDtype::F16, &bx, &bw, &mut dy, (t, n, k)).unwrap();
    assert_matches("matmul f16", &cuda.download(&dy).unwrap(), &want16, &rw, &rx, n, k);

    let err = blas.matmul_f32(&cuda, &dx, &dw, &mut dy, (t + 1, n, k)).unwrap_err();
    assert!(err.to_string().contains("needed"), "{err}");
}
