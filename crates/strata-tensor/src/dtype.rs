//! Element types: floats and the GGUF/ggml block-quantized formats.

use std::fmt;

/// The element type of a tensor.
///
/// Block-quantized types store `block_len()` elements in `block_bytes()` bytes, in exactly the
/// layout ggml uses (see [`crate::quant`]), so a GGUF tensor is used in place. Floats are blocks
/// of one element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16: the top half of an f32.
    BF16,
    /// ggml `Q8_0`: blocks of 32 int8 values with one f16 scale (34 bytes).
    Q8_0,
    /// ggml `Q4_0`: blocks of 32 4-bit values (offset 8) with one f16 scale (18 bytes).
    Q4_0,
    /// ggml `Q4_1`: blocks of 32 4-bit values with an f16 scale and f16 minimum (20 bytes).
    Q4_1,
    /// ggml `Q4_K`: super-blocks of 256 in 8 sub-blocks with 6-bit scales and mins (144 bytes).
    Q4K,
    /// ggml `Q6_K`: super-blocks of 256 6-bit values in 16 sub-blocks with int8 scales (210 bytes).
    Q6K,
}

impl DType {
    /// Every dtype, in declaration order.
    pub const ALL: [DType; 8] =
        [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q4K, DType::Q6K];

    /// Elements per block: 1 for floats, 32 or 256 for block-quantized types.
    pub const fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => 32,
            DType::Q4K | DType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q4K => 144,
            DType::Q6K => 210,
        }
    }

    /// Whether this is a block-quantized type.
    pub const fn is_quantized(self) -> bool {
        self.block_len() > 1
    }

    /// Average bits per element, including scales.
    pub fn bits_per_element(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_len() as f64
    }

    /// Bytes needed for `numel` elements, or `None` when `numel` is not a whole number of
    /// blocks.
    pub const fn bytes_for(self, numel: usize) -> Option<usize> {
        if !numel.is_multiple_of(self.block_len()) {
            return None;
        }
        Some(numel / self.block_len() * self.block_bytes())
    }

    /// The lower-case name used on the command line and in manifests (`q4_k`, `bf16`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q4K => "q4_k",
            DType::Q6K => "q6_k",
        }
    }

    /// Parses a name as printed by [`DType::name`] (case-insensitive).
    pub fn from_name(name: &str) -> Option<DType> {
        let lower = name.to_ascii_lowercase();
        DType::ALL.into_iter().find(|d| d.name() == lower)
    }

    /// The `ggml_type` enum value GGUF files use for this dtype.
    pub const fn ggml_type(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q8_0 => 8,
            DType::Q4K => 12,
            DType::Q6K => 14,
            DType::BF16 => 30,
        }
    }

    /// The dtype for a GGUF `ggml_type` value, if strata supports it.
    pub fn from_ggml_type(t: u32) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.ggml_type() == t)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
            assert_eq!(DType::from_ggml_type(d.ggml_type()), Some(d));
        }
        assert_eq!(DType::from_name("Q4_K"), Some(DType::Q4K));
        assert_eq!(DType::from_name("q5_k"), None);
    }

    #[test]
    fn sizes_match_ggml() {
        assert_eq!(DType::Q4_0.bits_per_element(), 4.5);
        assert_eq!(DType::Q4K.bits_per_element(), 4.5);
        assert_eq!(DType::Q6K.bits_per_element(), 6.5625);
        assert_eq!(DType::Q8_0.bytes_for(64), Some(68));
        assert_eq!(DType::Q8_0.bytes_for(33), None);
        assert_eq!(DType::BF16.bytes_for(3), Some(6));
    }
}
