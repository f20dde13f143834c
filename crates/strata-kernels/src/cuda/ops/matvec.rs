//! Dequantizing matrix-vector products (`kernels/matvec.cu`): `y[t, :] = W x[t, :]` for a device
//! weight of any dtype and a few tokens of f32 activations, reading each weight byte once per
//! [`MATVEC_MAX_TOKENS`] tokens.
//!
//! Block-quantized weights multiply, by default, activations quantized in the kernel to two 8-bit
//! digits per value, exactly as the CPU's decode path quantizes them
//! (`strata_tensor::cpu::reference::matvec`), with integer dot products ([`MatvecActs`]). Above
//! two tokens, or on rows longer than a block's activation tile, one launch quantizes them before
//! the product ([`quantize_acts`]) and the blocks copy them; at one or two tokens on shorter rows
//! each block quantizes them itself, which costs less than a launch.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};
use strata_tensor::{DType, Tensor};

use crate::cuda::params::{
    MatvecParams, STRATA_MATVEC_ACTS_F32, STRATA_MATVEC_ACTS_Q16, STRATA_MATVEC_CHUNK, STRATA_MATVEC_CHUNK_Q8_0,
    STRATA_MATVEC_CHUNK_WIDE, STRATA_MATVEC_MAX_TOKENS, STRATA_MATVEC_ROWS_PER_WARP, STRATA_MATVEC_STAGES,
    STRATA_MATVEC_STAGES_DECODE, STRATA_MATVEC_STAGES_DECODE_Q6_K, STRATA_MATVEC_STORE_ADD, STRATA_MATVEC_STORE_SWIGLU,
    STRATA_MATVEC_STORE_WRITE, STRATA_MATVEC_WARPS, STRATA_MATVEC_WARPS_DECODE, STRATA_MATVEC_WARPS_DECODE_WIDE,
    STRATA_MATVEC_XTILE, STRATA_MATVEC_XTILE_FLOAT, STRATA_MATVEC_XTILE_MIN, STRATA_NORM_MAX_COLS,
};
use crate::cuda::{Cuda, check_len, driver, grid_1d, grown, ptr, ptr_mut};
use crate::{Error, Result};

use super::convert::device_matrix;

/// Tokens one matvec launch computes together (more are done in groups of this many).
pub const MATVEC_MAX_TOKENS: usize = STRATA_MATVEC_MAX_TOKENS as usize;

const ROWS_PER_WARP: usize = STRATA_MATVEC_ROWS_PER_WARP as usize;

/// The kernel names of one dtype for 1, 2, 4 and 8 tokens (with `decode`, for 1 and 2 only,
/// repeated in the places of 4 and 8, which the launcher then never takes).
macro_rules! kernels {
    ($name:literal) => {
        [
            concat!("matvec_", $name, "_t1"),
            concat!("matvec_", $name, "_t2"),
            concat!("matvec_", $name, "_t4"),
            concat!("matvec_", $name, "_t8"),
        ]
    };
    ($name:literal, decode) => {
        [
            concat!("matvec_", $name, "_t1"),
            concat!("matvec_", $name, "_t2"),
            concat!("matvec_", $name, "_t2"),
            concat!("matvec_", $name, "_t2"),
        ]
    };
}

/// How the matvec of a block-quantized weight takes its f32 activations (float weights always
/// multiply them as they are).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MatvecActs {
    /// Quantized in the kernel to two 8-bit digits per value with a unit per block of 32, bit for
    /// bit as the CPU's decode path does (`strata_tensor`'s two-digit activations, the CPU's
    /// default), and multiplied with the weights' integers by `dp4a`: a value is within
    /// `max|x_b| / 32512` of `x` in its block `b`. About half the instructions per weight of
    /// [`MatvecActs::F32`].
    #[default]
    TwoDigits,
    /// Kept in f32: each weight decoded to a float and multiplied with an FMA. These kernels
    /// exist for one and two tokens (more go in launches of two), with the deep pipelines that
    /// need Hopper's 227 KiB of shared memory per block: for comparison with the integer path.
    F32,
}

impl MatvecActs {
    /// Both, for tests and benchmarks.
    pub const ALL: [MatvecActs; 2] = [MatvecActs::TwoDigits, MatvecActs::F32];

    /// Whether the kernels for `dtype` take the integer path.
    fn integer(self, dtype: DType) -> bool {
        self == MatvecActs::TwoDigits && dtype.is_quantized()
    }

    /// The most tokens one launch of the kernels for `dtype` takes.
    fn max_tokens(self, dtype: DType) -> usize {
        if dtype.is_quantized() && self == MatvecActs::F32 { 2 } else { MATVEC_MAX_TOKENS }
    }
}

/// The kernels for `dtype`: float rows of a multiple of 16 bytes take the vector kernels, other
/// float rows the element-by-element ones; block-quantized weights the integer (`_i16`) or the
/// float kernels as `acts` says.
fn kernel_names(dtype: DType, k: usize, acts: MatvecActs) -> [&'static str; 4] {
    let vector = vector_rows(dtype, k);
    if acts.integer(dtype) {
        return match dtype {
            DType::Q8_0 => kernels!("q8_0_i16"),
            DType::Q4_0 => kernels!("q4_0_i16"),
            DType::Q4_1 => kernels!("q4_1_i16"),
            DType::Q4K => kernels!("q4_k_i16"),
            DType::Q6K => kernels!("q6_k_i16"),
            DType::F32 | DType::F16 | DType::BF16 => unreachable!("float weights take no integer path"),
        };
    }
    match (dtype, vector) {
        (DType::F32, true) => kernels!("f32"),
        (DType::F32, false) => kernels!("f32_scalar"),
        (DType::F16, true) => kernels!("f16"),
        (DType::F16, false) => kernels!("f16_scalar"),
        (DType::BF16, true) => kernels!("bf16"),
        (DType::BF16, false) => kernels!("bf16_scalar"),
        (DType::Q8_0, _) => kernels!("q8_0", decode),
        (DType::Q4_0, _) => kernels!("q4_0", decode),
        (DType::Q4_1, _) => kernels!("q4_1", decode),
        (DType::Q4K, _) => kernels!("q4_k", decode),
        (DType::Q6K, _) => kernels!("q6_k", decode),
    }
}

