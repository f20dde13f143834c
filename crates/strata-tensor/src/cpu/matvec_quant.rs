//! Matrix-vector product `y = W x` for block-quantized weights: ggml's integer method with a
//! two-digit activation, multi-threaded with rayon and vectorised for AVX2, AVX-512 and AVX-512
//! VNNI.
//!
//! `x` is quantized once per call to blocks of 32 values `a = 256 * h + l` with two 8-bit digits
//! (`quant::q8act`: within one unit `max|x| / 32512` of `x`, where ggml's single 8-bit digit is
//! within `max|x| / 254`, too coarse for the outlier dimensions of real hidden states); every row
//! of `W` is then combined with it by integer dot products scaled in f32, with exactly the integers
//! of the reference (`quant::vec_dot`, which also serves as the scalar path). Rows are split into
//! rayon tasks of about [`TASK_BYTES`] of weights, and each task runs several rows at a time (four
//! with AVX-512, two with AVX2's 16 registers) so they share the activation loads and keep
//! independent accumulation chains in flight. The kernels prefetch the rows they will compute next
//! into L2 (see [`prefetch_ahead`]).
//!
//! The SIMD kernels multiply unsigned weight levels (4 or 6 bits) directly with the signed 8-bit
//! digits (`vpmaddubsw` + `vpmaddwd`, or `vpdpbusd` with VNNI), each weight register once with
//! the high digits and once with the low ones, and combine the two in i32 lanes as
//! `256 * high + low` (a shift, or `vpmaddwd` with 256 instead of 1), so the weights are read and
//! unpacked once and the f32 work is that of a single digit. A weight offset (8 for `Q4_0`, 32 for
//! `Q6_K`, 128 for `Q8_0` on VNNI, whose signed bytes are flipped to unsigned) is removed by
//! starting each 32-bit lane at `-offset * (sum of the lane's four activation values)`, precomputed
//! once per call in [`Prepared`]; `Q4_1` and `Q4_K` minimums use the activation block sums the same
//! way. Where it saves shuffles, the prepared activation is also permuted to the order in which the
//! weights' nibbles come out of memory ([`Order`]). Scales are applied in f32, per lane or, for the
//! k-quants, per sub-block after summing its lanes; each row's accumulators are summed
//! horizontally once, at its end.
//!
//! A `Q4_0` or `Q4_K` weight can also be repacked once at load ([`RepackedWeight`]), which spares
//! the AVX-512 kernels their gathers of `Q4_0` nibbles and scales and their `Q4_K` lane shuffles,
//! with identical results.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod repacked;

pub use repacked::RepackedWeight;

use super::{Isa, isa};
use crate::DType;
use crate::quant::q8act::{ActQ8, HI_WEIGHT, QK_ACT};
use crate::quant::vec_dot::row_dot;
use crate::quant::{QK_K, q4_0, q4_k};

/// Weight bytes per rayon task: large enough that task overhead is negligible, small enough that
/// the threads finish together.
const TASK_BYTES: usize = 64 * 1024;

/// `y = W x` for block-quantized weights `w` (`n` rows of `k` elements of `dtype`), on the
/// instruction set [`isa()`] picks.
pub(crate) fn matvec_quant(dtype: DType, w: &[u8], n: usize, k: usize, x: &[f32], y: &mut [f32]) {
    matvec_quant_with(isa(), dtype, w, n, k, x, y);
}

/// [`matvec_quant`] on an explicit instruction set (lowered to what the CPU supports), so tests
/// can compare every level with the reference.
pub(crate) fn matvec_quant_with(isa: Isa, dtype: DType, w: &[u8], n: usize, k: usize, x: &[f32], y: &mut [f32]) {
    let row_bytes = dtype.bytes_for(k).expect("checked by caller");
    debug_assert!(dtype.is_quantized() && x.len() == k && y.len() == n && w.len() >= n * row_bytes);
    if row_bytes == 0 {
        y.fill(0.0);
        return;
    }
    // Never run instructions this CPU lacks, whatever the caller asked for.
    let isa = isa.min(Isa::detect());
    let prep = Prepared::new(isa, dtype, ActQ8::quantize(x));
    in_tasks(w, row_bytes, &mut y[..n], |w, ys| rows(isa, dtype, w, row_bytes, &prep, ys));
}

