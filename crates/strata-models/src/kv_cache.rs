//! A paged key/value cache: fixed-size blocks allocated as the sequence grows.
//!
//! Each layer holds its keys and values in blocks of `block_len` tokens laid out
//! `[block_len, n_kv_heads, head_dim]`, the layout `strata_tensor::cpu::attention_decode` reads.
//! Memory is proportional to the tokens held, rounded up to one block per layer. The block
//! bookkeeping is `strata_tensor::paged::PagedKv`'s, shared with the device cache; the blocks here
//! are boxed slices.
//!
//! The cache is one request's state, RoPE included: it may carry the request's [`RopeScheme`]
//! (else the decoder's applies), a planned length (the RoPE table is the one for that length
//! from the start), the token ids it holds, and the [`RopeTable`] its keys were computed with.
//!
//! When a length-dependent scaling moves to a new table while the request runs, rotating the
//! cached keys to the new angles is not enough to equal a full recompute: from the second layer
//! on, the cached keys and values were computed from hidden states that attention produced with
//! the earlier table. So the default [`RopeUpdate::Recompute`] recomputes the held tokens with the
//! new table (exact), and [`RopeUpdate::Rerotate`] turns the cached keys by the angle difference
//! and rescales them (cheap; exact for the first layer, approximate beyond). Planning the
//! request's length avoids both.

use std::convert::Infallible;

use strata_tensor::cpu::{self, RopeLayout};
use strata_tensor::paged::PagedKv;

use crate::Result;
use crate::rope::{RopeScheme, RopeTable, rerotation};

/// Keys and values of every layer for one sequence.
#[derive(Debug)]
pub struct KvCache {
    n_kv_heads: usize,
    head_dim: usize,
    blocks: PagedKv<Box<[f32]>>,
    rope_scheme: Option<RopeScheme>,
    rope_update: RopeUpdate,
    planned_length: usize,
    rotated_with: Option<RopeTable>,
    ids: Vec<u32>,
}

/// What a forward pass does when the sequence's RoPE table differs from the one the cached
/// tokens were computed with (a length-dependent scaling crossing a boundary).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RopeUpdate {
    /// Recompute every held token with the new table, in one pass over the whole sequence:
    /// cached decoding then equals a full recompute, at the cost of a prefill of the held tokens
    /// at each change (every step past the boundary for the `*-dynamic` algorithms, unless the
    /// request's length is planned).
    #[default]
    Recompute,
    /// Turn the cached keys by the angle difference and rescale them by the ratio of attention
    /// factors ([`KvCache::rerotate_keys`]): linear in the tokens held, exact for the first
    /// layer's keys, approximate beyond (their inputs came from attention under the earlier table).
    Rerotate,
}

/// The default number of tokens per cache block.
pub const DEFAULT_BLOCK_LEN: usize = 32;

