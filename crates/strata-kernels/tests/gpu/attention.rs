//! The device KV cache and the attention kernels against the CPU references: decode
//! (`reference::attention_decode` over host blocks holding the same keys and values), prefill
//! from an empty cache and a chunk appended to a filled one (`reference::attention` over the
//! whole sequence), across head dims, GQA groups, block lengths and sliding windows.
#![cfg(feature = "cuda")]

use proptest::prelude::*;
use strata_kernels::Cuda;
use strata_kernels::cuda::kv::DeviceKvCache;
use strata_kernels::cuda::ops;
use strata_kernels::cuda::testing::{assert_close, device_or_skip, random_f32};
use strata_tensor::cpu::AttentionParams;
use strata_tensor::cpu::reference;

const ATOL: f32 = 1e-5;
const RTOL: f32 = 1e-4;

/// One attention case: `prior` tokens cached before, then `tokens` appended and attended.
#[derive(Clone, Copy, Debug)]
struct Case {
    n_kv: usize,
    group: usize,
    head_dim: usize,
    block_len: usize,
    prior: usize,
    tokens: usize,
    window: Option<usize>,
}

impl Case {
    fn params(&self) -> AttentionParams {
        AttentionParams {
            n_heads: self.n_kv * self.group,
            n_kv_heads: self.n_kv,
            head_dim: self.head_dim,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
            sliding_window: self.window,
        }
    }
}

/// Splits contiguous `[seq, row]` rows into blocks of `block_len` tokens, the unused rows of the
/// last block NaN (the reference must not read them either).
fn to_blocks(x: &[f32], row: usize, block_len: usize) -> Vec<Vec<f32>> {
    x.chunks(block_len * row)
        .map(|c| {
            let mut b = c.to_vec();
            b.resize(block_len * row, f32::NAN);
            b
        })
        .collect()
}

/// Fills layer 1 of a two-layer cache with `prior + tokens` tokens (layer 0 holds other data,
/// so a kernel reading the wrong table shows), runs the kernel on the last `tokens`, and
/// compares with the reference. Decode runs three times (layer 1, layer 0, layer 1 again: the
/// folded combine's counters must be back at zero after each launch) with the key chunks merged
/// in the decode launch when `fold` and they are few, else by the combine launch.
fn check(cuda: &Cuda, c: Case, seed: u64) {
    check_with(cuda, c, seed, true);
}

fn check_with(cuda: &Cuda, c: Case, seed: u64, fold: bool) {
    let p = c.params();
    let (row, q_row) = (c.n_kv * c.head_dim, p.n_heads * c.head_dim);
    let seq = c.prior + c.tokens;
    let k = random_f32(seq * row, seed, 2.0);
    let v = random_f32(seq * row, seed ^ 1, 1.0);
    let q = random_f32(c.tokens * q_row, seed ^ 2, 2.0);

    let mut cache = DeviceKvCache::new(cuda, 2, c.n_kv, c.head_dim, c.block_len).unwrap();
    cache.set_folded_combine(fold);
    let other = cuda.upload(&random_f32(seq * row, seed ^ 3, 5.0)).unwrap();
    cache.append(cuda, 0, &other, &other, seq).unwrap();
    // The prior tokens arrive in two appends, so some appends start inside a block.
    let split = c.prior / 3;
    for (from, to) in [(0, split), (split, c.prior), (c.prior, seq)] {
        let dk = cuda.upload(&k[from * row..to * row]).unwrap();
        let dv = cuda.upload(&v[from * row..to * row]).unwrap();
        cache.append(cuda, 1, &dk, &dv, to - from).unwrap();
    }
    assert_eq!((cache.layer_len(1), cache.len()), (seq, seq));

    let mut want = vec![0f32; q.len()];
    if c.tokens == 1 {
        let (kb, vb) = (to_blocks(&k, row, c.block_len), to_blocks(&v, row, c.block_len));
        let kb: Vec<&[f32]> = kb.iter().map(|b| b.as_slice()).collect();
        let vb: Vec<&[f32]> = vb.iter().map(|b| b.as_slice()).collect();
        reference::attention_decode(&q, &kb, &vb, c.block_len, seq, &p, &mut want).unwrap();
    } else {
        reference::attention(&q, &k, &v, c.prior, &p, &mut want).unwrap();
    }
    let dq = cuda.upload(&q).unwrap();
    let mut dout = cuda.upload(&vec![f32::NAN; q.len()]).unwrap();
    ops::attention(cuda, &cache, 1, &dq, c.tokens, &p, &mut dout).unwrap();
    let got = cuda.download(&dout).unwrap();
    assert_close(&format!("{c:?}, fold {fold}"), &got, &want, ATOL, RTOL);
    if c.tokens == 1 {
        ops::attention(cuda, &cache, 0, &dq, 1, &p, &mut dout).unwrap();
        ops::attention(cuda, &cache, 1, &dq, 1, &p, &mut dout).unwrap();
        let again = cuda.download(&dout).unwrap();
        let same = got.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{c:?}, fold {fold}: a second decode of the same layer differs");
    }
}

