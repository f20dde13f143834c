//! `kernels/attention.cu`: the KV append, split-K decode with its combine step, and tiled
//! prefill, over a paged cache whose block table holds the emulated blocks' addresses, against
//! `reference::attention_decode` and `reference::attention` (the GPU tests' tolerances), each
//! launched as `ops::attention` and `DeviceKvCache::append` launch it.

use strata_kernels::testing::assert_close;
use strata_tensor::cpu::{AttentionParams, reference};

use crate::driver::{Arg, build, f32_bytes, f32s, launch, random_f32};

const ATOL: f32 = 1e-5;
const RTOL: f32 = 1e-4;

/// `kernels/include/attention.h`'s launch constants and the launcher's blocks per SM.
const DECODE_THREADS: u32 = 128;
const DECODE_MAX_HEADS: usize = 8;
const COMBINE_THREADS: usize = 256;
const PREFILL_THREADS: u32 = 256;
const PREFILL_QUERIES: usize = 64;
const DECODE_BLOCKS_PER_SM: usize = 4;
const FOLD_MAX_CHUNKS: usize = 32;

/// Little-endian bytes of u32 fields, then an f32.
fn params(fields: &[u32], scale: f32) -> Vec<u8> {
    fields.iter().flat_map(|v| v.to_le_bytes()).chain(scale.to_le_bytes()).collect()
}

/// A cache's blocks (`block_len` rows of `row` floats, the last padded with NaN), from
/// contiguous rows.
fn blocks(x: &[f32], row: usize, block_len: usize) -> Vec<Vec<f32>> {
    x.chunks(block_len * row)
        .map(|c| {
            let mut b = c.to_vec();
            b.resize(block_len * row, f32::NAN);
            b
        })
        .collect()
}

#[derive(Clone, Copy)]
struct Case {
    n_kv: usize,
    group: usize,
    head_dim: usize,
    block_len: usize,
    seq: usize,
    tokens: usize,
    window: Option<usize>,
    /// The multiprocessors the decode split assumes (more: more chunks).
    sms: usize,
    /// Decode: the last block of each group merges the chunks (counters), rather than the
    /// combine kernel.
    fold: bool,
}