/// Whether float rows of `k` columns of `dtype` take the vector kernels: rows of a multiple of 16
/// bytes, read with 16-byte loads.
fn vector_rows(dtype: DType, k: usize) -> bool {
    !dtype.is_quantized() && (k * dtype.block_bytes()).is_multiple_of(16)
}

/// Warps per block of the `t`-token kernel for `dtype`: more for the block-quantized decode
/// kernels (1 and 2 tokens), which share one activation tile among them; half as many for the
/// integer ones of q4_k and q6_k, whose chunks are twice as long.
fn warps(dtype: DType, t: usize, acts: MatvecActs) -> usize {
    match (dtype.is_quantized() && t <= 2, dtype) {
        (true, DType::Q4K | DType::Q6K) if acts.integer(dtype) => STRATA_MATVEC_WARPS_DECODE_WIDE as usize,
        (true, _) => STRATA_MATVEC_WARPS_DECODE as usize,
        (false, _) => STRATA_MATVEC_WARPS as usize,
    }
}

/// Columns per pipeline step of the `t`-token kernel for a block-quantized `dtype`
/// (`kernels/matvec.cu`: each format's CHUNK_ELEMS).
fn chunk(dtype: DType, t: usize, acts: MatvecActs) -> usize {
    let columns = match dtype {
        DType::Q8_0 => STRATA_MATVEC_CHUNK_Q8_0,
        DType::Q4K | DType::Q6K if acts.integer(dtype) && t <= 4 => STRATA_MATVEC_CHUNK_WIDE,
        _ => STRATA_MATVEC_CHUNK,
    };
    columns as usize
}

/// The static shared memory of every matvec kernel beside [`shared_bytes`]: the split groups'
/// sums (`kernels/matvec.cu`, S_RED_FLOATS floats). The two together must fit a block.
const STATIC_SHARED_BYTES: usize = 4 * 128;

/// The dynamic shared memory of the `t`-token kernel for `dtype`, laid out as `mv_quant` and
/// `mv_float_*` lay it out: the activation tile ([`tile_bytes`]), and for block-quantized dtypes
/// each warp's pipeline of chunk buffers.
fn shared_bytes(dtype: DType, t: usize, acts: MatvecActs) -> usize {
    let tile = tile_bytes(dtype, t, acts);
    if !dtype.is_quantized() {
        return tile;
    }
    let chunk_bytes = chunk(dtype, t, acts) / dtype.block_len() * dtype.block_bytes();
    let buffer = (chunk_bytes + 32).div_ceil(16) * 16;
    let stages = match (t <= 2, dtype) {
        (true, DType::Q6K) => STRATA_MATVEC_STAGES_DECODE_Q6_K,
        (true, _) => STRATA_MATVEC_STAGES_DECODE,
        (false, _) => STRATA_MATVEC_STAGES,
    } as usize;
    tile + warps(dtype, t, acts) * stages * STRATA_MATVEC_ROWS_PER_WARP as usize * buffer
}

/// The activation tile of the `t`-token kernel for `dtype`. The float tile holds f32 values
/// padded by 4 floats every 32 and every 256 columns (with, for block-quantized dtypes, the sums
/// over each 8 columns); the integer tile (`QTile`) both digit arrays, padded by 16 bytes every
/// 128 columns, a unit and a sum per block of 32 columns, and a sum per 8 columns.
fn tile_bytes(dtype: DType, t: usize, acts: MatvecActs) -> usize {
    let kt = tile_columns(dtype, t);
    let tile = 4 * t * (kt + kt / 8 + kt / 64);
    if !dtype.is_quantized() {
        return tile;
    }
    if acts.integer(dtype) {
        2 * t * (kt + kt / 8) + 8 * t * (kt / 32) + 4 * t * (kt / 8)
    } else {
        tile + 4 * t * (kt / 8)
    }
}

/// Columns per token of the activation tile of the `t`-token kernels for `dtype` (`XTile::KT`,
/// `QTile::KT`): a row up to this long is staged once per block.
fn tile_columns(dtype: DType, t: usize) -> usize {
    let total = if dtype.is_quantized() { STRATA_MATVEC_XTILE } else { STRATA_MATVEC_XTILE_FLOAT };
    (total as usize / t).max(STRATA_MATVEC_XTILE_MIN as usize)
}

/// Bytes of `tokens` tokens of `k` activations quantized to two digits on the device
/// (`kernels/include/actq.cuh`: a record per token of both digit arrays, a unit and a sum per
/// block of 32 and a sum per 8 columns, padded to 16 bytes), as [`quantize_acts`] writes them.
pub fn actq_bytes(tokens: usize, k: usize) -> usize {
    tokens * (k * 11 / 4).div_ceil(16) * 16
}

/// Quantizes `x` (`[tokens, k]` f32, `k` a multiple of 32) to two digits per value into `xq`
/// ([`actq_bytes`] long), bit for bit as the integer matvec kernels quantize it in their blocks:
/// what the matvec launcher does before a product of more than two tokens.
pub fn quantize_acts<X, Q>(cuda: &Cuda, x: &X, xq: &mut Q, tokens: usize, k: usize) -> Result<()>
where
    X: DevicePtr<f32>,
    Q: DevicePtrMut<u8>,
{
    check_len("quantize_acts", "x", x.len(), tokens * k)?;
    check_len("quantize_acts", "xq", xq.len(), actq_bytes(tokens, k))?;
    let (xp, qp) = (ptr(cuda, x), ptr_mut(cuda, xq));
    check_actq_aligned("quantize_acts", qp)?;
    launch_quantize(cuda, xp, qp, tokens, k)
}

/// Refuses two-digit records at `xq` that are not 16-byte aligned: the matvec blocks copy them in
/// 16-byte pieces.
pub(crate) fn check_actq_aligned(op: &str, xq: u64) -> Result<()> {
    if !xq.is_multiple_of(16) {
        return Err(Error::invalid(op, "xq is not 16-byte aligned (the matvec copies it in 16-byte pieces)"));
    }
    Ok(())
}

