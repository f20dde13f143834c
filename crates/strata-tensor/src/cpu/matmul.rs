//! Prefill matrix multiplication `y = x W^T` for weights of every dtype: a cache-blocked GEMM with
//! packing, in the manner of BLIS.
//!
//! `x` is `[m, k]` (a token per row), `W` is `[n, k]` as stored in checkpoints, `y` is `[m, n]`.
//! The product is computed in tiles of `MR x NR` outputs by a register-blocked microkernel that
//! keeps the whole tile in vector registers: at each step `p` it loads `NR` consecutive values of
//! `W^T` (vectors along `n`), broadcasts `MR` values of `x` and does `MR * NR / lanes` fused
//! multiply-adds. To make both loads sequential, operands are first packed:
//!
//! - `x` is packed once per block of up to [`MB_PANELS`] panels of `MR` rows, each panel stored
//!   `p`-major (`MR` values per step), and shared by all threads.
//! - `W` is packed by each task for its own block of `n` (a few panels of `NR` rows) and one
//!   `KC`-wide slice of `k` at a time, each panel stored `p`-major (`NR` values per step). This is
//!   where dtypes meet: f32, f16 and bf16 rows are widened and transposed in registers (16 x 16
//!   or 8 x 8 transposes), block-quantized rows go through [`crate::quant::dequantize_row`]
//!   first, and from there on every dtype shares one microkernel.
//!
//! A task owns the outputs `y[rows, cols]` of its block of `n` (and of `m`, when `n` alone gives
//! too few tasks), so tasks never write the same element. Within a task the loop order is: slice
//! of `k` (pack `W`) -> panel of `x` (stays in L1) -> panel of `W` (streams from L2). Packing
//! buffers are kept per thread between calls. (Software prefetching of the next slice of `W`
//! during the arithmetic was tried and measured no faster: the hardware prefetcher keeps up.)
//!
//! The microkernels exist for AVX-512 (8 x 48), AVX2 + FMA (6 x 16) and portable code (4 x 16);
//! the level is an explicit parameter of [`matmul_with`] so tests run all of them. `m = 1` with a
//! float weight goes to the matrix-vector kernel, which reads `W` without packing it.
//!
//! Block-quantized weights take `cpu::matmul_quant` instead (two-digit activations, integer dot
//! products: the decode path's arithmetic, and faster) with AVX-512 VNNI or for few rows; this
//! GEMM remains their path for many rows without VNNI ([`matmul_dequantized`] runs it explicitly).

use rayon::prelude::*;

use super::matmul_quant::{GEMM_MIN_M, matmul_quantized_with};
use super::matvec_float::{Bf16, F16, F32, FloatElem, matvec_float_with};
use crate::cpu::{Isa, isa};
use crate::{AlignedBytes, DType, Error, Result, Tensor, quant};

/// The width of a slice of `k` packed at a time. A multiple of every block length (256 for the
/// k-quants), so that a slice of a block-quantized row starts and ends on block boundaries.
const KC: usize = 256;

/// The most panels of `x` packed at once; above this, `m` is processed in blocks (and `W` packed
/// once per block), which bounds the packed copy of `x`.
const MB_PANELS: usize = 64;

/// The most panels of `W` a task packs at once; its packed slice (`NC * KC` f32) stays in L2.
const MAX_NC_PANELS: usize = 4;

/// Below this many multiply-adds the product runs on the calling thread.
const SERIAL_FLOPS: usize = 1 << 20;

/// The largest tile of any microkernel, for the scratch tile used at the edges of `y`.
const MAX_TILE: usize = 8 * 48;

/// `y = x W^T`: `x` is `[m, k]` row-major with `m = x.len() / k`, `w` is `[n, k]` of any dtype
/// and `y` is `[m, n]`. Multi-threaded over blocks of `y` in the caller's rayon pool.
///
/// Block-quantized weights take [`crate::cpu::matmul_quantized`] (each row of `x` quantized to
/// two-digit blocks and integer dot products, the arithmetic of [`crate::cpu::matvec`]; for
/// `Q4_K`'s GEMM, 16-bit values with a unit per 256) with
/// AVX-512 VNNI, where it is a tiled GEMM, or for fewer than `GEMM_MIN_M` (16) rows, where it
/// is the matrix-vector product per row. Otherwise (many rows without VNNI) they are dequantized
/// while packing for the f32 GEMM ([`matmul_dequantized`]).
pub fn matmul(x: &[f32], w: &Tensor, y: &mut [f32]) -> Result<()> {
    matmul_with(isa(), x, w, y)
}

/// [`matmul`] at SIMD level `isa` (lowered to what this CPU supports).
pub(crate) fn matmul_with(isa: Isa, x: &[f32], w: &Tensor, y: &mut [f32]) -> Result<()> {
    let isa = isa.min(Isa::detect());
    let (m, _, _) = check_matmul("matmul", x, w, y)?;
    if w.dtype().is_quantized() && (isa == Isa::Avx512Vnni || m < GEMM_MIN_M) {
        return matmul_quantized_with(isa, x, w, y);
    }
    matmul_dequantized_with(isa, x, w, y)
}

/// `y = x W^T` through the f32 GEMM for every dtype: block-quantized weights are dequantized to
/// f32 while packing, so the product is that of the dequantized weight with `x` itself (no
/// quantized activation). [`matmul`]'s path for float weights, and for quantized ones without
/// VNNI or with a single row.
pub fn matmul_dequantized(x: &[f32], w: &Tensor, y: &mut [f32]) -> Result<()> {
    matmul_dequantized_with(isa(), x, w, y)
}

