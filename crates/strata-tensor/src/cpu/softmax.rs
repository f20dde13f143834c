//! Row-wise softmax and argmax (fast versions).
//!
//! Softmax runs three vector passes over each row (maximum, `exp(x - max)` with its sum, scaling
//! by the reciprocal of the sum) and splits the rows across rayon's threads when there is enough
//! work. Argmax scans for NaN and for the maximum with vector instructions, then finds the first
//! index holding it.

use rayon::prelude::*;

use super::vec::{self, Par};
use super::{Isa, isa};
use crate::{Error, Result};

/// Elements below which softmax stays on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 15;

/// Softmax in place over each row of `row_len` elements of `x`, with the row maximum subtracted
/// first. `x.len()` must be a multiple of `row_len` (and `row_len > 0` unless `x` is empty).
///
/// A row containing NaN becomes all NaN, and so does a row whose elements are all `-inf` (as in
/// torch); `-inf` elements of an otherwise finite row get probability 0.
pub fn softmax(x: &mut [f32], row_len: usize) -> Result<()> {
    softmax_with(isa(), Par::Auto, x, row_len)
}

/// The index of the first maximum of `x` (ties go to the lower index), `None` when `x` is empty.
///
/// NaN counts as larger than every number, as in `torch.argmax`: if any element is NaN, the
/// index of the first NaN is returned, so a NaN in the logits is noticed rather than skipped.
pub fn argmax(x: &[f32]) -> Option<usize> {
    argmax_with(isa(), x)
}

/// [`softmax`] on a given ISA and threading choice.
pub(crate) fn softmax_with(isa: Isa, par: Par, x: &mut [f32], row_len: usize) -> Result<()> {
    check_softmax("softmax", x.len(), row_len)?;
    if x.is_empty() {
        return Ok(());
    }
    let isa = vec::usable(isa);
    let rows = x.len() / row_len;
    if rows > 1 && par.decide(x.len(), PAR_MIN_ELEMS) {
        x.par_chunks_mut(row_len).for_each(|row| softmax_row(isa, row));
    } else {
        x.chunks_mut(row_len).for_each(|row| softmax_row(isa, row));
    }
    Ok(())
}

/// Softmax of one non-empty row in place.
pub(crate) fn softmax_row(isa: Isa, row: &mut [f32]) {
    let max = vec::max(isa, row);
    let sum = vec::exp_shift_sum(isa, row, max);
    vec::scale(isa, row, 1.0 / sum);
}

/// [`argmax`] on a given ISA.
pub(crate) fn argmax_with(isa: Isa, x: &[f32]) -> Option<usize> {
    if x.is_empty() {
        return None;
    }
    let isa = vec::usable(isa);
    if vec::has_nan(isa, x) {
        return x.iter().position(|v| v.is_nan());
    }
    let max = vec::max(isa, x);
    x.iter().position(|&v| v == max)
}

