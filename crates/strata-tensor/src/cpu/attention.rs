//! Causal multi-head attention on the CPU (fast versions): contiguous keys for prefill and
//! chunked prefill, a paged KV cache for decode. Grouped-query attention (and multi-query, its
//! limit) is native: query head `h` reads KV head `h / group` of each key row.
//!
//! The unit of work is a set of query heads over a range of keys, walking whole key and value
//! rows (`[n_kv_heads, head_dim]` per token, contiguous in memory, so the hardware prefetchers
//! stream them): scaled dot products (vector `dot`) into a score buffer, per head a maximum and
//! `exp(s - max)` with its sum, then the values accumulated with vector `axpy`, unnormalised.
//! Prefill runs one unit per query token over all the keys it sees and divides by the sums.
//! Decode splits the sequence into chunks of keys, one unit each, and merges the partial
//! results with the online-softmax rule (`out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c`),
//! flash-decoding style, so a single sequence keeps every thread busy. Units run on rayon's
//! threads when the work pays for it.
//!
//! Masking follows transformers: a query at position `i` sees key `j` iff `j <= i` and, with a
//! sliding window `W`, `i - j < W` (`kv_idx > q_idx - W`).

use std::ops::Range;

use rayon::prelude::*;

use super::vec::{self, Par};
use super::{Isa, isa};
use crate::{Error, Result};

/// Work (heads x visible keys x head_dim) below which attention stays on the calling thread.
const PAR_MIN_WORK: usize = 1 << 16;
/// The shortest key chunk decode splits a sequence into.
const MIN_DECODE_CHUNK: usize = 64;
/// Decode aims for this many units of work per thread, for balance.
const DECODE_UNITS_PER_THREAD: usize = 4;

/// The shape of an attention layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; `n_heads` is a multiple of it (GQA; 1 is MQA). Query head `h` uses KV
    /// head `h / (n_heads / n_kv_heads)`.
    pub n_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// The factor applied to query-key dot products (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
    /// Sliding-window length `W`: a query sees only the `W` most recent positions, itself
    /// included. `None` for full causal attention.
    pub sliding_window: Option<usize>,
}

impl AttentionParams {
    /// The first key position visible from query position `i`.
    pub(crate) fn first_visible(&self, i: usize) -> usize {
        match self.sliding_window {
            Some(w) => (i + 1).saturating_sub(w),
            None => 0,
        }
    }

    /// Checks the parameters and returns the elements per token of the queries and of the
    /// keys/values.
    fn check(&self, op: &'static str) -> Result<(usize, usize)> {
        let bad = |msg: String| Err(Error::InvalidArgument { op, msg });
        if self.n_heads == 0 || self.n_kv_heads == 0 || self.head_dim == 0 {
            return bad(format!(
                "n_heads ({}), n_kv_heads ({}) and head_dim ({}) must be positive",
                self.n_heads, self.n_kv_heads, self.head_dim
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!("n_heads {} is not a multiple of n_kv_heads {}", self.n_heads, self.n_kv_heads));
        }
        if self.sliding_window == Some(0) {
            return bad("a sliding window of 0 hides every key".into());
        }
        match self.n_heads.checked_mul(self.head_dim) {
            Some(q_stride) => Ok((q_stride, self.n_kv_heads * self.head_dim)),
            None => bad(format!("{} heads x head_dim {} overflows", self.n_heads, self.head_dim)),
        }
    }
}

/// Causal attention of `tq` query tokens at positions `q_pos0..q_pos0 + tq` over `tk` keys and
/// values at positions `0..tk`.
///
/// `q` and `out` are `[tq, n_heads, head_dim]`, `k` and `v` `[tk, n_kv_heads, head_dim]`, with
/// `tk >= q_pos0 + tq`. Prefill is `q_pos0 = 0, tq = tk`; chunked prefill has `q_pos0 > 0`.
/// Scores are `p.scale * q.k`, softmax in f32, with the causal and sliding-window masks.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], q_pos0: usize, p: &AttentionParams, out: &mut [f32]) -> Result<()> {
    attention_with(isa(), Par::Auto, q, k, v, q_pos0, p, out)
}

