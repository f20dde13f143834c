//! Scalar dot products of each block format with the two-digit activation ([`ActQ8`]): the
//! reference math of the quantized matrix-vector product, one element at a time.
//!
//! With activation blocks of 32 (unit `da`, integer values `a = 256 * h + l`, sum `S`), per dtype:
//!
//! - `Q8_0`: `(d * da) * sum(q * a)`
//! - `Q4_0`: `(d * da) * (sum(q * a) - 8 * S)` (the offset of 8 removed through the sum)
//! - `Q4_1`: `(d * da) * sum(q * a) + (m * da) * S`
//! - `Q4_K`, per sub-block of 32 (one activation block):
//!   `(d * sc) * da * sum(q * a) - (dmin * m) * da * S`
//! - `Q6_K`, per activation block covering sub-blocks `s` and `s + 1`:
//!   `(d * da) * sum over both of sc * (sum(q * a) - 32 * sum(a))`
//!
//! The dot products of a block fit in i32 (`|a| <= 32639`, so 32 products of levels up to 128 stay
//! below 2^28); the `Q6_K` sums weighted by the 8-bit scales are formed in i64, since two
//! sub-blocks of extreme values and scales of -128 could pass 2^31. The SIMD kernels in
//! `cpu::matvec_quant` compute the same integers, as `256 * sum(q * h) + sum(q * l)`, and differ
//! only in the order of their float operations; their scalar fallback is this module.

use super::q8act::{ActQ8, QK_ACT};
use super::{BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ6K, BlockQ8_0, QK, QK_K, unpack_scales_mins, with_blocks};
use crate::DType;

/// The dot product of one encoded weight row with the quantized activation.
pub(crate) fn row_dot(dtype: DType, row: &[u8], act: &ActQ8) -> f32 {
    match dtype {
        DType::Q8_0 => with_blocks(row, |b| dot_q8_0(b, act)),
        DType::Q4_0 => with_blocks(row, |b| dot_q4_0(b, act)),
        DType::Q4_1 => with_blocks(row, |b| dot_q4_1(b, act)),
        DType::Q4K => with_blocks(row, |b| dot_q4_k(b, act)),
        DType::Q6K => with_blocks(row, |b| dot_q6_k(b, act)),
        DType::F32 | DType::F16 | DType::BF16 => unreachable!("float dtypes take matvec_float"),
    }
}

/// The integer dot product of weight levels `q` with activation block `b`.
fn idot(q: &[i32], act: &ActQ8, b: usize) -> i32 {
    q.iter().enumerate().map(|(i, &q)| q * act.value(QK_ACT * b + i)).sum()
}

/// The 32 levels of a `Q4_0` or `Q4_1` block in element order: low nibbles, then high nibbles.
fn nibbles(qs: &[u8; QK / 2]) -> [i32; QK] {
    let mut q = [0; QK];
    for j in 0..QK / 2 {
        q[j] = i32::from(qs[j] & 0x0f);
        q[j + QK / 2] = i32::from(qs[j] >> 4);
    }
    q
}

fn dot_q8_0(blocks: &[BlockQ8_0], act: &ActQ8) -> f32 {
    let mut sum = 0f32;
    for (b, block) in blocks.iter().enumerate() {
        let q = block.qs.map(i32::from);
        sum += (block.d.to_f32() * act.d[b]) * idot(&q, act, b) as f32;
    }
    sum
}

fn dot_q4_0(blocks: &[BlockQ4_0], act: &ActQ8) -> f32 {
    let mut sum = 0f32;
    for (b, block) in blocks.iter().enumerate() {
        let dot = idot(&nibbles(&block.qs), act, b) - 8 * act.sum[b];
        sum += (block.d.to_f32() * act.d[b]) * dot as f32;
    }
    sum
}

fn dot_q4_1(blocks: &[BlockQ4_1], act: &ActQ8) -> f32 {
    let mut sum = 0f32;
    for (b, block) in blocks.iter().enumerate() {
        let dot = idot(&nibbles(&block.qs), act, b);
        sum += (block.d.to_f32() * act.d[b]) * dot as f32 + (block.m.to_f32() * act.d[b]) * act.sum[b] as f32;
    }
    sum
}

fn dot_q4_k(blocks: &[BlockQ4K], act: &ActQ8) -> f32 {
    let mut sum = 0f32;
    for (i, block) in blocks.iter().enumerate() {
        let (d, dmin) = (block.d.to_f32(), block.dmin.to_f32());
        let (sc, m) = unpack_scales_mins(&block.scales);
        for j in 0..8 {
            // Sub-block j: the low (j even) or high (j odd) nibbles of bytes 32 * (j / 2)...
            let bytes = &block.qs[32 * (j / 2)..32 * (j / 2 + 1)];
            let q: Vec<i32> = bytes.iter().map(|&byte| i32::from((byte >> (4 * (j % 2))) & 0x0f)).collect();
            let b = (QK_K / QK_ACT) * i + j;
            let da = act.d[b];
            sum += (d * f32::from(sc[j])) * da * idot(&q, act, b) as f32
                - (dmin * f32::from(m[j])) * da * act.sum[b] as f32;
        }
    }
    sum
}

/// The 256 levels (0..=63) of a `Q6_K` super-block in element order.
fn q6_levels(block: &BlockQ6K) -> [i32; QK_K] {
    let mut q = [0; QK_K];
    for h in 0..2 {
        for l in 0..32 {
            let (a, b, c) = (block.ql[64 * h + l], block.ql[64 * h + 32 + l], block.qh[32 * h + l]);
            q[128 * h + l] = i32::from((a & 0x0f) | ((c & 3) << 4));
            q[128 * h + l + 32] = i32::from((b & 0x0f) | (((c >> 2) & 3) << 4));
            q[128 * h + l + 64] = i32::from((a >> 4) | (((c >> 4) & 3) << 4));
            q[128 * h + l + 96] = i32::from((b >> 4) | (((c >> 6) & 3) << 4));
        }
    }
    q
}

fn dot_q6_k(blocks: &[BlockQ6K], act: &ActQ8) -> f32 {
    let mut sum = 0f32;
    for (i, block) in blocks.iter().enumerate() {
        let d = block.d.to_f32();
        let q = q6_levels(block);
        for j in 0..QK_K / QK_ACT {
            let b = (QK_K / QK_ACT) * i + j;
            let a: Vec<i32> = (QK_ACT * b..QK_ACT * (b + 1)).map(|e| act.value(e)).collect();
            let mut isum = 0i64;
            for half in 0..2 {
                let s = 2 * j + half;
                let (qs, as_) = (&q[16 * s..16 * (s + 1)], &a[16 * half..16 * (half + 1)]);
                let dot: i32 = qs.iter().zip(as_).map(|(&q, &a)| q * a).sum();
                let asum: i32 = as_.iter().sum();
                isum += i64::from(block.scales[s]) * i64::from(dot - 32 * asum);
            }
            sum += (d * act.d[b]) * isum as f32;
        }
    }
    sum
}
