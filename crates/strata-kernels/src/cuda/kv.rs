//! The paged key/value cache on the device: the CUDA twin of `strata_models::KvCache`.
//!
//! Each layer keeps its keys and values in blocks of `block_len` tokens, each laid out
//! `[block_len, n_kv_heads, head_dim]` in f32, allocated as the sequence grows, and a device
//! table of the blocks' addresses, interleaved (`[k_0, v_0, k_1, v_1, ..]` as `u64`), which the
//! kernels of `kernels/attention.cu` read. The table is re-uploaded when a block is added; its
//! buffer grows by doubling. Memory is proportional to the tokens held, rounded up to one block
//! per layer. The block bookkeeping is `strata_tensor::paged::PagedKv`'s, shared with the CPU
//! cache; the blocks here are device buffers.
//!
//! Everything is ordered on the compute stream: a block or table that is dropped or replaced is
//! freed in stream order, after the kernels queued before it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};
use strata_tensor::paged::PagedKv;

use crate::cuda::ops::{RopeArgs, check_pairs, launch_shape};
use crate::cuda::params::{KvAppendParams, RopeAppendParams};
use crate::cuda::{Cuda, check_len, grown, ptr, ptr_mut};
use crate::{Error, Result};

/// Keys and values of every layer for one sequence, on the device.
pub struct DeviceKvCache {
    n_kv_heads: usize,
    head_dim: usize,
    /// The key and value blocks of every layer, in token rows of `n_kv_heads * head_dim` floats.
    blocks: PagedKv<CudaSlice<f32>>,
    /// Streaming multiprocessors of the device, for sizing the decode split.
    multiprocessors: usize,
    /// The block table of every layer.
    tables: Vec<BlockTable>,
    /// Scratch of the split-K decode, grown on demand and reused by every layer: the launches
    /// that use it are ordered on the compute stream.
    scratch: Mutex<DecodeScratch>,
    /// Whether decode merges its key chunks inside its own launch when they are few
    /// ([`DeviceKvCache::set_folded_combine`]).
    folded_combine: AtomicBool,
}

/// The split-K decode's scratch: partial accumulators and statistics, and the folded combine's
/// counters (zero between launches: the kernel sets each back once its group is merged).
#[derive(Default)]
struct DecodeScratch {
    part: Option<CudaSlice<f32>>,
    counters: Option<CudaSlice<u32>>,
}

/// One layer's table of its blocks' device addresses.
#[derive(Default)]
struct BlockTable {
    /// The host copy, `[k_0, v_0, k_1, v_1, ..]`.
    host: Vec<u64>,
    /// The device copy; its capacity may exceed `host.len()`.
    device: Option<CudaSlice<u64>>,
}

impl std::fmt::Debug for DeviceKvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKvCache")
            .field("n_layers", &self.n_layers())
            .field("n_kv_heads", &self.n_kv_heads)
            .field("head_dim", &self.head_dim)
            .field("block_len", &self.block_len())
            .field("len", &self.len())
            .finish()
    }
}

/// The most tokens a layer may hold: positions are 32-bit in the kernels.
const MAX_TOKENS: usize = i32::MAX as usize;

impl DeviceKvCache {
    /// An empty cache for `n_layers` layers of `n_kv_heads` heads of `head_dim`, in blocks of
    /// `block_len` tokens. Allocates nothing yet.
    pub fn new(
        cuda: &Cuda,
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        block_len: usize,
    ) -> Result<DeviceKvCache> {
        if n_kv_heads == 0 || head_dim == 0 || block_len == 0 {
            return Err(Error::invalid(
                "DeviceKvCache::new",
                format!(
                    "n_kv_heads ({n_kv_heads}), head_dim ({head_dim}) and block_len ({block_len}) must be positive"
                ),
            ));
        }
        let row = n_kv_heads
            .checked_mul(head_dim)
            .filter(|r| r.checked_mul(block_len).is_some_and(|b| b <= u32::MAX as usize))
            .ok_or_else(|| {
                Error::invalid(
                    "DeviceKvCache::new",
                    format!("a block of {block_len} x {n_kv_heads} x {head_dim} floats is too large"),
                )
            })?;
        Ok(DeviceKvCache {
            n_kv_heads,
            head_dim,
            blocks: PagedKv::new(n_layers, row, block_len),
            multiprocessors: cuda.multiprocessors()?.max(1),
            tables: (0..n_layers).map(|_| BlockTable::default()).collect(),
            scratch: Mutex::new(DecodeScratch::default()),
            folded_combine: AtomicBool::new(true),
        })
    }

    /// Layers.
    pub fn n_layers(&self) -> usize {
        self.blocks.n_layers()
    }

