//! The reference shared by the GPU and the emulated tests of `moe_combine_f32`
//! (`tests/gpu/elementwise.rs`, `tests/emu/elementwise.rs`): the CPU's arithmetic for a Mixture-of-
//! Experts block's output from its experts'.

/// The inputs of one combine: `ids` and `w` `[tokens, slots]`, `ys` `[tokens, slots, cols]`, a slot
/// used when its id is below `experts`; a shared expert's outputs `[tokens, cols]` and gate logits
/// `[tokens]`.
pub struct Combine<'a> {
    pub ids: &'a [u32],
    pub w: &'a [f32],
    pub ys: &'a [f32],
    pub slots: usize,
    pub experts: u32,
    pub cols: usize,
    pub shared: Option<(&'a [f32], &'a [f32])>,
}

impl Combine<'_> {
    /// What the CPU's Mixture-of-Experts layer computes: per token, zero, then `o += y * w` over
    /// the used slots in ascending order of expert index (NaN for a token with none), then
    /// `o += sigmoid(g) * y` of the shared expert; added to `x0` with `residual`, else as it is.
    pub fn reference(&self, x0: &[f32], residual: bool) -> Vec<f32> {
        let (slots, cols) = (self.slots, self.cols);
        let tokens = self.ids.len() / slots;
        let mut out = Vec::with_capacity(tokens * cols);
        for t in 0..tokens {
            let mut used: Vec<usize> = (0..slots).filter(|&s| self.ids[t * slots + s] < self.experts).collect();
            used.sort_by_key(|&s| self.ids[t * slots + s]);
            for c in 0..cols {
                let mut o = if used.is_empty() { f32::NAN } else { 0.0f32 };
                for &s in &used {
                    o += self.ys[(t * slots + s) * cols + c] * self.w[t * slots + s];
                }
                if let Some((y, g)) = self.shared {
                    o += 1.0 / (1.0 + (-g[t]).exp()) * y[t * cols + c];
                }
                out.push(if residual { x0[t * cols + c] + o } else { o });
            }
        }
        out
    }
}
