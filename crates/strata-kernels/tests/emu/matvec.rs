//! `kernels/matvec.cu`: every matvec kernel, both activation paths for block-quantized weights,
//! against the CPU references.

use strata_tensor::cpu::reference;
use strata_tensor::{DType, Tensor};

use crate::driver::{Arg, build, f32_bytes, f32s, launch, random_f32};
use crate::elementwise::emulated_swiglu;

/// The kernels' launch shape (`kernels/include/matvec.h`): warps per block for 1 and 2 tokens
/// (the integer kernels of q4_k and q6_k: fewer), and for 4 and 8; weight rows per warp.
const WARPS_DECODE: usize = 16;
const WARPS_DECODE_WIDE: usize = 8;
const WARPS: usize = 4;
const ROWS_PER_WARP: usize = 4;

/// Shared memory given to every emulated block: Hopper's opt-in limit, the most any kernel asks.
const SMEM: usize = 227 * 1024;

/// The matvec emulator.
fn emulator() -> Option<std::path::PathBuf> {
    build("emu_matvec.cpp")
}

/// Runs `kernel` on weight `w` and `tokens` rows of `x` (the kernel's token count at least
/// `tokens`) on `blocks` emulated blocks, as the launcher would; returns y for `tokens + 1`
/// rows, the last of which the kernel must leave at its sentinel.
fn run(kernel: &str, w: &Tensor, x: &[f32], tokens: usize, blocks: usize, threads: usize) -> Vec<f32> {
    run_split(kernel, w, &f32_bytes(x), tokens, blocks, threads, Store::Write, ACTS_F32, 0)
}

/// MatvecParams::acts: x as f32 values, or as two-digit records (`kernels/include/actq.cuh`).
const ACTS_F32: u32 = 0;
const ACTS_Q16: u32 = 1;

/// MatvecParams as C lays it out: u32 rows, u32 cols, u64 row_bytes, u64 total_bytes, u32 tokens,
/// u32 store, u32 acts, u32 experts, u64 x_slot, u64 y_slot, f32 norm_eps, u32 splits;
/// experts, x_slot and y_slot 0 (no Mixture-of-Experts slots), norm_eps 1e-5, splits 0 (a warp
/// per group of rows; [`run_split`] sets it).
fn params(n: usize, k: usize, row_bytes: usize, total: usize, tokens: usize, store: u32, acts: u32) -> Vec<u8> {
    slot_params(n, k, row_bytes, total, tokens, store, acts, [0, 0, 0])
}

/// [`params`] of a Mixture-of-Experts launch: `[experts, x_slot, y_slot]`.
#[allow(clippy::too_many_arguments)]
fn slot_params(
    n: usize,
    k: usize,
    row_bytes: usize,
    total: usize,
    tokens: usize,
    store: u32,
    acts: u32,
    [experts, x_slot, y_slot]: [usize; 3],
) -> Vec<u8> {
    [
        &(n as u32).to_le_bytes()[..],
        &(k as u32).to_le_bytes(),
        &(row_bytes as u64).to_le_bytes(),
        &(total as u64).to_le_bytes(),
        &(tokens as u32).to_le_bytes(),
        &store.to_le_bytes(),
        &acts.to_le_bytes(),
        &(experts as u32).to_le_bytes(),
        &(x_slot as u64).to_le_bytes(),
        &(y_slot as u64).to_le_bytes(),
        &NORM_EPS.to_le_bytes(),
        &[0; 4],
    ]
    .concat()
}

/// The epsilon of the launches' RMSNorm (used when a norm weight is passed).
const NORM_EPS: f32 = 1e-5;

/// What the kernel does with its products (the launch's `store`).
#[derive(Clone, Copy)]
enum Store<'a> {
    Write,
    /// Adds them to y, which starts as these values.
    Add(&'a [f32]),
    /// SwiGLU of paired gate and up rows: y has half the rows' outputs per token.
    Swiglu,
}

impl Store<'_> {
    /// MatvecParams::store, and the outputs per token of a weight of `n` rows.
    fn code_and_outputs(self, n: usize) -> (u32, usize) {
        match self {
            Store::Write => (0, n),
            Store::Add(_) => (1, n),
            Store::Swiglu => (2, n / 2),
        }
    }

    /// y's values before the launch for `rows` rows of `outputs`: the values added to, or NaN.
    fn start(self, rows: usize, outputs: usize) -> Vec<f32> {
        match self {
            Store::Add(y0) => y0.to_vec(),
            _ => vec![f32::NAN; rows * outputs],
        }
    }
}