/// [`matmul_dequantized`] at SIMD level `isa` (lowered to what this CPU supports).
pub(crate) fn matmul_dequantized_with(isa: Isa, x: &[f32], w: &Tensor, y: &mut [f32]) -> Result<()> {
    let isa = isa.min(Isa::detect());
    let (m, n, k) = check_matmul("matmul", x, w, y)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let dtype = w.dtype();
    let bytes = w.cpu_bytes()?;
    if m == 1 && !dtype.is_quantized() {
        matvec_float_with(isa, dtype, bytes, n, k, x, y);
        return Ok(());
    }
    let problem = Problem { dtype, w: bytes, row_bytes: w.row_bytes(), m, n, k, x };
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Vnni => gemm::<x86::Avx512>(&problem, y),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => gemm::<x86::Avx2>(&problem, y),
        _ => gemm::<Portable>(&problem, y),
    }
}

/// Checks the operands of a matrix multiplication and returns `(m, n, k)`.
pub(crate) fn check_matmul(op: &'static str, x: &[f32], w: &Tensor, y: &[f32]) -> Result<(usize, usize, usize)> {
    let dims = w.shape().dims();
    if dims.len() != 2 {
        return Err(Error::InvalidArgument { op, msg: format!("weight must be 2-D [n, k], got shape {}", w.shape()) });
    }
    let (n, k) = (dims[0], dims[1]);
    if k == 0 {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("weight {} has no columns, so m is undefined", w.shape()),
        });
    }
    if !x.len().is_multiple_of(k) {
        return Err(Error::InvalidArgument {
            op,
            msg: format!("x has {} elements, not a whole number of rows of k = {k}", x.len()),
        });
    }
    let m = x.len() / k;
    let expected = m.checked_mul(n).ok_or_else(|| Error::InvalidArgument {
        op,
        msg: format!("y = [{m}, {n}] has more elements than memory can address"),
    })?;
    if y.len() != expected {
        return Err(Error::LengthMismatch { op, what: "y", expected, got: y.len() });
    }
    Ok((m, n, k))
}

/// The operands of one product, checked.
struct Problem<'a> {
    dtype: DType,
    w: &'a [u8],
    row_bytes: usize,
    m: usize,
    n: usize,
    k: usize,
    x: &'a [f32],
}

/// A register-blocked microkernel and the packing of panels of `x` and `W` into its layout.
///
/// # Safety
/// Implementors' methods may only be called on a CPU with the instructions they use; `gemm`
/// instantiates each implementation only for an [`Isa`] the CPU was checked to have.
unsafe trait Kernel {
    /// Rows of `x` (and of `y`) per tile.
    const MR: usize;
    /// Rows of `W` (columns of `y`) per tile.
    const NR: usize;

    /// `C = A B`, or `C += A B` when `accumulate`, for one `MR x NR` tile: `a` is a packed panel
    /// of `x` (`kc` steps of `MR` values), `b` a packed panel of `W` (`kc` steps of `NR` values),
    /// `c` the tile's first element with rows `ldc` apart.
    ///
    /// # Safety
    /// `a` must hold `kc * MR` and `b` `kc * NR` readable f32; `c` must be valid for `MR` rows of
    /// `NR` f32 with stride `ldc`, written by no one else meanwhile.
    unsafe fn tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool);

    /// Packs `rows <= width` rows of `kc` elements of `E` (the first at `src`, the next ones
    /// `stride` bytes apart) into `out` as `kc` steps of `width` f32, zero beyond `rows`: a
    /// transpose, widened to f32. Panels of `W` are packed with `width = NR`, of `x` with `MR`.
    ///
    /// # Safety
    /// Each of the `rows` rows must have `kc` readable elements and `out` `kc * width` writable
    /// f32; `width <= 64`.
    unsafe fn pack<E: FloatElem>(src: *const u8, stride: usize, rows: usize, kc: usize, width: usize, out: *mut f32);
}

/// A pointer to `y` that tasks share. Each task writes only its own tiles. (The quantized GEMM in
/// `matmul_quant` shares it on the same terms.)
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);

// SAFETY: `gemm` (and `matmul_quant`'s) gives every task a disjoint set of output tiles, so no
// element is written by two threads, and `y` outlives the parallel loop that uses the pointer.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// A task's packing buffers.
struct Scratch {
    /// Packed panels of `W` for one slice of `k`.
    b: AlignedBytes,
    /// Dequantized rows of a block-quantized `W`, before packing.
    rows: AlignedBytes,
}

impl Scratch {
    /// Grows the buffers to at least `b` and `rows` bytes.
    fn reserve(&mut self, b: usize, rows: usize) {
        if self.b.len() < b {
            self.b = AlignedBytes::zeroed(b);
        }
        if self.rows.len() < rows {
            self.rows = AlignedBytes::zeroed(rows);
        }
    }
}

thread_local! {
    /// The packing buffers of the tasks that run on this thread, kept from call to call: they
    /// are a few hundred KiB, and allocating them afresh costs page faults and zeroing.
    static SCRATCH: std::cell::RefCell<Scratch> =
        std::cell::RefCell::new(Scratch { b: AlignedBytes::zeroed(0), rows: AlignedBytes::zeroed(0) });
}

