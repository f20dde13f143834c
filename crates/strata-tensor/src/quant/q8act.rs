//! Quantization of the activation vector for the quantized matrix-vector product: two 8-bit digits
//! per value.
//!
//! Like ggml, strata multiplies block-quantized weights with a quantized activation, so the inner
//! products are integer dot products. ggml rounds the activation to 8 bits per block of 32; on real
//! models that is too coarse (hidden states have outlier dimensions, and a block holding one
//! quantizes its other 31 values with a step of `max|x| / 127`), and decode logits drift far from
//! the float product. strata keeps ggml's value as a high digit and adds a low digit for the
//! residual, so the kernels still multiply bytes and read the weights once. Per block of 32 with
//! `amax = max|x|` and step `u = amax / 127`:
//!
//! - the high digit `h = round(x * 127 / amax)` (ties to even), in `-127..=127`;
//! - the low digit `l = round((x - u * h) * 256 / u)`, clamped to `-127..=127`;
//! - the value `a = 256 * h + l` (a 16-bit integer), with the unit `d = u / 256`: `x ≈ d * a`.
//!
//! Digits are never -128 (for finite `x`), so a sign flip cannot overflow; a block whose `amax` is
//! below 2^-100 quantizes to zero, and a block holding a NaN gets a NaN unit. Since `|x - u * h| <= u / 2`, the low
//! digit before clamping is within `-128..=128` and every value is within half a unit `d / 2` of
//! `x`, except where the clamp moved a low digit of ±128 to ±127 (the residual within `u / 512`
//! of `±u / 2`): those are within one unit. The bound `|x - d * a| <= d` per value is 128 times
//! tighter than the 8-bit rounding's `u / 2`. The integer dot product with a weight block is
//! `sum(q * a) = 256 * sum(q * h) + sum(q * l)`; the SIMD kernels compute the two digit products
//! from the same weight registers and combine them in integers, so the f32 scaling is unchanged
//! and only `d` replaces the 8-bit scale.
//!
//! The reference and the fast kernels call the same function, so they see identical integers and
//! differ only in the order of their float additions.
//!
//! The prefill GEMM of `Q4_K` weights quantizes to [`ActWide`] instead: one 16-bit value per
//! element with a unit per 256 (a `Q4_K` super-block), as precise per value (a step of `max|x| /
//! 32767` against the two digits' `max|x| / 32512`) but with the maximum over 256 values rather
//! than 32, which lets its integer sums run across the super-block's eight scales.
//!
//! [`ActQuant::Int8`], a process-wide opt-in ([`set_act_quant`]), keeps only the high digit: the
//! 8-bit rounding per block of 32 that ggml uses (with a unit per 32 values where ggml's k-quant
//! products use one per 256). Every low digit is then zero, the values `256 * h` and the unit
//! unchanged, so every kernel computes the same integers as before from the same formulas, and
//! the VNNI kernels (the prefill GEMM, the decode matrix-vector products) leave out the low
//! digits' products: half the multiplies, at ggml's precision.

use std::sync::atomic::{AtomicBool, Ordering};

/// Elements per activation block.
pub(crate) const QK_ACT: usize = 32;

/// The weight of the high digit: a value is `HI_WEIGHT * h + l`.
pub(crate) const HI_WEIGHT: i32 = 256;

/// How the CPU's integer kernels quantize activations (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ActQuant {
    /// Two 8-bit digits per value, within `max|x| / 32512` of `x` per block of 32 (for the prefill
    /// GEMM of `Q4_K`, one 16-bit value within `max|x| / 32767` per block of 256): the default.
    #[default]
    Int16,
    /// One 8-bit digit per value, within `max|x| / 254` of `x` per block of 32, as ggml rounds:
    /// faster prefill on block-quantized weights, logits further from the float product.
    Int8,
}

impl ActQuant {
    /// The name the CLI takes: `int16` or `int8`.
    pub fn name(self) -> &'static str {
        match self {
            ActQuant::Int16 => "int16",
            ActQuant::Int8 => "int8",
        }
    }
}

impl std::str::FromStr for ActQuant {
    type Err = String;

    fn from_str(s: &str) -> Result<ActQuant, String> {
        match s {
            "int16" => Ok(ActQuant::Int16),
            "int8" => Ok(ActQuant::Int8),
            _ => Err(format!("unknown activation quantization `{s}` (expected int16 or int8)")),
        }
    }
}