/// One decode step: the query at position `seq_len - 1` (`q` and `out` `[n_heads, head_dim]`)
/// against the `seq_len` keys and values of a paged KV cache.
///
/// Token `t` lives in block `t / block_len` at row `t % block_len`; each block is
/// `[block_len, n_kv_heads, head_dim]`, and the last block may hold fewer than `block_len`
/// tokens (its other rows are never read). At least `seq_len.div_ceil(block_len)` blocks must be
/// given; later ones are ignored. The sliding window applies as in [`attention`].
pub fn attention_decode(
    q: &[f32],
    k_blocks: &[&[f32]],
    v_blocks: &[&[f32]],
    block_len: usize,
    seq_len: usize,
    p: &AttentionParams,
    out: &mut [f32],
) -> Result<()> {
    attention_decode_with(isa(), Par::Auto, None, q, k_blocks, v_blocks, block_len, seq_len, p, out)
}

/// [`attention`] on a given ISA and threading choice.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_with(
    isa: Isa,
    par: Par,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    q_pos0: usize,
    p: &AttentionParams,
    out: &mut [f32],
) -> Result<()> {
    let (tq, tk) = check_attention("attention", q.len(), k.len(), v.len(), out.len(), q_pos0, p)?;
    if tq == 0 {
        return Ok(());
    }
    let isa = vec::usable(isa);
    let (hd, group) = (p.head_dim, p.n_heads / p.n_kv_heads);
    let (q_stride, kv_stride) = (p.n_heads * hd, p.n_kv_heads * hd);
    let unit = |scratch: &mut Scratch, (t, out): (usize, &mut [f32])| {
        let i = q_pos0 + t;
        let keys = p.first_visible(i)..i + 1;
        let q = &q[t * q_stride..][..q_stride];
        let row = |j: usize| j * kv_stride;
        attend(
            isa,
            q,
            hd,
            group,
            p.scale,
            keys,
            |j| &k[row(j)..][..kv_stride],
            |j| &v[row(j)..][..kv_stride],
            scratch,
            out,
        );
        for (o, sum) in out.chunks_exact_mut(hd).zip(&scratch.sum) {
            vec::scale(isa, o, 1.0 / sum);
        }
    };
    // The visible keys average at most about tk per query.
    let work = tq.saturating_mul(p.n_heads).saturating_mul(tk.min(p.sliding_window.unwrap_or(tk))).saturating_mul(hd);
    if tq > 1 && par.decide(work, PAR_MIN_WORK) {
        out.par_chunks_mut(q_stride).enumerate().for_each_init(Scratch::default, unit);
    } else {
        let mut scratch = Scratch::default();
        out.chunks_mut(q_stride).enumerate().for_each(|item| unit(&mut scratch, item));
    }
    Ok(())
}

