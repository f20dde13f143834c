//! The AVX-512 VNNI microkernel of the quantized GEMM: up to [`MR`] rows of `x` times a decoded
//! panel of [`NR`] weight rows, over one slice of `k`.
//!
//! The panel's levels are stored four columns by `NR` rows per step, so each step loads two
//! registers (rows `j0..j0 + 16` and `j0 + 16..j0 + 32`, four levels each) and, for each row of `x`,
//! broadcasts the four matching high digits: `vpdpbusd` then adds the four products of every
//! (x row, weight row) pair into its own i32 lane, and after a group's steps each lane holds that
//! pair's dot product with the high digits. Shifted left by 8 (times [`HI_WEIGHT`]), offset by the
//! prepared `-offset * S`, the same steps with the low digits complete the group's exact integer
//! `sum((u - offset) * (256 * h + l))`, which is converted to f32 and accumulated with the factor
//! `scale * da`; minimums add `min * (da * S)`. The integers stay within i32: per lane at most
//! 32 products of `u <= 255` and `|h| <= 127` (about 2^20) before the shift, and `|offset * S| <=
//! 128 * 32 * 32639` (about 2^27). With one-digit activations (`ActQuant::Int8`, every low digit
//! zero) the low-digit pass is left out: the same integers from half the `vpdpbusd`.
//!
//! Everything is in one `#[target_feature]` function per combination of tile height and
//! [`Format`], generic over constants so that the loops unroll and the accumulators (`2 * MR`
//! i32 and `2 * MR` f32 registers) stay in registers.

use std::arch::x86_64::*;

use super::{Format, MR, NR, RowAct};
use crate::quant::q8act::{HI_WEIGHT, QK_ACT};

const _: () = assert!(NR == 32 && HI_WEIGHT == 1 << 8);

/// A decoded panel (see `pack_panel`): `levels` `[kc / 4][NR][4]`, `scales` `[kc / group][NR]`,
/// `mins` `[kc / 32][NR]` when the format has minimums.
pub(super) struct Panel<'a> {
    pub levels: &'a [u8],
    pub scales: &'a [f32],
    pub mins: &'a [f32],
}

/// Where a tile's outputs go: rows `i0..i0 + rows` and columns `j0..j0 + cols` of `y`, whose rows
/// are `ldc` apart; added to what is there when `accumulate` (the slices of `k` after the first).
pub(super) struct Tile {
    pub i0: usize,
    pub rows: usize,
    pub j0: usize,
    pub cols: usize,
    pub ldc: usize,
    pub accumulate: bool,
}

/// Computes one tile: `acts` (`tile.rows <= MR` quantized rows of `x`, prepared for `format`)
/// times the panel, columns `p0..p0 + kc` of both.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/DQ/VL, VNNI and FMA. The panel must have been decoded for
/// `format` over `kc` columns (`kc` a multiple of the group, every slice of the lengths above);
/// each row of `acts` must cover columns `p0..p0 + kc`; the tile's rows and columns must lie inside
/// `y` (`cols <= NR`) and no one else may access them meanwhile.
pub(super) unsafe fn tile(
    format: Format,
    acts: &[RowAct],
    p0: usize,
    kc: usize,
    panel: &Panel<'_>,
    tile: &Tile,
    y: *mut f32,
) {
    debug_assert!(acts.len() == tile.rows && (1..=MR).contains(&tile.rows) && tile.cols <= NR);
    debug_assert!(panel.levels.len() >= kc * NR && panel.scales.len() >= kc / format.group * NR);
    debug_assert!(kc.is_multiple_of(format.group) && (p0 + kc) <= acts[0].q.hi.len());
    // Without low digits (one-digit activations, all zero) the low-digit pass is left out.
    let lo = !acts.iter().all(|a| a.q.int8);
    // SAFETY: forwarded from the caller; `by_rows` needs the same.
    unsafe {
        match (format.group, format.offset != 0, format.min, lo) {
            (32, true, false, true) => by_rows::<32, true, false, true>(acts, p0, kc, panel, tile, y),
            (32, false, true, true) => by_rows::<32, false, true, true>(acts, p0, kc, panel, tile, y),
            (16, true, false, true) => by_rows::<16, true, false, true>(acts, p0, kc, panel, tile, y),
            (32, true, false, false) => by_rows::<32, true, false, false>(acts, p0, kc, panel, tile, y),
            (32, false, true, false) => by_rows::<32, false, true, false>(acts, p0, kc, panel, tile, y),
            (16, true, false, false) => by_rows::<16, true, false, false>(acts, p0, kc, panel, tile, y),
            _ => unreachable!("no dtype has format {format:?}"),
        }
    }
}

