//! The dequantizing matvec on the GPU against the CPU references, for every weight dtype, on
//! awkward shapes and token counts.
#![cfg(feature = "cuda")]

use proptest::prelude::*;
use strata_kernels::cuda::CudaSlice;
use strata_kernels::cuda::ops::{self, MatvecActs};
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

/// The most the two-digit quantization of `x` (one row of activations) can move the product with
/// weight row `w`: each value within one unit `max|x_b| / 32512` of its block `b` of 32, so
/// `sum_b unit_b * sum_{c in b} |w[c]|`.
fn two_digit_rounding(w: &[f32], x: &[f32]) -> f32 {
    w.chunks(32)
        .zip(x.chunks(32))
        .map(|(ws, xs)| {
            let unit = xs.iter().fold(0f32, |m, v| m.max(v.abs())) / 32512.0;
            unit * ws.iter().map(|v| v.abs()).sum::<f32>()
        })
        .sum()
}

/// `y[t, r]` within `1e-5 + 1e-4 * sum_c |w[r, c] x[t, c]|` of `want` (the GPU and the CPU sum
/// the same f32 products in different orders), plus, where the kernel quantized `x` to two digits
/// (`rounded`), that quantization's bound.
#[allow(clippy::too_many_arguments)]
fn assert_matches(what: &str, got: &[f32], want: &[f32], w: &[f32], x: &[f32], n: usize, k: usize, rounded: bool) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &v)) in got.iter().zip(want).enumerate() {
        let (t, r) = (i / n, i % n);
        let (wr, xt) = (&w[r * k..(r + 1) * k], &x[t * k..(t + 1) * k]);
        let magnitude: f32 = wr.iter().zip(xt).map(|(a, b)| (a * b).abs()).sum();
        let rounding = if rounded { 1.01 * two_digit_rounding(wr, xt) } else { 0.0 };
        let tol = 1e-5 + 1e-4 * magnitude + rounding;
        assert!((g - v).abs() <= tol, "{what}: y[{t}, {r}] = {g}, want {v} (tolerance {tol})");
    }
}

/// Whether the matvec of a `dtype` weight with `acts` quantizes the activations.
fn rounded(dtype: DType, acts: MatvecActs) -> bool {
    dtype.is_quantized() && acts == MatvecActs::TwoDigits
}

