//! Causal multi-head attention on the CPU (fast versions): contiguous keys for prefill and
//! chunked prefill, a paged KV cache for decode. Grouped-query attention (and multi-query, its
//! limit) is native: query head `h` reads KV head `h / group` of each key row.
//!
//! The unit of work is a block of query tokens (all their heads) over a range of keys, in the
//! manner of flash attention: the keys go by in tiles of [`KEY_TILE`] whole rows
//! (`[n_kv_heads, head_dim]` per token, contiguous in memory, so the hardware prefetchers stream
//! them), each tile read once for the whole query block while it sits in cache. Per tile: the
//! scaled dot products, four keys at a time (vector `dot4`), masked; per (token, head) row an
//! online-softmax update of the running maximum and sum, rescaling the accumulator when the
//! maximum grows; then the values accumulated four rows at a time (`axpy4`). Prefill divides by
//! the sums at the end. Decode splits the sequence into chunks of keys, one unit each with a
//! single query, and merges the chunks with the same rule
//! (`out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c`), flash-decoding style, so a single
//! sequence keeps every thread busy. Units run on rayon's threads when the work pays for it.
//! With AVX-512 and a head dim of 64 or 128, a decode unit runs one fused kernel instead
//! (`decode_avx512`: sixteen keys per step, scores summed by a transposing shuffle tree, the
//! head's output in registers), without the per-call overhead of the small vector primitives.
//! Prefill units with AVX-512 and a head dim of 64 or 128 transpose each key tile once
//! (`[n_kv_heads, head_dim, KEY_TILE]`) and compute a row's scores as sixteen-key vectors, one
//! FMA per dimension and vector, then accumulate the values with the row's output in registers,
//! heads outside and rows inside so that a KV head's part of the tile stays in L1, two heads of
//! the same KV head at a time sharing each load (`prefill_avx512`); at 1,024 prompt tokens that
//! made SmolLM2's prefill about 20% faster and TinyLlama's about 10%.
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
/// Keys per tile: a tile's key and value rows stay in cache while every query row of a unit uses
/// them. A multiple of 4.
const KEY_TILE: usize = 64;
/// Query tokens per prefill unit, at most.
const MAX_QUERY_BLOCK: usize = 16;
/// Prefill aims for this many units of work per thread, for balance.
const PREFILL_UNITS_PER_THREAD: usize = 4;
/// The shortest key chunk decode splits a sequence into.
const MIN_DECODE_CHUNK: usize = 64;
/// The shortest key chunk inside a decode team ([`super::with_team`]), whose threads are already
/// running: splitting short sequences then costs little more than the merge.
const MIN_TEAM_DECODE_CHUNK: usize = 16;
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
    attention_with(isa(), Par::Auto, None, q, k, v, q_pos0, p, out)
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

/// [`attention`] on a given ISA and threading choice, with query blocks of `block` tokens (or
/// an automatic size when `None`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_with(
    isa: Isa,
    par: Par,
    block: Option<usize>,
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
    let (hd, q_stride, kv_stride) = (p.head_dim, p.n_heads * p.head_dim, p.n_kv_heads * p.head_dim);
    // The visible keys average at most about tk per query.
    let work = tq.saturating_mul(p.n_heads).saturating_mul(tk.min(p.sliding_window.unwrap_or(tk))).saturating_mul(hd);
    let parallel = tq > 1 && par.decide(work, PAR_MIN_WORK);
    let block = match block {
        Some(b) => b.clamp(1, tq),
        None if parallel => {
            tq.div_ceil(PREFILL_UNITS_PER_THREAD * rayon::current_num_threads()).clamp(1, MAX_QUERY_BLOCK)
        }
        None => tq.min(MAX_QUERY_BLOCK),
    };
    let unit = |scratch: &mut Scratch, (u, out): (usize, &mut [f32])| {
        let t0 = u * block;
        let bq = out.len() / q_stride;
        let (i0, i_last) = (q_pos0 + t0, q_pos0 + t0 + bq - 1);
        let visible = |b: usize| p.first_visible(i0 + b)..i0 + b + 1;
        let keys = p.first_visible(i0)..i_last + 1;
        let q = &q[t0 * q_stride..][..bq * q_stride];
        let key = |j: usize| &k[j * kv_stride..][..kv_stride];
        let value = |j: usize| &v[j * kv_stride..][..kv_stride];
        attend(isa, q, p, visible, keys, key, value, scratch, out);
        for (o, sum) in out.chunks_exact_mut(hd).zip(&scratch.sum) {
            vec::scale(isa, o, 1.0 / sum);
        }
    };
    if parallel && tq > block {
        out.par_chunks_mut(block * q_stride).enumerate().for_each_init(Scratch::default, unit);
    } else {
        let mut scratch = Scratch::default();
        out.chunks_mut(block * q_stride).enumerate().for_each(|item| unit(&mut scratch, item));
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
    let (hd, n_heads) = (p.head_dim, p.n_heads);
    let kv_stride = p.n_kv_heads * hd;
    let first = p.first_visible(seq_len - 1);
    let n_vis = seq_len - first;
    let parallel = par.decide(n_heads.saturating_mul(n_vis).saturating_mul(hd), PAR_MIN_WORK);
    let chunk = match chunk {
        Some(c) => c.clamp(1, n_vis),
        None if parallel => {
            let wanted = DECODE_UNITS_PER_THREAD * rayon::current_num_threads();
            let min_chunk = if super::in_team() { MIN_TEAM_DECODE_CHUNK } else { MIN_DECODE_CHUNK };
            n_vis.div_ceil(wanted.min(n_vis.div_ceil(min_chunk)).max(1))
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
        // With a head dim of 64 or 128, one fused kernel: AVX-512's, else AVX2's.
        #[cfg(target_arch = "x86_64")]
        if isa >= Isa::Avx2 && matches!(hd, 64 | 128) {
            let krow: Vec<*const f32> = keys.clone().map(|j| key(j).as_ptr()).collect();
            let vrow: Vec<*const f32> = keys.clone().map(|j| value(j).as_ptr()).collect();
            let (max, sum) = stats.split_at_mut(n_heads);
            // SAFETY: `isa` is at most what the CPU supports (checked by `vec::usable`), so
            // AVX-512 F, or AVX2 and FMA, are there; `q` and `acc` hold `n_heads` heads of `hd`
            // and every key and value row `n_kv_heads` heads (checked by `check_decode`).
            unsafe {
                match (isa >= Isa::Avx512, hd) {
                    (true, 64) => decode_avx512::attend_one::<4>(q, p, &krow, &vrow, acc, max, sum),
                    (true, _) => decode_avx512::attend_one::<8>(q, p, &krow, &vrow, acc, max, sum),
                    (false, 64) => decode_avx2::attend_one::<8>(q, p, &krow, &vrow, acc, max, sum),
                    (false, _) => decode_avx2::attend_one::<16>(q, p, &krow, &vrow, acc, max, sum),
                }
            }
            return;
        }
        attend(isa, q, p, |_| keys.clone(), keys.clone(), key, value, scratch, acc);
        stats[..n_heads].copy_from_slice(&scratch.max);
        stats[n_heads..].copy_from_slice(&scratch.sum);
    };
    if parallel && n_chunks > 1 {
        super::team::for_each_chunk_mut(&mut parts, part_len, |c, part| unit(&mut Scratch::default(), (c, part)));
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

/// The key and value rows of a decode kernel's next step, fetched into L2 a share per head
/// while the step computes (`decode_avx512`, `decode_avx2`): every cache line of the rows, the
/// keys' first, split evenly among the heads in order.
#[cfg(target_arch = "x86_64")]
struct StepPrefetch<'a> {
    krow: &'a [*const f32],
    vrow: &'a [*const f32],
    /// The step's first key.
    ahead: usize,
    /// Its keys (those there are).
    rows: usize,
    /// Cache lines per row.
    lines_per_row: usize,
    /// The next line to fetch: its row (keys first, then values) and line.
    row: usize,
    line: usize,
}

#[cfg(target_arch = "x86_64")]
impl<'a> StepPrefetch<'a> {
    /// The step of up to `step` keys from `ahead` (none past the last row), rows of
    /// `lines_per_row` cache lines.
    fn new(
        krow: &'a [*const f32],
        vrow: &'a [*const f32],
        ahead: usize,
        step: usize,
        lines_per_row: usize,
    ) -> StepPrefetch<'a> {
        let rows = krow.len().saturating_sub(ahead).min(step);
        StepPrefetch { krow, vrow, ahead, rows, lines_per_row, row: 0, line: 0 }
    }

    /// Fetches head `h`'s share of the lines (of `n_heads` shares).
    #[inline]
    fn share(&mut self, h: usize, n_heads: usize) {
        let total = 2 * self.rows * self.lines_per_row;
        for _ in total * h / n_heads..total * (h + 1) / n_heads {
            let row = if self.row < self.rows {
                self.krow[self.ahead + self.row]
            } else {
                self.vrow[self.ahead + self.row - self.rows]
            };
            // SAFETY: an address inside the row (`self.line` below its lines; the caller's rows
            // hold `lines_per_row` lines of 16 floats at most past their start, rounded up),
            // computed without dereferencing; a prefetch reads nothing architecturally and cannot
            // fault.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                    row.wrapping_add(16 * self.line).cast(),
                )
            };
            self.line += 1;
            if self.line == self.lines_per_row {
                (self.row, self.line) = (self.row + 1, 0);
            }
        }
    }
}

