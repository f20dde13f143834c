//! Element-wise kernels: SwiGLU (of two products, or of one of paired rows), residual add, bias
//! add, column and row copies (the Mixture-of-Experts dispatch) and the weighted sum of a token's
//! experts' outputs, and f32 → f16/bf16 casts (`kernels/elementwise.cu`).

use cudarc::driver::{CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig};

use crate::cuda::params::{
    AddBiasParams, CopyColsParams, ElementwiseParams, MoeCombineParams, RowsParams, STRATA_MOE_COMBINE_MAX_SLOTS,
};
use crate::cuda::{Cuda, check_len, ptr, ptr_mut};
use crate::{Error, Result};

/// Threads per block of the flat kernels.
const BLOCK: u32 = 256;

/// The launch of a flat kernel over `n` elements: a thread per four elements, at most 65535
/// blocks (the kernels stride over the rest).
fn flat_launch(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(4).div_ceil(BLOCK as usize).clamp(1, 65535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Checks that operand `what` has exactly the `n` elements of the first operand.
fn check_same(op: &str, what: &str, have: usize, n: usize) -> Result<()> {
    if have != n {
        return Err(Error::invalid(op, format!("{what} holds {have} elements, the other operands {n}")));
    }
    Ok(())
}

/// SwiGLU: `out = silu(gate) * up = gate / (1 + exp(-gate)) * up`, all three the same length.
/// The CUDA twin of `strata_tensor::cpu::reference::swiglu` (it differs by the device `expf`'s
/// last-bit error only).
pub fn swiglu<G, U, O>(cuda: &Cuda, gate: &G, up: &U, out: &mut O) -> Result<()>
where
    G: DevicePtr<f32>,
    U: DevicePtr<f32>,
    O: DevicePtrMut<f32>,
{
    let n = gate.len();
    check_same("swiglu", "up", up.len(), n)?;
    check_same("swiglu", "out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let p = ElementwiseParams { n: n as u64 };
    let ptrs = [ptr(cuda, gate), ptr(cuda, up), ptr_mut(cuda, out)];
    // SAFETY: gate, up and out each hold n floats (checked above); the kernel touches indices
    // below n only.
    unsafe { cuda.launch("elementwise", "swiglu_f32", flat_launch(n), &p, &ptrs) }
}

/// SwiGLU of a product of paired rows ([`matvec_swiglu`](super::matvec_swiglu)'s weight layout:
/// per group of four rows, gate rows 2j and 2j + 1, then up rows 2j and 2j + 1): `y` holds
/// `tokens` rows of `2 width` products, `out` receives the same tokens' `width` outputs,
/// `out[t, i] = silu(gate_i) * up_i` with [`swiglu`]'s arithmetic. `width` must be even (it is the
/// intermediate size; the pairs never straddle two tokens). Longer buffers are fine.
pub fn swiglu_pairs<Y, O>(cuda: &Cuda, y: &Y, out: &mut O, tokens: usize, width: usize) -> Result<()>
where
    Y: DevicePtr<f32>,
    O: DevicePtrMut<f32>,
{
    const OP: &str = "swiglu_pairs";
    if !width.is_multiple_of(2) {
        return Err(Error::invalid(OP, format!("the width {width} is odd: its outputs do not come in pairs")));
    }
    let n = tokens
        .checked_mul(width)
        .filter(|n| n.checked_mul(2).is_some())
        .ok_or_else(|| Error::invalid(OP, format!("{tokens} x {width} outputs overflow")))?;
    check_len(OP, "y", y.len(), 2 * n)?;
    check_len(OP, "out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let p = ElementwiseParams { n: n as u64 };
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 65535) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    let ptrs = [ptr(cuda, y), ptr_mut(cuda, out)];
    // SAFETY: out holds at least n floats and y 2n (checked above); output i < n reads y at
    // 2i - i % 2 and two after it, at most 2n - 1.
    unsafe { cuda.launch("elementwise", "swiglu_pairs_f32", cfg, &p, &ptrs) }
}

/// Columns `col0 .. col0 + cols` of the `rows` rows of `src` (row-major, `src_cols` columns),
/// packed into `dst` (`rows` x `cols`): a fused projection's outputs taken apart. Longer buffers
/// are fine.
pub fn copy_cols<S, D>(
    cuda: &Cuda,
    src: &S,
    dst: &mut D,
    rows: usize,
    src_cols: usize,
    col0: usize,
    cols: usize,
) -> Result<()>
where
    S: DevicePtr<f32>,
    D: DevicePtrMut<f32>,
{
    const OP: &str = "copy_cols";
    if col0.checked_add(cols).is_none_or(|end| end > src_cols) {
        return Err(Error::invalid(OP, format!("columns {col0} + {cols} of rows of {src_cols}")));
    }
    let big = |v: usize| v > u32::MAX as usize;
    if big(rows) || big(src_cols) {
        return Err(Error::invalid(OP, format!("{rows} rows of {src_cols}: at most 2^32 - 1 of each")));
    }
    check_len(OP, "src", src.len(), rows * src_cols)?;
    check_len(OP, "dst", dst.len(), rows * cols)?;
    let n = rows * cols;
    if n == 0 {
        return Ok(());
    }
    let p = CopyColsParams { rows: rows as u32, src_cols: src_cols as u32, col0: col0 as u32, cols: cols as u32 };
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 65535) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    let ptrs = [ptr(cuda, src), ptr_mut(cuda, dst)];
    // SAFETY: src holds rows * src_cols floats and dst rows * cols (checked above); the kernel
    // reads src[r * src_cols + col0 + c] with col0 + c < src_cols and writes dst below rows * cols.
    unsafe { cuda.launch("elementwise", "copy_cols_f32", cfg, &p, &ptrs) }
}

/// The launch of a row-wise kernel over `rows` x `cols` elements, checked to fit its 32-bit
/// parameters.
fn rows_launch(op: &str, rows: usize, cols: usize) -> Result<(RowsParams, LaunchConfig)> {
    if rows > u32::MAX as usize || cols > u32::MAX as usize || rows.checked_mul(cols).is_none() {
        return Err(Error::invalid(op, format!("{rows} rows of {cols}: at most 2^32 - 1 of each")));
    }
    let blocks = (rows * cols).div_ceil(BLOCK as usize).clamp(1, 65535) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    Ok((RowsParams { rows: rows as u32, cols: cols as u32 }, cfg))
}

/// `dst[i, :] = src[idx[i], :]` for `i < idx.len()`: the rows of the tokens a Mixture-of-Experts
/// expert serves, `src` holding `src_rows` rows of `cols`. Every index must be below `src_rows`:
/// the host's `idx_host` (the indices `idx` holds on the device) is checked.
pub fn gather_rows<S, I, D>(
    cuda: &Cuda,
    src: &S,
    src_rows: usize,
    idx: &I,
    idx_host: &[u32],
    dst: &mut D,
    cols: usize,
) -> Result<()>
where
    S: DevicePtr<f32>,
    I: DevicePtr<u32>,
    D: DevicePtrMut<f32>,
{
    const OP: &str = "gather_rows";
    let rows = idx_host.len();
    check_indices(OP, idx.len(), idx_host, src_rows, false)?;
    check_len(OP, "src", src.len(), src_rows * cols)?;
    check_len(OP, "dst", dst.len(), rows * cols)?;
    if rows * cols == 0 {
        return Ok(());
    }
    let (p, cfg) = rows_launch(OP, rows, cols)?;
    let ptrs = [ptr(cuda, src), ptr(cuda, idx), ptr_mut(cuda, dst)];
    // SAFETY: every index is below src_rows (checked on the host copy), src holds src_rows * cols
    // floats and dst rows * cols; the kernel reads idx below rows.
    unsafe { cuda.launch("elementwise", "gather_rows_f32", cfg, &p, &ptrs) }
}

/// `out[idx[i], :] += y[i, :] * w[i]` for `i < idx.len()` (the product rounded, then the sum, as
/// the CPU's Mixture-of-Experts layer adds an expert's weighted outputs): `out` holds `out_rows`
/// rows of `cols`. The indices (`idx_host`, what `idx` holds on the device) must be below
/// `out_rows` and distinct: checked.
#[allow(clippy::too_many_arguments)]
pub fn scatter_add_rows<Y, I, W, O>(
    cuda: &Cuda,
    y: &Y,
    idx: &I,
    idx_host: &[u32],
    w: &W,
    out: &mut O,
    out_rows: usize,
    cols: usize,
) -> Result<()>
where
    Y: DevicePtr<f32>,
    I: DevicePtr<u32>,
    W: DevicePtr<f32>,
    O: DevicePtrMut<f32>,
{
    const OP: &str = "scatter_add_rows";
    let rows = idx_host.len();
    check_indices(OP, idx.len(), idx_host, out_rows, true)?;
    check_len(OP, "y", y.len(), rows * cols)?;
    check_len(OP, "w", w.len(), rows)?;
    check_len(OP, "out", out.len(), out_rows * cols)?;
    if rows * cols == 0 {
        return Ok(());
    }
    let (p, cfg) = rows_launch(OP, rows, cols)?;
    let ptrs = [ptr(cuda, y), ptr(cuda, idx), ptr(cuda, w), ptr_mut(cuda, out)];
    // SAFETY: the indices are below out_rows and distinct (checked on the host copy), so every
    // element written is in out and written by one thread; y holds rows * cols floats, w rows.
    unsafe { cuda.launch("elementwise", "scatter_add_rows_f32", cfg, &p, &ptrs) }
}

/// `out[r, :] += y[r, :] / (1 + exp(-g[r]))` for `r < rows` (a shared expert's output, scaled by
/// the sigmoid of its gate, as the CPU's Mixture-of-Experts layer adds it).
pub fn add_sigmoid_scaled<Y, G, O>(cuda: &Cuda, y: &Y, g: &G, out: &mut O, rows: usize, cols: usize) -> Result<()>
where
    Y: DevicePtr<f32>,
    G: DevicePtr<f32>,
    O: DevicePtrMut<f32>,
{
    const OP: &str = "add_sigmoid_scaled";
    let n = rows.checked_mul(cols).ok_or_else(|| Error::invalid(OP, "rows x cols overflows"))?;
    check_len(OP, "y", y.len(), n)?;
    check_len(OP, "g", g.len(), rows)?;
    check_len(OP, "out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let (p, cfg) = rows_launch(OP, rows, cols)?;
    let ptrs = [ptr(cuda, y), ptr(cuda, g), ptr_mut(cuda, out)];
    // SAFETY: y and out hold rows * cols floats and g rows (checked above).
    unsafe { cuda.launch("elementwise", "add_sigmoid_scaled_f32", cfg, &p, &ptrs) }
}

/// The output of a Mixture-of-Experts block from its experts' on the device: for each of `tokens`
/// tokens, `slots` slots, slot `s` of token `t` holding expert `ids[t, s]`, its routing weight
/// `w[t, s]` and its outputs `ys[t, s, :]` (`cols` floats; [`matvec_experts`](super::matvec_experts)
/// writes them). The token's output is the sum of `ys[t, s, :] * w[t, s]` over its slots whose id
/// is below `experts`, added in ascending order of expert index from zero (each product rounded,
/// then the sum): bit for bit what zeroing `out` and [`scatter_add_rows`] expert by expert give.
/// With a shared expert (`shared`: its outputs `[tokens, cols]` and its gate's logit per token),
/// `y * sigmoid(gate)` is added next, as [`add_sigmoid_scaled`] adds it. With `residual` the
/// sum is added to `out` (as [`add`] adds), else written to it.
///
/// `ids` and `w` are top-k gating's outputs, read on the device. A token with no used slot (what
/// gating gives a token whose router probabilities are NaN, an error on the host path) gets NaN
/// outputs: the device cannot raise the error without a synchronisation, and the NaN reaches the
/// logits.
#[allow(clippy::too_many_arguments)]
pub fn moe_combine<Y, I, W, O>(
    cuda: &Cuda,
    ys: &Y,
    ids: &I,
    w: &W,
    shared: Option<(&CudaView<'_, f32>, &CudaView<'_, f32>)>,
    out: &mut O,
    tokens: usize,
    slots: usize,
    experts: usize,
    cols: usize,
    residual: bool,
) -> Result<()>
where
    Y: DevicePtr<f32>,
    I: DevicePtr<u32>,
    W: DevicePtr<f32>,
    O: DevicePtrMut<f32>,
{
    const OP: &str = "moe_combine";
    if let Some((y, gate)) = shared {
        check_len(OP, "the shared expert's outputs", y.len(), tokens * cols)?;
        check_len(OP, "the shared expert's gate", gate.len(), tokens)?;
    }
    if slots == 0 || slots > STRATA_MOE_COMBINE_MAX_SLOTS as usize {
        return Err(Error::invalid(
            OP,
            format!("{slots} slots per token; 1 to {STRATA_MOE_COMBINE_MAX_SLOTS} supported"),
        ));
    }
    let n = tokens.checked_mul(cols).ok_or_else(|| Error::invalid(OP, "tokens x cols overflows"))?;
    check_len(OP, "ids", ids.len(), tokens * slots)?;
    check_len(OP, "w", w.len(), tokens * slots)?;
    check_len(OP, "ys", ys.len(), n * slots)?;
    check_len(OP, "out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    if tokens > 65535 || u32::try_from(cols).is_err() {
        return Err(Error::invalid(
            OP,
            format!("{tokens} tokens of {cols}: at most 65535 tokens (the grid's y) of 2^32 - 1"),
        ));
    }
    let (tokens32, cols32) = (tokens as u32, cols as u32);
    let p = MoeCombineParams {
        tokens: tokens32,
        cols: cols32,
        slots: slots as u32,
        experts: experts.min(u32::MAX as usize) as u32,
        residual: u32::from(residual),
    };
    let cfg = LaunchConfig {
        grid_dim: (cols.div_ceil(BLOCK as usize) as u32, tokens32, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let (shared_y, shared_gate) = shared.map_or((0, 0), |(y, g)| (ptr(cuda, y), ptr(cuda, g)));
    let ptrs = [ptr(cuda, ys), ptr(cuda, ids), ptr(cuda, w), shared_y, shared_gate, ptr_mut(cuda, out)];
    // SAFETY: ids and w hold tokens * slots elements, ys tokens * slots * cols floats, out (and
    // a shared expert's outputs) tokens * cols, its gate tokens (checked above); the kernel reads
    // ys only at used slots' rows and writes each element of out from one thread.
    unsafe { cuda.launch("elementwise", "moe_combine_f32", cfg, &p, &ptrs) }
}

/// Checks a row-index list: the device copy holds at least its `len` entries, each below `rows`,
/// and with `distinct`, no index twice.
fn check_indices(op: &str, device_len: usize, idx: &[u32], rows: usize, distinct: bool) -> Result<()> {
    check_len(op, "idx", device_len, idx.len())?;
    if let Some(bad) = idx.iter().find(|&&i| i as usize >= rows) {
        return Err(Error::invalid(op, format!("row index {bad} out of {rows} rows")));
    }
    if distinct {
        let mut seen = vec![false; rows];
        for &i in idx {
            if std::mem::replace(&mut seen[i as usize], true) {
                return Err(Error::invalid(op, format!("row index {i} given twice")));
            }
        }
    }
    Ok(())
}

/// Residual add in place: `acc += x`, both the same length. The CUDA twin of
/// `strata_tensor::cpu::reference::add` (bit for bit).
pub fn add<A, X>(cuda: &Cuda, acc: &mut A, x: &X) -> Result<()>
where
    A: DevicePtrMut<f32>,
    X: DevicePtr<f32>,
{
    let n = acc.len();
    check_same("add", "x", x.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let p = ElementwiseParams { n: n as u64 };
    let ptrs = [ptr_mut(cuda, acc), ptr(cuda, x)];
    // SAFETY: acc and x each hold n floats (checked above); the kernel touches indices below n.
    unsafe { cuda.launch("elementwise", "add_f32", flat_launch(n), &p, &ptrs) }
}

/// Bias add in place: `y[r, c] += bias[c]` for the first `rows` rows of `bias.len()` elements of
/// `y` (which may be longer).
pub fn add_bias<Y, B>(cuda: &Cuda, y: &mut Y, bias: &B, rows: usize) -> Result<()>
where
    Y: DevicePtrMut<f32>,
    B: DevicePtr<f32>,
{
    let cols = bias.len();
    let need = rows.checked_mul(cols).ok_or_else(|| Error::invalid("add_bias", "rows x cols overflows"))?;
    check_len("add_bias", "y", y.len(), need)?;
    if need == 0 {
        return Ok(());
    }
    if rows > u32::MAX as usize || cols > u32::MAX as usize {
        return Err(Error::invalid("add_bias", format!("{rows} rows of {cols}: at most 2^32 - 1 of each")));
    }
    let p = AddBiasParams { rows: rows as u32, cols: cols as u32 };
    // Columns across x, rows across y: about 64K blocks in all, each walking its rows.
    let blocks_x = cols.div_ceil(BLOCK as usize);
    let blocks_y = rows.min((65536 / blocks_x).max(1)).min(65535);
    let cfg =
        LaunchConfig { grid_dim: (blocks_x as u32, blocks_y as u32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    let ptrs = [ptr_mut(cuda, y), ptr(cuda, bias)];
    // SAFETY: y holds rows * cols floats and bias cols (checked above); the kernel touches
    // y[r * cols + c] for r < rows, c < cols only.
    unsafe { cuda.launch("elementwise", "add_bias_f32", cfg, &p, &ptrs) }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// The 16-bit floats [`cast_f32_to`] writes: f16 and bf16. Sealed.
pub trait HalfElem: DeviceRepr + sealed::Sealed {
    /// The kernel of `kernels/elementwise.cu` that casts f32 to this type.
    #[doc(hidden)]
    const CAST_KERNEL: &'static str;
}

impl HalfElem for half::f16 {
    const CAST_KERNEL: &'static str = "cast_f32_f16";
}

impl HalfElem for half::bf16 {
    const CAST_KERNEL: &'static str = "cast_f32_bf16";
}

/// `out = x` rounded to nearest even as f16 or bf16 (the bits `half::f16::from_f32` /
/// `half::bf16::from_f32` give, NaNs aside: the device writes its canonical NaN), both the same
/// length. Feeds cuBLAS's 16-bit GEMMs.
pub fn cast_f32_to<T, X, O>(cuda: &Cuda, x: &X, out: &mut O) -> Result<()>
where
    T: HalfElem,
    X: DevicePtr<f32>,
    O: DevicePtrMut<T>,
{
    let n = x.len();
    check_same("cast_f32_to", "out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let p = ElementwiseParams { n: n as u64 };
    let ptrs = [ptr(cuda, x), ptr_mut(cuda, out)];
    // SAFETY: x holds n floats and out n elements of T (checked above); the kernel touches
    // indices below n only.
    unsafe { cuda.launch("elementwise", T::CAST_KERNEL, flat_launch(n), &p, &ptrs) }
}