/// The launch of `matvec_quantize_x`: `tokens` rows of `k` floats at `x` into the records at `xq`
/// (both checked by the caller).
fn launch_quantize(cuda: &Cuda, x: u64, xq: u64, tokens: usize, k: usize) -> Result<()> {
    const OP: &str = "quantize_acts";
    if !k.is_multiple_of(32) {
        return Err(Error::invalid(OP, format!("{k} columns are not whole blocks of 32")));
    }
    if tokens == 0 || k == 0 {
        return Ok(());
    }
    let (Ok(tokens32), Ok(cols)) = (u32::try_from(tokens), u32::try_from(k)) else {
        return Err(Error::invalid(OP, format!("{tokens} x {k} activations do not fit the kernel's 32-bit counts")));
    };
    let p = MatvecParams {
        rows: 0,
        cols,
        row_bytes: 0,
        total_bytes: 0,
        tokens: tokens32,
        store: STRATA_MATVEC_STORE_WRITE,
        acts: STRATA_MATVEC_ACTS_F32,
        experts: 0,
        x_slot: 0,
        y_slot: 0,
        norm_eps: 0.0,
        splits: 1,
    };
    // A warp per block of 32 values, 8 warps per block, grid-stride past 65536 blocks.
    let cfg = grid_1d((tokens * k / 32).div_ceil(8).min(65_536) * 256, 256);
    // SAFETY: the kernel reads tokens * k floats from x and writes actq_bytes(tokens, k) bytes
    // to xq; the caller checked both buffers hold them.
    unsafe { cuda.launch("matvec", "matvec_quantize_x", cfg, &p, &[x, xq]) }
}

/// The warps that share each group of rows of a decode product (`MatvecParams::splits`) with
/// `groups` groups of `chunks` steps each (block-quantized weights: pipeline chunks; float ones:
/// runs of 32 x 4 loads of 16 bytes), on a device that holds `device_warps` warps of the kernel
/// at once in blocks of `block_warps`: the largest power of two that leaves every group's warps
/// on the device together, gives each at least one step and divides a block's warps. A product of
/// few, long rows (a decode step's down projection: 512 groups of 6 chunks against 2112 warps of
/// an H200) otherwise leaves most warps idle, and each busy one walks its rows' chunks one round
/// trip after another.
fn row_splits(groups: usize, chunks: usize, device_warps: usize, block_warps: usize) -> u32 {
    let mut s = 1;
    while 2 * s <= block_warps && block_warps.is_multiple_of(2 * s) && 2 * s <= chunks && groups * 2 * s <= device_warps
    {
        s *= 2;
    }
    s as u32
}

/// Whether decode products split their groups of rows among warps ([`row_splits`]): unless the
/// environment sets `STRATA_MATVEC_SPLITS=0` (read once per process), to compare.
fn splits_on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("STRATA_MATVEC_SPLITS").is_none_or(|v| v != "0"))
}

/// Whether the launcher quantizes the activations of an integer-path product of `tokens` tokens
/// and `k` columns once, before it, rather than in each block: above two tokens, or when a row is
/// longer than the tile of `t`-token kernels (whose blocks would then quantize each tile again
/// for every round of rows). At one or two tokens on shorter rows each block quantizes them once,
/// which is cheaper than a launch.
fn quantize_first(dtype: DType, tokens: usize, k: usize, t: usize) -> bool {
    tokens > 2 || k > tile_columns(dtype, t)
}

/// A per-device (ordinal) cache of facts asked of the driver.
type DeviceCache<K> = OnceLock<Mutex<HashMap<(usize, K), usize>>>;

/// Readies `kernel` (`threads` threads, `smem` bytes of dynamic shared memory) for launches and
/// returns the blocks of it the device holds at once (the grid of the persistent block-quantized
/// kernels), once per `Cuda` instance and kernel: above 48 KiB a kernel must opt in to its
/// dynamic shared memory, and the driver is asked for the occupancy after that. `smem` must be
/// within the device's limit.
///
/// The opt-in belongs to the function handle, and each `Cuda` loads its own module: a cache per
/// device let a second instance launch a kernel that had never opted in, which the driver
/// refused with `CUDA_ERROR_INVALID_VALUE` (seen on an H200: every quantized model test after the
/// first model of a test binary).
fn prepare(cuda: &Cuda, kernel: &'static str, threads: u32, smem: usize) -> Result<usize> {
    if let Some(&blocks) = cuda.prepared.lock().unwrap().get(kernel) {
        return Ok(blocks);
    }
    let f = cuda.function("matvec", kernel)?;
    if smem > 48 * 1024 {
        f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
            .map_err(driver(kernel))?;
    }
    let per_sm = f.occupancy_max_active_blocks_per_multiprocessor(threads, smem, None).map_err(driver(kernel))?;
    let blocks = per_sm.max(1) as usize * cuda.multiprocessors()?;
    cuda.prepared.lock().unwrap().insert(kernel, blocks);
    Ok(blocks)
}

/// The most dynamic shared memory a block may opt in to on this device (227 KiB on Hopper, 163
/// KiB on the A100).
fn shared_limit(cuda: &Cuda) -> Result<usize> {
    use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN as OPTIN;
    static CACHE: DeviceCache<()> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (cuda.ordinal(), ());
    if let Some(&bytes) = cache.lock().unwrap().get(&key) {
        return Ok(bytes);
    }
    let bytes = cuda.context().attribute(OPTIN).map_err(driver("attribute"))? as usize;
    cache.lock().unwrap().insert(key, bytes);
    Ok(bytes)
}

