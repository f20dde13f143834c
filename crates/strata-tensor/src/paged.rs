//! The block bookkeeping of a paged key/value cache, whatever holds the blocks.
//!
//! A paged cache keeps each layer's keys and values in blocks of `block_len` token rows of `row`
//! floats (`[block_len, n_kv_heads, head_dim]`, the layout `cpu::attention_decode` and the CUDA
//! attention kernels read), allocated as the sequence grows, so that memory is proportional to
//! the tokens held, rounded up to one block per layer. [`PagedKv`] does the counting for every
//! such cache: how many blocks a length needs, which block and row hold a position, allocating
//! blocks ahead of an append, the tokens each layer holds, the bytes allocated, and gathering
//! the blocks back into contiguous buffers. The storage of a block is the caller's: boxed slices
//! on the CPU (`strata_models::KvCache`), device buffers on CUDA
//! (`strata_kernels::cuda::DeviceKvCache`).

/// The key block and the value block of one block index, each `block_len * row` floats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvBlock<S> {
    /// The keys.
    pub k: S,
    /// The values.
    pub v: S,
}

/// The key and value blocks of every layer of one sequence, held in `S`, and the tokens each
/// layer holds.
#[derive(Debug)]
pub struct PagedKv<S> {
    block_len: usize,
    row: usize,
    layers: Vec<PagedLayer<S>>,
}

#[derive(Debug)]
struct PagedLayer<S> {
    blocks: Vec<KvBlock<S>>,
    len: usize,
}

impl<S> Default for PagedLayer<S> {
    fn default() -> Self {
        PagedLayer { blocks: Vec::new(), len: 0 }
    }
}

impl<S> PagedKv<S> {
    /// No blocks yet for `n_layers` layers of tokens of `row` floats, in blocks of `block_len`
    /// tokens.
    ///
    /// # Panics
    /// If `block_len` is 0 (callers check their arguments first).
    pub fn new(n_layers: usize, row: usize, block_len: usize) -> PagedKv<S> {
        assert!(block_len > 0, "block_len must be positive");
        PagedKv { block_len, row, layers: (0..n_layers).map(|_| PagedLayer::default()).collect() }
    }

    /// Layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Tokens per block.
    pub fn block_len(&self) -> usize {
        self.block_len
    }

    /// Floats per token row.
    pub fn row(&self) -> usize {
        self.row
    }

    /// Floats per block (of keys, or of values).
    pub fn block_floats(&self) -> usize {
        self.block_len * self.row
    }

    /// Tokens held (by the last layer, which is written last in a forward pass).
    pub fn len(&self) -> usize {
        self.layers.last().map_or(0, |l| l.len)
    }

    /// Whether the last layer holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens held by `layer`.
    ///
    /// # Panics
    /// If `layer` is not below [`PagedKv::n_layers`].
    pub fn layer_len(&self, layer: usize) -> usize {
        self.layers[layer].len
    }

    /// The most tokens any layer holds.
    pub fn max_layer_len(&self) -> usize {
        self.layers.iter().map(|l| l.len).max().unwrap_or(0)
    }

    /// Blocks needed to hold `len` tokens.
    pub fn blocks_for(&self, len: usize) -> usize {
        len.div_ceil(self.block_len)
    }

    /// The block holding position `pos`, and the row of `pos` within it.
    pub fn locate(&self, pos: usize) -> (usize, usize) {
        (pos / self.block_len, pos % self.block_len)
    }

    /// Bytes of all key and value blocks across all layers, for f32 rows.
    pub fn allocated_bytes(&self) -> usize {
        let block_bytes = self.block_floats() * std::mem::size_of::<f32>();
        self.layers.iter().map(|l| 2 * l.blocks.len() * block_bytes).sum()
    }

    /// The blocks of `layer`, in position order.
    ///
    /// # Panics
    /// If `layer` is not below [`PagedKv::n_layers`].
    pub fn blocks(&self, layer: usize) -> &[KvBlock<S>] {
        &self.layers[layer].blocks
    }

    /// The blocks of `layer`, mutably.
    ///
    /// # Panics
    /// If `layer` is not below [`PagedKv::n_layers`].
    pub fn blocks_mut(&mut self, layer: usize) -> &mut [KvBlock<S>] {
        &mut self.layers[layer].blocks
    }

