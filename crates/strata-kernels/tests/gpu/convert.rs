//! Dequantization and embedding gather on the GPU: bit-identical to the CPU's decoding, for every
//! dtype.
#![cfg(feature = "cuda")]

use proptest::prelude::*;
use strata_kernels::Error;
use strata_kernels::cuda::ops;
use strata_kernels::cuda::tensor::upload_tensor;
use strata_kernels::cuda::testing::{device_or_skip, random_f32};
use strata_tensor::cpu::reference;
use strata_tensor::{DType, Tensor};

/// A random `[n, k]` tensor of `dtype` with some all-zero and some large blocks.
fn table(dtype: DType, n: usize, k: usize, seed: u64) -> Tensor {
    let mut data = random_f32(n * k, seed, 1.0);
    for (i, v) in data.iter_mut().enumerate() {
        match (i / 32) % 11 {
            3 => *v = 0.0,
            7 => *v *= 1000.0,
            _ => {}
        }
    }
    Tensor::from_f32_as(&data, [n, k], dtype).unwrap()
}

/// Equal bit for bit, naming the first difference.
fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {i}: got {g}, want {w}");
    }
}

fn check_dequantize(dtype: DType, n: usize, k: usize, seed: u64) {
    let Some(cuda) = device_or_skip("dequantize") else { return };
    let t = table(dtype, n, k, seed);
    let dt = upload_tensor(&cuda, &t).unwrap();
    let mut out = cuda.upload(&vec![f32::NAN; n * k]).unwrap();
    ops::dequantize(&cuda, &dt, &mut out).unwrap();
    assert_bits_eq(&format!("dequantize {dtype} [{n}, {k}]"), &cuda.download(&out).unwrap(), &t.to_f32_vec().unwrap());
}

#[test]
fn dequantize_is_exact_for_every_dtype() {
    for dtype in DType::ALL {
        let ks: &[usize] = match dtype.block_len() {
            1 => &[1, 3, 4, 13, 64, 1000],
            32 => &[32, 32 * 37, 4096],
            _ => &[256, 256 * 3, 256 * 9],
        };
        for &k in ks {
            for n in [1, 7, 33] {
                check_dequantize(dtype, n, k, (n * 7919 + k) as u64);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn dequantize_is_exact_on_random_shapes(
        dtype in prop::sample::select(DType::ALL.to_vec()),
        n in 1usize..200,
        blocks in 1usize..24,
        seed in any::<u64>(),
    ) {
        check_dequantize(dtype, n, blocks * dtype.block_len(), seed);
    }
}

#[test]
fn embedding_matches_the_reference_for_every_dtype() {
    let Some(cuda) = device_or_skip("embedding_matches_the_reference_for_every_dtype") else { return };
    let vocab = 300;
    for dtype in DType::ALL {
        let dim = if dtype.is_quantized() { 2 * dtype.block_len() } else { 45 };
        let t = table(dtype, vocab, dim, dtype as u64);
        let dt = upload_tensor(&cuda, &t).unwrap();
        let ids: Vec<u32> = vec![0, 299, 5, 5, 17, 123, 298, 0, 42];
        let mut want = vec![0f32; ids.len() * dim];
        reference::embedding(&t, &ids, &mut want).unwrap();
        let mut out = cuda.upload(&vec![f32::NAN; ids.len() * dim]).unwrap();
        ops::embedding(&cuda, &dt, &cuda.upload(&ids).unwrap(), ids.len(), &mut out).unwrap();
        assert_bits_eq(&format!("embedding {dtype}"), &cuda.download(&out).unwrap(), &want);
    }
}

/// An id past the table reads nothing and gives a row of NaNs; the other rows are unaffected.
#[test]
fn embedding_flags_out_of_range_ids_with_nans() {
    let Some(cuda) = device_or_skip("embedding_flags_out_of_range_ids_with_nans") else { return };
    let (vocab, dim) = (10, 64);
    let t = table(DType::Q4_0, vocab, dim, 3);
    let dt = upload_tensor(&cuda, &t).unwrap();
    let ids = [2u32, 10, u32::MAX, 9];
    let mut out = cuda.zeros::<f32>(ids.len() * dim).unwrap();
    ops::embedding(&cuda, &dt, &cuda.upload(&ids).unwrap(), ids.len(), &mut out).unwrap();
    let got = cuda.download(&out).unwrap();
    let rows = t.to_f32_vec().unwrap();
    assert_bits_eq("id 2", &got[..dim], &rows[2 * dim..3 * dim]);
    assert!(got[dim..3 * dim].iter().all(|v| v.is_nan()), "out-of-range ids must give NaN rows");
    assert_bits_eq("id 9", &got[3 * dim..], &rows[9 * dim..]);
}

#[test]
fn convert_rejects_bad_arguments() {
    let Some(cuda) = device_or_skip("convert_rejects_bad_arguments") else { return };
    let t = table(DType::Q8_0, 4, 64, 1);
    let dt = upload_tensor(&cuda, &t).unwrap();
    let is_invalid =
        |e: &Error, needle: &str| matches!(e, Error::InvalidArgument { .. }) && e.to_string().contains(needle);
    let mut short = cuda.zeros::<f32>(255).unwrap();
    let err = ops::dequantize(&cuda, &dt, &mut short).unwrap_err();
    assert!(is_invalid(&err, "256 needed"), "{err}");
    let err = ops::dequantize(&cuda, &t, &mut cuda.zeros::<f32>(256).unwrap()).unwrap_err();
    assert!(is_invalid(&err, "host memory"), "{err}");
    let flat = upload_tensor(&cuda, &t.reshape([256]).unwrap()).unwrap();
    let err = ops::dequantize(&cuda, &flat, &mut cuda.zeros::<f32>(256).unwrap()).unwrap_err();
    assert!(is_invalid(&err, "2-D"), "{err}");
    let ids = cuda.upload(&[0u32, 1, 2]).unwrap();
    let err = ops::embedding(&cuda, &dt, &ids, 4, &mut cuda.zeros::<f32>(256).unwrap()).unwrap_err();
    assert!(is_invalid(&err, "4 needed"), "{err}");
    let err = ops::embedding(&cuda, &dt, &ids, 3, &mut cuda.zeros::<f32>(191).unwrap()).unwrap_err();
    assert!(is_invalid(&err, "192 needed"), "{err}");
}
