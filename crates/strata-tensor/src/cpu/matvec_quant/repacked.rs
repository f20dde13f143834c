//! [`RepackedQ4_0`]: a `Q4_0` weight rearranged once, at load time, so that the AVX-512 decode
//! kernels read each group of four blocks' nibbles with one load and each pair of groups' scales
//! with another, instead of gathering them with `vpermt2w` from the 18-byte blocks (llama.cpp
//! likewise repacks `Q4_0` at load). Every product equals, bit for bit, the same product on the
//! original weight; only the instruction count differs.

use super::super::matmul::{check_matmul, matmul_dequantized_with};
use super::super::matmul_quant::{GEMM_MIN_M, matmul_quantized_with};
use super::super::matvec::check_matvec;
use super::super::{Isa, isa};
use super::matvec_q4_0_packed_with;
use crate::quant::q4_0::{repack_row, unpack_row};
use crate::{AlignedBytes, CpuStorage, DType, Error, Result, Tensor};

/// A `Q4_0` weight `[n, k]` whose rows are repacked for the CPU decode kernels: per row, the
/// nibbles of each whole group of four blocks (64 bytes), then those blocks' f16 scales, then the
/// last `k / 32 % 4` blocks unchanged; the same number of bytes as the GGUF rows.
///
/// [`RepackedQ4_0::matvec`] and [`RepackedQ4_0::matmul`] give exactly the results of
/// [`crate::cpu::matvec`] and [`crate::cpu::matmul`] on the original weight, at every instruction
/// set; the AVX-512 decode reads the repacked rows directly (fewer instructions per block), and
/// the other paths restore GGUF rows where they need them.
#[derive(Debug, Clone)]
pub struct RepackedQ4_0 {
    /// The repacked bytes, held as a `Q4_0` tensor of the weight's shape so that the shape checks
    /// of the products apply; its bytes are not GGUF blocks and never leave this type.
    packed: Tensor,
}

impl RepackedQ4_0 {
    /// Repacks a 2-D `Q4_0` weight held on the CPU. Any other dtype is an
    /// [`Error::UnsupportedDType`], another rank an [`Error::InvalidArgument`].
    pub fn from_tensor(w: &Tensor) -> Result<RepackedQ4_0> {
        let op = "RepackedQ4_0::from_tensor";
        if w.dtype() != DType::Q4_0 {
            return Err(Error::UnsupportedDType { op, dtype: w.dtype() });
        }
        let dims = w.shape().dims();
        if dims.len() != 2 {
            return Err(Error::InvalidArgument {
                op,
                msg: format!("weight must be 2-D [n, k], got shape {}", w.shape()),
            });
        }
        let packed = convert(w.cpu_bytes()?, w.row_bytes(), repack_row);
        Ok(RepackedQ4_0 { packed: Tensor::from_storage(CpuStorage::owned(packed), DType::Q4_0, [dims[0], dims[1]])? })
    }

    /// The original weight: a `Q4_0` tensor of GGUF blocks, byte for byte the one repacked.
    pub fn to_tensor(&self) -> Result<Tensor> {
        let bytes = convert(self.packed.cpu_bytes()?, self.packed.row_bytes(), unpack_row);
        Tensor::from_storage(CpuStorage::owned(bytes), DType::Q4_0, self.packed.shape().clone())
    }

    /// The weight's shape `(n, k)`.
    pub fn dims(&self) -> (usize, usize) {
        let dims = self.packed.shape().dims();
        (dims[0], dims[1])
    }

    /// `y = W x`, the result of [`crate::cpu::matvec`] on the original weight.
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.matvec_with(isa(), x, y)
    }

    /// [`RepackedQ4_0::matvec`] on SIMD level `isa` (lowered to what this CPU supports).
    pub(crate) fn matvec_with(&self, isa: Isa, x: &[f32], y: &mut [f32]) -> Result<()> {
        let (n, k) = check_matvec("RepackedQ4_0::matvec", &self.packed, x, y)?;
        matvec_q4_0_packed_with(isa, self.packed.cpu_bytes()?, n, k, x, y);
        Ok(())
    }

    /// `y = x W^T` for `x` `[m, k]` and `y` `[m, n]`, the result of [`crate::cpu::matmul`] on the
    /// original weight. Below the GEMM's threshold of rows it runs the repacked decode kernels row
    /// by row; from there the GEMM runs on a temporary copy of the original rows (the panel
    /// decoding reads GGUF blocks), which costs one pass over the weight's bytes.
    pub fn matmul(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.matmul_with(isa(), x, y)
    }

    /// [`RepackedQ4_0::matmul`] on SIMD level `isa` (lowered to what this CPU supports), with the
    /// choice of `cpu::matmul_with`.
    pub(crate) fn matmul_with(&self, isa: Isa, x: &[f32], y: &mut [f32]) -> Result<()> {
        let isa = isa.min(Isa::detect());
        let (m, n, k) = check_matmul("RepackedQ4_0::matmul", x, &self.packed, y)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        if m < GEMM_MIN_M {
            let bytes = self.packed.cpu_bytes()?;
            for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)) {
                matvec_q4_0_packed_with(isa, bytes, n, k, xr, yr);
            }
            return Ok(());
        }
        let original = self.to_tensor()?;
        if isa == Isa::Avx512Vnni {
            matmul_quantized_with(isa, x, &original, y)
        } else {
            matmul_dequantized_with(isa, x, &original, y)
        }
    }
}

