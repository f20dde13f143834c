//! [`RepackedWeight`]: a `Q4_0` or `Q4_K` weight rearranged once, at load time, for the AVX-512
//! decode kernels. `Q4_0`: each group of four blocks' nibbles is one load and each pair of groups'
//! scales another, instead of `vpermt2w` gathers from the 18-byte blocks (llama.cpp likewise
//! repacks `Q4_0` at load). `Q4_K`: the nibbles move within each super-block so that the four
//! registers of a super-block accumulate in the same lanes, instead of being summed by in-lane
//! shuffles. Every product equals, bit for bit, the same product on the original weight; only the
//! instruction count differs.

use super::super::matmul::{check_matmul, matmul_dequantized_with};
use super::super::matmul_quant::{GEMM_MIN_M, matmul_packed_with};
use super::super::matvec::check_matvec;
use super::super::{Isa, isa};
use super::matvec_packed_with;
use crate::quant::{q4_0, q4_k};
use crate::{AlignedBytes, CpuStorage, DType, Error, Result, Tensor};

/// A `Q4_0` or `Q4_K` weight `[n, k]` whose rows are repacked for the CPU decode kernels, in as
/// many bytes as the GGUF rows. `Q4_0`, per row: the nibbles of each whole group of four blocks
/// (64 bytes), then those blocks' f16 scales, then the last `k / 32 % 4` blocks unchanged. `Q4_K`,
/// per super-block: `d`, `dmin` and the scales unchanged, the 256 nibbles permuted (see
/// `quant::q4_k::packed_source`).
///
/// [`RepackedWeight::matvec`] and [`RepackedWeight::matmul`] give exactly the results of
/// [`crate::cpu::matvec`] and [`crate::cpu::matmul`] on the original weight, at every instruction
/// set; the AVX-512 decode reads the repacked rows directly (fewer instructions per block), and
/// the other paths restore GGUF rows where they need them.
///
/// A model adopts it by repacking each `Q4_0`/`Q4_K` projection weight once after loading (when
/// [`RepackedWeight::supports`] its dtype and the weight stays on the CPU), dropping the original
/// tensor, and calling [`RepackedWeight::matvec`] / [`RepackedWeight::matmul`] where it called
/// `cpu::matvec` / `cpu::matmul`; the memory is the same.
#[derive(Debug, Clone)]
pub struct RepackedWeight {
    /// The repacked bytes, held as a tensor of the weight's dtype and shape so that the shape checks
    /// of the products apply; its bytes are not GGUF blocks and never leave this type.
    packed: Tensor,
}

impl RepackedWeight {
    /// Whether [`RepackedWeight::from_tensor`] takes weights of `dtype`.
    pub fn supports(dtype: DType) -> bool {
        matches!(dtype, DType::Q4_0 | DType::Q4K)
    }

    /// Repacks a 2-D `Q4_0` or `Q4_K` weight held on the CPU. Any other dtype is an
    /// [`Error::UnsupportedDType`], another rank an [`Error::InvalidArgument`].
    pub fn from_tensor(w: &Tensor) -> Result<RepackedWeight> {
        let op = "RepackedWeight::from_tensor";
        if !RepackedWeight::supports(w.dtype()) {
            return Err(Error::UnsupportedDType { op, dtype: w.dtype() });
        }
        let dims = w.shape().dims();
        if dims.len() != 2 {
            return Err(Error::InvalidArgument {
                op,
                msg: format!("weight must be 2-D [n, k], got shape {}", w.shape()),
            });
        }
        let repack = if w.dtype() == DType::Q4_0 { q4_0::repack_row } else { q4_k::repack_row };
        let packed = convert(w.cpu_bytes()?, w.row_bytes(), repack, AlignedBytes::zeroed_huge);
        Ok(RepackedWeight { packed: Tensor::from_storage(CpuStorage::owned(packed), w.dtype(), [dims[0], dims[1]])? })
    }

    /// The original weight: a tensor of GGUF blocks, byte for byte the one repacked.
    pub fn to_tensor(&self) -> Result<Tensor> {
        let unpack = if self.dtype() == DType::Q4_0 { q4_0::unpack_row } else { q4_k::unpack_row };
        let bytes = convert(self.packed.cpu_bytes()?, self.packed.row_bytes(), unpack, AlignedBytes::zeroed);
        Tensor::from_storage(CpuStorage::owned(bytes), self.dtype(), self.packed.shape().clone())
    }

    /// The repacked rows, as a tensor of the original dtype and shape.
    /// The repacked bytes, which the matrix-vector product reads in order of rows.
    pub fn bytes(&self) -> &[u8] {
        self.packed_tensor().cpu_bytes().expect("a repacked weight lives on the CPU")
    }

    pub(crate) fn packed_tensor(&self) -> &Tensor {
        &self.packed
    }