/// The GPU matvec of weight `w` with `tokens` random activations against `reference::matmul`
/// (x as `[tokens, k]`), with both kinds of activations.
fn check(cuda: &Cuda, w: &Tensor, dw: &Tensor, wf: &[f32], tokens: usize, seed: u64) {
    let (n, k) = (w.shape().dims()[0], w.shape().dims()[1]);
    let x = random_f32(tokens * k, seed ^ 0x5eed, 2.0);
    let mut want = vec![0f32; tokens * n];
    reference::matmul(&x, w, &mut want).unwrap();
    let dx = cuda.upload(&x).unwrap();
    for acts in MatvecActs::ALL {
        let mut dy = cuda.upload(&vec![f32::NAN; tokens * n]).unwrap();
        ops::matvec_as(cuda, dw, &dx, &mut dy, tokens, acts).unwrap();
        let got = cuda.download(&dy).unwrap();
        let what = format!("matvec {} {acts:?} n={n} k={k} tokens={tokens}", w.dtype());
        assert_matches(&what, &got, &want, wf, &x, n, k, rounded(w.dtype(), acts));
    }
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
/// value for block-quantized weights. The integer kernels quantize x to the same integers, so
/// they differ from it by the order of the f32 sums only; the float kernels keep x, so their
/// tolerance adds the quantization's bound `sum_b unit_b * sum_{c in b} |w[r, c]|`. Activations
/// with an outlier per block, as hidden states have, stress the quantization.
#[test]
fn matvec_matches_the_cpu_decode_path() {
    let Some(cuda) = device_or_skip("matvec_matches_the_cpu_decode_path") else { return };
    for dtype in DType::ALL {
        let (n, k) = (77, if dtype.block_len() == 256 { 1024 } else { 992 });
        let w = weight(dtype, n, k, 11);
        let wf = w.to_f32_vec().unwrap();
        let mut x = random_f32(k, 12, 3.0);
        for (b, xs) in x.chunks_mut(32).enumerate() {
            xs[b % 32] *= 40.0;
        }
        let mut want = vec![0f32; n];
        reference::matvec(&w, &x, &mut want).unwrap();
        let dw = upload_tensor(&cuda, &w).unwrap();
        for acts in MatvecActs::ALL {
            let mut dy = cuda.zeros::<f32>(n).unwrap();
            ops::matvec_as(&cuda, &dw, &cuda.upload(&x).unwrap(), &mut dy, 1, acts).unwrap();
            let got = cuda.download(&dy).unwrap();
            for r in 0..n {
                let row = &wf[r * k..(r + 1) * k];
                let magnitude: f32 = row.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
                let same_integers = rounded(dtype, acts) || !dtype.is_quantized();
                let rounding = if same_integers { 0.0 } else { 1.01 * two_digit_rounding(row, &x) };
                let tol = 1e-5 + 1e-4 * magnitude + rounding;
                assert!(
                    (got[r] - want[r]).abs() <= tol,
                    "{dtype} {acts:?} row {r}: {} vs {} (tolerance {tol})",
                    got[r],
                    want[r]
                );
            }
        }
    }
}

/// Activations from 1e-15 to 1e11 in magnitude: the float kernels, which scale x internally, stay
/// within f32 rounding of the reference (relative tolerance only); the integer kernels within it
/// plus their quantization's bound, which scales with x (the unit is relative to each block).
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
                for acts in MatvecActs::ALL {
                    let mut dy = cuda.zeros::<f32>(tokens * n).unwrap();
                    ops::matvec_as(&cuda, &dw, &cuda.upload(&x).unwrap(), &mut dy, tokens, acts).unwrap();
                    let got = cuda.download(&dy).unwrap();
                    for (i, (&g, &v)) in got.iter().zip(&want).enumerate() {
                        let (t, r) = (i / n, i % n);
                        let (wr, xt) = (&wf[r * k..(r + 1) * k], &x[t * k..(t + 1) * k]);
                        let magnitude: f32 = wr.iter().zip(xt).map(|(a, b)| (a * b).abs()).sum();
                        let rounding = if rounded(dtype, acts) { 1.01 * two_digit_rounding(wr, xt) } else { 0.0 };
                        let tol = 1e-4 * magnitude + rounding;
                        assert!(
                            (g - v).abs() <= tol,
                            "{dtype} {acts:?} x*{scale} tokens={tokens}: y[{t}, {r}] = {g}, want {v} ({tol})"
                        );
                    }
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
        for acts in MatvecActs::ALL {
            let mut dy = cuda.upload(&vec![-7f32; tokens * n + 2]).unwrap();
            {
                let mut view = dy.slice_mut(1..tokens * n + 1);
                ops::matvec_as(&cuda, &dw, &dx.slice(1..), &mut view, tokens, acts).unwrap();
            }
            let got = cuda.download(&dy).unwrap();
            assert_eq!((got[0], got[tokens * n + 1]), (-7.0, -7.0), "{dtype} {acts:?}: wrote outside its view");
            let what = format!("{dtype} {acts:?} views");
            let wf = w.to_f32_vec().unwrap();
            assert_matches(&what, &got[1..=tokens * n], &want, &wf, &x[1..], n, k, rounded(dtype, acts));
        }
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

/// Each store of the plain products of `dw` with f32 `x` (`matvec`, `matvec_add`, `matvec_swiglu`,
/// `tokens` rows of `n` outputs, into buffers that start as NaN or, for the add, as random values)
/// against what `other` stores into a buffer that starts the same: bit for bit.
fn assert_stores_match(
    cuda: &Cuda,
    dw: &Tensor,
    x: &CudaSlice<f32>,
    tokens: usize,
    n: usize,
    what: &str,
    other: impl Fn(ops::MatvecStore, &mut CudaSlice<f32>) -> Result<(), Error>,
) {
    let y0 = random_f32(tokens * n, 33, 10.0);
    for store in [ops::MatvecStore::Write, ops::MatvecStore::Add, ops::MatvecStore::Swiglu] {
        let outputs = if store == ops::MatvecStore::Swiglu { n / 2 } else { n };
        let start = if store == ops::MatvecStore::Add { y0.clone() } else { vec![f32::NAN; tokens * n] };
        let (mut want, mut got) =
            (cuda.upload(&start[..tokens * outputs]).unwrap(), cuda.upload(&start[..tokens * outputs]).unwrap());
        match store {
            ops::MatvecStore::Write => ops::matvec(cuda, dw, x, &mut want, tokens),
            ops::MatvecStore::Add => ops::matvec_add(cuda, dw, x, &mut want, tokens),
            ops::MatvecStore::Swiglu => ops::matvec_swiglu(cuda, dw, x, &mut want, tokens),
        }
        .unwrap();
        other(store, &mut got).unwrap();
        let (want, got) = (cuda.download(&want).unwrap(), cuda.download(&got).unwrap());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{what} {store:?}: y[{i}] = {g}, want {w}");
        }
    }
}

/// Activations quantized once (`quantize_acts`, or the launcher before a product of more than two
/// tokens) give every store of every block-quantized dtype bit for bit what the blocks'
/// own quantization gives: `matvec_actq` against `matvec`, `matvec_add` and `matvec_swiglu`, one
/// and several activation tiles.
#[test]
fn matvec_on_quantized_activations_is_bit_for_bit_the_same() {
    let Some(cuda) = device_or_skip("matvec_on_quantized_activations_is_bit_for_bit_the_same") else { return };
    let n = 44;
    for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4K, DType::Q6K] {
        for k in [dtype.block_len() * 9, 8448] {
            let dw = upload_tensor(&cuda, &weight(dtype, n, k, 31)).unwrap();
            for tokens in [1, 2, 3, 8] {
                let dx = cuda.upload(&random_f32(tokens * k, 32 + tokens as u64, 3.0)).unwrap();
                let mut xq = cuda.zeros::<u8>(ops::actq_bytes(tokens, k)).unwrap();
                ops::quantize_acts(&cuda, &dx, &mut xq, tokens, k).unwrap();
                let what = format!("{dtype} k={k} tokens={tokens}");
                assert_stores_match(&cuda, &dw, &dx, tokens, n, &what, |store, y| {
                    ops::matvec_actq(&cuda, &dw, &xq, y, tokens, store)
                });
            }
        }
    }
    // Float weights take no quantized activations; short or misaligned records are refused.
    let xq = cuda.zeros::<u8>(ops::actq_bytes(1, 64)).unwrap();
    let mut y = cuda.zeros::<f32>(4).unwrap();
    let f16 = upload_tensor(&cuda, &weight(DType::F16, 4, 64, 1)).unwrap();
    let err = ops::matvec_actq(&cuda, &f16, &xq, &mut y, 1, ops::MatvecStore::Write).unwrap_err();
    assert!(err.to_string().contains("block-quantized"), "{err}");
    let q8 = upload_tensor(&cuda, &weight(DType::Q8_0, 4, 64, 1)).unwrap();
    let err =
        ops::matvec_actq(&cuda, &q8, &xq, &mut cuda.zeros::<f32>(8).unwrap(), 2, ops::MatvecStore::Write).unwrap_err();
    assert!(err.to_string().contains("xq"), "{err}");
    // Records at an offset that is not a multiple of 16 bytes (the blocks copy 16-byte pieces).
    let wide = cuda.zeros::<u8>(ops::actq_bytes(1, 64) + 4).unwrap();
    let err = ops::matvec_actq(&cuda, &q8, &wide.slice(4..), &mut y, 1, ops::MatvecStore::Write).unwrap_err();
    assert!(err.to_string().contains("16-byte aligned"), "{err}");
}