/// [`attention_decode`] on a given ISA and threading choice, with keys split into chunks of
/// `chunk` (or an automatic size when `None`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_decode_with(
    isa: Isa,
    par: Par,
    chunk: Option<usize>,
    q: &[f32],
    k_blocks: &[&[f32]],
    v_blocks: &[&[f32]],
    block_len: usize,
    seq_len: usize,
    p: &AttentionParams,
    out: &mut [f32],
) -> Result<()> {
    check_decode("attention_decode", q.len(), out.len(), k_blocks, v_blocks, block_len, seq_len, p)?;
    let isa = vec::usable(isa);
    let (hd, n_heads, group) = (p.head_dim, p.n_heads, p.n_heads / p.n_kv_heads);
    let kv_stride = p.n_kv_heads * hd;
    let first = p.first_visible(seq_len - 1);
    let n_vis = seq_len - first;
    let parallel = par.decide(n_heads.saturating_mul(n_vis).saturating_mul(hd), PAR_MIN_WORK);
    let chunk = match chunk {
        Some(c) => c.clamp(1, n_vis),
        None if parallel => {
            let wanted = DECODE_UNITS_PER_THREAD * rayon::current_num_threads();
            n_vis.div_ceil(wanted.min(n_vis.div_ceil(MIN_DECODE_CHUNK)).max(1))
        }
        None => n_vis,
    };
    let n_chunks = n_vis.div_ceil(chunk);

    // Each chunk leaves every head's unnormalised output, then per head the score maximum and
    // the sum of exp(score - maximum).
    let acc_len = n_heads * hd;
    let part_len = acc_len + 2 * n_heads;
    let mut parts = vec![0f32; n_chunks * part_len];
    let unit = |scratch: &mut Scratch, (c, part): (usize, &mut [f32])| {
        let start = first + c * chunk;
        let keys = start..(start + chunk).min(seq_len);
        let (acc, stats) = part.split_at_mut(acc_len);
        let key = |t| paged_row(k_blocks, block_len, kv_stride, t);
        let value = |t| paged_row(v_blocks, block_len, kv_stride, t);
        attend(isa, q, hd, group, p.scale, keys, key, value, scratch, acc);
        stats[..n_heads].copy_from_slice(&scratch.max);
        stats[n_heads..].copy_from_slice(&scratch.sum);
    };
    if parallel && n_chunks > 1 {
        parts.par_chunks_mut(part_len).enumerate().for_each_init(Scratch::default, unit);
    } else {
        let mut scratch = Scratch::default();
        parts.chunks_mut(part_len).enumerate().for_each(|item| unit(&mut scratch, item));
    }

    // Merge the chunks of each head. With one chunk the weight is exp(0) = 1 and this is a
    // plain division by the sum.
    let stat = |c: usize, which: usize, h: usize| parts[c * part_len + acc_len + which * n_heads + h];
    for (h, out) in out.chunks_exact_mut(hd).enumerate() {
        let global_max = (0..n_chunks).map(|c| stat(c, 0, h)).fold(f32::NEG_INFINITY, f32::max);
        out.fill(0.0);
        let mut sum = 0f32;
        for c in 0..n_chunks {
            let w = (stat(c, 0, h) - global_max).exp();
            vec::axpy(isa, w, &parts[c * part_len + h * hd..][..hd], out);
            sum += w * stat(c, 1, h);
        }
        vec::scale(isa, out, 1.0 / sum);
    }
    Ok(())
}

/// Token `t`'s row (`stride` elements) in a paged cache of `block_len` tokens per block.
#[inline]
fn paged_row<'a>(blocks: &[&'a [f32]], block_len: usize, stride: usize, t: usize) -> &'a [f32] {
    &blocks[t / block_len][t % block_len * stride..][..stride]
}

/// Per-thread buffers of [`attend`].
#[derive(Default)]
struct Scratch {
    /// Scores `[query heads, keys]`, then `exp(score - max)`.
    scores: Vec<f32>,
    /// Per query head: the maximum score.
    max: Vec<f32>,
    /// Per query head: the sum of `exp(score - max)`.
    sum: Vec<f32>,
}