/// Checks that `len` elements split into whole rows of `row_len`.
pub(crate) fn check_softmax(op: &'static str, len: usize, row_len: usize) -> Result<()> {
    if row_len == 0 {
        if len == 0 {
            return Ok(());
        }
        return Err(Error::InvalidArgument { op, msg: format!("row_len is 0 for {len} elements") });
    }
    if !len.is_multiple_of(row_len) {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("{len} elements are not a whole number of rows of {row_len}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cpu::reference;
    use crate::cpu::vec::testing::{assert_close, random_vec};

    const PARS: [Par; 2] = [Par::Never, Par::Always];

    #[test]
    fn rows_sum_to_one_and_keep_order() {
        let mut x = vec![1.0f32, 2.0, 3.0, -1.0, 1000.0, 1000.0, 1000.0, f32::NEG_INFINITY];
        for isa in Isa::available() {
            let mut y = x.clone();
            softmax_with(isa, Par::Never, &mut y, 4).unwrap();
            for row in y.chunks(4) {
                let s: f32 = row.iter().sum();
                assert!((s - 1.0).abs() < 1e-6, "{isa:?}: row sums to {s}");
            }
            assert!(y[0] < y[1] && y[1] < y[2] && y[3] < y[0]);
            // Large equal logits do not overflow once the maximum is subtracted.
            assert!((y[4] - 1.0 / 3.0).abs() < 1e-6 && y[4] == y[5] && y[5] == y[6]);
            assert_eq!(y[7], 0.0);
        }
        // softmax([0, ln 3]) = [1/4, 3/4].
        x = vec![0.0, 3f32.ln()];
        reference::softmax(&mut x, 2).unwrap();
        assert!((x[0] - 0.25).abs() < 1e-7 && (x[1] - 0.75).abs() < 1e-7);
    }

    #[test]
    fn nan_rows_become_nan() {
        for isa in Isa::available() {
            let mut x = vec![1.0, f32::NAN, 2.0, 0.5, 0.5, 0.5];
            softmax_with(isa, Par::Never, &mut x, 3).unwrap();
            assert!(x[..3].iter().all(|v| v.is_nan()), "{isa:?}: {x:?}");
            assert!(x[3..].iter().all(|v| (v - 1.0 / 3.0).abs() < 1e-7));
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut x = vec![0f32; 7];
        assert!(softmax(&mut x, 2).is_err());
        assert!(softmax(&mut x, 0).is_err());
        assert!(reference::softmax(&mut x, 3).is_err());
        assert!(softmax(&mut [], 0).is_ok());
    }

    #[test]
    fn argmax_ties_and_nan() {
        let cases: [(&[f32], Option<usize>); 7] = [
            (&[], None),
            (&[3.0], Some(0)),
            (&[1.0, 5.0, 5.0, 2.0], Some(1)),
            (&[f32::NEG_INFINITY, f32::NEG_INFINITY], Some(0)),
            (&[1.0, f32::NAN, 9.0, f32::NAN], Some(1)),
            (&[-0.0, 0.0], Some(0)),
            (&[-1.0, -2.0, f32::INFINITY, 4.0], Some(2)),
        ];
        for (x, want) in cases {
            assert_eq!(reference::argmax(x), want, "reference on {x:?}");
            for isa in Isa::available() {
                assert_eq!(argmax_with(isa, x), want, "{isa:?} on {x:?}");
            }
        }
        // A long slice with the maximum in a vector tail and a tie in the body.
        let mut x: Vec<f32> = (0..101).map(|i| (i % 13) as f32).collect();
        x[100] = 50.0;
        x[37] = 50.0;
        for isa in Isa::available() {
            assert_eq!(argmax_with(isa, &x), Some(37));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn softmax_matches_reference(rows in 1usize..6, row_len in 1usize..300, spread in 0.1f32..40.0, seed: u64) {
            let x = random_vec(seed, rows * row_len, spread);
            let mut want = x.clone();
            reference::softmax(&mut want, row_len).unwrap();
            for isa in Isa::available() {
                for par in PARS {
                    let mut got = x.clone();
                    softmax_with(isa, par, &mut got, row_len).unwrap();
                    assert_close(&got, &want, 1e-7, 2e-6, &format!("{isa:?} {par:?}"));
                }
            }
        }

        #[test]
        fn argmax_matches_reference(len in 0usize..200, seed: u64, ties in 0usize..4) {
            let mut x = random_vec(seed, len, 3.0);
            // Copy the maximum to a few other places to create ties.
            if let Some(m) = reference::argmax(&x) {
                for t in 0..ties {
                    let j = (seed as usize).wrapping_add(t * 31) % len;
                    x[j] = x[m];
                }
            }
            let want = reference::argmax(&x);
            for isa in Isa::available() {
                prop_assert_eq!(argmax_with(isa, &x), want);
            }
        }
    }
}
