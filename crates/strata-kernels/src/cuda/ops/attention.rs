//! Causal attention over the device KV cache (`kernels/attention.cu`): split-K decode for one
//! query token, tiled prefill for several.

use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_DYNAMIC_SMEM;
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};
use strata_tensor::cpu::AttentionParams;

use crate::cuda::kv::DeviceKvCache;
use crate::cuda::params::{
    AttnDecodeParams, AttnPrefillParams, STRATA_ATTN_COMBINE_THREADS, STRATA_ATTN_DECODE_MAX_HEADS,
    STRATA_ATTN_DECODE_THREADS, STRATA_ATTN_FOLD_MAX_CHUNKS, STRATA_ATTN_MAX_HEAD_DIM, STRATA_ATTN_PREFILL_QUERIES,
    STRATA_ATTN_PREFILL_THREADS,
};
use crate::cuda::{Cuda, check_len, driver, ptr, ptr_mut};
use crate::{Error, Result};

const OP: &str = "attention";

/// Decode aims for this many blocks per streaming multiprocessor.
const DECODE_BLOCKS_PER_SM: usize = 4;

/// Causal attention of the last `tokens` positions of `layer` (positions
/// `layer_len - tokens .. layer_len`) over every key the cache holds for that layer, with
/// `p.sliding_window`: the CUDA twin of `strata_tensor::cpu::attention` (prefill, chunked
/// prefill) and `strata_tensor::cpu::attention_decode` (`tokens == 1`).
///
/// `q` and `out` are `[tokens, n_heads * head_dim]` (longer buffers are fine). The keys and
/// values of the queries' own tokens must already be appended. `tokens == 1` runs the split-K
/// decode kernel (its key chunks merged inside the same launch when they are at most
/// `STRATA_ATTN_FOLD_MAX_CHUNKS` and the cache's folded combine is on, else by a combine
/// launch), more tokens the tiled prefill kernel. `head_dim` must be a multiple of 4 of at
/// most 256; `p.n_kv_heads` and `p.head_dim` must match the cache.
pub fn attention(
    cuda: &Cuda,
    cache: &DeviceKvCache,
    layer: usize,
    q: &impl DevicePtr<f32>,
    tokens: usize,
    p: &AttentionParams,
    out: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    let (table, seq_len) = cache.table(cuda, layer).ok_or_else(|| {
        Error::invalid(OP, format!("layer {layer} is out of range: the cache has {} layers", cache.n_layers()))
    })?;
    check_params(cache, p)?;
    if tokens > seq_len {
        return Err(Error::invalid(
            OP,
            format!("{tokens} query tokens, but layer {layer} holds only {seq_len} tokens (append the keys first)"),
        ));
    }
    let q_len = tokens * p.n_heads * p.head_dim;
    check_len(OP, "q", q.len(), q_len)?;
    check_len(OP, "out", out.len(), q_len)?;
    if tokens == 0 {
        return Ok(());
    }
    // A window at least as long as the sequence hides nothing.
    let window = match p.sliding_window {
        Some(w) if w < seq_len => w,
        _ => 0,
    };
    if tokens == 1 {
        decode(cuda, cache, table, seq_len, q, p, window, out)
    } else {
        prefill(cuda, cache, table, seq_len, q, tokens, p, window, out)
    }
}

/// Checks the attention shape against the cache and the kernels' limits.
fn check_params(cache: &DeviceKvCache, p: &AttentionParams) -> Result<()> {
    if p.n_kv_heads != cache.n_kv_heads() || p.head_dim != cache.head_dim() {
        return Err(Error::invalid(
            OP,
            format!(
                "n_kv_heads {} x head_dim {} does not match the cache's {} x {}",
                p.n_kv_heads,
                p.head_dim,
                cache.n_kv_heads(),
                cache.head_dim()
            ),
        ));
    }
    if p.n_heads == 0 || !p.n_heads.is_multiple_of(p.n_kv_heads) {
        return Err(Error::invalid(
            OP,
            format!("n_heads {} is not a positive multiple of n_kv_heads {}", p.n_heads, p.n_kv_heads),
        ));
    }
    if !p.head_dim.is_multiple_of(4) || p.head_dim > STRATA_ATTN_MAX_HEAD_DIM as usize {
        return Err(Error::invalid(
            OP,
            format!(
                "head_dim {} is not supported: the kernels take multiples of 4 up to {STRATA_ATTN_MAX_HEAD_DIM}",
                p.head_dim
            ),
        ));
    }
    if p.sliding_window == Some(0) {
        return Err(Error::invalid(OP, "a sliding window of 0 hides every key"));
    }
    if p.n_heads > u16::MAX as usize {
        return Err(Error::invalid(OP, format!("{} query heads exceed the grid's limit", p.n_heads)));
    }
    Ok(())
}