/// Runs one case's attention (decode when `tokens` is 1, else prefill of the last `tokens`
/// positions) and compares it with the reference.
fn check(c: &Case) {
    let emu = build("emu_attention.cpp").expect("checked by the caller");
    let (hd, n_kv) = (c.head_dim, c.n_kv);
    let n_heads = n_kv * c.group;
    let row = n_kv * hd;
    let seed = (c.seq * 31 + hd + c.tokens) as u64;
    let k = random_f32(c.seq * row, seed, 2.0);
    let v = random_f32(c.seq * row, seed ^ 1, 1.0);
    let q = random_f32(c.tokens * n_heads * hd, seed ^ 2, 2.0);
    let scale = 1.0 / (hd as f32).sqrt();
    let p = AttentionParams { n_heads, n_kv_heads: n_kv, head_dim: hd, scale, sliding_window: c.window };
    let what = format!(
        "{n_heads}/{n_kv} heads x {hd}, block {}, {} keys, {} queries, window {:?}, fold {}",
        c.block_len, c.seq, c.tokens, c.window, c.fold
    );

    let (kb, vb) = (blocks(&k, row, c.block_len), blocks(&v, row, c.block_len));
    let mut want = vec![0f32; q.len()];
    if c.tokens == 1 {
        let (kr, vr): (Vec<&[f32]>, Vec<&[f32]>) =
            (kb.iter().map(|b| &b[..]).collect(), vb.iter().map(|b| &b[..]).collect());
        reference::attention_decode(&q, &kr, &vr, c.block_len, c.seq, &p, &mut want).unwrap();
    } else {
        reference::attention(&q, &k, &v, c.seq - c.tokens, &p, &mut want).unwrap();
    }
    // The block buffers, interleaved key, value as the table lists them, after the launch's own
    // buffers (whose count `first` is).
    let mut block_bytes: Vec<Vec<u8>> = kb.iter().zip(&vb).flat_map(|(a, b)| [f32_bytes(a), f32_bytes(b)]).collect();
    let table = |first: usize| Arg::Table((first..first + block_bytes.len()).collect());
    let window = match c.window {
        Some(w) if w < c.seq => w,
        _ => 0,
    };
    let mut qb = f32_bytes(&q);
    let mut out = f32_bytes(&vec![f32::NAN; q.len()]);

    if c.tokens == 1 {
        // ops::attention's decode: chunks of whole key tiles, as many as about four blocks per
        // multiprocessor want.
        let heads_per_block = c.group.min(DECODE_MAX_HEADS);
        let sub_blocks = c.group.div_ceil(heads_per_block);
        let tile = if hd <= 128 { 16 } else { 8 };
        let first = if window == 0 { 0 } else { c.seq.saturating_sub(window) };
        let n_vis = c.seq - first;
        let wanted = (DECODE_BLOCKS_PER_SM * c.sms).div_ceil(n_kv * sub_blocks);
        let n = wanted.clamp(1, n_vis.div_ceil(tile));
        let chunk_len = n_vis.div_ceil(n).next_multiple_of(tile);
        let n_chunks = n_vis.div_ceil(chunk_len);
        let smem = 4 * (heads_per_block * hd + 4 * tile * (hd + 4) + heads_per_block * tile + 3 * heads_per_block);
        let fields = [n_heads, n_kv, hd, c.block_len, first, c.seq, chunk_len, n_chunks, heads_per_block, tile];
        let pb = params(&fields.map(|f| f as u32), scale);
        let grid = [n_chunks as u32, n_kv as u32, sub_blocks as u32];
        if n_chunks == 1 {
            let mut args = vec![Arg::Buf(&mut qb, 0), table(2), Arg::Null, Arg::Buf(&mut out, 0), Arg::Null];
            args.extend(block_bytes.iter_mut().map(Arg::Extra));
            launch(&emu, "attention_decode_f32", grid, DECODE_THREADS, smem, &pb, &mut args);
        } else if c.fold {
            assert!(n_chunks <= FOLD_MAX_CHUNKS, "{what}: {n_chunks} chunks are too many to fold");
            let mut part = f32_bytes(&vec![f32::NAN; n_chunks * n_heads * (hd + 2)]);
            let mut counters = vec![0u8; 4 * n_kv * sub_blocks];
            let mut args = vec![
                Arg::Buf(&mut qb, 0),
                table(4),
                Arg::Buf(&mut part, 0),
                Arg::Buf(&mut out, 0),
                Arg::Buf(&mut counters, 0),
            ];
            args.extend(block_bytes.iter_mut().map(Arg::Extra));
            launch(&emu, "attention_decode_f32", grid, DECODE_THREADS, smem, &pb, &mut args);
            assert!(counters.iter().all(|&b| b == 0), "{what}: the counters are not back at zero: {counters:?}");
        } else {
            let mut part = f32_bytes(&vec![f32::NAN; n_chunks * n_heads * (hd + 2)]);
            let mut args =
                vec![Arg::Buf(&mut qb, 0), table(3), Arg::Buf(&mut part, 0), Arg::Buf(&mut out, 0), Arg::Null];
            args.extend(block_bytes.iter_mut().map(Arg::Extra));
            launch(&emu, "attention_decode_f32", grid, DECODE_THREADS, smem, &pb, &mut args);
            let combine_smem = COMBINE_THREADS / (hd / 4) * hd * 4 + n_chunks * 4;
            let mut args = [Arg::Buf(&mut part, 0), Arg::Buf(&mut out, 0)];
            launch(
                &emu,
                "attention_decode_combine_f32",
                [n_heads as u32, 1, 1],
                COMBINE_THREADS as u32,
                combine_smem,
                &pb,
                &mut args,
            );
        }
        assert!(n_chunks > 1 || c.seq <= 4 * 16 || c.sms == 1, "{what}: meant to split");
    } else {
        // ops::attention's prefill: 64 queries of one head per block.
        let (kernel, key_tile) = match hd {
            0..=64 => ("attention_prefill_f32_d64", 64),
            65..=128 => ("attention_prefill_f32_d128", 64),
            _ => ("attention_prefill_f32_d256", 32),
        };
        let bm = PREFILL_QUERIES;
        let smem = 4 * (bm * (hd + 4) + key_tile * (hd + 4) + bm * (key_tile + 16));
        let fields = [n_heads, n_kv, hd, c.block_len, c.tokens, c.seq - c.tokens, window];
        let pb = params(&fields.map(|f| f as u32), scale);
        let mut args = vec![Arg::Buf(&mut qb, 0), table(2), Arg::Buf(&mut out, 0)];
        args.extend(block_bytes.iter_mut().map(Arg::Extra));
        launch(&emu, kernel, [c.tokens.div_ceil(bm) as u32, n_heads as u32, 1], PREFILL_THREADS, smem, &pb, &mut args);
    }
    assert_close(&what, &f32s(&out), &want, ATOL, RTOL);
}

