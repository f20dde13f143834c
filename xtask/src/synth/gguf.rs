//! The GGUF side of `cargo xtask synth-model`: a streaming GGUF v3 encoder (header, metadata,
//! tensor infos, aligned data) and the synthetic SentencePiece-style vocabulary the files carry.
//!
//! The encoder writes the header first, from each tensor's name, shape and dtype, and then the
//! tensors one at a time, so a model of several gigabytes never sits in memory. It covers only
//! the metadata value types a llama model file needs. (`strata_models::gguf::write` is the full
//! writer; xtask does not depend on strata-models, see the layer table in tests/tests/tidy.rs.)
//!
//! The vocabulary is what llama.cpp, mistral.rs and strata all need to load a file: `<unk>`,
//! `<s>`, `</s>`, the 256 byte tokens `<0x00>`..`<0xFF>` (llama.cpp looks up `<0x0A>` as its
//! newline token), then pieces over the alphabet `▁a..z` in order of length, scored so that
//! shorter pieces merge first. Every piece longer than one character splits into two pieces of
//! the vocabulary, so the merges derived from the scores reach every piece.

use std::io::{self, Write};

use anyhow::{Result, ensure};
use strata_tensor::DType;

/// GGUF's magic bytes, `GGUF`.
const MAGIC: &[u8; 4] = b"GGUF";
/// The data-section alignment, GGUF's default (so `general.alignment` is not written).
pub const ALIGNMENT: u64 = 32;

/// A metadata value, of the types a llama model file uses.
#[derive(Clone, Debug)]
pub enum Value {
    /// `uint32`.
    U32(u32),
    /// `float32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// `string`.
    Str(String),
    /// `array` of `string`.
    StrArray(Vec<String>),
    /// `array` of `float32`.
    F32Array(Vec<f32>),
    /// `array` of `int32`.
    I32Array(Vec<i32>),
}

/// GGUF's ids of the value types [`Value`] covers.
mod type_id {
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
}

/// One tensor as the header describes it: its GGUF name, its shape in Hugging Face order
/// (`[out, in]` for a weight) and its dtype.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// The GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// The shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// The stored dtype.
    pub dtype: DType,
}

