//! Inputs shared by the GPU and the emulated tests of softmax and argmax (`tests/gpu/softmax.rs`,
//! `tests/emu/softmax.rs`).

const INF: f32 = f32::INFINITY;
const NAN: f32 = f32::NAN;

/// Rows of four with special values (the reference decides every expectation: NaN rows, zeros
/// for -inf, ...); also read as rows of 8 and 32.
#[rustfmt::skip]
pub const SPECIAL_ROWS: [f32; 32] = [
    1.0, 2.0, 3.0, -1.0,
    1000.0, 1000.0, 1000.0, -INF,
    -INF, -INF, -INF, -INF,
    1.0, NAN, 2.0, NAN,
    -INF, 5.0, INF, 2.0,
    -INF, 0.0, -INF, 0.0,
    -0.0, 0.0, -0.0, 0.0,
    INF, INF, -INF, 1.0,
];
