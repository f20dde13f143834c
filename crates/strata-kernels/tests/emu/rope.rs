//! `kernels/rope.cu`: fused q/k RoPE in f32, f16 and bf16, both pairings, GQA head counts,
//! partial rotary dimensions, blocks that split a token's heads, against `reference::rope`.

use half::{bf16, f16};
use strata_tensor::cpu::{RopeLayout, reference};

use crate::driver::{Arg, assert_close, build, f32_bytes, f32s, launch, params32, random_f32};

/// An element type: its kernel, the rotary pairs of one item, its bytes, and the tolerance of a
/// rotated element against the reference run on the rounded input and rounded again (an ulp of
/// the type; for f32, a few).
struct Elem {
    kernel: &'static str,
    pairs_per_item: usize,
    size: usize,
    rtol: f32,
    round: fn(f32) -> Vec<u8>,
    read: fn(&[u8]) -> f32,
}

const ELEMS: [Elem; 5] = [
    Elem {
        kernel: "rope_qk_f32",
        pairs_per_item: 1,
        size: 4,
        rtol: 2e-6,
        round: |v| v.to_le_bytes().to_vec(),
        read: |b| f32::from_le_bytes(b.try_into().unwrap()),
    },
    Elem {
        kernel: "rope_qk_f16",
        pairs_per_item: 1,
        size: 2,
        rtol: 1.0 / 1024.0,
        round: |v| f16::from_f32(v).to_le_bytes().to_vec(),
        read: |b| f16::from_le_bytes(b.try_into().unwrap()).to_f32(),
    },
    Elem {
        kernel: "rope_qk_bf16",
        pairs_per_item: 1,
        size: 2,
        rtol: 1.0 / 128.0,
        round: |v| bf16::from_f32(v).to_le_bytes().to_vec(),
        read: |b| bf16::from_le_bytes(b.try_into().unwrap()).to_f32(),
    },
    // The 16-bit types two pairs at a time: bit for bit their one-pair kernels (checked below).
    Elem {
        kernel: "rope_qk_f16x2",
        pairs_per_item: 2,
        size: 2,
        rtol: 1.0 / 1024.0,
        round: |v| f16::from_f32(v).to_le_bytes().to_vec(),
        read: |b| f16::from_le_bytes(b.try_into().unwrap()).to_f32(),
    },
    Elem {
        kernel: "rope_qk_bf16x2",
        pairs_per_item: 2,
        size: 2,
        rtol: 1.0 / 128.0,
        round: |v| bf16::from_f32(v).to_le_bytes().to_vec(),
        read: |b| bf16::from_le_bytes(b.try_into().unwrap()).to_f32(),
    },
];

/// Whether `e`'s kernel takes a shape: the two-pair kernels need whole pairs of pairs and heads
/// that start on even elements (as `ops::rope_qk` checks).
fn takes(e: &Elem, head_dim: usize, n_pairs: usize) -> bool {
    e.pairs_per_item == 1 || (n_pairs.is_multiple_of(2) && head_dim.is_multiple_of(2))
}

