//! Block formats, bit-identical to ggml, and conversion of rows between f32 and every dtype.
//!
//! Each block type is a `#[repr(C)]` struct whose size and field order equal ggml's `block_*`
//! definitions (checked by tests), so bytes from a GGUF file are reinterpreted in place with
//! `bytemuck`. [`quantize_row`] and [`dequantize_row`] are the plain reference conversions; the
//! per-format modules hold the details. `q8act` quantizes activations to blocks of two 8-bit
//! digits and `vec_dot` holds the scalar integer dot products of the quantized matrix-vector product.

use bytemuck::Pod;
use half::{bf16, f16};

use crate::{DType, Error, Result};

pub(crate) mod q4_0;
mod q4_1;
pub(crate) mod q4_k;
mod q6_k;
mod q8_0;
pub(crate) mod q8act;
pub(crate) mod vec_dot;

pub use q4_0::BlockQ4_0;
pub use q4_1::BlockQ4_1;
pub use q4_k::BlockQ4K;
use q4_k::unpack_scales_mins;
pub use q6_k::BlockQ6K;
pub use q8_0::BlockQ8_0;

/// Elements per block of the 32-element formats (`Q8_0`, `Q4_0`, `Q4_1`).
pub const QK: usize = 32;
/// Elements per super-block of the k-quant formats (`Q4_K`, `Q6_K`).
pub const QK_K: usize = 256;

/// Converts one row of f32 values into `dst`, encoded as `dtype` (rounded for f16/bf16,
/// quantized for block types). `src.len()` must be a multiple of the block length and `dst`
/// exactly `dtype.bytes_for(src.len())` bytes.
pub fn quantize_row(dtype: DType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    check_row("quantize_row", dtype, src.len(), dst.len())?;
    match dtype {
        DType::F32 => dst.copy_from_slice(bytemuck::cast_slice(src)),
        DType::F16 => {
            for (x, d) in src.iter().zip(dst.chunks_exact_mut(2)) {
                d.copy_from_slice(&f16::from_f32(*x).to_le_bytes());
            }
        }
        DType::BF16 => {
            for (x, d) in src.iter().zip(dst.chunks_exact_mut(2)) {
                d.copy_from_slice(&bf16::from_f32(*x).to_le_bytes());
            }
        }
        DType::Q8_0 => with_blocks_mut(dst, |b| q8_0::quantize(src, b)),
        DType::Q4_0 => with_blocks_mut(dst, |b| q4_0::quantize(src, b)),
        DType::Q4_1 => with_blocks_mut(dst, |b| q4_1::quantize(src, b)),
        DType::Q4K => with_blocks_mut(dst, |b| q4_k::quantize(src, b)),
        DType::Q6K => with_blocks_mut(dst, |b| q6_k::quantize(src, b)),
    }
    Ok(())
}