/// Decode attention of one query over a run of keys with AVX-512, for head dims of 64 and 128:
/// sixteen keys at a time and, for each, every head: the dot products summed into one vector of
/// scores by a transposing tree of shuffles, the online softmax on that vector, and the value
/// rows accumulated into the head's output. The same sums as [`attend`] (which serves every other
/// case) in another order, without its calls per four keys and head.
///
/// Steps outside and heads inside, so that a step's rows (every KV head of sixteen tokens) are
/// read from memory once and serve all the heads from L1, while the next step's rows are
/// prefetched into L2. With the heads outside, each KV head's pass read its part of every row,
/// strided, and a cache evicted by the weights (a decode step streams them all between two
/// visits of a layer) came in a few lines at a time: on one thread, SmolLM2's 9 heads over
/// 1,088 keys took 240 us cold against 89 hot (`examples/decode_attention.rs`), now 150.
#[cfg(target_arch = "x86_64")]
mod decode_avx512 {
    use std::arch::x86_64::*;

    use super::AttentionParams;
    use crate::cpu::vec::avx512::exp;

    /// Leaves, for every head `h` of the single query `q` (`[n_heads, 16 * NV]`) over the keys
    /// whose rows start at `krow` and `vrow` (all visible): `acc[h] = sum_j exp(s_hj - max_h)
    /// v_j`, `max[h]` and `sum[h] = sum_j exp(s_hj - max_h)`, with `s_hj = scale * q_h.k_j` and
    /// query head `h` reading KV head `h / group`, as `attend` leaves them in its scratch. What
    /// `acc`, `max` and `sum` held before is overwritten, never read.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F; `p.head_dim` must be `16 * NV`; `q` and `acc` must hold
    /// `n_heads * head_dim` floats, `max` and `sum` `n_heads`, and every `krow[j]` and `vrow[j]`
    /// point at `n_kv_heads * head_dim` readable floats; `krow` must not be empty and be as long
    /// as `vrow`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attend_one<const NV: usize>(
        q: &[f32],
        p: &AttentionParams,
        krow: &[*const f32],
        vrow: &[*const f32],
        acc: &mut [f32],
        max: &mut [f32],
        sum: &mut [f32],
    ) {
        let (hd, n_heads, group) = (p.head_dim, p.n_heads, p.n_heads / p.n_kv_heads);
        debug_assert!(hd == 16 * NV && !krow.is_empty() && krow.len() == vrow.len());
        debug_assert!(q.len() >= n_heads * hd && acc.len() >= n_heads * hd && max.len() >= n_heads);
        // Where the transposing tree leaves key u's score (see `scores`).
        let order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
        let scale = _mm512_set1_ps(p.scale);
        let n_keys = krow.len();
        // Cache lines of a key or value row (16 floats a line).
        let lines_per_row = (p.n_kv_heads * hd).div_ceil(16);
        let mut j = 0;
        while j < n_keys {
            let n = (n_keys - j).min(16);
            let valid: __mmask16 = if n == 16 { 0xffff } else { ((1u32 << n) - 1) as u16 };
            // Rows past the run's end repeat its last row; their scores are masked.
            let kbase: [*const f32; 16] = std::array::from_fn(|u| krow[j + u.min(n - 1)]);
            // The next step's key and value rows, whole, fetched into L2 a share per head while
            // this step computes.
            let mut fetch = super::StepPrefetch::new(krow, vrow, j + n, 16, lines_per_row);
            for h in 0..n_heads {
                let off = h / group * hd;
                fetch.share(h, n_heads);
                // SAFETY (the whole body): loads read `NV` vectors at `q[h * hd..]` and at
                // `off..off + hd` of key and value rows (`off + hd <= n_kv_heads * hd`), the
                // loads and stores of the output `acc[h * hd..][..hd]`: all inside what the
                // caller vouches for.
                unsafe {
                    let qv: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(q.as_ptr().add(h * hd + 16 * v)));
                    let mut d = [_mm512_setzero_ps(); 16];
                    for (v, &qv) in qv.iter().enumerate() {
                        for (d, row) in d.iter_mut().zip(&kbase) {
                            *d = _mm512_fmadd_ps(qv, _mm512_loadu_ps(row.add(off + 16 * v)), *d);
                        }
                    }
                    let s = _mm512_mask_mov_ps(
                        _mm512_set1_ps(f32::NEG_INFINITY),
                        valid,
                        _mm512_mul_ps(scores(d, order), scale),
                    );
                    // Before the first step nothing is accumulated (and `acc`, `max` and `sum`
                    // hold whatever they held).
                    let m = if j == 0 { f32::NEG_INFINITY } else { max[h] };
                    let new_m = m.max(_mm512_reduce_max_ps(s));
                    let c = if new_m == m { 1.0 } else { (m - new_m).exp() };
                    let pr = _mm512_maskz_mov_ps(valid, exp(_mm512_sub_ps(s, _mm512_set1_ps(new_m))));
                    let l = if j == 0 { 0.0 } else { sum[h] };
                    sum[h] = l * c + _mm512_reduce_add_ps(pr);
                    max[h] = new_m;
                    let out = acc.as_mut_ptr().add(h * hd);
                    let mut a: [__m512; NV] = std::array::from_fn(|v| {
                        if j == 0 { _mm512_setzero_ps() } else { _mm512_loadu_ps(out.add(16 * v)) }
                    });
                    if c != 1.0 {
                        let cv = _mm512_set1_ps(c);
                        for a in a.iter_mut() {
                            *a = _mm512_mul_ps(*a, cv);
                        }
                    }
                    let mut probs = [0f32; 16];
                    _mm512_storeu_ps(probs.as_mut_ptr(), pr);
                    for (u, &pu) in probs.iter().enumerate().take(n) {
                        let row = vrow[j + u].add(off);
                        let b = _mm512_set1_ps(pu);
                        for (v, a) in a.iter_mut().enumerate() {
                            *a = _mm512_fmadd_ps(b, _mm512_loadu_ps(row.add(16 * v)), *a);
                        }
                    }
                    for (v, a) in a.iter().enumerate() {
                        _mm512_storeu_ps(out.add(16 * v), *a);
                    }
                }
            }
            j += n;
        }
    }

    /// The sixteen horizontal sums of `d`, as one vector in the order `order` undoes: each step
    /// adds two vectors' halves (256, then 128, 64 and 32 bits) so that one vector holds the
    /// partial sums of twice as many rows. After the 256-bit step `a[r]` holds rows r and r + 8;
    /// after the 128-bit step 128-bit lane l of `b[r]` holds row r + [0, 8, 4, 12][l]; the last
    /// two steps leave lane l holding rows base_l + [0, 2, 1, 3].
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn scores(d: [__m512; 16], order: __m512i) -> __m512 {
        let a: [__m512; 8] = std::array::from_fn(|r| {
            let (x, y) = (d[r], d[r + 8]);
            _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(x, y), _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y))
        });
        let b: [__m512; 4] = std::array::from_fn(|r| {
            let (x, y) = (a[r], a[r + 4]);
            _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(x, y), _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y))
        });
        let c: [__m512; 2] = std::array::from_fn(|r| {
            let (x, y) = (b[r], b[r + 2]);
            _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(x, y), _mm512_shuffle_ps::<0b11_10_11_10>(x, y))
        });
        let (x, y) = (c[0], c[1]);
        let e = _mm512_add_ps(_mm512_shuffle_ps::<0b10_00_10_00>(x, y), _mm512_shuffle_ps::<0b11_01_11_01>(x, y));
        _mm512_permutexvar_ps(order, e)
    }
}