fn case(n_kv: usize, group: usize, head_dim: usize, block_len: usize, prior: usize, tokens: usize) -> Case {
    Case { n_kv, group, head_dim, block_len, prior, tokens, window: None }
}

fn windowed(c: Case, window: usize) -> Case {
    Case { window: Some(window), ..c }
}

#[test]
fn decode_matches_the_reference() {
    let Some(cuda) = device_or_skip("decode_matches_the_reference") else { return };
    // Decode is the last token of a sequence of prior + 1.
    let cases = [
        case(2, 1, 64, 32, 0, 1),
        case(1, 4, 80, 16, 1, 1),
        case(2, 7, 128, 32, 32, 1),
        case(1, 7, 64, 32, 299, 1),
        windowed(case(4, 4, 128, 16, 299, 1), 100),
        case(1, 7, 64, 32, 1499, 1),
        windowed(case(2, 4, 80, 16, 1499, 1), 257),
        windowed(case(8, 4, 128, 32, 1499, 1), 33),
        windowed(case(1, 1, 96, 32, 32, 1), 1),
        // Groups larger than one block's heads: split over blocks, the last one partial.
        case(1, 16, 128, 32, 299, 1),
        case(1, 12, 64, 16, 69, 1),
        // head_dim above 128 (smaller key tiles), and ones that are no multiple of 32.
        case(2, 2, 256, 32, 299, 1),
        windowed(case(2, 1, 132, 16, 99, 1), 50),
        case(3, 3, 4, 16, 39, 1),
        // A long sequence with one KV head: many chunks to merge.
        case(1, 4, 128, 32, 16383, 1),
        // TinyLlama's heads at 512 and 513 keys: on a card of 32 or more SMs, 32 chunks (the
        // most the decode launch merges itself) and 33 (the combine launch's).
        case(4, 8, 64, 16, 511, 1),
        case(4, 8, 64, 16, 512, 1),
    ];
    for (i, c) in cases.into_iter().enumerate() {
        check_with(&cuda, c, 100 + i as u64, true);
        check_with(&cuda, c, 100 + i as u64, false);
    }
}

#[test]
fn prefill_matches_the_reference() {
    let Some(cuda) = device_or_skip("prefill_matches_the_reference") else { return };
    let cases = [
        case(1, 1, 64, 32, 0, 2),
        case(2, 4, 80, 16, 0, 33),
        windowed(case(1, 7, 128, 32, 0, 300), 100),
        case(2, 1, 64, 32, 0, 1500),
        windowed(case(1, 4, 96, 16, 0, 130), 17),
        case(1, 2, 256, 32, 0, 100),
        windowed(case(2, 2, 200, 16, 0, 70), 40),
        case(1, 1, 4, 16, 0, 65),
        windowed(case(1, 7, 128, 32, 0, 200), 1),
    ];
    for (i, c) in cases.into_iter().enumerate() {
        check(&cuda, c, 200 + i as u64);
    }
}