/// Decodes one row of `dtype` bytes into f32 values. `dst.len()` must be a multiple of the
/// block length and `src` exactly `dtype.bytes_for(dst.len())` bytes.
pub fn dequantize_row(dtype: DType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    check_row("dequantize_row", dtype, dst.len(), src.len())?;
    match dtype {
        DType::F32 => {
            for (b, d) in src.chunks_exact(4).zip(dst.iter_mut()) {
                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F16 => {
            for (b, d) in src.chunks_exact(2).zip(dst.iter_mut()) {
                *d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (b, d) in src.chunks_exact(2).zip(dst.iter_mut()) {
                *d = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        DType::Q8_0 => with_blocks(src, |b| q8_0::dequantize(b, dst)),
        DType::Q4_0 => with_blocks(src, |b| q4_0::dequantize(b, dst)),
        DType::Q4_1 => with_blocks(src, |b| q4_1::dequantize(b, dst)),
        DType::Q4K => with_blocks(src, |b| q4_k::dequantize(b, dst)),
        DType::Q6K => with_blocks(src, |b| q6_k::dequantize(b, dst)),
    }
    Ok(())
}

fn check_row(op: &'static str, dtype: DType, elems: usize, bytes: usize) -> Result<()> {
    let expected =
        dtype.bytes_for(elems).ok_or(Error::NotBlockAligned { op, dtype, len: elems, block: dtype.block_len() })?;
    if bytes != expected {
        return Err(Error::LengthMismatch { op, what: "encoded row bytes", expected, got: bytes });
    }
    Ok(())
}

/// Calls `f` with `bytes` seen as blocks. The bytes are used in place when they are aligned for
/// `B` (the usual case: tensor storage is 64-byte aligned and rows are whole blocks) and copied
/// otherwise. `bytes.len()` must be a multiple of the block size.
pub(crate) fn with_blocks<B: Pod, R>(bytes: &[u8], f: impl FnOnce(&[B]) -> R) -> R {
    match bytemuck::try_cast_slice::<u8, B>(bytes) {
        Ok(blocks) => f(blocks),
        Err(_) => f(&copy_to_blocks::<B>(bytes)),
    }
}

/// Like [`with_blocks`], for writing: a misaligned destination is filled through a copy.
fn with_blocks_mut<B: Pod>(bytes: &mut [u8], f: impl FnOnce(&mut [B])) {
    match bytemuck::try_cast_slice_mut::<u8, B>(bytes) {
        Ok(blocks) => f(blocks),
        Err(_) => {
            let mut blocks = copy_to_blocks::<B>(bytes);
            f(&mut blocks);
            bytes.copy_from_slice(bytemuck::cast_slice(&blocks));
        }
    }
}

/// An aligned copy of `bytes` as blocks.
fn copy_to_blocks<B: Pod>(bytes: &[u8]) -> Vec<B> {
    let mut blocks = vec![B::zeroed(); bytes.len() / size_of::<B>()];
    bytemuck::cast_slice_mut::<B, u8>(&mut blocks).copy_from_slice(bytes);
    blocks
}

/// Rounds to the nearest integer, ties to even, as ggml's `nearest_int` does.
fn nearest(x: f32) -> i32 {
    x.round_ties_even() as i32
}

#[cfg(test)]
pub(crate) mod test_util {
    //! Random data shared by the format tests.

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use crate::DType;

    /// `len` values: mostly Gaussian-like (sum of uniforms) with a few outliers, and some blocks
    /// entirely positive, negative or zero, which exercise the min/max edge cases.
    pub fn random_row(seed: u64, len: usize) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut v: Vec<f32> =
            (0..len).map(|_| (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum::<f32>() * 0.5).collect();
        for chunk in v.chunks_mut(32) {
            match rng.random_range(0..10) {
                0 => chunk.iter_mut().for_each(|x| *x = x.abs() + 0.1),
                1 => chunk.iter_mut().for_each(|x| *x = -x.abs() - 0.1),
                2 => chunk.iter_mut().for_each(|x| *x = 0.0),
                3 => {
                    let i = rng.random_range(0..chunk.len());
                    chunk[i] *= 20.0;
                }
                _ => {}
            }
        }
        v
    }

    /// Random weights `[n, k]` quantized to `dtype` row by row, and their dequantized values.
    pub fn random_weights(dtype: DType, n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let data = random_row(seed, n * k);
        let row_bytes = dtype.bytes_for(k).unwrap();
        let mut bytes = vec![0u8; n * row_bytes];
        let mut deq = vec![0f32; n * k];
        for ((src, dst), out) in data.chunks(k).zip(bytes.chunks_mut(row_bytes)).zip(deq.chunks_mut(k)) {
            super::quantize_row(dtype, src, dst).unwrap();
            super::dequantize_row(dtype, dst, out).unwrap();
        }
        (bytes, deq)
    }

    /// For each element of a row, `|scale part| + |offset or minimum part|` of its dequantized
    /// value, so that sums of these times `|x|` bound every partial sum an integer dot product
    /// forms (the tolerance of the quantized matvec and GEMM tests).
    pub fn term_magnitudes(dtype: DType, row: &[u8], k: usize) -> Vec<f32> {
        let mut row = row.to_vec();
        for block in row.chunks_mut(dtype.block_bytes()) {
            match dtype {
                // x = d * q + m: make d and m positive (clear the f16 sign bits).
                DType::Q4_1 => {
                    block[1] &= 0x7f;
                    block[3] &= 0x7f;
                }
                // x = d * sc * q - dmin * m: make d positive and dmin negative.
                DType::Q4K => {
                    block[1] &= 0x7f;
                    block[3] |= 0x80;
                }
                _ => {}
            }
        }
        let mut out = vec![0f32; k];
        super::dequantize_row(dtype, &row, &mut out).unwrap();
        out.iter().map(|v| v.abs()).collect()
    }

    /// Weights of `n` rows of `k` elements whose bytes are random except the f16 scales, which
    /// are random finite values in -1..1: every level, packed scale and sign pattern occurs,
    /// including ones the quantizers never write (such as `Q8_0` values of -128).
    pub fn arbitrary_weights(dtype: DType, n: usize, k: usize, seed: u64) -> Vec<u8> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut w: Vec<u8> = (0..n * dtype.bytes_for(k).unwrap()).map(|_| rng.random()).collect();
        let f16_fields: &[usize] = match dtype {
            DType::Q8_0 | DType::Q4_0 => &[0],
            DType::Q4_1 | DType::Q4K => &[0, 2],
            DType::Q6K => &[208],
            _ => unreachable!("{} is not block-quantized", dtype.name()),
        };
        for block in w.chunks_mut(dtype.block_bytes()) {
            for &at in f16_fields {
                let v = half::f16::from_f32(rng.random_range(-1.0f32..1.0));
                block[at..at + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_match_dtype() {
        assert_eq!(size_of::<BlockQ8_0>(), DType::Q8_0.block_bytes());
        assert_eq!(size_of::<BlockQ4_0>(), DType::Q4_0.block_bytes());
        assert_eq!(size_of::<BlockQ4_1>(), DType::Q4_1.block_bytes());
        assert_eq!(size_of::<BlockQ4K>(), DType::Q4K.block_bytes());
        assert_eq!(size_of::<BlockQ6K>(), DType::Q6K.block_bytes());
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut bytes = vec![0u8; 34];
        assert!(matches!(quantize_row(DType::Q8_0, &[0.0; 31], &mut bytes), Err(Error::NotBlockAligned { .. })));
        assert!(matches!(quantize_row(DType::Q8_0, &[0.0; 64], &mut bytes), Err(Error::LengthMismatch { .. })));
        let mut out = vec![0f32; 256];
        assert!(matches!(dequantize_row(DType::Q4K, &bytes, &mut out), Err(Error::LengthMismatch { .. })));
    }

    #[test]
    fn misaligned_rows_convert_like_aligned_ones() {
        let x = test_util::random_row(7, 512);
        for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4K, DType::Q6K] {
            let len = dtype.bytes_for(x.len()).unwrap();
            let mut aligned = vec![0u16; len / 2];
            let aligned = bytemuck::cast_slice_mut::<u16, u8>(&mut aligned);
            quantize_row(dtype, &x, aligned).unwrap();
            let mut storage = vec![0u16; len / 2 + 1];
            let shifted = &mut bytemuck::cast_slice_mut::<u16, u8>(&mut storage)[1..=len];
            quantize_row(dtype, &x, shifted).unwrap();
            assert_eq!(aligned, shifted, "{dtype}");
            let (mut a, mut b) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            dequantize_row(dtype, aligned, &mut a).unwrap();
            dequantize_row(dtype, shifted, &mut b).unwrap();
            assert_eq!(a, b, "{dtype}");
        }
    }
}
