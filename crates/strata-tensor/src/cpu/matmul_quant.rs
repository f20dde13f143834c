//! Prefill matrix multiplication `y = x W^T` for block-quantized weights with the arithmetic of the
//! decode path: every row of `x` is quantized once to the two-digit activation blocks of
//! `quant::q8act` (values `a = 256 * h + l` with a unit `da` per block of 32), and each output is
//! the sum over weight blocks of integer dot products scaled in f32, exactly the integers of the
//! quantized matrix-vector product (`cpu::matvec_quant`) and its reference (`quant::vec_dot`), so
//! a row of `y` equals the matrix-vector product of the same row of `x` up to the order of the
//! float additions.
//!
//! With AVX-512 VNNI the product is a register-tiled GEMM ([`vnni`]). Weight rows are decoded, a
//! panel of [`NR`] rows and a slice of [`KC`] columns at a time, into one layout shared by every
//! dtype: unsigned 8-bit levels `u` interleaved by four columns (`[KC / 4][NR][4]`, so that one
//! 512-bit register holds four consecutive levels of each of 16 rows), an f32 scale per group of
//! [`Format::group`] levels and row, and for `Q4_1`/`Q4_K` an f32 minimum per block of 32 and row.
//! A weight value is `scale * (u - offset) + min` with a per-dtype integer `offset` (128 for
//! `Q8_0`, whose signed bytes are flipped to unsigned for `vpdpbusd`; 8 for `Q4_0`; 32 for `Q6_K`).
//! The decoding is vectorised for `Q8_0`, `Q4_0`, `Q4_1` and `Q4_K` ([`pack`], byte for byte the
//! panels of the scalar `pack_panel`, which stays the reference and decodes `Q6_K`).
//! The microkernel then multiplies [`MR`] rows of `x` by a panel: per step, two registers of
//! levels (32 rows) and a broadcast of four digits of each row of `x`, one `vpdpbusd` per pair,
//! so the integer accumulators hold the dot product of each (x row, weight row) pair without any
//! horizontal sum. Per group it combines the two digits (`256 * high + low`), removes the offset
//! (`- offset * S`, the activation's sum over the group, prepared once per row), converts to f32
//! and accumulates `(scale * da) * dot` plus `min * (da * S)`. Each level loaded is used for
//! [`MR`] rows of `x`, each broadcast digit for 32 weight rows.
//!
//! Work is split over blocks of weight rows (and of `x` rows, when the weight has too few rows
//! for the threads) in the caller's rayon pool; each task decodes its panels once per slice of `k`
//! and keeps them in L2 while every tile of `x` rows passes over them.
//!
//! `Q4_K` with two-digit activations (the default [`ActQuant::Int16`]) runs a 16-bit variant
//! instead ([`wide`]): each row of `x` quantized to one 16-bit value per element with a unit per
//! super-block of 256 ([`ActWide`]), the panel holding each weight's `sc * q` (its sub-block's
//! 6-bit scale times its 4-bit level) as 16 bits, and `vpdpwssd` multiplying two columns per
//! lane. As many multiply instructions as the two digits need, but the integer sums run across a
//! super-block's sub-blocks, so the f32 work per 32 columns falls from a multiply and two FMAs to
//! one FMA (the minimums'): 11% more products per second in `vnni_ceiling`. Its activations are
//! not the two-digit blocks of the matrix-vector products, so for `Q4_K` a row of the GEMM
//! equals the matrix-vector product of its `x` row within the two roundings of `x` (each within
//! about 2^-16 of its block's largest value), not up to the order of float additions.
//!
//! Weights repacked at load (`cpu::RepackedWeight`, `Q4_0` and `Q4_K`) run the same GEMM: their
//! panels are decoded from the repacked rows into the same bytes ([`matmul_packed_with`]).
//!
//! Without VNNI the same results come from the existing matrix-vector kernels, one row of `x` at a
//! time; `cpu::matmul` then keeps its dequantizing f32 GEMM for large `m`, which is faster there.

#[cfg(target_arch = "x86_64")]
mod pack;
#[cfg(target_arch = "x86_64")]
mod vnni;
#[cfg(target_arch = "x86_64")]
mod wide;

use rayon::prelude::*;

use super::matmul::{OutPtr, check_matmul};
use super::matvec_quant::{matvec_packed_with, matvec_quant_with};
use super::{Isa, isa};
use crate::quant::q4_k::unpack_scales_mins;
use crate::quant::q8act::{ActQ8, ActQuant, ActWide, HI_WEIGHT, QK_ACT, act_quant};
use crate::quant::{BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ6K, BlockQ8_0, QK_K, q4_0, q4_k, with_blocks};
use crate::{DType, Error, Result, Tensor};

/// Rows of `x` per microkernel tile.
const MR: usize = 4;

/// Weight rows per panel: two 512-bit registers of 16 i32 lanes.
const NR: usize = 32;

/// Columns of `W` decoded per slice: a multiple of every block length, small enough that a tile
/// of `x` digits (`2 * MR * KC` bytes) stays in L1 and a task's panels in L2.
const KC: usize = 1024;

/// The most panels a task decodes at once (`MAX_NC_PANELS * NR * KC` bytes of levels).
const MAX_NC_PANELS: usize = 4;

/// `y = x W^T` for a block-quantized weight `w` (`[n, k]`), `x` `[m, k]` and `y` `[m, n]`, each row
/// of `x` quantized to two-digit blocks as [`crate::cpu::matvec`] does: row `i` of `y` equals
/// `matvec(w, x[i])` up to float rounding (except for `Q4_K` from 16 rows, `GEMM_MIN_M`, with
/// AVX-512 VNNI: that GEMM quantizes `x` to 16 bits per value with a unit per 256, see the module
/// docs). Multi-threaded in the caller's rayon pool. A weight of a float dtype is an
/// [`Error::UnsupportedDType`].
pub fn matmul_quantized(x: &[f32], w: &Tensor, y: &mut [f32]) -> Result<()> {
    matmul_quantized_with(isa(), x, w, y)
}

/// The fewest rows of `x` for which the VNNI GEMM runs; below, the matrix-vector kernels run
/// once per row (the weight stays in cache between rows, and the GEMM's decoding of the weight
/// into panels is not amortized). Measured on Zen4 with the `prefill_matmul` example.
pub(crate) const GEMM_MIN_M: usize = 16;

