//! `kernels/elementwise.cu`: SwiGLU, the residual add, the bias add and the f16/bf16 casts, on
//! aligned and unaligned views, against `reference::swiglu`, `reference::add`, host arithmetic
//! and the half crate's rounding.

use half::{bf16, f16};
use strata_tensor::cpu::reference;

use crate::driver::{Arg, assert_close, build, f32_bytes, f32s, launch, random_f32};

#[path = "../common/moe.rs"]
mod moe;
use moe::Combine;

/// Threads per block of the flat element-wise launches.
const BLOCK: u32 = 256;

/// `ops::swiglu` / `add` / `cast_f32_to`'s grid: about four elements per thread.
fn flat_grid(n: usize) -> [u32; 3] {
    [n.div_ceil(4).div_ceil(BLOCK as usize).clamp(1, 65535) as u32, 1, 1]
}

fn n_params(n: usize) -> Vec<u8> {
    (n as u64).to_le_bytes().to_vec()
}

/// SwiGLU of `gate` and `up` by the emulated `swiglu_f32`, for kernels that must match it bit for
/// bit.
pub fn emulated_swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let emu = build("emu_elementwise.cpp").expect("the caller checked that the emulation builds");
    let n = gate.len();
    let (mut g, mut u, mut o) = (f32_bytes(gate), f32_bytes(up), f32_bytes(&vec![f32::NAN; n]));
    let mut args = [Arg::Buf(&mut g, 0), Arg::Buf(&mut u, 0), Arg::Buf(&mut o, 0)];
    launch(&emu, "swiglu_f32", flat_grid(n), BLOCK, 0, &n_params(n), &mut args);
    f32s(&o)
}

/// `swiglu_pairs_f32` (SwiGLU of a product of paired rows: per token, gate 2j, 2j + 1 then up
/// 2j, 2j + 1) equals `swiglu_f32` on the gate and up values taken apart, bit for bit, and writes
/// nothing past its outputs.
#[test]
fn emulated_swiglu_of_paired_rows_matches_swiglu() {
    let Some(emu) = build("emu_elementwise.cpp") else { return };
    for (tokens, width) in [(1usize, 2usize), (3, 10), (5, 5632 / 8)] {
        let n = tokens * width;
        let y = random_f32(2 * n, n as u64, 4.0);
        let (mut gate, mut up) = (Vec::new(), Vec::new());
        for row in y.chunks(2 * width) {
            for quad in row.chunks(4) {
                gate.extend_from_slice(&quad[..2]);
                up.extend_from_slice(&quad[2..]);
            }
        }
        let want = emulated_swiglu(&gate, &up);
        let (mut yb, mut o) = (f32_bytes(&y), f32_bytes(&vec![-7f32; n + 1]));
        let grid = [n.div_ceil(BLOCK as usize) as u32, 1, 1];
        launch(
            &emu,
            "swiglu_pairs_f32",
            grid,
            BLOCK,
            0,
            &n_params(n),
            &mut [Arg::Buf(&mut yb, 0), Arg::Buf(&mut o, 0)],
        );
        let got = f32s(&o);
        assert_eq!(got[n], -7.0, "swiglu_pairs {tokens} x {width}: wrote past its outputs");
        for (i, (g, w)) in got[..n].iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "swiglu_pairs {tokens} x {width}: out[{i}] = {g}, want {w}");
        }
    }
}

/// `copy_cols_f32` packs the chosen columns of each row, and writes nothing else.
#[test]
fn emulated_copy_cols_takes_the_columns_apart() {
    let Some(emu) = build("emu_elementwise.cpp") else { return };
    for (rows, src_cols, col0, cols) in
        [(1usize, 3usize, 0usize, 3usize), (5, 2560, 2048, 256), (7, 2560, 2304, 256), (3, 9, 4, 1)]
    {
        let src = random_f32(rows * src_cols, (rows * src_cols) as u64, 1.0);
        let want: Vec<f32> = src.chunks(src_cols).flat_map(|r| r[col0..col0 + cols].to_vec()).collect();
        let (mut sb, mut db) = (f32_bytes(&src), f32_bytes(&vec![-7f32; rows * cols + 1]));
        let p = [rows as u32, src_cols as u32, col0 as u32, cols as u32]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>();
        let grid = [(rows * cols).div_ceil(BLOCK as usize) as u32, 1, 1];
        launch(&emu, "copy_cols_f32", grid, BLOCK, 0, &p, &mut [Arg::Buf(&mut sb, 0), Arg::Buf(&mut db, 0)]);
        let got = f32s(&db);
        assert_eq!(&got[..rows * cols], &want[..], "copy_cols {rows} x {src_cols} from {col0}, {cols}");
        assert_eq!(got[rows * cols], -7.0, "copy_cols {rows} x {src_cols}: wrote past dst");
    }
}