/// Unnormalised attention of the query heads `q` (`[n_q, hd]`) over the key positions `keys`
/// (non-empty), where `key(j)` and `value(j)` give position `j`'s row of `n_q / group` KV heads
/// and query head `h` reads KV head `h / group`: `acc[h] = sum_j exp(s_hj - max_h) v_j` with
/// `s_hj = scale * q_h.k_j`, leaving `max_h` and `sum_j exp(s_hj - max_h)` in `scratch`.
#[allow(clippy::too_many_arguments)]
fn attend<'a>(
    isa: Isa,
    q: &[f32],
    hd: usize,
    group: usize,
    scale: f32,
    keys: Range<usize>,
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    scratch: &mut Scratch,
    acc: &mut [f32],
) {
    let n_q = q.len() / hd;
    let n = keys.len();
    debug_assert!(n > 0 && acc.len() == q.len() && n_q.is_multiple_of(group));
    let scores = &mut scratch.scores;
    scores.clear();
    scores.resize(n_q * n, 0.0);
    // Keys four at a time: one pass over each query head per four key rows.
    let start = keys.start;
    let mut jj = 0;
    while jj + 4 <= n {
        let rows: [&[f32]; 4] = std::array::from_fn(|u| key(start + jj + u));
        for (h, q) in q.chunks_exact(hd).enumerate() {
            let off = h / group * hd;
            let s = vec::dot4(isa, q, rows.map(|r| &r[off..off + hd]));
            for (u, s) in s.into_iter().enumerate() {
                scores[h * n + jj + u] = s * scale;
            }
        }
        jj += 4;
    }
    for jj in jj..n {
        let k = key(start + jj);
        for (h, q) in q.chunks_exact(hd).enumerate() {
            scores[h * n + jj] = vec::dot(isa, q, &k[h / group * hd..][..hd]) * scale;
        }
    }
    scratch.max.clear();
    scratch.sum.clear();
    for row in scores.chunks_exact_mut(n) {
        let max = vec::max(isa, row);
        scratch.sum.push(vec::exp_shift_sum(isa, row, max));
        scratch.max.push(max);
    }
    acc.fill(0.0);
    let mut jj = 0;
    while jj + 4 <= n {
        let rows: [&[f32]; 4] = std::array::from_fn(|u| value(start + jj + u));
        for (h, acc) in acc.chunks_exact_mut(hd).enumerate() {
            let off = h / group * hd;
            let p: [f32; 4] = std::array::from_fn(|u| scores[h * n + jj + u]);
            vec::axpy4(isa, p, rows.map(|r| &r[off..off + hd]), acc);
        }
        jj += 4;
    }
    for jj in jj..n {
        let v = value(start + jj);
        for (h, acc) in acc.chunks_exact_mut(hd).enumerate() {
            vec::axpy(isa, scores[h * n + jj], &v[h / group * hd..][..hd], acc);
        }
    }
}

/// Checks the operands of [`attention`] and returns `(tq, tk)`.
pub(crate) fn check_attention(
    op: &'static str,
    q_len: usize,
    k_len: usize,
    v_len: usize,
    out_len: usize,
    q_pos0: usize,
    p: &AttentionParams,
) -> Result<(usize, usize)> {
    let (q_stride, kv_stride) = p.check(op)?;
    if !q_len.is_multiple_of(q_stride) {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("q has {q_len} elements, not a whole number of tokens of {q_stride} (n_heads x head_dim)"),
        });
    }
    if !k_len.is_multiple_of(kv_stride) {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("k has {k_len} elements, not a whole number of tokens of {kv_stride} (n_kv_heads x head_dim)"),
        });
    }
    if v_len != k_len {
        return Err(Error::LengthMismatch { op, what: "v", expected: k_len, got: v_len });
    }
    if out_len != q_len {
        return Err(Error::LengthMismatch { op, what: "out", expected: q_len, got: out_len });
    }
    let (tq, tk) = (q_len / q_stride, k_len / kv_stride);
    if tk < q_pos0 + tq {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("{tq} queries from position {q_pos0} need at least {} keys, got {tk}", q_pos0 + tq),
        });
    }
    Ok((tq, tk))
}