/// Decode attention of one query over a run of keys with AVX2 and FMA, for head dims of 64 and
/// 128: [`decode_avx512`]'s steps-outside, heads-inside order eight keys at a time. A step's
/// eight scores of a head come out of one transposing tree of horizontal adds; the head's output
/// is accumulated eight vectors at a time (all of a 64-wide head, half of a 128-wide one: AVX2
/// has sixteen vector registers), every value row of the step read from L1.
///
/// On an AVX2 machine (2 threads, SmolLM2's 9 heads over 3,072 keys, the cache cold as in a
/// decode step), the per-call `dot4`/`axpy4` path of [`attend`] read keys and values at 3.7 GB/s
/// against 11.9 GB/s for a plain sum of the same memory (`examples/decode_attention.rs`).
#[cfg(target_arch = "x86_64")]
mod decode_avx2 {
    use std::arch::x86_64::*;

    use super::AttentionParams;
    use crate::cpu::vec::avx2::{exp, hmax, hsum};

    /// [`super::decode_avx512::attend_one`] with AVX2: for every head `h` of the single query
    /// `q` (`[n_heads, 8 * NV]`) over the keys whose rows start at `krow` and `vrow` (all
    /// visible), `acc[h] = sum_j exp(s_hj - max_h) v_j`, `max[h]` and `sum[h] = sum_j exp(s_hj
    /// - max_h)`, with `s_hj = scale * q_h.k_j` and query head `h` reading KV head `h / group`.
    /// What `acc`, `max` and `sum` held before is overwritten, never read.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `p.head_dim` must be `8 * NV` with `NV` a multiple of
    /// 8; `q` and `acc` must hold `n_heads * head_dim` floats, `max` and `sum` `n_heads`, and
    /// every `krow[j]` and `vrow[j]` point at `n_kv_heads * head_dim` readable floats; `krow`
    /// must not be empty and be as long as `vrow`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn attend_one<const NV: usize>(
        q: &[f32],
        p: &AttentionParams,
        krow: &[*const f32],
        vrow: &[*const f32],
        acc: &mut [f32],
        max: &mut [f32],
        sum: &mut [f32],
    ) {
        let (hd, n_heads, group) = (p.head_dim, p.n_heads, p.n_heads / p.n_kv_heads);
        debug_assert!(hd == 8 * NV && NV.is_multiple_of(8) && !krow.is_empty() && krow.len() == vrow.len());
        debug_assert!(q.len() >= n_heads * hd && acc.len() >= n_heads * hd && max.len() >= n_heads);
        let scale = _mm256_set1_ps(p.scale);
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let n_keys = krow.len();
        // Cache lines of a key or value row (16 floats a line).
        let lines_per_row = (p.n_kv_heads * hd).div_ceil(16);
        let mut j = 0;
        while j < n_keys {
            let n = (n_keys - j).min(8);
            let valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane));
            // Rows past the run's end repeat its last row; their scores are masked.
            let kbase: [*const f32; 8] = std::array::from_fn(|u| krow[j + u.min(n - 1)]);
            // The next step's key and value rows, whole, fetched into L2 a share per head while
            // this step computes.
            let mut fetch = super::StepPrefetch::new(krow, vrow, j + n, 8, lines_per_row);
            for h in 0..n_heads {
                let off = h / group * hd;
                fetch.share(h, n_heads);
                // SAFETY (the whole body): loads read vectors at `q[h * hd..][..hd]` and at
                // `off..off + hd` of key and value rows (`off + hd <= n_kv_heads * hd`), the
                // loads and stores of the output `acc[h * hd..][..hd]`: all inside what the
                // caller vouches for.
                unsafe {
                    let qh = q.as_ptr().add(h * hd);
                    let mut d = [_mm256_setzero_ps(); 8];
                    for v in 0..NV {
                        let qv = _mm256_loadu_ps(qh.add(8 * v));
                        for (d, row) in d.iter_mut().zip(&kbase) {
                            *d = _mm256_fmadd_ps(qv, _mm256_loadu_ps(row.add(off + 8 * v)), *d);
                        }
                    }
                    let s = _mm256_blendv_ps(_mm256_set1_ps(f32::NEG_INFINITY), _mm256_mul_ps(scores(d), scale), valid);
                    // Before the first step nothing is accumulated (and `acc`, `max` and `sum`
                    // hold whatever they held).
                    let m = if j == 0 { f32::NEG_INFINITY } else { max[h] };
                    let new_m = m.max(hmax(s));
                    let c = if new_m == m { 1.0 } else { (m - new_m).exp() };
                    let pr = _mm256_and_ps(valid, exp(_mm256_sub_ps(s, _mm256_set1_ps(new_m))));
                    let l = if j == 0 { 0.0 } else { sum[h] };
                    sum[h] = l * c + hsum(pr);
                    max[h] = new_m;
                    let mut probs = [0f32; 8];
                    _mm256_storeu_ps(probs.as_mut_ptr(), pr);
                    let out = acc.as_mut_ptr().add(h * hd);
                    // Eight vectors of the head's output at a time, in registers.
                    for g in (0..NV).step_by(8) {
                        let mut a: [__m256; 8] = std::array::from_fn(|v| {
                            if j == 0 { _mm256_setzero_ps() } else { _mm256_loadu_ps(out.add(8 * (g + v))) }
                        });
                        if c != 1.0 {
                            let cv = _mm256_set1_ps(c);
                            for a in a.iter_mut() {
                                *a = _mm256_mul_ps(*a, cv);
                            }
                        }
                        for (u, &pu) in probs.iter().enumerate().take(n) {
                            let row = vrow[j + u].add(off + 8 * g);
                            let b = _mm256_set1_ps(pu);
                            for (v, a) in a.iter_mut().enumerate() {
                                *a = _mm256_fmadd_ps(b, _mm256_loadu_ps(row.add(8 * v)), *a);
                            }
                        }
                        for (v, a) in a.iter().enumerate() {
                            _mm256_storeu_ps(out.add(8 * (g + v)), *a);
                        }
                    }
                }
            }
            j += n;
        }
    }

    /// The eight horizontal sums of `d`, lane `u` holding `d[u]`'s: two rounds of horizontal
    /// adds leave each 128-bit half of `x` holding (its half of) rows 0-3 and of `y` rows 4-7;
    /// the halves are then added across.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn scores(d: [__m256; 8]) -> __m256 {
        let x = _mm256_hadd_ps(_mm256_hadd_ps(d[0], d[1]), _mm256_hadd_ps(d[2], d[3]));
        let y = _mm256_hadd_ps(_mm256_hadd_ps(d[4], d[5]), _mm256_hadd_ps(d[6], d[7]));
        _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(x, y), _mm256_permute2f128_ps::<0x31>(x, y))
    }
}