/// `y[t, :] = W x[t, :]` for `t < tokens`: `w` a `[n, k]` device tensor of any dtype, `x`
/// `[tokens, k]` and `y` `[tokens, n]` f32, accumulated in f32; the activations of a
/// block-quantized weight quantized to two digits ([`MatvecActs::TwoDigits`]).
///
/// The CUDA twin of `strata_tensor::cpu::reference::matvec` per token: the same integers, summed
/// in another order. Tokens go in launches of up to [`MATVEC_MAX_TOKENS`], each reading the
/// weight once.
pub fn matvec<X, Y>(cuda: &Cuda, w: &Tensor, x: &X, y: &mut Y, tokens: usize) -> Result<()>
where
    X: DevicePtr<f32>,
    Y: DevicePtrMut<f32>,
{
    matvec_as(cuda, w, x, y, tokens, MatvecActs::default())
}

/// [`matvec`] with the activations of a block-quantized weight taken as `acts` says.
///
/// With [`MatvecActs::F32`] it is the CUDA twin of `strata_tensor::cpu::reference::matmul` with
/// `x` as `[tokens, k]`. For the 4- and 6-bit dtypes at one or two tokens those kernels scale `x`
/// by 2^90 internally (`kernels/matvec.cu`), so activations must stay below 2^38 in magnitude
/// (about 2.7e11; any model's are far smaller); products `|w x|` below about 1e-20 lose relative
/// precision, far under f32 resolution of the sums they join.
pub fn matvec_as<X, Y>(cuda: &Cuda, w: &Tensor, x: &X, y: &mut Y, tokens: usize, acts: MatvecActs) -> Result<()>
where
    X: DevicePtr<f32>,
    Y: DevicePtrMut<f32>,
{
    run(cuda, w, Input::f32(cuda, x), y, tokens, acts, MatvecStore::Write)
}

/// `y[t, :] += W x[t, :]` for `t < tokens`: [`matvec`] with its outputs added to `y`'s values
/// (a residual connection fused into its projection). Each product is rounded to f32 before the
/// add, so the result is bit for bit [`matvec`] into a buffer, then an add.
pub fn matvec_add<X, Y>(cuda: &Cuda, w: &Tensor, x: &X, y: &mut Y, tokens: usize) -> Result<()>
where
    X: DevicePtr<f32>,
    Y: DevicePtrMut<f32>,
{
    run(cuda, w, Input::f32(cuda, x), y, tokens, MatvecActs::default(), MatvecStore::Add)
}

/// SwiGLU of a product: `w` holds a gate and an up projection's rows in groups of four (gate rows
/// 2j and 2j + 1, then up rows 2j and 2j + 1: [`pair_rows`](crate::cuda::tensor::pair_rows)), so
/// `n` is a multiple of 4, and `out[t, i] = silu(gate_i x[t, :]) * (up_i x[t, :])` for `i < n /
/// 2`: the gate and up matvecs and `swiglu` in one launch, bit for bit (each product is rounded
/// to f32, then goes through `swiglu`'s arithmetic).
pub fn matvec_swiglu<X, Y>(cuda: &Cuda, w: &Tensor, x: &X, out: &mut Y, tokens: usize) -> Result<()>
where
    X: DevicePtr<f32>,
    Y: DevicePtrMut<f32>,
{
    run(cuda, w, Input::f32(cuda, x), out, tokens, MatvecActs::default(), MatvecStore::Swiglu)
}

/// What a matvec does with its products (the kernels' `STRATA_MATVEC_STORE_*`): [`matvec`]'s,
/// [`matvec_add`]'s or [`matvec_swiglu`]'s store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatvecStore {
    /// `y = W x`.
    Write,
    /// `y += W x`.
    Add,
    /// `out = silu(gate x) * (up x)` of paired gate and up rows.
    Swiglu,
}

/// The product of a block-quantized weight `w` with activations already quantized to two digits:
/// `xq` holds `tokens` records of `k` activations ([`actq_bytes`]), from [`quantize_acts`] or
/// [`rms_norm_actq`](super::rms_norm_actq), and `y` is stored as `store` says. Bit for bit
/// [`matvec`], [`matvec_add`] or [`matvec_swiglu`] of the f32 activations they were quantized
/// from; the blocks copy the records rather than quantize.
pub fn matvec_actq<Q, Y>(cuda: &Cuda, w: &Tensor, xq: &Q, y: &mut Y, tokens: usize, store: MatvecStore) -> Result<()>
where
    Q: DevicePtr<u8>,
    Y: DevicePtrMut<f32>,
{
    if !w.dtype().is_quantized() {
        return Err(Error::invalid(
            "matvec_actq",
            format!("quantized activations multiply block-quantized weights, not {}", w.dtype()),
        ));
    }
    let input = Input::Actq { ptr: ptr(cuda, xq), len: xq.len() };
    run(cuda, w, input, y, tokens, MatvecActs::TwoDigits, store)
}

/// One projection of every expert of a Mixture-of-Experts layer, for [`matvec_experts`]: device
/// tensors of one dtype and shape (the gate and up weights paired as [`matvec_swiglu`] takes
/// them, or the down weights), and a device table of their addresses, which the kernels index by
/// the expert ids that top-k gating wrote on the device. The tensors are kept (cheap clones) so
/// that the addresses stay valid.
pub struct ExpertWeights {
    weights: Vec<Tensor>,
    table: CudaSlice<u64>,
}

impl ExpertWeights {
    /// The table of `weights` (expert `e` is `weights[e]`): each a 2-D device tensor on `cuda`'s
    /// device, all of one dtype and shape; refused otherwise, naming the expert that differs.
    pub fn new(cuda: &Cuda, weights: &[Tensor]) -> Result<ExpertWeights> {
        const OP: &str = "ExpertWeights::new";
        let Some(first) = weights.first() else {
            return Err(Error::invalid(OP, "no experts"));
        };
        if weights.len() > u32::MAX as usize {
            return Err(Error::invalid(OP, format!("{} experts do not fit 32-bit ids", weights.len())));
        }
        let mut table = Vec::with_capacity(weights.len());
        for (e, w) in weights.iter().enumerate() {
            if w.dtype() != first.dtype() || w.shape() != first.shape() {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "expert {e}'s weight is {} {}, expert 0's {} {}: one launch takes experts of one dtype and shape",
                        w.dtype(),
                        w.shape(),
                        first.dtype(),
                        first.shape()
                    ),
                ));
            }
            let (_, _, bytes) = device_matrix(OP, cuda, w)?;
            table.push(ptr(cuda, &bytes));
        }
        Ok(ExpertWeights { weights: weights.to_vec(), table: cuda.upload(&table)? })
    }

    /// Experts in the table.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// Whether the table is empty (never: [`ExpertWeights::new`] refuses no experts).
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Expert 0's weight, whose dtype and shape every expert shares.
    pub fn first(&self) -> &Tensor {
        &self.weights[0]
    }

    /// The slots of a launch over these experts: one per id of `ids`.
    fn slots<I: DevicePtr<u32>>(&self, cuda: &Cuda, ids: &I, shared_x: bool) -> Slots {
        Slots { table: ptr(cuda, &self.table), ids: ptr(cuda, ids), slots: ids.len(), experts: self.len(), shared_x }
    }
}