/// Runs `case` in element type `e`, launched as `ops::rope_qk` launches it, compares q and k
/// with the reference, and returns their bytes.
#[allow(clippy::too_many_arguments)]
fn check(
    e: &Elem,
    tokens: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    n_pairs: usize,
    layout: RopeLayout,
    factor: f32,
) -> (Vec<u8>, Vec<u8>) {
    let emu = build("emu_rope.cpp").expect("checked by the caller");
    let what =
        format!("{} {tokens} tokens, {n_heads}/{n_kv_heads} heads x {head_dim}, {n_pairs} pairs, {layout:?}", e.kernel);
    let scale = 2.0;
    let positions: Vec<u32> = (0..tokens as u32).map(|t| (39_000 + t * 7919) % 40_961).collect();
    let freqs: Vec<f32> = (0..n_pairs).map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / (2 * n_pairs) as f32)).collect();
    let rounded = |v: Vec<f32>| -> Vec<u8> { v.into_iter().flat_map(e.round).collect() };
    let values = |b: &[u8]| -> Vec<f32> { b.chunks_exact(e.size).map(e.read).collect() };
    let mut q = rounded(random_f32(tokens * n_heads * head_dim, tokens as u64, scale));
    let mut k = rounded(random_f32(tokens * n_kv_heads * head_dim, tokens as u64 ^ 7, scale));
    let pos: Vec<usize> = positions.iter().map(|&p| p as usize).collect();
    let want = |x: &[u8], heads: usize| -> Vec<f32> {
        let mut v = values(x);
        reference::rope(&mut v, &pos, heads, head_dim, &freqs, factor, layout).unwrap();
        v.into_iter().map(|x| (e.read)(&(e.round)(x))).collect()
    };
    let (want_q, want_k) = (want(&q, n_heads), want(&k, n_kv_heads));

    // The launcher's shape: a block row per token, its (head, pair) items in chunks.
    let items = (n_heads + n_kv_heads) * n_pairs / e.pairs_per_item;
    let per_block = if tokens >= 128 { 4096 } else { 1024 };
    let blocks_y = items.div_ceil(per_block).min(65535);
    let chunk = items.div_ceil(blocks_y);
    let threads = chunk.next_multiple_of(32).min(256) as u32;
    let layout_code: u32 = match layout {
        RopeLayout::RotateHalf => 0,
        RopeLayout::Interleaved => 1,
    };
    let p = params32(&[
        (tokens as u32).to_le_bytes(),
        (n_heads as u32).to_le_bytes(),
        (n_kv_heads as u32).to_le_bytes(),
        (head_dim as u32).to_le_bytes(),
        (n_pairs as u32).to_le_bytes(),
        layout_code.to_le_bytes(),
        (chunk as u32).to_le_bytes(),
        factor.to_le_bytes(),
    ]);
    let mut posb: Vec<u8> = positions.iter().flat_map(|p| p.to_le_bytes()).collect();
    let mut freqb: Vec<u8> = freqs.iter().flat_map(|f| f.to_le_bytes()).collect();
    let mut args = [Arg::Buf(&mut q, 0), Arg::Buf(&mut k, 0), Arg::Buf(&mut posb, 0), Arg::Buf(&mut freqb, 0)];
    launch(&emu, e.kernel, [tokens as u32, blocks_y as u32, 1], threads, 2 * n_pairs * 4, &p, &mut args);
    // The f32 results may differ by a few ulp of the products' size (scale x attention factor).
    let atol = 4e-6 * scale * factor;
    assert_close(&format!("q: {what}"), &values(&q), &want_q, atol, e.rtol);
    assert_close(&format!("k: {what}"), &values(&k), &want_k, atol, e.rtol);
    (q, k)
}

#[test]
fn emulated_rope_matches_the_reference() {
    if build("emu_rope.cpp").is_none() {
        return;
    }
    // (tokens, n_heads, n_kv_heads, head_dim, rotary pairs): Llama, partial rotary, odd sizes, a
    // token's heads over several blocks (72 heads x 64 pairs), 130 tokens (a block per token).
    let shapes = [
        (3, 32, 8, 128, 64),
        (5, 9, 3, 64, 32),
        (2, 64, 8, 128, 64),
        (4, 5, 1, 81, 40),
        (4, 5, 1, 80, 20),
        (3, 2, 2, 6, 1),
        (3, 3, 1, 6, 2),
        (130, 4, 2, 16, 8),
    ];
    let mut paired = 0;
    for (tokens, n_heads, n_kv_heads, head_dim, n_pairs) in shapes {
        for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
            let mut by_kernel = Vec::new();
            for e in ELEMS.iter().filter(|e| takes(e, head_dim, n_pairs)) {
                by_kernel.push((e.kernel, check(e, tokens, n_heads, n_kv_heads, head_dim, n_pairs, layout, 1.0)));
            }
            // A two-pair kernel gives its one-pair kernel's bits.
            for (x2, out) in by_kernel.iter().filter(|(name, _)| name.ends_with("x2")) {
                let one = x2.trim_end_matches("x2");
                let (_, want) = by_kernel.iter().find(|(name, _)| *name == one).unwrap();
                assert!(out == want, "{x2} differs from {one}: {tokens} tokens, {n_heads}/{n_kv_heads} x {head_dim}");
                paired += 1;
            }
        }
    }
    assert_eq!(paired, 2 * 2 * 6, "the two-pair kernels ran on 6 shapes, both layouts");
    check(&ELEMS[0], 3, 4, 2, 64, 32, RopeLayout::RotateHalf, 1.23);
}

