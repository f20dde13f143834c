//! Fused q/k RoPE on the GPU against the CPU reference applied to q and to k, in f32, f16 and
//! bf16, both pairings, GQA head counts, partial rotary dimensions and positions up to ~40000.
#![cfg(feature = "cuda")]

use half::{bf16, f16};
use proptest::prelude::*;
use strata_kernels::Cuda;
use strata_kernels::cuda::ops::{self, RopeArgs, RopeElem};
use strata_kernels::cuda::testing::{assert_close, device_or_skip, random_f32};
use strata_tensor::cpu::{RopeLayout, reference};

/// One element type: how f32 rounds to it and back, and the tolerance of a rotated element
/// against the reference run on the rounded input and rounded again (about one ulp of the type
/// plus the f32 difference of the device's sincosf).
trait Elem: RopeElem + Copy + Default + std::fmt::Debug {
    const NAME: &'static str;
    /// Relative tolerance: one ulp of the type (f32: a few of its ulps).
    const RTOL: f32;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    const NAME: &'static str = "f32";
    const RTOL: f32 = 2e-6;
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for f16 {
    const NAME: &'static str = "f16";
    const RTOL: f32 = 1.0 / 1024.0;
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl Elem for bf16 {
    const NAME: &'static str = "bf16";
    const RTOL: f32 = 1.0 / 128.0;
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// Llama-style inverse frequencies for `n_pairs` pairs.
fn inv_freq(n_pairs: usize, base: f32) -> Vec<f32> {
    (0..n_pairs).map(|i| 1.0 / base.powf((2 * i) as f32 / (2 * n_pairs).max(1) as f32)).collect()
}

/// One case: the shape, the rotary pairs, the positions and the input scale.
#[derive(Clone, Debug)]
struct Case {
    args: RopeArgs,
    n_pairs: usize,
    positions: Vec<u32>,
    seed: u64,
}

/// Runs `case` on the device in type `T` and compares q and k with the reference.
fn check<T: Elem>(cuda: &Cuda, case: &Case) {
    let a = case.args;
    let scale = 2.0;
    let round = |v: Vec<f32>| -> Vec<T> { v.into_iter().map(T::from_f32).collect() };
    let q: Vec<T> = round(random_f32(a.tokens * a.n_heads * a.head_dim, case.seed, scale));
    let k: Vec<T> = round(random_f32(a.tokens * a.n_kv_heads * a.head_dim, case.seed ^ 7, scale));
    let freqs = inv_freq(case.n_pairs, 10000.0);
    let pos: Vec<usize> = case.positions.iter().map(|&p| p as usize).collect();

    let want = |x: &[T], heads: usize| -> Vec<f32> {
        let mut v: Vec<f32> = x.iter().map(|e| e.to_f32()).collect();
        reference::rope(&mut v, &pos, heads, a.head_dim, &freqs, a.attention_factor, a.layout).unwrap();
        v.into_iter().map(|e| T::from_f32(e).to_f32()).collect()
    };
    let (want_q, want_k) = (want(&q, a.n_heads), want(&k, a.n_kv_heads));

    let mut dq = cuda.upload(&q).unwrap();
    let mut dk = cuda.upload(&k).unwrap();
    let dpos = cuda.upload(&case.positions).unwrap();
    // An empty upload is a one-element buffer (the driver allocates no zero bytes): the table
    // is the first `n_pairs` of it, none when nothing rotates.
    let dfreq = cuda.upload(&freqs).unwrap();
    let dfreq = dfreq.slice(0..freqs.len());
    ops::rope_qk(cuda, &mut dq, &mut dk, &dpos, &dfreq, &a).unwrap();
    let got = |d| -> Vec<f32> { cuda.download(d).unwrap().into_iter().map(|e: T| e.to_f32()).collect() };
    // The f32 results may differ by a few ulp of the products' size (scale x attention_factor).
    let atol = 4e-6 * scale * a.attention_factor;
    let what = format!("{} {case:?}", T::NAME);
    assert_close(&format!("q: {what}"), &got(&dq)[..want_q.len()], &want_q, atol, T::RTOL);
    assert_close(&format!("k: {what}"), &got(&dk)[..want_k.len()], &want_k, atol, T::RTOL);
}

fn check_all(cuda: &Cuda, case: &Case) {
    check::<f32>(cuda, case);
    check::<f16>(cuda, case);
    check::<bf16>(cuda, case);
}

/// Positions spread up to ~40000, not in order.
fn positions(tokens: usize, first: u32) -> Vec<u32> {
    (0..tokens as u32).map(|t| (first + t * 7919) % 40_961).collect()
}

#[test]
fn model_head_sizes_match_the_reference() {
    let Some(cuda) = device_or_skip("model_head_sizes_match_the_reference") else { return };
    // (tokens, n_heads, n_kv_heads, head_dim, rotary pairs): Llama, SmolLM, Qwen, Phi partial
    // rotary, odd sizes; few tokens split a token's heads over several blocks, 130 tokens take
    // a block per token, and 72 heads x 64 pairs needs two.
    let shapes = [
        (37, 32, 8, 128, 64),
        (1, 32, 8, 128, 64),
        (3, 40, 8, 64, 32),
        (5, 9, 3, 64, 32),
        (130, 64, 8, 128, 64),
        (7, 32, 32, 80, 40),
        (9, 12, 4, 80, 16),
        (4, 5, 1, 81, 40),
        (3, 2, 2, 6, 1),
        (2, 3, 1, 97, 13),
    ];
    for (tokens, n_heads, n_kv_heads, head_dim, n_pairs) in shapes {
        for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
            let args = RopeArgs { tokens, n_heads, n_kv_heads, head_dim, attention_factor: 1.0, layout };
            let case = Case { args, n_pairs, positions: positions(tokens, 39_000), seed: tokens as u64 };
            check_all(&cuda, &case);
        }
    }
}

#[test]
fn large_positions_and_attention_factor() {
    let Some(cuda) = device_or_skip("large_positions_and_attention_factor") else { return };
    for &first in &[0u32, 32_767, 40_000, 131_071] {
        let args = RopeArgs {
            tokens: 11,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
            attention_factor: 1.25,
            layout: RopeLayout::RotateHalf,
        };
        let positions = (0..11).map(|t| first + t).collect();
        check_all(&cuda, &Case { args, n_pairs: 32, positions, seed: first as u64 });
    }
}

#[test]
fn nothing_to_rotate_is_a_no_op() {
    let Some(cuda) = device_or_skip("nothing_to_rotate_is_a_no_op") else { return };
    let x = random_f32(64, 3, 1.0);
    let mut q = cuda.upload(&x).unwrap();
    let mut k = cuda.upload(&x).unwrap();
    let pos = cuda.upload(&[5u32]).unwrap();
    let freqs = cuda.upload(&[1.0f32]).unwrap();
    let no_freqs = freqs.slice(0..0);
    let args = RopeArgs {
        tokens: 1,
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: 64,
        attention_factor: 1.0,
        layout: RopeLayout::RotateHalf,
    };
    ops::rope_qk(&cuda, &mut q, &mut k, &pos, &no_freqs, &args).unwrap();
    ops::rope_qk(&cuda, &mut q, &mut k, &pos, &freqs, &RopeArgs { tokens: 0, ..args }).unwrap();
    assert_eq!(cuda.download(&q).unwrap(), x);
    assert_eq!(cuda.download(&k).unwrap(), x);
}

#[test]
fn bad_shapes_are_typed_errors() {
    let Some(cuda) = device_or_skip("bad_shapes_are_typed_errors") else { return };
    let mut q = cuda.zeros::<f32>(2 * 4 * 8).unwrap();
    let mut k = cuda.zeros::<f32>(2 * 2 * 8).unwrap();
    let pos = cuda.zeros::<u32>(2).unwrap();
    let freqs = cuda.zeros::<f32>(5).unwrap();
    let args = RopeArgs {
        tokens: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        attention_factor: 1.0,
        layout: RopeLayout::Interleaved,
    };
    let is_invalid = |r: strata_kernels::Result<()>, needle: &str| match r {
        Err(strata_kernels::Error::InvalidArgument { message, .. }) => assert!(message.contains(needle), "{message}"),
        other => panic!("expected InvalidArgument about {needle}, got {other:?}"),
    };
    // Five pairs rotate ten dimensions of eight.
    is_invalid(ops::rope_qk(&cuda, &mut q, &mut k, &pos, &freqs, &args), "more than head_dim");
    let freqs = freqs.slice(0..4);
    is_invalid(ops::rope_qk(&cuda, &mut q, &mut k, &pos.slice(0..1), &freqs, &args), "positions holds");
    is_invalid(ops::rope_qk(&cuda, &mut q, &mut k, &pos, &freqs, &RopeArgs { n_heads: 5, ..args }), "q holds");
    is_invalid(ops::rope_qk(&cuda, &mut q, &mut k, &pos, &freqs, &RopeArgs { n_kv_heads: 3, ..args }), "k holds");
    ops::rope_qk(&cuda, &mut q, &mut k, &pos, &freqs, &args).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn random_shapes_match_the_reference(
        tokens in 1usize..9,
        n_kv_heads in 1usize..5,
        group in 1usize..5,
        head_dim in prop::sample::select(vec![1usize, 2, 7, 16, 63, 64, 80, 96, 127, 128, 130, 256]),
        rot_frac in 0.0f64..=1.0,
        interleaved: bool,
        first in 0u32..40_000,
        factor in 0.5f32..2.0,
        seed: u64,
    ) {
        let Some(cuda) = device_or_skip("random_shapes_match_the_reference") else { return Ok(()) };
        let n_pairs = ((head_dim / 2) as f64 * rot_frac) as usize;
        let layout = if interleaved { RopeLayout::Interleaved } else { RopeLayout::RotateHalf };
        let args = RopeArgs { tokens, n_heads: n_kv_heads * group, n_kv_heads, head_dim, attention_factor: factor, layout };
        check_all(&cuda, &Case { args, n_pairs, positions: positions(tokens, first), seed });
    }
}

/// `DeviceKvCache::append_rotated` is `rope_qk` then `append`, bit for bit: the same q, the same
/// cache contents, over two appends (a prefill, then a decode step that starts inside a block),
/// with partial rotary dimensions and both pairings; the k buffer is left as it was.
#[test]
fn append_rotated_is_rope_then_append() {
    use strata_kernels::cuda::kv::DeviceKvCache;
    let Some(cuda) = device_or_skip("append_rotated_is_rope_then_append") else { return };
    let (n_heads, n_kv, hd, n_pairs, block_len) = (6, 2, 64, 24, 4);
    for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
        let (mut fused, mut split) = (
            DeviceKvCache::new(&cuda, 1, n_kv, hd, block_len).unwrap(),
            DeviceKvCache::new(&cuda, 1, n_kv, hd, block_len).unwrap(),
        );
        let freqs = cuda.upload(&inv_freq(n_pairs, 10000.0)).unwrap();
        let mut pos0 = 0u32;
        for tokens in [7usize, 1] {
            let args = RopeArgs { tokens, n_heads, n_kv_heads: n_kv, head_dim: hd, attention_factor: 1.1, layout };
            let pos = cuda.upload(&positions(tokens, pos0)).unwrap();
            let q = random_f32(tokens * n_heads * hd, tokens as u64, 2.0);
            let k = random_f32(tokens * n_kv * hd, tokens as u64 ^ 5, 2.0);
            let v = random_f32(tokens * n_kv * hd, tokens as u64 ^ 6, 2.0);
            let (mut fq, fk, dv) = (cuda.upload(&q).unwrap(), cuda.upload(&k).unwrap(), cuda.upload(&v).unwrap());
            fused.append_rotated(&cuda, 0, &mut fq, &fk, &dv, &pos, &freqs, &args).unwrap();
            let (mut sq, mut sk) = (cuda.upload(&q).unwrap(), cuda.upload(&k).unwrap());
            ops::rope_qk::<f32, _, _, _, _>(&cuda, &mut sq, &mut sk, &pos, &freqs, &args).unwrap();
            split.append(&cuda, 0, &sk, &dv, tokens).unwrap();
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            assert_eq!(bits(cuda.download(&fq).unwrap()), bits(cuda.download(&sq).unwrap()), "{layout:?}: q");
            assert_eq!(bits(cuda.download(&fk).unwrap()), bits(k.clone()), "{layout:?}: the k buffer changed");
            let ((fk, fv), (sk, sv)) = (fused.download(&cuda, 0).unwrap(), split.download(&cuda, 0).unwrap());
            assert_eq!((bits(fk), bits(fv)), (bits(sk), bits(sv)), "{layout:?}: the cache after {tokens} tokens");
            pos0 += tokens as u32;
        }
    }
}
