//! Reference elementwise operations: SiLU, SwiGLU, residual add, multiply, scale.

use crate::Result;
use crate::cpu::elementwise::check_same_len;

/// Reference for [`crate::cpu::silu`]: `x / (1 + exp(-x))`, as torch computes it.
pub fn silu(x: &mut [f32]) {
    for v in x {
        *v = *v / (1.0 + (-*v).exp());
    }
}

/// Reference for [`crate::cpu::swiglu`]: `out = silu(gate) * up`.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    check_same_len("reference::swiglu", "up", gate.len(), up.len())?;
    check_same_len("reference::swiglu", "out", gate.len(), out.len())?;
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = (g / (1.0 + (-g).exp())) * u;
    }
    Ok(())
}

/// Reference for [`crate::cpu::add`]: `acc += x`.
pub fn add(acc: &mut [f32], x: &[f32]) -> Result<()> {
    check_same_len("reference::add", "x", acc.len(), x.len())?;
    for (a, v) in acc.iter_mut().zip(x) {
        *a += v;
    }
    Ok(())
}

/// Reference for [`crate::cpu::mul`]: `acc *= x`.
pub fn mul(acc: &mut [f32], x: &[f32]) -> Result<()> {
    check_same_len("reference::mul", "x", acc.len(), x.len())?;
    for (a, v) in acc.iter_mut().zip(x) {
        *a *= v;
    }
    Ok(())
}

/// Reference for [`crate::cpu::scale`]: `x *= s`.
pub fn scale(x: &mut [f32], s: f32) {
    for v in x {
        *v *= s;
    }
}