/// `bytes` with `f` applied to each row of `row_bytes`.
fn convert(bytes: &[u8], row_bytes: usize, f: fn(&[u8], &mut [u8])) -> AlignedBytes {
    let mut out = AlignedBytes::zeroed(bytes.len());
    if row_bytes > 0 {
        for (src, dst) in bytes.chunks_exact(row_bytes).zip(out.as_mut_slice().chunks_exact_mut(row_bytes)) {
            f(src, dst);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cpu;
    use crate::cpu::matmul::matmul_with;
    use crate::quant::test_util::{arbitrary_weights, random_row};

    fn tensor(bytes: &[u8], n: usize, k: usize) -> Tensor {
        Tensor::from_storage(CpuStorage::owned(AlignedBytes::copy_from(bytes)), DType::Q4_0, [n, k]).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Bit-identical products at every instruction set, on arbitrary bytes (any scales and
        /// nibbles), with and without whole pairs of groups, an odd group and tail blocks.
        #[test]
        fn products_equal_the_original_weight_bit_for_bit(
            n in 1usize..10,
            blocks in prop_oneof![1usize..4, 4usize..20, 64usize..67],
            m in prop_oneof![1usize..3, 16usize..18],
            seed in any::<u64>(),
        ) {
            let k = 32 * blocks;
            let bytes = arbitrary_weights(DType::Q4_0, n, k, seed);
            let w = tensor(&bytes, n, k);
            let packed = RepackedQ4_0::from_tensor(&w).unwrap();
            let restored = packed.to_tensor().unwrap();
            prop_assert_eq!(restored.cpu_bytes().unwrap(), &bytes[..]);
            prop_assert_eq!(packed.dims(), (n, k));
            let x = random_row(seed ^ 5, m * k);
            for isa in Isa::available() {
                let (mut want, mut got) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                cpu::matvec_quant::matvec_quant_with(isa, DType::Q4_0, &bytes, n, k, &x[..k], &mut want);
                packed.matvec_with(isa, &x[..k], &mut got).unwrap();
                prop_assert_eq!(
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "matvec {:?} n={} k={}", isa, n, k
                );
                let (mut want, mut got) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                matmul_with(isa, &x, &w, &mut want).unwrap();
                packed.matmul_with(isa, &x, &mut got).unwrap();
                prop_assert_eq!(
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "matmul {:?} m={} n={} k={}", isa, m, n, k
                );
            }
        }
    }

    #[test]
    fn model_sized_rows_over_many_tasks() {
        let (n, k) = (131, 2048);
        let bytes = arbitrary_weights(DType::Q4_0, n, k, 3);
        let w = tensor(&bytes, n, k);
        let packed = RepackedQ4_0::from_tensor(&w).unwrap();
        let x = random_row(4, k);
        let (mut want, mut got) = (vec![0f32; n], vec![0f32; n]);
        cpu::matvec(&w, &x, &mut want).unwrap();
        packed.matvec(&x, &mut got).unwrap();
        assert_eq!(
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn rejects_other_dtypes_ranks_and_lengths() {
        let q8 = Tensor::from_f32_as(&random_row(1, 64), [2, 32], DType::Q8_0).unwrap();
        assert!(matches!(RepackedQ4_0::from_tensor(&q8), Err(Error::UnsupportedDType { dtype: DType::Q8_0, .. })));
        let flat = Tensor::from_f32_as(&random_row(1, 64), [64], DType::Q4_0).unwrap();
        assert!(matches!(RepackedQ4_0::from_tensor(&flat), Err(Error::InvalidArgument { .. })));
        let w = Tensor::from_f32_as(&random_row(1, 64), [2, 32], DType::Q4_0).unwrap();
        let packed = RepackedQ4_0::from_tensor(&w).unwrap();
        let mut y = [0f32; 2];
        assert!(matches!(packed.matvec(&[0.0; 31], &mut y), Err(Error::LengthMismatch { what: "x", .. })));
        assert!(matches!(packed.matmul(&[0.0; 64], &mut y), Err(Error::LengthMismatch { what: "y", .. })));
    }
}
