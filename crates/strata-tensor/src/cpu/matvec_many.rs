//! Several decode products of one input, `y_i = W_i x` (q, k and v; gate and up), as one
//! parallel loop.
//!
//! Run one by one, each product quantizes `x` again and ends in a barrier where one thread waits
//! for the other's last rows. [`matvec_many`] quantizes `x` once, prepares it once per weight
//! format, and splits the rows of all the products into one list of tasks, so the threads part
//! once. Each product's rows go through the same kernels in the same groups of rows (tasks start
//! on multiples of the kernels' row groups) as [`crate::cpu::matvec`] and
//! [`RepackedWeight::matvec`], so the results are identical bit for bit.

use super::matvec::check_matvec;
use super::matvec_quant::Prepared;
use super::{Isa, RepackedWeight, isa, matvec_float, matvec_quant, team};
use crate::quant::q8act::ActQ8;
use crate::{DType, Result, Tensor};

/// The weight of one product of [`matvec_many`].
#[derive(Clone, Copy, Debug)]
pub enum MatvecWeight<'a> {
    /// A CPU tensor `[n, k]` of any dtype, as [`crate::cpu::matvec`] takes it.
    Tensor(&'a Tensor),
    /// A repacked weight, as [`RepackedWeight::matvec`] takes it.
    Repacked(&'a RepackedWeight),
}

/// `ys[i] = W_i x` for every `(W_i, ys[i])` of `products`, all reading the same `x`: the results
/// of calling [`crate::cpu::matvec`] (or [`RepackedWeight::matvec`]) on each, computed as one
/// parallel loop over the rows of all of them.
pub fn matvec_many(x: &[f32], products: &mut [(MatvecWeight<'_>, &mut [f32])]) -> Result<()> {
    matvec_many_with(isa(), x, products)
}

/// How one product's rows are computed.
#[derive(Clone, Copy)]
enum Rows<'a> {
    Float { dtype: DType, w: &'a [u8], k: usize },
    Quant { dtype: DType, w: &'a [u8], row_bytes: usize, packed: bool, prep: usize },
}

/// [`matvec_many`] on SIMD level `isa` (lowered to what this CPU supports).
pub(crate) fn matvec_many_with(isa: Isa, x: &[f32], products: &mut [(MatvecWeight<'_>, &mut [f32])]) -> Result<()> {
    let isa = isa.min(Isa::detect());
    let mut act = None;
    let mut preps: Vec<((DType, bool), Prepared)> = Vec::new();
    let mut plans = Vec::with_capacity(products.len());
    for (weight, y) in products.iter_mut() {
        let (tensor, packed) = match *weight {
            MatvecWeight::Tensor(t) => (t, false),
            MatvecWeight::Repacked(r) => (r.packed_tensor(), true),
        };
        let (mut n, k) = check_matvec("matvec_many", tensor, x, y)?;
        let (dtype, w) = (tensor.dtype(), tensor.cpu_bytes()?);
        let rows = if k == 0 {
            // No columns: every row is an empty sum.
            y.fill(0.0);
            n = 0;
            Rows::Float { dtype, w, k }
        } else if dtype.is_quantized() {
            let row_bytes = dtype.bytes_for(k).expect("a valid tensor holds whole blocks");
            let prep = match preps.iter().position(|(key, _)| *key == (dtype, packed)) {
                Some(i) => i,
                None => {
                    let act = act.get_or_insert_with(|| ActQ8::quantize(x));
                    preps.push(((dtype, packed), Prepared::new_for(isa, dtype, packed, act.clone())));
                    preps.len() - 1
                }
            };
            Rows::Quant { dtype, w, row_bytes, packed, prep }
        } else {
            Rows::Float { dtype, w, k }
        };
        plans.push((rows, n));
    }

    // Tasks: (product, first row, rows), sized as the products alone size theirs (a multiple of
    // the kernels' row group apart from a product's last).
    let mut tasks = Vec::new();
    for (p, &(rows, n)) in plans.iter().enumerate() {
        let per_task = match rows {
            _ if n == 0 => continue,
            Rows::Float { dtype, k, .. } => matvec_float::rows_per_task(n, k * dtype.block_bytes()),
            Rows::Quant { row_bytes, .. } => matvec_quant::rows_per_task(row_bytes),
        };
        tasks.extend((0..n).step_by(per_task).map(|r0| (p, r0, per_task.min(n - r0))));
    }

    let outs: Vec<OutPtr> = products.iter_mut().map(|(_, y)| OutPtr(y.as_mut_ptr())).collect();
    team::for_each_task(tasks.len(), |t| {
        let (p, r0, len) = tasks[t];
        // SAFETY: the tasks of product `p` cover disjoint row ranges of its output, which holds
        // `n` rows (checked above) and stays borrowed mutably for the whole loop.
        let ys = unsafe { std::slice::from_raw_parts_mut(outs[p].0.add(r0), len) };
        match plans[p].0 {
            Rows::Float { dtype, w, k } => {
                let row_bytes = k * dtype.block_bytes();
                matvec_float::rows(isa, dtype, &w[r0 * row_bytes..(r0 + len) * row_bytes], k, x, ys);
            }
            Rows::Quant { dtype, w, row_bytes, packed, prep } => {
                let (w, prep) = (&w[r0 * row_bytes..(r0 + len) * row_bytes], &preps[prep].1);
                if packed {
                    matvec_quant::packed_rows(isa, dtype, w, row_bytes, prep, ys);
                } else {
                    matvec_quant::rows(isa, dtype, w, row_bytes, prep, ys);
                }
            }
        }
    });
    Ok(())
}

/// A product's output, shared with the tasks that fill disjoint parts of it.
struct OutPtr(*mut f32);
// SAFETY: each task writes only its own rows of the output (see `matvec_many_with`).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cpu::{matvec_float, matvec_quant, team};

    const DTYPES: [DType; 8] =
        [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4K, DType::Q6K];

    /// A weight of `dtype` (repacked when `repack` and the dtype has a repacked form) from
    /// values in [-1, 1).
    fn weight(dtype: DType, n: usize, k: usize, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let wf: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_f32_as(&wf, [n, k], dtype).unwrap()
    }

    /// The product of one weight alone, at `isa`.
    fn alone(isa: Isa, w: &MatvecWeight<'_>, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![f32::NAN; n];
        match *w {
            MatvecWeight::Tensor(t) => {
                let (bytes, k) = (t.cpu_bytes().unwrap(), x.len());
                if t.dtype().is_quantized() {
                    matvec_quant::matvec_quant_with(isa, t.dtype(), bytes, n, k, x, &mut y);
                } else {
                    matvec_float::matvec_float_with(isa, t.dtype(), bytes, n, k, x, &mut y);
                }
            }
            MatvecWeight::Repacked(r) => r.matvec_with(isa, x, &mut y).unwrap(),
        }
        y
    }

    /// Checks that the fused products equal the products run alone, bit for bit, at every SIMD
    /// level, on rayon and inside a team.
    fn check(specs: &[(DType, bool, usize)], blocks: usize, seed: u64) -> Result<(), TestCaseError> {
        let k = blocks * 256;
        let tensors: Vec<Tensor> =
            specs.iter().enumerate().map(|(i, &(d, _, n))| weight(d, n, k, seed.wrapping_add(i as u64))).collect();
        let repacked: Vec<Option<RepackedWeight>> = specs
            .iter()
            .zip(&tensors)
            .map(|(&(d, repack, _), t)| {
                (repack && RepackedWeight::supports(d)).then(|| RepackedWeight::from_tensor(t).unwrap())
            })
            .collect();
        let weights: Vec<MatvecWeight<'_>> = tensors
            .iter()
            .zip(&repacked)
            .map(|(t, r)| r.as_ref().map_or(MatvecWeight::Tensor(t), MatvecWeight::Repacked))
            .collect();
        let x: Vec<f32> =
            (0..k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (seed % 7) as f32)).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for isa in Isa::available() {
            let want: Vec<Vec<f32>> = weights.iter().zip(specs).map(|(w, s)| alone(isa, w, &x, s.2)).collect();
            for in_team in [false, true] {
                let mut outs: Vec<Vec<f32>> = specs.iter().map(|s| vec![f32::NAN; s.2]).collect();
                let mut products: Vec<(MatvecWeight<'_>, &mut [f32])> =
                    weights.iter().copied().zip(outs.iter_mut().map(Vec::as_mut_slice)).collect();
                pool.install(|| {
                    if in_team {
                        team::with_team(|| matvec_many_with(isa, &x, &mut products))
                    } else {
                        matvec_many_with(isa, &x, &mut products)
                    }
                })
                .unwrap();
                for (i, (got, want)) in outs.iter().zip(&want).enumerate() {
                    prop_assert!(got.iter().all(|v| v.is_finite()), "{isa:?} product {i}: not every row written");
                    let same = got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits());
                    prop_assert!(same, "{isa:?} team={in_team} product {i} {:?} k={k}: {got:?} vs {want:?}", specs[i]);
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn fused_products_equal_products_alone(
            specs in prop::collection::vec(
                (prop::sample::select(DTYPES.to_vec()), any::<bool>(), prop_oneof![1usize..20, 20usize..300]),
                1..4,
            ),
            blocks in 1usize..4,
            seed in any::<u64>(),
        ) {
            // Mixed formats (so several preparations of `x`), repacked and not, row counts that
            // leave short last tasks, and products too small for a task of their own.
            check(&specs, blocks, seed)?;
        }
    }

    #[test]
    fn model_sized_projections() {
        // TinyLlama's q, k and v at 2048 columns: many tasks per product.
        let specs = [(DType::Q4K, true, 2048), (DType::Q4K, true, 256), (DType::Q6K, false, 256)];
        check(&specs, 8, 3).unwrap();
    }

    #[test]
    fn mismatched_lengths_are_errors() {
        let w = weight(DType::Q8_0, 4, 256, 1);
        let x = vec![0.5f32; 256];
        let mut y = vec![0f32; 3];
        let err = matvec_many(&x, &mut [(MatvecWeight::Tensor(&w), &mut y)]).unwrap_err();
        assert!(err.to_string().contains("matvec_many"), "{err}");
    }
}
