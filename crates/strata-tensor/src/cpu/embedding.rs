//! Token embedding lookup (fast version), for tables of every dtype.
//!
//! Each id's row is decoded into the output with [`crate::quant::dequantize_row`], so a
//! quantized table (a GGUF `token_embd`, say) is used without expanding it; f32 tables are
//! copied directly. All ids are checked before anything is written, and long prompts are split
//! across rayon's threads by token.

use rayon::prelude::*;

use super::vec::Par;
use crate::{DType, Error, Result, Tensor, quant};

/// Output elements below which the lookup stays on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 15;

/// Looks up `ids` in `table` (`[vocab, dim]`, any dtype) into `out` (`[ids.len(), dim]`, f32).
///
/// An id `>= vocab` is an error naming the id and the vocabulary size, returned before `out` is
/// touched.
pub fn embedding(table: &Tensor, ids: &[u32], out: &mut [f32]) -> Result<()> {
    embedding_with(Par::Auto, table, ids, out)
}

/// [`embedding`] with a given threading choice.
pub(crate) fn embedding_with(par: Par, table: &Tensor, ids: &[u32], out: &mut [f32]) -> Result<()> {
    let dim = check_embedding("embedding", table, ids, out)?;
    if dim == 0 {
        return Ok(());
    }
    let dtype = table.dtype();
    let bytes = table.cpu_bytes()?;
    let row_bytes = table.row_bytes();
    let lookup = |(&id, row): (&u32, &mut [f32])| -> Result<()> {
        let src = &bytes[id as usize * row_bytes..][..row_bytes];
        match dtype {
            DType::F32 => {
                for (d, b) in row.iter_mut().zip(src.chunks_exact(4)) {
                    *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                Ok(())
            }
            _ => quant::dequantize_row(dtype, src, row),
        }
    };
    if ids.len() > 1 && par.decide(out.len(), PAR_MIN_ELEMS) {
        ids.par_iter().zip(out.par_chunks_mut(dim)).try_for_each(lookup)
    } else {
        ids.iter().zip(out.chunks_mut(dim)).try_for_each(lookup)
    }
}

/// Checks the operands of an embedding lookup (every id included) and returns `dim`.
pub(crate) fn check_embedding(op: &'static str, table: &Tensor, ids: &[u32], out: &[f32]) -> Result<usize> {
    let dims = table.shape().dims();
    if dims.len() != 2 {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("table must be 2-D [vocab, dim], got {}", table.shape()),
        });
    }
    let (vocab, dim) = (dims[0], dims[1]);
    let expected = ids
        .len()
        .checked_mul(dim)
        .ok_or_else(|| Error::InvalidArgument { op, msg: format!("{} ids x {dim} overflows", ids.len()) })?;
    if out.len() != expected {
        return Err(Error::LengthMismatch { op, what: "out", expected, got: out.len() });
    }
    if let Some((pos, id)) = ids.iter().enumerate().find(|(_, id)| **id as usize >= vocab) {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("token id {id} (at position {pos}) is out of range for a vocabulary of {vocab}"),
        });
    }
    Ok(dim)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cpu::reference;
    use crate::cpu::vec::testing::random_vec;

    #[test]
    fn rows_are_copied() {
        let data: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let table = Tensor::from_f32(&data, [4, 3]).unwrap();
        let mut out = vec![0f32; 9];
        embedding(&table, &[2, 0, 2], &mut out).unwrap();
        assert_eq!(out, [6.0, 7.0, 8.0, 0.0, 1.0, 2.0, 6.0, 7.0, 8.0]);
        let half = table.to_dtype(DType::BF16).unwrap();
        embedding(&half, &[3], &mut out[..3]).unwrap();
        assert_eq!(&out[..3], &[9.0, 10.0, 11.0]);
    }

    #[test]
    fn out_of_range_id_names_id_and_vocab() {
        let table = Tensor::from_f32(&[0.0; 8], [4, 2]).unwrap();
        let mut out = vec![-1f32; 4];
        let err = embedding(&table, &[1, 4], &mut out).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("token id 4") && msg.contains("vocabulary of 4"), "{msg}");
        assert_eq!(out, [-1.0; 4], "nothing is written before the ids are checked");
        assert!(reference::embedding(&table, &[7], &mut out[..2]).is_err());
        assert!(matches!(embedding(&table, &[1], &mut out[..3]), Err(Error::LengthMismatch { .. })));
        let flat = Tensor::from_f32(&[0.0; 8], [8]).unwrap();
        assert!(embedding(&flat, &[1], &mut out[..1]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn matches_reference(vocab in 1usize..50, dim in 1usize..100, n_ids in 0usize..40, seed: u64) {
            let data = random_vec(seed, vocab * dim, 3.0);
            let ids: Vec<u32> = (0..n_ids).map(|i| ((seed as usize).wrapping_add(i * 7919) % vocab) as u32).collect();
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let table = Tensor::from_f32_as(&data, [vocab, dim], dtype).unwrap();
                let mut want = vec![0f32; n_ids * dim];
                reference::embedding(&table, &ids, &mut want).unwrap();
                for par in [Par::Never, Par::Always] {
                    let mut got = vec![0f32; n_ids * dim];
                    embedding_with(par, &table, &ids, &mut got).unwrap();
                    prop_assert_eq!(&got, &want, "{:?} {:?}", dtype, par);
                }
            }
        }
    }
}