/// The Mixture-of-Experts dispatch kernels against the CPU's arithmetic (`MoeLayer::forward`),
/// bit for bit: gathering an expert's token rows, adding its weighted outputs back (`o += y *
/// w`), and adding a shared expert's output scaled by `1 / (1 + exp(-g))`; nothing outside the
/// rows named is touched.
#[test]
fn emulated_moe_dispatch_matches_the_cpu() {
    let Some(emu) = build("emu_elementwise.cpp") else { return };
    let u32_bytes = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let rows_params =
        |rows: usize, cols: usize| [rows as u32, cols as u32].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
    let grid = |n: usize| [n.div_ceil(BLOCK as usize).max(1) as u32, 1, 1];
    for (tokens, cols, idx) in [(1usize, 64usize, vec![0u32]), (7, 100, vec![5, 0, 3]), (9, 2048, vec![8, 1, 2, 7, 4])]
    {
        let src = random_f32(tokens * cols, (tokens * cols) as u64, 2.0);
        let n = idx.len();

        let want: Vec<f32> = idx.iter().flat_map(|&r| src[r as usize * cols..][..cols].to_vec()).collect();
        let (mut sb, mut ib, mut db) = (f32_bytes(&src), u32_bytes(&idx), f32_bytes(&vec![-7f32; n * cols + 1]));
        let mut args = [Arg::Buf(&mut sb, 0), Arg::Buf(&mut ib, 0), Arg::Buf(&mut db, 0)];
        launch(&emu, "gather_rows_f32", grid(n * cols), BLOCK, 0, &rows_params(n, cols), &mut args);
        let got = f32s(&db);
        assert_eq!(&got[..n * cols], &want[..], "gather {tokens} x {cols} rows {idx:?}");
        assert_eq!(got[n * cols], -7.0, "gather: wrote past dst");

        let y = random_f32(n * cols, 77, 3.0);
        let w = random_f32(n, 78, 1.0);
        let mut want = src.clone();
        for (i, &r) in idx.iter().enumerate() {
            for (o, y) in want[r as usize * cols..][..cols].iter_mut().zip(&y[i * cols..][..cols]) {
                *o += y * w[i];
            }
        }
        let (mut yb, mut ib, mut wb, mut ob) = (f32_bytes(&y), u32_bytes(&idx), f32_bytes(&w), f32_bytes(&src));
        let mut args = [Arg::Buf(&mut yb, 0), Arg::Buf(&mut ib, 0), Arg::Buf(&mut wb, 0), Arg::Buf(&mut ob, 0)];
        launch(&emu, "scatter_add_rows_f32", grid(n * cols), BLOCK, 0, &rows_params(n, cols), &mut args);
        let got = f32s(&ob);
        for (j, (g, v)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), v.to_bits(), "scatter {tokens} x {cols} rows {idx:?}: out[{j}] = {g}, want {v}");
        }

        let y = random_f32(tokens * cols, 79, 3.0);
        let g = random_f32(tokens, 80, 6.0);
        let mut want = src.clone();
        for ((o, y), g) in want.chunks_exact_mut(cols).zip(y.chunks_exact(cols)).zip(&g) {
            let s = 1.0 / (1.0 + (-g).exp());
            for (o, y) in o.iter_mut().zip(y) {
                *o += s * y;
            }
        }
        let (mut yb, mut gb, mut ob) = (f32_bytes(&y), f32_bytes(&g), f32_bytes(&src));
        let mut args = [Arg::Buf(&mut yb, 0), Arg::Buf(&mut gb, 0), Arg::Buf(&mut ob, 0)];
        launch(&emu, "add_sigmoid_scaled_f32", grid(tokens * cols), BLOCK, 0, &rows_params(tokens, cols), &mut args);
        let got = f32s(&ob);
        for (j, (g, v)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), v.to_bits(), "sigmoid-scaled add {tokens} x {cols}: out[{j}] = {g}, want {v}");
        }
    }
}

