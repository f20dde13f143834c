//! Block formats, bit-identical to ggml, and conversion of rows between f32 and every dtype.
//!
//! Each block type is a `#[repr(C)]` struct whose size and field order equal ggml's `block_*`
//! definitions (checked by tests), so bytes from a GGUF file are reinterpreted in place with
//! `bytemuck`. [`quantize_row`] and [`dequantize_row`] are the plain reference conversions; the
//! per-format modules hold the details.

use half::{bf16, f16};

use crate::{DType, Error, Result};

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
        _ => return Err(Error::UnsupportedDType { op: "quantize_row", dtype }),
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
        _ => return Err(Error::UnsupportedDType { op: "dequantize_row", dtype }),
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