/// The first key position a query at position `i` sees under `window` (0: none).
fn first_visible(i: usize, window: usize) -> usize {
    if window == 0 { 0 } else { (i + 1).saturating_sub(window) }
}

/// How decode splits `n_vis` visible keys: `(chunk_len, n_chunks)`, chunks a multiple of
/// `tile` keys, enough of them for about [`DECODE_BLOCKS_PER_SM`] blocks per multiprocessor
/// when the sequence is long enough (`blocks_per_chunk` blocks serve each chunk).
fn decode_split(n_vis: usize, tile: usize, blocks_per_chunk: usize, multiprocessors: usize) -> (usize, usize) {
    let wanted = (DECODE_BLOCKS_PER_SM * multiprocessors).div_ceil(blocks_per_chunk);
    let n = wanted.clamp(1, n_vis.div_ceil(tile));
    let chunk_len = n_vis.div_ceil(n).next_multiple_of(tile);
    (chunk_len, n_vis.div_ceil(chunk_len))
}

#[allow(clippy::too_many_arguments)]
fn decode(
    cuda: &Cuda,
    cache: &DeviceKvCache,
    table: u64,
    seq_len: usize,
    q: &impl DevicePtr<f32>,
    p: &AttentionParams,
    window: usize,
    out: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    let (hd, n_heads, n_kv) = (p.head_dim, p.n_heads, p.n_kv_heads);
    let group = n_heads / n_kv;
    let heads_per_block = group.min(STRATA_ATTN_DECODE_MAX_HEADS as usize);
    let sub_blocks = group.div_ceil(heads_per_block);
    // Two buffers of a key and a value tile stay under 48 KiB of shared memory up to head_dim
    // 256 (five or six blocks per multiprocessor). On an H200 tiles of 16 beat tiles of 32 in
    // double buffers of 73 KiB (three blocks per multiprocessor) by a quarter.
    let tile = if hd <= 128 { 16 } else { 8 };
    let first = first_visible(seq_len - 1, window);
    let (chunk_len, n_chunks) = decode_split(seq_len - first, tile, n_kv * sub_blocks, cache.multiprocessors());
    let smem_floats = heads_per_block * hd + 4 * tile * (hd + 4) + heads_per_block * tile + 3 * heads_per_block;
    let smem_bytes = smem_floats * 4;
    debug_assert!(smem_bytes <= 48 * 1024, "decode needs no opt-in shared memory");
    let params = AttnDecodeParams {
        n_heads: n_heads as u32,
        n_kv_heads: n_kv as u32,
        head_dim: hd as u32,
        block_len: cache.block_len() as u32,
        first: first as u32,
        seq_len: seq_len as u32,
        chunk_len: chunk_len as u32,
        n_chunks: n_chunks as u32,
        heads_per_block: heads_per_block as u32,
        key_tile: tile as u32,
        scale: p.scale,
    };
    let cfg = LaunchConfig {
        grid_dim: (n_chunks as u32, n_kv as u32, sub_blocks as u32),
        block_dim: (STRATA_ATTN_DECODE_THREADS, 1, 1),
        shared_mem_bytes: smem_bytes as u32,
    };
    let (qp, op) = (ptr(cuda, q), ptr_mut(cuda, out));
    if n_chunks == 1 {
        let ptrs = [qp, table, 0, op, 0];
        // SAFETY: q and out hold n_heads * head_dim floats (checked by the caller); the table
        // lists the blocks of seq_len tokens and the kernel reads only positions below seq_len;
        // with one chunk the kernel writes out directly and never touches the partials or the
        // counters.
        return unsafe { cuda.launch("attention", "attention_decode_f32", cfg, &params, &ptrs) };
    }
    let part_len = n_chunks * n_heads * (hd + 2);
    let groups = n_kv * sub_blocks;
    let fold = cache.folded_combine() && n_chunks <= STRATA_ATTN_FOLD_MAX_CHUNKS as usize;
    cache.with_scratch(cuda, part_len, groups, |part, counters| {
        let pp = ptr_mut(cuda, part);
        if fold {
            let ptrs = [qp, table, pp, op, ptr_mut(cuda, counters)];
            // SAFETY: as above; the partials buffer holds n_chunks * n_heads * (head_dim + 2)
            // floats (the accumulators and (max, sum) pairs of every chunk and head), and the
            // counters one u32 per (KV head, head block), zero: zeroed when allocated, and each
            // launch's last block of a group sets its counter back to zero.
            return unsafe { cuda.launch("attention", "attention_decode_f32", cfg, &params, &ptrs) };
        }
        let ptrs = [qp, table, pp, op, 0];
        // SAFETY: as above; without counters the kernel only writes the partials.
        unsafe { cuda.launch("attention", "attention_decode_f32", cfg, &params, &ptrs) }?;
        // Dynamic shared memory: per chunk group a float4 per 4 elements of a head, then a weight
        // per chunk (at most DECODE_BLOCKS_PER_SM x multiprocessors chunks: a few KiB).
        let threads = STRATA_ATTN_COMBINE_THREADS as usize;
        let combine_smem = threads / (hd / 4) * hd * 4 + n_chunks * 4;
        let combine = LaunchConfig {
            grid_dim: (n_heads as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: combine_smem as u32,
        };
        // SAFETY: the combine step reads the partials written above (same stream, in order)
        // and writes n_heads * head_dim floats of out.
        unsafe { cuda.launch("attention", "attention_decode_combine_f32", combine, &params, &[pp, op]) }
    })
}

#[allow(clippy::too_many_arguments)]
fn prefill(
    cuda: &Cuda,
    cache: &DeviceKvCache,
    table: u64,
    seq_len: usize,
    q: &impl DevicePtr<f32>,
    tokens: usize,
    p: &AttentionParams,
    window: usize,
    out: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    let hd = p.head_dim;
    let (kernel, key_tile) = match hd {
        0..=64 => ("attention_prefill_f32_d64", 64),
        65..=128 => ("attention_prefill_f32_d128", 64),
        _ => ("attention_prefill_f32_d256", 32),
    };
    let bm = STRATA_ATTN_PREFILL_QUERIES as usize;
    let smem_bytes = 4 * (bm * (hd + 4) + key_tile * (hd + 4) + bm * (key_tile + 16));
    cuda.function("attention", kernel)?
        .set_attribute(MAX_DYNAMIC_SMEM, smem_bytes as i32)
        .map_err(driver("attention: setting the shared memory size"))?;
    let params = AttnPrefillParams {
        n_heads: p.n_heads as u32,
        n_kv_heads: p.n_kv_heads as u32,
        head_dim: hd as u32,
        block_len: cache.block_len() as u32,
        tokens: tokens as u32,
        q_pos0: (seq_len - tokens) as u32,
        window: window as u32,
        scale: p.scale,
    };
    let cfg = LaunchConfig {
        grid_dim: (tokens.div_ceil(bm) as u32, p.n_heads as u32, 1),
        block_dim: (STRATA_ATTN_PREFILL_THREADS, 1, 1),
        shared_mem_bytes: smem_bytes as u32,
    };
    let ptrs = [ptr(cuda, q), table, ptr_mut(cuda, out)];
    // SAFETY: q and out hold tokens * n_heads * head_dim floats (checked by the caller); the
    // table lists the blocks of seq_len tokens and the kernel reads only positions below
    // q_pos0 + tokens = seq_len.
    unsafe { cuda.launch("attention", kernel, cfg, &params, &ptrs) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_splits_into_whole_tiles_and_covers_the_keys() {
        for n_vis in [1usize, 2, 31, 32, 33, 300, 1500, 16384, 100_000] {
            for (tile, blocks, sms) in [(32, 8, 132), (16, 1, 132), (32, 64, 8), (32, 1, 1)] {
                let (chunk, n) = decode_split(n_vis, tile, blocks, sms);
                assert!(chunk.is_multiple_of(tile) && chunk > 0, "{n_vis} {tile}: chunk {chunk}");
                assert!(n * chunk >= n_vis && (n - 1) * chunk < n_vis, "{n_vis}: {n} chunks of {chunk}");
                assert!(n <= (DECODE_BLOCKS_PER_SM * sms).div_ceil(blocks).max(1));
            }
        }
        // A long sequence fills the device: 16384 keys over 8 KV heads on 132 SMs, in tiles of
        // 16, make 64 chunks of 256 keys (512 blocks).
        assert_eq!(decode_split(16384, 16, 8, 132), (256, 64));
    }

    #[test]
    fn first_visible_follows_the_window() {
        assert_eq!(first_visible(10, 0), 0);
        assert_eq!(first_visible(10, 4), 7);
        assert_eq!(first_visible(2, 4), 0);
        assert_eq!(first_visible(3, 4), 0);
        assert_eq!(first_visible(4, 4), 1);
    }
}