/// `moe_combine_f32`: each token's used slots weighted and added in ascending order of expert
/// index from zero (what zeroing the output and adding expert by expert with `o += y * w` give on
/// the CPU), then a shared expert's output scaled by the sigmoid of its gate (`o += s * y`), written
/// or added to the residual stream, bit for bit; unused slots (ids at or past the experts)
/// skipped, a token without any gets NaN, nothing past the rows written.
#[test]
fn emulated_moe_combine_adds_the_experts_in_index_order() {
    let Some(emu) = build("emu_elementwise.cpp") else { return };
    let u32_bytes = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    const UNUSED: u32 = u32::MAX;
    let experts = 6u32;
    // (slots per token, cols, each token's ids): descending and unordered ids, an unused slot, an
    // id at the expert count (unused), a token with no used slot, more columns than a block.
    let cases = [
        (2usize, 37usize, vec![vec![4u32, 1]]),
        (4, 300, vec![vec![5, 0, UNUSED, 3], vec![2, 6, 1, 4], vec![UNUSED; 4]]),
        (1, 8, vec![vec![0], vec![5]]),
    ];
    for (i, (slots, cols, ids)) in cases.into_iter().enumerate() {
        let tokens = ids.len();
        let flat: Vec<u32> = ids.concat();
        let ys = random_f32(tokens * slots * cols, 31 + i as u64, 3.0);
        let w = random_f32(tokens * slots, 37 + i as u64, 1.0);
        let x0 = random_f32(tokens * cols, 41 + i as u64, 5.0);
        let (shared_y, shared_g) = (random_f32(tokens * cols, 43 + i as u64, 2.0), random_f32(tokens, 47, 4.0));
        for (residual, shared) in [(false, false), (true, false), (true, true)] {
            let combine = Combine {
                ids: &flat,
                w: &w,
                ys: &ys,
                slots,
                experts,
                cols,
                shared: shared.then_some((&shared_y[..], &shared_g[..])),
            };
            let want = combine.reference(&x0, residual);
            let params = [tokens as u32, cols as u32, slots as u32, experts, u32::from(residual)]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>();
            let start = if residual { x0.clone() } else { vec![-7f32; tokens * cols] };
            let (mut yb, mut ib, mut wb) = (f32_bytes(&ys), u32_bytes(&flat), f32_bytes(&w));
            let mut ob = f32_bytes(&[start, vec![-7f32]].concat());
            let (mut syb, mut sgb) = (f32_bytes(&shared_y), f32_bytes(&shared_g));
            let (sy, sg) = if shared { (Arg::Buf(&mut syb, 0), Arg::Buf(&mut sgb, 0)) } else { (Arg::Null, Arg::Null) };
            let mut args =
                [Arg::Buf(&mut yb, 0), Arg::Buf(&mut ib, 0), Arg::Buf(&mut wb, 0), sy, sg, Arg::Buf(&mut ob, 0)];
            let grid = [cols.div_ceil(BLOCK as usize) as u32, tokens as u32, 1];
            launch(&emu, "moe_combine_f32", grid, BLOCK, 0, &params, &mut args);
            let got = f32s(&ob);
            assert_eq!(got[tokens * cols], -7.0, "moe_combine: wrote past out");
            for (j, (g, v)) in got.iter().zip(&want).enumerate() {
                // NaN's payload is the device's own (0x7fffffff).
                let same = if v.is_nan() { g.is_nan() } else { g.to_bits() == v.to_bits() };
                assert!(same, "moe_combine case {i} residual={residual} shared={shared}: out[{j}] = {g}, want {v}");
            }
        }
    }
}

