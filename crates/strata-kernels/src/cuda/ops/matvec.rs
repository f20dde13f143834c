//! Dequantizing matrix-vector products (`kernels/matvec.cu`): `y[t, :] = W x[t, :]` for a device
//! weight of any dtype and a few tokens of f32 activations, reading each weight byte once per
//! [`MATVEC_MAX_TOKENS`] tokens.

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};
use strata_tensor::{DType, Tensor};

use crate::cuda::params::{
    MatvecParams, STRATA_MATVEC_CHUNK, STRATA_MATVEC_CHUNK_Q8_0, STRATA_MATVEC_MAX_TOKENS, STRATA_MATVEC_ROWS_PER_WARP,
    STRATA_MATVEC_STAGES, STRATA_MATVEC_WARPS, STRATA_MATVEC_XTILE, STRATA_MATVEC_XTILE_MIN,
};
use crate::cuda::{Cuda, check_len, driver, ptr, ptr_mut};
use crate::{Error, Result};

use super::convert::device_matrix;

/// Tokens one matvec launch computes together (more are done in groups of this many).
pub const MATVEC_MAX_TOKENS: usize = STRATA_MATVEC_MAX_TOKENS as usize;

const WARPS: usize = STRATA_MATVEC_WARPS as usize;
const ROWS_PER_BLOCK: usize = WARPS * STRATA_MATVEC_ROWS_PER_WARP as usize;

/// The kernel names of one dtype for 1, 2, 4 and 8 tokens.
macro_rules! kernels {
    ($name:literal) => {
        [
            concat!("matvec_", $name, "_t1"),
            concat!("matvec_", $name, "_t2"),
            concat!("matvec_", $name, "_t4"),
            concat!("matvec_", $name, "_t8"),
        ]
    };
}

/// The kernels for `dtype`: float rows of a multiple of 16 bytes take the vector kernels, other
/// float rows the element-by-element ones.
fn kernel_names(dtype: DType, k: usize) -> [&'static str; 4] {
    let vector = (k * dtype.block_bytes()).is_multiple_of(16);
    match (dtype, vector) {
        (DType::F32, true) => kernels!("f32"),
        (DType::F32, false) => kernels!("f32_scalar"),
        (DType::F16, true) => kernels!("f16"),
        (DType::F16, false) => kernels!("f16_scalar"),
        (DType::BF16, true) => kernels!("bf16"),
        (DType::BF16, false) => kernels!("bf16_scalar"),
        (DType::Q8_0, _) => kernels!("q8_0"),
        (DType::Q4_0, _) => kernels!("q4_0"),
        (DType::Q4_1, _) => kernels!("q4_1"),
        (DType::Q4K, _) => kernels!("q4_k"),
        (DType::Q6K, _) => kernels!("q6_k"),
    }
}

/// The dynamic shared memory of the `t`-token kernel for `dtype`, laid out as `mv_quant` and
/// `mv_float_*` lay it out: the activation tile (padded by 4 floats every 32 and every 256
/// columns), and for block-quantized dtypes the tile's sums over each 8 columns and each warp's
/// pipeline of chunk buffers.
fn shared_bytes(dtype: DType, t: usize) -> usize {
    let kt = (STRATA_MATVEC_XTILE as usize / t).max(STRATA_MATVEC_XTILE_MIN as usize);
    let tile = 4 * t * (kt + kt / 8 + kt / 64);
    if !dtype.is_quantized() {
        return tile;
    }
    let chunk = if dtype == DType::Q8_0 { STRATA_MATVEC_CHUNK_Q8_0 } else { STRATA_MATVEC_CHUNK } as usize;
    let chunk_bytes = chunk / dtype.block_len() * dtype.block_bytes();
    let buffer = (chunk_bytes + 32).div_ceil(16) * 16;
    tile + 4 * t * (kt / 8) + WARPS * (STRATA_MATVEC_STAGES * STRATA_MATVEC_ROWS_PER_WARP) as usize * buffer
}