/// Runs `f` with this thread's packing buffers, grown to `b` and `rows` bytes (or with fresh
/// ones, should this thread already be using its own further up the stack).
fn with_scratch<R>(b: usize, rows: usize, f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => {
            s.reserve(b, rows);
            f(&mut s)
        }
        Err(_) => f(&mut Scratch { b: AlignedBytes::zeroed(b), rows: AlignedBytes::zeroed(rows) }),
    })
}

/// The bytes of `buf` as f32 (its 64-byte alignment suits any element type).
fn f32s(buf: &mut AlignedBytes) -> &mut [f32] {
    bytemuck::cast_slice_mut(buf.as_mut_slice())
}

/// `y = x W^T` with microkernel `K`: packs `x` block by block, then runs one task per block of
/// `y` in the caller's rayon pool (or on this thread, for small products).
fn gemm<K: Kernel>(pb: &Problem<'_>, y: &mut [f32]) -> Result<()> {
    let Problem { m, n, k, .. } = *pb;
    let threads = rayon::current_num_threads();
    let serial = threads == 1 || m.saturating_mul(n).saturating_mul(k) < SERIAL_FLOPS;
    let n_panels = n.div_ceil(K::NR);
    // Enough blocks of `n` for every thread to get several (work stealing then balances the
    // end), each no wider than MAX_NC_PANELS.
    let nc_panels = n_panels.div_ceil(4 * threads).clamp(1, MAX_NC_PANELS);
    let n_blocks = n_panels.div_ceil(nc_panels);
    let out = OutPtr(y.as_mut_ptr());

    let m_panels_total = m.div_ceil(K::MR);
    let mut apack = AlignedBytes::zeroed(m_panels_total.min(MB_PANELS) * K::MR * k * 4);
    for mb0 in (0..m_panels_total).step_by(MB_PANELS) {
        let m_panels = (m_panels_total - mb0).min(MB_PANELS);
        let a = &mut f32s(&mut apack)[..m_panels * K::MR * k];
        let pack = |(ip, panel): (usize, &mut [f32])| {
            let i0 = (mb0 + ip) * K::MR;
            pack_a::<K>(&pb.x[i0 * k..], (m - i0).min(K::MR), k, panel);
        };
        if serial {
            a.chunks_mut(K::MR * k).enumerate().for_each(pack);
        } else {
            a.par_chunks_mut(K::MR * k).enumerate().for_each(pack);
        }
        let a: &[f32] = a;

        // When `n` alone gives too few tasks (a narrow weight, many tokens), split `m` too.
        let m_chunks = if n_blocks >= 4 * threads { 1 } else { m_panels.min((4 * threads).div_ceil(n_blocks)) };
        let mc_panels = m_panels.div_ceil(m_chunks);
        let m_chunks = m_panels.div_ceil(mc_panels);
        let b_bytes = nc_panels * K::NR * KC * 4;
        let rows_bytes = if pb.dtype.is_quantized() { K::NR * KC * 4 } else { 0 };
        let task = |t: usize| -> Result<()> {
            let (jb, mc) = (t % n_blocks, t / n_blocks);
            let panels_j = jb * nc_panels..((jb + 1) * nc_panels).min(n_panels);
            let panels_i = mc * mc_panels..((mc + 1) * mc_panels).min(m_panels);
            with_scratch(b_bytes, rows_bytes, |s| gemm_block::<K>(pb, a, mb0, panels_i, panels_j, s, out))
        };
        let tasks = n_blocks * m_chunks;
        if serial {
            (0..tasks).try_for_each(task)?;
        } else {
            (0..tasks).into_par_iter().try_for_each(task)?;
        }
    }
    Ok(())
}

/// Packs `rows <= MR` rows of `x` (row `i` at `x[i * k..]`) into `out` as `k` steps of `MR`
/// values, zero beyond `rows`.
fn pack_a<K: Kernel>(x: &[f32], rows: usize, k: usize, out: &mut [f32]) {
    assert!(out.len() == K::MR * k && x.len() >= rows * k && rows <= K::MR);
    // SAFETY: `rows` rows of `k` f32 are readable at `x` (asserted), `k * 4` bytes apart, and
    // `out` holds `k * MR` f32.
    unsafe { K::pack::<F32>(x.as_ptr().cast(), k * 4, rows, k, K::MR, out.as_mut_ptr()) }
}