/// The products of a token's chosen experts in one launch: for each slot `s < ids.len()`, the
/// product of expert `ids[s]`'s weight with `x`'s row `s` (or, with `shared_x`, its one row) into
/// `y`'s row `s`, stored as `store` says (`y` has `n` floats per slot, or `n / 2` for
/// [`MatvecStore::Swiglu`]). A slot whose id is not below `experts.len()` (top-k gating's
/// `u32::MAX` for an unused slot) is skipped: its row of `y` is left as it is.
///
/// `ids` stays on the device (top-k gating's output): no host round trip picks the experts. Each
/// slot computes bit for bit what [`matvec`], [`matvec_add`] or [`matvec_swiglu`] of its expert
/// alone computes on its row; a block-quantized weight's activations are quantized in the blocks
/// or, for rows longer than a tile, once per row before the product, as those do.
pub fn matvec_experts<I, X, Y>(
    cuda: &Cuda,
    experts: &ExpertWeights,
    ids: &I,
    x: &X,
    shared_x: bool,
    y: &mut Y,
    store: MatvecStore,
) -> Result<()>
where
    I: DevicePtr<u32>,
    X: DevicePtr<f32>,
    Y: DevicePtrMut<f32>,
{
    let (slots, x) = (experts.slots(cuda, ids, shared_x), Input::f32(cuda, x));
    launch_all(cuda, "matvec_experts", experts.first(), Some(slots), None, x, y, 1, MatvecActs::default(), store)
}

/// [`matvec_experts`] with the slots' one row of activations `x` normalised by the products
/// themselves, as [`matvec_normed`] does (`norm`: `k` floats, `eps`): bit for bit
/// [`rms_norm`](super::rms_norm) then [`matvec_experts`] with a shared row. Only where
/// [`fuses_norm`] allows it for one token.
#[allow(clippy::too_many_arguments)]
pub fn matvec_experts_normed<I, X, N, Y>(
    cuda: &Cuda,
    experts: &ExpertWeights,
    ids: &I,
    x: &X,
    norm: &N,
    eps: f32,
    y: &mut Y,
    store: MatvecStore,
) -> Result<()>
where
    I: DevicePtr<u32>,
    X: DevicePtr<f32>,
    N: DevicePtr<f32>,
    Y: DevicePtrMut<f32>,
{
    let (slots, norm, x) = (experts.slots(cuda, ids, true), Norm::of(cuda, norm, eps), Input::f32(cuda, x));
    let w = experts.first();
    launch_all(cuda, "matvec_experts_normed", w, Some(slots), Some(norm), x, y, 1, MatvecActs::default(), store)
}

/// Whether a product of `tokens` tokens with weight `w` can normalise its activations itself
/// ([`matvec_normed`]): float weights always; block-quantized ones when their blocks quantize the
/// activations as they stage them (at most two tokens, rows within a block's activation tile),
/// not when the launcher quantizes them first; rows of at most 65536 columns.
pub fn fuses_norm(w: &Tensor, tokens: usize) -> bool {
    let k = w.shape().dims().last().copied().unwrap_or(0);
    takes_norm_on(w.dtype(), k, tokens, MatvecActs::default())
}

/// [`fuses_norm`] for a launch of `dtype` with `k` columns of f32 activations, `tokens` tokens,
/// `acts` the path of a block-quantized weight.
fn takes_norm_on(dtype: DType, k: usize, tokens: usize, acts: MatvecActs) -> bool {
    let within = k <= STRATA_NORM_MAX_COLS as usize;
    if !dtype.is_quantized() {
        return within;
    }
    if !acts.integer(dtype) {
        return false; // the f32-activation kernels, kept for comparison, take x as it is
    }
    let t = tokens.min(acts.max_tokens(dtype)).next_power_of_two();
    within && !quantize_first(dtype, tokens, k, t)
}

/// `y[t, :] = W rms_norm(x[t, :])`, stored as `store` says, for `t < tokens`: the product
/// normalises its activations itself, each block computing each token's scale over its whole row
/// (`kernels/include/norm.cuh`'s order) and applying it and `norm` (`k` floats) as it stages
/// them, bit for bit [`rms_norm`](super::rms_norm) with `eps` into a buffer and then [`matvec`],
/// [`matvec_add`] or [`matvec_swiglu`]: one launch rather than two, and no normalised row
/// written. Only where [`fuses_norm`] says so.
#[allow(clippy::too_many_arguments)]
pub fn matvec_normed<X, N, Y>(
    cuda: &Cuda,
    w: &Tensor,
    x: &X,
    norm: &N,
    eps: f32,
    y: &mut Y,
    tokens: usize,
    store: MatvecStore,
) -> Result<()>
where
    X: DevicePtr<f32>,
    N: DevicePtr<f32>,
    Y: DevicePtrMut<f32>,
{
    let (norm, x) = (Norm::of(cuda, norm, eps), Input::f32(cuda, x));
    launch_all(cuda, "matvec_normed", w, None, Some(norm), x, y, tokens, MatvecActs::default(), store)
}

/// The activations a launch reads: f32 values, or two-digit records.
#[derive(Clone, Copy)]
enum Input {
    F32 { ptr: u64, len: usize },
    Actq { ptr: u64, len: usize },
}

