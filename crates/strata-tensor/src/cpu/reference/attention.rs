//! Reference causal attention: contiguous (prefill, chunked prefill) and over a paged KV cache
//! (decode).

use super::softmax::softmax_row;
use crate::Result;
pub use crate::cpu::AttentionParams;
use crate::cpu::attention::{check_attention, check_decode};

/// Reference for [`crate::cpu::attention`]: for each query token and head, the scaled dot
/// products with every visible key (sequential f32 sums), a softmax, and the probability-weighted
/// sum of the values, one key after another.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], q_pos0: usize, p: &AttentionParams, out: &mut [f32]) -> Result<()> {
    let (tq, _tk) = check_attention("reference::attention", q.len(), k.len(), v.len(), out.len(), q_pos0, p)?;
    let (hd, group) = (p.head_dim, p.n_heads / p.n_kv_heads);
    let kv_row = |t: usize, g: usize| (t * p.n_kv_heads + g) * hd;
    for t in 0..tq {
        let i = q_pos0 + t;
        for h in 0..p.n_heads {
            let g = h / group;
            let visible = p.first_visible(i)..=i;
            let keys: Vec<&[f32]> = visible.clone().map(|j| &k[kv_row(j, g)..][..hd]).collect();
            let values: Vec<&[f32]> = visible.map(|j| &v[kv_row(j, g)..][..hd]).collect();
            let at = (t * p.n_heads + h) * hd;
            attend_head(&q[at..][..hd], &keys, &values, p.scale, &mut out[at..][..hd]);
        }
    }
    Ok(())
}

/// Reference for [`crate::cpu::attention_decode`]: the query at position `seq_len - 1`, each
/// visible key and value fetched from its block, then as in [`attention`].
pub fn attention_decode(
    q: &[f32],
    k_blocks: &[&[f32]],
    v_blocks: &[&[f32]],
    block_len: usize,
    seq_len: usize,
    p: &AttentionParams,
    out: &mut [f32],
) -> Result<()> {
    check_decode("reference::attention_decode", q.len(), out.len(), k_blocks, v_blocks, block_len, seq_len, p)?;
    let (hd, group) = (p.head_dim, p.n_heads / p.n_kv_heads);
    let i = seq_len - 1;
    let at = |t: usize, g: usize| (t / block_len, (t % block_len * p.n_kv_heads + g) * hd);
    for h in 0..p.n_heads {
        let g = h / group;
        let visible = p.first_visible(i)..=i;
        let keys: Vec<&[f32]> = visible
            .clone()
            .map(|t| {
                let (b, o) = at(t, g);
                &k_blocks[b][o..][..hd]
            })
            .collect();
        let values: Vec<&[f32]> = visible
            .map(|t| {
                let (b, o) = at(t, g);
                &v_blocks[b][o..][..hd]
            })
            .collect();
        attend_head(&q[h * hd..][..hd], &keys, &values, p.scale, &mut out[h * hd..][..hd]);
    }
    Ok(())
}

/// One head's attention output over the given keys and values.
fn attend_head(q: &[f32], keys: &[&[f32]], values: &[&[f32]], scale: f32, out: &mut [f32]) {
    let mut probs: Vec<f32> = keys.iter().map(|k| q.iter().zip(*k).map(|(a, b)| a * b).sum::<f32>() * scale).collect();
    softmax_row(&mut probs);
    out.fill(0.0);
    for (p, v) in probs.iter().zip(values) {
        for (o, x) in out.iter_mut().zip(*v) {
            *o += p * x;
        }
    }
}