/// The AVX2 parts of [`attend`] for head dims of 64 and 128: [`prefill_avx512`]'s kernels with
/// eight-lane vectors. AVX2 has sixteen vector registers, so each works on `G` vectors of
/// accumulators per row at a time (eight in all: `G = 8 / R` for `R` rows), passing over its
/// inputs (from L1) once per group.
#[cfg(target_arch = "x86_64")]
mod prefill_avx2 {
    use std::arch::x86_64::*;

    use super::KEY_TILE;

    /// [`super::prefill_avx512::scores`] with AVX2: `s[i][u] = scale * q[i].k_u` for `R` query
    /// rows and the `tn` keys of a tile transposed into `kt` (`[head_dim, KEY_TILE]`, zero past
    /// `tn`), eight keys per vector, `G` vectors of keys at a time; `s[i][tn..]` gets the zero
    /// keys' scores, which the caller never uses.
    ///
    /// # Safety
    /// AVX2 and FMA; `R * G <= 8`; every `q[i]` of the same length `hd`, `kt.len() >= hd *
    /// KEY_TILE`, every `s[i].len() >= KEY_TILE`, `tn <= KEY_TILE`.
    // `d`, `v` and `i` index several arrays at once, so ranges read better than iterators.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scores<const R: usize, const G: usize>(
        q: [&[f32]; R],
        kt: &[f32],
        scale: f32,
        tn: usize,
        s: [&mut [f32]; R],
    ) {
        let hd = q[0].len();
        debug_assert!(R * G <= 8 && kt.len() >= hd * KEY_TILE && tn <= KEY_TILE);
        debug_assert!(q.iter().all(|q| q.len() == hd) && s.iter().all(|s| s.len() >= KEY_TILE));
        let vecs = tn.div_ceil(8);
        let kt = kt.as_ptr();
        let scale = _mm256_set1_ps(scale);
        for v0 in (0..vecs).step_by(G) {
            let n = G.min(vecs - v0);
            let mut acc = [[_mm256_setzero_ps(); G]; R];
            for d in 0..hd {
                let b: [__m256; R] = std::array::from_fn(|i| _mm256_set1_ps(q[i][d]));
                for v in 0..n {
                    // SAFETY: `d * KEY_TILE + 8 * (v0 + v) + 8 <= hd * KEY_TILE <= kt.len()`.
                    let k = unsafe { _mm256_loadu_ps(kt.add(d * KEY_TILE + 8 * (v0 + v))) };
                    for i in 0..R {
                        acc[i][v] = _mm256_fmadd_ps(b[i], k, acc[i][v]);
                    }
                }
            }
            for i in 0..R {
                for v in 0..n {
                    // SAFETY: `8 * (v0 + v) + 8 <= KEY_TILE <= s[i].len()`.
                    unsafe { _mm256_storeu_ps(s[i].as_mut_ptr().add(8 * (v0 + v)), _mm256_mul_ps(acc[i][v], scale)) };
                }
            }
        }
    }

    /// Writes eight key rows (of a length that is a multiple of 8) into columns `u0 .. u0 + 8` of
    /// the transposed tile `kt` (`[rows' length, KEY_TILE]`): element `e` of row `u` to
    /// `kt[e * KEY_TILE + u0 + u]`, by 8 x 8 transposes in registers.
    ///
    /// # Safety
    /// AVX2; every row of the same length `n`, a multiple of 8; `kt.len() >= n * KEY_TILE`;
    /// `u0 + 8 <= KEY_TILE`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn transpose_rows(rows: [&[f32]; 8], kt: &mut [f32], u0: usize) {
        let n = rows[0].len();
        debug_assert!(n.is_multiple_of(8) && rows.iter().all(|r| r.len() == n));
        debug_assert!(kt.len() >= n * KEY_TILE && u0 + 8 <= KEY_TILE);
        for e0 in (0..n).step_by(8) {
            // SAFETY: `e0 + 8 <= n` floats of each row; the stores write `kt[(e0 + i) * KEY_TILE
            // + u0..][..8]`, inside `n * KEY_TILE` since `u0 + 8 <= KEY_TILE`.
            unsafe {
                let r: [__m256; 8] = std::array::from_fn(|u| _mm256_loadu_ps(rows[u].as_ptr().add(e0)));
                // Pairs of rows interleaved, then pairs of pairs: each 128-bit half of `b[i]`
                // holds column (i, or i + 4 in the high half) of four rows.
                let a: [__m256; 8] = std::array::from_fn(|i| {
                    let (x, y) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
                    if i % 2 == 0 { _mm256_unpacklo_ps(x, y) } else { _mm256_unpackhi_ps(x, y) }
                });
                // a[0] = lo(r0, r1), a[1] = hi(r0, r1), a[2] = lo(r2, r3), a[3] = hi(r2, r3), a[4..8]
                // the same of r4..r7.
                let b = [
                    _mm256_shuffle_ps::<0x44>(a[0], a[2]),
                    _mm256_shuffle_ps::<0xEE>(a[0], a[2]),
                    _mm256_shuffle_ps::<0x44>(a[1], a[3]),
                    _mm256_shuffle_ps::<0xEE>(a[1], a[3]),
                    _mm256_shuffle_ps::<0x44>(a[4], a[6]),
                    _mm256_shuffle_ps::<0xEE>(a[4], a[6]),
                    _mm256_shuffle_ps::<0x44>(a[5], a[7]),
                    _mm256_shuffle_ps::<0xEE>(a[5], a[7]),
                ];
                let out = kt.as_mut_ptr().add(e0 * KEY_TILE + u0);
                for i in 0..4 {
                    _mm256_storeu_ps(out.add(i * KEY_TILE), _mm256_permute2f128_ps::<0x20>(b[i], b[i + 4]));
                    _mm256_storeu_ps(out.add((i + 4) * KEY_TILE), _mm256_permute2f128_ps::<0x31>(b[i], b[i + 4]));
                }
            }
        }
    }

    /// [`super::prefill_avx512::values`] with AVX2: `a[i] += sum_u p[i][u] * rows[u][off..off +
    /// hd]` for `R` rows of the same KV head, `G` vectors of each output in registers at a time,
    /// each load of a value row used for the `R` rows.
    ///
    /// # Safety
    /// AVX2 and FMA; `R * G <= 8`; every `a[i]` of the same length, a multiple of `8 * G`; every
    /// `rows[u]` points at `off + a[i].len()` readable floats; every `p[i]` as long as `rows`.
    // `v` and `i` index several arrays at once, so ranges read better than iterators.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn values<const R: usize, const G: usize>(
        p: [&[f32]; R],
        rows: &[*const f32],
        off: usize,
        a: [&mut [f32]; R],
    ) {
        let hd = a[0].len();
        debug_assert!(R * G <= 8 && hd.is_multiple_of(8 * G) && a.iter().all(|x| x.len() == hd));
        debug_assert!(p.iter().all(|p| p.len() == rows.len()));
        for g in (0..hd / 8).step_by(G) {
            // SAFETY: every `a[i]` holds `hd` floats and every row `off + hd` (the caller), and
            // `8 * (g + v) + 8 <= hd`.
            unsafe {
                let mut acc: [[__m256; G]; R] =
                    std::array::from_fn(|i| std::array::from_fn(|v| _mm256_loadu_ps(a[i].as_ptr().add(8 * (g + v)))));
                for (u, &row) in rows.iter().enumerate() {
                    let b: [__m256; R] = std::array::from_fn(|i| _mm256_set1_ps(p[i][u]));
                    for v in 0..G {
                        let x = _mm256_loadu_ps(row.add(off + 8 * (g + v)));
                        for i in 0..R {
                            acc[i][v] = _mm256_fmadd_ps(b[i], x, acc[i][v]);
                        }
                    }
                }
                for i in 0..R {
                    for v in 0..G {
                        _mm256_storeu_ps(a[i].as_mut_ptr().add(8 * (g + v)), acc[i][v]);
                    }
                }
            }
        }
    }
}