/// One Mixture-of-Experts launch computes for every slot bit for bit what a launch on its expert
/// alone computes, for every dtype, with a row of x per slot or one shared row, rows within a tile
/// and longer (activations quantized once per row), written or SwiGLU'd; unused slots (`u32::MAX`,
/// or an id at the expert count) leave their rows alone. Experts of different shapes or dtypes are
/// refused.
#[test]
fn matvec_experts_is_each_experts_matvec() {
    let Some(cuda) = device_or_skip("matvec_experts_is_each_experts_matvec") else { return };
    let n = 44;
    let ids = [5u32, u32::MAX, 0, 3, 6];
    let dids = cuda.upload(&ids).unwrap();
    for dtype in DType::ALL {
        let bl = dtype.block_len();
        for k in [bl * 9, bl * (8448 / bl) + bl] {
            let experts: Vec<Tensor> =
                (0..6).map(|e| upload_tensor(&cuda, &weight(dtype, n, k, 70 + e)).unwrap()).collect();
            let table = ops::ExpertWeights::new(&cuda, &experts).unwrap();
            assert_eq!(table.len(), 6);
            let x = random_f32(ids.len() * k, 80, 3.0);
            for shared in [false, true] {
                let dx = cuda.upload(if shared { &x[..k] } else { &x[..] }).unwrap();
                for store in [ops::MatvecStore::Write, ops::MatvecStore::Swiglu] {
                    let outputs = if store == ops::MatvecStore::Swiglu { n / 2 } else { n };
                    let mut dy = cuda.upload(&vec![f32::NAN; ids.len() * outputs]).unwrap();
                    ops::matvec_experts(&cuda, &table, &dids, &dx, shared, &mut dy, store).unwrap();
                    let got = cuda.download(&dy).unwrap();
                    for (s, &id) in ids.iter().enumerate() {
                        let got = &got[s * outputs..(s + 1) * outputs];
                        let what = format!("{dtype} k={k} shared={shared} {store:?} slot {s} (expert {id})");
                        if id as usize >= experts.len() {
                            assert!(got.iter().all(|v| v.is_nan()), "{what}: an unused slot was written");
                            continue;
                        }
                        let row = if shared { &x[..k] } else { &x[s * k..(s + 1) * k] };
                        let dxs = cuda.upload(row).unwrap();
                        let mut want = cuda.zeros::<f32>(outputs).unwrap();
                        let w = &experts[id as usize];
                        match store {
                            ops::MatvecStore::Swiglu => ops::matvec_swiglu(&cuda, w, &dxs, &mut want, 1),
                            _ => ops::matvec(&cuda, w, &dxs, &mut want, 1),
                        }
                        .unwrap();
                        for (j, (g, v)) in got.iter().zip(&cuda.download(&want).unwrap()).enumerate() {
                            assert_eq!(g.to_bits(), v.to_bits(), "{what}: y[{j}] = {g}, want {v}");
                        }
                    }
                }
            }
        }
    }
    let a = upload_tensor(&cuda, &weight(DType::Q4_0, 8, 64, 1)).unwrap();
    let b = upload_tensor(&cuda, &weight(DType::Q8_0, 8, 64, 1)).unwrap();
    let c = upload_tensor(&cuda, &weight(DType::Q4_0, 8, 96, 1)).unwrap();
    for other in [b, c] {
        let err = ops::ExpertWeights::new(&cuda, &[a.clone(), other]).err().expect("refused");
        assert!(err.to_string().contains("expert 1"), "{err}");
    }
    assert!(ops::ExpertWeights::new(&cuda, &[]).is_err());
}