/// `rope_qk_append_f32`, launched as `DeviceKvCache::append_rotated` launches it, is bit for bit
/// `rope_qk_f32` then `kv_append_f32`: q rotated in place, each token's rotated key row (its
/// unrotated dimensions copied) and value row in the block and row its cache position names,
/// starting inside a block and crossing blocks; the k buffer and the rest of the blocks
/// untouched. Decode (one token) and prefill shapes, partial rotary, both pairings, GQA.
#[test]
fn emulated_rope_append_is_rope_then_append_bit_for_bit() {
    let Some(emu) = build("emu_rope.cpp") else { return };
    // (tokens, n_heads, n_kv_heads, head_dim, rotary pairs, block_len, start)
    let cases =
        [(1, 32, 4, 64, 32, 8, 13), (5, 9, 3, 64, 24, 4, 3), (3, 4, 2, 128, 64, 2, 0), (130, 4, 2, 16, 8, 32, 5)];
    for (tokens, n_heads, n_kv_heads, head_dim, n_pairs, block_len, start) in cases {
        for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
            let what = format!("{tokens} tokens, {n_heads}/{n_kv_heads} x {head_dim}, {n_pairs} pairs, {layout:?}");
            let row = n_kv_heads * head_dim;
            let positions: Vec<u32> = (0..tokens as u32).map(|t| 1000 + start as u32 + t * 3).collect();
            let freqs: Vec<f32> = (0..n_pairs).map(|i| 1.0 / 10000f32.powf(i as f32 / n_pairs as f32)).collect();
            let q = random_f32(tokens * n_heads * head_dim, tokens as u64, 2.0);
            let k = random_f32(tokens * row, tokens as u64 ^ 7, 2.0);
            let v = random_f32(tokens * row, tokens as u64 ^ 9, 2.0);
            let code = |v: usize| (v as u32).to_le_bytes();
            let layout_code = code(usize::from(layout == RopeLayout::Interleaved));
            let (mut posb, mut freqb) = (bytes_u32(&positions), f32_bytes(&freqs));

            // The two launches: rope_qk_f32 on copies of q and k.
            let items = (n_heads + n_kv_heads) * n_pairs;
            let (blocks_y, chunk, threads) = shape(tokens, items);
            let head = [code(tokens), code(n_heads), code(n_kv_heads), code(head_dim), code(n_pairs), layout_code];
            let p = params32(&[&head[..], &[code(chunk), 1.1f32.to_le_bytes()]].concat());
            let (mut rq, mut rk) = (f32_bytes(&q), f32_bytes(&k));
            let mut args =
                [Arg::Buf(&mut rq, 0), Arg::Buf(&mut rk, 0), Arg::Buf(&mut posb, 0), Arg::Buf(&mut freqb, 0)];
            launch(&emu, "rope_qk_f32", [tokens as u32, blocks_y, 1], threads, 2 * n_pairs * 4, &p, &mut args);
            let (want_q, want_k) = (f32s(&rq), f32s(&rk));

            // The fused launch, into blocks holding a sentinel.
            let items = n_heads * n_pairs + n_kv_heads * head_dim;
            let (blocks_y, chunk, threads) = shape(tokens, items);
            let p = params32(&[&head[..], &[code(chunk), 1.1f32.to_le_bytes(), code(start), code(block_len)]].concat());
            let n_blocks = (start + tokens).div_ceil(block_len);
            let mut blocks: Vec<Vec<u8>> =
                (0..2 * n_blocks).map(|_| f32_bytes(&vec![-7f32; block_len * row])).collect();
            let (mut fq, mut fk, mut fv) = (f32_bytes(&q), f32_bytes(&k), f32_bytes(&v));
            let mut args = vec![
                Arg::Buf(&mut fq, 0),
                Arg::Buf(&mut fk, 0),
                Arg::Buf(&mut fv, 0),
                Arg::Buf(&mut posb, 0),
                Arg::Buf(&mut freqb, 0),
                Arg::Table((5..5 + 2 * n_blocks).collect()),
            ];
            args.extend(blocks.iter_mut().map(Arg::Extra));
            launch(&emu, "rope_qk_append_f32", [tokens as u32, blocks_y, 1], threads, 2 * n_pairs * 4, &p, &mut args);

            let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same(&f32s(&fq), &want_q), "{what}: q differs from rope_qk_f32's");
            assert!(same(&f32s(&fk), &k), "{what}: the k buffer changed");
            for (b, bytes) in blocks.iter().enumerate() {
                let (block, which) = (b / 2, if b % 2 == 0 { &want_k } else { &v });
                for (i, got) in f32s(bytes).into_iter().enumerate() {
                    let pos = block * block_len + i / row;
                    let want = if (start..start + tokens).contains(&pos) {
                        which[(pos - start) * row + i % row]
                    } else {
                        -7.0
                    };
                    let part = if b % 2 == 0 { "k" } else { "v" };
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{what}: block {block} ({part}) element {i}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// The launcher's shape for `items` items per token (`ops::rope::launch_shape`): blocks per
/// token, items per block, threads.
fn shape(tokens: usize, items: usize) -> (u32, usize, u32) {
    let per_block = if tokens >= 128 { 4096 } else { 1024 };
    let blocks_y = items.div_ceil(per_block).min(65535);
    let chunk = items.div_ceil(blocks_y);
    (blocks_y as u32, chunk, chunk.next_multiple_of(32).min(256) as u32)
}

fn bytes_u32(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