/// [`tile`] for group `G`, with an offset (`BIAS`) or minimums (`MIN`), with or without the low
/// digits (`LO`), by tile height.
///
/// # Safety
/// As [`tile`], with every low digit of `acts` zero unless `LO`.
#[inline(always)]
unsafe fn by_rows<const G: usize, const BIAS: bool, const MIN: bool, const LO: bool>(
    acts: &[RowAct],
    p0: usize,
    kc: usize,
    panel: &Panel<'_>,
    tile: &Tile,
    y: *mut f32,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match acts.len() {
            4 => kernel::<4, G, BIAS, MIN, LO>(acts, p0, kc, panel, tile, y),
            3 => kernel::<3, G, BIAS, MIN, LO>(acts, p0, kc, panel, tile, y),
            2 => kernel::<2, G, BIAS, MIN, LO>(acts, p0, kc, panel, tile, y),
            _ => kernel::<1, G, BIAS, MIN, LO>(acts, p0, kc, panel, tile, y),
        }
    }
}

/// The microkernel for `R` rows of `x`; without `LO`, the low digits (all zero) are not read.
///
/// # Safety
/// As [`by_rows`], with `acts.len() == R`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma")]
unsafe fn kernel<const R: usize, const G: usize, const BIAS: bool, const MIN: bool, const LO: bool>(
    acts: &[RowAct],
    p0: usize,
    kc: usize,
    panel: &Panel<'_>,
    tile: &Tile,
    y: *mut f32,
) {
    // SAFETY: every read below is inside the buffers the caller vouches for: the digits of row
    // `i` at `p0 + g * G + 4 * s + 0..4 < p0 + kc`, its unit, bias and `da * S` at group or block
    // `(p0 + g * G) / 32` or `/ G`; the panel's levels at `(g * G + 4 * s) * NR + 0..2 * 64 <= kc *
    // NR`, its scales at `g * NR + 0..32` and minimums at `(g * G / 32) * NR + 0..32`. The tile's
    // outputs lie inside `y`, for `store`.
    unsafe {
        let hi: [*const i8; R] = std::array::from_fn(|i| acts[i].q.hi.as_ptr().add(p0));
        let lo: [*const i8; R] = std::array::from_fn(|i| acts[i].q.lo.as_ptr().add(p0));
        let da: [*const f32; R] = std::array::from_fn(|i| acts[i].q.d.as_ptr().add(p0 / QK_ACT));
        let bias: [*const i32; R] =
            std::array::from_fn(|i| if BIAS { acts[i].bias.as_ptr().add(p0 / G) } else { std::ptr::null() });
        let e: [*const f32; R] =
            std::array::from_fn(|i| if MIN { acts[i].e.as_ptr().add(p0 / QK_ACT) } else { std::ptr::null() });
        let (levels, scales, mins) = (panel.levels.as_ptr(), panel.scales.as_ptr(), panel.mins.as_ptr());

        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for g in 0..kc / G {
            let col = g * G;
            let mut dot = [[_mm512_setzero_si512(); 2]; R];
            for s in 0..G / 4 {
                let u = step(levels, col + 4 * s);
                for i in 0..R {
                    let a = digits(hi[i], col + 4 * s);
                    dot[i][0] = _mm512_dpbusd_epi32(dot[i][0], u[0], a);
                    dot[i][1] = _mm512_dpbusd_epi32(dot[i][1], u[1], a);
                }
            }
            for row in dot.iter_mut() {
                for d in row.iter_mut() {
                    *d = _mm512_slli_epi32::<8>(*d);
                }
            }
            if BIAS {
                for (i, row) in dot.iter_mut().enumerate() {
                    let b = _mm512_set1_epi32(*bias[i].add(g));
                    row[0] = _mm512_add_epi32(row[0], b);
                    row[1] = _mm512_add_epi32(row[1], b);
                }
            }
            // The same levels again, from L1: an opaque copy of the pointer keeps the compiler
            // from holding all of the group's level registers across both passes instead (it
            // would run out of registers and spill the accumulators).
            if LO {
                let again = std::hint::black_box(levels);
                for s in 0..G / 4 {
                    let u = step(again, col + 4 * s);
                    for i in 0..R {
                        let a = digits(lo[i], col + 4 * s);
                        dot[i][0] = _mm512_dpbusd_epi32(dot[i][0], u[0], a);
                        dot[i][1] = _mm512_dpbusd_epi32(dot[i][1], u[1], a);
                    }
                }
            }
            let sc = [_mm512_loadu_ps(scales.add(g * NR)), _mm512_loadu_ps(scales.add(g * NR + 16))];
            for i in 0..R {
                let d = _mm512_set1_ps(*da[i].add(col / QK_ACT));
                for v in 0..2 {
                    acc[i][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][v]), _mm512_mul_ps(sc[v], d), acc[i][v]);
                }
            }
            if MIN {
                // Minimums come one per block of 32, and `G` is 32 for every format with them.
                let b = col / QK_ACT;
                let mn = [_mm512_loadu_ps(mins.add(b * NR)), _mm512_loadu_ps(mins.add(b * NR + 16))];
                for i in 0..R {
                    let f = _mm512_set1_ps(*e[i].add(b));
                    acc[i][0] = _mm512_fmadd_ps(mn[0], f, acc[i][0]);
                    acc[i][1] = _mm512_fmadd_ps(mn[1], f, acc[i][1]);
                }
            }
        }

        store(&acc, tile, y);
    }
}