impl Input {
    fn f32<X: DevicePtr<f32>>(cuda: &Cuda, x: &X) -> Input {
        Input::F32 { ptr: ptr(cuda, x), len: x.len() }
    }
}

/// The launches of [`matvec_as`], [`matvec_add`], [`matvec_swiglu`] and [`matvec_actq`].
fn run<Y>(
    cuda: &Cuda,
    w: &Tensor,
    x: Input,
    y: &mut Y,
    tokens: usize,
    acts: MatvecActs,
    store: MatvecStore,
) -> Result<()>
where
    Y: DevicePtrMut<f32>,
{
    let op = match (store, x) {
        (_, Input::Actq { .. }) => "matvec_actq",
        (MatvecStore::Write, _) => "matvec",
        (MatvecStore::Add, _) => "matvec_add",
        (MatvecStore::Swiglu, _) => "matvec_swiglu",
    };
    launch_all(cuda, op, w, None, None, x, y, tokens, acts, store)
}

/// The experts of a Mixture-of-Experts launch ([`matvec_experts`]): the device addresses of the
/// table of weight addresses and of the slots' expert ids, how many slots and experts, and
/// whether the slots share one row of activations.
#[derive(Clone, Copy)]
struct Slots {
    table: u64,
    ids: u64,
    slots: usize,
    experts: usize,
    shared_x: bool,
}

/// The RMSNorm a launch applies to its activations ([`matvec_normed`]): the device address and
/// length of its weight (a float per column, checked by the launch) and its epsilon.
#[derive(Clone, Copy)]
struct Norm {
    w: u64,
    len: usize,
    eps: f32,
}

impl Norm {
    fn of<N: DevicePtr<f32>>(cuda: &Cuda, w: &N, eps: f32) -> Norm {
        Norm { w: ptr(cuda, w), len: w.len(), eps }
    }
}