/// The AVX-512 parts of [`attend`] for head dims of 64 and 128.
#[cfg(target_arch = "x86_64")]
mod prefill_avx512 {
    use std::arch::x86_64::*;

    use super::KEY_TILE;

    /// The query heads in runs of two sharing a KV head where they can (`group` heads to a KV
    /// head), else alone: `(first head, whether a second follows)`.
    pub(super) fn head_runs(n_heads: usize, group: usize) -> impl Iterator<Item = (usize, bool)> {
        let mut h = 0;
        std::iter::from_fn(move || {
            (h < n_heads).then(|| {
                let pair = h + 1 < n_heads && (h + 1) / group == h / group;
                let run = (h, pair);
                h += 1 + usize::from(pair);
                run
            })
        })
    }

    /// `s[i][u] = scale * q[i].k_u` for `R` query rows (of one KV head) and the `tn` keys of a
    /// tile transposed into `kt` (`[head_dim, KEY_TILE]`, zero past `tn`), sixteen keys per
    /// vector, each load of `kt` used for the `R` rows; `s[i][tn..]` gets the zero keys' scores,
    /// which the caller never uses.
    ///
    /// # Safety
    /// AVX-512 F; every `q[i]` of the same length `hd`, `kt.len() >= hd * KEY_TILE`, every
    /// `s[i].len() >= KEY_TILE`, `tn <= KEY_TILE`.
    // `d`, `v` and `i` index several arrays at once, so ranges read better than iterators.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scores<const R: usize>(q: [&[f32]; R], kt: &[f32], scale: f32, tn: usize, s: [&mut [f32]; R]) {
        const V: usize = KEY_TILE / 16;
        let hd = q[0].len();
        debug_assert!(kt.len() >= hd * KEY_TILE && tn <= KEY_TILE);
        debug_assert!(q.iter().all(|q| q.len() == hd) && s.iter().all(|s| s.len() >= KEY_TILE));
        let vecs = tn.div_ceil(16);
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let kt = kt.as_ptr();
        for d in 0..hd {
            let b: [__m512; R] = std::array::from_fn(|i| _mm512_set1_ps(q[i][d]));
            for v in 0..vecs {
                // SAFETY: `d * KEY_TILE + 16 * v + 16 <= hd * KEY_TILE <= kt.len()`.
                let k = unsafe { _mm512_loadu_ps(kt.add(d * KEY_TILE + 16 * v)) };
                for i in 0..R {
                    acc[i][v] = _mm512_fmadd_ps(b[i], k, acc[i][v]);
                }
            }
        }
        let scale = _mm512_set1_ps(scale);
        for (acc, s) in acc.iter().zip(s) {
            for (v, a) in acc.iter().enumerate().take(vecs) {
                // SAFETY: `16 * v + 16 <= KEY_TILE <= s.len()`.
                unsafe { _mm512_storeu_ps(s.as_mut_ptr().add(16 * v), _mm512_mul_ps(*a, scale)) };
            }
        }
    }

    /// `a[i] += sum_u p[i][u] * rows[u][off..off + hd]` for `R` rows of the same KV head, the
    /// outputs held in registers and each load of a value row used for the `R` rows.
    ///
    /// # Safety
    /// AVX-512 F; every `a[i]` of the same length, 64 or 128; every `rows[u]` points at
    /// `off + a[i].len()` readable floats; every `p[i]` as long as `rows`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn values<const R: usize>(p: [&[f32]; R], rows: &[*const f32], off: usize, a: [&mut [f32]; R]) {
        debug_assert!(p.iter().all(|p| p.len() == rows.len()) && matches!(a[0].len(), 64 | 128));
        debug_assert!(a.iter().all(|x| x.len() == a[0].len()));
        // SAFETY: forwarded.
        unsafe { if a[0].len() == 64 { values_n::<R, 4>(p, rows, off, a) } else { values_n::<R, 8>(p, rows, off, a) } }
    }

    /// [`values`] for outputs of `16 * NV` floats.
    ///
    /// # Safety
    /// As [`values`].
    // `v` and `i` index several arrays at once, so ranges read better than iterators.
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn values_n<const R: usize, const NV: usize>(
        p: [&[f32]; R],
        rows: &[*const f32],
        off: usize,
        a: [&mut [f32]; R],
    ) {
        // SAFETY: every `a[i]` holds `16 * NV` floats and every row `off + 16 * NV` (the caller).
        unsafe {
            let mut acc: [[__m512; NV]; R] =
                std::array::from_fn(|i| std::array::from_fn(|v| _mm512_loadu_ps(a[i].as_ptr().add(16 * v))));
            for (u, &row) in rows.iter().enumerate() {
                let b: [__m512; R] = std::array::from_fn(|i| _mm512_set1_ps(p[i][u]));
                for v in 0..NV {
                    let x = _mm512_loadu_ps(row.add(off + 16 * v));
                    for i in 0..R {
                        acc[i][v] = _mm512_fmadd_ps(b[i], x, acc[i][v]);
                    }
                }
            }
            for (acc, a) in acc.iter().zip(a) {
                for (v, x) in acc.iter().enumerate() {
                    _mm512_storeu_ps(a.as_mut_ptr().add(16 * v), *x);
                }
            }
        }
    }
}

