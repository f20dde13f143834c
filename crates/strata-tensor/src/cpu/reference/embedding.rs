//! Reference embedding lookup.

use crate::cpu::embedding::check_embedding;
use crate::{Result, Tensor, quant};

/// Reference for [`crate::cpu::embedding`]: each id's row decoded with
/// [`quant::dequantize_row`], one token after another.
pub fn embedding(table: &Tensor, ids: &[u32], out: &mut [f32]) -> Result<()> {
    let dim = check_embedding("reference::embedding", table, ids, out)?;
    for (&id, row) in ids.iter().zip(out.chunks_exact_mut(dim)) {
        quant::dequantize_row(table.dtype(), table.row(id as usize)?, row)?;
    }
    Ok(())
}