    /// Key/value heads per token.
    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_heads
    }

    /// Elements per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Tokens held (by the last layer, which is written last in a forward pass).
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether the cache holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens held by `layer`.
    ///
    /// # Panics
    /// If `layer` is not below [`DeviceKvCache::n_layers`].
    pub fn layer_len(&self, layer: usize) -> usize {
        self.blocks.layer_len(layer)
    }

    /// Tokens per block.
    pub fn block_len(&self) -> usize {
        self.blocks.block_len()
    }

    /// Device bytes of all key and value blocks, across all layers.
    pub fn allocated_bytes(&self) -> usize {
        self.blocks.allocated_bytes()
    }

    /// Drops every token and block (freed in stream order).
    pub fn clear(&mut self) {
        self.blocks.clear();
        for t in &mut self.tables {
            *t = BlockTable::default();
        }
    }

    /// Appends the keys and values of `tokens` new tokens to `layer`: `k` and `v` hold
    /// `[tokens, n_kv_heads * head_dim]` (longer buffers are fine; the rest is ignored). Blocks
    /// are allocated as needed, then one kernel launch copies the rows through the block table.
    pub fn append<K, V>(&mut self, cuda: &Cuda, layer: usize, k: &K, v: &V, tokens: usize) -> Result<()>
    where
        K: DevicePtr<f32>,
        V: DevicePtr<f32>,
    {
        const OP: &str = "DeviceKvCache::append";
        let Some((start, table)) = self.reserve(OP, cuda, layer, k.len(), v.len(), tokens)? else { return Ok(()) };
        let (block_len, row) = (self.blocks.block_len(), self.blocks.row());
        let need = tokens * row;
        let p =
            KvAppendParams { tokens: tokens as u32, start: start as u32, block_len: block_len as u32, row: row as u32 };
        let threads = 256u32;
        let grid = (need.div_ceil(threads as usize)).clamp(1, 8192) as u32;
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let ptrs = [ptr(cuda, k), ptr(cuda, v), table];
        // SAFETY: k and v hold tokens * row floats (checked by reserve); the table lists
        // ceil((start + tokens) / block_len) key and value blocks of block_len * row floats each,
        // so every destination row start + t lies inside a block the table names.
        unsafe { cuda.launch("attention", "kv_append_f32", cfg, &p, &ptrs) }?;
        self.blocks.commit(layer, tokens);
        Ok(())
    }

    /// RoPE and the append in one launch: rotates `q` in place as `ops::rope_qk` does, and
    /// appends `k` rotated the same way (its buffer left as it is) and `v` to `layer`, as
    /// [`DeviceKvCache::append`] does; bit for bit `rope_qk` then `append`, one launch shorter.
    /// `args.n_kv_heads * args.head_dim` must be this cache's row and `head_dim` even.
    #[allow(clippy::too_many_arguments)]
    pub fn append_rotated<Q, K, V, P, F>(
        &mut self,
        cuda: &Cuda,
        layer: usize,
        q: &mut Q,
        k: &K,
        v: &V,
        positions: &P,
        inv_freq: &F,
        args: &RopeArgs,
    ) -> Result<()>
    where
        Q: DevicePtrMut<f32>,
        K: DevicePtr<f32>,
        V: DevicePtr<f32>,
        P: DevicePtr<u32>,
        F: DevicePtr<f32>,
    {
        const OP: &str = "DeviceKvCache::append_rotated";
        let &RopeArgs { tokens, n_heads, n_kv_heads, head_dim, .. } = args;
        let n_pairs = inv_freq.len();
        check_pairs(OP, args, n_pairs)?;
        let row = self.blocks.row();
        if n_kv_heads.checked_mul(head_dim) != Some(row) || !head_dim.is_multiple_of(2) {
            return Err(Error::invalid(
                OP,
                format!("{n_kv_heads} KV heads x {head_dim} (even) must make the cache's row of {row}"),
            ));
        }
        let q_len = tokens.checked_mul(n_heads).and_then(|v| v.checked_mul(head_dim));
        let q_len = q_len.ok_or_else(|| Error::invalid(OP, format!("{tokens} tokens x {n_heads} heads overflow")))?;
        check_len(OP, "q", q.len(), q_len)?;
        check_len(OP, "positions", positions.len(), tokens)?;
        let items = n_heads * n_pairs + n_kv_heads * head_dim;
        if items > u32::MAX as usize || tokens > i32::MAX as usize {
            return Err(Error::invalid(OP, format!("{tokens} tokens of {items} items overflow")));
        }
        let Some((start, table)) = self.reserve(OP, cuda, layer, k.len(), v.len(), tokens)? else { return Ok(()) };
        let (rope, cfg) = launch_shape(args, n_pairs, items);
        let p = RopeAppendParams { rope, start: start as u32, block_len: self.blocks.block_len() as u32 };
        let ptrs = [ptr_mut(cuda, q), ptr(cuda, k), ptr(cuda, v), ptr(cuda, positions), ptr(cuda, inv_freq), table];
        // SAFETY: q holds tokens * n_heads * head_dim floats, k and v tokens rows of the cache's
        // row (checked above and by reserve), positions tokens and inv_freq n_pairs; the table
        // names every block positions start .. start + tokens fall in; the shared cos/sin table
        // is sized by launch_shape.
        unsafe { cuda.launch("rope", "rope_qk_append_f32", cfg, &p, &ptrs) }?;
        self.blocks.commit(layer, tokens);
        Ok(())
    }

    /// Checks an append of `tokens` rows to `layer` (`k_len` and `v_len` the floats of k and v),
    /// allocates the blocks it needs and uploads the grown block table: the layer's length before
    /// the append and the table's device address, or `None` for no tokens.
    fn reserve(
        &mut self,
        op: &str,
        cuda: &Cuda,
        layer: usize,
        k_len: usize,
        v_len: usize,
        tokens: usize,
    ) -> Result<Option<(usize, u64)>> {
        let n_layers = self.n_layers();
        if layer >= n_layers {
            return Err(Error::invalid(op, format!("layer {layer} is out of range: the cache has {n_layers} layers")));
        }
        let row = self.blocks.row();
        let need = tokens.checked_mul(row).ok_or_else(|| Error::invalid(op, format!("{tokens} tokens overflow")))?;
        check_len(op, "k", k_len, need)?;
        check_len(op, "v", v_len, need)?;
        if tokens == 0 {
            return Ok(None);
        }
        let start = self.blocks.layer_len(layer);
        let new_len = start + tokens;
        if new_len > MAX_TOKENS {
            return Err(Error::invalid(op, format!("{new_len} tokens exceed the cache's limit of {MAX_TOKENS}")));
        }

        let floats = self.blocks.block_floats();
        self.blocks.reserve(layer, tokens, || cuda.zeros::<f32>(floats))?;
        let (t, blocks) = (&mut self.tables[layer], self.blocks.blocks(layer));
        // The table lists every block, including any a failed reservation left behind.
        if t.host.len() < 2 * blocks.len() {
            t.host.extend(blocks[t.host.len() / 2..].iter().flat_map(|b| [ptr(cuda, &b.k), ptr(cuda, &b.v)]));
            let n = t.host.len();
            let table = grown(cuda, &mut t.device, n, n.next_power_of_two().max(8))?;
            cuda.upload_into(&t.host, table)?;
        }
        let table = t.device.as_mut().expect("a layer holding tokens has a table");
        Ok(Some((start, ptr_mut(cuda, table))))
    }

    /// The keys and values of `layer` copied to the host as contiguous
    /// `[layer_len, n_kv_heads * head_dim]` buffers (for tests and debugging; it synchronizes).
    pub fn download(&self, cuda: &Cuda, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        if layer >= self.n_layers() {
            return Err(Error::invalid(
                "DeviceKvCache::download",
                format!("layer {layer} is out of range: the cache has {} layers", self.n_layers()),
            ));
        }
        self.blocks.gather(layer, |b, k, v| {
            k.extend(cuda.download(&b.k)?);
            v.extend(cuda.download(&b.v)?);
            Ok(())
        })
    }

    /// The device address of `layer`'s block table, and the tokens it holds.
    pub(crate) fn table(&self, cuda: &Cuda, layer: usize) -> Option<(u64, usize)> {
        let t = self.tables.get(layer)?;
        Some((t.device.as_ref().map_or(0, |d| ptr(cuda, d)), self.blocks.layer_len(layer)))
    }

    /// Streaming multiprocessors of the device the cache lives on.
    pub(crate) fn multiprocessors(&self) -> usize {
        self.multiprocessors
    }

    /// Runs `f` with the decode scratch: a buffer of at least `len` floats and one of at least
    /// `counters` zeros, each reallocated (zeroed) when too small.
    pub(crate) fn with_scratch<T>(
        &self,
        cuda: &Cuda,
        len: usize,
        counters: usize,
        f: impl FnOnce(&mut CudaSlice<f32>, &mut CudaSlice<u32>) -> Result<T>,
    ) -> Result<T> {
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let DecodeScratch { part, counters: c } = &mut *guard;
        let part = grown(cuda, part, len, len.next_power_of_two())?;
        let c = grown(cuda, c, counters.max(1), counters.max(1).next_power_of_two())?;
        f(part, c)
    }

    /// Whether one-token attention merges up to 32 key chunks in the decode launch itself (the
    /// last block of each KV group merges them; one launch), rather than in a combine launch
    /// after it. On by default; the results differ in the order of the merge's sums only.
    pub fn set_folded_combine(&self, on: bool) {
        self.folded_combine.store(on, Ordering::Relaxed);
    }

    /// See [`DeviceKvCache::set_folded_combine`].
    pub(crate) fn folded_combine(&self) -> bool {
        self.folded_combine.load(Ordering::Relaxed)
    }
}
