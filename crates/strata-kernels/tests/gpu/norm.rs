//! RMSNorm on the GPU against the CPU reference, on random shapes.
#![cfg(feature = "cuda")]

use proptest::prelude::*;
use strata_kernels::cuda::ops;
use strata_kernels::cuda::testing::{assert_close, device_or_skip, random_f32};
use strata_tensor::cpu::reference;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn rms_norm_matches_the_reference(rows in 1usize..9, cols in 1usize..2200, seed in any::<u64>()) {
        let Some(cuda) = device_or_skip("rms_norm_matches_the_reference") else { return Ok(()) };
        let x = random_f32(rows * cols, seed, 2.0);
        let w = random_f32(cols, seed ^ 1, 1.5);
        let mut want = vec![0f32; rows * cols];
        reference::rms_norm(&x, &w, 1e-5, &mut want).unwrap();
        let dx = cuda.upload(&x).unwrap();
        let dw = cuda.upload(&w).unwrap();
        let mut dout = cuda.zeros::<f32>(rows * cols).unwrap();
        ops::rms_norm(&cuda, &dx, &dw, 1e-5, rows, &mut dout).unwrap();
        assert_close("rms_norm", &cuda.download(&dout).unwrap(), &want, 1e-5, 1e-5);
    }
}

#[test]
fn rms_norm_rejects_short_buffers() {
    let Some(cuda) = device_or_skip("rms_norm_rejects_short_buffers") else { return };
    let x = cuda.zeros::<f32>(10).unwrap();
    let w = cuda.zeros::<f32>(4).unwrap();
    let mut out = cuda.zeros::<f32>(10).unwrap();
    let err = ops::rms_norm(&cuda, &x, &w, 1e-5, 3, &mut out).unwrap_err();
    assert!(err.to_string().contains("12 needed"), "{err}");
}

/// The register path at its limit (8192 columns), the striding path past it (8200) and for rows
/// that are not 16-byte aligned (a view one float into the buffer), each out of place and in
/// place.
#[test]
fn rms_norm_register_and_striding_paths() {
    let Some(cuda) = device_or_skip("rms_norm_register_and_striding_paths") else { return };
    for (rows, cols, offset) in [(3usize, 8192usize, 0usize), (2, 8200, 0), (2, 1024, 1), (5, 4, 0)] {
        let what = format!("rms_norm {rows} x {cols} at offset {offset}");
        let x = random_f32(rows * cols + offset, cols as u64, 2.0);
        let w = random_f32(cols, 7, 1.5);
        let mut want = vec![0f32; rows * cols];
        reference::rms_norm(&x[offset..], &w, 1e-5, &mut want).unwrap();
        let dx = cuda.upload(&x).unwrap();
        let dw = cuda.upload(&w).unwrap();
        let mut dout = cuda.zeros::<f32>(rows * cols + offset).unwrap();
        ops::rms_norm(&cuda, &dx.slice(offset..), &dw, 1e-5, rows, &mut dout.slice_mut(offset..)).unwrap();
        assert_close(&what, &cuda.download(&dout).unwrap()[offset..], &want, 1e-5, 1e-5);
        let mut dinplace = cuda.upload(&x).unwrap();
        ops::rms_norm_inplace(&cuda, &mut dinplace.slice_mut(offset..), &dw, 1e-5, rows).unwrap();
        assert_close(&format!("{what}, in place"), &cuda.download(&dinplace).unwrap()[offset..], &want, 1e-5, 1e-5);
    }
}

/// `rms_norm_actq` writes what `rms_norm` writes, bit for bit, and records that are bit for bit
/// `quantize_acts` of those outputs; rows that are not whole blocks of 32 are refused.
#[test]
fn rms_norm_actq_quantizes_its_outputs_as_the_matvec_does() {
    let Some(cuda) = device_or_skip("rms_norm_actq_quantizes_its_outputs_as_the_matvec_does") else { return };
    for (rows, cols) in [(1usize, 2048usize), (5, 8224), (8, 64)] {
        let dx = cuda.upload(&random_f32(rows * cols, cols as u64, 4.0)).unwrap();
        let dw = cuda.upload(&random_f32(cols, 3, 1.5)).unwrap();
        let mut want = cuda.zeros::<f32>(rows * cols).unwrap();
        ops::rms_norm(&cuda, &dx, &dw, 1e-5, rows, &mut want).unwrap();
        let mut got = cuda.zeros::<f32>(rows * cols).unwrap();
        let mut xq = cuda.zeros::<u8>(ops::actq_bytes(rows, cols)).unwrap();
        ops::rms_norm_actq(&cuda, &dx, &dw, 1e-5, rows, &mut got, &mut xq).unwrap();
        let mut want_q = cuda.zeros::<u8>(ops::actq_bytes(rows, cols)).unwrap();
        ops::quantize_acts(&cuda, &want, &mut want_q, rows, cols).unwrap();
        let (want, got) = (cuda.download(&want).unwrap(), cuda.download(&got).unwrap());
        assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "{rows} x {cols}: outputs differ");
        assert!(cuda.download(&xq).unwrap() == cuda.download(&want_q).unwrap(), "{rows} x {cols}: records differ");
    }
    let x = cuda.zeros::<f32>(48).unwrap();
    let w = cuda.zeros::<f32>(48).unwrap();
    let (mut out, mut xq) = (cuda.zeros::<f32>(48).unwrap(), cuda.zeros::<u8>(256).unwrap());
    let err = ops::rms_norm_actq(&cuda, &x, &w, 1e-5, 1, &mut out, &mut xq).unwrap_err();
    assert!(err.to_string().contains("blocks of 32"), "{err}");
}