impl TensorInfo {
    /// The tensor's size in bytes; the caller checked that rows are whole blocks.
    pub fn bytes(&self) -> usize {
        self.dtype.bytes_for(self.shape.iter().product()).expect("rows are whole blocks")
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    let array_head = |out: &mut Vec<u8>, element: u32, len: usize| {
        out.extend_from_slice(&type_id::ARRAY.to_le_bytes());
        out.extend_from_slice(&element.to_le_bytes());
        out.extend_from_slice(&(len as u64).to_le_bytes());
    };
    match value {
        Value::U32(v) => {
            out.extend_from_slice(&type_id::U32.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        Value::F32(v) => {
            out.extend_from_slice(&type_id::F32.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        Value::Bool(v) => {
            out.extend_from_slice(&type_id::BOOL.to_le_bytes());
            out.push(u8::from(*v));
        }
        Value::Str(s) => {
            out.extend_from_slice(&type_id::STRING.to_le_bytes());
            put_str(out, s);
        }
        Value::StrArray(v) => {
            array_head(out, type_id::STRING, v.len());
            v.iter().for_each(|s| put_str(out, s));
        }
        Value::F32Array(v) => {
            array_head(out, type_id::F32, v.len());
            v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        Value::I32Array(v) => {
            array_head(out, type_id::I32, v.len());
            v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
    }
}

/// The header: magic, version 3, counts, metadata, tensor infos with offsets relative to the
/// data section, and zero padding up to the alignment.
pub fn header(metadata: &[(&str, Value)], tensors: &[TensorInfo]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut out, key);
        put_value(&mut out, value);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        // GGUF lists dimensions innermost first.
        for &d in t.shape.iter().rev() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&t.dtype.ggml_type().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + t.bytes() as u64).next_multiple_of(ALIGNMENT);
    }
    out.resize((out.len() as u64).next_multiple_of(ALIGNMENT) as usize, 0);
    out
}

/// Writes zeros after a tensor of `len` bytes up to the alignment.
pub fn pad(out: &mut impl Write, len: usize) -> io::Result<()> {
    let pad = (len as u64).next_multiple_of(ALIGNMENT) - len as u64;
    out.write_all(&[0u8; ALIGNMENT as usize][..pad as usize])
}

/// Token types, as llama.cpp numbers them in `tokenizer.ggml.token_type`.
mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const BYTE: i32 = 6;
}

/// The alphabet of the synthetic pieces: SentencePiece's space mark and the lower-case letters.
const ALPHABET: [char; 27] = [
    '▁', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm', 'n', 'o', 'p', 'q', 'r', 's', 't', 'u', 'v',
    'w', 'x', 'y', 'z',
];

/// A SentencePiece-style (`tokenizer.ggml.model = "llama"`) vocabulary of `n` tokens: tokens,
/// scores and token types, with `<unk>` = 0, `<s>` = 1, `</s>` = 2.
pub struct Vocab {
    /// `tokenizer.ggml.tokens`.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores`.
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.token_type`.
    pub types: Vec<i32>,
}

/// The synthetic vocabulary of `n` tokens described in the module documentation.
pub fn vocab(n: usize) -> Result<Vocab> {
    let fixed = 3 + 256;
    ensure!(n > fixed + ALPHABET.len(), "a synthetic vocabulary needs more than {} tokens, got {n}", fixed + 27);
    let mut v = Vocab { tokens: Vec::with_capacity(n), scores: Vec::with_capacity(n), types: Vec::with_capacity(n) };
    for (token, ty) in [("<unk>", token_type::UNKNOWN), ("<s>", token_type::CONTROL), ("</s>", token_type::CONTROL)] {
        v.tokens.push(token.to_string());
        v.scores.push(0.0);
        v.types.push(ty);
    }
    for byte in 0..=255u8 {
        v.tokens.push(format!("<0x{byte:02X}>"));
        v.scores.push(0.0);
        v.types.push(token_type::BYTE);
    }
    // Pieces of length 1, 2, 3, ... in lexicographic order of their alphabet indices.
    let mut digits: Vec<usize> = vec![0];
    while v.tokens.len() < n {
        let piece: String = digits.iter().map(|&d| ALPHABET[d]).collect();
        v.scores.push(-((v.tokens.len() - fixed) as f32));
        v.tokens.push(piece);
        v.types.push(token_type::NORMAL);
        // Next string of the same length, or the first of the next length.
        let mut i = digits.len();
        loop {
            if i == 0 {
                digits = vec![0; digits.len() + 1];
                break;
            }
            i -= 1;
            digits[i] += 1;
            if digits[i] < ALPHABET.len() {
                break;
            }
            digits[i] = 0;
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn vocab_is_unique_and_every_piece_splits_into_two_pieces() {
        let v = vocab(32000).unwrap();
        assert_eq!(v.tokens.len(), 32000);
        assert_eq!(v.scores.len(), 32000);
        assert_eq!(v.types.len(), 32000);
        assert_eq!(&v.tokens[..3], ["<unk>", "<s>", "</s>"]);
        assert_eq!(v.tokens[3 + 0x0A], "<0x0A>");
        let set: HashSet<&str> = v.tokens.iter().map(String::as_str).collect();
        assert_eq!(set.len(), v.tokens.len(), "tokens are unique");
        for (token, &ty) in v.tokens.iter().zip(&v.types) {
            let chars: Vec<char> = token.chars().collect();
            if ty != token_type::NORMAL || chars.len() < 2 {
                continue;
            }
            let split = chars.len() - 1;
            let (left, right): (String, String) = (chars[..split].iter().collect(), chars[split..].iter().collect());
            assert!(set.contains(left.as_str()) && set.contains(right.as_str()), "{token} splits into pieces");
        }
        // Scores fall with the piece index, so shorter pieces merge first.
        let normal: Vec<f32> =
            v.scores.iter().zip(&v.types).filter(|&(_, &t)| t == token_type::NORMAL).map(|(&s, _)| s).collect();
        assert!(normal.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn header_offsets_are_aligned_and_dims_reversed() {
        let tensors = vec![
            TensorInfo { name: "a".into(), shape: vec![3, 64], dtype: DType::Q8_0 },
            TensorInfo { name: "b".into(), shape: vec![5], dtype: DType::F32 },
        ];
        let meta = [("general.architecture", Value::Str("llama".into())), ("x", Value::U32(7))];
        let h = header(&meta, &tensors);
        assert_eq!(&h[..4], b"GGUF");
        assert_eq!(h.len() as u64 % ALIGNMENT, 0);
        // Tensor "a": 3 rows of 2 q8_0 blocks (34 bytes) = 204 bytes, so "b" starts at 224.
        let a_info = h.windows(9).position(|w| w == [1, 0, 0, 0, 0, 0, 0, 0, b'a']).unwrap() + 9;
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap());
        assert_eq!(u32_at(a_info), 2);
        assert_eq!((u64_at(a_info + 4), u64_at(a_info + 12)), (64, 3));
        assert_eq!(u32_at(a_info + 20), 8);
        assert_eq!(u64_at(a_info + 24), 0);
        let b_info = a_info + 32 + 9;
        assert_eq!(u64_at(b_info + 4 + 8 + 4), 224);
    }
}
