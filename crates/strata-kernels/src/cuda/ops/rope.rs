//! Rotary position embedding of queries and keys, fused in one launch (`kernels/rope.cu`).

use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig};
use strata_tensor::cpu::RopeLayout;

use crate::cuda::params::{RopeParams, STRATA_ROPE_INTERLEAVED, STRATA_ROPE_ROTATE_HALF};
use crate::cuda::{Cuda, check_len, ptr, ptr_mut};
use crate::{Error, Result};

/// The shape and settings of a [`rope_qk`] launch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeArgs {
    /// Tokens to rotate; token `t` is at `positions[t]`.
    pub tokens: usize,
    /// Query heads per token: q is `[tokens, n_heads, head_dim]`.
    pub n_heads: usize,
    /// Key heads per token: k is `[tokens, n_kv_heads, head_dim]`.
    pub n_kv_heads: usize,
    /// Elements per head; the first `2 * inv_freq.len()` of them rotate.
    pub head_dim: usize,
    /// Multiplies the cosines and sines (1 unless the RoPE scaling says otherwise, e.g. YaRN).
    pub attention_factor: f32,
    /// How the rotary dimensions pair up.
    pub layout: RopeLayout,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// The element types [`rope_qk`] rotates: f32, f16 and bf16 (computed in f32, stored rounded
/// to nearest even). Sealed: implemented by exactly these three.
pub trait RopeElem: DeviceRepr + sealed::Sealed {
    /// The kernel of `kernels/rope.cu` for this type.
    #[doc(hidden)]
    const ROPE_KERNEL: &'static str;
    /// Its kernel of two pairs per item, one 32-bit access per two elements (16-bit types).
    #[doc(hidden)]
    const ROPE_KERNEL_X2: Option<&'static str>;
}

impl RopeElem for f32 {
    const ROPE_KERNEL: &'static str = "rope_qk_f32";
    const ROPE_KERNEL_X2: Option<&'static str> = None;
}

impl RopeElem for half::f16 {
    const ROPE_KERNEL: &'static str = "rope_qk_f16";
    const ROPE_KERNEL_X2: Option<&'static str> = Some("rope_qk_f16x2");
}

impl RopeElem for half::bf16 {
    const ROPE_KERNEL: &'static str = "rope_qk_bf16";
    const ROPE_KERNEL_X2: Option<&'static str> = Some("rope_qk_bf16x2");
}

/// Rotary pairs whose cos/sin table fits the 48 KiB of shared memory a block gets by default.
const MAX_PAIRS: usize = 48 * 1024 / 8;

