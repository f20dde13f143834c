//! Helpers for the kernel tests that need no device (the GPU tests and the CPU emulation of the
//! kernels share them): the tolerance rule of STYLE.md (absolute + |reference| × epsilon) and
//! deterministic random inputs.

/// Asserts `|got - want| <= atol + rtol × |want|` element-wise, naming the first bad index.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = atol + rtol * w.abs();
        assert!(
            (g - w).abs() <= tol && g.is_finite() == w.is_finite(),
            "{what}: element {i}: got {g}, want {w} (tolerance {tol})"
        );
    }
}

/// Deterministic pseudo-random floats in [-scale, scale) for kernel inputs (never zeros).
pub fn random_f32(n: usize, seed: u64, scale: f32) -> Vec<f32> {
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