/// A product that normalises its activations itself (`matvec_normed`) gives bit for bit what
/// `rms_norm` into a buffer then the product give, for every dtype and store wherever
/// `fuses_norm` allows it (block-quantized weights at one and two tokens on rows within a tile,
/// float weights at any count), and refuses the others.
#[test]
fn matvec_normed_is_rms_norm_then_matvec() {
    let Some(cuda) = device_or_skip("matvec_normed_is_rms_norm_then_matvec") else { return };
    let n = 44;
    for dtype in DType::ALL {
        let bl = dtype.block_len();
        for k in [bl * 9, bl * (2048 / bl), bl * (8448 / bl) + bl] {
            let dw = upload_tensor(&cuda, &weight(dtype, n, k, 41)).unwrap();
            let norm = cuda.upload(&random_f32(k, 42, 1.5)).unwrap();
            for tokens in [1, 2, 3, 8] {
                let what = format!("{dtype} k={k} tokens={tokens}");
                let dx = cuda.upload(&random_f32(tokens * k, 43 + tokens as u64, 3.0)).unwrap();
                let mut y = cuda.zeros::<f32>(tokens * n).unwrap();
                let fuses = ops::fuses_norm(&dw, tokens);
                let tile = if dtype.is_quantized() { 8192 / tokens.next_power_of_two() } else { usize::MAX };
                assert_eq!(fuses, !dtype.is_quantized() || (tokens <= 2 && k <= tile), "{what}");
                if !fuses {
                    let r = ops::matvec_normed(&cuda, &dw, &dx, &norm, 1e-5, &mut y, tokens, ops::MatvecStore::Write);
                    assert!(r.is_err(), "{what}: a product that cannot normalise was launched");
                    continue;
                }
                let mut normed = cuda.zeros::<f32>(tokens * k).unwrap();
                ops::rms_norm(&cuda, &dx, &norm, 1e-5, tokens, &mut normed).unwrap();
                assert_stores_match(&cuda, &dw, &normed, tokens, n, &what, |store, y| {
                    ops::matvec_normed(&cuda, &dw, &dx, &norm, 1e-5, y, tokens, store)
                });
            }
        }
    }
}