/// The parameters and launch shape of a RoPE kernel over `items` items per token (`rope_qk`:
/// (head, pair) items; `rope_qk_append_f32`: its own, rope.h's RopeAppendParams). Many tokens:
/// a block per token, each thread taking several items. Few (decode): each token's items split
/// over more blocks so that more SMs take part.
pub(crate) fn launch_shape(args: &RopeArgs, n_pairs: usize, items: usize) -> (RopeParams, LaunchConfig) {
    let &RopeArgs { tokens, n_heads, n_kv_heads, head_dim, attention_factor, layout } = args;
    let per_block = if tokens >= 128 { 4096 } else { 1024 };
    let blocks_y = items.div_ceil(per_block).min(65535);
    let chunk = items.div_ceil(blocks_y);
    let threads = chunk.next_multiple_of(32).min(256) as u32;
    let p = RopeParams {
        tokens: tokens as u32,
        n_heads: n_heads as u32,
        n_kv_heads: n_kv_heads as u32,
        head_dim: head_dim as u32,
        n_pairs: n_pairs as u32,
        layout: match layout {
            RopeLayout::RotateHalf => STRATA_ROPE_ROTATE_HALF,
            RopeLayout::Interleaved => STRATA_ROPE_INTERLEAVED,
        },
        chunk: chunk as u32,
        attention_factor,
    };
    let cfg = LaunchConfig {
        grid_dim: (tokens as u32, blocks_y as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: (2 * n_pairs * size_of::<f32>()) as u32,
    };
    (p, cfg)
}

/// Checks `args` against `n_pairs` frequencies for a RoPE launch named `op`: the rotated
/// dimensions fit a head, the cos/sin table fits shared memory.
pub(crate) fn check_pairs(op: &str, args: &RopeArgs, n_pairs: usize) -> Result<()> {
    if 2 * n_pairs > args.head_dim {
        return Err(Error::invalid(
            op,
            format!("{n_pairs} frequencies rotate {} dimensions, more than head_dim {}", 2 * n_pairs, args.head_dim),
        ));
    }
    if n_pairs > MAX_PAIRS {
        return Err(Error::invalid(op, format!("{n_pairs} rotary pairs, at most {MAX_PAIRS} supported")));
    }
    Ok(())
}

/// Rotates the queries `q` (`[tokens, n_heads, head_dim]`) and keys `k` (`[tokens, n_kv_heads,
/// head_dim]`) in place, in one launch: pair `i` of every head of token `t` turns by the angle
/// `positions[t] as f32 * inv_freq[i]`, with the pairing of `args.layout`; the first
/// `2 * inv_freq.len()` dimensions of each head rotate and the rest are left alone.
///
/// The CUDA twin of `strata_tensor::cpu::reference::rope` applied to q and to k: the same f32
/// angles, cosines and sines times `attention_factor`, and every product rounded separately;
/// the only difference is the device's `sincosf` (within 2 ulp). Buffers may be longer than
/// needed; shorter ones, or `2 * inv_freq.len() > head_dim`, are [`Error::InvalidArgument`].
pub fn rope_qk<T, Q, K, P, F>(
    cuda: &Cuda,
    q: &mut Q,
    k: &mut K,
    positions: &P,
    inv_freq: &F,
    args: &RopeArgs,
) -> Result<()>
where
    T: RopeElem,
    Q: DevicePtrMut<T>,
    K: DevicePtrMut<T>,
    P: DevicePtr<u32>,
    F: DevicePtr<f32>,
{
    const OP: &str = "rope_qk";
    let &RopeArgs { tokens, n_heads, n_kv_heads, head_dim, .. } = args;
    let n_pairs = inv_freq.len();
    check_pairs(OP, args, n_pairs)?;
    let overflow =
        || Error::invalid(OP, format!("{tokens} tokens x {n_heads} + {n_kv_heads} heads x {head_dim} overflows"));
    let q_len = tokens.checked_mul(n_heads).and_then(|v| v.checked_mul(head_dim)).ok_or_else(overflow)?;
    let k_len = tokens.checked_mul(n_kv_heads).and_then(|v| v.checked_mul(head_dim)).ok_or_else(overflow)?;
    check_len(OP, "q", q.len(), q_len)?;
    check_len(OP, "k", k.len(), k_len)?;
    check_len(OP, "positions", positions.len(), tokens)?;
    let items = n_heads.checked_add(n_kv_heads).and_then(|h| h.checked_mul(n_pairs)).ok_or_else(overflow)?;
    if tokens == 0 || items == 0 {
        return Ok(());
    }
    if tokens > i32::MAX as usize || head_dim > u32::MAX as usize || items > u32::MAX as usize {
        return Err(overflow());
    }
    let ptrs = [ptr_mut(cuda, q), ptr_mut(cuda, k), ptr(cuda, positions), ptr(cuda, inv_freq)];
    // 16-bit elements two at a time where every such access is aligned: the pairs come in twos
    // and every head starts on an even element of a 4-byte aligned buffer.
    let paired = n_pairs.is_multiple_of(2) && head_dim.is_multiple_of(2) && ptrs[0] % 4 == 0 && ptrs[1] % 4 == 0;
    let (kernel, items) = match T::ROPE_KERNEL_X2 {
        Some(x2) if paired => (x2, items / 2),
        _ => (T::ROPE_KERNEL, items),
    };
    let (p, cfg) = launch_shape(args, n_pairs, items);
    // SAFETY: q holds tokens * n_heads * head_dim elements of T, k tokens * n_kv_heads * head_dim,
    // positions tokens and inv_freq n_pairs (checked above); the kernel touches dimensions
    // below 2 * n_pairs <= head_dim of those heads only, its 32-bit accesses (the x2 kernels)
    // are aligned (checked above), and its shared table is sized here.
    unsafe { cuda.launch("rope", kernel, cfg, &p, &ptrs) }
}