/// The quantized product into `y` on SIMD level `isa` (lowered to what this CPU supports):
/// the tiled VNNI GEMM from [`GEMM_MIN_M`] rows, otherwise the matrix-vector kernels of `isa`
/// row by row.
pub(crate) fn matmul_quantized_with(isa: Isa, x: &[f32], w: &Tensor, y: &mut [f32]) -> Result<()> {
    matmul_blocks(isa, "matmul_quantized", x, w, y, false)
}

/// [`matmul_quantized_with`] for a weight `w` of repacked rows (`cpu::RepackedWeight`, whose
/// checks `w` went through: a 2-D `Q4_0` or `Q4_K` tensor on the CPU): the same results, bit for
/// bit, as on the original rows. The GEMM decodes its panels from the repacked rows (restoring the
/// original blocks of a slice only where it reaches `Q4_0` blocks past the whole groups); the
/// matrix-vector kernels read the repacked rows.
pub(crate) fn matmul_packed_with(isa: Isa, x: &[f32], w: &Tensor, y: &mut [f32]) -> Result<()> {
    debug_assert!(matches!(w.dtype(), DType::Q4_0 | DType::Q4K));
    matmul_blocks(isa, "RepackedWeight::matmul", x, w, y, true)
}

/// The GEMM from [`GEMM_MIN_M`] rows with VNNI, else the matrix-vector kernels row by row, on
/// GGUF rows or (`packed`) repacked ones.
fn matmul_blocks(isa: Isa, op: &'static str, x: &[f32], w: &Tensor, y: &mut [f32], packed: bool) -> Result<()> {
    let (m, n, k) = check_matmul(op, x, w, y)?;
    let dtype = w.dtype();
    if !dtype.is_quantized() {
        return Err(Error::UnsupportedDType { op, dtype });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let bytes = w.cpu_bytes()?;
    let isa = isa.min(Isa::detect());
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512Vnni && m >= GEMM_MIN_M {
        gemm(dtype, bytes, w.row_bytes(), packed, act_quant(), m, n, k, x, y);
        return Ok(());
    }
    let matvec = if packed { matvec_packed_with } else { matvec_quant_with };
    for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)) {
        matvec(isa, dtype, bytes, n, k, xr, yr);
    }
    Ok(())
}

/// Writes columns `p0..p0 + kc` of rows `j0..j0 + rows` of the repacked weight `w` (`row_bytes`
/// per row) into `dst` as original blocks, `len` bytes per row; returns the part of `dst` written.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn restore_rows<'a>(
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    j0: usize,
    rows: usize,
    p0: usize,
    kc: usize,
    dst: &'a mut Vec<u8>,
) -> &'a [u8] {
    let (off, len) = (dtype.bytes_for(p0).expect("whole blocks"), dtype.bytes_for(kc).expect("whole blocks"));
    dst.resize(rows * len, 0);
    for (r, out) in dst.chunks_exact_mut(len).enumerate() {
        let row = &w[(j0 + r) * row_bytes..(j0 + r + 1) * row_bytes];
        match dtype {
            DType::Q4_0 => q4_0::unpack_blocks(row, p0 / dtype.block_len(), out),
            // Super-blocks keep their places: a slice of them is a repacked row of its own.
            _ => q4_k::unpack_row(&row[off..off + len], out),
        }
    }
    &dst[..rows * len]
}

/// How a dtype maps onto the shared panel layout: `w = scale * (u - offset) + min`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Format {
    /// Levels per f32 scale: 32, or 16 for `Q6_K`'s sub-blocks.
    group: usize,
    /// The integer the unsigned levels carry.
    offset: i32,
    /// Whether blocks have an additive minimum (`Q4_1`, `Q4_K`), one per 32 levels.
    min: bool,
}

impl Format {
    fn of(dtype: DType) -> Format {
        match dtype {
            DType::Q8_0 => Format { group: 32, offset: 128, min: false },
            DType::Q4_0 => Format { group: 32, offset: 8, min: false },
            DType::Q4_1 | DType::Q4K => Format { group: 32, offset: 0, min: true },
            DType::Q6K => Format { group: 16, offset: 32, min: false },
            DType::F32 | DType::F16 | DType::BF16 => unreachable!("not a block-quantized dtype"),
        }
    }
}

/// Whether the GEMM runs the 16-bit kernel ([`wide`]) for `dtype` with activations quantized as
/// `act`: `Q4_K` with two digits (one digit keeps the 8-bit kernel, which then needs half its
/// multiplies).
#[cfg(target_arch = "x86_64")]
fn uses_wide(dtype: DType, act: ActQuant) -> bool {
    dtype == DType::Q4K && act == ActQuant::Int16
}

/// One row of `x`, quantized, with what the microkernel needs per group.
struct RowAct {
    /// The digits and the unit of each block of 32.
    q: ActQ8,
    /// `-offset * S` per group of [`Format::group`] values (`S` the sum of its values
    /// `256 * h + l`); empty when the offset is zero.
    bias: Vec<i32>,
    /// `da * S` per block of 32, the factor of the minimums; empty without minimums.
    e: Vec<f32>,
}

impl RowAct {
    fn new(x: &[f32], format: Format, act: ActQuant) -> RowAct {
        let q = ActQ8::quantize_as(x, act);
        let bias = if format.offset == 0 {
            Vec::new()
        } else if format.group == QK_ACT {
            q.sum.iter().map(|&s| -format.offset * s).collect()
        } else {
            (0..x.len() / format.group)
                .map(|g| {
                    let s: i32 = (format.group * g..format.group * (g + 1))
                        .map(|i| HI_WEIGHT * i32::from(q.hi[i]) + i32::from(q.lo[i]))
                        .sum();
                    -format.offset * s
                })
                .collect()
        };
        let e = if format.min { q.d.iter().zip(&q.sum).map(|(&d, &s)| d * s as f32).collect() } else { Vec::new() };
        RowAct { q, bias, e }
    }
}