/// Computes the tiles of `y` in panels `panels_i` (of the current block of `m`, which starts at
/// panel `mb0`) by panels `panels_j` of `W`.
fn gemm_block<K: Kernel>(
    pb: &Problem<'_>,
    a: &[f32],
    mb0: usize,
    panels_i: std::ops::Range<usize>,
    panels_j: std::ops::Range<usize>,
    s: &mut Scratch,
    out: OutPtr,
) -> Result<()> {
    let Problem { m, n, k, .. } = *pb;
    let mut edge = [0f32; MAX_TILE];
    debug_assert!(K::MR * K::NR <= MAX_TILE);
    for p0 in (0..k).step_by(KC) {
        let kc = (k - p0).min(KC);
        for (q, jp) in panels_j.clone().enumerate() {
            let j0 = jp * K::NR;
            let panel = &mut f32s(&mut s.b)[q * K::NR * kc..(q + 1) * K::NR * kc];
            pack_b_panel::<K>(pb, j0, (n - j0).min(K::NR), p0, kc, panel, &mut s.rows)?;
        }
        let b = f32s(&mut s.b);
        for ip in panels_i.clone() {
            let i0 = (mb0 + ip) * K::MR;
            let rows = (m - i0).min(K::MR);
            let a_panel = &a[ip * K::MR * k + p0 * K::MR..][..kc * K::MR];
            for (q, jp) in panels_j.clone().enumerate() {
                let j0 = jp * K::NR;
                let cols = (n - j0).min(K::NR);
                let b_panel = &b[q * K::NR * kc..(q + 1) * K::NR * kc];
                if rows == K::MR && cols == K::NR {
                    // SAFETY: the panels hold `kc` steps (sliced above); the tile lies inside `y`
                    // (`i0 + MR <= m`, `j0 + NR <= n`, `y` is `m * n`), and belongs to this task
                    // alone. `K` was chosen for an ISA the CPU has.
                    unsafe { K::tile(kc, a_panel.as_ptr(), b_panel.as_ptr(), out.get().add(i0 * n + j0), n, p0 > 0) };
                } else {
                    // SAFETY: as above, with the tile computed into `edge` (MR x NR <= MAX_TILE).
                    unsafe { K::tile(kc, a_panel.as_ptr(), b_panel.as_ptr(), edge.as_mut_ptr(), K::NR, false) };
                    for i in 0..rows {
                        // SAFETY: row `i0 + i < m`, columns `j0..j0 + cols <= n`: inside `y` and
                        // owned by this task.
                        let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add((i0 + i) * n + j0), cols) };
                        let src = &edge[i * K::NR..i * K::NR + cols];
                        if p0 > 0 {
                            dst.iter_mut().zip(src).for_each(|(d, v)| *d += v);
                        } else {
                            dst.copy_from_slice(src);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Packs `rows` rows of `W` starting at row `j0`, elements `p0..p0 + kc`, into `out` in `K`'s
/// layout, widening or dequantizing to f32.
fn pack_b_panel<K: Kernel>(
    pb: &Problem<'_>,
    j0: usize,
    rows: usize,
    p0: usize,
    kc: usize,
    out: &mut [f32],
    scratch: &mut AlignedBytes,
) -> Result<()> {
    let rb = pb.row_bytes;
    assert!(out.len() == kc * K::NR && rows <= K::NR && (j0 + rows) * rb <= pb.w.len() && p0 + kc <= pb.k);
    let start = |bytes_per: usize| pb.w[j0 * rb + p0 * bytes_per..].as_ptr();
    // SAFETY (each arm): rows `j0..j0 + rows` lie inside `w` and each has elements `p0..p0 + kc`
    // (asserted above); `out` holds `kc * NR` f32.
    match pb.dtype {
        DType::F32 => unsafe { K::pack::<F32>(start(4), rb, rows, kc, K::NR, out.as_mut_ptr()) },
        DType::F16 => unsafe { K::pack::<F16>(start(2), rb, rows, kc, K::NR, out.as_mut_ptr()) },
        DType::BF16 => unsafe { K::pack::<Bf16>(start(2), rb, rows, kc, K::NR, out.as_mut_ptr()) },
        dtype => {
            // `p0` and `kc` are whole blocks: KC is a multiple of every block length and `k`
            // (the end of the last slice) is a whole number of blocks.
            let (off, len) = (dtype.bytes_for(p0), dtype.bytes_for(kc));
            let (Some(off), Some(len)) = (off, len) else {
                return Err(Error::NotBlockAligned { op: "matmul", dtype, len: kc, block: dtype.block_len() });
            };
            let tmp = &mut f32s(scratch)[..rows * kc];
            for (r, dst) in tmp.chunks_exact_mut(kc).enumerate() {
                let row = &pb.w[(j0 + r) * rb + off..][..len];
                quant::dequantize_row(dtype, row, dst)?;
            }
            // SAFETY: `tmp` holds `rows` rows of `kc` f32, `kc * 4` bytes apart.
            unsafe { K::pack::<F32>(tmp.as_ptr().cast(), kc * 4, rows, kc, K::NR, out.as_mut_ptr()) }
        }
    }
    Ok(())
}

/// The portable microkernel: plain loops over a 4 x 16 tile, which the compiler may vectorise
/// for the baseline target.
struct Portable;

// SAFETY: uses no instructions beyond the compilation target's.
unsafe impl Kernel for Portable {
    const MR: usize = 4;
    const NR: usize = 16;

    unsafe fn tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
        const MR: usize = Portable::MR;
        const NR: usize = Portable::NR;
        // SAFETY: the caller guarantees the panel lengths.
        let (a, b) = unsafe { (std::slice::from_raw_parts(a, kc * MR), std::slice::from_raw_parts(b, kc * NR)) };
        let mut acc = [[0f32; NR]; MR];
        for (av, bv) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
            for i in 0..MR {
                for j in 0..NR {
                    acc[i][j] += av[i] * bv[j];
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            // SAFETY: the caller guarantees `MR` rows of `NR` elements at stride `ldc`.
            let dst = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), NR) };
            for (d, v) in dst.iter_mut().zip(row) {
                *d = if accumulate { *d + v } else { *v };
            }
        }
    }

    unsafe fn pack<E: FloatElem>(src: *const u8, stride: usize, rows: usize, kc: usize, width: usize, out: *mut f32) {
        // SAFETY: the caller guarantees `kc * width` f32 at `out` and `kc` elements in each row.
        let out = unsafe { std::slice::from_raw_parts_mut(out, kc * width) };
        for r in 0..width {
            if r >= rows {
                (0..kc).for_each(|p| out[p * width + r] = 0.0);
                continue;
            }
            // SAFETY: as above.
            let row = unsafe { std::slice::from_raw_parts(src.add(r * stride), kc * E::BYTES) };
            for (p, e) in row.chunks_exact(E::BYTES).enumerate() {
                out[p * width + r] = E::scalar(e);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Kernel;
    use crate::cpu::matvec_float::FloatElem;

    /// The AVX-512 microkernel: an 8 x 48 tile in 24 zmm accumulators.
    pub(super) struct Avx512;

    // SAFETY: `gemm` uses this kernel only when AVX-512 F/BW/VL/DQ were detected.
    unsafe impl Kernel for Avx512 {
        const MR: usize = 8;
        const NR: usize = 48;

        unsafe fn tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
            // SAFETY: the trait's contract (CPU support and buffer sizes) is this function's.
            unsafe { tile_avx512(kc, a, b, c, ldc, accumulate) }
        }

        unsafe fn pack<E: FloatElem>(
            src: *const u8,
            stride: usize,
            rows: usize,
            kc: usize,
            width: usize,
            out: *mut f32,
        ) {
            // SAFETY: as above.
            unsafe { pack_avx512::<E>(src, stride, rows, kc, width, out) }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
    unsafe fn tile_avx512(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
        const MR: usize = 8;
        const NR: usize = 48;
        let mut acc = [[_mm512_setzero_ps(); 3]; MR];
        // SAFETY: step `p < kc` reads `a[p * MR..][..MR]` and `b[p * NR..][..NR]`, inside the
        // panels; the tile rows `c + i * ldc` for `i < MR` hold `NR` elements (caller's contract).
        unsafe {
            for p in 0..kc {
                let bp = b.add(p * NR);
                let b0 = _mm512_loadu_ps(bp);
                let b1 = _mm512_loadu_ps(bp.add(16));
                let b2 = _mm512_loadu_ps(bp.add(32));
                let ap = a.add(p * MR);
                for (i, row) in acc.iter_mut().enumerate() {
                    let ai = _mm512_set1_ps(*ap.add(i));
                    row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
                    row[2] = _mm512_fmadd_ps(ai, b2, row[2]);
                }
            }
            for (i, row) in acc.iter().enumerate() {
                let ci = c.add(i * ldc);
                for (j, v) in row.iter().enumerate() {
                    let dst = ci.add(16 * j);
                    let v = if accumulate { _mm512_add_ps(_mm512_loadu_ps(dst), *v) } else { *v };
                    _mm512_storeu_ps(dst, v);
                }
            }
        }
    }

    /// Transposes the 16 x 16 block `r` (row `i` in `r[i]`) in place.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose16(r: &mut [__m512; 16]) {
        // Step 1: interleave pairs of rows within 128-bit lanes.
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // Step 2: interleave pairs of pairs; afterwards lane `l` of `u[4 * i + c]` holds column
        // `4 * l + c` of rows `4 * i..4 * i + 4`.
        let mut u = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            let (t0, t1, t2, t3) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
            u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
            u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
            u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
            u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
        }
        // Step 3: a 4 x 4 transpose of 128-bit lanes for each `c`.
        for c in 0..4 {
            let (v0, v1, v2, v3) = (u[c], u[4 + c], u[8 + c], u[12 + c]);
            let s0 = _mm512_shuffle_f32x4::<0x44>(v0, v1);
            let s1 = _mm512_shuffle_f32x4::<0xEE>(v0, v1);
            let s2 = _mm512_shuffle_f32x4::<0x44>(v2, v3);
            let s3 = _mm512_shuffle_f32x4::<0xEE>(v2, v3);
            r[c] = _mm512_shuffle_f32x4::<0x88>(s0, s2);
            r[4 + c] = _mm512_shuffle_f32x4::<0xDD>(s0, s2);
            r[8 + c] = _mm512_shuffle_f32x4::<0x88>(s1, s3);
            r[12 + c] = _mm512_shuffle_f32x4::<0xDD>(s1, s3);
        }
    }

    /// [`Kernel::pack`] with AVX-512: blocks of 16 rows by 16 elements are loaded (widened to
    /// f32), transposed in registers and stored as 16 steps of up to 16 lanes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
    unsafe fn pack_avx512<E: FloatElem>(
        src: *const u8,
        stride: usize,
        rows: usize,
        kc: usize,
        width: usize,
        out: *mut f32,
    ) {
        let mut v = [_mm512_setzero_ps(); 16];
        for r0 in (0..width).step_by(16) {
            let valid = rows.saturating_sub(r0).min(16);
            let lanes = (width - r0).min(16);
            let lane_mask = ((1u32 << lanes) - 1) as u16;
            for p0 in (0..kc).step_by(16) {
                let cols = (kc - p0).min(16);
                let mask = ((1u32 << cols) - 1) as u16;
                for (r, vr) in v.iter_mut().enumerate() {
                    *vr = if r >= valid {
                        _mm512_setzero_ps()
                    } else {
                        // SAFETY: row `r0 + r < rows` has `kc` elements, of which this reads
                        // `p0..p0 + cols` (all 16, or the masked `cols` at the end).
                        unsafe {
                            let p = src.add((r0 + r) * stride + p0 * E::BYTES);
                            if cols == 16 { E::load16(p) } else { E::load16_masked(p, mask) }
                        }
                    };
                }
                transpose16(&mut v);
                if cols == 16 && lanes == 16 {
                    for (q, vq) in v.iter().enumerate() {
                        // SAFETY: step `p0 + q < kc`, lanes `r0..r0 + 16 <= width`: inside `out`.
                        unsafe { _mm512_storeu_ps(out.add((p0 + q) * width + r0), *vq) };
                    }
                } else {
                    for (q, vq) in v.iter().enumerate().take(cols) {
                        // SAFETY: step `p0 + q < kc`; the mask stores only lanes
                        // `r0..r0 + lanes <= width`: inside `out`.
                        unsafe { _mm512_mask_storeu_ps(out.add((p0 + q) * width + r0), lane_mask, *vq) };
                    }
                }
            }
        }
    }

    /// The AVX2 microkernel: a 6 x 16 tile in 12 ymm accumulators.
    pub(super) struct Avx2;

    // SAFETY: `gemm` uses this kernel only when AVX2, FMA and F16C were detected.
    unsafe impl Kernel for Avx2 {
        const MR: usize = 6;
        const NR: usize = 16;

        unsafe fn tile(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
            // SAFETY: the trait's contract (CPU support and buffer sizes) is this function's.
            unsafe { tile_avx2(kc, a, b, c, ldc, accumulate) }
        }

        unsafe fn pack<E: FloatElem>(
            src: *const u8,
            stride: usize,
            rows: usize,
            kc: usize,
            width: usize,
            out: *mut f32,
        ) {
            // SAFETY: as above.
            unsafe { pack_avx2::<E>(src, stride, rows, kc, width, out) }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_avx2(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool) {
        const MR: usize = 6;
        const NR: usize = 16;
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        // SAFETY: step `p < kc` reads `a[p * MR..][..MR]` and `b[p * NR..][..NR]`, inside the
        // panels; the tile rows `c + i * ldc` for `i < MR` hold `NR` elements (caller's contract).
        unsafe {
            for p in 0..kc {
                let bp = b.add(p * NR);
                let b0 = _mm256_loadu_ps(bp);
                let b1 = _mm256_loadu_ps(bp.add(8));
                let ap = a.add(p * MR);
                for (i, row) in acc.iter_mut().enumerate() {
                    let ai = _mm256_set1_ps(*ap.add(i));
                    row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
                    row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
                }
            }
            for (i, row) in acc.iter().enumerate() {
                let ci = c.add(i * ldc);
                for (j, v) in row.iter().enumerate() {
                    let dst = ci.add(8 * j);
                    let v = if accumulate { _mm256_add_ps(_mm256_loadu_ps(dst), *v) } else { *v };
                    _mm256_storeu_ps(dst, v);
                }
            }
        }
    }

    /// Transposes the 8 x 8 block `r` (row `i` in `r[i]`) in place.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn transpose8(r: &mut [__m256; 8]) {
        let mut t = [_mm256_setzero_ps(); 8];
        for i in 0..4 {
            t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // Afterwards lane `l` of `u[4 * i + c]` holds column `4 * l + c` of rows `4 * i..4 * i + 4`.
        let mut u = [_mm256_setzero_ps(); 8];
        for i in 0..2 {
            u[4 * i] = _mm256_shuffle_ps::<0x44>(t[4 * i], t[4 * i + 2]);
            u[4 * i + 1] = _mm256_shuffle_ps::<0xEE>(t[4 * i], t[4 * i + 2]);
            u[4 * i + 2] = _mm256_shuffle_ps::<0x44>(t[4 * i + 1], t[4 * i + 3]);
            u[4 * i + 3] = _mm256_shuffle_ps::<0xEE>(t[4 * i + 1], t[4 * i + 3]);
        }
        for c in 0..4 {
            r[c] = _mm256_permute2f128_ps::<0x20>(u[c], u[4 + c]);
            r[4 + c] = _mm256_permute2f128_ps::<0x31>(u[c], u[4 + c]);
        }
    }

    /// [`Kernel::pack`] with AVX2: blocks of 8 rows by 8 elements are loaded (widened to f32),
    /// transposed in registers and stored as 8 steps of up to 8 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pack_avx2<E: FloatElem>(
        src: *const u8,
        stride: usize,
        rows: usize,
        kc: usize,
        width: usize,
        out: *mut f32,
    ) {
        let mut v = [_mm256_setzero_ps(); 8];
        for r0 in (0..width).step_by(8) {
            let valid = rows.saturating_sub(r0).min(8);
            let lanes = (width - r0).min(8);
            // Lane `l` is stored when the sign bit of its mask element is set.
            let lane_mask =
                _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            for p0 in (0..kc).step_by(8) {
                let cols = (kc - p0).min(8);
                for (r, vr) in v.iter_mut().enumerate() {
                    *vr = if r >= valid {
                        _mm256_setzero_ps()
                    } else {
                        // SAFETY: row `r0 + r < rows` has `kc` elements, of which this reads
                        // `p0..p0 + cols`.
                        unsafe {
                            let p = src.add((r0 + r) * stride + p0 * E::BYTES);
                            if cols == 8 {
                                E::load8(p)
                            } else {
                                let mut lanes = [0f32; 8];
                                let bytes = std::slice::from_raw_parts(p, cols * E::BYTES);
                                for (l, e) in lanes.iter_mut().zip(bytes.chunks_exact(E::BYTES)) {
                                    *l = E::scalar(e);
                                }
                                _mm256_loadu_ps(lanes.as_ptr())
                            }
                        }
                    };
                }
                transpose8(&mut v);
                if cols == 8 && lanes == 8 {
                    for (q, vq) in v.iter().enumerate() {
                        // SAFETY: step `p0 + q < kc`, lanes `r0..r0 + 8 <= width`: inside `out`.
                        unsafe { _mm256_storeu_ps(out.add((p0 + q) * width + r0), *vq) };
                    }
                } else {
                    for (q, vq) in v.iter().enumerate().take(cols) {
                        // SAFETY: step `p0 + q < kc`; the mask stores only lanes
                        // `r0..r0 + lanes <= width`: inside `out`.
                        unsafe { _mm256_maskstore_ps(out.add((p0 + q) * width + r0), lane_mask, *vq) };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    use super::*;

    const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Compares every SIMD level with the reference on `x [m, k]` times a random `[n, k]` weight
    /// of `dtype`. Tolerance: the two sum `k` products in different orders, so each result may
    /// differ by a few ulps of `sum |x w|` times about `sqrt(k)`.
    fn check(dtype: DType, m: usize, n: usize, k: usize, seed: u64) {
        let x = random(m * k, seed);
        let w = Tensor::from_f32_as(&random(n * k, seed ^ 0x5eed), [n, k], dtype).unwrap();
        let wf = w.to_f32_vec().unwrap();
        let mut want = vec![0f32; m * n];
        crate::cpu::reference::matmul(&x, &w, &mut want).unwrap();
        for isa in Isa::available() {
            let mut got = vec![f32::NAN; m * n];
            matmul_dequantized_with(isa, &x, &w, &mut got).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let mag: f32 = (0..k).map(|p| (x[i * k + p] * wf[j * k + p]).abs()).sum();
                    let tol = 1e-5 + mag * 4.0 * f32::EPSILON * (k as f32).sqrt();
                    let (g, r) = (got[i * n + j], want[i * n + j]);
                    assert!(
                        (g - r).abs() <= tol,
                        "{dtype} {isa:?} m={m} n={n} k={k}: y[{i}, {j}] = {g}, reference {r}, tol {tol}"
                    );
                }
            }
        }
    }

    #[test]
    fn known_values() {
        // x = [[1, 2], [3, 4], [-1, 0.5]], W = [[1, 0], [0, 1], [1, -1], [2, 2]].
        let x = [1.0f32, 2.0, 3.0, 4.0, -1.0, 0.5];
        let w = [1.0f32, 0.0, 0.0, 1.0, 1.0, -1.0, 2.0, 2.0];
        let want = [1.0f32, 2.0, -1.0, 6.0, 3.0, 4.0, -1.0, 14.0, -1.0, 0.5, -1.5, -1.0];
        for dtype in FLOATS {
            let w = Tensor::from_f32_as(&w, [4, 2], dtype).unwrap();
            for isa in Isa::available() {
                let mut y = [f32::NAN; 12];
                matmul_with(isa, &x, &w, &mut y).unwrap();
                assert_eq!(y, want, "{dtype} {isa:?}");
            }
        }
    }

    #[test]
    fn rejects_bad_lengths() {
        let w = Tensor::from_f32(&[0.0; 6], [2, 3]).unwrap();
        let mut y = [0f32; 4];
        assert!(matches!(matmul(&[0.0; 5], &w, &mut y), Err(Error::InvalidArgument { .. })));
        matmul(&[0.0; 6], &w, &mut y).unwrap();
        assert!(matches!(matmul(&[0.0; 9], &w, &mut y), Err(Error::LengthMismatch { what: "y", expected: 6, .. })));
        let w3 = Tensor::from_f32(&[0.0; 8], [2, 2, 2]).unwrap();
        assert!(matches!(matmul(&[0.0; 2], &w3, &mut y), Err(Error::InvalidArgument { .. })));
        let empty = Tensor::from_f32(&[], [3, 0]).unwrap();
        assert!(matches!(matmul(&[], &empty, &mut []), Err(Error::InvalidArgument { .. })));
        // The reference validates the same way.
        assert!(matches!(
            crate::cpu::reference::matmul(&[0.0; 9], &w, &mut y),
            Err(Error::LengthMismatch { what: "y", .. })
        ));
    }

    #[test]
    fn empty_dimensions() {
        let w = Tensor::from_f32(&[1.0; 6], [2, 3]).unwrap();
        matmul(&[], &w, &mut []).unwrap();
        let w0 = Tensor::from_f32(&[], [0, 3]).unwrap();
        matmul(&[1.0; 6], &w0, &mut []).unwrap();
    }

    #[test]
    fn large_threaded_and_blocked() {
        // More than one slice of k (KC), more than one block of m (MB_PANELS panels of 8), edges
        // in both m and n, and enough work to be split into rayon tasks.
        check(DType::F32, 8 * MB_PANELS + 5, 37, 300, 1);
        check(DType::F16, 19, 200, 2 * KC + 3, 2);
        check(DType::BF16, 3, 500, KC + 1, 3);
    }

    /// Block-quantized weights go through `quant::dequantize_row` while packing in
    /// [`matmul_dequantized`]: same answers as the reference (which dequantizes the same way),
    /// over several slices of `k`.
    #[test]
    fn block_dtypes_match_reference() {
        for dtype in DType::ALL.into_iter().filter(|d| d.is_quantized()) {
            let k = 2 * KC.max(dtype.block_len());
            let probe = Tensor::from_f32_as(&random(k, 9), [1, k], dtype);
            let supported = probe.as_ref().is_ok_and(|t| t.to_f32_vec().is_ok());
            if supported {
                for (m, n) in [(1, 3), (5, 17), (13, 50)] {
                    check(dtype, m, n, k, 10);
                }
            } else {
                // Until the quantizer handles this dtype, the product must report it rather than
                // return garbage; the same bytes as zeros exercise the dequantizing path.
                let w = Tensor::zeros([3, k], dtype).unwrap();
                let mut y = [0f32; 6];
                assert!(matches!(matmul(&random(2 * k, 4), &w, &mut y), Err(Error::UnsupportedDType { .. })));
            }
        }
    }

    /// `matmul` sends block-quantized weights to the quantized product with VNNI or below
    /// `GEMM_MIN_M` rows, and to the dequantizing GEMM otherwise: bit for bit the results of the
    /// path it picks.
    #[test]
    fn quantized_weights_take_the_path_for_their_isa_and_rows() {
        let k = 256;
        for dtype in [DType::Q8_0, DType::Q4K] {
            let w = Tensor::from_f32_as(&random(40 * k, 5), [40, k], dtype).unwrap();
            for m in [1, GEMM_MIN_M - 1, GEMM_MIN_M, 33] {
                let x = random(m * k, 6);
                for isa in Isa::available() {
                    let (mut got, mut want) = (vec![f32::NAN; m * 40], vec![f32::NAN; m * 40]);
                    matmul_with(isa, &x, &w, &mut got).unwrap();
                    if isa == Isa::Avx512Vnni || m < GEMM_MIN_M {
                        matmul_quantized_with(isa, &x, &w, &mut want).unwrap();
                    } else {
                        matmul_dequantized_with(isa, &x, &w, &mut want).unwrap();
                    }
                    let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{dtype} {isa:?} m={m}");
                }
            }
        }
    }

    /// Packs with kernel `K`'s packer; `src` holds rows of `stride` bytes.
    fn pack_with<K: Kernel, E: FloatElem>(src: &[u8], stride: usize, rows: usize, kc: usize, width: usize) -> Vec<f32> {
        assert!(rows <= width && (rows == 0 || src.len() >= (rows - 1) * stride + kc * E::BYTES));
        let mut out = vec![f32::NAN; kc * width];
        // SAFETY: `rows` rows of `kc` elements are readable (asserted), `out` holds `kc * width`
        // f32, and the caller runs `K` only on an ISA this CPU has.
        unsafe { K::pack::<E>(src.as_ptr(), stride, rows, kc, width, out.as_mut_ptr()) };
        out
    }

    fn check_pack<E: FloatElem>(dtype: DType, rows: usize, kc: usize, seed: u64) {
        // Rows of `kc + 3` elements, starting one element past an aligned boundary.
        let cols = kc + 3;
        let t = Tensor::from_f32_as(&random(64 * cols, seed), [64, cols], dtype).unwrap();
        let src = &t.cpu_bytes().unwrap()[E::BYTES..];
        let stride = cols * E::BYTES;
        for isa in Isa::available() {
            for width in [4, 6, 8, 16, 48] {
                let rows = rows.min(width);
                let want = pack_with::<Portable, E>(src, stride, rows, kc, width);
                let got = match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 | Isa::Avx512Vnni => pack_with::<x86::Avx512, E>(src, stride, rows, kc, width),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => pack_with::<x86::Avx2, E>(src, stride, rows, kc, width),
                    _ => pack_with::<Portable, E>(src, stride, rows, kc, width),
                };
                let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{dtype} {isa:?} rows={rows} kc={kc} width={width}");
            }
        }
        // The portable packer itself: element `p` of row `r` lands at `p * width + r`.
        let all = t.to_f32_vec().unwrap();
        let packed = pack_with::<Portable, E>(src, stride, rows.min(6), kc, 6);
        for p in 0..kc {
            for r in 0..6 {
                let want = if r < rows.min(6) { all[r * cols + p + 1] } else { 0.0 };
                assert_eq!(packed[p * 6 + r], want);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]

        /// Every packer equals the portable one bit for bit (widening to f32 is exact).
        #[test]
        fn packers_agree(rows in 0usize..50, kc in 1usize..70, seed in any::<u64>()) {
            check_pack::<F32>(DType::F32, rows, kc, seed);
            check_pack::<F16>(DType::F16, rows, kc, seed);
            check_pack::<Bf16>(DType::BF16, rows, kc, seed);
        }

        #[test]
        fn matches_reference(
            dtype in prop::sample::select(FLOATS.to_vec()),
            m in 1usize..20,
            n in 1usize..100,
            k in prop_oneof![1usize..40, 250usize..600],
            seed in any::<u64>(),
        ) {
            check(dtype, m, n, k, seed);
        }
    }
}