/// Rows per parallel task for rows of `row_bytes`: about [`TASK_BYTES`] of weights, a multiple of
/// four rows, so every group of rows a kernel runs at once is full.
pub(super) fn rows_per_task(row_bytes: usize) -> usize {
    (TASK_BYTES / row_bytes.max(1)).max(4).next_multiple_of(4)
}

/// Runs `f` on consecutive runs of rows of `w` and their outputs in `y`, one rayon task each.
fn in_tasks(w: &[u8], row_bytes: usize, y: &mut [f32], f: impl Fn(&[u8], &mut [f32]) + Sync) {
    let rows_per_task = rows_per_task(row_bytes);
    super::team::for_each_chunk_mut(y, rows_per_task, |task, ys| {
        let first = task * rows_per_task;
        f(&w[first * row_bytes..(first + ys.len()) * row_bytes], ys);
    });
}

/// [`matvec_quant_with`] for a `Q4_0` or `Q4_K` weight whose rows are in the layout of
/// [`q4_0::repack_row`] or [`q4_k::repack_row`] (`cpu::RepackedWeight`): the same results, bit for
/// bit, as `matvec_quant_with(isa, dtype, ..)` on the original rows. AVX-512 reads the repacked
/// rows directly; the other instruction sets restore each task's rows first.
pub(crate) fn matvec_packed_with(isa: Isa, dtype: DType, w: &[u8], n: usize, k: usize, x: &[f32], y: &mut [f32]) {
    let row_bytes = dtype.bytes_for(k).expect("checked by caller");
    debug_assert!(matches!(dtype, DType::Q4_0 | DType::Q4K));
    debug_assert!(x.len() == k && y.len() == n && w.len() >= n * row_bytes);
    if row_bytes == 0 {
        y.fill(0.0);
        return;
    }
    let isa = isa.min(Isa::detect());
    let prep = Prepared::new_for(isa, dtype, true, ActQ8::quantize(x));
    in_tasks(w, row_bytes, &mut y[..n], |w, ys| packed_rows(isa, dtype, w, row_bytes, &prep, ys));
}

/// Computes `ys.len()` consecutive repacked rows held in `w` (see [`matvec_packed_with`]).
pub(super) fn packed_rows(isa: Isa, dtype: DType, w: &[u8], row_bytes: usize, prep: &Prepared, ys: &mut [f32]) {
    debug_assert_eq!(w.len(), ys.len() * row_bytes);
    match isa {
        // SAFETY (each): `isa` is at most `Isa::detect()`, so the CPU has every feature the kernel
        // enables; `w` holds `ys.len()` whole repacked rows of `dtype` and `prep` was built for
        // this `isa`, `dtype` and repacked rows from an activation of the same row length (of one
        // digit for the `_high` kernel).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::packed_avx512(dtype, w, row_bytes, prep, ys) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if prep.int8() => unsafe { avx512::packed_vnni_high(dtype, w, row_bytes, prep, ys) },
        Isa::Avx512Vnni => unsafe { avx512::packed_vnni(dtype, w, row_bytes, prep, ys) },
        _ => {
            let unpack = if dtype == DType::Q4_0 { q4_0::unpack_row } else { q4_k::unpack_row };
            let mut original = vec![0u8; w.len()];
            for (src, dst) in w.chunks_exact(row_bytes).zip(original.chunks_exact_mut(row_bytes)) {
                unpack(src, dst);
            }
            rows(isa, dtype, &original, row_bytes, prep, ys);
        }
    }
}

/// Computes `ys.len()` consecutive rows held in `w`.
pub(super) fn rows(isa: Isa, dtype: DType, w: &[u8], row_bytes: usize, prep: &Prepared, ys: &mut [f32]) {
    debug_assert_eq!(w.len(), ys.len() * row_bytes);
    match isa {
        // SAFETY (each): `isa` is at most `Isa::detect()`, so the CPU has every feature the
        // kernel enables; `w` holds `ys.len()` whole rows of `dtype` and `prep` was built for this
        // `isa` and `dtype` from an activation of the same row length (of one digit for the
        // `_high` kernel), as the kernels require.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::rows(dtype, w, row_bytes, prep, ys) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::rows_avx512(dtype, w, row_bytes, prep, ys) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if prep.int8() => unsafe { avx512::rows_vnni_high(dtype, w, row_bytes, prep, ys) },
        Isa::Avx512Vnni => unsafe { avx512::rows_vnni(dtype, w, row_bytes, prep, ys) },
        _ => {
            for (row, y) in w.chunks_exact(row_bytes).zip(ys) {
                *y = row_dot(dtype, row, &prep.act);
            }
        }
    }
}