/// Decodes `rows` rows of `w` (`row_bytes` each, the first at row `j0`), columns `p0..p0 + kc`, into
/// a panel of `NR` rows: `levels` `[kc / 4][NR][4]`, `scales` `[kc / group][NR]` and, with
/// minimums, `mins` `[kc / 32][NR]`. Rows past `rows` are zero.
#[allow(clippy::too_many_arguments)]
fn pack_panel(
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    j0: usize,
    rows: usize,
    p0: usize,
    kc: usize,
    levels: &mut [u8],
    scales: &mut [f32],
    mins: &mut [f32],
) {
    let format = Format::of(dtype);
    let groups = kc / format.group;
    debug_assert!(levels.len() == kc * NR && scales.len() == groups * NR);
    debug_assert!(!format.min || mins.len() == kc / QK_ACT * NR);
    let (off, len) = (dtype.bytes_for(p0).expect("whole blocks"), dtype.bytes_for(kc).expect("whole blocks"));
    let mut lv = [0u8; KC];
    let mut sc = [0f32; KC / 16];
    let mut mn = [0f32; KC / QK_ACT];
    for r in 0..NR {
        if r < rows {
            let src = &w[(j0 + r) * row_bytes + off..][..len];
            decode(dtype, src, &mut lv[..kc], &mut sc[..groups], &mut mn[..kc / QK_ACT]);
        } else {
            lv[..kc].fill(0);
            sc[..groups].fill(0.0);
            mn[..kc / QK_ACT].fill(0.0);
        }
        for (s, four) in lv[..kc].chunks_exact(4).enumerate() {
            levels[(s * NR + r) * 4..][..4].copy_from_slice(four);
        }
        for (g, &v) in sc[..groups].iter().enumerate() {
            scales[g * NR + r] = v;
        }
        if format.min {
            for (b, &v) in mn[..kc / QK_ACT].iter().enumerate() {
                mins[b * NR + r] = v;
            }
        }
    }
}

/// Decodes whole blocks `src` of `dtype` into unsigned levels `lv`, a scale per group `sc` and,
/// for dtypes with minimums, a minimum per block of 32 `mn` (see [`Format`]).
fn decode(dtype: DType, src: &[u8], lv: &mut [u8], sc: &mut [f32], mn: &mut [f32]) {
    match dtype {
        DType::Q8_0 => with_blocks(src, |blocks: &[BlockQ8_0]| {
            for ((b, l), s) in blocks.iter().zip(lv.chunks_exact_mut(32)).zip(sc.iter_mut()) {
                for (u, &q) in l.iter_mut().zip(&b.qs) {
                    *u = (q as u8) ^ 0x80;
                }
                *s = b.d.to_f32();
            }
        }),
        DType::Q4_0 => with_blocks(src, |blocks: &[BlockQ4_0]| {
            for ((b, l), s) in blocks.iter().zip(lv.chunks_exact_mut(32)).zip(sc.iter_mut()) {
                nibbles(&b.qs, l);
                *s = b.d.to_f32();
            }
        }),
        DType::Q4_1 => with_blocks(src, |blocks: &[BlockQ4_1]| {
            for (((b, l), s), m) in blocks.iter().zip(lv.chunks_exact_mut(32)).zip(sc.iter_mut()).zip(mn.iter_mut()) {
                nibbles(&b.qs, l);
                (*s, *m) = (b.d.to_f32(), b.m.to_f32());
            }
        }),
        DType::Q4K => with_blocks(src, |blocks: &[BlockQ4K]| {
            let chunks = lv.chunks_exact_mut(QK_K).zip(sc.chunks_exact_mut(8)).zip(mn.chunks_exact_mut(8));
            for (b, ((l, s), m)) in blocks.iter().zip(chunks) {
                let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
                let (scs, ms) = unpack_scales_mins(&b.scales);
                for j in 0..8 {
                    let bytes = &b.qs[32 * (j / 2)..32 * (j / 2 + 1)];
                    for (u, &byte) in l[32 * j..32 * j + 32].iter_mut().zip(bytes) {
                        *u = (byte >> (4 * (j % 2))) & 0x0f;
                    }
                    s[j] = d * f32::from(scs[j]);
                    m[j] = -(dmin * f32::from(ms[j]));
                }
            }
        }),
        DType::Q6K => with_blocks(src, |blocks: &[BlockQ6K]| {
            for ((b, l), s) in blocks.iter().zip(lv.chunks_exact_mut(QK_K)).zip(sc.chunks_exact_mut(16)) {
                for h in 0..2 {
                    for i in 0..32 {
                        let (a, bb, c) = (b.ql[64 * h + i], b.ql[64 * h + 32 + i], b.qh[32 * h + i]);
                        l[128 * h + i] = (a & 0x0f) | ((c & 3) << 4);
                        l[128 * h + i + 32] = (bb & 0x0f) | (((c >> 2) & 3) << 4);
                        l[128 * h + i + 64] = (a >> 4) | (((c >> 4) & 3) << 4);
                        l[128 * h + i + 96] = (bb >> 4) | (((c >> 6) & 3) << 4);
                    }
                }
                let d = b.d.to_f32();
                for (v, &q) in s.iter_mut().zip(&b.scales) {
                    *v = d * f32::from(q);
                }
            }
        }),
        DType::F32 | DType::F16 | DType::BF16 => unreachable!("not a block-quantized dtype"),
    }
}

/// The scales (and minimums) of [`decode`] without its levels, for the vectorised decoder, with
/// `f32_of` (an exact conversion) for the f16 fields.
#[cfg(target_arch = "x86_64")]
fn decode_scales(dtype: DType, src: &[u8], sc: &mut [f32], mn: &mut [f32], f32_of: impl Fn(half::f16) -> f32) {
    match dtype {
        DType::Q8_0 => with_blocks(src, |blocks: &[BlockQ8_0]| {
            for (b, s) in blocks.iter().zip(sc.iter_mut()) {
                *s = f32_of(b.d);
            }
        }),
        DType::Q4_0 => with_blocks(src, |blocks: &[BlockQ4_0]| {
            for (b, s) in blocks.iter().zip(sc.iter_mut()) {
                *s = f32_of(b.d);
            }
        }),
        DType::Q4_1 => with_blocks(src, |blocks: &[BlockQ4_1]| {
            for ((b, s), m) in blocks.iter().zip(sc.iter_mut()).zip(mn.iter_mut()) {
                (*s, *m) = (f32_of(b.d), f32_of(b.m));
            }
        }),
        DType::Q4K => with_blocks(src, |blocks: &[BlockQ4K]| {
            for (b, (s, m)) in blocks.iter().zip(sc.chunks_exact_mut(8).zip(mn.chunks_exact_mut(8))) {
                let (d, dmin) = (f32_of(b.d), f32_of(b.dmin));
                let (scs, ms) = unpack_scales_mins(&b.scales);
                for j in 0..8 {
                    s[j] = d * f32::from(scs[j]);
                    m[j] = -(dmin * f32::from(ms[j]));
                }
            }
        }),
        DType::Q6K => with_blocks(src, |blocks: &[BlockQ6K]| {
            for (b, s) in blocks.iter().zip(sc.chunks_exact_mut(16)) {
                let d = f32_of(b.d);
                for (v, &q) in s.iter_mut().zip(&b.scales) {
                    *v = d * f32::from(q);
                }
            }
        }),
        DType::F32 | DType::F16 | DType::BF16 => unreachable!("not a block-quantized dtype"),
    }
}