impl KvCache {
    /// An empty cache for `n_layers` layers of `n_kv_heads` heads of `head_dim`, in blocks of
    /// `block_len` tokens.
    ///
    /// # Panics
    /// If `block_len` is 0.
    pub fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize, block_len: usize) -> KvCache {
        KvCache {
            n_kv_heads,
            head_dim,
            blocks: PagedKv::new(n_layers, n_kv_heads * head_dim, block_len),
            rope_scheme: None,
            rope_update: RopeUpdate::default(),
            planned_length: 0,
            rotated_with: None,
            ids: Vec::new(),
        }
    }

    /// This cache with `update` as its policy for RoPE table changes.
    pub fn with_rope_update(mut self, update: RopeUpdate) -> KvCache {
        self.rope_update = update;
        self
    }

    /// The policy for RoPE table changes.
    pub fn rope_update(&self) -> RopeUpdate {
        self.rope_update
    }

    /// Plans the request's total length: forward passes pick the RoPE table for at least this
    /// many tokens. Prefer `Decoder::plan`, which also checks the request's capacity.
    pub fn set_planned_length(&mut self, len: usize) {
        self.planned_length = len;
    }

    /// The planned total length (0: none).
    pub fn planned_length(&self) -> usize {
        self.planned_length
    }

    /// The ids of the tokens held, as forward passes recorded them (empty when keys were
    /// appended by hand).
    pub fn token_ids(&self) -> &[u32] {
        &self.ids
    }

    /// Records the ids of tokens a forward pass appended.
    pub(crate) fn record_ids(&mut self, ids: &[u32]) {
        self.ids.extend_from_slice(ids);
    }

    /// Records that the cached keys (and those about to be appended) are rotated with `table`.
    pub(crate) fn set_rope_table(&mut self, table: &RopeTable) {
        if self.rotated_with.as_ref() != Some(table) {
            self.rotated_with = Some(table.clone());
        }
    }

    /// This cache with its own RoPE scheme (a request's context scaling), which the decoder
    /// uses instead of its own.
    pub fn with_rope_scheme(mut self, scheme: RopeScheme) -> KvCache {
        self.rope_scheme = Some(scheme);
        self
    }

    /// The request's RoPE scheme, if the cache carries one.
    pub fn rope_scheme(&self) -> Option<&RopeScheme> {
        self.rope_scheme.as_ref()
    }

    /// The table the cached keys are rotated with (`None` before the first forward pass).
    pub fn rope_table(&self) -> Option<&RopeTable> {
        self.rotated_with.as_ref()
    }

    /// Tokens held (by the last layer, which is written last in a forward pass).
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether the cache holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens per block.
    pub fn block_len(&self) -> usize {
        self.blocks.block_len()
    }

    /// Bytes allocated for keys and values across all layers.
    pub fn allocated_bytes(&self) -> usize {
        self.blocks.allocated_bytes()
    }

    /// Drops every token, keeping no blocks (and forgetting the tokens' ids and RoPE table; the
    /// scheme, the plan and the update policy stay).
    pub fn clear(&mut self) {
        self.blocks.clear();
        self.rotated_with = None;
        self.ids.clear();
    }

    /// Appends the keys and values of `t` new tokens (`[t, n_kv_heads, head_dim]` each) to `layer`.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let row = self.blocks.row();
        debug_assert_eq!(k.len(), v.len());
        debug_assert_eq!(k.len() % row, 0);
        let (start, tokens, floats) = (self.blocks.layer_len(layer), k.len() / row, self.blocks.block_floats());
        let Ok(()) = self.blocks.reserve(layer, tokens, || Ok::<_, Infallible>(vec![0f32; floats].into_boxed_slice()));
        for (t, (k_tok, v_tok)) in k.chunks_exact(row).zip(v.chunks_exact(row)).enumerate() {
            let (b, r) = self.blocks.locate(start + t);
            let block = &mut self.blocks.blocks_mut(layer)[b];
            block.k[r * row..(r + 1) * row].copy_from_slice(k_tok);
            block.v[r * row..(r + 1) * row].copy_from_slice(v_tok);
        }
        self.blocks.commit(layer, tokens);
    }

    /// Tokens held by `layer`.
    pub fn layer_len(&self, layer: usize) -> usize {
        self.blocks.layer_len(layer)
    }

    /// The key and value blocks of `layer`, for `attention_decode`.
    pub fn blocks(&self, layer: usize) -> (Vec<&[f32]>, Vec<&[f32]>) {
        let blocks = self.blocks.blocks(layer);
        (blocks.iter().map(|b| &b.k[..]).collect(), blocks.iter().map(|b| &b.v[..]).collect())
    }

    /// The keys and values of `layer` copied into contiguous `[len, n_kv_heads, head_dim]`
    /// buffers, for prefill attention over an already filled cache.
    pub fn contiguous(&self, layer: usize) -> (Vec<f32>, Vec<f32>) {
        let Ok(kv) = self.blocks.gather(layer, |b, k, v| {
            k.extend_from_slice(&b.k);
            v.extend_from_slice(&b.v);
            Ok::<_, Infallible>(())
        });
        kv
    }

    /// Makes `to` the table of the cached keys: when they were rotated with another table,
    /// turns every cached key of every layer by the angle difference and rescales it by the
    /// ratio of attention factors (see [`rerotation`]), one block of positions at a time.
    /// `layout` is the model's RoPE pairing.
    pub fn rerotate_keys(&mut self, to: &RopeTable, layout: RopeLayout) -> Result<()> {
        let from = match self.rotated_with.take() {
            Some(from) if from != *to && self.blocks.max_layer_len() > 0 => from,
            _ => {
                self.rotated_with = Some(to.clone());
                return Ok(());
            }
        };
        let (block_len, row, n_kv_heads, head_dim) =
            (self.blocks.block_len(), self.blocks.row(), self.n_kv_heads, self.head_dim);
        let held = self.blocks.max_layer_len();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for b in 0..self.blocks.blocks_for(held) {
            let start = b * block_len;
            rerotation(&from, to, start..(start + block_len).min(held), &mut cos, &mut sin);
            let n_freq = to.inv_freq.len();
            for layer in 0..self.blocks.n_layers() {
                let n = self.blocks.layer_len(layer).saturating_sub(start).min(block_len);
                if n > 0 {
                    let rows = &mut self.blocks.blocks_mut(layer)[b].k[..n * row];
                    cpu::rope_rotate(rows, n_kv_heads, head_dim, &cos[..n * n_freq], &sin[..n * n_freq], layout)?;
                }
            }
        }
        self.rotated_with = Some(to.clone());
        Ok(())
    }

    /// Mutable access to the keys of `layer` token by token, for re-rotating cached keys when
    /// a request's RoPE scaling changes: calls `f(position, key_row)` for every held token.
    pub fn for_each_key_mut(&mut self, layer: usize, mut f: impl FnMut(usize, &mut [f32])) {
        let row = self.blocks.row();
        for pos in 0..self.blocks.layer_len(layer) {
            let (b, r) = self.blocks.locate(pos);
            f(pos, &mut self.blocks.blocks_mut(layer)[b].k[r * row..(r + 1) * row]);
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

    #[test]
    fn memory_follows_the_tokens_held() {
        let (layers, kv_heads, head_dim, block) = (3, 2, 8, 16);
        let per_block = 2 * layers * block * kv_heads * head_dim * 4;
        let mut c = KvCache::new(layers, kv_heads, head_dim, block);
        let token = vec![0.5f32; kv_heads * head_dim];
        for n in 1..=100usize {
            for layer in 0..layers {
                c.append(layer, &token, &token);
            }
            assert_eq!(c.allocated_bytes(), n.div_ceil(block) * per_block, "{n} tokens");
        }
        c.clear();
        assert_eq!((c.len(), c.allocated_bytes()), (0, 0));
    }

    #[test]
    fn rerotation_turns_cached_keys_to_the_new_table() {
        use crate::config::{RopeConfig, RopeScaling};

        let (kv_heads, head_dim) = (2, 8);
        let cfg = |scaling| RopeConfig { theta: 100.0, partial_rotary_factor: 1.0, scaling };
        let old = RopeScheme::new(&cfg(RopeScaling::Default), head_dim, 16).unwrap().table(1);
        let yarn = RopeScaling::Yarn {
            factor: 3.0,
            original_max_position_embeddings: 4,
            attention_factor: None,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: None,
            mscale_all_dim: None,
            truncate: true,
        };
        let new = RopeScheme::new(&cfg(yarn), head_dim, 16).unwrap().table(1);
        assert_ne!(new.attention_factor, 1.0);
        let tokens = 11;
        let raw: Vec<f32> = (0..tokens * kv_heads * head_dim).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
        let positions: Vec<usize> = (0..tokens).collect();
        for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
            let mut c = KvCache::new(2, kv_heads, head_dim, 4);
            let mut k_old = raw.clone();
            cpu::rope(&mut k_old, &positions, kv_heads, head_dim, &old.inv_freq, old.attention_factor, layout).unwrap();
            for layer in 0..2 {
                c.append(layer, &k_old, &raw);
            }
            c.rerotate_keys(&old, layout).unwrap();
            assert_eq!(c.contiguous(0).0, k_old, "the first table is recorded, nothing turns");
            c.rerotate_keys(&new, layout).unwrap();
            assert_eq!(c.rope_table(), Some(&new));
            let mut want = raw.clone();
            cpu::rope(&mut want, &positions, kv_heads, head_dim, &new.inv_freq, new.attention_factor, layout).unwrap();
            for layer in 0..2 {
                let (k, v) = c.contiguous(layer);
                assert_eq!(v, raw, "values never turn");
                for (g, w) in k.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-5, "{layout:?} layer {layer}: {g} vs {w}");
                }
            }
        }
    }
}