/// Writes (or with `tile.accumulate` adds) each row `i`'s sums `acc[i]` (weight rows `j0..j0 +
/// 16` and `j0 + 16..j0 + 32`) to row `tile.i0 + i` of `y`, masked to the tile's `cols` columns.
///
/// # Safety
/// AVX-512 F; the tile's rows and columns must lie inside `y` and no one else may access them
/// meanwhile.
#[inline(always)]
pub(super) unsafe fn store<const R: usize>(acc: &[[__m512; 2]; R], tile: &Tile, y: *mut f32) {
    // SAFETY: loads and stores are masked to the tile's columns, inside `y` by the caller;
    // pointers to masked-out lanes are formed with `wrapping_add` and never dereferenced.
    unsafe {
        let masks = [lane_mask(tile.cols), lane_mask(tile.cols.saturating_sub(16))];
        for (i, row) in acc.iter().enumerate() {
            let dst = y.wrapping_add((tile.i0 + i) * tile.ldc + tile.j0);
            for (v, &sum) in row.iter().enumerate() {
                let (at, mask) = (dst.wrapping_add(16 * v), masks[v]);
                let sum = if tile.accumulate { _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, at)) } else { sum };
                _mm512_mask_storeu_ps(at, mask, sum);
            }
        }
    }
}

/// The levels of columns `at..at + 4` of the panel's 32 rows, in two registers.
///
/// # Safety
/// The panel must hold `(at + 4) * NR` levels; AVX-512 F.
#[inline(always)]
unsafe fn step(levels: *const u8, at: usize) -> [__m512i; 2] {
    // SAFETY: as stated by the caller.
    unsafe {
        let p = levels.add(at * NR);
        [_mm512_loadu_si512(p.cast()), _mm512_loadu_si512(p.add(64).cast())]
    }
}

/// The four digits at `p + at`, broadcast to every i32 lane.
///
/// # Safety
/// Four bytes at `p + at` must be readable; AVX-512 F.
#[inline(always)]
unsafe fn digits(p: *const i8, at: usize) -> __m512i {
    // SAFETY: as stated by the caller.
    unsafe { _mm512_set1_epi32(p.add(at).cast::<i32>().read_unaligned()) }
}

/// The mask of the first `lanes.min(16)` lanes.
#[inline(always)]
fn lane_mask(lanes: usize) -> __mmask16 {
    if lanes >= 16 { 0xffff } else { ((1u32 << lanes) - 1) as u16 }
}