/// [`run`] on activations `xb` (f32 values, or two-digit records with [`ACTS_Q16`]), the products
/// stored as `store` says, with MatvecParams::splits = `splits` (the warps that share each group
/// of rows; 0: one each).
#[allow(clippy::too_many_arguments)]
fn run_split(
    kernel: &str,
    w: &Tensor,
    xb: &[u8],
    tokens: usize,
    blocks: usize,
    threads: usize,
    store: Store,
    acts: u32,
    splits: u32,
) -> Vec<f32> {
    let emu = emulator().expect("checked by the caller");
    let (n, k) = (w.shape().dims()[0], w.shape().dims()[1]);
    let want_x = if acts == ACTS_F32 { 4 * tokens * k } else { tokens * record_bytes(k) };
    assert_eq!(xb.len(), want_x);
    let mut bytes = w.cpu_bytes().unwrap().to_vec();
    let (code, outputs) = store.code_and_outputs(n);
    let mut p = params(n, k, w.row_bytes(), bytes.len(), tokens, code, acts);
    let at = p.len() - 4;
    p[at..].copy_from_slice(&splits.to_le_bytes());
    let mut xb = xb.to_vec();
    let start = store.start(tokens, outputs);
    assert_eq!(start.len(), tokens * outputs);
    let mut y = f32_bytes(&[start, vec![-7f32; outputs]].concat());
    let mut args =
        [Arg::Buf(&mut bytes, 0), Arg::Buf(&mut xb, 0), Arg::Buf(&mut y, 0), Arg::Null, Arg::Null, Arg::Null];
    launch(&emu, kernel, [blocks as u32, 1, 1], threads as u32, SMEM, &p, &mut args);
    f32s(&y)
}

/// [`run_split`] on f32 activations `x` that the kernel normalises with RMSNorm weight `norm` as
/// it stages them.
#[allow(clippy::too_many_arguments)]
fn run_normed(
    kernel: &str,
    w: &Tensor,
    x: &[f32],
    norm: &[f32],
    tokens: usize,
    blocks: usize,
    threads: usize,
    store: Store,
) -> Vec<f32> {
    let emu = emulator().expect("checked by the caller");
    let (n, k) = (w.shape().dims()[0], w.shape().dims()[1]);
    let mut bytes = w.cpu_bytes().unwrap().to_vec();
    let (code, outputs) = store.code_and_outputs(n);
    let p = params(n, k, w.row_bytes(), bytes.len(), tokens, code, ACTS_F32);
    let mut xb = f32_bytes(x);
    let mut nb = f32_bytes(norm);
    let mut y = f32_bytes(&[store.start(tokens, outputs), vec![-7f32; outputs]].concat());
    let mut args = [
        Arg::Buf(&mut bytes, 0),
        Arg::Buf(&mut xb, 0),
        Arg::Buf(&mut y, 0),
        Arg::Null,
        Arg::Null,
        Arg::Buf(&mut nb, 0),
    ];
    launch(&emu, kernel, [blocks as u32, 1, 1], threads as u32, SMEM, &p, &mut args);
    f32s(&y)
}

/// One Mixture-of-Experts launch of `kernel` (one token per slot): slot `s` multiplies expert
/// `ids[s]` of `experts` (one shape and dtype) with `xb`'s row `s` (`x_slot` bytes apart; 0: all
/// slots read the one row), into y's row `s`; `blocks` blocks per slot. Returns y, a row per
/// slot (NaN where no slot wrote) and a sentinel row.
#[allow(clippy::too_many_arguments)]
fn run_experts(
    kernel: &str,
    experts: &[Tensor],
    ids: &[u32],
    xb: &[u8],
    x_slot: usize,
    blocks: usize,
    threads: usize,
    store: Store,
    acts: u32,
    norm: Option<&[f32]>,
) -> Vec<f32> {
    let emu = emulator().expect("checked by the caller");
    let w = &experts[0];
    let (n, k) = (w.shape().dims()[0], w.shape().dims()[1]);
    let (code, outputs) = store.code_and_outputs(n);
    let slots = ids.len();
    let total = w.byte_len();
    let p = slot_params(n, k, w.row_bytes(), total, 1, code, acts, [experts.len(), x_slot, outputs]);
    let mut xb = xb.to_vec();
    let start = store.start(slots, outputs);
    let mut y = f32_bytes(&[start, vec![-7f32; outputs]].concat());
    let mut idb: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut weights: Vec<Vec<u8>> = experts.iter().map(|e| e.cpu_bytes().unwrap().to_vec()).collect();
    let mut nb = norm.map(f32_bytes).unwrap_or_default();
    // Buffers: x 0, y 1, ids 2, the norm's weight 3 if any, then the experts' weights (reached
    // through the table only).
    let first = if norm.is_some() { 4 } else { 3 };
    let mut args = vec![
        Arg::Null,
        Arg::Buf(&mut xb, 0),
        Arg::Buf(&mut y, 0),
        Arg::Table((first..first + experts.len()).collect()),
        Arg::Buf(&mut idb, 0),
        if norm.is_some() { Arg::Buf(&mut nb, 0) } else { Arg::Null },
    ];
    args.extend(weights.iter_mut().map(Arg::Extra));
    launch(&emu, kernel, [blocks as u32, slots as u32, 1], threads as u32, SMEM, &p, &mut args);
    f32s(&y)
}

/// Bytes of one token's two-digit record of `k` activations (`STRATA_ACTQ_RECORD`): both digit
/// arrays, a unit and a sum per 32 columns, a sum per 8, padded to 16 bytes.
pub fn record_bytes(k: usize) -> usize {
    (k * 11 / 4).div_ceil(16) * 16
}

/// `matvec_quantize_x` on `tokens` rows of `x` (`blocks` blocks of 256 threads): the records.
pub fn quantize_x(x: &[f32], tokens: usize, k: usize, blocks: u32) -> Vec<u8> {
    let emu = emulator().expect("checked by the caller");
    let p = params(0, k, 0, 0, tokens, 0, ACTS_F32);
    let mut xb = f32_bytes(x);
    let mut xq = vec![0xA5u8; tokens * record_bytes(k)];
    let mut args = [Arg::Buf(&mut xb, 0), Arg::Buf(&mut xq, 0)];
    launch(&emu, "matvec_quantize_x", [blocks, 1, 1], 256, 0, &p, &mut args);
    xq
}