/// `y[t, :] = W x[t, :]` for `t < tokens`: `w` a `[n, k]` device tensor of any dtype, `x`
/// `[tokens, k]` and `y` `[tokens, n]` f32, accumulated in f32 with the activations kept in f32.
///
/// The CUDA twin of `strata_tensor::cpu::reference::matmul` with `x` as `[tokens, k]` (and of
/// `reference::matvec` per token, up to that function's quantization of `x` for block-quantized
/// weights). Tokens go in launches of up to [`MATVEC_MAX_TOKENS`], each reading the weight once.
///
/// For the 4- and 6-bit dtypes at one or two tokens the kernels scale `x` by 2^90 internally
/// (`kernels/matvec.cu`), so activations must stay below 2^38 in magnitude (about 2.7e11; any
/// model's are far smaller); products `|w x|` below about 1e-20 lose relative precision, far
/// under f32 resolution of the sums they join.
pub fn matvec<X, Y>(cuda: &Cuda, w: &Tensor, x: &X, y: &mut Y, tokens: usize) -> Result<()>
where
    X: DevicePtr<f32>,
    Y: DevicePtrMut<f32>,
{
    let op = "matvec";
    let (n, k, bytes) = device_matrix(op, cuda, w)?;
    check_len(op, "x", x.len(), tokens * k)?;
    check_len(op, "y", y.len(), tokens * n)?;
    if tokens == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        return Err(Error::invalid(op, format!("the weight {} has no columns", w.shape())));
    }
    let to_u32 = |v: usize, what: &str| {
        u32::try_from(v).map_err(|_| Error::invalid(op, format!("{what} = {v} does not fit the kernel's 32-bit index")))
    };
    let (rows, cols) = (to_u32(n, "n")?, to_u32(k, "k")?);
    let names = kernel_names(w.dtype(), k);
    let (wp, xp, yp) = (ptr(cuda, bytes), ptr(cuda, x), ptr_mut(cuda, y));
    let blocks = to_u32(n.div_ceil(ROWS_PER_BLOCK), "the grid")?;
    for t0 in (0..tokens).step_by(MATVEC_MAX_TOKENS) {
        let group = (tokens - t0).min(MATVEC_MAX_TOKENS);
        let t = group.next_power_of_two();
        let kernel = names[t.trailing_zeros() as usize];
        let smem = shared_bytes(w.dtype(), t);
        if smem > 48 * 1024 {
            // Above 48 KiB a kernel must opt in to its dynamic shared memory.
            cuda.function("matvec", kernel)?
                .set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
                .map_err(driver(kernel))?;
        }
        let p = MatvecParams {
            rows,
            cols,
            row_bytes: w.row_bytes() as u64,
            total_bytes: w.byte_len() as u64,
            tokens: group as u32,
        };
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let ptrs = [wp, xp + (t0 * k * 4) as u64, yp + (t0 * n * 4) as u64];
        // SAFETY: x holds tokens * k floats and y tokens * n (checked above), so tokens t0 ..
        // t0 + group of each are in bounds; the kernel reads the weight only below total_bytes
        // (device_matrix checked the buffer holds them), reads x rows only below p.tokens, and
        // writes y rows only below p.tokens and columns below n.
        unsafe { cuda.launch("matvec", kernel, cfg, &p, &ptrs)? };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_kernels_fit_in_the_shared_memory_of_an_sm80_block() {
        for dtype in DType::ALL {
            for t in [1, 2, 4, 8] {
                let bytes = shared_bytes(dtype, t);
                assert!(bytes <= 163 * 1024, "{dtype} t{t}: {bytes} bytes");
            }
        }
    }

    #[test]
    fn every_dtype_has_kernels_for_both_row_shapes() {
        for dtype in DType::ALL {
            let k = dtype.block_len() * 8;
            assert!(kernel_names(dtype, k)[0].starts_with(&format!("matvec_{}", dtype.name())));
        }
        assert_eq!(kernel_names(DType::F16, 7)[3], "matvec_f16_scalar_t8");
        assert_eq!(kernel_names(DType::F16, 8)[0], "matvec_f16_t1");
        assert_eq!(kernel_names(DType::F32, 6)[1], "matvec_f32_scalar_t2");
    }
}
