//! RMS normalisation (fast version), as in HF `LlamaRMSNorm` computed in float32.
//!
//! Each row's sum of squares is a vector reduction with several independent accumulators (so its
//! rounding error stays small, as in torch's reductions); the row is then scaled by
//! `1 / sqrt(mean + eps)` and multiplied by the weight, in the same order and with the same
//! roundings as the reference. Rows are split across rayon's threads for prefill-sized inputs.

use rayon::prelude::*;

use super::vec::{self, Par};
use super::{Isa, isa};
use crate::{Error, Result};

/// Elements below which the rows stay on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 15;

/// RMS normalisation of each row of `x` (rows of `weight.len()` elements) into `out`:
/// `out = x / sqrt(mean(x^2) + eps) * weight`, all in f32.
///
/// `x.len()` must be a whole number of rows and `out.len() == x.len()`. Models whose norm
/// multiplies by `1 + weight` (Gemma) pass the weight with 1 added.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    rms_norm_with(isa(), Par::Auto, x, weight, eps, out)
}

/// [`rms_norm`] on a given ISA and threading choice.
pub(crate) fn rms_norm_with(isa: Isa, par: Par, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    check_rms_norm("rms_norm", x, weight, out)?;
    let isa = vec::usable(isa);
    let d = weight.len();
    let row = |(x, out): (&[f32], &mut [f32])| {
        let mean = vec::sum_sq(isa, x) / d as f32;
        let inv_rms = 1.0 / (mean + eps).sqrt();
        out.copy_from_slice(x);
        vec::scale(isa, out, inv_rms);
        vec::mul(isa, out, weight);
    };
    if x.len() > d && par.decide(x.len(), PAR_MIN_ELEMS) {
        x.par_chunks(d).zip(out.par_chunks_mut(d)).for_each(row);
    } else {
        x.chunks(d).zip(out.chunks_mut(d)).for_each(row);
    }
    Ok(())
}

/// Checks the operands of an RMS norm.
pub(crate) fn check_rms_norm(op: &'static str, x: &[f32], weight: &[f32], out: &[f32]) -> Result<()> {
    if weight.is_empty() {
        return Err(Error::InvalidArgument { op, msg: "weight is empty (rows of 0 elements)".into() });
    }
    if !x.len().is_multiple_of(weight.len()) {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("x has {} elements, not a whole number of rows of {}", x.len(), weight.len()),
        });
    }
    if out.len() != x.len() {
        return Err(Error::LengthMismatch { op, what: "out", expected: x.len(), got: out.len() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cpu::reference;
    use crate::cpu::vec::testing::{assert_close, random_vec};

    #[test]
    fn constant_row_normalises_to_weight() {
        // A row of c has rms |c|, so with eps = 0 the output is sign(c) * weight.
        let weight = [0.5f32, -2.0, 3.0, 1.0, 0.25];
        let x = [-4.0f32; 10];
        for isa in Isa::available() {
            let mut out = [0f32; 10];
            rms_norm_with(isa, Par::Never, &x, &weight, 0.0, &mut out).unwrap();
            for (o, w) in out.iter().zip(weight.iter().cycle()) {
                assert_eq!(*o, -w, "{isa:?}");
            }
        }
        // [3, 4]: mean of squares 12.5; with eps 0.5 the scale is 1/sqrt(13).
        let mut out = [0f32; 2];
        reference::rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.5, &mut out).unwrap();
        let s = 1.0 / 13f32.sqrt();
        assert_close(&out, &[3.0 * s, 8.0 * s], 0.0, 2e-7, "hand-computed");
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut out = [0f32; 6];
        assert!(rms_norm(&[1.0; 6], &[1.0; 4], 1e-6, &mut out).is_err());
        assert!(rms_norm(&[1.0; 6], &[], 1e-6, &mut out).is_err());
        assert!(matches!(rms_norm(&[1.0; 6], &[1.0; 3], 1e-6, &mut out[..5]), Err(Error::LengthMismatch { .. })));
        assert!(reference::rms_norm(&[1.0; 6], &[1.0; 4], 1e-6, &mut out).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn matches_reference(rows in 1usize..5, d in 1usize..600, eps in 1e-7f32..1e-3, seed: u64) {
            let x = random_vec(seed, rows * d, 4.0);
            let weight = random_vec(seed ^ 1, d, 2.0);
            let mut want = vec![0f32; x.len()];
            reference::rms_norm(&x, &weight, eps, &mut want).unwrap();
            for isa in Isa::available() {
                for par in [Par::Never, Par::Always] {
                    let mut got = vec![0f32; x.len()];
                    rms_norm_with(isa, par, &x, &weight, eps, &mut got).unwrap();
                    assert_close(&got, &want, 1e-7, 2e-6, &format!("{isa:?} {par:?}"));
                }
            }
        }
    }
}