/// `matvec_quantize_x` writes each token's record as `actq.cuh` lays it out: digits within
/// -127..127 whose values 256 h + l times the block's unit are x to within a unit, the block sums
/// and the sums per 8 of those values; and every integer kernel reading the records
/// (`acts` = Q16: the blocks copy them) computes bit for bit what it computes quantizing x in
/// its blocks, at every token count, over one and several activation tiles and rounds of rows.
#[test]
fn emulated_integer_matvec_kernels_take_activations_quantized_once() {
    if emulator().is_none() {
        return;
    }
    let dtypes = [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4K, DType::Q6K];
    for (i, dtype) in dtypes.into_iter().enumerate() {
        let bl = dtype.block_len();
        for (n, k) in [(70, bl * (2304 / bl) + bl), (9, 8448)] {
            let seed = (i * 7919 + n * 31 + k) as u64 ^ 0xacc;
            let w = Tensor::from_f32_as(&random_f32(n * k, seed, 1.0), [n, k], dtype).unwrap();
            for tokens in [1usize, 2, 3, 8] {
                let mut x = random_f32(tokens * k, seed ^ 0x5eed, 2.0);
                for (b, xs) in x.chunks_mut(32).enumerate() {
                    xs[(b * 7) % 32] *= 30.0;
                }
                // Two blocks: each warp quantizes several blocks of 32.
                let xq = quantize_x(&x, tokens, k, 2);
                for t in 0..tokens {
                    let r = &xq[t * record_bytes(k)..(t + 1) * record_bytes(k)];
                    let word = |at: usize| <[u8; 4]>::try_from(&r[at..at + 4]).unwrap();
                    let value = |c: usize| 256 * i32::from(r[c] as i8) + i32::from(r[k + c] as i8);
                    for b in 0..k / 32 {
                        let d = f32::from_le_bytes(word(2 * k + 4 * b));
                        let s = i32::from_le_bytes(word(2 * k + k / 8 + 4 * b));
                        assert_eq!(
                            s,
                            (32 * b..32 * b + 32).map(value).sum::<i32>(),
                            "{dtype} k={k} token {t} block {b}"
                        );
                        for g in 0..4 {
                            let s8 = i32::from_le_bytes(word(2 * k + k / 4 + 4 * (4 * b + g)));
                            let c0 = 32 * b + 8 * g;
                            assert_eq!(s8, (c0..c0 + 8).map(value).sum::<i32>(), "{dtype} k={k} token {t} group {g}");
                        }
                        for c in 32 * b..32 * b + 32 {
                            assert!((r[c] as i8) > -128 && (r[k + c] as i8) > -128, "{dtype}: digit -128 at {c}");
                            let (v, want) = (d * value(c) as f32, x[t * k + c]);
                            assert!((v - want).abs() <= d, "{dtype} k={k} token {t}: x[{c}] = {want} came back {v}");
                        }
                    }
                }
                let t = tokens.next_power_of_two();
                let warps = match (t <= 2, dtype) {
                    (true, DType::Q4K | DType::Q6K) => WARPS_DECODE_WIDE,
                    (true, _) => WARPS_DECODE,
                    (false, _) => WARPS,
                };
                let blocks = n.div_ceil(ROWS_PER_WARP).div_ceil(warps).min(2);
                let kernel = format!("matvec_{}_i16_t{t}", dtype.name());
                let threads = warps * 32;
                let inblock = run(&kernel, &w, &x, tokens, blocks, threads);
                let copied = run_split(&kernel, &w, &xq, tokens, blocks, threads, Store::Write, ACTS_Q16, 0);
                assert!(copied[tokens * n..].iter().all(|&v| v == -7.0), "{kernel}: wrote past token {tokens}");
                for (j, (&g, &v)) in copied.iter().zip(&inblock).enumerate() {
                    assert_eq!(g.to_bits(), v.to_bits(), "{kernel} {n}x{k} tokens={tokens}: y[{j}] = {g}, want {v}");
                }
            }
        }
    }
}