/// The 32 levels of a `Q4_0`/`Q4_1` block: low nibbles (elements 0..16), then high nibbles.
fn nibbles(qs: &[u8; 16], out: &mut [u8]) {
    for (j, &q) in qs.iter().enumerate() {
        out[j] = q & 0x0f;
        out[j + 16] = q >> 4;
    }
}

/// [`pack_panel`] with the AVX-512 decoder for the dtypes it has (the GEMM runs only where the
/// CPU has AVX-512 VNNI, and with it F and BW).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn pack_fast(
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    j0: usize,
    rows: usize,
    p0: usize,
    kc: usize,
    levels: &mut [u8],
    scales: &mut [f32],
    mins: &mut [f32],
) {
    if pack::supports(dtype) && Isa::detect() >= Isa::Avx512 {
        // SAFETY: the CPU has AVX-512 F/BW and F16C (`Isa::Avx512` and above include them).
        unsafe { pack::pack_panel(dtype, false, w, row_bytes, j0, rows, p0, kc, levels, scales, mins) }
    } else {
        pack_panel(dtype, w, row_bytes, j0, rows, p0, kc, levels, scales, mins);
    }
}

/// A task's decoded panels, kept per thread from call to call (a few hundred KiB: allocating
/// them afresh would cost page faults).
#[derive(Default)]
struct Panels {
    levels: Vec<u8>,
    scales: Vec<f32>,
    mins: Vec<f32>,
    /// The 16-bit panels of `Q4_K` (`pack::pack_wide`) and their integer scales; empty until a
    /// GEMM needs them.
    wide: Vec<i16>,
    scw: Vec<u32>,
}

thread_local! {
    static PANELS: std::cell::RefCell<Panels> = std::cell::RefCell::new(Panels::default());
}

/// Runs `f` with this thread's panel buffers, grown to hold `panels` panels, 16-bit ones too with
/// `wide` (or with fresh ones, should this thread already be using its own further up the stack).
fn with_panels<R>(panels: usize, wide: bool, f: impl FnOnce(&mut Panels) -> R) -> R {
    let grow = |p: &mut Panels| {
        let (l, s) = (panels * NR * KC, panels * NR * (KC / 16));
        if p.levels.len() < l {
            p.levels.resize(l, 0);
            p.scales.resize(s, 0.0);
            p.mins.resize(s, 0.0);
        }
        if wide && p.wide.len() < l {
            p.wide.resize(l, 0);
            p.scw.resize(panels * NR * (KC / QK_ACT), 0);
        }
    };
    PANELS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut p) => {
            grow(&mut p);
            f(&mut p)
        }
        Err(_) => {
            let mut p = Panels::default();
            grow(&mut p);
            f(&mut p)
        }
    })
}

