//! The 16-bit microkernel of the `Q4_K` prefill GEMM: up to [`MR`] rows of `x`, quantized to
//! [`ActWide`] (one 16-bit value per element, a unit per super-block of 256), times a 16-bit panel
//! of [`NR`] weight rows (`pack::pack_wide`: the products `sc * q` of each sub-block's integer
//! scale and 4-bit levels), over one slice of `k`.
//!
//! A `Q4_K` weight is `d * sc_j * q - dmin * m_j` in sub-block `j` (32 columns) of a super-block
//! (256), so a super-block's dot product with the activation `unit * v` is
//! `unit * (d * sum(sc_j * q * v) - dmin * sum_j(m_j * S_j))`, `S_j` the sum of the values of
//! sub-block `j`. With `sc * q` in the panel, `vpdpwssd` multiplies two pairs of 16-bit values per
//! i32 lane (two columns of one weight row and one row of `x`), so the integer sum runs across
//! sub-blocks: where the two-digit kernel (`super::vnni`) needs two `vpdpbusd` per four columns and
//! an f32 multiply, convert and add per 32 columns to apply each sub-block's scale and each block's
//! unit, this one needs one `vpdpwssd` per two columns (the same count) and per 64 columns only a
//! convert and an add (which do not share the multipliers' pipes), per super-block one multiply
//! and one FMA by `d * unit`. The minimums' term stays one FMA per 32 columns, `-(dmin * m_j)`
//! times `unit * S_j`.
//!
//! The integers stay within i32: per lane, 64 columns of `|sc * q| <= 945` and `|v| <= 32767`
//! sum to at most 1.98e9 < 2^31, so each 64 columns are converted to f32 before the next.
//!
//! The values are not those of the two-digit kernels (the matrix-vector products of decode,
//! the GEMM of the other dtypes): the activation's step is relative to the largest of 256
//! values rather than of 32, at 16 bits instead of about 15. Both are within about 2^-15 of the
//! block's largest value per element.

use std::arch::x86_64::*;

use super::vnni::{Tile, store};
use super::{MR, NR};
use crate::quant::QK_K;
use crate::quant::q8act::{ActWide, QK_ACT};

const _: () = assert!(NR == 32 && QK_K == 256);

/// Columns per integer partial sum (see the module docs for the bound).
const CHUNK: usize = 64;

/// A decoded 16-bit panel (see `pack::pack_wide`): `wide` `[kc / 2][NR][2]`, `d` `[kc / 256][NR]`,
/// `mins` `[kc / 32][NR]`.
pub(super) struct Panel<'a> {
    pub wide: &'a [i16],
    pub d: &'a [f32],
    pub mins: &'a [f32],
}

/// Computes one tile: `acts` (`tile.rows <= MR` rows of `x`) times the panel, columns `p0..p0 +
/// kc` of both.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/DQ/VL, VNNI and FMA. The panel must have been decoded over
/// `kc` columns (a multiple of 256); each row of `acts` must cover columns `p0..p0 + kc`; the
/// tile's rows and columns must lie inside `y` (`cols <= NR`) and no one else may access them
/// meanwhile.
pub(super) unsafe fn tile(acts: &[ActWide], p0: usize, kc: usize, panel: &Panel<'_>, tile: &Tile, y: *mut f32) {
    assert!(acts.len() == tile.rows && (1..=MR).contains(&tile.rows) && tile.cols <= NR);
    assert!(kc.is_multiple_of(QK_K) && p0.is_multiple_of(QK_K));
    assert!(panel.wide.len() >= kc * NR && panel.d.len() >= kc / QK_K * NR && panel.mins.len() >= kc / QK_ACT * NR);
    assert!(acts.iter().all(|a| a.v.len() >= p0 + kc && a.e.len() * QK_ACT == a.v.len()));
    // SAFETY: forwarded from the caller, the lengths asserted above.
    unsafe {
        match acts.len() {
            4 => kernel::<4>(acts, p0, kc, panel, tile, y),
            3 => kernel::<3>(acts, p0, kc, panel, tile, y),
            2 => kernel::<2>(acts, p0, kc, panel, tile, y),
            _ => kernel::<1>(acts, p0, kc, panel, tile, y),
        }
    }
}

/// The microkernel for `R` rows of `x`.
///
/// # Safety
/// As [`tile`], with `acts.len() == R`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma")]
unsafe fn kernel<const R: usize>(acts: &[ActWide], p0: usize, kc: usize, panel: &Panel<'_>, tile: &Tile, y: *mut f32) {
    // SAFETY: every read is inside the buffers [`tile`] checked: row `i`'s values at `p0 + c +
    // 0..2 <= p0 + kc`, its units at `(p0 + c) / 256` and minimums' factors at `(p0 + c) / 32`; the panel's
    // values at `(c / 2) * NR * 2 + 0..64 <= kc * NR`, `d` at `sb * NR + 0..32` and minimums at
    // `(c / 32) * NR + 0..32`. The tile's outputs lie inside `y`, for `store`.
    unsafe {
        let v: [*const i16; R] = std::array::from_fn(|i| acts[i].v.as_ptr().add(p0));
        let unit: [*const f32; R] = std::array::from_fn(|i| acts[i].unit.as_ptr().add(p0 / QK_K));
        let e: [*const f32; R] = std::array::from_fn(|i| acts[i].e.as_ptr().add(p0 / QK_ACT));
        let (wide, dd, mins) = (panel.wide.as_ptr(), panel.d.as_ptr(), panel.mins.as_ptr());

        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for sb in 0..kc / QK_K {
            let mut part = [[_mm512_setzero_ps(); 2]; R];
            for chunk in 0..QK_K / CHUNK {
                let c0 = sb * QK_K + chunk * CHUNK;
                let mut dot = [[_mm512_setzero_si512(); 2]; R];
                for s in 0..CHUNK / 2 {
                    let c = c0 + 2 * s;
                    let p = wide.add(c * NR);
                    let u = [_mm512_loadu_si512(p.cast()), _mm512_loadu_si512(p.add(32).cast())];
                    for i in 0..R {
                        let a = _mm512_set1_epi32(v[i].add(c).cast::<i32>().read_unaligned());
                        dot[i][0] = _mm512_dpwssd_epi32(dot[i][0], u[0], a);
                        dot[i][1] = _mm512_dpwssd_epi32(dot[i][1], u[1], a);
                    }
                }
                for i in 0..R {
                    for h in 0..2 {
                        part[i][h] = _mm512_add_ps(part[i][h], _mm512_cvtepi32_ps(dot[i][h]));
                    }
                }
                for b in c0 / QK_ACT..(c0 + CHUNK) / QK_ACT {
                    let mn = [_mm512_loadu_ps(mins.add(b * NR)), _mm512_loadu_ps(mins.add(b * NR + 16))];
                    for i in 0..R {
                        let e = _mm512_set1_ps(*e[i].add(b));
                        acc[i][0] = _mm512_fmadd_ps(mn[0], e, acc[i][0]);
                        acc[i][1] = _mm512_fmadd_ps(mn[1], e, acc[i][1]);
                    }
                }
            }
            let d = [_mm512_loadu_ps(dd.add(sb * NR)), _mm512_loadu_ps(dd.add(sb * NR + 16))];
            for i in 0..R {
                let un = _mm512_set1_ps(*unit[i].add(sb));
                for h in 0..2 {
                    acc[i][h] = _mm512_fmadd_ps(part[i][h], _mm512_mul_ps(d[h], un), acc[i][h]);
                }
            }
        }

        store(&acc, tile, y);
    }
}