/// Checks the operands of [`attention_decode`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_decode(
    op: &'static str,
    q_len: usize,
    out_len: usize,
    k_blocks: &[&[f32]],
    v_blocks: &[&[f32]],
    block_len: usize,
    seq_len: usize,
    p: &AttentionParams,
) -> Result<()> {
    let (q_stride, kv_stride) = p.check(op)?;
    if q_len != q_stride {
        return Err(Error::LengthMismatch { op, what: "q", expected: q_stride, got: q_len });
    }
    if out_len != q_stride {
        return Err(Error::LengthMismatch { op, what: "out", expected: q_stride, got: out_len });
    }
    if block_len == 0 || seq_len == 0 {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("block_len ({block_len}) and seq_len ({seq_len}) must be positive"),
        });
    }
    if v_blocks.len() != k_blocks.len() {
        return Err(Error::LengthMismatch { op, what: "v_blocks", expected: k_blocks.len(), got: v_blocks.len() });
    }
    let needed = seq_len.div_ceil(block_len);
    if k_blocks.len() < needed {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("{} blocks of {block_len} tokens cannot hold a sequence of {seq_len}", k_blocks.len()),
        });
    }
    let block_elems = block_len
        .checked_mul(kv_stride)
        .ok_or_else(|| Error::InvalidArgument { op, msg: format!("block_len {block_len} x {kv_stride} overflows") })?;
    for (b, (kb, vb)) in k_blocks.iter().zip(v_blocks).take(needed).enumerate() {
        for (what, len) in [("key", kb.len()), ("value", vb.len())] {
            if len != block_elems {
                return Err(Error::InvalidArgument {
                    op,
                    msg: format!(
                        "{what} block {b} has {len} elements, expected {block_elems} ([{block_len}, {}, {}])",
                        p.n_kv_heads, p.head_dim
                    ),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::cpu::reference;
    use crate::cpu::vec::testing::{assert_close, random_vec};

    const ABS: f32 = 2e-6;
    const REL: f32 = 2e-5;

    fn params(n_heads: usize, n_kv_heads: usize, head_dim: usize, window: Option<usize>) -> AttentionParams {
        AttentionParams { n_heads, n_kv_heads, head_dim, scale: 1.0 / (head_dim as f32).sqrt(), sliding_window: window }
    }

    /// Splits contiguous `[seq_len, n_kv, hd]` rows into blocks of `block_len` tokens, the
    /// unused rows of the last block and `extra` trailing blocks filled with NaN, which would
    /// poison the output if they were read.
    fn to_blocks(x: &[f32], kv_stride: usize, block_len: usize, extra: usize) -> Vec<Vec<f32>> {
        let mut blocks: Vec<Vec<f32>> = x
            .chunks(block_len * kv_stride)
            .map(|c| {
                let mut b = c.to_vec();
                b.resize(block_len * kv_stride, f32::NAN);
                b
            })
            .collect();
        blocks.extend((0..extra).map(|_| vec![f32::NAN; block_len * kv_stride]));
        blocks
    }

    fn refs(blocks: &[Vec<f32>]) -> Vec<&[f32]> {
        blocks.iter().map(|b| b.as_slice()).collect()
    }

    #[test]
    fn single_key_returns_its_value_and_equal_scores_average() {
        let p = params(2, 1, 3, None);
        let q = [1.0f32, 2.0, 3.0, -1.0, 0.5, 0.0];
        let k = [0.0f32, 0.0, 0.0, 0.0, 0.0, 0.0];
        let v = [1.0f32, 2.0, 3.0, 5.0, 6.0, 7.0];
        let mut out = [0f32; 6];
        // Query at position 0 sees only key 0.
        reference::attention(&q[..6], &k[..3], &v[..3], 0, &p, &mut out).unwrap();
        assert_eq!(out, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        // Query at position 1 sees both keys with equal (zero) scores: the mean of the values.
        for isa in Isa::available() {
            attention_with(isa, Par::Never, &q, &k, &v, 1, &p, &mut out).unwrap();
            assert_close(&out, &[3.0, 4.0, 5.0, 3.0, 4.0, 5.0], 1e-6, 0.0, &format!("{isa:?}"));
        }
    }

    #[test]
    fn window_masks_old_keys() {
        // Window 1: every query sees only its own position, so the output is its own value.
        let p = params(1, 1, 4, Some(1));
        let k = random_vec(1, 5 * 4, 1.0);
        let v = random_vec(2, 5 * 4, 1.0);
        let q = random_vec(3, 5 * 4, 1.0);
        let mut out = vec![0f32; 20];
        for isa in Isa::available() {
            attention_with(isa, Par::Never, &q, &k, &v, 0, &p, &mut out).unwrap();
            assert_close(&out, &v, 1e-6, 1e-6, &format!("{isa:?}"));
        }
        // Window W over a longer sequence equals no window over the last W keys.
        let (seq, w, hd) = (11, 4, 8);
        let p = params(3, 3, hd, Some(w));
        let k = random_vec(4, seq * 3 * hd, 1.0);
        let v = random_vec(5, seq * 3 * hd, 1.0);
        let q = random_vec(6, 3 * hd, 2.0);
        let mut windowed = vec![0f32; 3 * hd];
        let (kb, vb) = (to_blocks(&k, 3 * hd, 4, 0), to_blocks(&v, 3 * hd, 4, 0));
        attention_decode(&q, &refs(&kb), &refs(&vb), 4, seq, &p, &mut windowed).unwrap();
        let tail = (seq - w) * 3 * hd;
        let mut full = vec![0f32; 3 * hd];
        reference::attention(&q, &k[tail..], &v[tail..], w - 1, &params(3, 3, hd, None), &mut full).unwrap();
        assert_close(&windowed, &full, ABS, REL, "window vs truncated");
    }

    #[test]
    fn future_keys_are_masked() {
        let p = params(4, 2, 16, None);
        let (tq, tk) = (3, 9);
        let q = random_vec(1, tq * 64, 1.0);
        let mut k = random_vec(2, tk * 32, 1.0);
        let mut v = random_vec(3, tk * 32, 1.0);
        let mut a = vec![0f32; tq * 64];
        attention(&q, &k, &v, 2, &p, &mut a).unwrap();
        // Queries sit at positions 2..5; keys 5.. are in their future.
        k[5 * 32..].fill(100.0);
        v[5 * 32..].fill(f32::NAN);
        let mut b = vec![0f32; tq * 64];
        attention(&q, &k, &v, 2, &p, &mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let p = params(4, 2, 8, None);
        let (q, kv) = (vec![0f32; 2 * 32], vec![0f32; 3 * 16]);
        let mut out = vec![0f32; 64];
        assert!(attention(&q, &kv, &kv, 1, &p, &mut out).is_ok());
        assert!(attention(&q, &kv, &kv, 2, &p, &mut out).is_err(), "needs 4 keys");
        assert!(attention(&q[..60], &kv, &kv, 0, &p, &mut out[..60]).is_err());
        assert!(matches!(attention(&q, &kv, &kv[..32], 0, &p, &mut out), Err(Error::LengthMismatch { what: "v", .. })));
        assert!(matches!(attention(&q, &kv, &kv, 0, &p, &mut out[..32]), Err(Error::LengthMismatch { .. })));
        for bad in [params(4, 3, 8, None), params(0, 1, 8, None), params(4, 2, 0, None), params(4, 2, 8, Some(0))] {
            assert!(attention(&q, &kv, &kv, 0, &bad, &mut out).is_err(), "{bad:?}");
            assert!(reference::attention(&q, &kv, &kv, 0, &bad, &mut out).is_err(), "{bad:?}");
        }
        let block = vec![0f32; 2 * 16];
        let blocks: Vec<&[f32]> = vec![&block, &block];
        let mut o = vec![0f32; 32];
        assert!(attention_decode(&q[..32], &blocks, &blocks, 2, 4, &p, &mut o).is_ok());
        assert!(attention_decode(&q[..32], &blocks, &blocks, 2, 5, &p, &mut o).is_err(), "too few blocks");
        assert!(attention_decode(&q[..32], &blocks, &blocks[..1], 2, 2, &p, &mut o).is_err());
        assert!(attention_decode(&q[..32], &blocks, &blocks, 3, 4, &p, &mut o).is_err(), "block size");
        assert!(attention_decode(&q[..32], &blocks, &blocks, 0, 4, &p, &mut o).is_err());
        assert!(attention_decode(&q[..32], &blocks, &blocks, 2, 0, &p, &mut o).is_err());
        assert!(attention_decode(&q[..31], &blocks, &blocks, 2, 4, &p, &mut o).is_err());
        assert!(reference::attention_decode(&q[..32], &blocks, &blocks, 2, 5, &p, &mut o).is_err());
    }

    /// Shapes for the random tests: query heads per KV head in {1, 2, 4, 7}, head dims that are
    /// the common ones or awkward.
    fn shape() -> impl Strategy<Value = (usize, usize, usize)> {
        (
            1usize..=3,
            prop::sample::select(vec![1usize, 2, 4, 7]),
            prop::sample::select(vec![64usize, 80, 128, 1, 3, 17, 33, 67, 130]),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn attention_matches_reference(
            (n_kv, group, hd) in shape(),
            tq in 1usize..8,
            q_pos0 in 0usize..12,
            extra_keys in 0usize..3,
            window in prop::option::of(1usize..16),
            seed: u64,
        ) {
            let p = params(n_kv * group, n_kv, hd, window);
            let tk = q_pos0 + tq + extra_keys;
            let q = random_vec(seed, tq * p.n_heads * hd, 2.0);
            let k = random_vec(seed ^ 1, tk * n_kv * hd, 2.0);
            let v = random_vec(seed ^ 2, tk * n_kv * hd, 1.0);
            let mut want = vec![0f32; q.len()];
            reference::attention(&q, &k, &v, q_pos0, &p, &mut want).unwrap();
            for isa in Isa::available() {
                for par in [Par::Never, Par::Always] {
                    let mut got = vec![0f32; q.len()];
                    attention_with(isa, par, &q, &k, &v, q_pos0, &p, &mut got).unwrap();
                    assert_close(&got, &want, ABS, REL, &format!("{isa:?} {par:?}"));
                }
            }
        }

        /// Decode over blocks equals the reference, and equals `attention` on the same keys made
        /// contiguous (its last row), for every chunking of the keys.
        #[test]
        fn decode_matches_reference_and_contiguous(
            (n_kv, group, hd) in shape(),
            seq_len in 1usize..40,
            block_len in 1usize..9,
            extra_blocks in 0usize..2,
            window in prop::option::of(1usize..24),
            chunk in prop::option::of(1usize..12),
            seed: u64,
        ) {
            let p = params(n_kv * group, n_kv, hd, window);
            let kv_stride = n_kv * hd;
            let q = random_vec(seed, p.n_heads * hd, 2.0);
            let k = random_vec(seed ^ 1, seq_len * kv_stride, 2.0);
            let v = random_vec(seed ^ 2, seq_len * kv_stride, 1.0);
            let (kb, vb) = (to_blocks(&k, kv_stride, block_len, extra_blocks), to_blocks(&v, kv_stride, block_len, extra_blocks));
            let (kb, vb) = (refs(&kb), refs(&vb));
            let mut want = vec![0f32; q.len()];
            reference::attention_decode(&q, &kb, &vb, block_len, seq_len, &p, &mut want).unwrap();
            let mut contiguous = vec![0f32; q.len()];
            attention(&q, &k, &v, seq_len - 1, &p, &mut contiguous).unwrap();
            assert_close(&contiguous, &want, ABS, REL, "contiguous attention vs reference decode");
            for isa in Isa::available() {
                for par in [Par::Never, Par::Always] {
                    let mut got = vec![0f32; q.len()];
                    attention_decode_with(isa, par, chunk, &q, &kb, &vb, block_len, seq_len, &p, &mut got).unwrap();
                    let ctx = format!("{isa:?} {par:?} chunk {chunk:?}");
                    assert_close(&got, &want, ABS, REL, &ctx);
                    assert_close(&got, &contiguous, ABS, REL, &ctx);
                }
            }
        }
    }

    /// A sequence long enough for the automatic chunking to split it across threads.
    #[test]
    fn long_decode_splits_and_merges() {
        let p = params(8, 2, 64, None);
        let (seq_len, block_len) = (1000, 48);
        let kv_stride = 2 * 64;
        let q = random_vec(11, 8 * 64, 2.0);
        let k = random_vec(12, seq_len * kv_stride, 2.0);
        let v = random_vec(13, seq_len * kv_stride, 1.0);
        let (kb, vb) = (to_blocks(&k, kv_stride, block_len, 0), to_blocks(&v, kv_stride, block_len, 0));
        let mut want = vec![0f32; q.len()];
        reference::attention_decode(&q, &refs(&kb), &refs(&vb), block_len, seq_len, &p, &mut want).unwrap();
        for isa in Isa::available() {
            let mut got = vec![0f32; q.len()];
            attention_decode_with(isa, Par::Always, None, &q, &refs(&kb), &refs(&vb), block_len, seq_len, &p, &mut got)
                .unwrap();
            assert_close(&got, &want, ABS, REL, &format!("{isa:?}"));
        }
    }
}