#[test]
fn emulated_elementwise_kernels_match_the_reference() {
    let Some(emu) = build("emu_elementwise.cpp") else { return };
    for (n, offset) in [(1usize, 0usize), (3, 1), (5, 2), (4099, 0), (4099, 3), (300_001, 1)] {
        let gate = random_f32(n + offset, n as u64, 4.0);
        let up = random_f32(n + offset, n as u64 ^ 1, 4.0);
        let mut want = vec![0f32; n];
        reference::swiglu(&gate[offset..], &up[offset..], &mut want).unwrap();
        let (mut g, mut u, mut o) = (f32_bytes(&gate), f32_bytes(&up), f32_bytes(&vec![f32::NAN; n + offset]));
        let o4 = 4 * offset;
        let mut args = [Arg::Buf(&mut g, o4), Arg::Buf(&mut u, o4), Arg::Buf(&mut o, o4)];
        launch(&emu, "swiglu_f32", flat_grid(n), BLOCK, 0, &n_params(n), &mut args);
        assert_close(&format!("swiglu {n} at {offset}"), &f32s(&o)[offset..], &want, 1e-30, 2e-6);

        let mut want = gate[offset..].to_vec();
        reference::add(&mut want, &up[offset..]).unwrap();
        let (mut acc, mut x) = (f32_bytes(&gate), f32_bytes(&up));
        launch(
            &emu,
            "add_f32",
            flat_grid(n),
            BLOCK,
            0,
            &n_params(n),
            &mut [Arg::Buf(&mut acc, o4), Arg::Buf(&mut x, o4)],
        );
        assert_eq!(&f32s(&acc)[offset..], &want[..], "add {n} at {offset}");

        // Casts: values across the f16 range and into its subnormals, and special ones.
        let mut v: Vec<f32> = gate.iter().enumerate().map(|(i, x)| x * [1.0, 1e-6, 3e4, 1e-3][i % 4]).collect();
        let special =
            [0.0f32, -0.0, 1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 1.0 + 2f32.powi(-8), 65519.0, 65520.0];
        let special2 = [f32::INFINITY, f32::NAN, 1e-8, 3e-8, 6.0e-5, f32::MIN_POSITIVE, 1e-40, f32::MAX];
        for (slot, s) in v.iter_mut().skip(offset).zip(special.iter().chain(&special2)) {
            *slot = *s;
        }
        let mut xb = f32_bytes(&v);
        for (kernel, bits) in [("cast_f32_f16", 0), ("cast_f32_bf16", 1)] {
            let mut out = vec![0u8; 2 * (n + offset)];
            let mut args = [Arg::Buf(&mut xb, o4), Arg::Buf(&mut out, 2 * offset)];
            launch(&emu, kernel, flat_grid(n), BLOCK, 0, &n_params(n), &mut args);
            for (i, &x) in v[offset..].iter().enumerate() {
                let got = u16::from_le_bytes([out[2 * (offset + i)], out[2 * (offset + i) + 1]]);
                let want = if bits == 0 { f16::from_f32(x).to_bits() } else { bf16::from_f32(x).to_bits() };
                if x.is_nan() {
                    let nan = if bits == 0 { f16::from_bits(got).is_nan() } else { bf16::from_bits(got).is_nan() };
                    assert!(nan, "{kernel} element {i}: NaN became {got:#06x}");
                } else {
                    assert_eq!(got, want, "{kernel} element {i} = {x:e}");
                }
            }
        }
    }
    // The bias add: columns across blocks, rows walked by each block row.
    for (rows, cols) in [(1usize, 1usize), (7, 300), (39, 699), (3, 257)] {
        let y = random_f32(rows * cols + 5, rows as u64, 5.0);
        let bias = random_f32(cols, cols as u64, 5.0);
        let mut want = y.clone();
        for (i, v) in want[..rows * cols].iter_mut().enumerate() {
            *v += bias[i % cols];
        }
        let blocks_x = cols.div_ceil(BLOCK as usize);
        let blocks_y = rows.min((65536 / blocks_x).max(1)).min(65535);
        let p: Vec<u8> = [(rows as u32).to_le_bytes(), (cols as u32).to_le_bytes()].concat();
        let (mut yb, mut bb) = (f32_bytes(&y), f32_bytes(&bias));
        let mut args = [Arg::Buf(&mut yb, 0), Arg::Buf(&mut bb, 0)];
        launch(&emu, "add_bias_f32", [blocks_x as u32, blocks_y as u32, 1], BLOCK, 0, &p, &mut args);
        assert_eq!(f32s(&yb), want, "add_bias {rows} x {cols}");
    }
}
