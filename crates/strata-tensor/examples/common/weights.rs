//! What the examples share: a random block-quantized weight with sane scales.

use strata_tensor::{AlignedBytes, CpuStorage, DType, Tensor};

/// A `[n, k]` weight of random bytes whose f16 scales are finite values in -0.01..0.01.
pub fn random_weight(dtype: DType, n: usize, k: usize, seed: u64) -> strata_tensor::Result<Tensor> {
    let len = n * dtype.bytes_for(k).expect("k is whole blocks");
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as u32
    };
    let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
    let f16_fields: &[usize] = match dtype {
        DType::Q4_1 | DType::Q4K => &[0, 2],
        DType::Q6K => &[208],
        _ => &[0],
    };
    for block in bytes.chunks_mut(dtype.block_bytes()) {
        for &at in f16_fields {
            let v = half::f16::from_f32((next() % 2000) as f32 / 1e5 - 0.01);
            block[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    Tensor::from_storage(CpuStorage::owned(AlignedBytes::copy_from(&bytes)), dtype, [n, k])
}