/// Every block-quantized kernel, both activation paths (the float one at 1 and 2 tokens), on shapes that end a pipeline chunk
/// early, leave a partial group of rows, span several activation tiles, and need more than one
/// pass of the persistent grid over the rows; activations with an outlier per block of 32. The
/// integer kernels quantize x as the CPU's decode path does, so they match `reference::matvec`
/// (the same integers) up to the order of f32 sums: within 1e-6 of the sum of |w x| (1e-7 was
/// seen), where a quantization off by one unit in a block moves it by up to 3e-5. The float
/// kernels match `reference::matmul` within the GPU tests' 1e-4.
#[test]
fn emulated_quantized_matvec_kernels_match_the_cpu_references() {
    if emulator().is_none() {
        return;
    }
    let dtypes = [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4K, DType::Q6K];
    for (i, dtype) in dtypes.into_iter().enumerate() {
        let bl = dtype.block_len();
        // (rows, columns): one block; several chunks with a short last one; more than one
        // activation tile at one token (8192 columns).
        let shapes = [(5, bl), (70, bl * (2304 / bl) + bl), (9, 8448)];
        for (n, k) in shapes {
            let seed = (i * 7919 + n * 31 + k) as u64;
            let w = Tensor::from_f32_as(&random_f32(n * k, seed, 1.0), [n, k], dtype).unwrap();
            let wf = w.to_f32_vec().unwrap();
            for tokens in [1usize, 2, 3, 8] {
                let t = tokens.next_power_of_two();
                let mut x = random_f32(tokens * k, seed ^ 0x5eed, 2.0);
                for (b, xs) in x.chunks_mut(32).enumerate() {
                    xs[(b * 7) % 32] *= 30.0;
                }
                // The references, token by token.
                let (mut two, mut float) = (vec![0f32; tokens * n], vec![0f32; tokens * n]);
                for tok in 0..tokens {
                    let xt = &x[tok * k..(tok + 1) * k];
                    reference::matvec(&w, xt, &mut two[tok * n..(tok + 1) * n]).unwrap();
                }
                reference::matmul(&x, &w, &mut float).unwrap();
                for (suffix, want, relative) in [("_i16", &two, 1e-6), ("", &float, 1e-4)] {
                    if suffix.is_empty() && t > 2 {
                        continue; // the float kernels take 1 or 2 tokens
                    }
                    let warps = match (t <= 2, dtype, suffix) {
                        (true, DType::Q4K | DType::Q6K, "_i16") => WARPS_DECODE_WIDE,
                        (true, _, _) => WARPS_DECODE,
                        (false, _, _) => WARPS,
                    };
                    // Two blocks at most: the warps' groups of rows then take several rounds.
                    let blocks = n.div_ceil(ROWS_PER_WARP).div_ceil(warps).min(2);
                    let kernel = format!("matvec_{}{suffix}_t{t}", dtype.name());
                    let got = run(&kernel, &w, &x, tokens, blocks, warps * 32);
                    assert!(got[tokens * n..].iter().all(|&v| v == -7.0), "{kernel}: wrote past token {tokens}");
                    for (j, (&g, &v)) in got.iter().zip(want.iter()).enumerate() {
                        let (tok, r) = (j / n, j % n);
                        let (wr, xt) = (&wf[r * k..(r + 1) * k], &x[tok * k..(tok + 1) * k]);
                        let magnitude: f32 = wr.iter().zip(xt).map(|(a, b)| (a * b).abs()).sum();
                        let tol = 1e-5 + relative * magnitude;
                        assert!(
                            (g - v).abs() <= tol,
                            "{kernel} {n}x{k} tokens={tokens}: y[{tok}, {r}] = {g}, want {v} (tolerance {tol})"
                        );
                    }
                }
            }
        }
    }
}