impl std::fmt::Display for ActQuant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether [`ActQuant::Int8`] is in force.
static INT8: AtomicBool = AtomicBool::new(false);

/// Sets how every later quantized product of this process quantizes its activations (like the
/// thread count, a process-wide choice, made once before a model runs).
pub fn set_act_quant(q: ActQuant) {
    INT8.store(q == ActQuant::Int8, Ordering::Relaxed);
}

/// The activation quantization in force ([`set_act_quant`]; [`ActQuant::Int16`] by default).
pub fn act_quant() -> ActQuant {
    if INT8.load(Ordering::Relaxed) { ActQuant::Int8 } else { ActQuant::Int16 }
}

/// An activation vector quantized to two 8-bit digits per value, in blocks of 32.
#[derive(Clone, Debug)]
pub(crate) struct ActQ8 {
    /// The high digits `h`, in the order of `x`.
    pub hi: Vec<i8>,
    /// The low digits `l`, in the order of `x`.
    pub lo: Vec<i8>,
    /// The unit `d` of each block: `max|x| / (127 * 256)`.
    pub d: Vec<f32>,
    /// The sum of each block's values `256 * h + l`.
    pub sum: Vec<i32>,
    /// Whether every low digit is zero ([`ActQuant::Int8`]).
    pub int8: bool,
}

impl ActQ8 {
    /// Quantizes `x`, whose length must be a multiple of 32 (every quantized dtype's block length
    /// is, and the callers check it), as [`act_quant`] says.
    pub fn quantize(x: &[f32]) -> ActQ8 {
        ActQ8::quantize_as(x, act_quant())
    }

    /// [`ActQ8::quantize`] with `q` rather than the process's choice.
    pub fn quantize_as(x: &[f32], q: ActQuant) -> ActQ8 {
        debug_assert_eq!(x.len() % QK_ACT, 0);
        let blocks = x.len() / QK_ACT;
        let int8 = q == ActQuant::Int8;
        let mut act =
            ActQ8 { hi: vec![0; x.len()], lo: vec![0; x.len()], d: vec![0.0; blocks], sum: vec![0; blocks], int8 };
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { if int8 { quantize_avx2::<false>(x, &mut act) } else { quantize_avx2::<true>(x, &mut act) } };
            return act;
        }
        if int8 {
            quantize_blocks::<false>(x, &mut act)
        } else {
            quantize_blocks::<true>(x, &mut act)
        }
        act
    }

    /// The integer value `256 * h + l` of element `i`.
    pub fn value(&self, i: usize) -> i32 {
        HI_WEIGHT * i32::from(self.hi[i]) + i32::from(self.lo[i])
    }

    /// The dequantized activation `d * (256 * h + l)`, for tests.
    #[cfg(test)]
    pub fn dequantized(&self) -> Vec<f32> {
        (0..self.hi.len()).map(|i| self.d[i / QK_ACT] * self.value(i) as f32).collect()
    }
}

/// [`quantize_blocks`] compiled for AVX2, which vectorizes its loops. The float operations are the
/// same IEEE operations in the same order (no contraction into FMAs, no reassociation), so the
/// results are identical to the portable build's.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2<const LO: bool>(x: &[f32], act: &mut ActQ8) {
    quantize_blocks::<LO>(x, act);
}