#[test]
fn a_chunk_appended_to_a_filled_cache_matches_the_reference() {
    let Some(cuda) = device_or_skip("a_chunk_appended_to_a_filled_cache_matches_the_reference") else { return };
    let cases = [
        case(1, 1, 64, 32, 1, 2),
        case(2, 4, 64, 16, 33, 5),
        windowed(case(1, 7, 128, 32, 300, 67), 100),
        windowed(case(1, 4, 80, 16, 1433, 67), 513),
        windowed(case(1, 2, 256, 32, 100, 129), 64),
        case(2, 7, 96, 16, 250, 300),
        case(1, 4, 128, 32, 1000, 500),
    ];
    for (i, c) in cases.into_iter().enumerate() {
        check(&cuda, c, 300 + i as u64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    #[test]
    fn attention_matches_the_reference_on_random_shapes(
        n_kv in 1usize..4,
        group in prop::sample::select(vec![1usize, 2, 4, 7, 9]),
        head_dim in prop::sample::select(vec![4usize, 8, 64, 80, 96, 128, 132, 256]),
        block_len in 1usize..40,
        prior in 0usize..90,
        tokens in 1usize..90,
        window in prop::option::of(1usize..120),
        seed in any::<u64>(),
    ) {
        let Some(cuda) = device_or_skip("attention_matches_the_reference_on_random_shapes") else { return Ok(()) };
        check(&cuda, Case { n_kv, group, head_dim, block_len, prior, tokens, window }, seed);
    }
}

#[test]
fn the_cache_grows_by_blocks_and_reads_back() {
    let Some(cuda) = device_or_skip("the_cache_grows_by_blocks_and_reads_back") else { return };
    let (n_kv, hd, block_len) = (2, 8, 4);
    let row = n_kv * hd;
    let block_bytes = block_len * row * 4;
    let mut cache = DeviceKvCache::new(&cuda, 3, n_kv, hd, block_len).unwrap();
    assert!(cache.is_empty());
    assert_eq!((cache.allocated_bytes(), cache.block_len(), cache.n_layers()), (0, block_len, 3));
    let k = random_f32(11 * row, 1, 1.0);
    let v = random_f32(11 * row, 2, 1.0);
    let (dk, dv) = (cuda.upload(&k).unwrap(), cuda.upload(&v).unwrap());
    // Layer 0 gets 1 token, then 2 more (still one block), then 8 (three blocks in all).
    cache.append(&cuda, 0, &dk, &dv, 1).unwrap();
    assert_eq!((cache.layer_len(0), cache.len(), cache.allocated_bytes()), (1, 0, 2 * block_bytes));
    let (dk1, dv1) = (cuda.upload(&k[row..]).unwrap(), cuda.upload(&v[row..]).unwrap());
    cache.append(&cuda, 0, &dk1, &dv1, 2).unwrap();
    assert_eq!((cache.layer_len(0), cache.allocated_bytes()), (3, 2 * block_bytes));
    let (dk3, dv3) = (cuda.upload(&k[3 * row..]).unwrap(), cuda.upload(&v[3 * row..]).unwrap());
    cache.append(&cuda, 0, &dk3, &dv3, 8).unwrap();
    assert_eq!((cache.layer_len(0), cache.allocated_bytes()), (11, 3 * 2 * block_bytes));
    assert_eq!(cache.download(&cuda, 0).unwrap(), (k.clone(), v.clone()), "layer 0 reads back");
    // The last layer sets len.
    cache.append(&cuda, 2, &dk, &dv, 5).unwrap();
    assert_eq!((cache.len(), cache.layer_len(1), cache.layer_len(2)), (5, 0, 5));
    assert_eq!(cache.allocated_bytes(), (3 + 2) * 2 * block_bytes);
    let (k2, v2) = cache.download(&cuda, 2).unwrap();
    assert_eq!((&k2[..], &v2[..]), (&k[..5 * row], &v[..5 * row]));
    // Zero tokens change nothing.
    cache.append(&cuda, 2, &dk, &dv, 0).unwrap();
    assert_eq!(cache.len(), 5);
    // Many blocks: the table outgrows its first buffer.
    let long = random_f32(200 * row, 3, 1.0);
    let dl = cuda.upload(&long).unwrap();
    cache.append(&cuda, 1, &dl, &dl, 200).unwrap();
    assert_eq!(cache.download(&cuda, 1).unwrap().0, long);

    cache.clear();
    assert!(cache.is_empty());
    assert_eq!((cache.allocated_bytes(), cache.layer_len(0)), (0, 0));
    cache.append(&cuda, 2, &dk, &dv, 3).unwrap();
    assert_eq!(cache.download(&cuda, 2).unwrap().1, v[..3 * row]);
}

#[test]
fn attention_after_clear_sees_only_the_new_tokens() {
    let Some(cuda) = device_or_skip("attention_after_clear_sees_only_the_new_tokens") else { return };
    let c = case(2, 2, 64, 16, 20, 1);
    let p = c.params();
    let row = 2 * 64;
    let mut cache = DeviceKvCache::new(&cuda, 1, 2, 64, 16).unwrap();
    let junk = cuda.upload(&vec![100.0f32; 40 * row]).unwrap();
    cache.append(&cuda, 0, &junk, &junk, 40).unwrap();
    cache.clear();
    let k = random_f32(21 * row, 5, 1.0);
    let v = random_f32(21 * row, 6, 1.0);
    cache.append(&cuda, 0, &cuda.upload(&k).unwrap(), &cuda.upload(&v).unwrap(), 21).unwrap();
    let q = random_f32(4 * 64, 7, 1.0);
    let mut want = vec![0f32; q.len()];
    reference::attention(&q, &k, &v, 20, &p, &mut want).unwrap();
    let mut out = cuda.zeros::<f32>(q.len()).unwrap();
    ops::attention(&cuda, &cache, 0, &cuda.upload(&q).unwrap(), 1, &p, &mut out).unwrap();
    assert_close("after clear", &cuda.download(&out).unwrap(), &want, ATOL, RTOL);
}

#[test]
fn bad_arguments_are_typed_errors() {
    let Some(cuda) = device_or_skip("bad_arguments_are_typed_errors") else { return };
    let (n_kv, hd) = (2, 64);
    let row = n_kv * hd;
    let p = case(n_kv, 2, hd, 16, 0, 1).params();
    let mut cache = DeviceKvCache::new(&cuda, 2, n_kv, hd, 16).unwrap();
    let kv = cuda.zeros::<f32>(5 * row).unwrap();
    let msg = |r: strata_kernels::Result<()>| match r {
        Err(e @ strata_kernels::Error::InvalidArgument { .. }) => e.to_string(),
        other => panic!("expected InvalidArgument, got {other:?}"),
    };

    assert!(msg(cache.append(&cuda, 2, &kv, &kv, 1)).contains("layer 2 is out of range"));
    assert!(msg(cache.append(&cuda, 0, &kv, &kv, 6)).contains(&format!("{} needed", 6 * row)));
    let short = cuda.zeros::<f32>(row).unwrap();
    assert!(msg(cache.append(&cuda, 0, &kv, &short, 2)).contains("v holds"));
    assert_eq!(cache.layer_len(0), 0, "a failed append adds nothing");
    cache.append(&cuda, 0, &kv, &kv, 5).unwrap();

    let q = cuda.zeros::<f32>(6 * 4 * hd).unwrap();
    let mut out = cuda.zeros::<f32>(6 * 4 * hd).unwrap();
    assert!(msg(ops::attention(&cuda, &cache, 2, &q, 1, &p, &mut out)).contains("layer 2 is out of range"));
    assert!(msg(ops::attention(&cuda, &cache, 0, &q, 6, &p, &mut out)).contains("holds only 5 tokens"));
    assert!(msg(ops::attention(&cuda, &cache, 1, &q, 1, &p, &mut out)).contains("holds only 0 tokens"));
    let mut short_out = cuda.zeros::<f32>(4 * hd).unwrap();
    assert!(msg(ops::attention(&cuda, &cache, 0, &q, 2, &p, &mut short_out)).contains("out holds"));
    let short_q = cuda.zeros::<f32>(4 * hd - 1).unwrap();
    assert!(msg(ops::attention(&cuda, &cache, 0, &short_q, 1, &p, &mut out)).contains("q holds"));
    let bad = AttentionParams { n_heads: 3, ..p };
    assert!(msg(ops::attention(&cuda, &cache, 0, &q, 1, &bad, &mut out)).contains("n_heads 3"));
    let bad = AttentionParams { n_kv_heads: 1, n_heads: 1, ..p };
    assert!(msg(ops::attention(&cuda, &cache, 0, &q, 1, &bad, &mut out)).contains("does not match the cache"));
    let bad = AttentionParams { sliding_window: Some(0), ..p };
    assert!(msg(ops::attention(&cuda, &cache, 0, &q, 1, &bad, &mut out)).contains("window of 0"));
    assert!(ops::attention(&cuda, &cache, 0, &q, 0, &p, &mut out).is_ok(), "zero tokens is a no-op");

    // Head dims the kernels do not take are named in the error.
    for bad_hd in [6usize, 260] {
        let mut c = DeviceKvCache::new(&cuda, 1, 1, bad_hd, 16).unwrap();
        let kv = cuda.zeros::<f32>(bad_hd).unwrap();
        c.append(&cuda, 0, &kv, &kv, 1).unwrap();
        let p = AttentionParams { n_heads: 1, n_kv_heads: 1, head_dim: bad_hd, scale: 1.0, sliding_window: None };
        let mut out = cuda.zeros::<f32>(bad_hd).unwrap();
        assert!(msg(ops::attention(&cuda, &c, 0, &kv, 1, &p, &mut out)).contains(&format!("head_dim {bad_hd}")));
    }
    assert!(DeviceKvCache::new(&cuda, 1, 0, 64, 16).is_err());
    assert!(DeviceKvCache::new(&cuda, 1, 1, 64, 0).is_err());
}
