//! A paged key/value cache: fixed-size blocks allocated as the sequence grows.
//!
//! Each layer holds its keys and values in blocks of `block_len` tokens laid out
//! `[block_len, n_kv_heads, head_dim]`, the layout `strata_tensor::cpu::attention_decode` reads.
//! Memory is proportional to the tokens held, rounded up to one block per layer.

/// Keys and values of every layer for one sequence.
#[derive(Debug)]
pub struct KvCache {
    block_len: usize,
    row: usize,
    layers: Vec<LayerKv>,
}

#[derive(Debug, Default)]
struct LayerKv {
    k_blocks: Vec<Box<[f32]>>,
    v_blocks: Vec<Box<[f32]>>,
    len: usize,
}

/// The default number of tokens per cache block.
pub const DEFAULT_BLOCK_LEN: usize = 32;

impl KvCache {
    /// An empty cache for `n_layers` layers of `n_kv_heads` heads of `head_dim`, in blocks of
    /// `block_len` tokens.
    pub fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize, block_len: usize) -> KvCache {
        assert!(block_len > 0, "block_len must be positive");
        KvCache { block_len, row: n_kv_heads * head_dim, layers: (0..n_layers).map(|_| LayerKv::default()).collect() }
    }

    /// Tokens held (by the last layer, which is written last in a forward pass).
    pub fn len(&self) -> usize {
        self.layers.last().map_or(0, |l| l.len)
    }

    /// Whether the cache holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens per block.
    pub fn block_len(&self) -> usize {
        self.block_len
    }

    /// Bytes allocated for keys and values across all layers.
    pub fn allocated_bytes(&self) -> usize {
        let block_bytes = self.block_len * self.row * std::mem::size_of::<f32>();
        self.layers.iter().map(|l| (l.k_blocks.len() + l.v_blocks.len()) * block_bytes).sum()
    }

    /// Drops every token, keeping no blocks.
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            *l = LayerKv::default();
        }
    }

    /// Appends the keys and values of `t` new tokens (`[t, n_kv_heads, head_dim]` each) to `layer`.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        debug_assert_eq!(k.len(), v.len());
        debug_assert_eq!(k.len() % self.row, 0);
        let (block_len, row) = (self.block_len, self.row);
        let l = &mut self.layers[layer];
        for (k_tok, v_tok) in k.chunks_exact(row).zip(v.chunks_exact(row)) {
            let (b, r) = (l.len / block_len, l.len % block_len);
            if b == l.k_blocks.len() {
                l.k_blocks.push(vec![0f32; block_len * row].into_boxed_slice());
                l.v_blocks.push(vec![0f32; block_len * row].into_boxed_slice());
            }
            l.k_blocks[b][r * row..(r + 1) * row].copy_from_slice(k_tok);
            l.v_blocks[b][r * row..(r + 1) * row].copy_from_slice(v_tok);
            l.len += 1;
        }
    }

    /// Tokens held by `layer`.
    pub fn layer_len(&self, layer: usize) -> usize {
        self.layers[layer].len
    }

    /// The key and value blocks of `layer`, for `attention_decode`.
    pub fn blocks(&self, layer: usize) -> (Vec<&[f32]>, Vec<&[f32]>) {
        let l = &self.layers[layer];
        (l.k_blocks.iter().map(|b| &b[..]).collect(), l.v_blocks.iter().map(|b| &b[..]).collect())
    }

    /// The keys and values of `layer` copied into contiguous `[len, n_kv_heads, head_dim]`
    /// buffers, for prefill attention over an already filled cache.
    pub fn contiguous(&self, layer: usize) -> (Vec<f32>, Vec<f32>) {
        let l = &self.layers[layer];
        let n = l.len * self.row;
        let gather =
            |blocks: &[Box<[f32]>]| blocks.iter().flat_map(|b| b.iter().copied()).take(n).collect::<Vec<f32>>();
        (gather(&l.k_blocks), gather(&l.v_blocks))
    }

    /// Mutable access to the keys of `layer` token by token, for re-rotating cached keys when
    /// a request's RoPE scaling changes: calls `f(position, key_row)` for every held token.
    pub fn for_each_key_mut(&mut self, layer: usize, mut f: impl FnMut(usize, &mut [f32])) {
        let (block_len, row) = (self.block_len, self.row);
        let l = &mut self.layers[layer];
        for pos in 0..l.len {
            let (b, r) = (pos / block_len, pos % block_len);
            f(pos, &mut l.k_blocks[b][r * row..(r + 1) * row]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_by_blocks_and_reads_back() {
        let mut c = KvCache::new(2, 2, 3, 4);
        assert_eq!(c.allocated_bytes(), 0);
        let k: Vec<f32> = (0..5 * 6).map(|x| x as f32).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        for layer in 0..2 {
            c.append(layer, &k, &v);
        }
        assert_eq!(c.len(), 5);
        // Two blocks of 4 tokens x 6 floats, for k and v, in 2 layers.
        assert_eq!(c.allocated_bytes(), 2 * 2 * 2 * 4 * 6 * 4);
        let (kc, vc) = c.contiguous(1);
        assert_eq!(kc, k);
        assert_eq!(vc, v);
        let (kb, _) = c.blocks(0);
        assert_eq!(kb.len(), 2);
        assert_eq!(kb[1][..6], k[24..30]);
    }
}