/// Fills `act`, already sized for `x`, block by block, with the low digits (`LO`) or with zeros
/// for them. Written on fixed-size arrays with branch-free loops so that the compiler vectorizes
/// it.
#[inline(always)]
fn quantize_blocks<const LO: bool>(x: &[f32], act: &mut ActQ8) {
    let digits = act.hi.chunks_exact_mut(QK_ACT).zip(act.lo.chunks_exact_mut(QK_ACT));
    let scales = act.d.iter_mut().zip(act.sum.iter_mut());
    for ((xs, (his, los)), (d, sum)) in x.chunks_exact(QK_ACT).zip(digits).zip(scales) {
        let xs: &[f32; QK_ACT] = xs.try_into().expect("chunks of QK_ACT");
        // max|x| through the bits of |x|, whose integer order is the float order. A NaN gives a
        // NaN maximum and unit, so the results touching the block are NaN, as in the float
        // product, rather than silently finite.
        let amax = f32::from_bits(xs.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff)));
        // The step of the high digit and the inverse steps of both, zero for a negligible block.
        let u = amax / 127.0;
        let negligible = amax < NEGLIGIBLE;
        let ih = if negligible { 0.0 } else { 127.0 / amax };
        let il = if negligible { 0.0 } else { 256.0 * 127.0 / amax };
        let mut values = [0i32; QK_ACT];
        for ((h, l), (&v, value)) in his.iter_mut().zip(los.iter_mut()).zip(xs.iter().zip(&mut values)) {
            // Clamping before rounding equals rounding before clamping, as the bounds are
            // integers; the rounded value's integer is then in the low bits of the sum.
            let (hq, hi) = round_ties_even_int((v * ih).clamp(-127.0, 127.0));
            let lo = if LO { round_ties_even_int(((v - u * hq) * il).clamp(-127.0, 127.0)).1 } else { 0 };
            (*h, *l) = (hi as i8, lo as i8);
            *value = HI_WEIGHT * i32::from(*h) + i32::from(*l);
        }
        *d = if negligible { 0.0 } else { u / HI_WEIGHT as f32 };
        *sum = values.iter().sum();
    }
}

/// Blocks whose max|x| is below 2^-100 quantize to zero: their inverse steps would overflow f32
/// (or their units be subnormal), and no activation of a real model is that small.
const NEGLIGIBLE: f32 = f32::from_bits((127 - 100) << 23);

/// 1.5 * 2^23: adding it to an f32 of magnitude at most 2^22 leaves no fraction bits.
const MAGIC: f32 = 12_582_912.0;

/// Rounds `v` (|v| <= 2^22) to the nearest integer, ties to even. Adding and removing 1.5 * 2^23
/// leaves no fraction bits, and the default rounding mode is to nearest even; unlike
/// `f32::round_ties_even` this needs no SSE4.1 and vectorizes.
#[cfg(test)]
fn round_ties_even(v: f32) -> f32 {
    (v + MAGIC) - MAGIC
}

/// [`round_ties_even`] of `v` (|v| <= 2^22) as an f32 and as an i32: the sum with 1.5 * 2^23 holds
/// the integer in its low mantissa bits, so the difference of the bit patterns is the integer,
/// which vectorizes where a float-to-int conversion would not.
#[inline(always)]
fn round_ties_even_int(v: f32) -> (f32, i32) {
    let sum = v + MAGIC;
    (sum - MAGIC, sum.to_bits() as i32 - MAGIC.to_bits() as i32)
}

/// Elements per unit of [`ActWide`]: a `Q4_K` super-block.
pub(crate) const QK_WIDE: usize = 256;

/// The largest value of [`ActWide`].
pub(crate) const WIDE_MAX: f32 = 32767.0;

/// Activations as one 16-bit value per element with a unit per block of [`QK_WIDE`], for the
/// `Q4_K` prefill GEMM (`cpu::matmul_quant`'s 16-bit path): per block with `amax = max|x|`, the
/// value `v = round(x * 32767 / amax)` (ties to even) in `-32767..=32767` and the unit
/// `amax / 32767`, so `|x - unit * v| <= unit / 2` (plus the f32 rounding of the inverse step).
/// A block whose `amax` is below 2^-100 quantizes to zero, one holding a NaN gets a NaN unit.
///
/// Against [`ActQ8`]'s two digits per block of 32, the step is relative to the largest value of
/// 256 rather than of 32, and the values need one 16 x 16-bit multiply each instead of two 8 x 8.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ActWide {
    /// The values `v`, in the order of `x`.
    pub v: Vec<i16>,
    /// The unit of each block of [`QK_WIDE`].
    pub unit: Vec<f32>,
    /// The sum `S` of the values of each block of [`QK_ACT`].
    pub sum: Vec<i32>,
    /// `unit * S` per block of [`QK_ACT`], the factor of `Q4_K`'s minimums.
    pub e: Vec<f32>,
}