/// Groups of rows split among 2, 4 or 8 warps (MatvecParams::splits), each warp a run of the
/// row's chunks, their sums added at the end: every block-quantized decode kernel (both
/// activation paths) matches the CPU references as the unsplit launch does, with rows whose
/// chunks do not divide among the warps (some warps get fewer, some none), a last partial group,
/// several rounds of the persistent grid, and each store: written, added to y (bit for bit y plus
/// the written product) and SwiGLU'd (bit for bit swiglu of the written products). Rows longer
/// than a tile are not split: the same bits as the unsplit launch.
#[test]
fn emulated_split_row_groups_match_the_references() {
    if emulator().is_none() {
        return;
    }
    let dtypes = [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4K, DType::Q6K];
    for (i, dtype) in dtypes.into_iter().enumerate() {
        let bl = dtype.block_len();
        // (rows, columns): 11 groups (the last of two paired rows short: no SwiGLU there) over
        // 5632 columns (a TinyLlama down projection's rows: 6 chunks of 1024, the last half
        // full, or 3 of 2048); 44 rows of 2304; 8 rows longer than a one-token tile.
        // The float path (kept for comparison) at one shape, the integer path at all.
        for (n, k, tokens, float_path) in [(42, 5632, 1, false), (44, bl * (2304 / bl), 2, true), (8, 8448, 1, false)] {
            let seed = (i * 131 + n * 7 + k) as u64;
            let w = Tensor::from_f32_as(&random_f32(n * k, seed, 1.0), [n, k], dtype).unwrap();
            let wf = w.to_f32_vec().unwrap();
            {
                let x = random_f32(tokens * k, seed ^ 0xabc, 2.0);
                let xb = f32_bytes(&x);
                let (mut two, mut float) = (vec![0f32; tokens * n], vec![0f32; tokens * n]);
                for tok in 0..tokens {
                    reference::matvec(&w, &x[tok * k..(tok + 1) * k], &mut two[tok * n..(tok + 1) * n]).unwrap();
                }
                reference::matmul(&x, &w, &mut float).unwrap();
                for (suffix, want, relative) in [("_i16", &two, 1e-6), ("", &float, 1e-4)] {
                    if suffix.is_empty() && !float_path {
                        continue;
                    }
                    let warps = match (dtype, suffix) {
                        (DType::Q4K | DType::Q6K, "_i16") => WARPS_DECODE_WIDE,
                        _ => WARPS_DECODE,
                    };
                    let kernel = format!("matvec_{}{suffix}_t{tokens}", dtype.name());
                    let unsplit = run_split(&kernel, &w, &xb, tokens, 1, warps * 32, Store::Write, ACTS_F32, 1);
                    // 2: the chunks split unevenly (q8_0's 11 of 512 columns); 8: some warps
                    // get none (6 chunks).
                    for splits in [2u32, 8] {
                        let run = |store, blocks| {
                            run_split(&kernel, &w, &xb, tokens, blocks, warps * 32, store, ACTS_F32, splits)
                        };
                        let what = format!("{kernel} {n}x{k} splits={splits}");
                        // One block: the groups take several rounds; two (below): a second
                        // block too.
                        let one_block = {
                            let got = run(Store::Write, 1);
                            assert!(got[tokens * n..].iter().all(|&v| v == -7.0), "{what}: wrote past the end");
                            if k > 8192 / tokens {
                                assert_eq!(got, unsplit, "{what}: a row past the tile was split");
                            }
                            for (j, (&g, &v)) in got.iter().zip(want.iter()).enumerate() {
                                let (tok, r) = (j / n, j % n);
                                let (wr, xt) = (&wf[r * k..(r + 1) * k], &x[tok * k..(tok + 1) * k]);
                                let magnitude: f32 = wr.iter().zip(xt).map(|(a, b)| (a * b).abs()).sum();
                                let tol = 1e-5 + relative * magnitude;
                                assert!(
                                    (g - v).abs() <= tol,
                                    "{what}: y[{tok}, {r}] = {g}, want {v} (tolerance {tol})"
                                );
                            }
                            got
                        };
                        // A group's sums go in the same order whichever block takes it.
                        let plain = run(Store::Write, 2);
                        assert_eq!(plain, one_block, "{what}: two blocks differ from one");
                        let y0 = random_f32(tokens * n, seed ^ 7, 50.0);
                        let added = run(Store::Add(&y0), 2);
                        for (j, (&g, (&a, &p))) in added.iter().zip(y0.iter().zip(&plain)).enumerate() {
                            assert_eq!(g.to_bits(), (a + p).to_bits(), "{what}: y[{j}] = {g}, want {a} + {p}");
                        }
                        let (mut gate, mut up) = (Vec::new(), Vec::new());
                        for row in plain[..tokens * n].chunks(n) {
                            for quad in row.chunks(4).filter(|q| q.len() == 4) {
                                gate.extend_from_slice(&quad[..2]);
                                up.extend_from_slice(&quad[2..]);
                            }
                        }
                        let swiglu = run(Store::Swiglu, 2);
                        let outputs = n / 2;
                        for tok in 0..tokens {
                            let want = emulated_swiglu(&gate[tok * (n / 4) * 2..], &up[tok * (n / 4) * 2..]);
                            let got = &swiglu[tok * outputs..tok * outputs + (n / 4) * 2];
                            for (j, (&g, &v)) in got.iter().zip(&want).enumerate() {
                                assert_eq!(g.to_bits(), v.to_bits(), "{what} swiglu: out[{tok}, {j}] = {g}, want {v}");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The float kernels (f32, f16, bf16; vector rows of a multiple of 16 bytes and element-by-element
/// ones) against `reference::matmul`, one block per 16 rows as the launcher grids them.
#[test]
fn emulated_float_matvec_kernels_match_the_cpu_reference() {
    if emulator().is_none() {
        return;
    }
    for (i, dtype) in [DType::F32, DType::F16, DType::BF16].into_iter().enumerate() {
        for (n, k) in [(7, 36), (21, 520), (3, 4100), (5, 9)] {
            let seed = (i * 104_729 + n * 31 + k) as u64;
            let w = Tensor::from_f32_as(&random_f32(n * k, seed, 1.0), [n, k], dtype).unwrap();
            let wf = w.to_f32_vec().unwrap();
            let vector = (k * dtype.block_bytes()).is_multiple_of(16);
            for tokens in [1usize, 2, 3, 8] {
                let t = tokens.next_power_of_two();
                let x = random_f32(tokens * k, seed ^ 0x5eed, 2.0);
                let mut want = vec![0f32; tokens * n];
                reference::matmul(&x, &w, &mut want).unwrap();
                let kernel = format!("matvec_{}{}_t{t}", dtype.name(), if vector { "" } else { "_scalar" });
                let got = run(&kernel, &w, &x, tokens, n.div_ceil(WARPS * ROWS_PER_WARP), WARPS * 32);
                assert!(got[tokens * n..].iter().all(|&v| v == -7.0), "{kernel}: wrote past token {tokens}");
                for (j, (&g, &v)) in got.iter().zip(&want).enumerate() {
                    let (tok, r) = (j / n, j % n);
                    let magnitude: f32 = (0..k).map(|c| (wf[r * k + c] * x[tok * k + c]).abs()).sum();
                    let tol = 1e-5 + 1e-4 * magnitude;
                    assert!((g - v).abs() <= tol, "{kernel} {n}x{k} tokens={tokens}: y[{tok}, {r}] = {g}, want {v}");
                }
            }
        }
    }
}

/// The float vector kernels with groups of rows split among 2 or 4 warps (MatvecParams::splits),
/// each warp every other (every fourth) run of 128 loads, a block then holding 2 (1) groups:
/// against `reference::matmul` within the unsplit test's tolerance, on rows of several activation
/// tiles whose last tile leaves some warps no run, a last partial group, one and two tokens; the
/// add store bit for bit y plus the written product.
#[test]
fn emulated_float_matvec_kernels_split_row_groups() {
    if emulator().is_none() {
        return;
    }
    for (i, dtype) in [DType::F32, DType::F16, DType::BF16].into_iter().enumerate() {
        for (n, k) in [(42, 5632), (9, 2048)] {
            let seed = (i * 7_919 + n * 31 + k) as u64;
            let w = Tensor::from_f32_as(&random_f32(n * k, seed, 1.0), [n, k], dtype).unwrap();
            let wf = w.to_f32_vec().unwrap();
            for tokens in [1usize, 2] {
                let x = random_f32(tokens * k, seed ^ 0x5eed, 2.0);
                let xb = f32_bytes(&x);
                let mut want = vec![0f32; tokens * n];
                reference::matmul(&x, &w, &mut want).unwrap();
                let kernel = format!("matvec_{}_t{tokens}", dtype.name());
                for splits in [2u32, 4] {
                    let what = format!("{kernel} {n}x{k} splits={splits}");
                    let blocks = n.div_ceil(WARPS / splits as usize * ROWS_PER_WARP);
                    let run = |store| run_split(&kernel, &w, &xb, tokens, blocks, WARPS * 32, store, ACTS_F32, splits);
                    let got = run(Store::Write);
                    assert!(got[tokens * n..].iter().all(|&v| v == -7.0), "{what}: wrote past token {tokens}");
                    for (j, (&g, &v)) in got.iter().zip(&want).enumerate() {
                        let (tok, r) = (j / n, j % n);
                        let magnitude: f32 = (0..k).map(|c| (wf[r * k + c] * x[tok * k + c]).abs()).sum();
                        let tol = 1e-5 + 1e-4 * magnitude;
                        assert!((g - v).abs() <= tol, "{what}: y[{tok}, {r}] = {g}, want {v}");
                    }
                    let y0 = random_f32(tokens * n, seed ^ 3, 50.0);
                    let added = run(Store::Add(&y0));
                    for (j, (&g, (&a, &p))) in added.iter().zip(y0.iter().zip(&got)).enumerate() {
                        assert_eq!(g.to_bits(), (a + p).to_bits(), "{what}: y[{j}] = {g}, want {a} + {p}");
                    }
                }
            }
        }
    }
}

/// Every kernel's other stores: adding to y exactly what it would have written (y0 + the written
/// product, rounded once, bit for bit), and SwiGLU of paired gate and up rows (what `swiglu_f32`
/// makes of the written products, bit for bit); nothing past the last token.
#[test]
fn emulated_matvec_kernels_add_to_y_and_swiglu() {
    if emulator().is_none() {
        return;
    }
    // Rows: a multiple of four (paired gate and up rows), a last group the persistent grid takes
    // in a second round.
    let (n, k) = (44, 2304);
    // (kernel prefix, dtype, warps per block at 1 and 2 tokens)
    let cases = [
        ("matvec_f32", DType::F32, WARPS),
        ("matvec_f16_scalar", DType::F16, WARPS),
        ("matvec_bf16", DType::BF16, WARPS),
        ("matvec_q8_0_i16", DType::Q8_0, WARPS_DECODE),
        ("matvec_q4_0", DType::Q4_0, WARPS_DECODE),
        ("matvec_q4_1_i16", DType::Q4_1, WARPS_DECODE),
        ("matvec_q4_k_i16", DType::Q4K, WARPS_DECODE_WIDE),
        ("matvec_q6_k_i16", DType::Q6K, WARPS_DECODE_WIDE),
    ];
    for (i, (prefix, dtype, decode_warps)) in cases.into_iter().enumerate() {
        // f16 rows of 2303 columns are not a multiple of 16 bytes: the _scalar kernel.
        let k = if dtype == DType::F16 { k - 1 } else { k };
        let w = Tensor::from_f32_as(&random_f32(n * k, 17 + i as u64, 1.0), [n, k], dtype).unwrap();
        for tokens in [1usize, 3] {
            let t = tokens.next_power_of_two();
            if !prefix.ends_with("_i16") && dtype.is_quantized() && t > 2 {
                continue;
            }
            let warps = if t <= 2 { decode_warps } else { WARPS };
            // Float kernels: a block per 16 rows; block-quantized ones persistent, two blocks.
            let groups = n.div_ceil(ROWS_PER_WARP).div_ceil(warps);
            let blocks = if dtype.is_quantized() { groups.min(2) } else { groups };
            let kernel = format!("{prefix}_t{t}");
            let x = random_f32(tokens * k, 99 + i as u64, 2.0);
            let y0 = random_f32(tokens * n, 7 + i as u64, 50.0);
            let plain = run(&kernel, &w, &x, tokens, blocks, warps * 32);
            let xb = f32_bytes(&x);
            let got = run_split(&kernel, &w, &xb, tokens, blocks, warps * 32, Store::Add(&y0), ACTS_F32, 0);
            assert!(got[tokens * n..].iter().all(|&v| v == -7.0), "{kernel}: wrote past token {tokens}");
            for (j, (&g, (&a, &p))) in got.iter().zip(y0.iter().zip(&plain)).enumerate() {
                assert_eq!(g.to_bits(), (a + p).to_bits(), "{kernel} tokens={tokens}: y[{j}] = {g}, want {a} + {p}");
            }

            // SwiGLU, the weight read as paired gate and up rows: what swiglu makes of the
            // written products, bit for bit.
            let (mut gate, mut up) = (Vec::new(), Vec::new());
            for row in plain[..tokens * n].chunks(n) {
                for quad in row.chunks(4) {
                    gate.extend_from_slice(&quad[..2]);
                    up.extend_from_slice(&quad[2..]);
                }
            }
            let want = emulated_swiglu(&gate, &up);
            let got = run_split(&kernel, &w, &xb, tokens, blocks, warps * 32, Store::Swiglu, ACTS_F32, 0);
            assert!(got[tokens * n / 2..].iter().all(|&v| v == -7.0), "{kernel} swiglu: wrote past token {tokens}");
            for (j, (&g, &v)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), v.to_bits(), "{kernel} swiglu tokens={tokens}: out[{j}] = {g}, want {v}");
            }
        }
    }
}

/// A Mixture-of-Experts launch (a block row per slot, each slot's weight looked up by its expert
/// id in a table of addresses) computes for every slot bit for bit what a launch on its expert
/// alone computes, with the slots sharing one row of x or each reading its own (f32 values or
/// two-digit records), written or SwiGLU'd; a slot whose id is unused (`u32::MAX`) or at the
/// expert count leaves its row of y alone, and nothing is written past the slots.
#[test]
fn emulated_matvec_kernels_compute_each_experts_product_in_one_launch() {
    if emulator().is_none() {
        return;
    }
    // (kernel, dtype, warps per block at one token, rows, columns)
    let cases = [
        ("matvec_q4_0_i16_t1", DType::Q4_0, WARPS_DECODE, 44, 2304),
        ("matvec_q4_k_i16_t1", DType::Q4K, WARPS_DECODE_WIDE, 12, 8448),
        ("matvec_q8_0_t1", DType::Q8_0, WARPS_DECODE, 20, 512),
        ("matvec_bf16_t1", DType::BF16, WARPS, 36, 520),
        ("matvec_f32_scalar_t1", DType::F32, WARPS, 8, 37),
    ];
    let ids = [3u32, u32::MAX, 0, 5];
    for (i, (kernel, dtype, warps, n, k)) in cases.into_iter().enumerate() {
        let experts: Vec<Tensor> = (0..5)
            .map(|e| Tensor::from_f32_as(&random_f32(n * k, (i * 10 + e) as u64, 1.0), [n, k], dtype).unwrap())
            .collect();
        let groups = n.div_ceil(ROWS_PER_WARP).div_ceil(warps);
        // Block-quantized kernels: persistent, one block per slot (the rows take several
        // rounds); float ones a block per group of rows.
        let blocks = if dtype.is_quantized() { 1 } else { groups };
        let threads = warps * 32;
        let integer = kernel.contains("_i16");
        // Each slot's own row of x, or one row for all.
        let x = random_f32(ids.len() * k, 500 + i as u64, 2.0);
        for shared in [false, true] {
            for store in [Store::Write, Store::Swiglu] {
                let code = if matches!(store, Store::Swiglu) { "swiglu" } else { "write" };
                let outputs = if matches!(store, Store::Swiglu) { n / 2 } else { n };
                let row = |s: usize| if shared { &x[..k] } else { &x[s * k..(s + 1) * k] };
                let mut inputs = vec![(f32_bytes(if shared { &x[..k] } else { &x }), 4 * k, ACTS_F32)];
                if integer {
                    let rows = if shared { 1 } else { ids.len() };
                    inputs.push((quantize_x(&x[..rows * k], rows, k, 2), record_bytes(k), ACTS_Q16));
                }
                for (xb, stride, acts) in inputs {
                    let x_slot = if shared { 0 } else { stride };
                    let got = run_experts(kernel, &experts, &ids, &xb, x_slot, blocks, threads, store, acts, None);
                    assert!(got[ids.len() * outputs..].iter().all(|&v| v == -7.0), "{kernel}: wrote past the slots");
                    for (s, &id) in ids.iter().enumerate() {
                        let got = &got[s * outputs..(s + 1) * outputs];
                        if id as usize >= experts.len() {
                            assert!(got.iter().all(|v| v.is_nan()), "{kernel} {code}: unused slot {s} was written");
                            continue;
                        }
                        let (one_x, one_acts) = if acts == ACTS_F32 {
                            (f32_bytes(row(s)), ACTS_F32)
                        } else {
                            (quantize_x(row(s), 1, k, 2), ACTS_Q16)
                        };
                        let want =
                            run_split(kernel, &experts[id as usize], &one_x, 1, blocks, threads, store, one_acts, 0);
                        for (j, (g, v)) in got.iter().zip(&want).enumerate() {
                            assert_eq!(
                                g.to_bits(),
                                v.to_bits(),
                                "{kernel} {code} shared={shared} acts={acts}: slot {s} (expert {id}) y[{j}] = {g}, want {v}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A product that normalises its activations itself (the kernel's `norm` weight) gives bit for
/// bit what `rmsnorm_f32` then the product give: the integer kernels quantizing in their blocks
/// (1 and 2 tokens) and the float kernels at any token count, rows within a tile and longer (the float kernels' tiles), written, added and
/// SwiGLU'd; nothing past the last token.
#[test]
fn emulated_matvec_kernels_normalise_their_activations_as_rms_norm_does() {
    if emulator().is_none() || crate::driver::build("emu_rmsnorm.cpp").is_none() {
        return;
    }
    // (kernel prefix, dtype, warps per block at one and two tokens, token counts, rows, columns)
    let cases = [
        ("matvec_q4_0_i16", DType::Q4_0, WARPS_DECODE, &[1usize, 2][..], 44, 2304),
        ("matvec_q4_k_i16", DType::Q4K, WARPS_DECODE_WIDE, &[1][..], 12, 4096),
        ("matvec_q6_k_i16", DType::Q6K, WARPS_DECODE_WIDE, &[2][..], 8, 2048),
        ("matvec_bf16", DType::BF16, WARPS, &[1, 3][..], 20, 4104),
        ("matvec_f32_scalar", DType::F32, WARPS, &[2, 8][..], 8, 37),
    ];
    for (i, (prefix, dtype, decode_warps, token_counts, n, k)) in cases.into_iter().enumerate() {
        let w = Tensor::from_f32_as(&random_f32(n * k, 300 + i as u64, 1.0), [n, k], dtype).unwrap();
        let norm = random_f32(k, 310 + i as u64, 1.5);
        for &tokens in token_counts {
            let t = tokens.next_power_of_two();
            let warps = if t <= 2 { decode_warps } else { WARPS };
            let groups = n.div_ceil(ROWS_PER_WARP).div_ceil(warps);
            let blocks = if dtype.is_quantized() { groups.min(2) } else { groups };
            let kernel = format!("{prefix}_t{t}");
            let mut x = random_f32(tokens * k, 320 + i as u64, 4.0);
            for (j, v) in x.iter_mut().enumerate() {
                *v *= [1.0, 30.0, 0.01][j % 3];
            }
            let normed = crate::norm::emulated_rms_norm(&x, &norm, tokens, NORM_EPS);
            let y0 = random_f32(tokens * n, 330 + i as u64, 20.0);
            for store in [Store::Write, Store::Add(&y0), Store::Swiglu] {
                let (_, outputs) = store.code_and_outputs(n);
                let start = store.start(tokens, outputs);
                let want = run_split(&kernel, &w, &f32_bytes(&normed), tokens, blocks, warps * 32, store, ACTS_F32, 0);
                let got = run_normed(&kernel, &w, &x, &norm, tokens, blocks, warps * 32, store);
                assert_eq!(start.len(), tokens * outputs);
                assert!(got[tokens * outputs..].iter().all(|&v| v == -7.0), "{kernel}: wrote past token {tokens}");
                for (j, (g, v)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.to_bits(), v.to_bits(), "{kernel} {n}x{k} tokens={tokens}: y[{j}] = {g}, want {v}");
                }
            }
        }
    }
}

/// A Mixture-of-Experts launch whose slots share one row of x and normalise it themselves gives
/// each slot bit for bit what `rmsnorm_f32` then its expert's own launch give; unused slots stay
/// unwritten.
#[test]
fn emulated_expert_products_normalise_their_shared_row() {
    if emulator().is_none() || crate::driver::build("emu_rmsnorm.cpp").is_none() {
        return;
    }
    let cases =
        [("matvec_q4_0_i16_t1", DType::Q4_0, WARPS_DECODE, 44, 2304), ("matvec_bf16_t1", DType::BF16, WARPS, 20, 520)];
    let ids = [2u32, u32::MAX, 0];
    for (i, (kernel, dtype, warps, n, k)) in cases.into_iter().enumerate() {
        let experts: Vec<Tensor> = (0..3)
            .map(|e| Tensor::from_f32_as(&random_f32(n * k, (i * 10 + e) as u64 ^ 0x77, 1.0), [n, k], dtype).unwrap())
            .collect();
        let x = random_f32(k, 700 + i as u64, 6.0);
        let norm = random_f32(k, 710 + i as u64, 1.5);
        let normed = crate::norm::emulated_rms_norm(&x, &norm, 1, NORM_EPS);
        let groups = n.div_ceil(ROWS_PER_WARP).div_ceil(warps);
        let blocks = if dtype.is_quantized() { 1 } else { groups };
        for store in [Store::Write, Store::Swiglu] {
            let (_, outputs) = store.code_and_outputs(n);
            let got = run_experts(
                kernel,
                &experts,
                &ids,
                &f32_bytes(&x),
                0,
                blocks,
                warps * 32,
                store,
                ACTS_F32,
                Some(&norm),
            );
            for (s, &id) in ids.iter().enumerate() {
                let got = &got[s * outputs..(s + 1) * outputs];
                if id == u32::MAX {
                    assert!(got.iter().all(|v| v.is_nan()), "{kernel}: unused slot {s} was written");
                    continue;
                }
                let want = run_split(
                    kernel,
                    &experts[id as usize],
                    &f32_bytes(&normed),
                    1,
                    blocks,
                    warps * 32,
                    store,
                    ACTS_F32,
                    0,
                );
                for (j, (g, v)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.to_bits(), v.to_bits(), "{kernel} slot {s} (expert {id}): y[{j}] = {g}, want {v}");
                }
            }
        }
    }
}