#[test]
fn emulated_attention_matches_the_reference() {
    if build("emu_attention.cpp").is_none() {
        return;
    }
    let case = |n_kv, group, head_dim, block_len, seq, tokens, window, sms| Case {
        n_kv,
        group,
        head_dim,
        block_len,
        seq,
        tokens,
        window,
        sms,
        fold: false,
    };
    let decode = [
        // One chunk; split into chunks (GQA 4, MHA, head_dim 80 and 256, a group wider than a
        // block's heads); a sliding window; 32 chunks, the most the fold takes.
        case(2, 4, 64, 16, 13, 1, None, 1),
        case(2, 4, 64, 16, 200, 1, None, 2),
        case(3, 1, 80, 8, 97, 1, None, 3),
        case(1, 10, 128, 16, 150, 1, None, 2),
        case(2, 2, 256, 16, 70, 1, None, 2),
        case(2, 4, 64, 16, 200, 1, Some(37), 2),
        case(1, 1, 64, 16, 512, 1, None, 16),
    ];
    // Decode both ways: merged by the combine kernel, and by the last block of each group.
    for c in decode.iter().flat_map(|c| [Case { fold: false, ..*c }, Case { fold: true, ..*c }]) {
        check(&c);
    }
    for c in [
        // Prefill: from an empty cache, a chunk after cached tokens, head_dim 80 and 256, a window.
        case(2, 2, 64, 16, 70, 70, None, 1),
        case(2, 2, 80, 8, 90, 21, None, 1),
        case(1, 2, 256, 16, 40, 40, None, 1),
        case(2, 2, 64, 16, 100, 67, Some(20), 1),
    ] {
        check(&c);
    }
}

/// `kv_append_f32` writes each token's key and value row into the block and row its position
/// names, through the table, starting inside a block; nothing else in the blocks changes.
#[test]
fn emulated_kv_append_writes_through_the_table() {
    let Some(emu) = build("emu_attention.cpp") else { return };
    let (row, block_len, start, tokens) = (24usize, 8usize, 13usize, 14usize);
    let n_blocks = (start + tokens).div_ceil(block_len);
    let k = random_f32(tokens * row, 1, 1.0);
    let v = random_f32(tokens * row, 2, 1.0);
    let mut block_bytes: Vec<Vec<u8>> = (0..2 * n_blocks).map(|_| f32_bytes(&vec![-7f32; block_len * row])).collect();
    let (mut kb, mut vb) = (f32_bytes(&k), f32_bytes(&v));
    let pb: Vec<u8> = [tokens, start, block_len, row].iter().flat_map(|&f| (f as u32).to_le_bytes()).collect();
    let mut args = vec![Arg::Buf(&mut kb, 0), Arg::Buf(&mut vb, 0), Arg::Table((2..2 + 2 * n_blocks).collect())];
    args.extend(block_bytes.iter_mut().map(Arg::Extra));
    launch(&emu, "kv_append_f32", [2, 1, 1], 64, 0, &pb, &mut args);
    for (b, bytes) in block_bytes.iter().enumerate() {
        let (block, which) = (b / 2, if b % 2 == 0 { &k } else { &v });
        for (i, &got) in f32s(bytes).iter().enumerate() {
            let pos = block * block_len + i / row;
            let want = if (start..start + tokens).contains(&pos) { which[(pos - start) * row + i % row] } else { -7.0 };
            assert_eq!(got, want, "block {block} ({}) element {i}", if b % 2 == 0 { "k" } else { "v" });
        }
    }
}