/// The quantized activation of one call plus values the SIMD kernels would otherwise recompute
/// for every row.
pub(super) struct Prepared {
    /// The two-digit activation (units and sums per block of 32, in natural order).
    act: ActQ8,
    /// The high digits in the order the kernels of this `isa` and `dtype` read them (see
    /// [`Order`]).
    hi: Vec<i8>,
    /// The low digits, in the same order.
    lo: Vec<i8>,
    /// Lanes of `-offset * (sum of four activation values 256 * h + l)`, where `offset` is what
    /// the kernels' unsigned weight levels carry (see [`weight_offset`]); empty when zero. One lane
    /// per four values, except that [`Order::Groups4`] folds each group's second half onto its
    /// first (16 lanes per group of four blocks), because its kernels chain the two halves into
    /// one accumulator, and that the AVX-512 `Q6_K` kernel takes one lane per sub-block of 16
    /// (see [`q6k_sub_block_bias`]).
    bias: Vec<i32>,
    /// Per-dtype f32 factors: `Q4_1`: `[da, da * S]` per block; `Q4_K`: per super-block the
    /// eight `da` then the eight `da * S` (natural sub-block order); `Q6_K`: the `da` of each
    /// sub-block of 16 (in [`transposed`] order for AVX-512). Empty for the others, which read
    /// `act.d`.
    aux: Vec<f32>,
}

/// The order in which a kernel reads the activation values.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    /// As in `x`.
    Natural,
    /// For `Q4_0`/`Q4_1` on AVX2 and AVX-512: each group of four whole blocks holds the first
    /// halves (elements 0..16, the low nibbles) of the four blocks, then their second halves
    /// (16..32, the high nibbles), so the nibbles of 2 or 4 blocks loaded side by side line up
    /// with the activation without shuffles. A tail of fewer than four blocks stays natural.
    Groups4,
    /// For AVX-512 `Q4_K`: each super-block's sub-blocks of 32 in the order 0, 2, 1, 3, 4, 6, 5,
    /// 7, matching the low nibbles of 64 bytes (sub-blocks 0 and 2) then their high nibbles (1 and
    /// 3), and likewise for the second 64 bytes.
    SubBlocks0213,
    /// For AVX-512 `Q4_K` repacked by `quant::q4_k::repack_row`: slot `s` of each super-block
    /// holds the activation of the element whose nibble the repacked slot `s` holds.
    Q4KPacked,
}

impl Order {
    fn of(isa: Isa, dtype: DType, packed: bool) -> Order {
        match (isa, dtype) {
            (Isa::Avx2 | Isa::Avx512 | Isa::Avx512Vnni, DType::Q4_0 | DType::Q4_1) => Order::Groups4,
            (Isa::Avx512 | Isa::Avx512Vnni, DType::Q4K) if packed => Order::Q4KPacked,
            (Isa::Avx512 | Isa::Avx512Vnni, DType::Q4K) => Order::SubBlocks0213,
            _ => Order::Natural,
        }
    }

    /// `qs` rearranged into this order.
    fn apply<T: Copy>(self, qs: &[T]) -> Vec<T> {
        let mut out = qs.to_vec();
        match self {
            Order::Natural => {}
            Order::Groups4 => {
                for (src, dst) in qs.chunks_exact(128).zip(out.chunks_exact_mut(128)) {
                    for b in 0..4 {
                        dst[16 * b..16 * b + 16].copy_from_slice(&src[32 * b..32 * b + 16]);
                        dst[64 + 16 * b..64 + 16 * b + 16].copy_from_slice(&src[32 * b + 16..32 * b + 32]);
                    }
                }
            }
            Order::SubBlocks0213 => {
                for (src, dst) in qs.chunks_exact(QK_K).zip(out.chunks_exact_mut(QK_K)) {
                    for (p, sb) in [0, 2, 1, 3, 4, 6, 5, 7].into_iter().enumerate() {
                        dst[32 * p..32 * p + 32].copy_from_slice(&src[32 * sb..32 * sb + 32]);
                    }
                }
            }
            Order::Q4KPacked => {
                for (src, dst) in qs.chunks_exact(QK_K).zip(out.chunks_exact_mut(QK_K)) {
                    for (v, &e) in dst.iter_mut().zip(&q4_k::PACKED_ELEMENT) {
                        *v = src[usize::from(e)];
                    }
                }
            }
        }
        out
    }
}