/// The tiled VNNI GEMM: quantizes the rows of `x` in parallel (as `act` says), then runs one task
/// per block of weight rows (and of `x` rows, when there are too few weight blocks for the
/// threads). `Q4_K` with two-digit activations runs the 16-bit kernel ([`wide`]) on activations
/// with one 16-bit value per element and a unit per 256.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn gemm(
    dtype: DType,
    w: &[u8],
    row_bytes: usize,
    packed: bool,
    act: ActQuant,
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let format = Format::of(dtype);
    let threads = rayon::current_num_threads();
    let serial = threads == 1 || m < 4;
    let wide = uses_wide(dtype, act);
    let (acts, wide_acts): (Vec<RowAct>, Vec<ActWide>) = match (wide, serial) {
        (false, true) => (x.chunks_exact(k).map(|r| RowAct::new(r, format, act)).collect(), Vec::new()),
        (false, false) => (x.par_chunks_exact(k).map(|r| RowAct::new(r, format, act)).collect(), Vec::new()),
        (true, true) => (Vec::new(), x.chunks_exact(k).map(ActWide::quantize).collect()),
        (true, false) => (Vec::new(), x.par_chunks_exact(k).map(ActWide::quantize).collect()),
    };
    let n_panels = n.div_ceil(NR);
    let nc_panels = n_panels.div_ceil(4 * threads).clamp(1, MAX_NC_PANELS);
    let n_blocks = n_panels.div_ceil(nc_panels);
    let m_tiles = m.div_ceil(MR);
    let m_chunks = if n_blocks >= 4 * threads { 1 } else { m_tiles.min((4 * threads).div_ceil(n_blocks)) };
    let mc_tiles = m_tiles.div_ceil(m_chunks);
    let m_chunks = m_tiles.div_ceil(mc_tiles);
    let out = OutPtr(y.as_mut_ptr());
    let task = |t: usize| {
        let (jb, mc) = (t % n_blocks, t / n_blocks);
        let panels = jb * nc_panels..((jb + 1) * nc_panels).min(n_panels);
        let tiles = mc * mc_tiles..((mc + 1) * mc_tiles).min(m_tiles);
        // With repacked rows, each panel's slice of rows restored to original blocks.
        let mut restored = Vec::new();
        with_panels(panels.len(), wide, |p| {
            for p0 in (0..k).step_by(KC) {
                let kc = (k - p0).min(KC);
                let (lv_len, sc_len, mn_len) = (NR * kc, NR * kc / format.group, NR * kc / QK_ACT);
                let d_len = NR * kc / QK_K;
                for (q, jp) in panels.clone().enumerate() {
                    let (j0, rows) = (jp * NR, (n - jp * NR).min(NR));
                    if wide {
                        // SAFETY: the GEMM runs with AVX-512 VNNI, and with it F/BW and F16C.
                        unsafe {
                            pack::pack_wide(
                                packed,
                                w,
                                row_bytes,
                                j0,
                                rows,
                                p0,
                                kc,
                                &mut p.wide[q * lv_len..][..lv_len],
                                &mut p.scw[q * mn_len..][..mn_len],
                                &mut p.scales[q * d_len..][..d_len],
                                &mut p.mins[q * mn_len..][..mn_len],
                            )
                        };
                        continue;
                    }
                    let direct = dtype == DType::Q4K || pack::packed_q4_0_fits(row_bytes, p0, kc);
                    if packed && direct && Isa::detect() >= Isa::Avx512 {
                        // SAFETY: the CPU has AVX-512 F/BW and F16C (`Isa::Avx512` and above
                        // include them); the rows are repacked `Q4_K`, or repacked `Q4_0` with
                        // the columns within their whole groups.
                        unsafe {
                            pack::pack_panel(
                                dtype,
                                true,
                                w,
                                row_bytes,
                                j0,
                                rows,
                                p0,
                                kc,
                                &mut p.levels[q * lv_len..][..lv_len],
                                &mut p.scales[q * sc_len..][..sc_len],
                                &mut p.mins[q * mn_len..][..mn_len],
                            )
                        };
                        continue;
                    }
                    let (w, row_bytes, j0, p0) = if packed {
                        let slice = restore_rows(dtype, w, row_bytes, j0, rows, p0, kc, &mut restored);
                        (slice, dtype.bytes_for(kc).expect("whole blocks"), 0, 0)
                    } else {
                        (w, row_bytes, j0, p0)
                    };
                    pack_fast(
                        dtype,
                        w,
                        row_bytes,
                        j0,
                        rows,
                        p0,
                        kc,
                        &mut p.levels[q * lv_len..][..lv_len],
                        &mut p.scales[q * sc_len..][..sc_len],
                        &mut p.mins[q * mn_len..][..mn_len],
                    );
                }
                for ti in tiles.clone() {
                    let i0 = ti * MR;
                    let rows = (m - i0).min(MR);
                    for (q, jp) in panels.clone().enumerate() {
                        let j0 = jp * NR;
                        if wide {
                            let panel = wide::Panel {
                                wide: &p.wide[q * lv_len..][..lv_len],
                                d: &p.scales[q * d_len..][..d_len],
                                mins: &p.mins[q * mn_len..][..mn_len],
                            };
                            let tile = vnni::Tile { i0, rows, j0, cols: (n - j0).min(NR), ldc: n, accumulate: p0 > 0 };
                            // SAFETY: as below, for the 16-bit panel and activations.
                            unsafe { wide::tile(&wide_acts[i0..i0 + rows], p0, kc, &panel, &tile, out.get()) };
                            continue;
                        }
                        let panel = vnni::Panel {
                            levels: &p.levels[q * lv_len..][..lv_len],
                            scales: &p.scales[q * sc_len..][..sc_len],
                            mins: &p.mins[q * mn_len..][..mn_len],
                        };
                        let tile = vnni::Tile { i0, rows, j0, cols: (n - j0).min(NR), ldc: n, accumulate: p0 > 0 };
                        // SAFETY: `isa` is `Avx512Vnni`, at most `Isa::detect()`; the panel was
                        // decoded for `format` over columns `p0..p0 + kc` of rows `j0..j0 + cols`,
                        // the activations cover those columns, and the tile's outputs lie inside
                        // `y` (`i0 + rows <= m`, `j0 + cols <= n`) and belong to this task alone.
                        unsafe { vnni::tile(format, &acts[i0..i0 + rows], p0, kc, &panel, &tile, out.get()) };
                    }
                }
            }
        });
    };
    let tasks = n_blocks * m_chunks;
    if threads == 1 || m * n * k < 1 << 20 {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::quant::test_util::{arbitrary_weights, random_row, random_weights, term_magnitudes};
    use crate::{AlignedBytes, CpuStorage, cpu};

    const QUANT: [DType; 5] = [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4K, DType::Q6K];

    /// The bound on the f32 rounding between two sums of the same integer terms for output
    /// `(x row, weight row)`: a relative 1e-5 of the sum of the magnitudes of all terms (the
    /// activations bounded by their block's max, `terms` from [`term_magnitudes`]) plus 1e-5 of
    /// the result `r`.
    fn tolerance(terms: &[f32], x: &[f32], r: f32) -> f32 {
        let amax = x.chunks(QK_ACT).map(|b| b.iter().fold(0f32, |a, v| a.max(v.abs())));
        let magnitude: f32 = terms.chunks(QK_ACT).zip(amax).map(|(t, a)| a * t.iter().sum::<f32>()).sum();
        1e-5 * magnitude + 1e-5 * r.abs()
    }

    /// A bound on the f32 rounding of an output: [`tolerance`] or [`tolerance_wide`].
    type Tolerance = fn(&[f32], &[f32], f32) -> f32;

    /// [`tolerance`] for the 16-bit `Q4_K` GEMM, whose activation unit is per 256 values.
    fn tolerance_wide(terms: &[f32], x: &[f32], r: f32) -> f32 {
        let amax = x.chunks(QK_K).map(|b| b.iter().fold(0f32, |a, v| a.max(v.abs())));
        let magnitude: f32 = terms.chunks(QK_K).zip(amax).map(|(t, a)| a * t.iter().sum::<f32>()).sum();
        1e-5 * magnitude + 1e-5 * r.abs()
    }

    /// The 16-bit `Q4_K` product `x W^T` (`x` `[m, k]`, `w` `[n, k]` `Q4_K` blocks), scalar: each row
    /// of `x` quantized by [`ActWide`], each super-block's integer `sum(sc * q * v)` exact, scaled by
    /// `d * unit`, plus the minimums `-(dmin * m_j) * (unit * S_j)`.
    fn wide_reference(x: &[f32], w: &[u8], m: usize, n: usize, k: usize) -> Vec<f32> {
        let row_bytes = DType::Q4K.bytes_for(k).unwrap();
        let mut y = vec![0f32; m * n];
        for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)) {
            let act = ActWide::quantize(xr);
            for (row, out) in w.chunks_exact(row_bytes).zip(yr.iter_mut()) {
                with_blocks(row, |blocks: &[BlockQ4K]| {
                    for (sb, b) in blocks.iter().enumerate() {
                        let (scs, ms) = unpack_scales_mins(&b.scales);
                        let mut p = 0i64;
                        for (j, &sc) in scs.iter().enumerate() {
                            for l in 0..32 {
                                let q = (b.qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0f;
                                let v = act.v[sb * QK_K + 32 * j + l];
                                p += i64::from(sc) * i64::from(q) * i64::from(v);
                            }
                        }
                        *out += b.d.to_f32() * act.unit[sb] * p as f32;
                        for (&m, &e) in ms.iter().zip(&act.e[sb * 8..sb * 8 + 8]) {
                            *out += -(b.dmin.to_f32() * f32::from(m)) * e;
                        }
                    }
                });
            }
        }
        y
    }

    /// Runs every available level and the reference on `x` `[m, k]` and the weight bytes `w`
    /// (`[n, k]` of `dtype`). The integers are the reference's, so the results differ only by
    /// f32 rounding ([`tolerance`]).
    fn check(dtype: DType, w: &[u8], m: usize, n: usize, k: usize, seed: u64) -> Result<(), TestCaseError> {
        let x = random_row(seed.wrapping_add(1), m * k);
        let tensor = Tensor::from_storage(CpuStorage::owned(AlignedBytes::copy_from(w)), dtype, [n, k]).unwrap();
        let mut want = vec![f32::NAN; m * n];
        cpu::reference::matmul_quantized(&x, &tensor, &mut want).unwrap();
        let row_bytes = dtype.bytes_for(k).unwrap();
        let terms: Vec<Vec<f32>> =
            (0..n).map(|j| term_magnitudes(dtype, &w[j * row_bytes..][..row_bytes], k)).collect();
        // The GEMM of `Q4_K` with two digits is the 16-bit kernel, with a reference of its own.
        let wide_want = if dtype == DType::Q4K { wide_reference(&x, w, m, n, k) } else { Vec::new() };
        for isa in Isa::available() {
            let mut got = vec![f32::NAN; m * n];
            matmul_quantized_with(isa, &x, &tensor, &mut got).unwrap();
            let gemm_ran = cfg!(target_arch = "x86_64") && isa == Isa::Avx512Vnni && m >= GEMM_MIN_M;
            let (want, tolerance): (&[f32], Tolerance) =
                if dtype == DType::Q4K && gemm_ran { (&wide_want, tolerance_wide) } else { (&want, tolerance) };
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx512Vnni && m < GEMM_MIN_M {
                // The GEMM itself, which `matmul_quantized_with` leaves to the matrix-vector
                // kernels at this `m`: every tile height must match too.
                let mut tiled = vec![f32::NAN; m * n];
                gemm(dtype, w, row_bytes, false, ActQuant::Int16, m, n, k, &x, &mut tiled);
                let (want, tolerance): (&[f32], Tolerance) =
                    if dtype == DType::Q4K { (&wide_want, tolerance_wide) } else { (want, tolerance) };
                for (idx, (&t, &r)) in tiled.iter().zip(want).enumerate() {
                    let tol = tolerance(&terms[idx % n], &x[idx / n * k..(idx / n + 1) * k], r);
                    prop_assert!((t - r).abs() <= tol, "GEMM {dtype} m={m} n={n} k={k}: y[{idx}] = {t} vs {r}");
                }
            }
            for i in 0..m {
                for j in 0..n {
                    let (g, r) = (got[i * n + j], want[i * n + j]);
                    let tol = tolerance(&terms[j], &x[i * k..(i + 1) * k], r);
                    prop_assert!(
                        (g - r).abs() <= tol,
                        "{isa:?} {dtype} m={m} n={n} k={k}: y[{i}, {j}] = {g}, reference {r}, tol {tol}"
                    );
                }
            }
        }
        Ok(())
    }

    fn dims() -> impl Strategy<Value = (DType, usize, usize, usize)> {
        (
            prop::sample::select(QUANT.to_vec()),
            prop_oneof![Just(1usize), Just(3), Just(17), Just(129), 1usize..12],
            prop_oneof![1usize..40, 60usize..100],
            prop_oneof![1usize..5, Just(KC / 32 + 3)],
        )
            .prop_map(|(dtype, m, n, blocks)| {
                // Several slices of `k` for the 32-element formats, one or two for the k-quants.
                let blocks = if dtype.block_len() == QK_K { blocks.min(5) } else { blocks };
                // Keep the scalar reference quick on the tallest `x`.
                let blocks = if m > 100 { blocks.min(3) } else { blocks };
                (dtype, m, n, blocks * dtype.block_len())
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn every_isa_matches_reference((dtype, m, n, k) in dims(), seed in any::<u64>()) {
            let (w, _) = random_weights(dtype, n, k, seed);
            check(dtype, &w, m, n, k, seed)?;
        }

        #[test]
        fn every_isa_matches_reference_on_arbitrary_bytes((dtype, m, n, k) in dims(), seed in any::<u64>()) {
            let w = arbitrary_weights(dtype, n, k, seed);
            check(dtype, &w, m, n, k, seed)?;
        }
    }

    /// Model-sized rows, several slices of `k` and tasks, and an `x` taller than one tile: each
    /// row of the product equals the fast matrix-vector product of the same row of `x`.
    #[test]
    fn rows_equal_the_matvec_of_each_row() {
        let (m, n, k) = (9, 70, 2 * KC + 256);
        let x = random_row(21, m * k);
        for dtype in QUANT {
            let (w, _) = random_weights(dtype, n, k, 22);
            let tensor = Tensor::from_storage(CpuStorage::owned(AlignedBytes::copy_from(&w)), dtype, [n, k]).unwrap();
            let mut got = vec![f32::NAN; m * n];
            matmul_quantized(&x, &tensor, &mut got).unwrap();
            let row_bytes = dtype.bytes_for(k).unwrap();
            for (i, row) in got.chunks_exact(n).enumerate() {
                let xr = &x[i * k..(i + 1) * k];
                let mut want = vec![0f32; n];
                cpu::matvec(&tensor, xr, &mut want).unwrap();
                for (j, (&g, &r)) in row.iter().zip(&want).enumerate() {
                    let tol = tolerance(&term_magnitudes(dtype, &w[j * row_bytes..][..row_bytes], k), xr, r);
                    assert!((g - r).abs() <= tol, "{dtype} y[{i}, {j}] = {g}, matvec {r}, tol {tol}");
                }
            }
        }
    }

    /// With one-digit activations the GEMM (no low-digit pass) computes the reference's integers
    /// from the same one-digit quantization, on every tile height, repacked rows included.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn int8_gemm_matches_the_int8_reference() {
        if Isa::detect() < Isa::Avx512Vnni {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI");
            return;
        }
        let (m, n, k) = (7, 45, KC + 512);
        let x = random_row(31, m * k);
        for dtype in QUANT {
            let (w, _) = random_weights(dtype, n, k, 32);
            let row_bytes = dtype.bytes_for(k).unwrap();
            let mut want = vec![0f32; m * n];
            for (xr, yr) in x.chunks_exact(k).zip(want.chunks_exact_mut(n)) {
                let act = ActQ8::quantize_as(xr, ActQuant::Int8);
                for (row, out) in w.chunks_exact(row_bytes).zip(yr.iter_mut()) {
                    *out = crate::quant::vec_dot::row_dot(dtype, row, &act);
                }
            }
            let mut runs = vec![(false, w.clone())];
            if matches!(dtype, DType::Q4_0 | DType::Q4K) {
                let repack = if dtype == DType::Q4K { q4_k::repack_row } else { q4_0::repack_row };
                let mut packed = vec![0u8; w.len()];
                for (src, dst) in w.chunks_exact(row_bytes).zip(packed.chunks_exact_mut(row_bytes)) {
                    repack(src, dst);
                }
                runs.push((true, packed));
            }
            for (packed, bytes) in runs {
                let mut got = vec![f32::NAN; m * n];
                gemm(dtype, &bytes, row_bytes, packed, ActQuant::Int8, m, n, k, &x, &mut got);
                let mut two = vec![f32::NAN; m * n];
                gemm(dtype, &bytes, row_bytes, packed, ActQuant::Int16, m, n, k, &x, &mut two);
                let mut moved = 0;
                for (idx, ((&g, &r), &t)) in got.iter().zip(&want).zip(&two).enumerate() {
                    let (i, j) = (idx / n, idx % n);
                    let terms = term_magnitudes(dtype, &w[j * row_bytes..][..row_bytes], k);
                    let tol = tolerance(&terms, &x[i * k..(i + 1) * k], r);
                    assert!((g - r).abs() <= tol, "{dtype} packed={packed} y[{i}, {j}] = {g}, reference {r}");
                    moved += usize::from(g != t);
                }
                // One digit is a different rounding of `x`: most outputs move.
                assert!(moved > m * n / 2, "{dtype}: only {moved} outputs differ from two digits");
            }
        }
    }

    /// The 16-bit `Q4_K` GEMM on every tile height, three slices of `k`, partial panels, plain and
    /// repacked rows of random and arbitrary blocks: the scalar 16-bit reference's integers, and
    /// within the 16-bit rounding of the exact product (half a unit of each super-block of `x`
    /// per weight).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn wide_gemm_matches_the_wide_reference() {
        if Isa::detect() < Isa::Avx512Vnni {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI");
            return;
        }
        let (m, n, k) = (19, 45, 2 * KC + 512);
        let dtype = DType::Q4K;
        let row_bytes = dtype.bytes_for(k).unwrap();
        let mut x = random_row(41, m * k);
        // One row with an outlier 1000 times its neighbours', one all zero.
        x[3 * k + 700] = 1000.0 * x[3 * k + 701].abs().max(1.0);
        x[5 * k..6 * k].fill(0.0);
        for (case, w) in [random_weights(dtype, n, k, 42).0, arbitrary_weights(dtype, n, k, 43)].into_iter().enumerate()
        {
            let want = wide_reference(&x, &w, m, n, k);
            let mut exact = vec![0f64; m * n];
            let mut wf = vec![0f32; k];
            for (j, row) in w.chunks_exact(row_bytes).enumerate() {
                crate::quant::dequantize_row(dtype, row, &mut wf).unwrap();
                for i in 0..m {
                    exact[i * n + j] =
                        x[i * k..(i + 1) * k].iter().zip(&wf).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                }
            }
            let mut packed = vec![0u8; w.len()];
            for (src, dst) in w.chunks_exact(row_bytes).zip(packed.chunks_exact_mut(row_bytes)) {
                q4_k::repack_row(src, dst);
            }
            for (is_packed, bytes) in [(false, &w), (true, &packed)] {
                let mut got = vec![f32::NAN; m * n];
                gemm(dtype, bytes, row_bytes, is_packed, ActQuant::Int16, m, n, k, &x, &mut got);
                for (idx, (&g, &r)) in got.iter().zip(&want).enumerate() {
                    let (i, j) = (idx / n, idx % n);
                    let (xr, terms) =
                        (&x[i * k..(i + 1) * k], term_magnitudes(dtype, &w[j * row_bytes..][..row_bytes], k));
                    let tol = tolerance_wide(&terms, xr, r);
                    let what = format!("case {case} packed={is_packed} y[{i}, {j}]");
                    assert!((g - r).abs() <= tol, "{what} = {g}, reference {r}, tol {tol}");
                    let units = xr.chunks(QK_K).map(|b| b.iter().fold(0f32, |a, v| a.max(v.abs())) / 32767.0);
                    let rounding: f32 =
                        terms.chunks(QK_K).zip(units).map(|(t, u)| 0.5 * u * t.iter().sum::<f32>()).sum();
                    let off = (f64::from(g) - exact[idx]).abs() as f32;
                    assert!(
                        off <= rounding + tol,
                        "{what} = {g}, exact {}, off by {off} > {rounding} + {tol}",
                        exact[idx]
                    );
                }
            }
        }
    }

    /// The AVX-512 decoder writes the scalar decoder's panels byte for byte: random blocks (every
    /// bit pattern of the levels and packed scales), full and partial panels, slices of `k` that
    /// start past the first block and end on half a register.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vectorised_panels_equal_scalar_panels() {
        if Isa::detect() < Isa::Avx512 {
            eprintln!("skipped: this CPU lacks AVX-512 F/BW");
            return;
        }
        let dtypes: Vec<DType> = QUANT.into_iter().filter(|&d| pack::supports(d)).collect();
        assert_eq!(dtypes, [DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4K]);
        let mut rng = StdRng::seed_from_u64(5);
        for dtype in dtypes {
            for case in 0..12u64 {
                let bl = dtype.block_len();
                let k = bl * rng.random_range(1..=(2 * KC / bl + 2));
                let n = NR + 5;
                let w = arbitrary_weights(dtype, n, k, case * 31 + 7);
                let row_bytes = dtype.bytes_for(k).unwrap();
                let p0 = bl * rng.random_range(0..k / bl);
                let kc = (bl * rng.random_range(1..=(k - p0) / bl)).min(KC);
                let format = Format::of(dtype);
                for (j0, rows) in [(0, NR), (5, NR), (NR, 5), (3, 1), (0, 0)] {
                    let mut panels = [(); 2].map(|_| {
                        (vec![0xa5u8; kc * NR], vec![f32::NAN; kc / format.group * NR], vec![f32::NAN; kc / 32 * NR])
                    });
                    let (scalar, simd) = panels.split_at_mut(1);
                    let (a, b) = (&mut scalar[0], &mut simd[0]);
                    let mins = |m: &mut Vec<f32>| if format.min { m.len() } else { 0 };
                    let (ma, mb) = (mins(&mut a.2), mins(&mut b.2));
                    pack_panel(dtype, &w, row_bytes, j0, rows, p0, kc, &mut a.0, &mut a.1, &mut a.2[..ma]);
                    // SAFETY: checked above that the CPU has AVX-512 F/BW.
                    unsafe {
                        pack::pack_panel(
                            dtype,
                            false,
                            &w,
                            row_bytes,
                            j0,
                            rows,
                            p0,
                            kc,
                            &mut b.0,
                            &mut b.1,
                            &mut b.2[..mb],
                        )
                    };
                    let what = format!("{dtype} k={k} p0={p0} kc={kc} j0={j0} rows={rows}");
                    assert_eq!(a.0, b.0, "levels of {what}");
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&a.1), bits(&b.1), "scales of {what}");
                    assert_eq!(bits(&a.2), bits(&b.2), "minimums of {what}");
                }
            }
        }
    }

    /// The AVX-512 decoder of repacked `Q4_K` rows writes the scalar decoder's panels of the
    /// original rows, byte for byte.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn repacked_panels_equal_scalar_panels() {
        if Isa::detect() < Isa::Avx512 {
            eprintln!("skipped: this CPU lacks AVX-512 F/BW");
            return;
        }
        for (dtype, case) in [DType::Q4K, DType::Q4_0].into_iter().flat_map(|d| (0..6usize).map(move |c| (d, c))) {
            // Q4_0: rows of 8 to 18 blocks whose last blocks (past the whole groups) are not read.
            let (n, k) = (NR + 3, if dtype == DType::Q4K { QK_K * (1 + case) } else { 32 * (8 + 2 * case) });
            let w = arbitrary_weights(dtype, n, k, case as u64 + 40);
            let row_bytes = dtype.bytes_for(k).unwrap();
            let mut packed = vec![0u8; w.len()];
            let repack = if dtype == DType::Q4K { q4_k::repack_row } else { q4_0::repack_row };
            for (src, dst) in w.chunks_exact(row_bytes).zip(packed.chunks_exact_mut(row_bytes)) {
                repack(src, dst);
            }
            let (p0, kc) = if dtype == DType::Q4K {
                let p0 = QK_K * (case / 2);
                (p0, (k - p0).min(KC))
            } else {
                (32 * (case % 3), 32 * (4 + case - case % 3))
            };
            assert!(dtype == DType::Q4K || pack::packed_q4_0_fits(row_bytes, p0, kc));
            for (j0, rows) in [(0, NR), (3, NR), (NR, 3)] {
                let mins = if dtype == DType::Q4K { kc / 32 * NR } else { 0 };
                let mut a = (vec![0xa5u8; kc * NR], vec![f32::NAN; kc / 32 * NR], vec![f32::NAN; mins]);
                let mut b = a.clone();
                pack_panel(dtype, &w, row_bytes, j0, rows, p0, kc, &mut a.0, &mut a.1, &mut a.2);
                // SAFETY: checked above that the CPU has AVX-512 F/BW.
                unsafe {
                    pack::pack_panel(dtype, true, &packed, row_bytes, j0, rows, p0, kc, &mut b.0, &mut b.1, &mut b.2)
                };
                let what = format!("{dtype} k={k} p0={p0} kc={kc} j0={j0} rows={rows}");
                assert_eq!(a.0, b.0, "levels of {what}");
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a.1), bits(&b.1), "scales of {what}");
                assert_eq!(bits(&a.2), bits(&b.2), "minimums of {what}");
            }
        }
    }

    #[test]
    fn zero_activation_gives_zero() {
        let (w, _) = random_weights(DType::Q4K, 5, 256, 1);
        let tensor =
            Tensor::from_storage(CpuStorage::owned(AlignedBytes::copy_from(&w)), DType::Q4K, [5, 256]).unwrap();
        for isa in Isa::available() {
            let mut y = vec![f32::NAN; 15];
            matmul_quantized_with(isa, &[0.0; 3 * 256], &tensor, &mut y).unwrap();
            assert_eq!(y, vec![0.0; 15], "{isa:?}");
        }
    }

    #[test]
    fn rejects_float_weights_and_bad_lengths() {
        let w = Tensor::from_f32(&[0.0; 64], [2, 32]).unwrap();
        let mut y = [0f32; 2];
        let err = matmul_quantized(&[0.0; 32], &w, &mut y);
        assert!(matches!(err, Err(Error::UnsupportedDType { dtype: DType::F32, .. })));
        let q = Tensor::from_f32_as(&[0.5; 64], [2, 32], DType::Q8_0).unwrap();
        assert!(matches!(matmul_quantized(&[0.0; 33], &q, &mut y), Err(Error::InvalidArgument { .. })));
        let mut y3 = [0f32; 3];
        for isa in Isa::available() {
            let err = matmul_quantized_with(isa, &[0.0; 32], &q, &mut y3);
            assert!(matches!(err, Err(Error::LengthMismatch { what: "y", expected: 2, .. })), "{isa:?}");
        }
        matmul_quantized(&[], &q, &mut []).unwrap();
        // The reference validates the same way.
        assert!(matches!(
            cpu::reference::matmul_quantized(&[0.0; 32], &w, &mut y),
            Err(Error::UnsupportedDType { dtype: DType::F32, .. })
        ));
    }
}