/// Expert products that normalise their shared row themselves (`matvec_experts_normed`) give bit
/// for bit `rms_norm` then `matvec_experts`, for every dtype whose one-token product can
/// normalise; unused slots stay unwritten.
#[test]
fn matvec_experts_normed_is_rms_norm_then_matvec_experts() {
    let Some(cuda) = device_or_skip("matvec_experts_normed_is_rms_norm_then_matvec_experts") else { return };
    let n = 44;
    let dids = cuda.upload(&[2u32, u32::MAX, 0]).unwrap();
    for dtype in DType::ALL {
        let k = dtype.block_len() * (2048 / dtype.block_len());
        let experts: Vec<Tensor> =
            (0..3).map(|e| upload_tensor(&cuda, &weight(dtype, n, k, 90 + e)).unwrap()).collect();
        assert!(ops::fuses_norm(&experts[0], 1), "{dtype}");
        let table = ops::ExpertWeights::new(&cuda, &experts).unwrap();
        let dx = cuda.upload(&random_f32(k, 93, 3.0)).unwrap();
        let norm = cuda.upload(&random_f32(k, 94, 1.5)).unwrap();
        let mut normed = cuda.zeros::<f32>(k).unwrap();
        ops::rms_norm(&cuda, &dx, &norm, 1e-5, 1, &mut normed).unwrap();
        for store in [ops::MatvecStore::Write, ops::MatvecStore::Swiglu] {
            let outputs = if store == ops::MatvecStore::Swiglu { n / 2 } else { n };
            let mut want = cuda.upload(&vec![f32::NAN; 3 * outputs]).unwrap();
            let mut got = cuda.upload(&vec![f32::NAN; 3 * outputs]).unwrap();
            ops::matvec_experts(&cuda, &table, &dids, &normed, true, &mut want, store).unwrap();
            ops::matvec_experts_normed(&cuda, &table, &dids, &dx, &norm, 1e-5, &mut got, store).unwrap();
            let (want, got) = (cuda.download(&want).unwrap(), cuda.download(&got).unwrap());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let same = if w.is_nan() { g.is_nan() } else { g.to_bits() == w.to_bits() };
                assert!(same, "{dtype} {store:?}: y[{i}] = {g}, want {w}");
            }
        }
    }
}