impl Prepared {
    fn new(isa: Isa, dtype: DType, act: ActQ8) -> Prepared {
        Prepared::new_for(isa, dtype, false, act)
    }

    /// Whether every low digit is zero (`ActQuant::Int8`): the kernels may leave them out.
    pub(super) fn int8(&self) -> bool {
        self.act.int8
    }

    /// The preparation for `isa` and `dtype`, with `packed` for the kernels of repacked rows
    /// (`cpu::RepackedWeight`).
    pub(super) fn new_for(isa: Isa, dtype: DType, packed: bool, act: ActQ8) -> Prepared {
        if isa == Isa::Scalar {
            return Prepared { act, hi: Vec::new(), lo: Vec::new(), bias: Vec::new(), aux: Vec::new() };
        }
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `isa` is above `Scalar` and at most `Isa::detect()`, so the CPU has AVX2.
            unsafe { Prepared::new_avx2(isa, dtype, packed, act) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Prepared::build(isa, dtype, packed, act)
        }
    }

    /// [`Prepared::build`] compiled for AVX2, which vectorizes its loops (integer sums and f32
    /// products, identical in any build).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn new_avx2(isa: Isa, dtype: DType, packed: bool, act: ActQ8) -> Prepared {
        Prepared::build(isa, dtype, packed, act)
    }

    /// The preparation for `isa` and `dtype`: the digits in the kernels' order, the bias lanes
    /// and the f32 factors.
    #[inline(always)]
    fn build(isa: Isa, dtype: DType, packed: bool, act: ActQ8) -> Prepared {
        let order = Order::of(isa, dtype, packed);
        let (hi, lo) = (order.apply(&act.hi), order.apply(&act.lo));
        let offset = weight_offset(isa, dtype);
        let wide = matches!(isa, Isa::Avx512 | Isa::Avx512Vnni);
        let bias = if wide && dtype == DType::Q6K {
            q6k_sub_block_bias(&hi, &lo, offset)
        } else if offset == 0 {
            Vec::new()
        } else {
            lane_bias(order, &hi, &lo, offset)
        };
        let blocks = act.d.len();
        let mut aux = Vec::new();
        match dtype {
            DType::Q4_1 => {
                aux.reserve(2 * blocks);
                for (&d, &s) in act.d.iter().zip(&act.sum) {
                    aux.extend([d, d * s as f32]);
                }
            }
            DType::Q4K => {
                aux.reserve(2 * blocks);
                for (ds, ss) in act.d.chunks_exact(QK_K / QK_ACT).zip(act.sum.chunks_exact(QK_K / QK_ACT)) {
                    aux.extend_from_slice(ds);
                    aux.extend(ds.iter().zip(ss).map(|(&d, &s)| d * s as f32));
                }
            }
            DType::Q6K if wide => {
                aux.reserve(2 * blocks);
                for ds in act.d.chunks_exact(QK_K / QK_ACT) {
                    aux.extend((0..16).map(|t| ds[transposed(t) / 2]));
                }
            }
            DType::Q6K => {
                aux.reserve(2 * blocks);
                for &d in &act.d {
                    aux.extend([d, d]);
                }
            }
            _ => {}
        }
        Prepared { act, hi, lo, bias, aux }
    }
}