    /// Drops every token and block of every layer.
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            *l = PagedLayer::default();
        }
    }

    /// Makes room in `layer` for `tokens` more tokens: calls `alloc` (keys first, then values)
    /// for each missing block until the layer has the blocks its new length needs. The tokens
    /// held do not change until [`PagedKv::commit`]; on an error, the blocks allocated before it
    /// stay.
    ///
    /// # Panics
    /// If `layer` is not below [`PagedKv::n_layers`].
    pub fn reserve<E>(
        &mut self,
        layer: usize,
        tokens: usize,
        mut alloc: impl FnMut() -> Result<S, E>,
    ) -> Result<(), E> {
        let need = self.blocks_for(self.layers[layer].len + tokens);
        let l = &mut self.layers[layer];
        while l.blocks.len() < need {
            let k = alloc()?;
            let v = alloc()?;
            l.blocks.push(KvBlock { k, v });
        }
        Ok(())
    }

    /// Records that `tokens` more tokens of `layer` are written into its reserved blocks.
    ///
    /// # Panics
    /// If `layer` is not below [`PagedKv::n_layers`]; in debug builds, if the blocks do not
    /// cover the new length.
    pub fn commit(&mut self, layer: usize, tokens: usize) {
        let new_len = self.layers[layer].len + tokens;
        debug_assert!(self.blocks_for(new_len) <= self.layers[layer].blocks.len(), "commit beyond the reserved blocks");
        self.layers[layer].len = new_len;
    }

    /// The keys and values of `layer` as contiguous `[layer_len, row]` buffers: `read` appends
    /// one block's keys and values to the two buffers, block by block, and the unused rows of
    /// the last block are cut off.
    pub fn gather<E>(
        &self,
        layer: usize,
        mut read: impl FnMut(&KvBlock<S>, &mut Vec<f32>, &mut Vec<f32>) -> Result<(), E>,
    ) -> Result<(Vec<f32>, Vec<f32>), E> {
        let l = &self.layers[layer];
        let capacity = l.blocks.len() * self.block_floats();
        let (mut k, mut v) = (Vec::with_capacity(capacity), Vec::with_capacity(capacity));
        for block in &l.blocks {
            read(block, &mut k, &mut v)?;
        }
        let n = l.len * self.row;
        k.truncate(n);
        v.truncate(n);
        Ok((k, v))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    fn cache(n_layers: usize, row: usize, block_len: usize) -> PagedKv<Vec<f32>> {
        PagedKv::new(n_layers, row, block_len)
    }

    #[test]
    fn reserves_whole_blocks_and_counts_bytes() {
        let mut c = cache(2, 3, 4);
        let mut allocs = 0;
        let mut alloc = || {
            allocs += 1;
            Ok::<_, Infallible>(vec![0f32; 12])
        };
        let Ok(()) = c.reserve(0, 5, &mut alloc);
        assert_eq!(c.blocks(0).len(), 2);
        c.commit(0, 5);
        // Three more tokens still fit in the second block.
        let Ok(()) = c.reserve(0, 3, &mut alloc);
        assert_eq!(c.blocks(0).len(), 2);
        c.commit(0, 3);
        let Ok(()) = c.reserve(0, 1, &mut alloc);
        assert_eq!(c.blocks(0).len(), 3);
        assert_eq!(allocs, 6, "a key and a value block per block index");
        assert_eq!(c.allocated_bytes(), 3 * 2 * 12 * 4);
        assert_eq!((c.layer_len(0), c.len(), c.max_layer_len()), (8, 0, 8));
        c.clear();
        assert_eq!((c.allocated_bytes(), c.max_layer_len(), c.blocks(0).len()), (0, 0, 0));
    }

    #[test]
    fn an_allocation_error_stops_the_reservation() {
        let mut c = cache(1, 2, 2);
        let mut left = 3;
        let mut alloc = || {
            if left == 0 {
                return Err("out of memory");
            }
            left -= 1;
            Ok(vec![0f32; 4])
        };
        assert_eq!(c.reserve(0, 6, &mut alloc), Err("out of memory"));
        assert_eq!((c.blocks(0).len(), c.layer_len(0)), (1, 0));
    }

    #[test]
    fn locates_positions_and_gathers_rows_in_order() {
        let (row, block_len) = (2, 3);
        let mut c = cache(1, row, block_len);
        let tokens = 7;
        let Ok(()) = c.reserve(0, tokens, || Ok::<_, Infallible>(vec![0f32; block_len * row]));
        for pos in 0..tokens {
            let (b, r) = c.locate(pos);
            assert_eq!(b * block_len + r, pos);
            let block = &mut c.blocks_mut(0)[b];
            block.k[r * row..(r + 1) * row].copy_from_slice(&[pos as f32, 0.5]);
            block.v[r * row..(r + 1) * row].copy_from_slice(&[-(pos as f32), 1.5]);
        }
        c.commit(0, tokens);
        let Ok((k, v)) = c.gather(0, |b, k, v| {
            k.extend_from_slice(&b.k);
            v.extend_from_slice(&b.v);
            Ok::<_, Infallible>(())
        });
        let want_k: Vec<f32> = (0..tokens).flat_map(|p| [p as f32, 0.5]).collect();
        let want_v: Vec<f32> = (0..tokens).flat_map(|p| [-(p as f32), 1.5]).collect();
        assert_eq!((k, v), (want_k, want_v));
        assert_eq!(c.blocks_for(tokens), 3);
        assert_eq!(c.blocks_for(6), 2);
        assert_eq!(c.blocks_for(0), 0);
    }
}
