//! strata-tests: cross-crate tests, their committed fixtures, and the repository's tidy checks.
//!
//! Tests that span several strata crates live in `tests/tests/*.rs`; the reference fixtures
//! (tiny random-init models with transformers' logits, made by `cargo xtask fixtures`) live in
//! `tests/fixtures/`. This library holds what those tests share: finding fixtures, reading
//! `.npy` files and `expected.json`, and comparing logits. `tests/tests/tidy.rs` holds the tidy
//! checks, ordinary `#[test]`s over the source tree.
//!
//! Dependencies: any strata crate (it sits above all of them and nothing depends on it).
#![warn(missing_docs)]

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The directory of committed fixtures.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A reference fixture: a checkpoint directory with transformers' logits and greedy tokens.
#[derive(Debug)]
pub struct Fixture {
    /// The fixture's name (its directory name).
    pub name: String,
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// The prompt ids.
    pub prompt_ids: Vec<u32>,
    /// The reference logits, `[prompt_ids.len(), vocab]` row-major.
    pub logits: Vec<f32>,
    /// The vocabulary size (columns of `logits`).
    pub vocab: usize,
    /// Greedy continuation ids.
    pub greedy_ids: Vec<u32>,
    /// The whole `expected.json`.
    pub expected: Value,
}

impl Fixture {
    /// Loads the fixture called `name`.
    pub fn load(name: &str) -> Fixture {
        let dir = fixtures_dir().join(name);
        let text = std::fs::read_to_string(dir.join("expected.json"))
            .unwrap_or_else(|e| panic!("cannot read {}/expected.json: {e}", dir.display()));
        let expected: Value = serde_json::from_str(&text).expect("expected.json is JSON");
        let ids = |key: &str| -> Vec<u32> {
            expected[key]
                .as_array()
                .unwrap_or_else(|| panic!("{name}: {key} missing"))
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        };
        let (shape, logits) = read_npy_f32(&dir.join("logits.npy"));
        assert_eq!(shape.len(), 2, "{name}: logits must be 2-D");
        Fixture {
            name: name.to_string(),
            prompt_ids: ids("prompt_ids"),
            greedy_ids: ids("greedy_ids"),
            vocab: shape[1],
            logits,
            expected,
            dir,
        }
    }
}

/// Reads a little-endian float32 `.npy` file (format 1.0 or 2.0, C order): shape and data.
pub fn read_npy_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}: not an npy file", path.display());
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).expect("npy header is text");
    assert!(header.contains("'descr': '<f4'"), "{}: not little-endian float32: {header}", path.display());
    assert!(header.contains("'fortran_order': False"), "{}: not C order", path.display());
    let shape_str = header.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).expect("npy shape");
    let shape: Vec<usize> =
        shape_str.split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse().unwrap()).collect();
    let data: Vec<f32> =
        bytes[start + header_len..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(data.len(), shape.iter().product::<usize>(), "{}: data length does not match shape", path.display());
    (shape, data)
}

/// The largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}