/// The bias lanes of [`Prepared::bias`] for digits `hi`, `lo` already in `order`: `-offset` times
/// the sum of each four values `256 * h + l`, with [`Order::Groups4`]'s folding.
#[inline(always)]
fn lane_bias(order: Order, hi: &[i8], lo: &[i8], offset: i32) -> Vec<i32> {
    let mut lanes = vec![0i32; hi.len() / 4];
    // Eight lanes per block of 32 values, on fixed-size arrays so that the loops vectorize.
    for ((out, h), l) in lanes.chunks_exact_mut(8).zip(hi.chunks_exact(QK_ACT)).zip(lo.chunks_exact(QK_ACT)) {
        let (out, h, l): (&mut [i32; 8], &[i8; QK_ACT], &[i8; QK_ACT]) =
            (out.try_into().unwrap(), h.try_into().unwrap(), l.try_into().unwrap());
        for (j, lane) in out.iter_mut().enumerate() {
            let sum: i32 = (4 * j..4 * j + 4).map(|i| HI_WEIGHT * i32::from(h[i]) + i32::from(l[i])).sum();
            *lane = -offset * sum;
        }
    }
    if order == Order::Groups4 {
        // Each group of four blocks folds its second half (the high nibbles' activation) onto its
        // first: 16 lanes per 128 values; a tail of fewer than four blocks stays as it is.
        let groups = hi.len() / 128;
        for g in 0..groups {
            for l in 0..16 {
                lanes[16 * g + l] = lanes[32 * g + l] + lanes[32 * g + 16 + l];
            }
        }
        lanes.drain(16 * groups..32 * groups);
    }
    lanes
}

/// The sub-block of 16 whose sum lane `t` of the AVX-512 `Q6_K` kernel holds: `4c + s` for
/// `t = 4s + c` (a 4 x 4 transpose, see `avx512::TRANSPOSE4`).
fn transposed(t: usize) -> usize {
    4 * (t % 4) + t / 4
}

/// The bias of the AVX-512 `Q6_K` kernel: per super-block, 16 lanes of `-offset` times the sum of
/// the values `256 * h + l` of sub-block [`transposed`]`(t)` in lane `t`.
#[inline(always)]
fn q6k_sub_block_bias(hi: &[i8], lo: &[i8], offset: i32) -> Vec<i32> {
    let mut bias = Vec::with_capacity(hi.len() / 16);
    for (h, l) in hi.chunks_exact(QK_K).zip(lo.chunks_exact(QK_K)) {
        let sums: [i32; 16] = std::array::from_fn(|sb| {
            (16 * sb..16 * sb + 16).map(|i| HI_WEIGHT * i32::from(h[i]) + i32::from(l[i])).sum()
        });
        bias.extend((0..16).map(|t| -offset * sums[transposed(t)]));
    }
    bias
}

/// The offset of the unsigned weight levels the SIMD kernels multiply: `Q4_0` nibbles carry 8,
/// `Q6_K` levels 32, and `Q8_0` bytes on VNNI are flipped to unsigned (`q + 128`) because
/// `vpdpbusd` multiplies unsigned by signed bytes.
fn weight_offset(isa: Isa, dtype: DType) -> i32 {
    match (dtype, isa) {
        (DType::Q4_0, _) => 8,
        (DType::Q6K, _) => 32,
        (DType::Q8_0, Isa::Avx512Vnni) => 128,
        _ => 0,
    }
}

/// The registers of the two digits of some activation values, in the same lanes: the values are
/// `256 * hi + lo`.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Digits<V> {
    hi: V,
    lo: V,
}

/// A kernel computing the dot products of `R` rows with the prepared activation.
#[cfg(target_arch = "x86_64")]
trait RowKernel {
    /// The dot products of the rows starting at `rows` with the activation.
    ///
    /// # Safety
    /// Each pointer must be the start of a whole row of the kernel's dtype and length, and the
    /// CPU must support the instruction set of the kernel's module.
    unsafe fn dot<const R: usize>(&self, rows: [*const u8; R]) -> [f32; R];
}