impl ActWide {
    /// Quantizes `x`, whose length must be a multiple of [`QK_WIDE`].
    pub fn quantize(x: &[f32]) -> ActWide {
        assert!(x.len().is_multiple_of(QK_WIDE), "ActWide of {} values, not whole blocks of {QK_WIDE}", x.len());
        let mut act = ActWide {
            v: vec![0; x.len()],
            unit: vec![0.0; x.len() / QK_WIDE],
            sum: vec![0; x.len() / QK_ACT],
            e: vec![0.0; x.len() / QK_ACT],
        };
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { quantize_wide_avx2(x, &mut act) };
            return act;
        }
        quantize_wide_blocks(x, &mut act);
        act
    }
}

/// [`quantize_wide_blocks`] compiled for AVX2: the same IEEE operations in the same order, so the
/// same results as the portable build.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_wide_avx2(x: &[f32], act: &mut ActWide) {
    quantize_wide_blocks(x, act);
}

/// Fills `act`, already sized for `x`, block by block (branch-free loops on fixed-size arrays,
/// which the compiler vectorizes).
#[inline(always)]
fn quantize_wide_blocks(x: &[f32], act: &mut ActWide) {
    const SUBS: usize = QK_WIDE / QK_ACT;
    let blocks = x.chunks_exact(QK_WIDE).zip(act.v.chunks_exact_mut(QK_WIDE));
    let per_block = act.unit.iter_mut().zip(act.sum.chunks_exact_mut(SUBS).zip(act.e.chunks_exact_mut(SUBS)));
    for ((xs, vs), (unit, (sums, es))) in blocks.zip(per_block) {
        let xs: &[f32; QK_WIDE] = xs.try_into().expect("chunks of QK_WIDE");
        // As in `quantize_blocks`: the maximum through the bits of |x|, NaN for a block with a NaN.
        let amax = f32::from_bits(xs.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff)));
        let negligible = amax < NEGLIGIBLE;
        let inv = if negligible { 0.0 } else { WIDE_MAX / amax };
        let mut values = [0i32; QK_WIDE];
        for ((q, &v), value) in vs.iter_mut().zip(xs).zip(&mut values) {
            // A NaN block's integers are meaningless (its unit is NaN) but stay 16-bit.
            let (_, i) = round_ties_even_int((v * inv).clamp(-WIDE_MAX, WIDE_MAX));
            *q = i as i16;
            *value = i32::from(*q);
        }
        *unit = if negligible { 0.0 } else { amax / WIDE_MAX };
        for ((s, e), vals) in sums.iter_mut().zip(es.iter_mut()).zip(values.chunks_exact(QK_ACT)) {
            *s = vals.iter().sum();
            *e = *unit * *s as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_quantizes_hand_chosen_block() {
        // max|x| = 32767: the unit is exactly 1 and every value rounds to the nearest integer.
        let mut x = [0f32; 512];
        x[0] = 32767.0;
        x[1] = -2.5; // ties to even: -2
        x[2] = 3.5; // 4
        x[33] = -32767.0;
        x[40] = 0.49;
        let act = ActWide::quantize(&x);
        assert_eq!(&act.v[..3], &[32767, -2, 4]);
        assert_eq!((act.v[33], act.v[40]), (-32767, 0));
        assert_eq!(act.unit, vec![1.0, 0.0]);
        assert_eq!(&act.sum[..2], &[32767 - 2 + 4, -32767]);
        assert!(act.sum[2..].iter().all(|&s| s == 0));
        assert_eq!(&act.e[..2], &[(32767 - 2 + 4) as f32, -32767.0]);
    }

    #[test]
    fn wide_dequantized_is_within_half_a_unit() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        // Blocks of ordinary values, one with an outlier 1000 times larger, one negligible.
        let mut x: Vec<f32> = (0..1024).map(|_| next()).collect();
        x[300] = 500.0;
        for v in &mut x[512..768] {
            *v *= 1e-31;
        }
        let act = ActWide::quantize(&x);
        for (i, (&v, &q)) in x.iter().zip(&act.v).enumerate() {
            let unit = act.unit[i / QK_WIDE];
            if i / QK_WIDE == 2 {
                assert_eq!((q, unit), (0, 0.0), "negligible block");
                continue;
            }
            let err = (v - unit * f32::from(q)).abs();
            assert!(err <= unit * 0.5 + 2.0 * f32::EPSILON * v.abs(), "x[{i}] = {v}: value {q}, unit {unit}");
        }
        for (b, s) in act.sum.iter().enumerate() {
            let want: i32 = act.v[32 * b..32 * b + 32].iter().map(|&q| i32::from(q)).sum();
            assert_eq!(*s, want, "sum of block {b}");
        }
    }

    #[test]
    fn wide_nan_gives_a_nan_unit_and_portable_build_agrees() {
        let mut x = vec![0.25f32; 512];
        x[300] = f32::NAN;
        let act = ActWide::quantize(&x);
        assert_eq!(act.unit[0], 0.25 / WIDE_MAX);
        assert!(act.unit[1].is_nan());
        let mut portable = ActWide { v: vec![0; 512], unit: vec![0.0; 2], sum: vec![0; 16], e: vec![0.0; 16] };
        quantize_wide_blocks(&x, &mut portable);
        assert_eq!(portable.v, act.v);
        assert_eq!(portable.sum, act.sum);
        assert_eq!(portable.unit[0].to_bits(), act.unit[0].to_bits());
        assert_eq!(portable.e[..8], act.e[..8]);
        assert!(act.e[8..].iter().all(|e| e.is_nan()));
    }

    #[test]
    fn quantizes_hand_chosen_block() {
        // max|x| = 127, so the high step is exactly 1, the unit 1/256, and the residuals are
        // exact in f32.
        let mut x = [0f32; 64];
        x[0] = 127.0;
        x[1] = -63.5; // h = -64 (ties to even), residual 0.5: l = 128, clamped to 127
        x[2] = 1.5; // h = 2, residual -0.5: l = -128, clamped to -127
        x[3] = 2.25; // h = 2, l = 64
        x[4] = -127.0;
        x[5] = 0.49; // h = 0, l = round(125.44) = 125
        x[6] = -0.001; // h = 0, l = round(-0.256) = 0
        let act = ActQ8::quantize(&x);
        assert_eq!(&act.hi[..7], &[127, -64, 2, 2, -127, 0, 0]);
        assert_eq!(&act.lo[..7], &[0, 127, -127, 64, 0, 125, 0]);
        assert!(act.hi[7..].iter().chain(&act.lo[7..]).all(|q| *q == 0));
        assert_eq!(act.d, vec![1.0 / 256.0, 0.0]);
        let values: Vec<i32> = (0..7).map(|i| act.value(i)).collect();
        assert_eq!(values, [32512, -16257, 385, 576, -32512, 125, 0]);
        assert_eq!(act.sum, vec![values.iter().sum::<i32>(), 0]);
    }

    #[test]
    fn rounding_matches_round_ties_even() {
        for i in -2540..=2540 {
            let v = i as f32 * 0.05;
            assert_eq!(round_ties_even(v), v.round_ties_even(), "{v}");
            assert_eq!(round_ties_even_int(v), (v.round_ties_even(), v.round_ties_even() as i32), "{v}");
        }
    }

    /// Every value is within one unit of `x`, and within half a unit unless its low digit sits at
    /// the clamp; f32 rounding adds at most two roundings relative to `|x|` (the residual's
    /// product `u * h` and the dequantized product `d * a`) and a negligible part of a unit (the
    /// rounded inverse steps).
    #[test]
    fn dequantized_is_within_half_a_unit() {
        let x = crate::quant::test_util::random_row(9, 32 * 64);
        let act = ActQ8::quantize(&x);
        let deq = act.dequantized();
        let mut clamped = 0;
        for (i, (&a, &b)) in x.iter().zip(&deq).enumerate() {
            let d = act.d[i / QK_ACT];
            let half = if act.lo[i].abs() == 127 {
                clamped += 1;
                1.0
            } else {
                0.5
            };
            let tol = d * (half + 1e-4) + 2.0 * f32::EPSILON * a.abs();
            assert!((a - b).abs() <= tol, "{i}: {a} vs {b}, unit {d}");
            assert!(act.hi[i] != -128 && act.lo[i] != -128);
        }
        assert!(clamped < x.len() / 50, "{clamped} low digits at the clamp");
    }

    /// The AVX2 build of the quantizer gives the portable build's bits, on blocks with outliers,
    /// zeros, ties and values at the clamp.
    #[test]
    fn every_build_gives_the_same_digits() {
        let mut x = crate::quant::test_util::random_row(17, 32 * 64);
        x[..32].copy_from_slice(&[0.0; 32]);
        for (i, v) in x[32..64].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 0.5;
        }
        x[64] = -1e-30;
        // A negligible block (zero digits), and one just above the threshold.
        x[96..128].copy_from_slice(&[3e-31; 32]);
        x[128..160].copy_from_slice(&[-8e-31; 32]);
        let mut portable =
            ActQ8 { hi: vec![0; x.len()], lo: vec![0; x.len()], d: vec![0.0; 64], sum: vec![0; 64], int8: false };
        quantize_blocks::<true>(&x, &mut portable);
        let dispatched = ActQ8::quantize_as(&x, ActQuant::Int16);
        assert_eq!(portable.hi, dispatched.hi);
        assert_eq!(portable.lo, dispatched.lo);
        assert_eq!(portable.d, dispatched.d);
        assert_eq!(portable.sum, dispatched.sum);
        assert_eq!((&portable.hi[96..128], portable.d[3]), (&[0i8; 32][..], 0.0));
        assert_eq!((&portable.hi[128..160], &portable.lo[128..160]), (&[-127i8; 32][..], &[0i8; 32][..]));
        assert!(portable.hi.iter().chain(&portable.lo).all(|&q| q != -128));
    }

    /// One digit: the high digits, units and zeros of two digits (so `256 * h` is the 8-bit
    /// rounding of `x`), the sums of those values, the same bits from every build, and every value
    /// within half a step `u = max|x| / 127` of `x`.
    #[test]
    fn int8_keeps_the_high_digit() {
        let mut x = crate::quant::test_util::random_row(23, 32 * 64);
        x[..32].copy_from_slice(&[0.0; 32]);
        x[96..128].copy_from_slice(&[3e-31; 32]);
        let (two, one) = (ActQ8::quantize_as(&x, ActQuant::Int16), ActQ8::quantize_as(&x, ActQuant::Int8));
        assert!(one.int8 && !two.int8);
        assert_eq!((&one.hi, &one.d), (&two.hi, &two.d));
        assert!(one.lo.iter().all(|&l| l == 0));
        for (b, &s) in one.sum.iter().enumerate() {
            assert_eq!(s, (32 * b..32 * b + 32).map(|i| 256 * i32::from(one.hi[i])).sum::<i32>());
        }
        let mut portable =
            ActQ8 { hi: vec![0; x.len()], lo: vec![1; x.len()], d: vec![0.0; 64], sum: vec![0; 64], int8: true };
        quantize_blocks::<false>(&x, &mut portable);
        assert_eq!((&portable.hi, &portable.lo, &portable.sum), (&one.hi, &one.lo, &one.sum));
        assert_eq!(
            portable.d.iter().map(|d| d.to_bits()).collect::<Vec<_>>(),
            one.d.iter().map(|d| d.to_bits()).collect::<Vec<_>>()
        );
        for (i, (&v, deq)) in x.iter().zip(one.dequantized()).enumerate() {
            let step = 256.0 * one.d[i / QK_ACT];
            // A negligible block's values (below 2^-100) quantize to zero.
            assert!(step > 0.0 || v.abs() < NEGLIGIBLE, "{i}: {v}");
            assert!(
                step == 0.0 || (v - deq).abs() <= step * (0.5 + 1e-4) + 2.0 * f32::EPSILON * v.abs(),
                "{i}: {v} vs {deq}"
            );
        }
    }

    #[test]
    fn act_quant_names_round_trip() {
        for q in [ActQuant::Int16, ActQuant::Int8] {
            assert_eq!(q.name().parse::<ActQuant>(), Ok(q));
            assert_eq!(q.to_string(), q.name());
        }
        assert!("int4".parse::<ActQuant>().unwrap_err().contains("int16 or int8"));
        assert_eq!(ActQuant::default(), ActQuant::Int16);
    }

    #[test]
    fn nan_gives_a_nan_unit() {
        let mut x = [1f32; 64];
        x[40] = f32::NAN;
        let act = ActQ8::quantize(&x);
        assert_eq!(act.d[0], 1.0 / 127.0 / 256.0);
        assert!(act.d[1].is_nan());
    }

    #[test]
    fn sums_are_of_the_values() {
        let x = crate::quant::test_util::random_row(5, 32 * 8);
        let act = ActQ8::quantize(&x);
        for (b, &s) in act.sum.iter().enumerate() {
            assert_eq!(s, (32 * b..32 * b + 32).map(|i| act.value(i)).sum::<i32>());
        }
    }
}