    /// The weight's dtype, `Q4_0` or `Q4_K`.
    pub fn dtype(&self) -> DType {
        self.packed.dtype()
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

    /// [`RepackedWeight::matvec`] on SIMD level `isa` (lowered to what this CPU supports).
    pub(crate) fn matvec_with(&self, isa: Isa, x: &[f32], y: &mut [f32]) -> Result<()> {
        let (n, k) = check_matvec("RepackedWeight::matvec", &self.packed, x, y)?;
        matvec_packed_with(isa, self.dtype(), self.packed.cpu_bytes()?, n, k, x, y);
        Ok(())
    }

    /// `y = x W^T` for `x` `[m, k]` and `y` `[m, n]`, the result of [`crate::cpu::matmul`] on the
    /// original weight. Below the GEMM's threshold of rows it runs the repacked decode kernels row
    /// by row; the VNNI GEMM decodes its panels from the repacked rows (restoring only slices of
    /// `Q4_0` rows that reach the blocks past the last whole group of four); without VNNI, from
    /// the threshold up, the f32 GEMM runs on a restored copy of the whole weight.
    pub fn matmul(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.matmul_with(isa(), x, y)
    }

    /// [`RepackedWeight::matmul`] on SIMD level `isa` (lowered to what this CPU supports), with the
    /// choice of `cpu::matmul_with`.
    pub(crate) fn matmul_with(&self, isa: Isa, x: &[f32], y: &mut [f32]) -> Result<()> {
        let isa = isa.min(Isa::detect());
        let (m, _, _) = check_matmul("RepackedWeight::matmul", x, &self.packed, y)?;
        if isa == Isa::Avx512Vnni || m < GEMM_MIN_M {
            return matmul_packed_with(isa, x, &self.packed, y);
        }
        matmul_dequantized_with(isa, x, &self.to_tensor()?, y)
    }
}

/// `bytes` with `f` applied to each row of `row_bytes`, in a buffer from `alloc`: huge pages for
/// the repacked weight, which every token streams (see [`AlignedBytes::zeroed_huge`]), the
/// allocator for the temporary copies of [`RepackedWeight::to_tensor`].
fn convert(bytes: &[u8], row_bytes: usize, f: fn(&[u8], &mut [u8]), alloc: fn(usize) -> AlignedBytes) -> AlignedBytes {
    let mut out = alloc(bytes.len());
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

    fn tensor(dtype: DType, bytes: &[u8], n: usize, k: usize) -> Tensor {
        Tensor::from_storage(CpuStorage::owned(AlignedBytes::copy_from(bytes)), dtype, [n, k]).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Bit-identical products at every instruction set, on arbitrary bytes (any scales and
        /// nibbles), with and without whole pairs of groups, an odd group and tail blocks.
        #[test]
        fn products_equal_the_original_weight_bit_for_bit(
            dtype in prop::sample::select(vec![DType::Q4_0, DType::Q4K]),
            n in 1usize..10,
            blocks in prop_oneof![1usize..4, 4usize..20, 64usize..67],
            m in prop_oneof![1usize..3, 16usize..18],
            seed in any::<u64>(),
        ) {
            // Q4_K: 1 to 66 super-blocks of 256 (the largest, k = 16896, only at few rows).
            let k = blocks * dtype.block_len();
            let bytes = arbitrary_weights(dtype, n, k, seed);
            let w = tensor(dtype, &bytes, n, k);
            let packed = RepackedWeight::from_tensor(&w).unwrap();
            let restored = packed.to_tensor().unwrap();
            prop_assert_eq!(restored.cpu_bytes().unwrap(), &bytes[..]);
            prop_assert_eq!(packed.dims(), (n, k));
            let x = random_row(seed ^ 5, m * k);
            for isa in Isa::available() {
                let (mut want, mut got) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                cpu::matvec_quant::matvec_quant_with(isa, dtype, &bytes, n, k, &x[..k], &mut want);
                packed.matvec_with(isa, &x[..k], &mut got).unwrap();
                prop_assert_eq!(
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "matvec {:?} {} n={} k={}", isa, dtype, n, k
                );
                let (mut want, mut got) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                matmul_with(isa, &x, &w, &mut want).unwrap();
                packed.matmul_with(isa, &x, &mut got).unwrap();
                prop_assert_eq!(
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "matmul {:?} {} m={} n={} k={}", isa, dtype, m, n, k
                );
            }
        }
    }

    #[test]
    fn model_sized_rows_over_many_tasks() {
        let (n, k) = (131, 2048);
        for dtype in [DType::Q4_0, DType::Q4K] {
            let bytes = arbitrary_weights(dtype, n, k, 3);
            let w = tensor(dtype, &bytes, n, k);
            let packed = RepackedWeight::from_tensor(&w).unwrap();
            let x = random_row(4, k);
            let (mut want, mut got) = (vec![0f32; n], vec![0f32; n]);
            cpu::matvec(&w, &x, &mut want).unwrap();
            packed.matvec(&x, &mut got).unwrap();
            assert_eq!(
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{dtype}"
            );
        }
    }

    #[test]
    fn rejects_other_dtypes_ranks_and_lengths() {
        assert!(RepackedWeight::supports(DType::Q4K) && !RepackedWeight::supports(DType::Q4_1));
        let q8 = Tensor::from_f32_as(&random_row(1, 64), [2, 32], DType::Q8_0).unwrap();
        assert!(matches!(RepackedWeight::from_tensor(&q8), Err(Error::UnsupportedDType { dtype: DType::Q8_0, .. })));
        let flat = Tensor::from_f32_as(&random_row(1, 64), [64], DType::Q4_0).unwrap();
        assert!(matches!(RepackedWeight::from_tensor(&flat), Err(Error::InvalidArgument { .. })));
        let w = Tensor::from_f32_as(&random_row(1, 64), [2, 32], DType::Q4_0).unwrap();
        let packed = RepackedWeight::from_tensor(&w).unwrap();
        let mut y = [0f32; 2];
        assert!(matches!(packed.matvec(&[0.0; 31], &mut y), Err(Error::LengthMismatch { what: "x", .. })));
        assert!(matches!(packed.matmul(&[0.0; 64], &mut y), Err(Error::LengthMismatch { what: "y", .. })));
    }
}