/// The launches of [`run`] for weight `w`, or, with `slots`, of [`matvec_experts`] (`w` expert
/// 0, whose shape and dtype they share, its address passed as the kernel's unread weight
/// argument; `tokens` 1: a token per slot); with `norm`, of [`matvec_normed`].
#[allow(clippy::too_many_arguments)]
fn launch_all<Y>(
    cuda: &Cuda,
    op: &'static str,
    w: &Tensor,
    slots: Option<Slots>,
    norm: Option<Norm>,
    x: Input,
    y: &mut Y,
    tokens: usize,
    acts: MatvecActs,
    store: MatvecStore,
) -> Result<()>
where
    Y: DevicePtrMut<f32>,
{
    let (n, k, bytes) = device_matrix(op, cuda, w)?;
    let wp = ptr(cuda, &bytes);
    // Rows of x and y: a token's, or one per slot (x one for all slots when they share it).
    let (x_rows, y_rows) = match slots {
        None => (tokens, tokens),
        Some(s) => (if s.shared_x { 1 } else { s.slots }, s.slots),
    };
    // Outputs per token: n, or one per gate and up pair.
    let outputs = if store == MatvecStore::Swiglu {
        if !n.is_multiple_of(4) {
            return Err(Error::invalid(op, format!("{n} rows are not groups of four paired gate and up rows")));
        }
        n / 2
    } else {
        n
    };
    match x {
        Input::F32 { len, .. } => check_len(op, "x", len, x_rows * k)?,
        Input::Actq { len, ptr } => {
            check_len(op, "xq", len, actq_bytes(x_rows, k))?;
            check_actq_aligned(op, ptr)?;
        }
    }
    check_len(op, "y", y.len(), y_rows * outputs)?;
    if tokens == 0 || y_rows == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        return Err(Error::invalid(op, format!("the weight {} has no columns", w.shape())));
    }
    let to_u32 = |v: usize, what: &str| {
        u32::try_from(v).map_err(|_| Error::invalid(op, format!("{what} = {v} does not fit the kernel's 32-bit index")))
    };
    let (rows, cols) = (to_u32(n, "n")?, to_u32(k, "k")?);
    let dtype = w.dtype();
    let names = kernel_names(dtype, k, acts);
    let yp = ptr_mut(cuda, y);
    let limit = shared_limit(cuda)?;
    let per_launch = acts.max_tokens(dtype);
    // The kernel for a group of `group` tokens: the next power of two, or 4 where the decode
    // kernels' deep pipelines need more shared memory than the device has (Hopper's; the 4-token
    // kernel takes any count up to 4).
    let kernel_tokens = |group: usize| -> Result<usize> {
        let t = group.next_power_of_two();
        if shared_bytes(dtype, t, acts) + STATIC_SHARED_BYTES <= limit {
            return Ok(t);
        }
        if per_launch < 4 {
            let need = shared_bytes(dtype, t, acts);
            return Err(Error::invalid(
                op,
                format!(
                    "the f32-activation kernels for {dtype} need {need} bytes of shared memory per block; this device \
                     allows {limit} (the default two-digit activations run here)"
                ),
            ));
        }
        Ok(4)
    };
    if let Some(norm) = norm {
        check_len(op, "norm", norm.len, k)?;
        if !matches!(x, Input::F32 { .. }) || !takes_norm_on(dtype, k, tokens, acts) {
            return Err(Error::invalid(
                op,
                format!(
                    "a product of {tokens} tokens of {k} columns ({dtype}) cannot normalise its activations in its \
                     blocks (check fuses_norm first)"
                ),
            ));
        }
    }
    // The integer path's activations, quantized once here when that saves the blocks more than
    // the launch costs; the scratch stays locked until the products that read it are queued.
    let mut scratch = None;
    let (xp, record, acts_code) = match x {
        Input::Actq { ptr, .. } => (ptr, actq_bytes(1, k), STRATA_MATVEC_ACTS_Q16),
        Input::F32 { ptr: xp, .. }
            if acts.integer(dtype) && quantize_first(dtype, tokens, k, kernel_tokens(tokens.min(per_launch))?) =>
        {
            let mut guard = cuda.actq.lock().unwrap();
            let need = actq_bytes(x_rows, k);
            let xq = ptr_mut(cuda, grown(cuda, &mut guard, need, need)?);
            launch_quantize(cuda, xp, xq, x_rows, k)?;
            scratch = Some(guard);
            (xq, actq_bytes(1, k), STRATA_MATVEC_ACTS_Q16)
        }
        Input::F32 { ptr, .. } => (ptr, 4 * k, STRATA_MATVEC_ACTS_F32),
    };
    // A Mixture-of-Experts launch: a block row per slot, each with its slot's activations (or
    // all the same row) and outputs.
    let (grid_y, experts, x_slot, y_slot, table, ids) = match slots {
        None => (1, 0, 0, 0, 0, 0),
        Some(s) => {
            let x_slot = if s.shared_x { 0 } else { record as u64 };
            (to_u32(s.slots, "the slots")?, s.experts as u32, x_slot, outputs as u64, s.table, s.ids)
        }
    };
    for t0 in (0..tokens).step_by(per_launch) {
        let group = (tokens - t0).min(per_launch);
        let t = kernel_tokens(group)?;
        let kernel = names[t.trailing_zeros() as usize];
        let smem = shared_bytes(dtype, t, acts);
        let threads = (warps(dtype, t, acts) * 32) as u32;
        let resident = prepare(cuda, kernel, threads, smem)?;
        // Float kernels take one block per group of rows; block-quantized ones are persistent,
        // with a warp per group of rows at a time.
        // A decode product of few groups of rows: warps share the groups (the same count
        // whatever the grid, so an expert's product has the bits of its own launch). Block-
        // quantized rows within one tile, split by pipeline chunks; float rows of the vector
        // kernels, by runs of 32 x 4 loads of 16 bytes.
        let block_warps = warps(dtype, t, acts);
        let splits = if t > 2 || !splits_on() {
            1
        } else if dtype.is_quantized() && k <= tile_columns(dtype, t) {
            row_splits(
                n.div_ceil(ROWS_PER_WARP),
                k.div_ceil(chunk(dtype, t, acts)),
                resident * block_warps,
                block_warps,
            )
        } else if vector_rows(dtype, k) {
            let runs = (w.row_bytes() / 16).div_ceil(32 * 4);
            row_splits(n.div_ceil(ROWS_PER_WARP), runs, resident * block_warps, block_warps)
        } else {
            1
        };
        let blocks = if dtype.is_quantized() {
            // The resident blocks, shared among the slots' rows of blocks, but no more than
            // groups of rows: the kernel hands the groups out warp-major (group g to block g %
            // blocks), so a product of fewer groups than the grid has warps spreads over every SM,
            // a few warps each, rather than filling the first blocks. (Until 2026-11-28 the grid
            // was one block per 16 warps' worth of groups, 32 blocks for a TinyLlama decode
            // step's o and down products: 32 of an H200's 132 SMs.)
            n.div_ceil(ROWS_PER_WARP).min((resident / grid_y as usize).max(1))
        } else {
            // A block per group of warps (of `splits` warps each) and its rows.
            n.div_ceil(block_warps / splits as usize * ROWS_PER_WARP)
        };
        let blocks = to_u32(blocks, "the grid")?;
        let p = MatvecParams {
            rows,
            cols,
            row_bytes: w.row_bytes() as u64,
            total_bytes: w.byte_len() as u64,
            tokens: group as u32,
            store: match store {
                MatvecStore::Write => STRATA_MATVEC_STORE_WRITE,
                MatvecStore::Add => STRATA_MATVEC_STORE_ADD,
                MatvecStore::Swiglu => STRATA_MATVEC_STORE_SWIGLU,
            },
            acts: acts_code,
            experts,
            x_slot,
            y_slot,
            norm_eps: norm.map_or(0.0, |n| n.eps),
            splits,
        };
        let cfg =
            LaunchConfig { grid_dim: (blocks, grid_y, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem as u32 };
        let norm_w = norm.map_or(0, |n| n.w);
        let ptrs = [wp, xp + (t0 * record) as u64, yp + (t0 * outputs * 4) as u64, table, ids, norm_w];
        // SAFETY: x holds tokens * k floats (or the scratch tokens records of k quantized
        // activations) and y tokens * outputs floats (checked above), so tokens t0 .. t0 + group
        // of each are in bounds; the kernel reads the weight only below total_bytes
        // (device_matrix checked the buffer holds them), reads x rows only below p.tokens, and
        // writes y rows only below p.tokens and columns below outputs (n, or n / 2 for SwiGLU).
        // A Mixture-of-Experts launch (one token) reads slot s's x at s * x_slot bytes (x holds
        // x_rows rows: one, or a record or row per slot) and writes its y at s * outputs floats (y
        // holds a row per slot); its weight is a table entry, every expert checked as w is
        // ([`ExpertWeights::new`]), and ids holds a u32 per slot ([`matvec_experts`] checked).
        // A norm's weight holds k floats ([`matvec_normed`] checked).
        unsafe { cuda.launch("matvec", kernel, cfg, &p, &ptrs)? };
    }
    drop(scratch);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_products_of_few_groups_split_them_among_warps() {
        // An H200's 132 SMs, a block of 16 warps each: 2112 warps.
        let device = 132 * 16;
        // TinyLlama's products at one token (q4_0: chunks of 1024 columns).
        assert_eq!(row_splits(2048 / 4, 6, device, 16), 4, "down: 512 groups of 6 chunks");
        assert_eq!(row_splits(2048 / 4, 2, device, 16), 2, "o: 2 chunks a row at most");
        assert_eq!(row_splits(2560 / 4, 2, device, 16), 2, "qkv");
        assert_eq!(row_splits(11264 / 4, 2, device, 16), 1, "gate/up: more groups than warps");
        // bf16 rows of the float kernels (blocks of 4 warps, 16 of them an SM): runs of 128
        // loads of 16 bytes, 2 in a row of 2048, 5.5 in one of 5632.
        assert_eq!(row_splits(512, 2, 132 * 64, 4), 2, "o, bf16");
        assert_eq!(row_splits(512, 6, 132 * 64, 4), 4, "down, bf16");
        // Never more warps on a group than a block has, nor than the row has chunks.
        assert_eq!(row_splits(1, 64, device, 16), 16);
        assert_eq!(row_splits(1, 64, device, 8), 8);
        assert_eq!(row_splits(1, 3, device, 16), 2);
        assert_eq!(row_splits(1, 1, device, 16), 1);
        // Every group's warps on the device at once.
        for groups in 1..3000 {
            let s = row_splits(groups, 16, device, 16) as usize;
            assert!(s.is_power_of_two() && 16 % s == 0);
            assert!(s == 1 || groups * s <= device, "{groups} groups split {s} ways");
        }
    }

    #[test]
    fn every_kernel_fits_a_hopper_block_and_the_fallbacks_an_sm80_one() {
        for dtype in DType::ALL {
            for acts in MatvecActs::ALL {
                for t in [1, 2, 4, 8] {
                    let bytes = shared_bytes(dtype, t, acts) + STATIC_SHARED_BYTES;
                    assert!(bytes <= 227 * 1024, "{dtype} {acts:?} t{t}: {bytes} bytes");
                    if !(dtype.is_quantized() && t <= 2) {
                        assert!(bytes <= 163 * 1024, "{dtype} {acts:?} t{t}: {bytes} bytes");
                    }
                }
            }
        }
    }

    #[test]
    fn every_kernel_the_launcher_names_is_in_the_ptx() {
        let ptx = crate::cuda::kernel_ptx("matvec").expect("matvec.cu is built");
        for dtype in DType::ALL {
            for k in [dtype.block_len() * 8, dtype.block_len() * 8 + 1] {
                for acts in MatvecActs::ALL {
                    for name in kernel_names(dtype, k, acts) {
                        assert!(ptx.contains(&format!(".entry {name}(")), "{dtype} k={k} {acts:?}: no kernel {name}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_integer_tile_is_smaller_than_the_float_one() {
        // Two bytes and three quarters per column against about five. (The weight pipelines
        // differ: the integer kernels of q4_k and q6_k take chunks twice as long, with half the
        // warps at one and two tokens.)
        for dtype in DType::ALL.into_iter().filter(|d| d.is_quantized()) {
            for t in [1, 2, 4, 8] {
                let (int, float) = (tile_bytes(dtype, t, MatvecActs::TwoDigits), tile_bytes(dtype, t, MatvecActs::F32));
                assert!(int < float, "{dtype} t{t}: {int} >= {float}");
                if t <= 2 && !matches!(dtype, DType::Q4K | DType::Q6K) {
                    let (int, float) =
                        (shared_bytes(dtype, t, MatvecActs::TwoDigits), shared_bytes(dtype, t, MatvecActs::F32));
                    assert!(int < float, "{dtype} t{t}: {int} >= {float}");
                }
            }
        }
        assert_eq!(shared_bytes(DType::F16, 1, MatvecActs::TwoDigits), shared_bytes(DType::F16, 1, MatvecActs::F32));
    }

    #[test]
    fn activations_are_quantized_first_above_two_tokens_or_past_a_tile() {
        // A decode step's products on rows within a tile: each block quantizes, no extra launch.
        let q = |tokens, k, t| quantize_first(DType::Q4_0, tokens, k, t);
        assert!(!q(1, 2048, 1) && !q(1, 8192, 1) && !q(2, 4096, 2));
        // Longer rows (an 8B model's down product at one token), or more tokens.
        assert!(q(1, 14336, 1) && q(2, 4352, 2));
        assert!(q(3, 64, 4) && q(8, 2048, 8) && q(20, 2048, 8));
        // A record: both digit arrays, a unit and a sum per 32 columns, a sum per 8, to 16 bytes.
        assert_eq!(actq_bytes(1, 32), 96);
        assert_eq!(actq_bytes(1, 2048), 2048 * 2 + 64 * 8 + 256 * 4);
        assert_eq!(actq_bytes(3, 64), 3 * 176);
    }

    #[test]
    fn products_normalise_their_activations_where_their_blocks_stage_them() {
        let norm = |dtype, tokens, k, acts| takes_norm_on(dtype, k, tokens, acts);
        let two = MatvecActs::TwoDigits;
        // Decode products on rows within a tile: the blocks quantize, so they can normalise.
        assert!(norm(DType::Q4_0, 1, 2048, two) && norm(DType::Q4K, 2, 4096, two));
        // Quantized first (more tokens, longer rows): no.
        assert!(!norm(DType::Q4_0, 3, 2048, two) && !norm(DType::Q8_0, 1, 14336, two));
        // Float weights at any count and length up to the norm's limit; not the f32-activation
        // kernels of block-quantized weights.
        assert!(norm(DType::BF16, 8, 14336, two) && !norm(DType::F16, 1, 70_000, two));
        assert!(!norm(DType::Q4_0, 1, 2048, MatvecActs::F32));
    }

    #[test]
    fn every_dtype_has_kernels_for_both_row_shapes() {
        for dtype in DType::ALL {
            let k = dtype.block_len() * 8;
            for acts in MatvecActs::ALL {
                assert!(kernel_names(dtype, k, acts)[0].starts_with(&format!("matvec_{}", dtype.name())));
            }
        }
        let two = MatvecActs::TwoDigits;
        assert_eq!(kernel_names(DType::F16, 7, two)[3], "matvec_f16_scalar_t8");
        assert_eq!(kernel_names(DType::F16, 8, two)[0], "matvec_f16_t1");
        assert_eq!(kernel_names(DType::F32, 6, two)[1], "matvec_f32_scalar_t2");
        assert_eq!(kernel_names(DType::Q4K, 256, two)[0], "matvec_q4_k_i16_t1");
        assert_eq!(kernel_names(DType::Q4K, 256, MatvecActs::F32)[0], "matvec_q4_k_t1");
        // The launcher splits the vector float kernels' rows, never the scalar ones'.
        assert!(vector_rows(DType::F16, 8) && vector_rows(DType::F32, 4) && vector_rows(DType::BF16, 2048));
        assert!(!vector_rows(DType::F16, 7) && !vector_rows(DType::F32, 6) && !vector_rows(DType::Q8_0, 512));
    }
}