/// Per-thread buffers of [`attend`].
#[derive(Default)]
struct Scratch {
    /// Scores of the current key tile, `[rows, KEY_TILE]`, then `exp(score - max)`.
    scores: Vec<f32>,
    /// Per row (query token, head): the running maximum score.
    max: Vec<f32>,
    /// Per row: the running sum of `exp(score - max)`.
    sum: Vec<f32>,
    /// Per query token of the block: the part of the current tile it sees, and that part
    /// widened to whole groups of four keys (clamped to the tile), relative to the tile start.
    spans: Vec<Option<(Range<usize>, Range<usize>)>>,
    /// The key tile transposed for the AVX-512 path: `[n_kv_heads, head_dim, KEY_TILE]`.
    keys_t: Vec<f32>,
}

/// Which tiled kernels a prefill unit runs ([`attend`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tiled {
    /// None: the generic four-key steps.
    No,
    /// `prefill_avx2`'s, eight keys a vector.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    /// `prefill_avx512`'s, sixteen keys a vector.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx512,
}

/// Unnormalised attention of a block of query tokens `q` (`[bq, n_heads, head_dim]`) over the
/// key positions `keys`, token `b` seeing the positions `visible(b)` (non-empty, inside `keys`).
/// `key(j)` and `value(j)` give position `j`'s row (`[n_kv_heads, head_dim]`); query head `h`
/// reads KV head `h / group`.
///
/// Leaves `acc[b, h] = sum_j exp(s_bhj - max_bh) v_j` over the visible `j`, with
/// `s_bhj = scale * q_bh.k_j`, and per row `max_bh` and `sum_j exp(s_bhj - max_bh)` in
/// `scratch.max` and `scratch.sum`.
#[allow(clippy::too_many_arguments)]
fn attend<'a>(
    isa: Isa,
    q: &[f32],
    p: &AttentionParams,
    visible: impl Fn(usize) -> Range<usize>,
    keys: Range<usize>,
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    scratch: &mut Scratch,
    acc: &mut [f32],
) {
    let (hd, n_heads, group) = (p.head_dim, p.n_heads, p.n_heads / p.n_kv_heads);
    let q_stride = n_heads * hd;
    let bq = q.len() / q_stride;
    let rows = bq * n_heads;
    debug_assert!(acc.len() == q.len() && !keys.is_empty());
    let Scratch { scores, max, sum, spans, keys_t } = scratch;
    // The tiled kernels, for head dims of 64 and 128: AVX-512's, else AVX2's.
    #[cfg(target_arch = "x86_64")]
    let tiled = match (isa, matches!(hd, 64 | 128)) {
        (_, false) => Tiled::No,
        (isa, true) if isa >= Isa::Avx512 => Tiled::Avx512,
        (isa, true) if isa >= Isa::Avx2 => Tiled::Avx2,
        _ => Tiled::No,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let tiled = Tiled::No;
    scores.clear();
    scores.resize(rows * KEY_TILE, 0.0);
    max.clear();
    max.resize(rows, f32::NEG_INFINITY);
    sum.clear();
    sum.resize(rows, 0.0);
    acc.fill(0.0);

    let mut j0 = keys.start;
    while j0 < keys.end {
        let tn = KEY_TILE.min(keys.end - j0);
        spans.clear();
        spans.extend((0..bq).map(|b| {
            let vis = visible(b);
            let (lo, hi) = (vis.start.max(j0), vis.end.min(j0 + tn));
            (lo < hi).then(|| {
                let (lo, hi) = (lo - j0, hi - j0);
                (lo..hi, lo / 4 * 4..hi.next_multiple_of(4).min(tn))
            })
        }));
        let rows_of = |g0: usize| {
            spans.iter().enumerate().filter_map(move |(b, s)| s.as_ref().filter(|(_, w)| w.contains(&g0)).map(|_| b))
        };

        if tiled != Tiled::No {
            // With a head dim of 64 or 128: the tile's keys transposed once, then each row's
            // scores as vectors of sixteen (AVX-512) or eight (AVX2) keys, one FMA per
            // dimension and vector.
            #[cfg(target_arch = "x86_64")]
            {
                let kv_stride = p.n_kv_heads * hd;
                keys_t.clear();
                keys_t.resize(kv_stride * KEY_TILE, 0.0);
                // Eight rows at a time by 8 x 8 transposes (every tiled ISA has AVX2; `hd` is a
                // multiple of 8), the rest of a short tile element by element.
                let full = tn / 8 * 8;
                for u0 in (0..full).step_by(8) {
                    let rows: [&[f32]; 8] = std::array::from_fn(|u| &key(j0 + u0 + u)[..kv_stride]);
                    // SAFETY: `tiled` checked AVX2 (`isa` is at most what the CPU has); every row
                    // holds `kv_stride` floats and `keys_t` `kv_stride` rows of `KEY_TILE` with
                    // `u0 + 8 <= KEY_TILE`.
                    unsafe { prefill_avx2::transpose_rows(rows, keys_t, u0) };
                }
                for u in full..tn {
                    for (e, &x) in key(j0 + u)[..kv_stride].iter().enumerate() {
                        keys_t[e * KEY_TILE + u] = x;
                    }
                }
                // Heads outside, rows inside: a KV head's transposed keys stay in L1 for every
                // row. Two heads of the same KV head go together where they can, sharing each
                // load.
                for (h, pair) in prefill_avx512::head_runs(n_heads, group) {
                    let kt = &keys_t[h / group * hd * KEY_TILE..][..hd * KEY_TILE];
                    for (b, span) in spans.iter().enumerate() {
                        let Some((seen, wide)) = span else { continue };
                        let qh = |h: usize| &q[b * q_stride + h * hd..][..hd];
                        let row = (b * n_heads + h) * KEY_TILE;
                        let rows = &mut scores[row..][..(1 + usize::from(pair)) * KEY_TILE];
                        // SAFETY: `tiled` checked AVX-512 F, or AVX2 and FMA (`isa` is at most
                        // what the CPU has).
                        unsafe {
                            match (tiled, pair) {
                                (Tiled::Avx512, true) => {
                                    let (s0, s1) = rows.split_at_mut(KEY_TILE);
                                    prefill_avx512::scores::<2>([qh(h), qh(h + 1)], kt, p.scale, tn, [s0, s1]);
                                }
                                (Tiled::Avx512, false) => {
                                    prefill_avx512::scores::<1>([qh(h)], kt, p.scale, tn, [&mut *rows])
                                }
                                (_, true) => {
                                    let (s0, s1) = rows.split_at_mut(KEY_TILE);
                                    prefill_avx2::scores::<2, 4>([qh(h), qh(h + 1)], kt, p.scale, tn, [s0, s1]);
                                }
                                (_, false) => prefill_avx2::scores::<1, 8>([qh(h)], kt, p.scale, tn, [&mut *rows]),
                            }
                        }
                        // Only a tile the row sees part of (the diagonal, a window's edge) has
                        // scores to mask.
                        if seen != wide {
                            for s in rows.chunks_exact_mut(KEY_TILE) {
                                s[wide.start..seen.start].fill(f32::NEG_INFINITY);
                                s[seen.end..wide.end].fill(f32::NEG_INFINITY);
                            }
                        }
                    }
                }
            }
        } else {
            // Scores, key-major in groups of four so the group's key rows stay in L1 for every
            // query row that sees part of it; positions a row does not see become -inf.
            for g0 in (0..tn).step_by(4) {
                let gl = 4.min(tn - g0);
                let krows: [&[f32]; 4] = std::array::from_fn(|u| key(j0 + g0 + u.min(gl - 1)));
                for b in rows_of(g0) {
                    let (seen, _) = spans[b].as_ref().expect("filtered on spans");
                    for h in 0..n_heads {
                        let qh = &q[b * q_stride + h * hd..][..hd];
                        let off = h / group * hd;
                        let s = &mut scores[(b * n_heads + h) * KEY_TILE + g0..][..gl];
                        if gl == 4 {
                            let d = vec::dot4(isa, qh, krows.map(|r| &r[off..off + hd]));
                            for (s, d) in s.iter_mut().zip(d) {
                                *s = d * p.scale;
                            }
                        } else {
                            for (s, r) in s.iter_mut().zip(krows) {
                                *s = vec::dot(isa, qh, &r[off..off + hd]) * p.scale;
                            }
                        }
                        for (u, s) in s.iter_mut().enumerate() {
                            if !seen.contains(&(g0 + u)) {
                                *s = f32::NEG_INFINITY;
                            }
                        }
                    }
                }
            }
        }

        // Online softmax: fold the tile into each row's running maximum and sum, rescaling
        // what the row accumulated so far when its maximum grows.
        for (b, span) in spans.iter().enumerate() {
            let Some((_, wide)) = span else { continue };
            for h in 0..n_heads {
                let r = b * n_heads + h;
                let seg = &mut scores[r * KEY_TILE..][wide.clone()];
                let new_max = max[r].max(vec::max(isa, seg));
                if new_max > max[r] && sum[r] > 0.0 {
                    let c = (max[r] - new_max).exp();
                    vec::scale(isa, &mut acc[r * hd..][..hd], c);
                    sum[r] *= c;
                }
                max[r] = new_max;
                sum[r] += vec::exp_shift_sum(isa, seg, new_max);
            }
        }

        if tiled != Tiled::No {
            // Tiled: per row, the output in registers over the row's keys of the tile.
            // Heads outside, rows inside: a KV head's part of the value rows stays in L1. Two
            // heads of the same KV head go together where they can, sharing each load.
            #[cfg(target_arch = "x86_64")]
            {
                let vrows: Vec<*const f32> = (0..tn).map(|u| value(j0 + u).as_ptr()).collect();
                for (h, pair) in prefill_avx512::head_runs(n_heads, group) {
                    let off = h / group * hd;
                    for (b, span) in spans.iter().enumerate() {
                        let Some((_, wide)) = span else { continue };
                        let r = b * n_heads + h;
                        let pr = |r: usize| &scores[r * KEY_TILE..][wide.clone()];
                        let rows = &vrows[wide.clone()];
                        let (a0, a1) = acc[r * hd..].split_at_mut(hd);
                        // SAFETY: the ISA as above; every value row holds `n_kv_heads * hd`
                        // floats, so `off + hd` of them; `hd` (64 or 128) is a multiple of 32.
                        unsafe {
                            match (tiled, pair) {
                                (Tiled::Avx512, true) => {
                                    prefill_avx512::values::<2>([pr(r), pr(r + 1)], rows, off, [a0, &mut a1[..hd]])
                                }
                                (Tiled::Avx512, false) => prefill_avx512::values::<1>([pr(r)], rows, off, [a0]),
                                (_, true) => {
                                    prefill_avx2::values::<2, 4>([pr(r), pr(r + 1)], rows, off, [a0, &mut a1[..hd]])
                                }
                                (_, false) => prefill_avx2::values::<1, 8>([pr(r)], rows, off, [a0]),
                            }
                        }
                    }
                }
            }
        } else {
            // Values, four rows at a time; masked positions carry probability 0.
            for g0 in (0..tn).step_by(4) {
                let gl = 4.min(tn - g0);
                let vrows: [&[f32]; 4] = std::array::from_fn(|u| value(j0 + g0 + u.min(gl - 1)));
                for b in rows_of(g0) {
                    for h in 0..n_heads {
                        let r = b * n_heads + h;
                        let off = h / group * hd;
                        let pr = &scores[r * KEY_TILE + g0..][..gl];
                        let a = &mut acc[r * hd..][..hd];
                        if gl == 4 {
                            vec::axpy4(isa, [pr[0], pr[1], pr[2], pr[3]], vrows.map(|v| &v[off..off + hd]), a);
                        } else {
                            for (pj, v) in pr.iter().zip(vrows) {
                                vec::axpy(isa, *pj, &v[off..off + hd], a);
                            }
                        }
                    }
                }
            }
        }
        j0 += tn;
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
            attention_with(isa, Par::Never, None, &q, &k, &v, 1, &p, &mut out).unwrap();
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
            attention_with(isa, Par::Never, None, &q, &k, &v, 0, &p, &mut out).unwrap();
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
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn attention_matches_reference(
            (n_kv, group, hd) in shape(),
            tq in 1usize..8,
            q_pos0 in 0usize..12,
            extra_keys in 0usize..3,
            window in prop::option::of(1usize..16),
            block in prop::option::of(1usize..6),
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
                    attention_with(isa, par, block, &q, &k, &v, q_pos0, &p, &mut got).unwrap();
                    assert_close(&got, &want, ABS, REL, &format!("{isa:?} {par:?} block {block:?}"));
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

    /// Eight rows go into their columns of a transposed key tile, and nothing else is written.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn eight_rows_transpose_into_their_columns() {
        if !Isa::available().contains(&Isa::Avx2) {
            return;
        }
        let n = 24;
        let rows: Vec<Vec<f32>> = (0..8).map(|u| random_vec(40 + u as u64, n, 1.0)).collect();
        let mut kt = vec![-1f32; n * KEY_TILE];
        // SAFETY: AVX2 is there (checked above); rows of 24 floats, `kt` of 24 rows, 16 + 8 <= 64.
        unsafe { super::prefill_avx2::transpose_rows(std::array::from_fn(|u| &rows[u][..]), &mut kt, 16) };
        for e in 0..n {
            for u in 0..KEY_TILE {
                let want = if (16..24).contains(&u) { rows[u - 16][e] } else { -1.0 };
                assert_eq!(kt[e * KEY_TILE + u], want, "element {e} of column {u}");
            }
        }
    }

    /// Heads pair up only within a KV head's group; an odd group leaves its last head alone.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn head_runs_pair_within_groups() {
        let runs = |n, g| super::prefill_avx512::head_runs(n, g).collect::<Vec<_>>();
        assert_eq!(runs(4, 4), [(0, true), (2, true)]);
        assert_eq!(runs(9, 3), [(0, true), (2, false), (3, true), (5, false), (6, true), (8, false)]);
        assert_eq!(runs(3, 1), [(0, false), (1, false), (2, false)]);
        assert_eq!(runs(5, 5), [(0, true), (2, true), (4, false)]);
        assert!(runs(0, 1).is_empty());
    }

    /// A sequence long enough for the automatic chunking to split it across threads, and for
    /// each chunk to span several key tiles (the online-softmax rescaling).
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
            for (par, chunk) in [(Par::Always, None), (Par::Never, None), (Par::Never, Some(300))] {
                let mut got = vec![0f32; q.len()];
                attention_decode_with(isa, par, chunk, &q, &refs(&kb), &refs(&vb), block_len, seq_len, &p, &mut got)
                    .unwrap();
                assert_close(&got, &want, ABS, REL, &format!("{isa:?} {par:?} {chunk:?}"));
            }
        }
    }

    /// Prefill over several key tiles: blocks of queries whose visible keys start and end
    /// inside tiles, with and without a window.
    #[test]
    fn long_prefill_spans_several_tiles() {
        let (tq, q_pos0, n_kv) = (150, 30, 2);
        let tk = q_pos0 + tq + 5;
        // 24: the generic steps; 64 and 128: the tiled kernels of every ISA the CPU has.
        for (hd, window) in
            [24, 64, 128].into_iter().flat_map(|hd| [None, Some(70), Some(3 * KEY_TILE + 1)].map(|w| (hd, w)))
        {
            let p = params(2 * n_kv, n_kv, hd, window);
            let q = random_vec(21, tq * p.n_heads * hd, 3.0);
            let k = random_vec(22, tk * n_kv * hd, 3.0);
            let v = random_vec(23, tk * n_kv * hd, 1.0);
            let mut want = vec![0f32; q.len()];
            reference::attention(&q, &k, &v, q_pos0, &p, &mut want).unwrap();
            for isa in Isa::available() {
                for (par, block) in
                    [(Par::Always, None), (Par::Never, None), (Par::Never, Some(7)), (Par::Always, Some(1))]
                {
                    let mut got = vec![0f32; q.len()];
                    attention_with(isa, par, block, &q, &k, &v, q_pos0, &p, &mut got).unwrap();
                    assert_close(
                        &got,
                        &want,
                        ABS,
                        REL,
                        &format!("{isa:?} {par:?} {block:?} hd {hd} window {window:?}"),
                    );
                }
            }
        }
    }
}