/// Runs `kernel` over the rows of `w`, `R` at a time (they share the activation loads and keep
/// `R` independent accumulation chains in flight), then the remaining rows one by one.
///
/// # Safety
/// `w` must hold `ys.len()` rows of `row_bytes` bytes, each valid for `kernel`, and the CPU must
/// support the kernel's instruction set.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn drive<const R: usize, K: RowKernel>(kernel: &K, w: &[u8], row_bytes: usize, ys: &mut [f32]) {
    let base = w.as_ptr();
    let mut groups = ys.chunks_exact_mut(R);
    let mut r = 0;
    for group in &mut groups {
        // SAFETY: rows r..r + R are inside `w` (there are `ys.len()` rows); the caller guarantees
        // the rest.
        let out: [f32; R] = unsafe { kernel.dot(std::array::from_fn(|i| base.add((r + i) * row_bytes))) };
        group.copy_from_slice(&out);
        r += R;
    }
    for last in groups.into_remainder() {
        // SAFETY: as above, for row r.
        *last = unsafe { kernel.dot([base.add(r * row_bytes)]) }[0];
        r += 1;
    }
}

/// Prefetches the `N` bytes at `p + ahead`, one request per 64 bytes. The kernels call it for the
/// bytes of each step, `ahead` being the distance to the rows they will process next, so those
/// rows stream in from DRAM while the current ones are computed: the hardware prefetchers alone
/// leave the kernels waiting on memory. Consecutive steps are contiguous, so requests at most 64
/// bytes apart reach every cache line.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_ahead<const N: usize>(p: *const u8, ahead: usize) {
    use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
    let mut offset = 0;
    while offset < N {
        // SAFETY: SSE is part of x86_64; a prefetch never faults, whatever the address, and
        // `wrapping_add` computes it without claiming it is in bounds.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(ahead + offset).cast()) };
        offset += 64;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::quant::test_util::{arbitrary_weights, random_row, random_weights, term_magnitudes};
    use crate::{AlignedBytes, CpuStorage, Tensor, cpu};

    const QUANT: [DType; 5] = [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4K, DType::Q6K];

    /// Runs `isa` and the reference on the same data and compares them: the integers are equal,
    /// so they differ only by f32 rounding, bounded by a relative 1e-5 of the sum of the
    /// magnitudes of all terms (activations bounded by their block's max) and of the result.
    fn check(isa: Isa, dtype: DType, n: usize, k: usize, seed: u64) -> Result<(), TestCaseError> {
        let (w, _) = random_weights(dtype, n, k, seed);
        check_bytes(isa, dtype, &w, n, k, seed)
    }

    fn check_bytes(isa: Isa, dtype: DType, w: &[u8], n: usize, k: usize, seed: u64) -> Result<(), TestCaseError> {
        let x = random_row(seed.wrapping_add(1), k);
        let (mut fast, mut slow) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        matvec_quant_with(isa, dtype, w, n, k, &x, &mut fast);
        let tensor = Tensor::from_storage(CpuStorage::owned(AlignedBytes::copy_from(w)), dtype, [n, k]).unwrap();
        cpu::reference::matvec(&tensor, &x, &mut slow).unwrap();
        let row_bytes = dtype.bytes_for(k).unwrap();
        let amax: Vec<f32> = x.chunks(QK_ACT).map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
        for r in 0..n {
            let terms = term_magnitudes(dtype, &w[r * row_bytes..(r + 1) * row_bytes], k);
            let magnitude: f32 = terms.chunks(QK_ACT).zip(&amax).map(|(t, a)| a * t.iter().sum::<f32>()).sum();
            let tol = 1e-5 * magnitude + 1e-5 * slow[r].abs();
            prop_assert!(
                (fast[r] - slow[r]).abs() <= tol,
                "{isa:?} {dtype} n={n} k={k} row {r}: {} vs {}, tol {tol}",
                fast[r],
                slow[r]
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_isa_matches_reference(
            dtype in prop::sample::select(QUANT.to_vec()),
            n in 1usize..8,
            blocks in prop_oneof![1usize..8, 8usize..40],
            seed in any::<u64>(),
        ) {
            // Odd and even block counts, a single block, counts with and without whole groups of
            // four blocks and a tail, and odd and even row counts.
            let k = blocks * dtype.block_len();
            for isa in Isa::available() {
                check(isa, dtype, n, k, seed)?;
            }
        }

        #[test]
        fn every_isa_matches_reference_on_arbitrary_bytes(
            dtype in prop::sample::select(QUANT.to_vec()),
            n in 1usize..6,
            blocks in prop_oneof![1usize..6, 6usize..24],
            seed in any::<u64>(),
        ) {
            let k = blocks * dtype.block_len();
            let w = arbitrary_weights(dtype, n, k, seed);
            for isa in Isa::available() {
                check_bytes(isa, dtype, &w, n, k, seed)?;
            }
        }
    }

    #[test]
    fn many_tasks_and_a_model_sized_row() {
        // 2048 columns give rows of 1152 to 2176 bytes: several rayon tasks, the last one short.
        for dtype in QUANT {
            for isa in Isa::available() {
                check(isa, dtype, 131, 2048, 11).unwrap();
            }
        }
    }

    #[test]
    fn through_the_tensor_api() {
        let (n, k) = (5, 512);
        let data = random_row(3, n * k);
        let x = random_row(4, k);
        for dtype in QUANT {
            let w = Tensor::from_f32_as(&data, [n, k], dtype).unwrap();
            let (mut fast, mut slow) = (vec![0f32; n], vec![0f32; n]);
            cpu::matvec(&w, &x, &mut fast).unwrap();
            cpu::reference::matvec(&w, &x, &mut slow).unwrap();
            for (a, b) in fast.iter().zip(&slow) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{dtype}: {a} vs {b}");
            }
        }
    }

    /// With one-digit activations every level's kernels (AVX-512 VNNI leaving out the low
    /// digits' products), on original and repacked rows, compute the reference's integers from the
    /// same one-digit quantization.
    #[test]
    fn int8_activations_match_the_int8_reference() {
        use crate::quant::q8act::ActQuant;
        use crate::quant::{q4_0, q4_k, vec_dot::row_dot};
        for dtype in QUANT {
            let (n, k) = (9, 2048 + 3 * dtype.block_len());
            let (w, _) = random_weights(dtype, n, k, 40);
            let row_bytes = dtype.bytes_for(k).unwrap();
            let x = random_row(41, k);
            let act = ActQ8::quantize_as(&x, ActQuant::Int8);
            let want: Vec<f32> = w.chunks_exact(row_bytes).map(|row| row_dot(dtype, row, &act)).collect();
            let two = ActQ8::quantize_as(&x, ActQuant::Int16);
            let amax: Vec<f32> = x.chunks(QK_ACT).map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
            let check = |what: &str, got: &[f32]| {
                for (r, (&g, &e)) in got.iter().zip(&want).enumerate() {
                    let terms = term_magnitudes(dtype, &w[r * row_bytes..(r + 1) * row_bytes], k);
                    let magnitude: f32 = terms.chunks(QK_ACT).zip(&amax).map(|(t, a)| a * t.iter().sum::<f32>()).sum();
                    let tol = 1e-5 * magnitude + 1e-5 * e.abs();
                    assert!((g - e).abs() <= tol, "{what} {dtype} row {r}: {g} vs {e}, tol {tol}");
                    assert_ne!(
                        g,
                        row_dot(dtype, &w[r * row_bytes..(r + 1) * row_bytes], &two),
                        "{what} {dtype} row {r}"
                    );
                }
            };
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; n];
                rows(isa, dtype, &w, row_bytes, &Prepared::new(isa, dtype, act.clone()), &mut got);
                check(&format!("{isa:?}"), &got);
                if matches!(dtype, DType::Q4_0 | DType::Q4K) {
                    let repack = if dtype == DType::Q4K { q4_k::repack_row } else { q4_0::repack_row };
                    let mut packed = vec![0u8; w.len()];
                    for (src, dst) in w.chunks_exact(row_bytes).zip(packed.chunks_exact_mut(row_bytes)) {
                        repack(src, dst);
                    }
                    let prep = Prepared::new_for(isa, dtype, true, act.clone());
                    let mut got = vec![f32::NAN; n];
                    packed_rows(isa, dtype, &packed, row_bytes, &prep, &mut got);
                    check(&format!("{isa:?} repacked"), &got);
                }
            }
        }
    }

    #[test]
    fn zero_activation_gives_zero() {
        let (w, _) = random_weights(DType::Q4K, 3, 256, 1);
        for isa in Isa::available() {
            let mut y = vec![f32::NAN; 3];
            matvec_quant_with(isa, DType::Q4K, &w, 3, 256, &[0.0; 256], &mut y);
            assert_eq!(y, vec![0.0; 3], "{isa:?}");
        }
    }
}
